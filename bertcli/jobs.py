"""Setting up a run from a recipe: output directory, tokenizer, model, data, then the loop."""

from __future__ import annotations

import functools
import re
import shutil
import sys
from pathlib import Path

import torch

from bertcli.checkpoint import ARCHITECTURES, load_checkpoint, read_config, save_checkpoint
from bertcli.errors import BertcliError, CheckpointError
from bertcli.fileio import atomic_write_text
from bertcli.model import BertConfig
from bertcli.recipes import Recipe, dump_recipe
from bertcli.tasks import make_task
from bertcli.tokenizer import WordPieceTokenizer, load_tokenizer
from bertcli.train import RESUME_FILE, STAGE_DIR, Job, fit, write_metrics


def say(message: str) -> None:
    sys.stderr.write(message + "\n")


def prepare_output(out: Path, resume: bool, overwrite: bool) -> None:
    """Never replace what the user has: an existing run needs --resume or --overwrite, and
    --overwrite only removes a directory that holds a bertcli run."""
    if resume and overwrite:
        raise BertcliError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise BertcliError(f"{out}: exists and is not a directory")
    busy = out.is_dir() and any(not _leftover(p) for p in out.iterdir())
    if resume and not (out / RESUME_FILE).is_file():
        raise BertcliError(f"{out}: nothing to resume (no {RESUME_FILE})")
    if out.is_dir():
        for p in out.iterdir():
            if _leftover(p):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    if resume:
        return
    if busy and not overwrite:
        raise BertcliError(f"{out}: already exists; pass --resume to continue it or --overwrite to replace it")
    if busy:
        if not ((out / "recipe.yaml").is_file() or (out / "config.json").is_file()):
            raise BertcliError(f"{out}: --overwrite refused: the directory does not hold a bertcli run")
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BertcliError(f"{out}: cannot create the output directory: {err.strerror}") from None


def _leftover(path: Path) -> bool:
    """What a run killed mid-write leaves: an atomic write's temporary file or a half-written checkpoint."""
    return path.name == STAGE_DIR or re.fullmatch(r"\..+\.[a-z0-9_]{8}\.tmp", path.name) is not None


def recipe_tokenizer(recipe: Recipe) -> WordPieceTokenizer:
    return load_tokenizer(recipe.model.init if recipe.model.init else recipe.tokenizer)


def scratch_config(recipe: Recipe, vocab_size: int) -> BertConfig:
    m = recipe.model
    return BertConfig(vocab_size=vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                      num_attention_heads=m.num_heads, intermediate_size=m.intermediate_size,
                      max_position_embeddings=m.max_position, hidden_dropout_prob=m.dropout,
                      attention_probs_dropout_prob=m.dropout)


def check_window(recipe: Recipe, cfg: BertConfig) -> None:
    if recipe.data.max_seq_len > cfg.max_position_embeddings:
        raise BertcliError(f"data.max_seq_len {recipe.data.max_seq_len} is longer than the model's "
                           f"max_position_embeddings ({cfg.max_position_embeddings})")


def task_options(recipe: Recipe) -> dict:
    """What predict and evaluate need to rebuild the task from a checkpoint (kept in config.json)."""
    d, t = recipe.data, recipe.task
    return {"max_seq_len": d.max_seq_len, "doc_stride": d.doc_stride, "max_query_len": d.max_query_len,
            "max_answer_len": t.max_answer_len, "n_best": t.n_best, "no_answer_threshold": t.no_answer_threshold,
            "text_column": d.text_column, "text_pair_column": d.text_pair_column, "label_column": d.label_column}


def finetune(recipe: Recipe, out: Path | None, resume: bool, overwrite: bool) -> dict:
    out = Path(out or recipe.output or "")
    if not str(out) or str(out) == ".":
        raise BertcliError("no output directory: set `output` in the recipe or pass --out")
    tokenizer = recipe_tokenizer(recipe)
    options = task_options(recipe)
    task = make_task(recipe.task.name, tokenizer=tokenizer, labels=recipe.task.labels, **options)
    train_examples = [e for path in recipe.data.train for e in task.read(path)]
    eval_examples = [e for path in recipe.data.eval for e in task.read(path)]
    task.labels = list(recipe.task.labels) or task.labels_from(train_examples)
    prepare_output(out, resume, overwrite)

    torch.manual_seed(recipe.train.seed)
    labels = task.labels or None
    if recipe.model.init:
        ck = load_checkpoint(recipe.model.init, architecture=task.architecture, labels=labels)
        model, cfg = ck.model, ck.config
        say(f"model: {recipe.model.init} ({ck.report.summary()})")
    else:
        cfg = scratch_config(recipe, tokenizer.vocab_size)
        model = ARCHITECTURES[task.architecture](cfg, max(len(task.labels), 1))
        say(f"model: new {cfg.num_hidden_layers} x {cfg.hidden_size} BERT")
    check_window(recipe, cfg)
    features = task.encode(train_examples)
    say(f"data: {len(train_examples)} training examples ({len(features)} sequences), {len(eval_examples)} for evaluation")
    atomic_write_text(out / "recipe.yaml", dump_recipe(recipe))

    def evaluate(m):
        metrics = task.evaluate(m, eval_examples, recipe.train.batch_size * 2)
        return {k: v for k, v in metrics.items() if isinstance(v, float)}

    def save(m, directory):
        saved = {"name": task.name, **options, **task.saved_options()}
        save_checkpoint(directory, m, task.architecture, tokenizer, task.labels or None, task=saved)

    job = Job(model=model, features=features, lengths=[len(f["input_ids"]) for f in features], collate=task.collate,
              counts=task.counts, loss=task.loss, evaluate=evaluate if eval_examples else None, save=save)
    metrics = fit(job, recipe.train, out, resume)
    write_metrics(out, metrics)
    say(f"saved: {out}")
    return metrics


def load_for_task(model_dir: Path):
    """A fine-tuned checkpoint and its task, for evaluate and predict."""
    from bertcli.tasks import task_for_architecture

    _, raw = read_config(model_dir)
    architecture = (raw.get("architectures") or ["BertModel"])[0]
    name = task_for_architecture(architecture)
    ck = load_checkpoint(model_dir)
    options = raw.get("bertcli_task") if isinstance(raw.get("bertcli_task"), dict) else {}
    options = {k: v for k, v in options.items() if k != "name"}
    options.setdefault("max_seq_len", min(512, ck.config.max_position_embeddings))
    if name in ("classify", "ner") and not ck.labels:
        raise CheckpointError(f"{model_dir}/config.json: no id2label: the label names of the head are unknown")
    task = make_task(name, tokenizer=ck.tokenizer, labels=ck.labels, **options)
    return ck, task


def init_distributed() -> None:
    """Under torchrun (WORLD_SIZE > 1): join the process group, gloo on CPU, NCCL on CUDA."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)


def pretrain(recipe: Recipe, out: Path | None, resume: bool, overwrite: bool) -> dict:
    import torch.distributed as dist

    from bertcli.data.corpus import shards_for
    from bertcli.model import BertForPreTraining
    from bertcli.tasks.pretrain import PretrainTask, make_instances, most_frequent_token

    out = Path(out or recipe.output or "")
    if not str(out) or str(out) == ".":
        raise BertcliError("no output directory: set `output` in the recipe or pass --out")
    init_distributed()
    rank = dist.get_rank() if dist.is_initialized() else 0
    tokenizer = recipe_tokenizer(recipe)
    t, d = recipe.task, recipe.data
    if rank == 0:  # encode raw text once; the other ranks then find it in the cache
        train_shards = shards_for(list(d.train), tokenizer, d.segmenter)
        eval_shards = shards_for(list(d.eval), tokenizer, d.segmenter) if d.eval else []
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        train_shards = shards_for(list(d.train), tokenizer, d.segmenter)
        eval_shards = shards_for(list(d.eval), tokenizer, d.segmenter) if d.eval else []
    task = PretrainTask(tokenizer, train_shards, t.objective, t.mask_prob, t.whole_word_mask)
    instances = make_instances(train_shards, d.max_seq_len, t.objective, t.short_seq_prob, recipe.train.seed)
    if rank == 0:
        prepare_output(out, resume, overwrite)
    if dist.is_initialized():
        dist.barrier()

    torch.manual_seed(recipe.train.seed)
    if recipe.model.init:
        ck = load_checkpoint(recipe.model.init, architecture="BertForPreTraining")
        model, cfg = ck.model, ck.config
        if rank == 0:
            say(f"model: {recipe.model.init} ({ck.report.summary()})")
    else:
        cfg = scratch_config(recipe, tokenizer.vocab_size)
        model = BertForPreTraining(cfg)
        if rank == 0:
            say(f"model: new {cfg.num_hidden_layers} x {cfg.hidden_size} BERT, vocabulary {cfg.vocab_size}")
    check_window(recipe, cfg)
    tokens = sum(len(s.tokens) for s in train_shards)
    if rank == 0:
        say(f"data: {tokens} training tokens in {len(instances)} sequences of up to {d.max_seq_len}")
        atomic_write_text(out / "recipe.yaml", dump_recipe(recipe))

    evaluate_fn = None
    if eval_shards:
        eval_task = PretrainTask(tokenizer, eval_shards, t.objective, t.mask_prob, t.whole_word_mask)
        eval_instances = make_instances(eval_shards, d.max_seq_len, t.objective, t.short_seq_prob, recipe.train.seed + 1)
        evaluate_fn = functools.partial(eval_task.evaluate, instances=eval_instances,
                                        batch_size=recipe.train.batch_size * 2, seed=recipe.train.seed,
                                        most_frequent=most_frequent_token(train_shards, tokenizer.vocab_size, task.special))

    def save(m, directory):
        save_checkpoint(directory, m, "BertForPreTraining", tokenizer, task={"name": "pretrain", **task_options(recipe)})

    job = Job(model=model, features=instances, lengths=task.lengths(instances), collate=task.collate,
              counts=task.counts, loss=task.loss, evaluate=evaluate_fn, save=save)
    metrics = fit(job, recipe.train, out, resume)
    if rank == 0:
        write_metrics(out, metrics)
        say(f"saved: {out}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return metrics

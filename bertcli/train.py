"""The one training loop, shared by pretraining and fine-tuning.

AdamW (no weight decay on biases and LayerNorm), linear warmup then linear decay, gradient
accumulation and clipping, fp32 / bf16 autocast / fp16 with a scaler (CUDA), stops at
`max_steps`, `epochs` or `time_budget` (whichever ends first), evaluation every `eval_every`
steps, `log.jsonl`, checkpoints every `save_every` steps and at the end, exact resume, and a
resumable checkpoint on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bertcli.allocator import keep_freed_memory
from bertcli.data.batching import batch_order
from bertcli.errors import BertcliError, Interrupted
from bertcli.fileio import OutputError, append_text, atomic_write, atomic_write_text, discard, finite_json, finite_number, publish
from bertcli.recipes import TrainConfig, parse_duration
from bertcli.rundir import STAGE_DIR

RESUME_FILE = "resume.pt"
MAX_SKIPPED_STEPS = 10  # non-finite losses in a row that bf16/fp16 may skip before the run stops


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
    features: Sequence
    lengths: Sequence[int]
    collate: Callable[[Sequence, Sequence[int]], dict[str, Tensor]]  # (features, a seed per example) -> batch
    counts: Callable[[dict[str, Tensor]], dict[str, int]]  # loss terms -> how many targets each has
    loss: Callable[[nn.Module, dict[str, Tensor], dict[str, int]], Tensor]  # sum of terms / global counts
    evaluate: Callable[[nn.Module], dict[str, float]] | None  # eval metrics, without the eval_ prefix
    save: Callable[[nn.Module, Path], None]  # write the checkpoint files (weights, config, tokenizer) into a directory
    recipe: str = ""  # the resolved recipe, written as recipe.yaml once the resume state (if any) has loaded


def example_seed(seed: int, epoch: int, index: int) -> int:
    """A seed per (run seed, epoch, example): masks are drawn anew each epoch, identically
    however many processes share the batch, and again identically after a resume."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (2**63 - 1)


def device_for(precision: str, local_rank: int = 0) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if precision == "fp16":
        raise BertcliError("train.precision: fp16 needs a CUDA GPU; use bf16 (or fp32) on a CPU")
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 on hardware with native bf16 matrix units (AVX512-BF16 or AMX on CPUs, Ampere or
    later GPUs), where it is about twice as fast or more at the same accuracy; fp32 elsewhere."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    fast = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bf16" if fast else "fp32"


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
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=True)  # one kernel: 3-5x faster than foreach here


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


def save_resume_state(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler, pos: Position) -> None:
    """One file holding weights, optimizer and position, written atomically, so the weights and
    the optimizer always belong to the same step. Loaded with weights_only=True. (No RNG state
    is needed: the loop reseeds from the step number.)"""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "position": [pos.step, pos.epoch, pos.batch, pos.tokens, pos.elapsed]}
    atomic_write(out / RESUME_FILE, lambda tmp: torch.save(state, tmp))


def load_resume_state(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler) -> Position:
    path = out / RESUME_FILE
    if not path.is_file():
        raise BertcliError(f"{out}: nothing to resume (no {RESUME_FILE}); start afresh with --overwrite")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, batch, tokens, elapsed = state["position"]
        counts = [step, epoch, batch, tokens]
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise ValueError(f"the position {counts} is not four counts of 0 or more")
        if not finite_number(elapsed) or elapsed < 0:
            raise ValueError(f"the elapsed time {elapsed!r} is not a number of seconds")
    except Exception as err:  # a resume file from elsewhere or from a different recipe
        raise BertcliError(f"{path}: cannot resume from it ({str(err).splitlines()[0][:200]})") from None
    return Position(step, epoch, batch, tokens, float(elapsed))


class Log:
    """log.jsonl: one JSON object per logged step and per evaluation. On resume, lines past the
    resumed step are dropped, so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        self.last = ""
        if resume_step is None:
            atomic_write(path, lambda tmp: Path(tmp).write_text("", encoding="utf-8"))
        elif path.exists():
            lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
            kept = [line for line in lines if line and _record_step(line) <= resume_step]
            atomic_write(path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in kept), encoding="utf-8"))
            self.last = kept[-1] if kept else ""

    def write(self, record: dict) -> None:
        line = finite_json(record)
        if line == self.last:  # the final evaluation, redone by a run resumed after its last checkpoint
            return
        append_text(self.path, line + "\n")
        self.last = line


def _record_step(line: str) -> float:
    """The step of a log line; a blank or torn one (the process died while writing it) sorts last."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return math.inf
    step = record.get("step") if isinstance(record, dict) else None
    return step if finite_number(step) else math.inf  # a line bertcli did not write sorts last


def _progress(total: int | None, enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True, quiet=not enabled)
    return Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                    disable=not (enabled and console.is_terminal)), console


class _StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (how schedulers such as SLURM, Kubernetes and systemd stop a job)
    during training sets a flag that the loop reads after each step (a KeyboardInterrupt raised at a
    random point can be swallowed, e.g. inside a finalizer). A second signal interrupts at once,
    except while the resumable checkpoint is being written (`saving`); once the final checkpoint is
    written (`urgent`), the first signal interrupts the final evaluation at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self.saving = False
        self.urgent = False
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        first = self.signum is None
        self.signum = self.signum or signum
        if self.saving:
            return  # the checkpoint that the first signal asked for is being written: let it finish
        if self.urgent or not first:
            raise KeyboardInterrupt

    def is_set(self) -> bool:
        return self.signum is not None

    def release(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


def _global_sum(values: list[float], world: int, device: torch.device) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def fit(job: Job, cfg: TrainConfig, out: Path, resume: bool) -> dict[str, float]:
    """Train `job.model` in place; write log.jsonl and checkpoints into `out` (rank 0 alone
    writes). Returns the last evaluation's metrics (eval_-prefixed), or {} without eval data."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    writer = rank == 0
    device = device_for(cfg.precision, int(os.environ.get("LOCAL_RANK", 0)))
    precision = resolve_precision(cfg.precision, device)
    if device.type == "cpu":
        keep_freed_memory()
    model = job.model.to(device)
    optimizer = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    pos = load_resume_state(out, model, optimizer, scaler) if resume else Position()
    wrapped = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=True)
    if writer and job.recipe:  # the run's files change only now, when nothing it reads can fail any more
        atomic_write_text(out / "recipe.yaml", job.recipe)
    log = Log(out / "log.jsonl", pos.step if resume else None) if writer else None
    global_batch = cfg.batch_size * world
    batches_per_epoch = len(job.features) // global_batch if world > 1 else math.ceil(len(job.features) / global_batch)
    if batches_per_epoch == 0:
        raise BertcliError(f"data.train: {len(job.features)} training sequences, fewer than one batch of {global_batch}")
    total = plan_steps(cfg, batches_per_epoch)
    budget = parse_duration(cfg.time_budget) if cfg.time_budget else None
    start = time.perf_counter() - pos.elapsed
    metrics: dict[str, float] = {}
    window = {"loss": 0.0, "steps": 0, "tokens": 0, "start": time.perf_counter(), "paused": 0.0}
    progress, console = _progress(total, writer)

    def checkpoint() -> None:
        began = time.perf_counter()
        pos.elapsed = began - start
        broken = next((name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
        if broken is not None:  # never saved: a checkpoint of NaN weights would only spread the damage
            raise BertcliError(f"{broken} holds NaN or infinite values at step {pos.step}: the training diverged; "
                               f"lower train.lr or check the data. Nothing was saved for this step; the last good "
                               f"checkpoint in {out} (if any) is kept")
        if writer:  # written whole into a side directory, then moved in by renames: never half replaced
            stage = out / STAGE_DIR
            discard(stage)
            try:
                stage.mkdir()
                job.save(model, stage)
                save_resume_state(stage, model, optimizer, scaler, pos)
            except (OSError, OutputError) as err:
                discard(stage)
                reason = err.reason if isinstance(err, OutputError) else err.strerror
                raise BertcliError(f"{out}: cannot save the checkpoint of step {pos.step}: {reason}. The previous "
                                   f"checkpoint in {out} is intact") from None
            publish(stage, out, last=RESUME_FILE)
        if world > 1:
            dist.barrier()
        window["paused"] += time.perf_counter() - began

    def evaluate() -> None:
        began = time.perf_counter()
        _evaluate()
        window["paused"] += time.perf_counter() - began  # tokens/s counts training time only

    def _evaluate() -> None:
        nonlocal metrics
        if job.evaluate is not None and writer:
            model.eval()
            with torch.inference_mode(), autocast(device, precision):
                metrics = {f"eval_{k}": v for k, v in job.evaluate(model).items()}
            model.train()
            log.write({"step": pos.step, **metrics})
            console.print(f"step {pos.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if world > 1:
            dist.barrier()

    model.train()
    skipped = 0  # non-finite steps in a row (bf16/fp16)
    done = total is not None and pos.step >= total
    saved = False  # the final checkpoint is written
    ctrl_c = _StopRequest()
    try:
        with progress:
            bar = progress.add_task("train", total=total, completed=pos.step, info="")
            while not done:
                order = batch_order(job.lengths, global_batch, seed=cfg.seed + pos.epoch)[:batches_per_epoch]
                while pos.batch < len(order) and not done:
                    torch.manual_seed(example_seed(cfg.seed, pos.step, rank))  # dropout: reproducible on resume
                    group = order[pos.batch:pos.batch + cfg.grad_accum]
                    micro = []
                    for global_indices in group:
                        mine = global_indices[rank::world]
                        seeds = [example_seed(cfg.seed, pos.epoch, i) for i in mine]
                        micro.append({k: v.to(device) for k, v in job.collate([job.features[i] for i in mine], seeds).items()})
                    per_batch = [job.counts(b) for b in micro]
                    names = sorted(per_batch[0])
                    local = [sum(c[n] for c in per_batch) for n in names]
                    tokens = sum(int(b["attention_mask"].sum()) for b in micro)
                    *totals, tokens = _global_sum([*local, tokens], world, device)
                    counts = {n: max(int(c), 1) for n, c in zip(names, totals)}
                    step_loss = 0.0
                    for i, batch in enumerate(micro):
                        sync = world == 1 or i == len(micro) - 1
                        with (contextlib.nullcontext() if sync else wrapped.no_sync()), autocast(device, precision):
                            loss = job.loss(wrapped, batch, counts)
                        scaler.scale(loss * world).backward()
                        step_loss += loss.item()
                    step_loss, = _global_sum([step_loss], world, device)
                    lr = lr_at(pos.step, cfg, total)
                    for param_group in optimizer.param_groups:
                        param_group["lr"] = lr
                    scaler.unscale_(optimizer)
                    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
                    bad = not math.isfinite(step_loss) or (precision != "fp16" and not math.isfinite(norm))
                    if bad and (precision == "fp32" or skipped >= MAX_SKIPPED_STEPS):
                        what = f"the loss became {step_loss}" if not math.isfinite(step_loss) else f"the gradient norm became {norm}"
                        again = f" after {skipped} skipped steps in a row" if skipped else ""
                        raise BertcliError(f"{what} at step {pos.step + 1}{again}; lower train.lr or check the data. "
                                           f"The last good checkpoint in {out} is kept")
                    if bad:  # low precision overflowed: drop this step's update, as a loss scaler does
                        skipped += 1
                        message = (f"step {pos.step + 1}: loss {step_loss}, gradient norm {norm} in {precision}: "
                                   f"update skipped ({skipped} in a row; the run stops after {MAX_SKIPPED_STEPS})")
                        console.print(message)
                        if writer:
                            log.write({"step": pos.step + 1, "skipped": message})
                    else:
                        skipped = 0
                        scaler.step(optimizer)
                    scaler.update()  # fp16: lowers the scale after an overflow
                    optimizer.zero_grad(set_to_none=True)
                    pos.step += 1
                    pos.batch += len(group)
                    pos.tokens += int(tokens)
                    window["loss"] += 0.0 if bad else step_loss
                    window["steps"] += 0 if bad else 1
                    window["tokens"] += int(tokens)
                    if pos.step % cfg.log_every == 0 or pos.step == 1:
                        now = time.perf_counter()
                        record = {"step": pos.step, "epoch": pos.epoch + pos.batch / len(order),
                                  "loss": window["loss"] / window["steps"] if window["steps"] else None, "lr": lr,
                                  "tokens_per_s": window["tokens"] / max(now - window["start"] - window["paused"], 1e-9)}
                        if writer:
                            log.write(record)
                            shown = "skipped" if record["loss"] is None else f"{record['loss']:.4f}"
                            progress.update(bar, info=f"loss {shown}  {record['tokens_per_s']:.0f} tok/s")
                            if not console.is_terminal:
                                console.print(f"step {pos.step}" + (f"/{total}" if total else "") +
                                              f"  loss {shown}  lr {lr:.2e}  {record['tokens_per_s']:.0f} tok/s")
                        window = {"loss": 0.0, "steps": 0, "tokens": 0, "start": now, "paused": 0.0}
                    progress.update(bar, completed=pos.step)
                    out_of_time = budget is not None and time.perf_counter() - start >= budget
                    out_of_time, stop = (bool(v) for v in _global_sum([float(out_of_time), float(ctrl_c.is_set())],
                                                                      world, device))  # all ranks agree
                    if stop:
                        raise KeyboardInterrupt
                    done = (total is not None and pos.step >= total) or out_of_time
                    if cfg.eval_every and pos.step % cfg.eval_every == 0 and not done:
                        evaluate()
                    if cfg.save_every and pos.step % cfg.save_every == 0 and not done:
                        checkpoint()
                if pos.batch >= len(order):
                    pos.epoch += 1
                    pos.batch = 0
        checkpoint()  # the trained weights are safe before the last evaluation starts
        saved = True
        ctrl_c.urgent = True  # from here a signal stops the evaluation at once: --resume redoes it
        if ctrl_c.is_set():
            raise KeyboardInterrupt
        evaluate()
    except KeyboardInterrupt:
        if not saved:
            ctrl_c.saving = True  # further signals wait for this checkpoint
            checkpoint()
        ctrl_c.release()
        signum = ctrl_c.signum or signal.SIGINT
        again = "evaluate it" if saved else "continue"
        raise Interrupted(f"{signal.Signals(signum).name} at step {pos.step}: saved to {out}; {again} with --resume",
                          128 + signum) from None
    finally:
        ctrl_c.release()
    return metrics


def write_metrics(out: Path, metrics: dict) -> None:
    atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(finite_json(metrics, indent=2) + "\n"))

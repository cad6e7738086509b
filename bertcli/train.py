"""The one training loop, shared by pretraining and fine-tuning.

AdamW (no weight decay on biases and LayerNorm), linear warmup then linear decay, gradient
accumulation and clipping, fp32 / bf16 autocast / fp16 with a scaler (CUDA), stops at
`max_steps`, `epochs` or `time_budget` (whichever ends first), evaluation every `eval_every`
steps, `log.jsonl`, checkpoints every `save_every` steps and at the end, exact resume, and a
resumable checkpoint on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bertcli.data.batching import batch_order
from bertcli.errors import BertcliError, Interrupted, NonFinite, first_line
from bertcli.inputs import INPUTS, inputs_file
from bertcli.fileio import (OutputError, append_text, atomic_write, atomic_write_text, discard, finite_json, finite_number,
                            note, publish, unnote)
from bertcli.recipes import TrainConfig, parse_duration
from bertcli.rundir import STAGE_DIR
from bertcli.runtime import autocast, device_for, resolve_precision

RESUME_FILE = "resume.pt"
MAX_SKIPPED_STEPS = 10  # non-finite losses in a row that bf16/fp16 may skip before the run stops


@dataclass
class Position:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch: int = 0  # batches of the current epoch already consumed
    tokens: int = 0
    elapsed: float = 0.0  # seconds of training before this process
    window_loss: float = 0.0  # the losses summed since the last log line (a resumed run's next line averages them too)
    window_steps: int = 0


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
    inputs: dict[str, dict] = field(default_factory=dict)  # written beside it as inputs.json (bertcli/inputs.py)


def example_seed(seed: int, epoch: int, index: int) -> int:
    """A seed per (run seed, epoch, example): masks are drawn anew each epoch, identically
    however many processes share the batch, and again identically after a resume."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (2**63 - 1)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=True)  # one kernel: 3-5x faster than foreach here


def compile_layers(model: nn.Module) -> None:
    """torch.compile each encoder layer in place (its parameter names, and so the checkpoint, stay the
    same), with dynamic shapes: a batch's row count and width change from batch to batch, and a compile
    per shape would soon pass torch's recompile limit and fall back to eager. The trunk around the
    layers (the host-side packing, the tied MLM decoder) stays eager."""
    from bertcli.model import BertLayer

    for layer in model.modules():
        if isinstance(layer, BertLayer):
            layer.compile(dynamic=True)


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


def epoch_batches(examples: int, global_batch: int, world: int) -> int:
    """Batches in an epoch: the last, smaller one too, as one process has it, unless it is too
    small to give every process at least one example (then it is left out of the epoch)."""
    return examples // global_batch + (1 if examples % global_batch >= world else 0)


def save_resume_state(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler, pos: Position) -> None:
    """One file holding weights, optimizer and position, written atomically, so the weights and
    the optimizer always belong to the same step. Loaded with weights_only=True. (No RNG state
    is needed: the loop reseeds from the step number.)"""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "position": [pos.step, pos.epoch, pos.batch, pos.tokens, pos.elapsed],
             "window": [pos.window_loss, pos.window_steps]}
    def write(tmp: str) -> None:
        try:
            torch.save(state, tmp)
        except RuntimeError as err:  # torch's own writer reports a full disk (or a size limit) so, not as OSError
            if not any(sign in str(err) for sign in ("unexpected pos", "failed writing", "write failed")):
                raise
            raise OSError(errno.EIO, f"writing {RESUME_FILE} failed ({first_line(err)[:200]}); the disk may be full, "
                          "or a file size limit (ulimit -f) reached") from None

    atomic_write(out / RESUME_FILE, write)


def read_resume_state(out: Path) -> dict:
    path = out / RESUME_FILE
    if not path.is_file():
        raise BertcliError(f"{out}: nothing to resume (no {RESUME_FILE}); start afresh with --overwrite")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a resume file from elsewhere, or damaged
        raise BertcliError(f"{path}: cannot resume from it ({str(err).splitlines()[0][:200]})") from None


def apply_resume_state(state: dict, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler) -> Position:
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, batch, tokens, elapsed = state["position"]
        counts = [step, epoch, batch, tokens]
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise ValueError(f"the position {counts} is not four counts of 0 or more")
        if not finite_number(elapsed) or elapsed < 0:
            raise ValueError(f"the elapsed time {elapsed!r} is not a number of seconds")
        window_loss, window_steps = state.get("window", (0.0, 0))  # (a run saved before it was kept)
        if not (finite_number(window_loss) and isinstance(window_steps, int) and window_steps >= 0):
            raise ValueError(f"the log window {[window_loss, window_steps]!r} is not a loss and a count")
        broken = _not_finite(state)
        if broken:
            raise ValueError(f"{broken} holds NaN or infinite values")
    except Exception as err:  # a resume file from a different recipe
        raise BertcliError(f"{path}: cannot resume from it ({str(err).splitlines()[0][:200]})") from None
    return Position(step, epoch, batch, tokens, float(elapsed), float(window_loss), window_steps)


def _not_finite(state: dict) -> str | None:
    """The first weight, optimizer statistic or setting of a resume state that is NaN or infinite: training
    from it would fail steps later, blaming the learning rate."""
    values = [(f"weight {k}", v) for k, v in state["model"].items()]
    values += [(f"optimizer state {k} of parameter {p}", v) for p, kv in state["optimizer"]["state"].items()
               for k, v in kv.items()]
    values += [(f"optimizer setting {k}", v) for group in state["optimizer"]["param_groups"] for k, v in group.items()
               if k != "params"]
    values += [(f"scaler {k}", v) for k, v in state["scaler"].items()]
    for name, value in values:
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if isinstance(item, torch.Tensor) and item.is_floating_point() and not bool(torch.isfinite(item).all()):
                return name
            if isinstance(item, float) and not math.isfinite(item):
                return name
    return None


def load_resume_state(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler, rank: int = 0,
                      world: int = 1, device: torch.device | None = None) -> Position:
    """The run's resume state, loaded into the model, the optimizer and the scaler. In a distributed run
    rank 0 alone reads it and sends it to the others, so machines that do not share the output directory
    resume too (rank 0 must be on the machine that has it)."""
    if world == 1:
        return apply_resume_state(read_resume_state(out), out / RESUME_FILE, model, optimizer, scaler)
    box: list = [None]
    if rank == 0:
        try:
            box[0] = read_resume_state(out)
        except BertcliError as err:
            box[0] = str(err)  # every process stops with it
    dist.broadcast_object_list(box, src=0, device=device if device is not None and device.type == "cuda" else None)
    if isinstance(box[0], str):
        raise BertcliError(box[0])
    return apply_resume_state(box[0], out / RESUME_FILE, model, optimizer, scaler)


class Log:
    """log.jsonl: one JSON object per logged step and per evaluation. On resume, lines past the
    resumed step are dropped, so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        self.last = ""
        self.evaluated: set[int] = set()  # the steps whose evaluation the kept lines hold
        if resume_step is None:
            atomic_write(path, lambda tmp: Path(tmp).write_text("", encoding="utf-8"))
        elif path.exists():
            lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
            kept = [line for line in lines if line and _record_step(line) <= resume_step]
            atomic_write(path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in kept), encoding="utf-8"))
            self.last = kept[-1] if kept else ""
            self.evaluated = {int(_record_step(line)) for line in kept if '"eval_' in line}

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

    # the user's text as it is (no markup, no emoji codes), and each log line whole (a file or a pipe: not wrapped)
    console = Console(stderr=True, quiet=not enabled, markup=False, emoji=False, soft_wrap=True)
    return Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                    disable=not (enabled and console.is_terminal)), console


class Abandoned(BaseException):
    """A third signal: training stops at once, and nothing is saved (the run's last checkpoint is kept)."""


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (how schedulers such as SLURM, Kubernetes and systemd stop a job)
    during training sets a flag that the loop reads after each step (a KeyboardInterrupt raised at a
    random point can be swallowed, e.g. inside a finalizer). A second signal interrupts at once (an
    evaluation), but not a step (`held`: the loop stops after it, as for the first), nor anything in a
    distributed run (not `alone`: its processes stop together), nor the resumable checkpoint being written
    (`saving`); where a second was held, a third stops at once without saving (Abandoned). Once the final
    checkpoint is written (`urgent`), the first signal interrupts the final evaluation at once. A request
    made inside another (a suite's, around its runs) starts with the signal that one already caught: a
    Ctrl-C while a run was being prepared stops it after its first step."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, alone: bool = True):
        self.signum: int | None = None
        self.count = 0  # signals caught
        self.alone = alone  # one process: a second signal may interrupt it (not with others in step with it)
        self.saving = False
        self.urgent = False
        self.holding = False
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
            outer = getattr(self._previous.get(signal.SIGINT), "__self__", None)
            if isinstance(outer, StopRequest):
                self.signum = outer.signum
                self.count = outer.count

    def _handle(self, signum, frame) -> None:
        self.count += 1
        self.signum = self.signum or signum
        if self.saving:
            return  # the checkpoint that the first signal asked for is being written: let it finish
        if self.urgent:
            raise KeyboardInterrupt
        if self.holding or not self.alone:
            if self.count >= 3:
                raise Abandoned  # a step that will not end (a first compile, a stuck collective): stop unsaved
            return  # the loop stops at the step's end, where every process agrees (the first signal's flag)
        if self.count > 1:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self):
        """A second signal does not interrupt the block (a training step: its update and its count, which a
        checkpoint must find agreeing); the loop stops after it, as for the first."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = False

    def is_set(self) -> bool:
        return self.signum is not None

    def release(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


LOST_PEER_EXIT = 75  # EX_TEMPFAIL: the run could not go on, and may be continued


def _lost_peer(err: BaseException) -> bool:
    """Whether a collective failed because another process of the run went away: gloo reports a closed
    connection as a plain RuntimeError from its transport, NCCL and the store as torch's DistError."""
    text = str(err)
    return isinstance(err, dist.DistError) or "gloo/transport" in text or "Connection closed by peer" in text


def _global_sum(values: list[float], world: int, device: torch.device) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@dataclass
class _Window:
    """What the next log line reports: the steps since the last one."""

    start: float
    loss: float = 0.0
    steps: int = 0  # steps whose update was applied (a skipped step has no loss to average)
    tokens: int = 0
    paused: float = 0.0  # seconds spent evaluating and saving: tokens/s counts training time only


@dataclass
class _Run:
    """One training run's state, set up once by `_start`; the parts of the loop below read and update it."""

    job: Job
    cfg: TrainConfig
    out: Path
    rank: int
    world: int
    device: torch.device
    precision: str
    model: nn.Module  # the model itself, which is saved and evaluated
    wrapped: nn.Module  # what the loss runs (DistributedDataParallel across processes)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    pos: Position
    log: Log | None  # rank 0 alone writes
    total: int | None  # planned steps (None: a time budget alone bounds the run)
    budget: float | None
    start: float
    batches_per_epoch: int
    progress: Any
    console: Any
    window: _Window
    metrics: dict[str, float] = field(default_factory=dict)
    skipped: int = 0  # non-finite steps in a row (bf16/fp16)

    @property
    def writer(self) -> bool:
        return self.rank == 0

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.world


def _start(job: Job, cfg: TrainConfig, out: Path, resume: bool) -> _Run:
    """Device, precision, optimizer, the resume state, then the run's files (only once nothing can fail)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = device_for(cfg.precision, int(os.environ.get("LOCAL_RANK", 0)))
    precision = resolve_precision(cfg.precision, device)
    model = job.model.to(device)
    if cfg.compile:
        compile_layers(model)
    optimizer = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    pos = load_resume_state(out, model, optimizer, scaler, rank, world, device) if resume else Position()
    wrapped = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=True)
    global_batch = cfg.batch_size * world
    batches_per_epoch = epoch_batches(len(job.features), global_batch, world)
    if batches_per_epoch == 0:
        raise BertcliError(f"data.train: {len(job.features)} training sequences, fewer than one batch of {global_batch}")
    if cfg.grad_accum > batches_per_epoch:  # a step ends with its epoch: it would be smaller than asked, unsaid
        raise BertcliError(f"train.grad_accum: {cfg.grad_accum}, but an epoch has {batches_per_epoch} batch(es) of "
                           f"{global_batch} ({len(job.features)} training sequences), and a step ends with its "
                           f"epoch: at most {batches_per_epoch}, or a smaller train.batch_size")
    total = plan_steps(cfg, batches_per_epoch)
    if total is not None and pos.step > total:  # its recipe.yaml would say fewer steps than its weights took
        raise BertcliError(f"{out}: the run is at step {pos.step}, past the {total} steps the recipe now plans "
                           "(train.max_steps, train.epochs): --resume trains a run further, not back; give it more "
                           "steps, or start afresh with --overwrite")
    if rank == 0 and job.recipe:  # the run's files change only now, when nothing it reads can fail any more
        atomic_write_text(out / "recipe.yaml", job.recipe)
        atomic_write_text(out / INPUTS, inputs_file(job.inputs))
    log = Log(out / "log.jsonl", pos.step if resume else None) if rank == 0 else None
    progress, console = _progress(total, rank == 0)
    return _Run(job=job, cfg=cfg, out=out, rank=rank, world=world, device=device, precision=precision, model=model,
                wrapped=wrapped, optimizer=optimizer, scaler=scaler, pos=pos, log=log, total=total,
                budget=parse_duration(cfg.time_budget) if cfg.time_budget else None,
                start=time.perf_counter() - pos.elapsed, batches_per_epoch=batches_per_epoch, progress=progress,
                console=console, window=_Window(time.perf_counter(), loss=pos.window_loss, steps=pos.window_steps))


def _micro_batches(run: _Run, group: Sequence[Sequence[int]]) -> tuple[list[dict[str, Tensor]], dict[str, int]]:
    """This process's share of each batch of one step, on the device, and the loss terms' counts over the
    whole step (every micro-batch, every process), with the step's real tokens as "tokens" (what a
    per-token term divides by, bertcli/distill.py, and what throughput counts). Counts are taken from the
    batches before they move to the device, so they cost the accelerator no synchronisation."""
    micro, per_batch, tokens = [], [], 0
    for global_indices in group:
        mine = [int(i) for i in global_indices[run.rank::run.world]]
        seeds = [example_seed(run.cfg.seed, run.pos.epoch, i) for i in mine]
        batch = run.job.collate([run.job.features[i] for i in mine], seeds)
        per_batch.append(run.job.counts(batch))
        tokens += int(batch["attention_mask"].sum())
        micro.append({k: v.to(run.device, non_blocking=True) for k, v in batch.items()})
    names = sorted(per_batch[0])
    *totals, tokens = _global_sum([*[sum(c[n] for c in per_batch) for n in names], tokens], run.world, run.device)
    return micro, {**{n: max(int(c), 1) for n, c in zip(names, totals)}, "tokens": int(tokens)}


def _step(run: _Run, group: Sequence[Sequence[int]]) -> tuple[float, int, bool]:
    """One optimizer step over the batches in `group` (gradient accumulation): returns the step's loss,
    its tokens, and whether its update was skipped (bf16/fp16 overflow). The loss and the gradient norm
    are read from the accelerator once, together, for the check that no update is made of NaN."""
    cfg, pos = run.cfg, run.pos
    torch.manual_seed(example_seed(cfg.seed, pos.step, run.rank))  # dropout: reproducible on resume
    micro, counts = _micro_batches(run, group)
    step_loss = torch.zeros((), device=run.device)
    for i, batch in enumerate(micro):
        sync = run.world == 1 or i == len(micro) - 1
        with (contextlib.nullcontext() if sync else run.wrapped.no_sync()), autocast(run.device, run.precision):
            loss = run.job.loss(run.wrapped, batch, counts)
        run.scaler.scale(loss * run.world).backward()
        step_loss += loss.detach().float()
    if run.world > 1:
        dist.all_reduce(step_loss)  # the step's loss over every process, still on the device
    lr = lr_at(pos.step, cfg, run.total)
    for param_group in run.optimizer.param_groups:
        param_group["lr"] = lr
    run.scaler.unscale_(run.optimizer)
    norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.max_grad_norm)
    step_loss, norm = torch.stack([step_loss, norm.to(step_loss)]).tolist()  # the one read of this step's numbers
    bad = not math.isfinite(step_loss) or (run.precision != "fp16" and not math.isfinite(norm))
    if bad and (run.precision == "fp32" or run.skipped >= MAX_SKIPPED_STEPS):
        what = f"the loss became {step_loss}" if not math.isfinite(step_loss) else f"the gradient norm became {norm}"
        again = f" after {run.skipped} skipped steps in a row" if run.skipped else ""
        raise BertcliError(f"{what} at step {pos.step + 1}{again}; lower train.lr (or train.weight_decay, if raised) "
                           f"or check the data. The last good checkpoint in {run.out} (if any) is kept")
    if bad:  # low precision overflowed: drop this step's update, as a loss scaler does
        run.skipped += 1
        message = (f"step {pos.step + 1}: loss {step_loss}, gradient norm {norm} in {run.precision}: "
                   f"update skipped ({run.skipped} in a row; the run stops after {MAX_SKIPPED_STEPS})")
        run.console.print(message)
        if run.writer:
            run.log.write({"step": pos.step + 1, "skipped": message})
    else:
        run.skipped = 0
        run.scaler.step(run.optimizer)
    run.scaler.update()  # fp16: lowers the scale after an overflow
    run.optimizer.zero_grad(set_to_none=True)
    return step_loss, counts["tokens"], bad


def _log(run: _Run, bar, batches: int) -> None:
    """A log.jsonl line and the progress line, for the steps since the last one."""
    now, w, pos = time.perf_counter(), run.window, run.pos
    record = {"step": pos.step, "epoch": pos.epoch + pos.batch / batches,
              "loss": w.loss / w.steps if w.steps else None, "lr": lr_at(pos.step - 1, run.cfg, run.total),
              "tokens_per_s": w.tokens / max(now - w.start - w.paused, 1e-9)}
    if run.writer:
        run.log.write(record)
        shown = "skipped" if record["loss"] is None else f"{record['loss']:.4f}"
        run.progress.update(bar, info=f"loss {shown}  {record['tokens_per_s']:.0f} tok/s")
        if not run.console.is_terminal:
            run.console.print(f"step {pos.step}" + (f"/{run.total}" if run.total else "") +
                              f"  loss {shown}  lr {record['lr']:.2e}  {record['tokens_per_s']:.0f} tok/s")
    run.window = _Window(now)


def _evaluate(run: _Run) -> None:
    """Rank 0 evaluates (eval_-prefixed metrics into log.jsonl); the others wait for it."""
    began = time.perf_counter()
    if run.job.evaluate is not None and run.writer:
        run.model.eval()
        try:
            with torch.inference_mode(), autocast(run.device, run.precision):
                run.metrics = {f"eval_{k}": v for k, v in run.job.evaluate(run.model).items()}
        except NonFinite as err:  # an overflow at this precision: the run goes on (and its weights are checked)
            run.metrics = {}
            run.console.print(f"step {run.pos.step}: evaluation skipped: {err}")
        run.model.train()
        if run.metrics:
            run.log.write({"step": run.pos.step, **run.metrics})
            run.console.print(f"step {run.pos.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in run.metrics.items()))
    if run.world > 1:
        dist.barrier()
    run.window.paused += time.perf_counter() - began


def _checkpoint(run: _Run, alone: bool = False) -> None:
    """The model, its config and tokenizer, and the resume state, written whole into a side directory
    and moved in by renames, so a checkpoint is never half replaced. Weights that are not finite are
    never saved: a checkpoint of NaN would only spread the damage. `alone`: the other processes of a
    distributed run are gone, so none is waited for."""
    began = time.perf_counter()
    pos, out = run.pos, run.out
    pos.elapsed = began - run.start
    pos.window_loss, pos.window_steps = run.window.loss, run.window.steps
    broken = next((name for name, p in run.model.named_parameters() if not bool(torch.isfinite(p).all())), None)
    if broken is not None:
        raise BertcliError(f"{broken} holds NaN or infinite values at step {pos.step}: the training diverged; "
                           "lower train.lr (or train.weight_decay, if raised) or check the data. Nothing was saved for "
                           f"this step; the last good checkpoint in {out} (if any) is kept")
    if run.writer:
        stage = out / STAGE_DIR
        discard(stage)  # (one of this process's, from a save a signal stopped)
        note(stage)  # before it exists: a killed writer's is the next one's to remove
        try:
            stage.mkdir()
            run.job.save(run.model, stage)
            save_resume_state(stage, run.model, run.optimizer, run.scaler, pos)
        except (OSError, OutputError) as err:
            discard(stage)
            unnote(stage)
            reason = err.reason if isinstance(err, OutputError) else err.strerror
            raise BertcliError(f"{out}: cannot save the checkpoint of step {pos.step}: {reason}. The previous "
                               f"checkpoint in {out} is intact") from None
        publish(stage, out, last=RESUME_FILE)
        unnote(stage)
    if run.world > 1 and not alone:
        dist.barrier()
    run.window.paused += time.perf_counter() - began


def _train(run: _Run, ctrl_c: StopRequest) -> None:
    """Steps until max_steps, epochs or the time budget ends the run, with the evaluations and
    checkpoints that eval_every and save_every ask for. A signal ends it after the current step."""
    cfg, pos = run.cfg, run.pos
    done = (run.total is not None and pos.step >= run.total) or (  # (resumed: its time may have run out already;
        run.budget is not None and pos.elapsed >= run.budget)  # every process has the same elapsed)
    bar = run.progress.add_task("train", total=run.total, completed=pos.step, info="")
    if not done and _evaluation_missing(run):
        _evaluate(run)
    while not done:
        order = [b for b in batch_order(run.job.lengths, run.global_batch, seed=cfg.seed + pos.epoch,
                                        group=50 if cfg.group_by_length else 0) if len(b) >= run.world]
        while pos.batch < len(order) and not done:
            group = order[pos.batch:pos.batch + cfg.grad_accum]
            with ctrl_c.held():  # the weights, the optimizer, the position and the log agree at every step's end
                loss, tokens, skipped = _step(run, group)
                pos.step += 1
                pos.batch += len(group)
                pos.tokens += tokens
                run.window.loss += 0.0 if skipped else loss
                run.window.steps += 0 if skipped else 1
                run.window.tokens += tokens
                if pos.step % cfg.log_every == 0 or pos.step == 1:
                    _log(run, bar, len(order))
                run.progress.update(bar, completed=pos.step)
            out_of_time = run.budget is not None and time.perf_counter() - run.start >= run.budget
            out_of_time, stop = (bool(v) for v in _global_sum([float(out_of_time), float(ctrl_c.is_set())],
                                                              run.world, run.device))  # all ranks agree
            if stop:
                raise KeyboardInterrupt
            done = (run.total is not None and pos.step >= run.total) or out_of_time
            if cfg.eval_every and pos.step % cfg.eval_every == 0 and not done:
                _evaluate(run)
            if cfg.save_every and pos.step % cfg.save_every == 0 and not done:
                _checkpoint(run)
        with ctrl_c.held():  # (a checkpoint between the two would skip an epoch)
            if pos.batch >= len(order):
                pos.epoch += 1
                pos.batch = 0


def _evaluation_missing(run: _Run) -> bool:
    """On resume at a step that evaluates, whether its evaluation is missing from the log: a second signal
    stopped it, and the checkpoint was saved after the step."""
    cfg, step = run.cfg, run.pos.step
    if not (cfg.eval_every and step and step % cfg.eval_every == 0 and run.job.evaluate is not None):
        return False
    missing = run.writer and step not in run.log.evaluated
    return bool(_global_sum([float(missing)], run.world, run.device)[0])


def fit(job: Job, cfg: TrainConfig, out: Path, resume: bool) -> dict[str, float]:
    """Train `job.model` in place; write log.jsonl and checkpoints into `out` (rank 0 alone
    writes). Returns the last evaluation's metrics (eval_-prefixed), or {} without eval data.
    The final checkpoint is written before the final evaluation; Ctrl-C or SIGTERM before it
    saves a resumable checkpoint, and during that evaluation stops it (--resume evaluates)."""
    run = _start(job, cfg, out, resume)
    run.model.train()
    saved = False
    ctrl_c = StopRequest(alone=run.world == 1)
    try:
        with run.progress:
            _train(run, ctrl_c)
        _checkpoint(run)  # the trained weights are safe before the last evaluation starts
        saved = True
        ctrl_c.urgent = True  # from here a signal stops the evaluation at once: --resume redoes it
        if ctrl_c.is_set():
            raise KeyboardInterrupt
        _evaluate(run)
    except KeyboardInterrupt:
        if not saved:
            ctrl_c.saving = True  # further signals wait for this checkpoint
            _checkpoint(run)
        ctrl_c.release()
        signum = ctrl_c.signum or signal.SIGINT
        again = "evaluate it" if saved else "continue"
        raise Interrupted(f"{signal.Signals(signum).name} at step {run.pos.step}: saved to {out}; {again} with --resume",
                          128 + signum) from None
    except Abandoned:
        ctrl_c.release()
        signum = ctrl_c.signum or signal.SIGINT
        raise Interrupted(f"{signal.Signals(signum).name}: a third signal, so stopped at once in step {run.pos.step + 1}, "
                          f"with nothing saved; {out} keeps the last checkpoint it saved (if any), which --resume "
                          "continues", 128 + signum) from None
    except RuntimeError as err:
        if cfg.compile and isinstance(err, torch._dynamo.exc.BackendCompilerFailed):
            raise BertcliError(f"train.compile: torch.compile failed on this machine ({first_line(err)}); "
                               f"set train.compile: false to train without it") from None
        if run.world == 1 or not _lost_peer(err):
            raise
        # Each step's collectives come before its update, and the others after the step is counted, so the
        # weights, the optimizer and the position agree: those of the last step that every process finished.
        ctrl_c.saving = True
        if run.writer and not saved:
            _checkpoint(run, alone=True)
        what = f"saved to {out}" if run.writer else f"rank 0 writes the checkpoint; the last one it saved is in {out} there"
        again = "evaluate it" if saved else "continue"
        raise Interrupted(f"another process of this distributed run went away after step {run.pos.step} "
                          f"({str(err).strip().splitlines()[0][:200]}); {what}; {again} with --resume, the same "
                          f"processes", LOST_PEER_EXIT) from None
    finally:
        ctrl_c.release()
    return run.metrics


def write_metrics(out: Path, metrics: dict) -> None:
    atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(finite_json(metrics, indent=2) + "\n"))

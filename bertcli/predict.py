"""Streaming, batched inference: lines in, one JSON line out per input line, in order.

A reader thread feeds a bounded queue, so memory stays flat however long the input, and
each batch is answered (and flushed) as soon as it is formed: predict never waits for the end
of its input before the first answers go out. A line that cannot be read gets an
{"error": ...} answer in its place; predict then ends with exit code 2 and says how many.
"""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, ContextManager, TextIO

from bertcli import onnx_engine
from bertcli.errors import BertcliError, CheckpointError, DataError, NonFinite
from bertcli.fileio import all_finite, finite_json
from bertcli.tasks import load_task
from bertcli.tasks.base import Task
from bertcli.textio import TooLong, decoded_line, raw_lines

if TYPE_CHECKING:
    import torch

_END = object()
# Lines already waiting are taken up to this many batches at a time: the task sorts them by
# length into batches, so a fast pipe gets batches of like lengths (little padding), while a
# slow one is still answered line by line as it arrives. On SST-2 dev sentences (x12) in batches
# of 32, padding is 11.4% of the tokens with chunks of 8 batches, 3.3% with 32, 0.2% for the whole
# input sorted at once; predict --int8 with the ONNX engine took 16.7 s with 8, 15.5 s with 32.
CHUNK_BATCHES = 32
# ...and up to this many bytes of them: lines of a megabyte each (the longest taken) are answered a few at a
# time, and the reader holds at most twice this much waiting, so memory stays flat however long the lines.
CHUNK_BYTES = 4 << 20


class _Budget:
    """The bytes of input lines read but not yet answered: the reader waits while they are over the limit (a
    single line over it passes alone)."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0
        self.changed = threading.Condition()

    def take(self, size: int) -> None:
        with self.changed:
            self.changed.wait_for(lambda: self.held == 0 or self.held + size <= self.limit)
            self.held += size

    def give(self, size: int) -> None:
        with self.changed:
            self.held -= size
            self.changed.notify_all()


def _size(raw) -> int:
    return 0 if not isinstance(raw, (bytes, bytearray)) else len(raw)  # (a TooLong line is held as its length)


def _reader(stream: BinaryIO, source: str, lines: queue.Queue, budget: _Budget) -> None:
    try:
        for raw in raw_lines(stream, source):
            budget.take(_size(raw))
            lines.put(raw)
    except BaseException as err:  # surfaced by the main thread
        lines.put(err)
    lines.put(_END)


ENGINES = ("auto", "torch", "onnx")


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """The linear layers with int8 weights, their inputs quantized per batch as they arrive
    (PyTorch's dynamic quantization, CPU only). On SST-2 dev: 1.47x faster than bf16 here, and
    0.5 points lower accuracy."""
    import warnings

    import torch
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao, and says so per layer
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


def open_model(model_dir: Path, precision: str = "auto", int8: bool = False, engine: str = "auto"
               ) -> tuple[Task, Any, Callable[[], ContextManager], str]:
    """The task, the model that answers it, the context to run it in, and a line naming what runs.

    `engine` auto runs the exported graph (bertcli export) when there is one for these settings, ONNX
    Runtime is installed and the graph is current; else torch. onnx insists, and says why it cannot."""
    if engine not in ENGINES:
        raise BertcliError(f"--engine: {engine!r} is not one of {', '.join(ENGINES)}")
    _, task = load_task(model_dir)  # torch-free: what is wrong with the checkpoint is said first
    graph = model_dir / onnx_engine.graph_name(int8)
    refusal = _onnx_refusal(task, graph, precision, int8)
    note = ""
    if engine == "onnx" and refusal:
        raise BertcliError(f"--engine onnx: {refusal}")
    if engine == "auto" and refusal and any((model_dir / name).exists() for name in onnx_engine.GRAPHS):
        note = f"; the exported graph not run: {refusal}"  # there is one, but not for these settings
    if engine != "torch" and refusal is None:
        again = f"bertcli export {model_dir}" + (" --int8" if int8 else "")
        if not onnx_engine.bertcli_graph(graph):  # another tool's file: export will not replace it
            again = f"move {graph.name} away, then {again}"
        model, why = None, onnx_engine.not_vouched(graph)  # (a graph from elsewhere is not even loaded)
        if why is None:
            try:
                model = onnx_engine.OnnxModel(graph, task)
                why = model.stale(model_dir)
            except CheckpointError as err:
                if engine == "onnx":
                    raise
                why = str(err).removeprefix(f"{graph}: ")
        if why is None:
            return task, model, contextlib.nullcontext, f"predict: engine onnx ({graph.name}, ONNX Runtime {model.version})"
        if engine == "onnx":
            raise CheckpointError(f"{graph}: not run: {why}; {again}")
        note = f"; {graph.name} not run: {why} ({again})"
    return _torch_model(model_dir, task, precision, int8, note)


def _onnx_refusal(task: Task, graph: Path, precision: str, int8: bool) -> str | None:
    """Why the ONNX engine cannot answer here (None: it can)."""
    if task.name == "pretrain":
        return "a pretrained model fills in [MASK] with the torch engine only (export serves task heads)"
    if precision not in ("auto", "fp32"):
        return f"the exported graphs run in fp32 ({onnx_engine.GRAPH}) or int8 ({onnx_engine.GRAPH_INT8}), not {precision}"
    if graph.exists() and not graph.is_file():
        return f"{graph} is not a file"
    if not graph.is_file():
        return f"{graph} not found: make it with `bertcli export {graph.parent}{' --int8' if int8 else ''}`"
    if not onnx_engine.available():
        return f"onnxruntime is not installed: {onnx_engine.EXTRA}"
    return None


def _torch_model(model_dir: Path, task: Task, precision: str, int8: bool, note: str):
    import torch

    from bertcli.checkpoint import NOT_READ_TO_FILL_MASKS, load_checkpoint
    from bertcli.runtime import autocast, inference

    ck = load_checkpoint(model_dir, unread=NOT_READ_TO_FILL_MASKS if task.name == "pretrain" else ())
    device, precision = inference("fp32" if int8 else precision)  # int8 layers run outside autocast
    model = ck.model.to(device).eval()
    if int8:
        if device.type != "cpu":
            raise BertcliError("--int8 is for CPUs; on a GPU, use --precision bf16")
        model = quantize_int8(model)

    @contextlib.contextmanager
    def scope():
        with torch.inference_mode(), autocast(device, precision):
            yield

    what = "int8 (dynamic quantization)" if int8 else precision
    return task, model, scope, f"predict: engine torch ({what} on {device.type}, PyTorch {torch.__version__}){note}"


def run(model_dir: Path, stream: BinaryIO, source: str, out: TextIO, batch_size: int = 32,
        precision: str = "auto", int8: bool = False, engine: str = "auto") -> int:
    """Answer every line of `stream` on `out`; returns the number of lines answered."""
    task, model, scope, said = open_model(model_dir, precision, int8, engine)
    sys.stderr.write(said + "\n")
    chunk = batch_size * CHUNK_BATCHES
    lines: queue.Queue = queue.Queue(maxsize=chunk * 2)
    budget = _Budget(2 * CHUNK_BYTES)
    threading.Thread(target=_reader, args=(stream, source, lines, budget), daemon=True).start()
    answered, failures, ended = 0, [], False
    offset = 0  # where the next line starts in the stream, in bytes
    while not ended:
        batch = [lines.get()]  # wait for the first line of a chunk...
        size = _size(batch[0])
        while len(batch) < chunk and size < CHUNK_BYTES and batch[-1] is not _END:
            try:
                batch.append(lines.get_nowait())  # ...then take only what has already arrived
            except queue.Empty:
                break
            size += _size(batch[-1])
        if batch[-1] is _END:
            ended = True
            batch.pop()
        if batch and isinstance(batch[-1], BaseException):
            raise batch[-1]
        examples, answers = [], []
        for raw in batch:
            answered += 1
            where = f"{source}: line {answered}"
            start, offset = offset, offset + (raw if isinstance(raw, TooLong) else len(raw)) + 1  # +1: its \n
            try:
                examples.append(task.parse_input(decoded_line(raw, source, start, answered), where))
                answers.append(None)
            except DataError as err:
                answers.append({"error": str(err)})
        with scope():
            predictions = iter(_predict(task, model, examples, batch_size))
        for number, answer in enumerate(answers, start=answered - len(answers) + 1):
            if answer is None:
                answer = next(predictions)
                if answer is None or not all_finite(answer):  # bf16 overflow in a model from elsewhere: never `NaN`
                    answer = {"error": f"{source}: line {number}: the model gave a score that is not a finite number"}
            if "error" in answer:
                failures.append(answer["error"])
            out.write(finite_json(answer, ensure_ascii=False) + "\n")
        out.flush()
        del batch, examples
        budget.give(size)
    if answered == 0:
        raise DataError(f"{source}: no input lines (predict reads one input per line)")
    if failures:
        raise DataError(f"{len(failures)} of {answered} input line(s) could not be read and were answered with "
                        f"an error object; the first: {failures[0]}")
    return answered


def _predict(task: Task, model, examples: list, batch_size: int) -> list[dict | None]:
    """The task's answer to each example; where the model's outputs are not finite, each example of the
    batch alone, and None for one whose own outputs are not."""
    if not examples:
        return []
    try:
        return task.predict(model, examples, batch_size)
    except NonFinite:
        pass
    answers: list[dict | None] = []
    for example in examples:
        try:
            answers.append(task.predict(model, [example], 1)[0])
        except NonFinite:
            answers.append(None)
    return answers


def open_input(path: Path | None) -> tuple[BinaryIO, str]:
    """stdin, or the file at `path` (a pipe or `<(...)` too: it is read once, as a stream)."""
    import sys

    if path is None:
        if sys.stdin is None:
            raise BertcliError("stdin is closed: pipe the input in, or pass --input FILE")
        return sys.stdin.buffer, "stdin"
    if path.is_dir() or not path.exists():
        raise BertcliError(f"{path}: {'is a directory' if path.is_dir() else 'file not found'}")
    try:
        return open(path, "rb"), str(path)
    except OSError as err:
        raise BertcliError(f"{path}: cannot read: {err.strerror}") from None

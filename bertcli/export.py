"""bertcli export: a fine-tuned checkpoint as an ONNX graph for ONNX Runtime (predict --engine onnx).

The graph is traced by torch's exporter (torch.export, written by onnxscript) from the model with its
padding kept (model.BertModel.packed = False): its batch and sequence axes are dynamic, and it reads
input_ids, attention_mask and token_type_ids as transformers' exports do. Each layer's attention is
then rewritten as one ONNX Runtime Attention node (onnx_graph.py), and the graph's outputs are
checked against the model's on a batch of rows of different lengths before anything is written.

`--int8` adds a copy with int8 weights by ONNX Runtime's dynamic quantization (`quantize_dynamic`:
activations quantized per batch as they arrive), with a scale per output column of each weight
(`per_channel`): on MiniLM fine-tuned on SST-2, dev accuracy 0.9060 against 0.9002 in fp32, where one
scale per matrix, the default, gave 0.8888 (-1.1 points) at about the same speed. The weights use 7 bits
(`reduce_range`): on a CPU without VNNI, 8 bits saturate the int16 pair sums (vpmaddubsw) and a tiny model's outputs were up to
0.25 off, 0.002 with 7.

Both graphs are written into the checkpoint directory, each atomically, and each records in its
metadata the config.json and weights it was made from (onnx_engine.fingerprint). A file already there
under either name is replaced only when it is a graph that bertcli wrote; anything else is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from bertcli import __version__
from bertcli.errors import BertcliError, CheckpointError
from bertcli.fileio import atomic_write
from bertcli.onnx_engine import (EXTRA, GRAPH, GRAPH_INT8, INPUTS, INT8_KEY, INT8_WEIGHTS, PRODUCER, SOURCES_KEY,
                                 bertcli_graph, fingerprint, seal)
from bertcli.scratch import locked_temp_dir, swept_dirs
from bertcli.tasks.base import Task

OPSET = 20  # the first with a Gelu node: the exporter writes GELU as one node instead of five


def check_extra() -> None:
    import importlib.util

    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise BertcliError(f"bertcli export needs {', '.join(missing)}: {EXTRA}")


def _stamp(model, record: dict, task: str, kind: str) -> None:
    """Write the graph's provenance into an onnx ModelProto."""
    model.producer_name, model.producer_version = PRODUCER, __version__
    del model.metadata_props[:]
    for key, value in ((SOURCES_KEY, json.dumps(record, sort_keys=True)), ("bertcli_task", task),
                       ("bertcli_graph", kind), *([(INT8_KEY, INT8_WEIGHTS)] if kind == "int8" else [])):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def export(model_dir: Path, int8: bool = False, say=print) -> list[Path]:
    """Write model.onnx (and model.int8.onnx) into `model_dir`; returns the paths written."""
    check_extra()
    from bertcli.checkpoint import load_checkpoint
    from bertcli.onnx_graph import fuse_attention
    from bertcli.rundir import hold
    from bertcli.tasks import load_task

    _, task = load_task(model_dir)
    if task.name == "pretrain":
        raise CheckpointError(f"{model_dir}: a pretrained model (fill-mask) has no task head to export; fine-tune it "
                              "first, then export the result")
    targets = [model_dir / GRAPH] + ([model_dir / GRAPH_INT8] if int8 else [])
    for path in targets:
        _check_replaceable(path)
    if not os.access(model_dir, os.W_OK):
        raise BertcliError(f"{model_dir}: cannot write into it (permission denied); copy the checkpoint somewhere "
                           "you can write, and export the copy")
    with hold(model_dir):
        record = fingerprint(model_dir)
        start = time.perf_counter()
        ck = load_checkpoint(model_dir)
        graph = _trace(ck.model.eval(), ck.tokenizer.cls_id, task, ck.config)
        fused = fuse_attention(graph, ck.config.num_attention_heads)
        difference = _check(graph, ck.model, task, ck.config)
        if not difference <= 1e-3:  # (NaN fails too)
            raise BertcliError(f"export: the graph's outputs differ from the model's by {difference:.3g}; nothing "
                               "was written (please report it)")
        if fingerprint(model_dir) != record:
            raise BertcliError(f"{model_dir}: the checkpoint changed while it was exported; nothing was written")
        _stamp(graph, record, task.name, "fp32")
        with _writing():  # a signal now ends the export once the graph is written and said
            _save(graph, targets[0])
            say(f"export: {targets[0]} ({targets[0].stat().st_size / 2**20:.1f} MiB; attention fused in {fused} of "
                f"{ck.config.num_hidden_layers} layers; outputs within {difference:.1e} of the model's) in "
                f"{time.perf_counter() - start:.1f}s")
        if int8:
            start = time.perf_counter()
            quantized = _quantize(targets[0])
            difference = _check(quantized, ck.model, task, ck.config)
            if not difference < float("inf"):
                raise BertcliError("export: the int8 graph gives scores that are not finite numbers; "
                                   f"{targets[1].name} was not written")
            _stamp(quantized, record, task.name, "int8")
            with _writing():
                _save(quantized, targets[1])
                say(f"export: {targets[1]} ({targets[1].stat().st_size / 2**20:.1f} MiB, int8 weights; outputs "
                    f"within {difference:.2g} of the model's) in {time.perf_counter() - start:.1f}s")
    return targets


def _check_replaceable(path: Path) -> None:
    """Refuse to replace anything at `path` but a graph bertcli wrote (checked again just before the rename)."""
    if (path.exists() or path.is_symlink()) and not bertcli_graph(path):
        raise BertcliError(f"{path}: exists and is not a graph bertcli wrote; it is kept: move it away to export here")


class _Stop:
    """Ctrl-C (exit 130) and SIGTERM (exit 143) during `bertcli export`: the command installs the handler
    (stops_cleanly), so a program that calls export() keeps its own. The handler raises nothing: an exception
    raised from a signal handler surfaces wherever Python happens to be, and inside torch's exporter or ONNX
    Runtime that is often under native code, which turned it into another error with its own traceback (exit 1),
    and once in CI into a crash (SIGSEGV). It ends the process instead (os._exit), once no write is under way: a
    signal during a write waits for it to end, so a graph is either whole or not there, and the scratch
    directories registered are removed first. The lock on the checkpoint goes with the process (flock)."""

    writing = 0  # writes under way (nested)
    pending: int | None = None
    scratch: list[str] = []

    @classmethod
    def handle(cls, signum, frame) -> None:
        if cls.writing:
            cls.pending = signum
        else:
            cls.end(signum)

    @classmethod
    def end(cls, signum: int) -> None:
        import shutil
        import signal

        for path in cls.scratch:
            shutil.rmtree(path, ignore_errors=True)
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        try:
            os.write(2, f"export: stopped by {name}; nothing more was written\n".encode())
        except OSError:
            pass
        os._exit(128 + signum)


@contextlib.contextmanager
def stops_cleanly():
    """For the length of the block (the export command), Ctrl-C and SIGTERM end the process as _Stop says."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # (signals reach the main thread alone)
        yield
        return
    _Stop.writing, _Stop.pending, _Stop.scratch = 0, None, []
    # (a signal ignored stays ignored: `bertcli export ... &` from a script leaves Ctrl-C to the foreground)
    previous = {signum: signal.signal(signum, _Stop.handle) for signum in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _writing():
    """A stretch that a signal must not cut: it ends the process after the stretch instead."""
    _Stop.writing += 1
    try:
        yield
    finally:
        _Stop.writing -= 1
        if not _Stop.writing and _Stop.pending is not None:
            _Stop.end(_Stop.pending)


def _trace(model, cls_id: int, task: Task, cfg):
    """The model as an onnx ModelProto, batch and sequence axes dynamic, fp32, its padding kept."""
    import logging
    import warnings

    import torch

    trunk = model.bert if hasattr(model, "bert") else model
    trunk.packed = False  # padding kept: no branch on the data, shapes that follow the inputs
    length = min(16, cfg.max_position_embeddings)
    ids = torch.full((2, length), cls_id, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, length // 2 + 1:] = 0
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    exporter = logging.getLogger("torch")
    level = exporter.level
    # torch logs as it traces: that torchvision's operators are not registered, and (as errors, with tracebacks)
    # the exceptions it goes on to raise; what stops an export is said once, by bertcli
    exporter.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False):
            warnings.simplefilter("ignore")  # the exporter's notes on axis names and deprecations, for its developers
            program = torch.onnx.export(model, (ids, mask, torch.zeros_like(ids)), dynamo=True, opset_version=OPSET,
                                        input_names=list(INPUTS), output_names=list(task.output_names),
                                        dynamic_shapes=({0: batch, 1: sequence},) * 3, external_data=False,
                                        optimize=True, verbose=False)
    finally:
        trunk.packed = True
        exporter.setLevel(level)
    return program.model_proto


def _check(graph, model, task: Task, cfg) -> float:
    """The largest difference between the graph's outputs (ONNX Runtime) and the model's (torch, as predict runs
    it) on a batch of random rows of different lengths and token types (NaN or inf where the graph's are not
    finite). Per-token outputs are compared at the real tokens (predict reads no others)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    rng = np.random.default_rng(0)
    lengths = [min(n, cfg.max_position_embeddings) for n in (3, 17, 9, 24)]
    width = max(lengths)
    ids = np.zeros((len(lengths), width), dtype=np.int64)
    mask, types = np.zeros_like(ids), np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(0, cfg.vocab_size, n)
        mask[row, :n] = 1
        types[row, n // 2:n] = 1 if cfg.type_vocab_size > 1 else 0
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    with torch.inference_mode():
        want = task.call(model, {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                                 "token_type_ids": torch.from_numpy(types)})
    want = [t.float().numpy() for t in (want if isinstance(want, tuple) else (want,))]
    if not all(np.isfinite(w).all() for w in want):
        raise BertcliError("export: the model itself gives outputs that are not finite numbers (NaN or infinite) "
                           "on test rows: it is broken; nothing was written")
    if [g.shape for g in got] != [w.shape for w in want]:
        raise BertcliError(f"export: the graph gives outputs of shapes {[g.shape for g in got]}, the model "
                           f"{[w.shape for w in want]}; nothing was written (please report it)")
    gaps = [np.abs(g[row][:n] - w[row][:n]).max() if task.per_token else np.abs(g[row] - w[row]).max()
            for g, w in zip(got, want) for row, n in enumerate(lengths)]
    return float(np.max(gaps))  # (NaN wins, as a graph that gives NaN must be refused)


def _save(model, path: Path) -> None:
    graph = seal(model.SerializeToString())

    def write(tmp: str) -> None:
        _write_graph(Path(tmp), graph)
        _check_replaceable(path)  # again, just before the rename: nothing of the user's arrived meanwhile

    atomic_write(path, write, elsewhere=False)  # (inside export's _writing stretch, with the line that says it)


def _write_graph(path: Path, graph: bytes) -> None:
    path.write_bytes(graph)


def _quantize(graph: Path):
    """The fp32 graph with int8 weights (ONNX Runtime's dynamic quantization, a scale per output column), as an
    onnx ModelProto. ONNX Runtime works on files and writes a side file (model-inferred.onnx) next to its
    input, so it works on a copy in a private temporary directory, never in the checkpoint's."""
    import logging
    import shutil
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from bertcli.fileio import STORAGE_ERRORS

    work = Path(tempfile.gettempdir())
    swept_dirs(work, "export", {GRAPH, GRAPH_INT8, "model-inferred.onnx"}, "exports")  # of exports killed midway
    need, free = 3 * graph.stat().st_size, shutil.disk_usage(work).free  # the copy, its side file, the result
    if free < need:
        raise BertcliError(f"export: the int8 graph needs {need / 2**20:,.0f} MiB of temporary space in {work}, which "
                           f"has {free / 2**20:,.0f} MiB free (set TMPDIR to a larger disk); {GRAPH_INT8} was not written")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process the graph, printed through the root logger
    try:
        with _writing():  # a signal from here on removes the directory (_Stop.end); a kill leaves it unlocked
            lock, private = locked_temp_dir(work, "export")
            _Stop.scratch.append(str(private))
        try:
            shutil.copyfile(graph, Path(private) / GRAPH)
            quantize_dynamic(str(Path(private) / GRAPH), str(Path(private) / GRAPH_INT8), weight_type=QuantType.QInt8,
                             per_channel=True, reduce_range=True)
            return onnx.load(str(Path(private) / GRAPH_INT8))
        finally:
            with _writing():
                shutil.rmtree(private, ignore_errors=True)
                _Stop.scratch.remove(str(private))
                os.close(lock)
    except OSError as err:
        if err.errno not in STORAGE_ERRORS:
            raise
        raise BertcliError(f"export: cannot write the int8 graph's temporary files in {work}: {err.strerror}; "
                           f"{GRAPH_INT8} was not written") from None
    finally:
        root.setLevel(level)

"""predict's ONNX Runtime engine: a checkpoint's exported graph (bertcli export) run without torch.

A graph says where it came from in its own metadata: the bertcli that wrote it, and the size, inode,
times and SHA-256 of the config.json and weights it was exported from. predict runs a
graph only while those files are what they were (the sizes and times are compared first, so a
current graph costs no hashing; a copied checkpoint is hashed once per start), so a model trained
further (`--resume`) after its export is never answered by the old graph.

Only onnxruntime, numpy and the standard library are imported here: a predict that runs a graph
starts without torch (about 2 s less here).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from bertcli.errors import BertcliError, CheckpointError, first_line

if TYPE_CHECKING:
    import numpy as np

    from bertcli.tasks.base import Task

GRAPH, GRAPH_INT8 = "model.onnx", "model.int8.onnx"
GRAPHS = (GRAPH, GRAPH_INT8)
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # as checkpoint.read_weights looks for them
PRODUCER = "bertcli"
SOURCES_KEY = "bertcli_sources"  # metadata: JSON {file name: {bytes, inode, mtime_ns, ctime_ns, sha256}}
INT8_KEY, INT8_WEIGHTS = "bertcli_int8_weights", "7-bit"  # metadata: int8 graphs with 8-bit weights saturate here
EXTRA = "pip install -e '.[onnx]' in bertcli's clone"
# ONNX Runtime fusions that make these graphs slower on CPU, left out (unknown names are ignored). Measured on
# MiniLM (SST-2, 3,488 sentences sorted by length, batches of 32, model time, medians of 3 interleaved runs):
# int8 graph 5.36 s with every fusion, 3.91 s without SkipLayerNormalization's, 3.35 s without BiasGelu's too
# (transformers' exported int8 graph: 4.88 s); fp32 graph 10.24 s, 9.18 s, 8.78 s. The fused SkipLayerNormalization
# kernel took 27 ms per node where LayerNormalization after a plain Add took 4 ms.
SLOWER_FUSIONS = ("SkipLayerNormFusion", "BiasGeluFusion")


def graph_name(int8: bool) -> str:
    return GRAPH_INT8 if int8 else GRAPH


def available() -> bool:
    """Whether onnxruntime can be imported (the optional extra is installed)."""
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def source_files(model_dir: Path) -> list[Path]:
    """What a graph is made from: config.json and the weights file that loading reads."""
    weights = next((model_dir / name for name in WEIGHTS if (model_dir / name).is_file()), None)
    return [model_dir / "config.json"] + ([weights] if weights is not None else [])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read: {err.strerror}") from None
    return digest.hexdigest()


def _stat(path: Path) -> dict:
    """What identifies this version of the file without reading it: its size, inode and times (the change time
    is the kernel's: no tool sets it back, so a file rewritten and given its old mtime still differs)."""
    try:
        info = path.stat()
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read: {err.strerror}") from None
    return {"bytes": info.st_size, "inode": info.st_ino, "mtime_ns": info.st_mtime_ns, "ctime_ns": info.st_ctime_ns}


def fingerprint(model_dir: Path) -> dict[str, dict]:
    """The record of the source files a graph is exported from (SOURCES_KEY in its metadata)."""
    return {path.name: {**_stat(path), "sha256": _sha256(path)} for path in source_files(model_dir)}


def stale(recorded: dict, model_dir: Path) -> str | None:
    """Why the checkpoint's files are no longer those a graph was exported from, or None when they are. Files
    whose size, inode and times are those recorded are not read; others (a copied checkpoint) are hashed."""
    now = source_files(model_dir)
    if sorted(p.name for p in now) != sorted(recorded):
        return f"it was exported from {', '.join(sorted(recorded))}, the checkpoint now has {', '.join(p.name for p in now)}"
    for path in now:
        was = recorded[path.name]
        if not isinstance(was, dict):
            return "its record of the checkpoint is not bertcli's"
        info = _stat(path)
        if all(was.get(key) == value for key, value in info.items()):
            continue
        if info["bytes"] != was.get("bytes") or _sha256(path) != was.get("sha256"):
            return f"{path.name} has changed since the export"
    return None


SEAL_KEY = "bertcli_sha256"


def _seal_entry(hexdigest: str) -> bytes:
    """A ModelProto.metadata_props entry (field 14) {SEAL_KEY: hexdigest}, as protobuf encodes it: a field
    appended to a message's bytes is read as part of it, so ONNX Runtime and onnx read the sealed graph whole."""
    entry = b"\x0a" + bytes([len(SEAL_KEY)]) + SEAL_KEY.encode() + b"\x12" + bytes([len(hexdigest)]) + hexdigest.encode()
    return b"\x72" + bytes([len(entry)]) + entry


SEAL_BYTES = len(_seal_entry("0" * 64))


def seal(graph: bytes) -> bytes:
    """A serialized graph followed by the SHA-256 of its bytes, as the file bertcli export writes."""
    return graph + _seal_entry(hashlib.sha256(graph).hexdigest())


_SEALED: dict[tuple, bool] = {}  # (path, device, inode, size, mtime, ctime) -> sealed: a graph is hashed once a process


def bertcli_graph(path: Path) -> bool:
    """Whether the file at `path` is, byte for byte, a graph that bertcli export wrote: a plain file (never a
    link) that ends in the seal of what precedes it. A graph another tool wrote, or re-saved, or that was
    edited since, is the user's: never run as the checkpoint's, replaced or removed."""
    try:
        if path.is_symlink() or not path.is_file():
            return False
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            key = (str(path.resolve()), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
            if key not in _SEALED:
                _SEALED[key] = _sealed(f, info.st_size)
            return _SEALED[key]
    except OSError:
        return False


def _sealed(f, size: int) -> bool:
    if size < SEAL_BYTES:
        return False
    f.seek(size - SEAL_BYTES)
    if not f.read(SEAL_BYTES).startswith(_seal_entry("0" * 64)[:-64]):  # no seal: nothing more to read
        return False
    f.seek(0)
    digest, left = hashlib.sha256(), size - SEAL_BYTES
    while left > 0 and (block := f.read(min(left, 1 << 20))):
        digest.update(block)
        left -= len(block)
    return left == 0 and f.read() == _seal_entry(digest.hexdigest())


def unsealed_bertcli_graph(path: Path) -> bool:
    """A graph that names bertcli as its producer (its first bytes) but has no valid seal: exported by a
    bertcli from before graphs were sealed, or edited since. bertcli cannot prove it wrote it."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return False
    return b"\x12" + bytes([len(PRODUCER)]) + PRODUCER.encode() in head and not bertcli_graph(path)


def not_vouched(path: Path) -> str | None:
    """Why bertcli cannot vouch for the graph at `path` (None: it is the file bertcli export wrote, sealed). Read
    before ONNX Runtime loads it: a graph from elsewhere is never run, so it is never loaded either."""
    if bertcli_graph(path):
        return None
    if path.is_symlink():
        return f"it is a symbolic link (bertcli export writes {path.name} as a file of its own)"
    if unsealed_bertcli_graph(path):
        return ("it is not the file bertcli export wrote (changed since, saved again by another tool, or exported "
                "by a bertcli from before graphs were sealed: export again)")
    return "it was not written by bertcli export"


class OnnxModel:
    """A graph in an ONNX Runtime session, called as Task.run calls a model: feature rows in, the head's
    outputs (numpy, rows first) out."""

    def __init__(self, path: Path, task: Task):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: ONNX Runtime's warnings are for its developers
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                                disabled_optimizers=list(SLOWER_FUSIONS))
        except Exception as err:  # onnxruntime's own exception classes (InvalidProtobuf, Fail, ...)
            raise CheckpointError(f"{path}: ONNX Runtime cannot load it: {first_line(err)}") from None
        self.path = path
        self.version = ort.__version__
        meta = self.session.get_modelmeta()
        self.metadata = dict(meta.custom_metadata_map)
        self.from_bertcli = meta.producer_name == PRODUCER and SOURCES_KEY in self.metadata
        self.inputs = [i.name for i in self.session.get_inputs()]
        unknown = [name for name in self.inputs if name not in INPUTS]
        if unknown or "input_ids" not in self.inputs:
            raise CheckpointError(f"{path}: the graph's inputs are {', '.join(self.inputs)}; a BERT graph reads "
                                  f"input_ids (and attention_mask, token_type_ids)")
        outputs = self.session.get_outputs()
        wanted = len(task.output_names)
        if len(outputs) != wanted:
            raise CheckpointError(f"{path}: the graph has {len(outputs)} output(s); a {task.name} head has {wanted}")
        width = outputs[0].shape[-1] if outputs[0].shape else None
        if wanted == 1 and isinstance(width, int) and width != task.outputs:  # (QA's outputs are one score per token)
            raise CheckpointError(f"{path}: the graph gives {width} scores per {'token' if task.per_token else 'text'}, "
                                  f"but config.json names {task.outputs} label(s)")

    def stale(self, model_dir: Path) -> str | None:
        """Why this graph does not answer for the checkpoint's weights now (None: it does)."""
        why = not_vouched(self.path)
        if why is not None:
            return why
        if not self.from_bertcli:
            return "it was not written by bertcli export"
        try:
            recorded = json.loads(self.metadata[SOURCES_KEY])
        except ValueError:
            return "its record of the checkpoint is not valid JSON"
        if not isinstance(recorded, dict):
            return "its record of the checkpoint is not bertcli's"
        if self.metadata.get("bertcli_graph") == "int8" and self.metadata.get(INT8_KEY) != INT8_WEIGHTS:
            return ("its int8 weights use all 8 bits, which saturate on CPUs without VNNI (outputs up to 0.25 off the "
                    "model's): export --int8 again")
        return stale(recorded, model_dir)

    def __call__(self, rows: Sequence[dict], pad_id: int) -> tuple[np.ndarray, ...]:
        """The outputs for a batch of feature rows, padded to the longest with `pad_id`."""
        import numpy as np

        width = max(len(r["input_ids"]) for r in rows)
        ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        types = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = r["input_ids"]
            mask[i, :n] = 1
            types[i, :n] = r.get("token_type_ids") or 0
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        try:
            outputs = self.session.run(None, {name: feed[name] for name in self.inputs})
        except Exception as err:  # onnxruntime's exception classes: a graph from elsewhere that fails on this input
            raise BertcliError(f"{self.path}: ONNX Runtime failed on a batch: {first_line(err)}") from None
        for out in outputs:
            if out.shape[:1] != (len(rows),):
                raise BertcliError(f"{self.path}: the graph answered {out.shape[0] if out.shape else 0} rows for a "
                                   f"batch of {len(rows)}")
        return tuple(out.astype(np.float32, copy=False) for out in outputs)


"""Checkpoint directories that Hugging Face transformers and bertcli both load.

Reads any Hugging Face BERT directory (config.json + model.safetensors, or pytorch_model.bin
read with `weights_only=True`, so loading never runs code from the file). Writes config.json,
model.safetensors and the tokenizer files, each atomically.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from bertcli import __version__
from bertcli.errors import CheckpointError
from bertcli.fileio import atomic_write, atomic_write_text
from bertcli.config import BertConfig, check_tokenizer, read_config, read_labels, saved_architecture
from bertcli.fastpath import Dropout
from bertcli.model import (BertForPreTraining, BertForQuestionAnswering, BertForSequenceClassification,
                           BertForTokenClassification, BertModel, BertSelfAttention)
from bertcli.tokenizer import WordPieceTokenizer, load_tokenizer

# Hugging Face class name -> how to build it. Classification heads need the label count.
ARCHITECTURES = {
    "BertModel": lambda cfg, n: BertModel(cfg),
    "BertForPreTraining": lambda cfg, n: BertForPreTraining(cfg),
    "BertForSequenceClassification": lambda cfg, n: BertForSequenceClassification(cfg, n),
    "BertForTokenClassification": lambda cfg, n: BertForTokenClassification(cfg, n),
    "BertForQuestionAnswering": lambda cfg, n: BertForQuestionAnswering(cfg),
}
_TRUNK = ("embeddings.", "encoder.", "pooler.")
@dataclass
class LoadReport:
    """What a weight load did not match: new head weights, and weights the model has no use for."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"newly initialised: {_short(self.missing)}")
        if self.unexpected:
            parts.append(f"not used from the checkpoint: {_short(self.unexpected)}")
        return "; ".join(parts) or "all weights matched"


@dataclass
class Checkpoint:
    model: nn.Module
    config: BertConfig
    tokenizer: WordPieceTokenizer
    architecture: str
    labels: list[str]
    report: LoadReport


def _short(names: list[str], limit: int = 6) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def read_weights(directory: str | Path) -> dict[str, Tensor]:
    d = Path(directory)
    if (d / "model.safetensors").is_file():
        try:
            return _real_tensors(d / "model.safetensors", load_file(str(d / "model.safetensors")))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{d / 'model.safetensors'}: cannot read: {err}") from None
    if (d / "pytorch_model.bin").is_file():
        path = d / "pytorch_model.bin"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(
                f"{path}: refused: it holds Python objects other than tensors, which could run code when "
                f"loaded ({str(err).splitlines()[0][:200]}). Convert it to model.safetensors with a tool you trust."
            ) from None
        except (RuntimeError, OSError, EOFError, ValueError) as err:
            raise CheckpointError(f"{path}: cannot read: {err}") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a mapping of weight names to tensors, got {type(state).__name__}")
        bad = [k for k, v in state.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
        if bad:
            what = (f"{bad[0][:80]!r} holds {type(state[bad[0]]).__name__}" if isinstance(bad[0], str) else
                    f"a key is {type(bad[0]).__name__}, not a name")
            raise CheckpointError(f"{path}: expected a mapping of weight names to tensors; {what} (a training "
                                  "checkpoint? save its model's state_dict)")
        return _real_tensors(path, state)
    if (d / "model.safetensors.index.json").is_file():
        raise CheckpointError(f"{d}: sharded weights (model.safetensors.index.json) are not supported yet")
    raise CheckpointError(f"{d}: no model.safetensors or pytorch_model.bin")


_INTEGERS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)  # e.g. a saved position_ids buffer


def _real_tensors(path: Path, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` when each tensor is dense, on the CPU, of real numbers (floats, or integers for buffers)."""
    for name, v in state.items():
        if (v.layout != torch.strided or v.device.type != "cpu" or v.is_quantized
                or not (v.is_floating_point() or v.dtype in _INTEGERS)):
            raise CheckpointError(f"{path}: {name} is a {v.dtype} tensor ({v.layout}, on {v.device.type}); a weight "
                                  "is a dense tensor of real numbers")
    return state


def _normalise_names(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """The few renamings that cannot be avoided: TF-era gamma/beta, the `bert.` prefix of
    base-model checkpoints, and the tied/duplicated MLM decoder weights."""
    wants_prefix = any(name.startswith("bert.") for name, _ in model.named_parameters())
    out = {}
    for name, tensor in state.items():
        name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if wants_prefix and name.startswith(_TRUNK):
            name = "bert." + name
        elif not wants_prefix and name.startswith("bert."):
            name = name[len("bert."):]
        if name.endswith("embeddings.position_ids") or name in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"):
            continue  # a buffer HF once saved; the decoder is tied to the word embeddings and to cls.predictions.bias
        out[name] = tensor
    return out


def _own(model: nn.Module) -> dict[str, Tensor]:
    """The model's tensors that a checkpoint gives, by name (the decoder is tied to the word embeddings)."""
    return {k: v for k, v in model.state_dict().items() if k != "cls.predictions.decoder.weight"}


def check_shapes(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Every tensor that `state` (names normalised) holds for `model` has the model's shape. `model` may be
    built on the meta device, which takes no memory."""
    wrong = [f"{k} {tuple(state[k].shape)} in the checkpoint, {tuple(v.shape)} in the model"
             for k, v in _own(model).items() if k in state and state[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{source}: weights disagree with config.json: {_short(wrong, 3)}")


def load_weights(model: nn.Module, state: dict[str, Tensor], source: str) -> LoadReport:
    """Copy `state` (names normalised, shapes checked: check_shapes) into `model`. The trunk must be
    complete; head weights may be absent (they are newly initialised) and extra weights are reported."""
    own = _own(model)
    missing = [k for k in own if k not in state]
    trunk_missing = [k for k in missing if k.removeprefix("bert.").startswith(("embeddings.", "encoder."))]
    if trunk_missing:
        raise CheckpointError(f"{source}: encoder weights missing from the checkpoint: {_short(trunk_missing)}")
    unexpected = [k for k in state if k not in own]
    beyond = [k for k in unexpected if k.removeprefix("bert.").startswith("encoder.")]
    if beyond:  # (a pooler is left unread by the token heads, which have none; other names are said on stderr)
        raise CheckpointError(f"{source}: weights disagree with config.json: the checkpoint holds encoder weights that "
                              f"a model of its config (num_hidden_layers {model.config.num_hidden_layers}) has no place "
                              f"for: {_short(beyond)}")
    integers = [f"{k} ({state[k].dtype})" for k, v in own.items()
                if k in state and v.is_floating_point() and not state[k].is_floating_point()]
    if integers:
        raise CheckpointError(f"{source}: weights stored as integers: {_short(integers, 3)}; a quantized checkpoint "
                              "(8-bit, 4-bit) is not read: save it in floating point")
    # checked as the model will hold them (fp32): a float64 1e300 is finite only before the cast, and
    # isfinite does not exist for every stored type (float8)
    broken = [k for k in own if k in state and own[k].is_floating_point()
              and not bool(torch.isfinite(state[k].to(own[k].dtype)).all())]
    if broken:
        raise CheckpointError(f"{source}: weights hold NaN or infinite values: {_short(broken, 3)}; the model is "
                              "broken (it diverged in training?)")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return LoadReport(missing=missing, unexpected=unexpected)


# Weights that filling in [MASK] (predict on a pretrained model) never reads: a checkpoint may lack them
NOT_READ_TO_FILL_MASKS = ("cls.seq_relationship.", "bert.pooler.")


def load_checkpoint(directory: str | Path, architecture: str | None = None, labels: list[str] | None = None,
                    whole: bool = True, unread: tuple[str, ...] = ()) -> Checkpoint:
    """Load model, tokenizer and labels. `architecture` chooses the head (default: the one in
    config.json); `labels` overrides the checkpoint's label names (a new classification head).
    `whole`: the model is used as it was trained (evaluate, predict, export, a teacher), so every weight
    it reads must be in the checkpoint (but those named by the prefixes `unread`): a head or pooler made
    up at random would answer at random. Fine-tuning from it (whole=False) makes up what is missing."""
    cfg, raw = read_config(directory)
    source = str(Path(directory) / "config.json")
    saved = saved_architecture(raw)
    architecture = architecture or saved
    if architecture not in ARCHITECTURES:
        raise CheckpointError(f"{source}: architecture {architecture!r} is not one of {', '.join(ARCHITECTURES)}")
    try:
        checkpoint_labels = read_labels(raw, source)
    except CheckpointError:
        if whole:
            raise
        checkpoint_labels = []  # fine-tuning makes a head of its own: the old one's names go unread (its shapes
        # are still compared with the head being made)
    use_labels = list(labels) if labels is not None else checkpoint_labels
    tokenizer = load_tokenizer(directory)
    check_tokenizer(tokenizer, cfg, str(directory))
    state = read_weights(directory)
    if labels is not None and labels != checkpoint_labels:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}  # a new label set: a new head
    with torch.device("meta"):  # the shapes config.json gives, compared before its sizes take any memory
        planned = ARCHITECTURES[architecture](cfg, max(len(use_labels), 1))
    state = _normalise_names(state, planned)
    check_shapes(planned, state, str(directory))
    model = ARCHITECTURES[architecture](cfg, max(len(use_labels), 1))
    report = load_weights(model, state, str(directory))
    needed = [k for k in report.missing if not k.startswith(unread)] if whole else []
    if needed:
        raise CheckpointError(f"{directory}: weights of its {architecture} model missing from the checkpoint: "
                              f"{_short(needed)}; it cannot answer without them (fine-tune it to train them)")
    if whole and report.unexpected:  # (fine-tuning says them in its model line)
        sys.stderr.write(f"{directory}: weights its {architecture} model does not read, left unused: "
                         f"{_short(report.unexpected)}\n")
    model.eval()
    return Checkpoint(model, cfg, tokenizer, architecture, use_labels, report)


def keep_layers(ck: Checkpoint, layers: Sequence[int], source: str) -> Checkpoint:
    """The checkpoint with only the encoder layers `layers` (in order, renumbered from 0), as DistilBERT
    starts its student from every other layer of its teacher; the embeddings, pooler and head stay."""
    count = ck.config.num_hidden_layers
    if any(i >= count for i in layers):
        raise CheckpointError(f"model.init_layers: {source} has layers 0..{count - 1}, not {max(layers)}")
    cfg = dataclasses.replace(ck.config, num_hidden_layers=len(layers))
    trunk = ck.model.bert if hasattr(ck.model, "bert") else ck.model
    trunk.encoder.layer = nn.ModuleList(trunk.encoder.layer[i] for i in layers)
    for module in {ck.model, trunk}:
        module.config = cfg
    return dataclasses.replace(ck, model=ck.model, config=cfg)


def with_dropout(ck: Checkpoint, p: float) -> Checkpoint:
    """The checkpoint with hidden and attention dropout `p` (its config, so saved checkpoints say it too)."""
    cfg = dataclasses.replace(ck.config, hidden_dropout_prob=p, attention_probs_dropout_prob=p)
    for module in ck.model.modules():
        if isinstance(module, Dropout):
            module.p = p
        elif isinstance(module, BertSelfAttention):
            module.dropout_p = p
        if getattr(module, "config", None) is ck.config:
            module.config = cfg
    return dataclasses.replace(ck, config=cfg)


def config_dict(cfg: BertConfig, architecture: str, labels: list[str] | None = None,
                task: dict[str, Any] | None = None, problem_type: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"architectures": [architecture], "model_type": "bert", **dataclasses.asdict(cfg),
                           "position_embedding_type": "absolute", "torch_dtype": "float32",
                           "bertcli_version": __version__}
    if problem_type:
        out["problem_type"] = problem_type  # the loss transformers picks: regression, single or multi-label
    if labels:
        out["id2label"] = {str(i): name for i, name in enumerate(labels)}
        out["label2id"] = {name: i for i, name in enumerate(labels)}
    if task:
        out["bertcli_task"] = task  # what evaluate and predict need to rebuild the task (window sizes, columns)
    return out


def save_model(directory: str | Path, model: nn.Module, architecture: str, labels: list[str] | None = None,
               task: dict[str, Any] | None = None, problem_type: str | None = None) -> None:
    """config.json + model.safetensors (fp32, contiguous, the tied decoder weight left out as HF does)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg: BertConfig = model.config
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()
             if k != "cls.predictions.decoder.weight"}
    data = save(state, metadata={"format": "pt"})  # written by Python, so a full disk raises a plain OSError
    atomic_write(d / "model.safetensors", lambda tmp: Path(tmp).write_bytes(data))
    atomic_write_text(d / "config.json", json.dumps(config_dict(cfg, architecture, labels, task, problem_type), indent=2) + "\n")


def save_checkpoint(directory: str | Path, model: nn.Module, architecture: str, tokenizer: WordPieceTokenizer,
                    labels: list[str] | None = None, task: dict[str, Any] | None = None,
                    problem_type: str | None = None) -> None:
    """A directory that `load_checkpoint` and Hugging Face's from_pretrained both read."""
    save_model(directory, model, architecture, labels, task, problem_type)
    tokenizer.save(directory, model_max_length=model.config.max_position_embeddings)

"""A checkpoint's config.json, read without torch: the architecture's sizes (BertConfig), its head
and labels, checked as bertcli reads them. predict's ONNX engine reads a checkpoint with these alone;
model.py builds the network from a BertConfig. Nothing heavy is imported here (no torch, no tokenizers)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bertcli.errors import CheckpointError

if TYPE_CHECKING:
    from bertcli.tokenizer import WordPieceTokenizer

ACTIVATION_NAMES = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")  # hidden_act values model.ACTIVATIONS has


@dataclass(frozen=True)
class BertConfig:
    """The architecture, under BertConfig's own key names (config.json)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0


def parameter_count(cfg: BertConfig) -> int:
    """The trunk's parameters plus the largest head's (the MLM transform), from the shapes alone:
    what a model of this config will need before any tensor is made."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    embeddings = (cfg.vocab_size + cfg.max_position_embeddings + cfg.type_vocab_size) * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
    pooler = h * h + h
    heads = h * h + 3 * h + cfg.vocab_size + 2 * h + 2
    return embeddings + cfg.num_hidden_layers * layer + pooler + heads


MAX_CONFIG_BYTES = 1 << 20
INFERENCE_BYTES_PER_PARAMETER = 4  # fp32 weights
TRAINING_BYTES_PER_PARAMETER = 16  # fp32 weights, their gradients and AdamW's two moments


def machine_memory() -> int:
    """Bytes of physical memory on this machine."""
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(cfg: BertConfig, source: str, bytes_per_parameter: int, purpose: str) -> None:
    """Refuse a model whose parameters alone would not fit in this machine's memory, before any
    tensor is made (a mistyped size would otherwise end in a crash, or in the machine swapping)."""
    count = parameter_count(cfg)
    need, have = count * bytes_per_parameter, machine_memory()
    if need > have:
        raise CheckpointError(f"{source}: a BERT of {count:,} parameters needs {need / 2**30:,.1f} GiB {purpose}, more "
                              f"than this machine's {have / 2**30:,.1f} GiB of memory; check its sizes")


def read_config(directory: str | Path) -> tuple[BertConfig, dict[str, Any]]:
    """config.json -> (BertConfig, the raw dict). Keys that BertConfig lacks are kept in the dict."""
    path = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        found = "is a file, not a checkpoint directory" if Path(directory).exists() else "checkpoint directory not found"
        raise CheckpointError(f"{directory}: {found}")
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json (not a BERT checkpoint directory)")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path}: {path.stat().st_size:,} bytes, too large for a model configuration")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON: {err}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: nested too deeply to be a model configuration") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    model_type = raw.get("model_type", "bert")
    if model_type != "bert":
        raise CheckpointError(f"{path}: model_type is {model_type!r}; bertcli reads BERT checkpoints (model_type 'bert')")
    if raw.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"{path}: position_embedding_type {raw['position_embedding_type']!r} is not supported (absolute only)")
    known = {f.name: f for f in dataclasses.fields(BertConfig)}
    values = {}
    for key, f in known.items():
        if key not in raw:
            continue
        value = raw[key]
        expected = int if f.type in ("int", int) else float if f.type in ("float", float) else str
        ok = isinstance(value, expected) or (expected is float and isinstance(value, int))
        if isinstance(value, bool) or not ok:
            raise CheckpointError(f"{path}: {key} should be {expected.__name__}, got {value!r}")
        values[key] = value
    cfg = BertConfig(**values)
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if not 0 <= getattr(cfg, key) < 1:
            raise CheckpointError(f"{path}: {key} must be in [0, 1), got {getattr(cfg, key)}")
    if not 0 < cfg.layer_norm_eps < 1:
        raise CheckpointError(f"{path}: layer_norm_eps must be greater than 0 and less than 1, got {cfg.layer_norm_eps}")
    if not 0 <= cfg.initializer_range < 1e3:
        raise CheckpointError(f"{path}: initializer_range must be a finite number of 0 or more, got {cfg.initializer_range}")
    if cfg.hidden_act not in ACTIVATION_NAMES:
        raise CheckpointError(f"{path}: hidden_act {cfg.hidden_act!r} is not one of {', '.join(ACTIVATION_NAMES)}")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size"):
        if getattr(cfg, key) <= 0:
            raise CheckpointError(f"{path}: {key} must be positive, got {getattr(cfg, key)}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise CheckpointError(f"{path}: hidden_size {cfg.hidden_size} is not divisible by "
                              f"num_attention_heads {cfg.num_attention_heads}")
    architectures = raw.get("architectures")
    if architectures is not None and (not isinstance(architectures, list) or
                                      not all(isinstance(a, str) for a in architectures)):
        raise CheckpointError(f"{path}: architectures must be a list of class names, e.g. "
                              f"[\"BertForSequenceClassification\"], got {json.dumps(architectures)[:80]}")
    if not 0 <= cfg.pad_token_id < cfg.vocab_size:
        raise CheckpointError(f"{path}: pad_token_id {cfg.pad_token_id} is not an id of the vocabulary")
    check_memory(cfg, str(path), INFERENCE_BYTES_PER_PARAMETER, "to load")
    return cfg, raw


# Heads bertcli reads as one it has: a masked-LM model (bert-base-uncased, bert-base-chinese) is a pretraining
# model without its sentence head and pooler, which filling in [MASK] does not read
READ_AS = {"BertForMaskedLM": "BertForPreTraining"}


def saved_architecture(raw: dict[str, Any]) -> str:
    """The head a checkpoint was saved with (read_config has checked the list), as bertcli builds it."""
    name = (raw.get("architectures") or ["BertModel"])[0]
    return READ_AS.get(name, name)


def masked_lm_only(raw: dict[str, Any]) -> bool:
    """A checkpoint saved as a masked-LM model: pretrained with no sentence objective."""
    return (raw.get("architectures") or [None])[0] == "BertForMaskedLM"


def read_labels(raw: dict[str, Any], source: str) -> list[str]:
    """id2label from config.json as a list indexed by id ([] when absent). A sequence classifier from
    elsewhere saved without one (transformers 5 leaves out its default) has transformers' names:
    LABEL_0, LABEL_1, ... for its num_labels (2 by default)."""
    id2label = raw.get("id2label")
    if not id2label:
        if (saved_architecture(raw) != "BertForSequenceClassification" or raw.get("problem_type") == "regression"
                or "bertcli_task" in raw):  # bertcli always names its labels: one without them was edited
            return []
        count = raw.get("num_labels", 2)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 100_000:
            raise CheckpointError(f"{source}: num_labels must be a whole number from 1 to 100,000, got {count!r}")
        return [f"LABEL_{i}" for i in range(count)]
    try:
        pairs = sorted((int(k), v) for k, v in id2label.items())
    except (ValueError, AttributeError):
        raise CheckpointError(f"{source}: id2label must map integer ids to label names") from None
    if [i for i, _ in pairs] != list(range(len(pairs))):
        raise CheckpointError(f"{source}: id2label ids must be 0..{len(pairs) - 1}")
    labels = [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for _, v in pairs]
    bad = next((v for v in labels if not isinstance(v, str) or not v.strip()), None)
    if bad is not None:
        raise CheckpointError(f"{source}: id2label names must be non-empty strings, got {json.dumps(bad)[:80]}")
    twice = sorted({v for v in labels if labels.count(v) > 1})
    if twice:
        raise CheckpointError(f"{source}: id2label names {', '.join(map(repr, twice))} for more than one id; each "
                              "label needs a name of its own")
    return labels


def check_tokenizer(tokenizer: WordPieceTokenizer, cfg: BertConfig, source: str) -> None:
    """Every id the tokenizer can give (its vocabulary, and the [CLS]/[SEP] its template adds) has an
    embedding row, and so does every token type it gives."""
    single, pair = tokenizer.encode("a"), tokenizer.encode("a", "b")
    top = max([tokenizer.id_limit - 1, *single.ids, *pair.ids])
    if top >= cfg.vocab_size:
        raise CheckpointError(f"{source}: the tokenizer has token ids up to {top} but config.json says vocab_size "
                              f"{cfg.vocab_size}")
    if cfg.type_vocab_size >= 2 and (pair.type_ids[0] != 0 or pair.type_ids[-1] != 1):
        raise CheckpointError(f"{source}: the tokenizer gives a text pair the token types {pair.type_ids}, not 0 for "
                              "the first text and 1 for the second, as the model learnt them")
    types = max([0, *single.type_ids, *(pair.type_ids if cfg.type_vocab_size >= 2 else [])])
    if types >= cfg.type_vocab_size:
        raise CheckpointError(f"{source}: the tokenizer gives token type {types} but config.json says type_vocab_size "
                              f"{cfg.type_vocab_size}")

"""The bad-input suite: each case runs the real command line (in this process, through
`bertcli.cli.main`) and must end with exit code 2 and one message that names the file and the
line, key or field, with no traceback, and leave every file the user had exactly as it was
(no output directory appears either)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import sys
from pathlib import Path

import pytest

from bertcli.errors import DataError
from conftest import REVIEWS, overflow

ROWS = REVIEWS
CONTEXT = "The tiny corpus was written by the doctor in Paris."


@pytest.fixture(scope="module")
def model(tiny_classifier_dir) -> Path:
    return tiny_classifier_dir


@pytest.fixture
def home(tmp_path, model, tiny_tokenizer_dir) -> Path:
    """A user's folder: good data, a tokenizer and a model, that each case spoils one way."""
    (tmp_path / "train.tsv").write_text(ROWS, encoding="utf-8")
    shutil.copytree(model, tmp_path / "model")
    shutil.copytree(tiny_tokenizer_dir, tmp_path / "tok")
    return tmp_path


def recipe(home: Path, task: str = "classify", train: str = "train.tsv", extra: str = "") -> str:
    text = (f"task: {{name: {task}}}\ntokenizer: {home / 'tok'}\n"
            f"data: {{train: {home / train}, max_seq_len: 128}}\ntrain: {{max_steps: 1, precision: fp32}}\n"
            f"output: {home / 'out'}\n{extra}")
    (home / "r.yaml").write_text(text, encoding="utf-8")
    return str(home / "r.yaml")


def squad(answer: str, start: int) -> str:
    return json.dumps({"data": [{"paragraphs": [{"context": CONTEXT, "qas": [
        {"id": "1", "question": "Who wrote it?", "answers": [{"text": answer, "answer_start": start}]}]}]}]})


def spoil_config(home: Path, **changes) -> str:
    path = home / "model" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **changes}))
    return str(home / "model")


class Payload:
    def __reduce__(self):
        return (print, ("the payload ran",))


def drop(home: Path, *names: str) -> str:
    for name in names:
        (home / "model" / name).unlink()
    return str(home / "model")


def plant_pickle(home: Path) -> str:
    (home / "model" / "model.safetensors").unlink()
    (home / "model" / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    return str(home / "model")


def drop_weights(home: Path, prefix: str) -> str:
    """The model without the weights whose names start with `prefix` (its head, its pooler)."""
    from safetensors.torch import load_file, save_file

    path = home / "model" / "model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if not k.startswith(prefix)}, path, metadata={"format": "pt"})
    return str(home / "model")


def spoil_tokenizer(home: Path, **changes) -> str:
    """The model's tokenizer.json with parts replaced (its post-processor, its model)."""
    path = home / "model" / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    path.write_text(json.dumps({**tokenizer, **{k: v(tokenizer) if callable(v) else v for k, v in changes.items()}}))
    return str(home / "model")


def other_tokenizer(home: Path) -> str:
    """A tokenizer with another vocabulary than the model's (one word renamed)."""
    shutil.copytree(home / "tok", home / "tok2")
    path = home / "tok2" / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    vocab = tokenizer["model"]["vocab"]
    word = next(w for w in vocab if w.isalpha())
    vocab[word + "x"] = vocab.pop(word)
    path.write_text(json.dumps(tokenizer))
    return str(home / "tok2")


HUGE = "word " * 2_000_000  # 10,000,000 bytes

# name -> (files to write into the user's folder, argv (given the folder), stdin, what the message must say)
CASES = {
    "yaml syntax": ({"r.yaml": "task: {name: classify\ndata: [\n"}, lambda h: ["finetune", str(h / "r.yaml")], b"",
                    r"r.yaml: 1 problem:\n  - YAML syntax error at line \d+, column \d+"),
    "unknown key": ({}, lambda h: ["finetune", recipe(h, extra="trian: {lr: 1}\n")], b"", "trian: unknown key"),
    "wrong type": ({}, lambda h: ["finetune", recipe(h), "--set", "train.batch_size=many"], b"",
                   "train.batch_size: expected an integer"),
    "impossible value": ({}, lambda h: ["finetune", recipe(h), "--set", "train.warmup_ratio=1.5"], b"",
                         "train.warmup_ratio"),
    "missing file": ({}, lambda h: ["finetune", recipe(h, train="nothere.tsv")], b"", "data.train: file not found"),
    "empty file": ({"x.tsv": ""}, lambda h: ["finetune", recipe(h, train="x.tsv")], b"", "data.train: file is empty"),
    "directory for a file": ({}, lambda h: ["finetune", recipe(h, train="tok")], b"", "data.train: expected a file"),
    "ragged tsv": ({"x.tsv": ROWS + "no label\n"}, lambda h: ["finetune", recipe(h, train="x.tsv")], b"",
                   r"x.tsv: line 6: 1 columns, but the header has 2"),
    "csv missing column": ({"x.csv": "words,label\nok,pos\n"}, lambda h: ["finetune", recipe(h, train="x.csv")], b"",
                           r"x.csv: line 1 \(the header\): no text column"),
    "one label only": ({"x.tsv": "sentence\tlabel\ngood\tpos\nfine\tpos\n"},
                       lambda h: ["finetune", recipe(h, train="x.tsv")], b"", "x.tsv: every example has the label 'pos'"),
    "conll column count": ({"x.conll": "a\tO\nb\tX\tO\n"}, lambda h: ["finetune", recipe(h, "ner", "x.conll")], b"",
                           r"x.conll: line 2: 3 columns"),
    "conll unknown tag": ({"x.conll": "a\tO\nb\tPER\n"}, lambda h: ["finetune", recipe(h, "ner", "x.conll")], b"",
                          r"x.conll: line 2: unknown tag 'PER'"),
    "squad missing field": ({"x.json": json.dumps({"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "1"}]}]}]})},
                            lambda h: ["finetune", recipe(h, "qa", "x.json")], b"",
                            r"x.json: data\[0\].paragraphs\[0\].qas\[0\]: missing field 'question'"),
    "squad answer outside the context": ({"x.json": squad("the unicorn", 400)},
                                         lambda h: ["finetune", recipe(h, "qa", "x.json")], b"",
                                         r"x.json: 1 of 1 questions have no answer in their context"),
    "invalid utf-8 in data": ({"x.tsv": ROWS.encode() + b"caf\xe9\tpos\n"}, lambda h: ["finetune", recipe(h, train="x.tsv")],
                              b"", r"x.tsv: line 6: not UTF-8 text \(byte offset"),
    "nul byte in data": ({"x.tsv": ROWS.encode() + b"a\x00b\tpos\n"}, lambda h: ["finetune", recipe(h, train="x.tsv")],
                         b"", r"x.tsv: line 6: NUL byte"),
    "10 MB line in data": ({"x.tsv": ROWS + HUGE + "\tpos\n"}, lambda h: ["finetune", recipe(h, train="x.tsv")], b"",
                           r"x.tsv: line 6: the line is 10,000,004 bytes long"),
    "invalid utf-8 on stdin": ({}, lambda h: ["predict", str(h / "model")], b"good\nbad \xff\n",
                               r"stdin: line 2: not UTF-8 text"),
    "nul byte on stdin": ({}, lambda h: ["predict", str(h / "model")], b"good\nbad \x00 line\n", r"stdin: line 2: NUL byte"),
    "10 MB line on stdin": ({}, lambda h: ["predict", str(h / "model")], b"good\n" + HUGE.encode() + b"\n",
                            r"stdin: line 2: the line is 10,000,000 bytes long"),
    "empty stdin": ({}, lambda h: ["predict", str(h / "model")], b"", "stdin: no input lines"),
    "label the model never saw": ({"x.tsv": "sentence\tlabel\nfine\tsurprised\n"},
                                  lambda h: ["evaluate", str(h / "model"), "--data", str(h / "x.tsv")], b"",
                                  r"x.tsv: line 2: label 'surprised' is not one the model knows"),
    "no config.json": ({}, lambda h: ["predict", drop(h, "config.json")], b"x\n", "model: no config.json"),
    "no weights": ({}, lambda h: ["predict", drop(h, "model.safetensors")], b"x\n",
                   "model: no model.safetensors or pytorch_model.bin"),
    "no tokenizer": ({}, lambda h: ["predict", drop(h, "tokenizer.json", "vocab.txt")], b"x\n",
                     "model: no tokenizer.json or vocab.txt"),
    "vocabulary disagrees with weights": ({}, lambda h: ["predict", spoil_config(h, vocab_size=301)], b"x\n",
                                          "model: weights disagree with config.json"),
    "a model without its head": ({}, lambda h: ["predict", drop_weights(h, "classifier.")], b"x\n",
                                 "model: weights of its BertForSequenceClassification model missing from the "
                                 "checkpoint: classifier.weight, classifier.bias"),
    "a model without its pooler": ({"x.tsv": ROWS}, lambda h: ["evaluate", drop_weights(h, "bert.pooler."), "--data",
                                                             str(h / "x.tsv")], b"",
                                   "missing from the checkpoint: bert.pooler.dense.weight"),
    "a model whose outputs overflow": ({"x.tsv": ROWS}, lambda h: ["evaluate", str(overflow(h / "model")), "--data", str(h / "x.tsv"),
                                                                  "--precision", "fp32", "--out", str(h / "m.json")],
                                       b"", "the model gave outputs that are not finite numbers"),
    "a tokenizer that adds no [CLS] or [SEP]": ({}, lambda h: ["predict", spoil_tokenizer(h, post_processor=None)],
                                                b"x\n", r"tokenizer.json: its post-processor does not wrap texts as "
                                                        r"BERT's does"),
    "a tokenizer that is not WordPiece": ({}, lambda h: ["predict", spoil_tokenizer(h, model=lambda t: {
        "type": "BPE", "vocab": t["model"]["vocab"], "merges": [], "unk_token": "[UNK]"})], b"x\n",
                                          r"tokenizer.json: a BPE tokenizer, not BERT's WordPiece"),
    "a label name given twice": ({}, lambda h: ["predict", spoil_config(h, id2label={"0": "pos", "1": "pos"})], b"x\n",
                                 r"config.json: id2label names 'pos' for more than one id"),
    "an empty label name": ({}, lambda h: ["predict", spoil_config(h, id2label={"0": " ", "1": "pos"})], b"x\n",
                            r"config.json: id2label names must be non-empty strings"),
    "a tokenizer that is not model.init's": ({}, lambda h: ["finetune", recipe(h), "--set", f"model.init={h / 'model'}",
                                                          "--set", f"tokenizer={other_tokenizer(h)}"], b"",
                                             r"tokenizer: .*tok2 is not the tokenizer of model.init"),
    "pretraining into the shard cache": ({}, lambda h: ["pretrain", recipe(h, "pretrain"), "--out",
                                                      str(Path(os.environ["BERTCLI_CACHE"]) / "run")], b"",
                                         r"the output directory lies inside the input shard cache \(BERTCLI_CACHE\)"),
    "a key twice in a recipe": ({}, lambda h: ["finetune", recipe(h, extra="train: {lr: 1}\n")], b"",
                                r"- line 6, column 1: 'train' is given twice in one mapping "
                                r"\(first at line 4\)"),
    "a lone surrogate escape on stdin": ({}, lambda h: ["predict", str(h / "model")], b'{"text": "ok"}\n{"text": "\\ud800"}\n',
                                         r"stdin: line 2: .*cannot be read \(a lone surrogate escape \(\\ud800\)"),
    "a lone surrogate escape in data": ({"x.jsonl": '{"text": "a\\udc00", "label": "pos"}\n'},
                                        lambda h: ["evaluate", str(h / "model"), "--data", str(h / "x.jsonl")], b"",
                                        r"x.jsonl: line 1: cannot be read as JSON \(a lone surrogate escape"),
    "a pair under a name predict does not read": ({}, lambda h: ["predict", str(h / "model")],
                                                  b'{"text": "good", "text_b": "bad"}\n',
                                                  r"stdin: line 1: .* 'text_pair', not 'text_b'"),
    "a JSON line cut short on stdin": ({}, lambda h: ["predict", str(h / "model")], b'{"text": "good"\n',
                                       r"stdin: line 1: a line starting with \{\" is read as a JSON line"),
    "a merge key twice in a recipe": ({"m.yaml": "task: {name: classify}\ntrain:\n  <<: {max_steps: 2}\n  <<: {max_steps: 3}\n"},
                                      lambda h: ["finetune", str(h / "m.yaml")], b"",
                                      r"line 4, column 3: '<<' is given twice in one mapping \(first at line 3\)"),
    "pickle that runs code": ({}, lambda h: ["predict", plant_pickle(h)], b"x\n", "pytorch_model.bin"),
}


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_message_and_exit_2(case, home, monkeypatch, capsys):
    import re

    from bertcli.cli import main

    files, setup, stdin, expected = CASES[case]
    for name, data in files.items():
        (home / name).write_bytes(data.encode() if isinstance(data, str) else data)
    argv = setup(home)
    before = digest(home)
    monkeypatch.setattr(sys, "argv", ["bertcli", *argv])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    with pytest.raises(SystemExit) as exit_:
        main()
    out, err = capsys.readouterr()
    assert exit_.value.code == 2, err
    assert "Traceback" not in err and "the payload ran" not in out + err
    message = "\n".join([err, *(json.loads(line).get("error", "") for line in out.splitlines() if line.strip())])
    assert re.search(expected, message), message[-2000:]
    assert digest(home) == before, "a file the user had changed"


@pytest.mark.parametrize("data, message", [
    (b"ok\nfine\n", None),
    (b"ok\nbad \xff here\nand \x00", "f: line 2: not UTF-8 text (byte offset 7)"),  # the first bad byte wins
    (b"ok\n\x00 then \xff", "f: line 2: NUL byte (byte offset 3); is this binary input?"),
    (b"caf\xc3", "f: line 1: not UTF-8 text (byte offset 3)"),  # cut inside a character
])
def test_one_decoder_names_the_first_bad_byte_in_every_reader(data, message, tmp_path):
    from bertcli.data.tables import read_text
    from bertcli.textio import decode_text

    if message is None:
        assert decode_text(data, "f") == data.decode()
        return
    with pytest.raises(DataError, match=re.escape(message)):
        decode_text(data, "f")
    (tmp_path / "f").write_bytes(data)  # a whole file (SQuAD's JSON, a TSV) says the same
    with pytest.raises(DataError, match=re.escape(message.replace("f:", f"{tmp_path / 'f'}:"))):
        read_text(tmp_path / "f", one_example_per_line=False)
    if message.startswith("f: line 2"):  # one line of a stream: the line given, the offset where the line starts
        line = data.split(b"\n")[1]
        with pytest.raises(DataError, match=re.escape(message)):
            decode_text(line, "f", offset=3, line=2)

"""Trust: nothing of the user's is ever deleted or changed, no recipe runs code, every bad value
gets exit code 2, signals and pipes end cleanly. One test or case per class of issue 14, through
the real command line; every case that involves the user's files hashes the whole tree before and
after."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from bertcli.errors import BertcliError
from bertcli.rundir import LOCK, MARKER
from conftest import REVIEWS, ROOT, in_process, overflow, run_cli, write_recipe

HEADER, BODY = REVIEWS.split("\n", 1)
ROWS = HEADER + "\n" + BODY * 4


def rows(times: int) -> str:
    return HEADER + "\n" + BODY * 4 * times
CONTEXT = "The tiny corpus was written by the doctor in Paris."


def tree(root: Path) -> dict[str, str]:
    """Every file and link under `root` with its content hash (a link: where it points)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[str(p.relative_to(root)) + "/"] = "dir"
    return out


@pytest.fixture(scope="module")
def model(tiny_classifier_dir) -> Path:
    return tiny_classifier_dir


@pytest.fixture
def home(tmp_path, model, tiny_tokenizer_dir) -> Path:
    """A user's folder: data, a tokenizer, a model, a project of their own and a recipe."""
    (tmp_path / "train.tsv").write_text(ROWS, encoding="utf-8")
    (tmp_path / "corpus.txt").write_text("The fox jumps. The dog sleeps.\n\nA second document here.\n" * 5)
    shutil.copytree(model, tmp_path / "model")
    shutil.copytree(tiny_tokenizer_dir, tmp_path / "tok")
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("precious")
    (project / ".bashrc").write_text("export X=1")
    (project / "config.json").write_text("{}")
    (project / "recipe.yaml").write_text("mine: true")
    (project / ".saving").mkdir()
    (project / ".saving" / "draft.txt").write_text("a draft")
    (project / ".notes.abcdefgh.tmp").write_text("looks like a leftover, is not")
    recipe(tmp_path)
    return tmp_path


def recipe(home: Path, task: str = "classify", train: str = "train.tsv", extra: str = "", name: str = "r.yaml",
           init: str | None = None, eval: str | None = None, seq: int = 32) -> str:
    model = f"{{init: {init}}}" if init else \
        "{hidden_size: 32, num_layers: 2, num_heads: 4, intermediate_size: 64, max_position: 128}"
    evaluation = f", eval: {home / eval}" if eval else ""
    text = (f"task: {{name: {task}}}\n" + ("" if init else f"tokenizer: {home / 'tok'}\n") + f"model: {model}\n"
            f"data: {{train: {home / train}{evaluation}, max_seq_len: {seq}}}\n"
            f"train: {{max_steps: 2, batch_size: 4, precision: fp32, log_every: 1}}\noutput: {home / 'out'}\n{extra}")
    (home / name).write_text(text, encoding="utf-8")
    return str(home / name)


def spoil_config(home: Path, **changes) -> str:
    path = home / "model" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return str(home / "model")


def spoil_weight(home: Path, name: str, change) -> str:
    """The model's weight `name` replaced by `change(weight)`, saved back as safetensors."""
    from safetensors.torch import load_file, save_file

    path = home / "model" / "model.safetensors"
    state = load_file(str(path))
    state[name] = change(state[name])
    save_file(state, str(path))
    return str(home / "model")


def nan_weight(home: Path) -> str:
    import torch

    return spoil_weight(home, "bert.encoder.layer.0.attention.self.query.weight",
                        lambda w: w.index_fill(0, torch.tensor([0]), float("nan")))


def spoil_task(home: Path, **changes) -> str:
    path = home / "model" / "config.json"
    config = json.loads(path.read_text())
    config["bertcli_task"] = {**config.get("bertcli_task", {}), **changes}
    path.write_text(json.dumps(config))
    return str(home / "model")


def one_token_type(home: Path) -> str:
    """A self-consistent checkpoint with a single token type (type_vocab_size 1)."""
    spoil_weight(home, "bert.embeddings.token_type_embeddings.weight", lambda w: w[:1].clone())
    return spoil_config(home, type_vocab_size=1)


def _resume_own(run: str) -> list[str]:
    """finetune --resume of the run with its own recipe (another would be refused first)."""
    return ["finetune", f"{run}/recipe.yaml", "--out", run, "--resume"]


def spoil_resume(home: Path, position: list | None = None, edit=None) -> str:
    """The model run's resume.pt with another position, or edited by `edit(state)`."""
    import torch

    run = home / "model"
    state = torch.load(run / "resume.pt", weights_only=True)
    if position is not None:
        state["position"] = position
    if edit is not None:
        edit(state)
    torch.save(state, run / "resume.pt")
    return str(run)


def linked(home: Path, name: str) -> str:
    (home / f"link-to-{name}").symlink_to(home / name)
    return str(home / f"link-to-{name}")


def _first_weight(state: dict) -> None:
    next(iter(state["model"].values())).view(-1)[0] = float("nan")


def _adam_moment(state: dict) -> None:
    next(iter(state["optimizer"]["state"].values()))["exp_avg"].view(-1)[3] = float("inf")


def fifo_twice(home: Path) -> list[str]:
    os.mkfifo(home / "data.fifo")
    return ["finetune", recipe(home), "--set", f"data.train={home / 'data.fifo'}", "--set",
            f"data.eval={home / 'data.fifo'}"]


def squad(home: Path, qa: dict) -> str:
    (home / "q.json").write_text(json.dumps({"data": [{"paragraphs": [{"context": CONTEXT, "qas": [qa]}]}]}))
    return "q.json"


def plant(home: Path, name: str) -> str:
    """A file of the user's inside the marked run `model`, at `name` (which may replace a file of bertcli's)."""
    path = home / "model" / name
    if path.parent.is_file():
        path.parent.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("mine")
    return str(home / "model")


def template_id(home: Path) -> str:
    path = home / "model" / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    tokenizer["post_processor"]["special_tokens"]["[CLS]"]["ids"] = [99999]
    path.write_text(json.dumps(tokenizer))
    return str(home / "model")


def template_extra_id(home: Path) -> str:
    """A template that puts a token of its own, id 99999, between a pair's texts."""
    path = home / "model" / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    processor = tokenizer["post_processor"]
    processor["pair"].insert(3, {"SpecialToken": {"id": "[EXTRA]", "type_id": 1}})
    processor["special_tokens"]["[EXTRA]"] = {"id": "[EXTRA]", "ids": [99999], "tokens": ["[EXTRA]"]}
    path.write_text(json.dumps(tokenizer))
    return str(home / "model")


def pair_types(home: Path) -> str:
    """A template that gives both texts of a pair token type 0."""
    path = home / "model" / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    for piece in tokenizer["post_processor"]["pair"]:
        next(iter(piece.values()))["type_id"] = 0
    path.write_text(json.dumps(tokenizer))
    return str(home / "model")


def huge_weight(home: Path) -> str:
    import torch

    def huge(w):  # finite as stored (float64), infinite as the model's float32
        return w.to(torch.float64).index_fill(1, torch.tensor([0]), 1e300)

    return spoil_weight(home, "bert.embeddings.word_embeddings.weight", huge)


def tampered_shards(home: Path) -> str:
    import numpy as np

    from bertcli.data.encode import encode_corpus
    from bertcli.tokenizer import load_tokenizer

    encode_corpus(load_tokenizer(home / "tok"), [home / "corpus.txt"], home / "shards", show_progress=False)
    offsets = np.load(home / "shards" / "00000.sentences.npy")
    offsets[1], offsets[2] = offsets[2], offsets[1]
    np.save(home / "shards" / "00000.sentences.npy", offsets)
    return "shards"


def link(home: Path) -> str:
    (home / "m.json").symlink_to(home / "project" / "notes.txt")
    return str(home / "m.json")


def hard_lock(home: Path) -> str:
    (home / "model" / LOCK).unlink()
    os.link(home / "project" / "notes.txt", home / "model" / LOCK)
    return str(home / "model")


def odd_marker(home: Path) -> str:
    (home / "model" / MARKER).write_text('{"kind": ["run"]}')
    return str(home / "model")


def merge_bomb(home: Path) -> str:
    lines = ["a0: &a0 {k0: 1, k1: 2, k2: 3, k3: 4, k4: 5, k5: 6, k6: 7, k7: 8, k8: 9, k9: 10}"]
    lines += [f"a{i}: &a{i} {{<<: [{', '.join([f'*a{i - 1}'] * 10)}], x{i}: 1}}" for i in range(1, 10)]
    (home / "merge.yaml").write_text("\n".join(lines) + "\n")
    return str(home / "merge.yaml")


def link_in_run(home: Path) -> str:
    (home / "model" / "vocab.txt").unlink()
    (home / "model" / "vocab.txt").symlink_to(home / "corpus.txt")
    return str(home / "model")


def unmark(home: Path) -> str:
    (home / "model" / MARKER).unlink()
    return str(home / "model")


def deep_tokenizer_config(home: Path) -> str:
    (home / "model" / "tokenizer_config.json").write_text("[" * 100000 + "]" * 100000)
    return str(home / "model")


def bomb(home: Path) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    (home / "bomb.yaml").write_text("\n".join(lines) + "\n")
    return str(home / "bomb.yaml")


# name -> (argv given the user's folder, stdin, the message's pattern); each must exit 2 and leave the folder as it was
CASES = {
    # 1. --overwrite never deletes what bertcli did not write
    "overwrite a user's project": (lambda h: ["finetune", recipe(h), "--out", str(h / "project"), "--overwrite"], b"",
                                   r"project: --overwrite refused: the directory was not written by bertcli"),
    "out is model.init": (lambda h: ["finetune", recipe(h, init=str(h / "model")), "--out", str(h / "model"),
                                     "--overwrite"], b"", r"is the input model.init"),
    "out contains the data": (lambda h: ["finetune", recipe(h), "--out", str(h), "--overwrite"], b"",
                              r"contains the input (recipe|data.train)"),
    "out inside the tokenizer": (lambda h: ["finetune", recipe(h), "--out", str(h / "tok" / "run")], b"",
                                 r"lies inside the input tokenizer"),
    "out is the recipe's folder, through ..": (lambda h: ["finetune", recipe(h), "--out", f"{h}/project/..",
                                                          "--overwrite"], b"", r"contains the input"),
    "tokenize encode into the corpus's folder": (lambda h: ["tokenize", "encode", "--tokenizer", str(h / "tok"), "--corpus",
                                                            str(h / "corpus.txt"), "--out", str(h), "--overwrite"], b"",
                                                 r"contains the input --(corpus|tokenizer)"),
    "tokenize train over a user's folder": (lambda h: ["tokenize", "train", "--corpus", str(h / "corpus.txt"), "--out",
                                                       str(h / "project"), "--overwrite"], b"",
                                            r"--overwrite refused: the directory was not written by bertcli"),
    "tokenize encode over the tokenizer": (lambda h: ["tokenize", "encode", "--tokenizer", str(h / "tok"), "--corpus",
                                                      str(h / "corpus.txt"), "--out", str(h / "tok"), "--overwrite"], b"",
                                           r"is the input --tokenizer"),
    "out is a file": (lambda h: ["finetune", recipe(h), "--out", str(h / "train.tsv")], b"",
                      r"(exists and is not a directory|is the input data.train)"),
    "resume a user's folder": (lambda h: ["finetune", recipe(h), "--out", str(h / "project"), "--resume"], b"",
                               r"--resume refused: the directory was not written by bertcli"),
    # 2. no flag: nothing removed, not even what looks like bertcli's leftovers
    "leftover names in a user's folder": (lambda h: ["finetune", recipe(h), "--out", str(h / "project")], b"",
                                          r"project: already exists and is not empty"),
    # 5. impossible numbers
    "lr infinite": (lambda h: ["finetune", recipe(h), "--set", "train.lr=.inf"], b"", r"train.lr: expected a finite number"),
    "weight decay NaN": (lambda h: ["finetune", recipe(h), "--set", "train.weight_decay=.nan"], b"",
                         r"train.weight_decay: expected a finite number"),
    "max_grad_norm NaN": (lambda h: ["finetune", recipe(h), "--set", "train.max_grad_norm=.nan"], b"",
                          r"train.max_grad_norm: expected a finite number"),
    "epochs infinite": (lambda h: ["finetune", recipe(h), "--set", "train.epochs=.inf"], b"",
                        r"train.epochs: expected a finite number"),
    "seed of 10^26": (lambda h: ["finetune", recipe(h), "--set", f"train.seed={10**26}"], b"", r"train.seed: .* out of range"),
    "negative seed": (lambda h: ["finetune", recipe(h), "--set", "train.seed=-3"], b"", r"train.seed: must be in 0\.\."),
    "intermediate_size of 10^12": (lambda h: ["finetune", recipe(h), "--set", "model.intermediate_size=1000000000000"], b"",
                                   r"parameters needs [\d,.]+ GiB to train, more than this machine's"),
    "time budget of 1e400 seconds": (lambda h: ["finetune", recipe(h), "--set", "train.time_budget=1e400"], b"",
                                     r"train.time_budget: must be longer than 0 and finite"),
    "pretraining max_seq_len 3": (lambda h: ["pretrain", recipe(h, "pretrain", "corpus.txt"), "--set",
                                             "data.max_seq_len=3"], b"", r"data.max_seq_len: pretrain needs at least 8 tokens"),
    "layer_norm_eps NaN in a checkpoint": (lambda h: ["predict", spoil_config(h, layer_norm_eps=float("nan"))], b"good\n",
                                           r"config.json: layer_norm_eps must be greater than 0"),
    "dropout infinite in a checkpoint": (lambda h: ["predict", spoil_config(h, hidden_dropout_prob=float("inf"))], b"x\n",
                                         r"config.json: hidden_dropout_prob must be in \[0, 1\)"),
    "10^12 layers in a checkpoint": (lambda h: ["predict", spoil_config(h, num_hidden_layers=10**12)], b"x\n",
                                     r"parameters needs [\d,.]+ GiB to load"),
    "NaN weight in a checkpoint": (lambda h: ["predict", nan_weight(h)], b"x\n",
                                   r"weights hold NaN or infinite values: bert.encoder.layer.0.attention.self.query.weight"),
    "NaN weight as model.init": (lambda h: ["finetune", recipe(h, init=nan_weight(h))], b"",
                                 r"weights hold NaN or infinite values"),
    # 6. checked before step 1: no run directory appears
    "eval labels the model never saw": (lambda h: ["finetune", recipe(h, eval="odd.tsv")], b"",
                                        r"odd.tsv: line 3: label 'surprised' is not one"),
    # 9. bounded parsing and odd paths
    "YAML alias bomb": (lambda h: ["finetune", bomb(h)], b"", r"more than 100,000 values once aliases are expanded"),
    "20,000 nested brackets": (lambda h: ["finetune", recipe(h, extra="x: " + "[" * 20000 + "]" * 20000 + "\n")], b"",
                               r"nested more than 32 levels deep"),
    "20,000 nested brackets in --set": (lambda h: ["finetune", recipe(h), "--set", "train.lr=" + "[" * 20000], b"",
                                        r"train.lr: expected a number, got a string \('\[\[\[.*\(20,000 characters\)"),
    "a recipe over 1 MiB": (lambda h: ["finetune", recipe(h, extra="#" * (1 << 20) + "\n")], b"", r"too large for a recipe"),
    "data is /dev/zero": (lambda h: ["finetune", recipe(h), "--set", "data.train=/dev/zero"], b"",
                          r"/dev/zero: line 1: NUL byte"),
    "evaluate on /dev/zero": (lambda h: ["evaluate", str(h / "model"), "--data", "/dev/zero"], b"", r"/dev/zero: line 1: NUL"),
    "evaluate --out a directory": (lambda h: ["evaluate", str(h / "model"), "--data", str(h / "train.tsv"), "--out",
                                              str(h / "project")], b"", r"--out .*project: is a directory"),
    "evaluate --out in a missing folder": (lambda h: ["evaluate", str(h / "model"), "--data", str(h / "train.tsv"), "--out",
                                                      str(h / "nowhere" / "m.json")], b"", r"nowhere does not exist"),
    "evaluate --out over its data": (lambda h: ["evaluate", str(h / "model"), "--data", str(h / "train.tsv"), "--out",
                                                str(h / "train.tsv")], b"", r"is an input of this command"),
    "evaluate --report a file": (lambda h: ["evaluate", str(h / "model"), "--data", str(h / "train.tsv"), "--report",
                                            str(h / "train.tsv")], b"", r"--report .*: exists and is not a directory"),
    "an integer of 5,000 digits in --set": (lambda h: ["finetune", recipe(h), "--set", "train.max_steps=" + "9" * 5000],
                                            b"", r"train.max_steps: expected an integer, got a string"),
    "an integer of 5,000 digits in the recipe": (lambda h: ["finetune", recipe(h, extra="x: " + "9" * 5000 + "\n")], b"",
                                                 r"YAML refused: Exceeds the limit"),
    "one pipe as both train and eval data": (fifo_twice, b"", r"data: .*data.fifo: a pipe named twice"),
    "NER with max_seq_len 2": (lambda h: ["finetune", recipe(h, "ner", "ner.conll"), "--set", "data.max_seq_len=2"], b"",
                               r"data.max_seq_len: ner needs at least 4 tokens"),
    "a marked run's .saving holding a user's file, --resume": (lambda h: ["finetune", recipe(h), "--out", plant(
        h, ".saving/extra.json"), "--resume"], b"", r"--resume refused: it holds files bertcli did not write \(\.saving\)"),
    "a directory named like bertcli's file, --overwrite": (lambda h: ["finetune", recipe(h), "--out", plant(
        h, "metrics.json/mine.txt"), "--overwrite"], b"", r"--overwrite refused: .* did not write \(metrics.json\)"),
    "--report into a user's figures": (lambda h: ["evaluate", str(h / "model"), "--data", str(h / "train.tsv"),
                                                  "--report", str(h / "figures")], b"",
                                       r"--report refused: the directory was not written by bertcli .*; choose "
                                       r"another --report$"),
    "bertcli_task.max_seq_len NaN": (lambda h: ["predict", spoil_task(h, max_seq_len=float("nan"))], b"x\n",
                                     r"bertcli_task.max_seq_len must be in 4\.\.128 .*got NaN"),
    "bertcli_task.max_seq_len -5": (lambda h: ["predict", spoil_task(h, max_seq_len=-5)], b"x\n",
                                    r"bertcli_task.max_seq_len must be in 4\.\.128 .*got -5"),
    "bertcli_task.max_seq_len a string": (lambda h: ["predict", spoil_task(h, max_seq_len="abc")], b"x\n",
                                          r"bertcli_task.max_seq_len must be in 4\.\.128 .*got \"abc\""),
    "bertcli_task.text_column a number": (lambda h: ["predict", spoil_task(h, text_column=[1])], b"x\n",
                                          r"bertcli_task.text_column: expected a string or null, got a list"),
    "bertcli_task.name of no task": (lambda h: ["predict", spoil_task(h, name="translate")], b"x\n",
                                     r"bertcli_task.name 'translate' is not a task of this bertcli"),
    "bertcli_task.name of another head": (lambda h: ["predict", spoil_task(h, name="qa")], b"x\n",
                                          r"bertcli_task.name is 'qa', whose head is BertForQuestionAnswering"),
    "bertcli_task.max_seq_len past the positions": (lambda h: ["predict", spoil_task(h, max_seq_len=100000)], b"x\n",
                                                    r"bertcli_task.max_seq_len must be in 4\.\.128"),
    "architectures not a list": (lambda h: ["predict", spoil_config(h, architectures=5)], b"x\n",
                                 r"architectures must be a list of class names"),
    "token ids past vocab_size": (lambda h: ["predict", spoil_config(h, vocab_size=100)], b"x\n",
                                  r"token ids up to \d+ but config.json says vocab_size 100"),
    "a text pair for a model with one token type": (lambda h: ["predict", one_token_type(h)],
                                                    b'{"text": "good", "text_pair": "bad"}\n',
                                                    r"a text pair, but the model has 1 token type"),
    "QA from a model with one token type": (lambda h: ["finetune", recipe(h, "qa", squad(h, {
        "id": "q9", "question": "Who?", "answers": [{"text": "the doctor", "answer_start": 31}]}), init=one_token_type(h),
        seq=128)], b"", r"qa \(every input a pair of texts\) needs 2 token types"),
    "tokenizer_config.json nested 100,000 deep": (lambda h: ["predict", deep_tokenizer_config(h)], b"x\n",
                                                  r"tokenizer_config.json: not a valid JSON object"),
    "resume.pt with a text position": (lambda h: _resume_own(spoil_resume(h, ["abc", 0, 0, 0, 0.0])), b"",
                                       r"resume.pt: cannot resume from it"),
    "resume.pt with an infinite position": (lambda h: _resume_own(spoil_resume(h, [float("inf"), 0, 0, 0, 0.0])), b"",
                                            r"resume.pt: cannot resume from it"),
    "resume.pt with negative counts": (lambda h: _resume_own(spoil_resume(h, [-5, -3, -7, 0, 0.0])), b"",
                                       r"resume.pt: cannot resume from it"),
    "resume.pt with a NaN weight": (lambda h: _resume_own(spoil_resume(h, edit=_first_weight)), b"",
                                    r"resume.pt: cannot resume from it \(weight bert.embeddings.word_embeddings.weight "
                                    r"holds NaN or infinite values\)"),
    "resume.pt with an infinite Adam moment": (lambda h: _resume_own(spoil_resume(h, edit=_adam_moment)), b"",
                                               r"resume.pt: cannot resume from it \(optimizer state exp_avg of parameter"),
    "resume.pt with eps NaN": (lambda h: _resume_own(spoil_resume(h, edit=lambda s: s["optimizer"]["param_groups"][0]
                                                                  .__setitem__("eps", float("nan")))), b"",
                               r"resume.pt: cannot resume from it \(optimizer setting eps holds NaN"),
    "resume.pt with betas inf": (lambda h: _resume_own(spoil_resume(h, edit=lambda s: s["optimizer"]["param_groups"][0]
                                                                    .__setitem__("betas", (0.9, float("inf"))))), b"",
                                 r"resume.pt: cannot resume from it \(optimizer setting betas holds NaN"),
    "resume.pt with a window of text": (lambda h: _resume_own(spoil_resume(h, edit=lambda s: s.__setitem__(
        "window", ["x", 1]))), b"", r"resume.pt: cannot resume from it \(the log window"),
    "tokenize encode of one file twice": (lambda h: ["tokenize", "encode", "--tokenizer", str(h / "tok"), "--corpus",
                                                     str(h / "corpus.txt"), "--corpus",
                                                     str(h / "project" / ".." / "corpus.txt"),  # another name
                                                     "--out", str(h / "s")], b"",
                                         r"corpus.txt: the same file as .*corpus.txt, named before it"),
    "tokenize train of a file and a link to it": (lambda h: ["tokenize", "train", "--corpus", str(h / "corpus.txt"),
                                                             "--corpus", linked(h, "corpus.txt"), "--out", str(h / "t")],
                                                 b"", r"the same file as .*corpus.txt, named before it"),
    "a recipe training on one file twice": (lambda h: ["finetune", recipe(h), "--set",
                                                       f"data.train=[{h / 'train.tsv'},{linked(h, 'train.tsv')}]"],
                                            b"",
                                            r"data: .*train.tsv: the same file as"),
    "tokenize train on /dev/zero": (lambda h: ["tokenize", "train", "--corpus", "/dev/zero", "--out", str(h / "t")], b"",
                                    r"/dev/zero: NUL byte"),
    "tokenize train with --min-frequency -1": (lambda h: ["tokenize", "train", "--corpus", str(h / "corpus.txt"), "--out",
                                                          str(h / "t"), "--min-frequency", "-1"], b"", r"min-frequency"),
    "tokenize train with --vocab-size 5e9": (lambda h: ["tokenize", "train", "--corpus", str(h / "corpus.txt"), "--out",
                                                        str(h / "t"), "--vocab-size", "5000000000"], b"", r"vocab-size"),
    "YAML merge-key bomb": (lambda h: ["finetune", merge_bomb(h)], b"", r"once merge keys \(<<\) are expanded"),
    "a link named like bertcli's file, --overwrite": (lambda h: ["finetune", recipe(h), "--out", link_in_run(h),
                                                                 "--overwrite"], b"", r"did not write \(vocab.txt\)"),
    "an old unmarked run, --overwrite": (lambda h: ["finetune", recipe(h), "--out", unmark(h), "--overwrite"], b"",
                                         r"--overwrite refused: the directory was not written by bertcli"),
    "evaluate --out inside the model, two levels down": (lambda h: ["evaluate", str(h / "model"), "--data", str(
        h / "train.tsv"), "--out", plant(h, "sub/notes.txt") + "/sub/m.json"], b"", r"lies inside the model directory"),
    "evaluate --out over a user's file": (lambda h: ["evaluate", str(h / "model"), "--data", str(h / "train.tsv"),
                                                     "--out", str(h / "project" / "notes.txt")], b"",
                                          r"exists and is not an earlier `bertcli evaluate --out`, so it is kept"),
    "evaluate --out over a link": (lambda h: ["evaluate", str(h / "model"), "--data", str(h / "train.tsv"), "--out",
                                              link(h)], b"", r"is a link or a special file"),
    "a hard link as the lock": (lambda h: _resume_own(hard_lock(h)), b"",
                                r"is not bertcli's lock file .*: a hard link"),
    "a marker whose kind is a list": (lambda h: ["finetune", recipe(h), "--out", odd_marker(h), "--overwrite"], b"",
                                      r"--overwrite refused: the directory was not written by bertcli"),
    "a template [CLS] id past vocab_size": (lambda h: ["predict", template_id(h)], b"x\n",  # not the vocabulary's [CLS]
                                             r"tokenizer.json: its post-processor does not wrap texts as BERT's does"),
    "a template token id past vocab_size": (lambda h: ["predict", template_extra_id(h)], b"x\n",
                                            r"the tokenizer has token ids up to 99999"),
    "a template that gives a pair one token type": (lambda h: ["predict", pair_types(h)], b"x\n",
                                                    r"the tokenizer gives a text pair the token types \[0, 0"),
    "float64 weights past the float32 range": (lambda h: ["evaluate", huge_weight(h), "--data", str(h / "train.tsv")],
                                               b"", r"weights hold NaN or infinite values"),
    "predict reading /dev/zero": (lambda h: ["predict", str(h / "model"), "--input", "/dev/zero"], b"",
                                  r"/dev/zero: [\d,]+ bytes without a line break and with NUL bytes"),
    "shards with offsets out of order": (lambda h: ["pretrain", recipe(h, "pretrain", tampered_shards(h))], b"",
                                         r"damaged shard \(sentences offsets do not run in order"),
    # 10. QA data that would mis-train silently
    "negative answer_start": (lambda h: ["finetune", recipe(h, "qa", squad(h, {"id": "q7", "question": "Who?", "answers": [
        {"text": "the doctor", "answer_start": -5}]}), seq=128)], b"", r"q.json: .*\(id q7\): 'answer_start' must be .* got -5"),
    "is_impossible as a string": (lambda h: ["finetune", recipe(h, "qa", squad(h, {"id": "q8", "question": "Who?",
                                                                                  "is_impossible": "false", "answers": [
            {"text": "the doctor", "answer_start": 31}]}), seq=128)], b"", r"\(id q8\): 'is_impossible' must be true or false"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_case_is_exit_2_and_leaves_every_file(case, home, monkeypatch, capsys):
    (home / "odd.tsv").write_text("sentence\tlabel\nfine\tpos\nodd\tsurprised\n")
    (home / "ner.conll").write_text("John\tB-PER\nlives\tO\nhere\tO\n\nMary\tB-PER\nleft\tO\n")
    (home / "figures").mkdir()
    (home / "figures" / "loss.png").write_text("my own figure")
    setup, stdin, expected = CASES[case]
    argv = setup(home)
    before = tree(home)
    code, out, err = in_process(argv, monkeypatch, capsys, stdin)
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    for line in out.splitlines():  # predict: every answer is JSON (never NaN)
        json.loads(line)
    if expected is not None:
        assert re.search(expected, err), err[-2000:]
    assert tree(home) == before, "a file the user had changed, or a file appeared"
    assert not (home / "out").exists()


def test_overwrite_removes_only_a_marked_run_of_bertcli_files(home, monkeypatch, capsys):
    r = recipe(home)
    assert in_process(["finetune", r], monkeypatch, capsys)[0] == 0
    run = home / "out"
    assert (run / MARKER).is_file() and (run / "model.safetensors").is_file()
    (run / "my-notes.txt").write_text("mine")
    before = tree(home)
    code, _, err = in_process(["finetune", r, "--overwrite"], monkeypatch, capsys)
    assert code == 2 and "it holds files bertcli did not write (my-notes.txt)" in err
    assert tree(home) == before
    (run / "my-notes.txt").unlink()
    (run / ".saving").mkdir()
    (run / ".saving" / "config.json").write_text("{}")  # named as bertcli names a staged checkpoint, but the user's
    (run / ".model.safetensors.original.tmp").write_text("mine")  # and as it names an atomic write's file
    before = tree(home)
    code, _, err = in_process(["finetune", r, "--overwrite"], monkeypatch, capsys)
    assert code == 2 and "it holds files bertcli did not write (.model.safetensors.original.tmp, .saving)" in err
    assert tree(home) == before
    shutil.rmtree(run / ".saving")
    (run / ".model.safetensors.original.tmp").unlink()

    class Killed(BaseException):
        pass

    def killed(*args, **kwargs):
        raise Killed  # as SIGKILL would, with the checkpoint staged and not yet published

    import bertcli.train as train

    monkeypatch.setattr(train, "publish", killed)
    with pytest.raises(Killed):
        in_process(["finetune", r, "--resume", "--set", "train.max_steps=9"], monkeypatch, capsys)
    monkeypatch.undo()  # (in_process sets sys.argv and sys.stdin again)
    assert (run / ".saving" / "model.safetensors").is_file()  # a killed run's staged checkpoint: bertcli's own
    old_log = (run / "log.jsonl").read_text()
    code, _, err = in_process(["finetune", r, "--overwrite", "--set", "train.max_steps=3"], monkeypatch, capsys)
    assert code == 0, err
    assert not (run / ".saving").exists() and (run / "log.jsonl").read_text() != old_log
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_overwrite_through_a_symlinked_run(home, monkeypatch, capsys):
    r = recipe(home)
    assert in_process(["finetune", r], monkeypatch, capsys)[0] == 0
    (home / "link").symlink_to(home / "out")
    code, _, err = in_process(["finetune", r, "--out", str(home / "link"), "--overwrite"], monkeypatch, capsys)
    assert code == 0, err
    assert (home / "link").is_symlink() and (home / "out" / "model.safetensors").is_file()


def test_training_never_saves_non_finite_weights(home, monkeypatch, capsys):
    """A step that leaves NaN in the weights with a finite loss (the loss check cannot see it) must
    not reach a checkpoint: exit 2, nothing saved."""
    import torch

    import bertcli.train as train

    make = train.make_optimizer

    def poisoned(model, cfg):
        optimizer = make(model, cfg)
        step = optimizer.step

        def step_then_poison(*args, **kwargs):
            result = step(*args, **kwargs)
            with torch.no_grad():
                model.classifier.bias.fill_(float("nan"))
            return result

        optimizer.step = step_then_poison
        return optimizer

    monkeypatch.setattr(train, "make_optimizer", poisoned)
    code, _, err = in_process(["finetune", recipe(home), "--set", "train.max_steps=1"], monkeypatch, capsys)
    assert code == 2 and "classifier.bias holds NaN or infinite values at step 1" in err, err
    assert not (home / "out" / "model.safetensors").exists() and not (home / "out" / "resume.pt").exists()


def test_predict_never_prints_nan_and_json_writers_write_null(home, monkeypatch, capsys):
    from bertcli.fileio import finite_json
    from bertcli.tasks.classify import ClassifyTask

    assert finite_json({"loss": float("nan"), "x": [float("inf"), 1.5]}) == '{"loss": null, "x": [null, 1.5]}'
    real = ClassifyTask.predict

    def overflow(self, model, examples, batch_size):
        answers = real(self, model, examples, batch_size)
        answers[0]["score"] = float("nan")
        return answers

    monkeypatch.setattr(ClassifyTask, "predict", overflow)
    code, out, err = in_process(["predict", str(home / "model")], monkeypatch, capsys, b"good\nbad\n")
    answers = [json.loads(line) for line in out.splitlines()]
    assert code == 2 and "not a finite number" in answers[0]["error"] and answers[1]["label"]


def test_an_evaluation_that_overflows_during_training_is_skipped_and_the_run_goes_on(home, monkeypatch, capsys):
    """A model whose outputs overflow at an evaluation (bf16 or fp16) is not scored; the run is not lost."""
    from bertcli.errors import NonFinite
    from bertcli.tasks.classify import ClassifyTask

    def overflowing(self, model, examples, batch_size):
        raise NonFinite("the model gave outputs that are not finite numbers")

    monkeypatch.setattr(ClassifyTask, "evaluate", overflowing)
    code, _, err = in_process(["finetune", recipe(home, eval="train.tsv"), "--set", "train.eval_every=1"], monkeypatch,
                              capsys)
    assert code == 0 and "step 1: evaluation skipped: the model gave outputs that are not finite" in err, err
    assert (home / "out" / "model.safetensors").is_file()
    records = [json.loads(line) for line in (home / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2] and not [k for r in records for k in r if "eval_" in k]


def test_a_sequence_classifier_saved_without_label_names_has_transformers_names(home, monkeypatch, capsys):
    """transformers 5 writes no id2label for its default two labels, and names them LABEL_0 and LABEL_1."""
    path = home / "model" / "config.json"
    config = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("id2label", "label2id", "bertcli_task")}
    path.write_text(json.dumps(config))
    code, out, err = in_process(["predict", str(home / "model")], monkeypatch, capsys, b"good\n")
    assert code == 0 and set(json.loads(out)["scores"]) == {"LABEL_0", "LABEL_1"}, out + err
    path.write_text(json.dumps({**config, "num_labels": 3}))  # a head of 2 outputs said to have 3
    code, out, err = in_process(["predict", str(home / "model")], monkeypatch, capsys, b"good\n")
    assert code == 2 and "weights disagree with config.json" in err, err


def test_a_model_whose_outputs_overflow_is_answered_line_by_line_with_errors(home, monkeypatch, capsys):
    """Its weights are finite, so it loads; predict answers each line with an error, never a NaN score."""
    code, out, err = in_process(["predict", str(overflow(home / "model")), "--precision", "fp32"], monkeypatch, capsys,
                                b"good\nbad\n")
    answers = [json.loads(line) for line in out.splitlines()]
    assert code == 2 and len(answers) == 2 and all("not a finite number" in a["error"] for a in answers), out + err


@pytest.mark.slow
def test_package_paths_never_import(tmp_path, tiny_tokenizer_dir):
    """A package on sys.path that writes a marker when imported: no marker after any command that
    reads a package: path (the working directory is on sys.path under `python -m`)."""
    evil = tmp_path / "evilpkg"
    (evil / "sub" / "tok").mkdir(parents=True)
    marker = tmp_path / "IMPORTED"
    for init in (evil / "__init__.py", evil / "sub" / "__init__.py"):
        init.write_text(f"open({str(marker)!r}, 'a').write({str(init)!r} + '\\n')\n")
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_tokenizer_dir / name, evil / "sub" / "tok" / name)
    (tmp_path / "train.tsv").write_text(ROWS)
    (tmp_path / "corpus.txt").write_text("The fox jumps. The dog sleeps.\n\nA second document here.\n" * 5)
    base = {"model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64, "max_position": 64}}
    for number, (task, data, tokenizer) in enumerate([
            ("classify", "train.tsv", "package:evilpkg.sub/tok"), ("classify", "train.tsv", "package:evilpkg/sub/tok"),
            ("pretrain", "corpus.txt", "package:evilpkg.sub/tok")]):
        r = tmp_path / f"r{number}.yaml"
        r.write_text(json.dumps({"task": {"name": task}, "tokenizer": tokenizer, **base,
                                 "data": {"train": str(tmp_path / data), "max_seq_len": 32},
                                 "train": {"max_steps": 1, "batch_size": 4, "precision": "fp32"}}))
        done = run_cli("pretrain" if task == "pretrain" else "finetune", str(r), "--out", str(tmp_path / f"out{number}"),
                       cwd=tmp_path)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        assert not marker.exists(), marker.read_text()
    done = run_cli("finetune", str(r), "--set", "tokenizer=package:evilpkg.nothere/tok", "--out", str(tmp_path / "x"),
                   cwd=tmp_path)
    assert done.returncode == 2 and b"no folder nothere in evilpkg" in done.stderr and not marker.exists()


# bertcli ARGS, started once the file GO_FILE exists: two commands start together whatever their imports cost
AT_ONCE = """
import os, sys, time
import torch
from bertcli.cli import main
print("ready", flush=True)
while not os.path.exists(os.environ["GO_FILE"]):
    time.sleep(0.01)
sys.argv = ["bertcli", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_two_runs_into_one_out_one_refused_the_other_resumes(tmp_path, tiny_tokenizer_dir, cli):
    (tmp_path / "train.tsv").write_text(rows(8))
    r = write_recipe(tmp_path / "r.yaml", {"name": "classify"}, {"train": str(tmp_path / "train.tsv"), "max_seq_len": 16},
                     {"max_steps": 150, "batch_size": 4, "save_every": 50}, tokenizer=tiny_tokenizer_dir)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    go = tmp_path / "go"
    cmd = [sys.executable, "-c", AT_ONCE, "finetune", str(r), "--out", str(out)]
    procs = [subprocess.Popen(cmd, env={**env, "GO_FILE": str(go)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    assert [p.stdout.readline() for p in procs] == [b"ready\n"] * 2  # both imported: neither is still starting
    go.touch()
    results = [(p.returncode, err.decode()) for p in procs for _, err in [p.communicate(timeout=300)]]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    winner = next(p for p, (code, _) in zip(procs, results) if code == 0)
    assert "Traceback" not in loser
    assert f"another bertcli process (pid {winner.pid}) is writing" in loser, loser
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in records if "loss" in x] == list(range(1, 151))  # one run's log, not two interleaved
    done = cli("finetune", str(r), "--out", str(out), "--resume", "--set", "train.max_steps=155")
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    done = cli("predict", str(out), stdin=b"i loved it\n")
    assert done.returncode == 0 and json.loads(done.stdout)["label"] in ("pos", "neg")


@pytest.mark.slow
def test_a_held_lock_is_refused_at_once_and_a_killed_holder_leaves_none(tmp_path, tiny_tokenizer_dir, cli):
    import fcntl

    (tmp_path / "train.tsv").write_text(ROWS)
    r = write_recipe(tmp_path / "r.yaml", {"name": "classify"}, {"train": str(tmp_path / "train.tsv"), "max_seq_len": 16},
                     {"max_steps": 2, "batch_size": 4}, tokenizer=tiny_tokenizer_dir)
    out = tmp_path / "run"
    assert cli("finetune", str(r), "--out", str(out)).returncode == 0
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(out / LOCK)!r}, os.O_RDWR)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "os.pwrite(fd, b'4242\\n', 0)\nprint('locked', flush=True)\ntime.sleep(120)"],
                              stdout=subprocess.PIPE)
    assert holder.stdout.readline() == b"locked\n"
    done = cli("finetune", str(r), "--out", str(out), "--resume", "--set", "train.max_steps=4")
    assert done.returncode == 2 and b"another bertcli process (pid 4242) is writing" in done.stderr
    holder.kill()
    holder.wait()
    fd = os.open(out / LOCK, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the kernel released it with the process
    os.close(fd)
    done = cli("finetune", str(r), "--out", str(out), "--resume", "--set", "train.max_steps=4")
    assert done.returncode == 0, done.stderr.decode()[-2000:]


@pytest.mark.slow
def test_sigterm_saves_a_resumable_checkpoint(tmp_path, tiny_tokenizer_dir, monkeypatch, capsys):
    (tmp_path / "train.tsv").write_text(rows(8))
    r = write_recipe(tmp_path / "r.yaml", {"name": "classify"}, {"train": str(tmp_path / "train.tsv"), "max_seq_len": 16},
                     {"max_steps": 100000, "batch_size": 4}, tokenizer=tiny_tokenizer_dir)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "bertcli", "finetune", str(r), "--out", str(out)],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "log.jsonl").is_file() and (out / "log.jsonl").stat().st_size > 200):
        time.sleep(0.05)
    assert proc.poll() is None and (out / "log.jsonl").is_file(), "training never started"
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 143 and "SIGTERM at step" in err and "--resume" in err, err[-2000:]
    step = int(re.search(r"SIGTERM at step (\d+)", err).group(1))
    assert (out / "resume.pt").is_file() and (out / "model.safetensors").is_file()
    saved = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".bertcli.lock"}
    for changed in ("train.lr=0.5", f"data.train={tmp_path / 'r.yaml'}", "model.dropout=0.3"):  # another run's
        code, _, err = in_process(["finetune", str(r), "--out", str(out), "--resume", "--set", changed], monkeypatch,
                                  capsys)
        assert code == 2 and "was run with another recipe" in err, err[-2000:]
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".bertcli.lock"} == saved
    code, _, err = in_process(["finetune", str(r), "--out", str(out), "--resume", "--set", f"train.max_steps={step + 3}"],
                              monkeypatch, capsys)
    assert code == 0, err[-2000:]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in records if "loss" in x] == list(range(1, step + 4))


def _predict(model: Path, **options) -> subprocess.Popen:
    """predict in a pipe, with Ctrl-C's default action: a shell starts a background job (`pytest &`) with SIGINT
    ignored, which its children inherit, and a process that starts with SIGINT ignored keeps ignoring it."""
    return subprocess.Popen([sys.executable, "-m", "bertcli", "predict", str(model)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **options)


@pytest.mark.slow
def test_predict_ends_cleanly_however_its_pipes_end(model, tmp_path):
    # the reader goes away while stdin is still open: exit 0, no interpreter abort
    proc = _predict(model)
    proc.stdin.write(b"good film\n" * 300)
    proc.stdin.flush()
    assert json.loads(proc.stdout.readline())["label"]
    proc.stdout.close()
    try:
        for _ in range(50):
            proc.stdin.write(b"good film\n" * 300)
            proc.stdin.flush()
            time.sleep(0.02)
    except BrokenPipeError:
        pass
    err = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 0 and "Fatal Python error" not in err and "Traceback" not in err, err
    # Ctrl-C while stdin is open: 130, no abort
    proc = _predict(model)
    proc.stdin.write(b"good film\n")
    proc.stdin.flush()
    assert json.loads(proc.stdout.readline())["label"]
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 130 and "Fatal Python error" not in err and "Traceback" not in err, err
    # a whole file, read by `| head -1`: exit 0 with nothing on stderr but the engine's name
    big = tmp_path / "big.txt"
    big.write_text("a good film\n" * 20000)
    done = subprocess.run(f"{sys.executable} -m bertcli predict {model} < {big} | head -1; exit ${{PIPESTATUS[0]}}",
                          shell=True, executable="/bin/bash", capture_output=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 1, done.stderr
    said = done.stderr.decode().splitlines()
    assert len(said) == 1 and re.fullmatch(r"predict: engine torch \((bf16|fp32) on cpu, PyTorch .*\)", said[0]), said
    # closed stdin: one message, exit 2
    done = subprocess.run(f"{sys.executable} -m bertcli predict {model} <&-", shell=True, executable="/bin/bash",
                          capture_output=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and b"stdin is closed" in done.stderr and b"Traceback" not in done.stderr
    # a bad line mid-stream with stdin still open: the other lines answered, exit 2 with the count
    proc = _predict(model)
    proc.stdin.write(b"fine\nbad \xff\nok\n")
    proc.stdin.flush()
    lines = [json.loads(proc.stdout.readline()) for _ in range(3)]
    proc.stdin.close()
    proc.wait(timeout=60)
    err = proc.stderr.read().decode()
    assert "error" in lines[1] and lines[0]["label"] and lines[2]["label"]
    assert proc.returncode == 2 and "1 of 3 input line(s)" in err and "Fatal Python error" not in err


def _fifo(path: Path, data: bytes) -> threading.Thread:
    os.mkfifo(path)

    def feed() -> None:
        with open(path, "wb") as f:
            f.write(data)

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    return thread


def test_fifos_are_read_once_as_streams(home, monkeypatch, capsys):
    feeder = _fifo(home / "train.fifo", ROWS.encode())
    code, _, err = in_process(["finetune", recipe(home), "--set", f"data.train={home / 'train.fifo'}"], monkeypatch, capsys)
    feeder.join()
    assert code == 0, err
    feeder = _fifo(home / "in.fifo", b"i loved it\ni hated it\n")
    code, out, err = in_process(["predict", str(home / "out"), "--input", str(home / "in.fifo")], monkeypatch, capsys)
    feeder.join()
    assert code == 0 and len(out.splitlines()) == 2, err
    feeder = _fifo(home / "dev.fifo", ROWS.encode())
    code, out, err = in_process(["evaluate", str(home / "out"), "--data", str(home / "dev.fifo")], monkeypatch, capsys)
    feeder.join()
    assert code == 0 and "accuracy" in out, err
    feeder = _fifo(home / "corpus.fifo", (home / "corpus.txt").read_bytes())
    code, _, err = in_process(["pretrain", recipe(home, "pretrain", "corpus.fifo", name="p.yaml"), "--out",
                               str(home / "pre")], monkeypatch, capsys)
    feeder.join()
    assert code == 0, err


@pytest.mark.slow
def test_files_honour_the_umask_and_lines_split_on_newline_only(tmp_path, tiny_tokenizer_dir, cli):
    sep = "\u2028"
    rows = f"sentence\tlabel\nthe film{sep}is wonderful\tpos\nboring\x1cplot\tneg\ni loved it\tpos\ni hated it\tneg\n"
    (tmp_path / "train.tsv").write_text(rows, encoding="utf-8")
    r = write_recipe(tmp_path / "r.yaml", {"name": "classify"}, {"train": str(tmp_path / "train.tsv"), "max_seq_len": 16},
                     {"max_steps": 1, "batch_size": 4}, tokenizer=tiny_tokenizer_dir)
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "bertcli", "finetune", str(r), "--out", str(out)], capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, preexec_fn=lambda: os.umask(0o027), timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert b"data: 4 training examples" in done.stderr  # not 6: the separators stayed inside their cells
    for p in out.iterdir():
        assert p.stat().st_mode & 0o777 == 0o640, p
    done = cli("predict", str(out), stdin=f"one{sep}line\nsecond\x85line\n".encode())
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 2
    done = cli("tokenize", "show", "--tokenizer", str(out), stdin=f"one{sep}line\n".encode())
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 1


def test_resume_keeps_what_only_looks_like_leftovers_and_skips_foreign_log_lines(home, monkeypatch, capsys):
    r = recipe(home)
    assert in_process(["finetune", r], monkeypatch, capsys)[0] == 0
    run = home / "out"
    (run / ".notes.abcdefgh.tmp").write_text("mine")  # the pattern of a temporary file, of no name bertcli writes
    (run / ".config.json.zyxwvuts.tmp").write_text("mine too")  # named as bertcli's, but no bertcli noted making it
    (run / ".config.json.abcdefgh.tmp").write_text("a real leftover")  # a killed atomic write of config.json, which
    (run / LOCK).write_text(f"4242\n{'.config.json.abcdefgh.tmp'}\n")  # noted it in the lock file as it made it
    with open(run / "log.jsonl", "a") as log:
        log.write('{"step": "abc"}\nnull\n[1]\n5\n{"loss": 1}\n')
    code, _, err = in_process(["finetune", r, "--resume", "--set", "train.max_steps=4"], monkeypatch, capsys)
    assert code == 0, err
    assert (run / ".notes.abcdefgh.tmp").read_text() == "mine" and not (run / ".config.json.abcdefgh.tmp").exists()
    assert (run / ".config.json.zyxwvuts.tmp").read_text() == "mine too"
    code, _, err = in_process(["finetune", r, "--overwrite"], monkeypatch, capsys)  # refused, and says why
    assert code == 2 and ".config.json.zyxwvuts.tmp: named as what a bertcli killed while writing leaves" in err, err
    (run / ".config.json.zyxwvuts.tmp").unlink()
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in records if "loss" in x] == [1, 2, 3, 4]
    with open(run / "log.jsonl", "a") as log:  # and the report passes over such lines
        log.write('{"step": "abc"}\nnull\n5\n"loss"\n{"eval_x": 1}\n{"step": 9, "loss": "high"}\n')
    code, _, err = in_process(["evaluate", str(run), "--data", str(home / "train.tsv"), "--report",
                               str(home / "figures")], monkeypatch, capsys)
    assert code == 0 and (home / "figures" / "loss.png").stat().st_size > 1000, err
    code, _, err = in_process(["evaluate", str(run), "--data", str(home / "train.tsv"), "--report",
                               str(home / "figures"), "--out", str(home / "m.json")], monkeypatch, capsys)
    assert code == 0, err  # a report directory of bertcli's own is rewritten
    code, _, err = in_process(["evaluate", str(run), "--data", str(home / "train.tsv"), "--out", str(home / "m.json")],
                              monkeypatch, capsys)
    assert code == 0 and json.loads((home / "m.json").read_text())["task"] == "classify", err  # and its own --out
    ours = json.loads((home / "m.json").read_text())
    edited = json.dumps({**ours, "accuracy": 0.99})  # bertcli's, but changed since: its seal no longer fits
    for mine in ('{"task": "my notes", "data": "x", "precision": 0.9}', edited):  # alike in keys, but the user's
        (home / "m.json").write_text(mine)
        code, _, err = in_process(["evaluate", str(run), "--data", str(home / "train.tsv"), "--out", str(home / "m.json")],
                                  monkeypatch, capsys)
        assert code == 2 and "is not an earlier `bertcli evaluate --out`" in err and (home / "m.json").read_text() == mine
    del ours["bertcli_sha256"]  # as bertcli wrote it before the seal: replaced
    (home / "m.json").write_text(json.dumps(ours))
    code, _, err = in_process(["evaluate", str(run), "--data", str(home / "train.tsv"), "--out", str(home / "m.json")],
                              monkeypatch, capsys)
    assert code == 0 and "bertcli_sha256" in json.loads((home / "m.json").read_text()), err


def test_a_second_signal_never_splits_a_step_and_resume_ends_as_an_uninterrupted_run(home, monkeypatch, capsys):
    """Ctrl-C twice (or SIGINT then SIGTERM) stops at once, but never between a step's update and its count,
    which the checkpoint must find agreeing; a mid-run evaluation it stops is redone by --resume."""
    import torch

    from bertcli.tasks.classify import ClassifyTask

    def log(run):
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
                for line in (run / "log.jsonl").read_text().splitlines()]

    r = recipe(home, eval="train.tsv")
    sets = ["--set", "train.max_steps=6", "--set", "train.eval_every=2", "--set", "train.save_every=2",
            "--set", "train.log_every=4"]  # stopped at step 3, the line of step 4 averages steps 2 to 4 all the same
    code, _, err = in_process(["finetune", r, "--out", str(home / "ref"), *sets], monkeypatch, capsys)
    assert code == 0, err

    def twice():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)

    real_update, real_evaluate, calls = torch.amp.GradScaler.step, ClassifyTask.evaluate, []

    def update_then_signals(self, optimizer, *args, **kwargs):  # the weights are step 3's, the count still 2
        result = real_update(self, optimizer, *args, **kwargs)
        calls.append("update")
        if calls.count("update") == 3:
            twice()
        return result

    def update_then_three_signals(self, optimizer, *args, **kwargs):  # a step that would not end: nothing saved
        result = real_update(self, optimizer, *args, **kwargs)
        calls.append("three")
        if calls.count("three") == 3:
            twice()
            os.kill(os.getpid(), signal.SIGINT)
        return result

    def signals_in_evaluation(self, model, examples, batch_size):
        twice()  # in step 2's evaluation
        return real_evaluate(self, model, examples, batch_size)

    for name, target, attribute, patch, stopped in (
            ("update", torch.amp.GradScaler, "step", update_then_signals, 3),
            ("evaluation", ClassifyTask, "evaluate", signals_in_evaluation, 2),
            ("three", torch.amp.GradScaler, "step", update_then_three_signals, None)):
        run = home / name
        with monkeypatch.context() as patched:
            patched.setattr(target, attribute, patch)
            code, _, err = in_process(["finetune", r, "--out", str(run), *sets], monkeypatch, capsys)
        said = f"SIGINT at step {stopped}: saved to" if stopped else \
            f"SIGINT: a third signal, so stopped at once in step 3, with nothing saved; {run} keeps the last checkpoint"
        assert code == 130 and said in err, err
        code, _, err = in_process(["finetune", r, "--out", str(run), "--resume", *sets], monkeypatch, capsys)
        assert code == 0, err
        assert log(run) == log(home / "ref"), name
        assert json.loads((run / "metrics.json").read_text()) == json.loads((home / "ref" / "metrics.json").read_text())


def test_a_signal_during_the_final_evaluation_stops_it_with_the_run_saved(home, monkeypatch, capsys):
    from bertcli.tasks.classify import ClassifyTask

    real = ClassifyTask.evaluate

    def interrupted(self, model, examples, batch_size):
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would, while the last evaluation runs
        return real(self, model, examples, batch_size)

    monkeypatch.setattr(ClassifyTask, "evaluate", interrupted)
    r = recipe(home, eval="train.tsv")
    code, _, err = in_process(["finetune", r, "--set", "train.max_steps=3"], monkeypatch, capsys)
    assert code == 143 and "SIGTERM at step 3: saved to" in err and "evaluate it with --resume" in err, err
    assert (home / "out" / "resume.pt").is_file() and (home / "out" / "model.safetensors").is_file()
    monkeypatch.setattr(ClassifyTask, "evaluate", real)
    code, _, err = in_process(["finetune", r, "--resume", "--set", "train.max_steps=3"], monkeypatch, capsys)
    assert code == 0, err
    assert "eval_accuracy" in json.loads((home / "out" / "metrics.json").read_text())
    records = [json.loads(line) for line in (home / "out" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in records if "loss" in x] == [1, 2, 3]
    assert [x["step"] for x in records if "eval_accuracy" in x] == [3]


def test_labels_that_look_like_numbers(home, monkeypatch, capsys):
    rows = "sentence\tlabel\n" + "good\t--1\nbad\t1\nfine\t²\n" * 3
    (home / "odd-labels.tsv").write_text(rows)
    code, _, err = in_process(["finetune", recipe(home, train="odd-labels.tsv")], monkeypatch, capsys)
    assert code == 0, err
    assert json.loads((home / "out" / "config.json").read_text())["id2label"] == {"0": "--1", "1": "1", "2": "²"}


def test_conll_columns_split_on_ascii_spaces_only(tmp_path):
    from bertcli.data.conll import read_ner

    path = tmp_path / "x.conll"
    path.write_text("John\tB-PER\nSmi\u00a0th\tI-PER\nvisited\u2028it O\n")
    sentence, = read_ner(path)
    assert sentence.words == ("John", "Smi\u00a0th", "visited\u2028it") and sentence.tags == ("B-PER", "I-PER", "O")


def test_evaluate_with_stdout_closed_needs_out(model, tmp_path, cli, monkeypatch):
    """`>&-`: the scores would go nowhere, after the whole model had run. Refused at once, unless --out keeps them."""
    from bertcli import cli as entry
    from bertcli.streams import Closed

    monkeypatch.setattr(entry, "guard", lambda: Closed(stdout=True))  # as main finds the streams of `... >&-`
    (tmp_path / "dev.tsv").write_text(ROWS, encoding="utf-8")
    done = cli("evaluate", str(model), "--data", str(tmp_path / "dev.tsv"))
    assert done.returncode == 2 and done.stderr.decode() == (
        "error: stdout is closed: `bertcli evaluate` writes its results there; redirect it to a file or give --out "
        "FILE\n")
    done = cli("evaluate", str(model), "--data", str(tmp_path / "dev.tsv"), "--out", str(tmp_path / "m.json"))
    assert done.returncode == 0 and "accuracy" in json.loads((tmp_path / "m.json").read_text())


@pytest.mark.slow
def test_closed_and_broken_standard_streams(model, tmp_path, tiny_tokenizer_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def shell(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, shell=True, executable="/bin/bash", capture_output=True, timeout=300, env=env)

    py = f"{sys.executable} -m bertcli"
    done = shell(f"echo hi | {py} predict {model} >&-")
    assert done.returncode == 2 and b"stdout is closed" in done.stderr
    done = shell(f"printf 'ok\\n\\xff\\n' | {py} predict {model} 2>&-")
    assert done.returncode == 2 and len(done.stdout.splitlines()) == 2
    (tmp_path / "train.tsv").write_text(ROWS)
    r = write_recipe(tmp_path / "r.yaml", {"name": "classify"}, {"train": str(tmp_path / "train.tsv"), "max_seq_len": 16},
                     {"max_steps": 30, "batch_size": 4, "log_every": 1}, tokenizer=tiny_tokenizer_dir)
    done = shell(f"{py} finetune {r} --out {tmp_path / 'quiet'} 2>&-")
    assert done.returncode == 0 and (tmp_path / "quiet" / "model.safetensors").is_file()
    # the reader of the messages goes away: the run trains on, and ends with its checkpoint
    done = shell(f"{py} finetune {r} --out {tmp_path / 'piped'} 2>&1 | head -1; exit ${{PIPESTATUS[0]}}")
    assert done.returncode == 0 and (tmp_path / "piped" / "resume.pt").is_file()
    records = [json.loads(line) for line in (tmp_path / "piped" / "log.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 30
    if Path("/dev/full").exists():  # messages to a file on a full disk (a scheduler's log): the run goes on too
        done = shell(f"{py} finetune {r} --out {tmp_path / 'full'} 2>/dev/full")
        assert done.returncode == 0 and (tmp_path / "full" / "model.safetensors").is_file()
        assert shell(f"{py} finetune {tmp_path / 'none.yaml'} 2>/dev/full").returncode == 2
    done = shell(f"{py} evaluate {model} --data {tmp_path / 'train.tsv'} --out {tmp_path / 'm.json'} "
                 f"--report {tmp_path / 'figs'} | head -1; exit ${{PIPESTATUS[0]}}")
    assert done.returncode == 0 and (tmp_path / "m.json").is_file() and (tmp_path / "figs" / "confusion.png").is_file()


@pytest.mark.slow
def test_predict_waits_on_a_non_blocking_stdin(model):
    import fcntl

    def non_blocking() -> None:
        fcntl.fcntl(0, fcntl.F_SETFL, fcntl.fcntl(0, fcntl.F_GETFL) | os.O_NONBLOCK)

    proc = subprocess.Popen([sys.executable, "-m", "bertcli", "predict", str(model)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=non_blocking,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    said = proc.stderr.readline()  # the engine line, written as the model is ready and just before reading starts
    assert said.startswith(b"predict: engine"), said + proc.stderr.read()
    time.sleep(1)  # predict is reading by now, and finds nothing there yet
    out, err = proc.communicate(b"good\nbad\n", timeout=120)
    assert proc.returncode == 0 and len(out.splitlines()) == 2, err.decode()[-2000:]


def test_a_run_of_an_older_bertcli_resumes(home, monkeypatch, capsys):
    """Runs made before the marker hold only a run's files and resume.pt: --resume adopts them."""
    r = recipe(home)
    assert in_process(["finetune", r], monkeypatch, capsys)[0] == 0
    (home / "out" / MARKER).unlink()
    (home / "out" / LOCK).unlink()
    code, _, err = in_process(["finetune", r, "--resume", "--set", "train.max_steps=4"], monkeypatch, capsys)
    assert code == 0 and (home / "out" / MARKER).is_file(), err


def test_a_second_signal_while_the_checkpoint_is_written_waits_for_it(home, monkeypatch, capsys):
    import bertcli.jobs as jobs
    from bertcli.tasks.classify import ClassifyTask

    real_loss, real_save, calls = ClassifyTask.loss, jobs.save_checkpoint, [0]

    def loss(self, *args):
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the first: the loop stops after this step
        return real_loss(self, *args)

    def save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the second, impatient, while the checkpoint is written
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ClassifyTask, "loss", loss)
    monkeypatch.setattr(jobs, "save_checkpoint", save)
    code, _, err = in_process(["finetune", recipe(home), "--set", "train.max_steps=50"], monkeypatch, capsys)
    assert code == 143 and "SIGTERM at step 2: saved to" in err, err
    assert (home / "out" / "resume.pt").is_file() and (home / "out" / "model.safetensors").is_file()


def test_finetune_under_torchrun_is_refused_before_any_process_writes(tiny_classifier_dir, tmp_path, monkeypatch, cli):
    """torchrun spreads pretrain; finetune runs in one process. Each of torchrun's processes used to claim --out,
    so one failed on the other's lock while the first trained alone: now each says why, exit 2, nothing written."""
    (tmp_path / "train.tsv").write_text(ROWS, encoding="utf-8")
    recipe = write_recipe(tmp_path / "r.yaml", {"name": "classify"}, {"train": str(tmp_path / "train.tsv")},
                          {"max_steps": 1}, model={"init": str(tiny_classifier_dir)})
    monkeypatch.setenv("WORLD_SIZE", "2")
    for extra in ([], [str(recipe)], ["--sweep", "train.lr=1e-5,2e-5"]):  # one run, a suite, a sweep
        done = cli("finetune", str(recipe), *extra, "--out", str(tmp_path / "out"))
        assert done.returncode == 2 and b"finetune runs in one process; under torchrun (WORLD_SIZE=2)" in done.stderr
        assert not (tmp_path / "out").exists()
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process: a plain run
    assert cli("finetune", str(recipe), "--out", str(tmp_path / "out")).returncode == 0


def test_a_directory_holding_only_bertcli_s_marker_and_lock_is_taken_again_as_new(tmp_path):
    """A command that failed after making its directory and before writing a file (a device it cannot
    use, say) leaves nothing to keep: the same command runs there again without --overwrite."""
    from bertcli.rundir import claim

    out = tmp_path / "run"
    with claim(out, "run"):
        pass
    assert sorted(p.name for p in out.iterdir()) == sorted([LOCK, MARKER])
    with claim(out, "run"):
        pass
    with pytest.raises(BertcliError, match="nothing to resume: the command before stopped before it wrote a file; run it again"):
        claim(out, "run", resume=True)
    with pytest.raises(BertcliError, match="holds a bertcli run, not"):  # another kind's directory still refused
        claim(out, "tokenizer")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(BertcliError, match="already exists"):
        claim(out, "run")
    with pytest.raises(BertcliError, match=r"holds files bertcli did not write \(notes.txt\)"):
        claim(out, "run", overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_an_output_path_through_a_loop_of_symbolic_links_is_one_message(tmp_path):
    from bertcli.rundir import claim

    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for kind in ("run", "suite", "tokenizer"):
        with pytest.raises(BertcliError, match="symbolic links"):
            claim(tmp_path / "a" / "x", kind)


def test_resume_refuses_data_or_a_tokenizer_that_changed_since_the_run_began_or_fewer_steps(home, monkeypatch, capsys):
    """recipe.yaml names the paths a run read; inputs.json what they held, and the run's checkpoint its
    tokenizer: a resumed run would otherwise go on with other examples, or other token ids, unsaid."""
    r, more = recipe(home), ["--resume", "--set", "train.max_steps=4"]
    assert in_process(["finetune", r], monkeypatch, capsys)[0] == 0
    assert str(home / "train.tsv") in json.loads((home / "out" / "inputs.json").read_text())["files"]
    rows, was = (home / "train.tsv").read_text(), (home / "train.tsv").stat()
    (home / "train.tsv").write_text(rows.replace("\tpos", "\tneg", 1))  # in place, the same size
    os.utime(home / "train.tsv", ns=(was.st_atime_ns, was.st_mtime_ns))  # and its time set back (touch -r)
    code, _, err = in_process(["finetune", r, *more], monkeypatch, capsys)
    assert code == 2 and f"{home / 'train.tsv'} has changed since the run began" in err, err
    (home / "train.tsv").write_text(rows)
    tokenizer = json.loads((home / "tok" / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[40:42]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # the same size, two words' ids swapped
    (home / "tok" / "tokenizer.json").write_text(json.dumps(tokenizer))
    code, _, err = in_process(["finetune", r, *more], monkeypatch, capsys)
    assert code == 2 and "is not the one the run trained with: its vocabulary differs" in err, err
    shutil.copy(home / "out" / "tokenizer.json", home / "tok" / "tokenizer.json")
    code, _, err = in_process(["finetune", r, *more], monkeypatch, capsys)
    assert code == 0 and json.loads((home / "out" / "log.jsonl").read_text().splitlines()[-1])["step"] == 4, err
    assert f"then, resumed, every weight (the head's too) from the run's own {home / 'out' / 'resume.pt'}" in \
        err.splitlines()[0]
    saved = (home / "out" / "recipe.yaml").read_text()
    code, _, err = in_process(["finetune", r, "--resume", "--set", "train.max_steps=3"], monkeypatch, capsys)
    assert code == 2 and "the run is at step 4, past the 3 steps the recipe now plans" in err, err
    assert (home / "out" / "recipe.yaml").read_text() == saved  # (it said 3 steps beside weights of 4)


def test_a_runs_saved_recipe_resumes_that_run_and_no_other(home, monkeypatch, capsys):
    """A run's recipe.yaml says the directory the run went to (--out), not the recipe's `output`: resumed
    by its own recipe.yaml without --out, it continues that run, not the one at the recipe's `output`."""
    r = recipe(home)
    assert in_process(["finetune", r], monkeypatch, capsys)[0] == 0  # the recipe's output: home/out
    assert in_process(["finetune", r, "--out", str(home / "other")], monkeypatch, capsys)[0] == 0
    saved = home / "other" / "recipe.yaml"
    assert yaml.safe_load(saved.read_text())["output"] == str(home / "other")
    before = (home / "out" / "log.jsonl").read_text()
    code, _, err = in_process(["finetune", str(saved), "--resume", "--set", "train.max_steps=3"], monkeypatch, capsys)
    assert code == 0 and json.loads((home / "other" / "log.jsonl").read_text().splitlines()[-1])["step"] == 3, err
    assert (home / "out" / "log.jsonl").read_text() == before


def test_training_lines_are_whole_and_user_text_is_not_markup(home, monkeypatch, capsys):
    """stderr that is not a terminal (a file, a pipe, a scheduler's log) gets each training line whole, so that
    `grep eval_f1 log` finds the numbers; and a label that looks like rich's markup is shown as it is."""
    (home / "odd.tsv").write_text("sentence\tlabel\n" + "a fine film\t[/]\na dull film\t:smile:\n" * 8)
    r = recipe(home, train="odd.tsv", eval="odd.tsv", extra="")
    monkeypatch.setenv("COLUMNS", "40")  # rich's width where it is not a terminal (80 when unset)
    code, _, err = in_process(["finetune", r], monkeypatch, capsys)
    assert code == 0, err
    final = json.loads((home / "out" / "metrics.json").read_text())
    line = next(x for x in err.splitlines() if x.startswith("step 2: eval_"))
    assert len(line) > 40 and all(key in line for key in final if key.startswith("eval_")), err
    code, out, err = in_process(["evaluate", str(home / "out"), "--data", str(home / "odd.tsv")], monkeypatch, capsys)
    assert code == 0 and "[/]" in out and ":smile:" in out, err  # (rich would make it an emoji)


def test_a_graph_or_inputs_json_bertcli_cannot_prove_it_wrote_is_kept(home, monkeypatch, capsys):
    """A graph from a bertcli before graphs were sealed (or edited since), or an inputs.json not in bertcli's
    format, may be the user's: --overwrite refuses, naming why; --resume, which writes no graph, goes on."""
    r = recipe(home)
    assert in_process(["finetune", r], monkeypatch, capsys)[0] == 0
    legacy = b"\x08\x07\x12\x07bertcli\x1a\x050.1.0" + b"\x00" * 100  # names bertcli as its producer, no seal
    (home / "out" / "model.onnx").write_bytes(legacy)
    code, _, err = in_process(["finetune", r, "--resume", "--set", "train.max_steps=3"], monkeypatch, capsys)
    assert code == 0 and (home / "out" / "model.onnx").read_bytes() == legacy, err
    code, _, err = in_process(["finetune", r, "--overwrite"], monkeypatch, capsys)
    assert code == 2 and "model.onnx (a graph bertcli cannot prove it wrote: exported by a bertcli from before" in err
    (home / "out" / "model.onnx").unlink()
    (home / "out" / "inputs.json").write_text('{"my": "notes"}')
    code, _, err = in_process(["finetune", r, "--overwrite"], monkeypatch, capsys)
    assert code == 2 and "it holds files bertcli did not write (inputs.json)" in err, err
    assert (home / "out" / "inputs.json").read_text() == '{"my": "notes"}'

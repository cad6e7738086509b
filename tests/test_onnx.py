"""bertcli export and predict's ONNX Runtime engine: the same answers as the torch engine for every task
head, which engine runs when, a graph that no longer matches its weights, and files that are not bertcli's."""

from __future__ import annotations

import io
import shutil
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

for _module in ("onnx", "onnxscript", "onnxruntime"):
    pytest.importorskip(_module, reason=f"{_module} is not installed (pip install -e '.[onnx]')")

from bertcli.errors import BertcliError, CheckpointError  # noqa: E402
from bertcli.export import export  # noqa: E402
from bertcli.jobs import finetune  # noqa: E402
from bertcli.predict import run  # noqa: E402
from bertcli.recipes import load_recipe  # noqa: E402
from bertcli.rundir import LOCK  # noqa: E402

from conftest import ROOT, overflow, run_cli, write_recipe  # noqa: E402
from test_ner import CONLL  # noqa: E402
from test_qa import CONTEXTS, squad  # noqa: E402
from test_tasks import PAIRS, TAGGED  # noqa: E402

LONG = "Mary Smith works for Acme Corp in London and John lives in Paris with the quick brown fox near the river ."
INPUTS = {  # predict's input lines per task: windows (NER, QA), pairs, a blank line and an unreadable one
    "classify": ["the film is wonderful", "a dull and boring plot", json.dumps({"text": "i loved it", "text_pair": "x"}),
                 "", "{\"text\": 3}", LONG],
    "ner": ["John lives in Paris .", LONG, "", "Acme Corp"],
    "qa": [json.dumps({"question": q, "context": c}) for c, qas in CONTEXTS for q, _ in qas] + [""],
    "regression": [json.dumps({"text": a, "text_pair": b}) for a, b, _ in PAIRS] + [""],
    "multilabel": [t for t, _ in TAGGED] + [""],
}


def _data(d: Path, task: str) -> tuple[dict, dict]:
    """The task's training file in `d`, and the task and data sections of its recipe."""
    if task == "ner":
        (d / "train.conll").write_text(CONLL, encoding="utf-8")
        return {"name": "ner"}, {"train": str(d / "train.conll"), "max_seq_len": 8}  # many windows per sentence
    if task == "qa":
        (d / "train.json").write_text(json.dumps(squad(CONTEXTS)), encoding="utf-8")
        return {"name": "qa", "max_query_len": 10, "doc_stride": 4}, {"train": str(d / "train.json"), "max_seq_len": 24}
    if task == "regression":
        rows = "".join(f"{a}\t{b}\t{s}\n" for a, b, s in PAIRS)
        (d / "train.tsv").write_text("sentence1\tsentence2\tscore\n" + rows, encoding="utf-8")
    elif task == "multilabel":
        (d / "train.tsv").write_text("text\tlabels\n" + "".join(f"{t}\t{tags}\n" for t, tags in TAGGED), encoding="utf-8")
    else:
        rows = "".join(f"{a}\t{b}\t{'pos' if s > 2.5 else 'neg'}\n" for a, b, s in PAIRS)
        (d / "train.tsv").write_text("sentence1\tsentence2\tlabel\n" + rows, encoding="utf-8")
    return {"name": task}, {"train": str(d / "train.tsv"), "max_seq_len": 16}


def _train(d: Path, task: str, tokenizer: Path) -> Path:
    section, data = _data(d, task)
    recipe = write_recipe(d / "recipe.yaml", section, data, {"max_steps": 30, "lr": 3e-3}, tokenizer=tokenizer)
    finetune(load_recipe(recipe), d / "run", resume=False, overwrite=False)
    return d / "run"


@pytest.fixture(scope="module", params=list(INPUTS))
def exported(request, tmp_path_factory, tiny_tokenizer_dir):
    model = _train(tmp_path_factory.mktemp(f"onnx-{request.param}"), request.param, tiny_tokenizer_dir)
    export(model, int8=request.param == "classify", say=lambda _: None)
    return request.param, model


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny classifier with no export yet: the tests that spoil one work on copies of it."""
    return _train(tmp_path_factory.mktemp("onnx-spoil"), "classify", tiny_tokenizer_dir)


def _predict(model: Path, lines: list[str], capsys, **options) -> tuple[list[dict], str, int]:
    """predict in this process: (answers, what it said on stderr, exit status as the CLI would give it)."""
    out = io.StringIO()
    status = 0
    capsys.readouterr()
    try:
        run(model, io.BytesIO(("\n".join(lines) + "\n").encode()), "stdin", out, batch_size=2,
            **{"precision": "fp32", **options})
    except BertcliError:
        status = 2
    return [json.loads(x) for x in out.getvalue().splitlines()], capsys.readouterr().err, status


def _same(a, b, where: str = "") -> None:
    """The same JSON answer: equal strings and structure, numbers within 1e-3 (both in fp32)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, a, b)
        for key in a:
            _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), (where, a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-3), (where, a, b)
    else:
        assert a == b, (where, a, b)


@pytest.mark.slow
def test_the_onnx_engine_answers_as_torch_does_for_every_task(exported, capsys):
    task, model = exported
    lines = INPUTS[task]
    torch_answers, said, status = _predict(model, lines, capsys, engine="torch")
    assert "engine torch" in said
    onnx_answers, said, status_onnx = _predict(model, lines, capsys, engine="onnx")
    assert "predict: engine onnx (model.onnx, ONNX Runtime" in said, said
    assert status == status_onnx == (2 if task == "classify" else 0)  # classify's input has an unreadable line
    assert len(onnx_answers) == len(lines)
    _same(torch_answers, onnx_answers)
    auto, said, _ = _predict(model, lines, capsys)  # auto: the graph is there, and current
    assert "engine onnx" in said and auto == onnx_answers
    import onnx

    ops = [n.op_type for n in onnx.load(str(model / "model.onnx")).graph.node]
    assert ops.count("Attention") == 2 and "Softmax" not in ops  # both layers' attention fused (onnx_graph.py)


@pytest.mark.slow
def test_the_graph_gives_the_models_outputs_on_padded_batches_of_pairs(exported):
    """The head's raw outputs, both engines, on rows of random tokens, lengths and token types, batched with padding."""
    import random

    import numpy as np

    from bertcli.predict import open_model

    _, model = exported
    task, torch_model, scope, _ = open_model(model, "fp32", False, "torch")
    _, onnx_model, _, _ = open_model(model, "fp32", False, "onnx")
    rng = random.Random(0)
    features = []
    for _ in range(12):
        first, second = rng.randint(1, 6), rng.randint(0, 6)
        ids = [rng.randrange(5, task.tokenizer.vocab_size) for _ in range(first + second)]
        features.append({"input_ids": [task.tokenizer.cls_id, *ids, task.tokenizer.sep_id],
                         "token_type_ids": [0] * (first + 1) + [1] * (second + 1)})
    with scope():
        expected = task.run(torch_model, features, batch_size=5)
    got = task.run(onnx_model, features, batch_size=5)
    per_token = task.name in ("ner", "qa")  # outputs at each position: those at the padding are never read
    for feature, want, have in zip(features, expected, got):
        for w, h in zip(want if isinstance(want, tuple) else (want,), have if isinstance(have, tuple) else (have,)):
            assert isinstance(h, np.ndarray) and h.shape == tuple(w.shape)
            real = len(feature["input_ids"]) if per_token else None
            assert np.abs(h[:real] - w.numpy()[:real]).max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("exported", ["classify"], indirect=True)  # the export that has an int8 graph
def test_the_int8_graph_holds_int8_weights_and_stays_close(exported, capsys):
    import onnx

    task, model = exported
    graph = onnx.load(str(model / "model.int8.onnx"))
    ops = [n.op_type for n in graph.graph.node]
    assert "MatMulInteger" in ops and ops.count("QAttention") == 2  # the feed-forward and the attention's weights
    assert {p.key: p.value for p in graph.metadata_props}["bertcli_graph"] == "int8"
    lines = INPUTS[task][:2] + [LONG]
    fp32, _, _ = _predict(model, lines, capsys, engine="onnx")
    int8, said, status = _predict(model, lines, capsys, engine="onnx", int8=True)
    assert status == 0 and "model.int8.onnx" in said
    # (within 0.005: with one int8 range for every value, not the 7 bits that CPUs without VNNI need, 0.01-0.25 off)
    assert max(abs(a["score"] - b["score"]) for a, b in zip(fp32, int8)) < 0.005
    # the same label wherever fp32's is clear of the tolerance (LONG, neither positive nor negative, may sit near
    # 0.5: its label flipped in one CI run)
    clear = [(a["label"], b["label"]) for a, b in zip(fp32, int8) if a["score"] > 0.55]
    assert len(clear) >= 2 and all(a == b for a, b in clear)
    # a graph of a bertcli that quantized to all 8 bits (no record of 7): not run, and the reason said
    from bertcli.export import _save
    from bertcli.onnx_engine import INT8_KEY

    kept = [(p.key, p.value) for p in graph.metadata_props if p.key != INT8_KEY]
    del graph.metadata_props[:]
    for key, value in kept:
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    old = model.parent / "eight-bit"
    shutil.copytree(model, old)
    _save(graph, old / "model.int8.onnx")
    with pytest.raises(CheckpointError, match="its int8 weights use all 8 bits, which saturate"):
        run(old, io.BytesIO(b"x\n"), "stdin", io.StringIO(), engine="onnx", int8=True)


def test_auto_runs_torch_without_an_export_and_onnx_insists(classifier, capsys):
    answers, said, status = _predict(classifier, ["the film is wonderful"], capsys)
    assert status == 0 and "engine torch" in said and answers[0]["label"] in ("pos", "neg")
    with pytest.raises(BertcliError, match=r"--engine onnx: .*model.onnx not found: make it with `bertcli export"):
        run(classifier, io.BytesIO(b"x\n"), "stdin", io.StringIO(), engine="onnx")
    with pytest.raises(BertcliError, match=r"--engine: 'tensorrt' is not one of auto, torch, onnx"):
        run(classifier, io.BytesIO(b"x\n"), "stdin", io.StringIO(), engine="tensorrt")


@pytest.mark.slow
def test_a_graph_that_no_longer_matches_its_weights_is_never_run(classifier, tmp_path, capsys):
    import shutil

    from safetensors.numpy import load_file, save_file

    model = tmp_path / "copy"
    shutil.copytree(classifier, model)
    export(model, say=lambda _: None)
    weights = model / "model.safetensors"
    os.utime(weights, ns=(1, 1))  # touched, same bytes: still current (checked by its hash)
    _, said, status = _predict(model, ["a fine film"], capsys)
    assert status == 0 and "engine onnx" in said
    state = load_file(weights)
    state["classifier.bias"] = state["classifier.bias"] + 1  # trained further: the graph is out of date
    save_file(state, str(weights), metadata={"format": "pt"})
    answers, said, status = _predict(model, ["a fine film"], capsys)
    assert status == 0 and "engine torch" in said and "model.onnx not run: model.safetensors has changed" in said
    with pytest.raises(CheckpointError, match=r"model.onnx: not run: model.safetensors has changed since the export; "
                                              r"bertcli export .*copy$"):
        run(model, io.BytesIO(b"x\n"), "stdin", io.StringIO(), engine="onnx")
    export(model, say=lambda _: None)  # its own graph: replaced
    onnx_answers, said, _ = _predict(model, ["a fine film"], capsys)
    assert "engine onnx" in said
    _same(answers, onnx_answers)
    import onnx

    graph = onnx.load(model / "model.onnx")  # edited by hand, bertcli's record of the checkpoint kept
    bias = next(t for t in graph.graph.initializer if "classifier" in t.name and len(t.dims) == 1)
    bias.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(bias) + 5, bias.name))
    onnx.save_model(graph, model / "model.onnx")
    _, said, status = _predict(model, ["a fine film"], capsys)
    assert status == 0 and "engine torch" in said and "not the file bertcli export wrote" in said
    with pytest.raises(BertcliError, match=r"model.onnx: exists and is not a graph bertcli wrote; it is kept"):
        export(model, say=lambda _: None)  # a graph of the user's now


def test_files_bertcli_did_not_write_are_kept(classifier, tmp_path, capsys, monkeypatch):
    import shutil

    from bertcli import onnx_engine

    model = tmp_path / "copy"
    shutil.copytree(classifier, model)
    (model / "model.onnx").write_bytes(b"my own notes, not a graph")
    with pytest.raises(BertcliError, match=r"model.onnx: exists and is not a graph bertcli wrote; it is kept"):
        export(model, say=lambda _: None)
    assert (model / "model.onnx").read_bytes() == b"my own notes, not a graph"
    # auto says why it cannot run it, and answers with torch, without loading it into ONNX Runtime; onnx refuses
    loaded = []
    monkeypatch.setattr(onnx_engine.OnnxModel, "__init__", lambda self, path, task: loaded.append(path))
    answers, said, status = _predict(model, ["a fine film"], capsys)
    assert status == 0 and "engine torch" in said and "it was not written by bertcli export" in said
    with pytest.raises(CheckpointError, match=r"model.onnx: not run: it was not written by bertcli export; move "
                                              r"model.onnx away, then bertcli export"):
        run(model, io.BytesIO(b"x\n"), "stdin", io.StringIO(), engine="onnx")
    (model / "model.onnx").unlink()
    (model / "model.onnx").symlink_to(classifier / "config.json")  # a link: said so, whatever it points to
    answers, said, status = _predict(model, ["a fine film"], capsys)
    assert status == 0 and "engine torch" in said and "it is a symbolic link (bertcli export writes model.onnx" in said
    assert loaded == []
    monkeypatch.undo()
    with pytest.raises(BertcliError, match=r"exists and is not a graph bertcli wrote"):
        export(model, say=lambda _: None)
    assert (model / "model.onnx").is_symlink()
    # files named as bertcli names its temporary ones, which no bertcli process noted making: the user's
    (model / "model.onnx").unlink()
    mine = [".model.onnx.original.tmp", ".config.json.20241207.tmp", ".vocab.txt.mycopy_1.tmp"]
    for name in mine:
        (model / name).write_text("mine")
    export(model, say=lambda _: None)
    assert all((model / name).read_text() == "mine" for name in mine)


def test_a_full_disk_stops_an_export_with_what_to_do(classifier, tmp_path, monkeypatch):
    """export writes into the checkpoint: no --out to suggest (it has none), and nothing half written is left."""
    import errno

    import bertcli.export as exporting

    model = tmp_path / "copy"
    shutil.copytree(classifier, model)

    def full(path, graph):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(exporting, "_write_graph", full)
    with pytest.raises(BertcliError, match=r"model.onnx: cannot write: No space left on device \(free some space\)$"):
        export(model, say=lambda _: None)
    assert sorted(p.name for p in model.iterdir()) == sorted(p.name for p in classifier.iterdir())


def test_export_waits_for_no_one_and_refuses_a_run_being_written(classifier, tmp_path):
    import shutil

    from bertcli.rundir import MARKER, claim, hold

    model = tmp_path / "copy"
    shutil.copytree(classifier, model)
    with claim(model, "run", resume=True):  # as a resumed training run holds it
        with pytest.raises(BertcliError, match=r"another bertcli process \(pid \d+\) is writing this directory; "
                                               r"wait for it to end$"):
            export(model, say=lambda _: None)
    assert not (model / "model.onnx").exists()
    (model / MARKER).unlink()  # a checkpoint from elsewhere: no lock file is made there, the directory itself is locked
    (model / ".bertcli.lock").unlink()
    before = sorted(os.listdir(model))
    with hold(model):
        with pytest.raises(BertcliError, match=r"another bertcli process \(pid unknown\) is writing this directory"):
            export(model, say=lambda _: None)
    assert sorted(os.listdir(model)) == before


@pytest.mark.slow
def test_export_int8_keeps_the_files_next_to_the_graph(classifier, tmp_path, capsys):
    """ONNX Runtime's quantization writes model-inferred.onnx beside the graph it reads: never beside the user's."""
    import shutil

    model = tmp_path / "copy"
    shutil.copytree(classifier, model)
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    (model / "model-inferred.onnx").symlink_to(victim)
    export(model, int8=True, say=lambda _: None)
    assert victim.read_text() == "mine" and (model / "model-inferred.onnx").is_symlink()
    # auto says why a graph that is there was not run for these settings
    _, said, status = _predict(model, ["a fine film"], capsys, precision="bf16")
    assert status == 0 and "engine torch" in said and "the exported graph not run: the exported graphs run in fp32" in said


def test_export_refuses_what_has_no_task_head(tmp_path, tiny_tokenizer_dir):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog .\n\nhello world , a tiny corpus .\n" * 20)
    recipe = write_recipe(tmp_path / "r.yaml", {"name": "pretrain", "objective": "none"}, {"train": str(corpus),
                          "max_seq_len": 16}, {"max_steps": 1}, tokenizer=tiny_tokenizer_dir)
    from bertcli.jobs import pretrain

    pretrain(load_recipe(recipe), tmp_path / "pre", resume=False, overwrite=False)
    with pytest.raises(CheckpointError, match=r"a pretrained model \(fill-mask\) has no task head to export"):
        export(tmp_path / "pre", say=lambda _: None)


@pytest.mark.slow
def test_the_cli_exports_and_its_onnx_predict_never_imports_torch(classifier, tmp_path):
    import shutil

    model = tmp_path / "copy"
    shutil.copytree(classifier, model)
    done = run_cli("export", str(model), "--int8")
    assert done.returncode == 0 and b"model.int8.onnx" in done.stderr and b"Traceback" not in done.stderr, done.stderr
    script = ("import sys\nfrom bertcli.cli import main\n"
              f"sys.argv = ['bertcli', 'predict', {str(model)!r}, '--int8']\n"
              "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
              "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", script], input=b"a fine film\n\n", capture_output=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert b"engine onnx (model.int8.onnx" in done.stderr
    answers = [json.loads(x) for x in done.stdout.splitlines()]
    assert answers[0]["label"] in ("pos", "neg") and answers[1] == {"label": None, "score": None, "scores": {}}
    # the run's --overwrite removes the graphs with the rest of the run: they are bertcli's
    recipe = load_recipe(classifier.parent / "recipe.yaml")
    finetune(recipe, model, resume=False, overwrite=True)
    assert not (model / "model.onnx").exists() and not (model / "model.int8.onnx").exists()


@pytest.mark.slow
def test_overwrite_and_leftovers_touch_only_bertcli_graphs(classifier, tmp_path):
    """A run's --overwrite removes the graphs bertcli export wrote, never another tool's under the same name;
    a killed export's half-written graph goes with the next bertcli command in the run."""
    import shutil

    model = tmp_path / "copy"
    shutil.copytree(classifier, model)
    (model / "model.onnx").write_bytes(b"\x08\x07\x12\x07pytorch: a graph another exporter wrote")
    leftover = model / ".model.int8.onnx.abcd1234.tmp"
    leftover.write_bytes(b"half a graph")
    lock = model / LOCK  # where the export killed while writing it noted it (a pid, then the names)
    lock.write_text(lock.read_text().split("\n")[0] + f"\n{leftover.name}\n")
    recipe = load_recipe(classifier.parent / "recipe.yaml")
    with pytest.raises(BertcliError, match=r"--overwrite refused: it holds files bertcli did not write \(model.onnx\)"):
        finetune(recipe, model, resume=False, overwrite=True)
    assert (model / "model.onnx").read_bytes().startswith(b"\x08\x07\x12\x07pytorch")
    (model / "model.onnx").unlink()
    export(model, say=lambda _: None)
    assert not leftover.exists()  # removed under the run's lock
    finetune(recipe, model, resume=False, overwrite=True)
    assert not (model / "model.onnx").exists()


def test_a_model_whose_outputs_overflow_is_not_exported(classifier, tmp_path):
    import shutil

    model = tmp_path / "copy"
    shutil.copytree(classifier, model)
    overflow(model)
    with pytest.raises(BertcliError, match=r"export: the model itself gives outputs that are not finite numbers"):
        export(model, say=lambda _: None)
    assert not (model / "model.onnx").exists()


def test_a_graph_that_does_not_give_the_models_outputs_is_not_written(classifier, tmp_path, monkeypatch):
    import shutil

    import bertcli.onnx_graph as onnx_graph
    from onnx import numpy_helper

    model = tmp_path / "copy"
    shutil.copytree(classifier, model)
    fuse = onnx_graph.fuse_attention

    def broken(graph, num_heads):  # a rewrite gone wrong: one layer's attention weights doubled
        fused = fuse(graph, num_heads)
        weight = next(t for t in graph.graph.initializer if t.name == "bertcli_attention_0_weight")
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 2, weight.name))
        return fused

    monkeypatch.setattr(onnx_graph, "fuse_attention", broken)
    with pytest.raises(BertcliError, match=r"export: the graph's outputs differ from the model's by .*; nothing was "
                                           r"written"):
        export(model, say=lambda _: None)
    assert not (model / "model.onnx").exists()
    assert not [p.name for p in model.iterdir() if p.name.endswith(".tmp")]


def _until_it_catches_sigterm(proc) -> None:
    """Wait until `proc` has its SIGTERM handler (Linux: the caught-signals mask in /proc), so that the signal
    comes during the export rather than while Python is still importing; elsewhere, a few seconds."""
    import signal
    import time

    status = Path(f"/proc/{proc.pid}/status")
    if not status.exists():
        time.sleep(4)
        return
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            lines = status.read_text().splitlines()
        except OSError:  # it ended meanwhile
            return
        caught = next((line.split()[1] for line in lines if line.startswith("SigCgt:")), "0")
        if int(caught, 16) >> (signal.SIGTERM - 1) & 1:
            return
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_an_export_and_leaves_nothing_half_written(classifier, tmp_path, signum):
    import shutil
    import signal

    signum = getattr(signal, signum)
    model, scratch = tmp_path / "copy", tmp_path / "tmp"
    shutil.copytree(classifier, model)
    scratch.mkdir()
    before = sorted(p.name for p in model.iterdir())
    # -X faulthandler: a crash says where (once in CI, an export died of SIGSEGV after the SIGTERM)
    proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "bertcli", "export", str(model), "--int8"],
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(scratch)})
    _until_it_catches_sigterm(proc)  # importing torch and onnx may take longer than the export after it
    proc.send_signal(signum)
    err = proc.communicate(timeout=120)[1].decode()
    said = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    assert proc.returncode == 128 + signum and f"stopped by {said}" in err, err
    # one message, bertcli's (an exception raised into the exporter came back as its own error and traceback)
    assert all(line.startswith("export: ") for line in err.splitlines() if line.strip()), err
    left = sorted(p.name for p in model.iterdir())
    assert [n for n in left if n not in before] in ([], ["model.onnx"], ["model.int8.onnx", "model.onnx"])  # whole
    assert not list(scratch.glob("bertcli-*-export.*"))  # nor the int8 step's scratch copies (torch keeps its cache)


@pytest.mark.slow
@pytest.mark.parametrize("module, function", [("onnxruntime.quantization", "quantize_dynamic"),
                                              ("bertcli.export", "_write_graph")], ids=["int8-step", "mid-write"])
def test_a_sigterm_inside_the_export_leaves_the_graph_whole_and_no_scratch(classifier, tmp_path, module, function):
    """The signal comes while the int8 step's scratch directory holds its copies (quantize_dynamic made to wait
    after it has written them: the export ends at once), or while the fp32 graph's temporary file is written
    (its write made to wait: the export ends once it is in place). Either way exit 143, the fp32 graph
    whole, no int8 graph, no temporary file, and the scratch directory gone."""
    import shutil
    import signal

    import onnx

    model, scratch = tmp_path / "copy", tmp_path / "tmp"
    shutil.copytree(classifier, model)
    scratch.mkdir()
    child = f"""
import importlib, sys, time
target = importlib.import_module({module!r})
real = getattr(target, {function!r})
def waiting(*args, **kwargs):
    real(*args, **kwargs)
    print("written", flush=True)
    from bertcli.export import _Stop
    until = time.time() + 120
    while _Stop.pending is None and time.time() < until:  # here until the signal has come, however late
        time.sleep(0.01)
setattr(target, {function!r}, waiting)
from bertcli.cli import main
sys.argv = ["bertcli", "export", {str(model)!r}, "--int8"]
main()
"""
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(scratch)})
    assert proc.stdout.readline() == b"written\n", proc.communicate(timeout=120)[1].decode()
    if function == "quantize_dynamic":
        assert [p.name for p in scratch.glob("bertcli-*-export.*/*")]  # the copies are there when the signal comes
    else:
        assert [p.name for p in model.iterdir() if p.name.endswith(".tmp")]  # and the graph's temporary file
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 143 and err.splitlines()[-1] == "export: stopped by SIGTERM; nothing more was written", err
    onnx.checker.check_model(str(model / "model.onnx"))  # whole
    assert not (model / "model.int8.onnx").exists()
    assert not list(scratch.glob("bertcli-*-export.*"))
    assert not [p.name for p in model.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_the_next_int8_export_removes_the_folder_a_sigkill_left(classifier, tmp_path, cli, monkeypatch):
    """SIGKILL while the int8 step works on its copies of the graph: nothing can run, the folder stays. The next
    export --int8 (the folder's lock gone with its process, and the folder old) removes it and says so."""
    import shutil
    import signal
    import tempfile

    from bertcli.scratch import ABANDONED_AFTER

    model, scratch = tmp_path / "copy", tmp_path / "tmp"
    shutil.copytree(classifier, model)
    scratch.mkdir()
    child = f"""
import sys, time
import onnxruntime.quantization as target
real = target.quantize_dynamic
def waiting(*args, **kwargs):
    real(*args, **kwargs)
    print("written", flush=True)
    time.sleep(120)
target.quantize_dynamic = waiting
from bertcli.cli import main
sys.argv = ["bertcli", "export", {str(model)!r}, "--int8"]
main()
"""
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(scratch)})
    assert proc.stdout.readline() == b"written\n", proc.communicate(timeout=120)[1].decode()
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=120)
    (left,) = scratch.glob("bertcli-*-export.*")
    size = sum(p.stat().st_size for p in left.iterdir())
    assert size > 0
    old = time.time() - ABANDONED_AFTER - 60
    for path in [*left.iterdir(), left]:
        os.utime(path, (old, old))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    done = cli("export", str(model), "--int8")
    assert done.returncode == 0, done.stderr
    assert f"removed 1 temporary folder(s), {size / 1e6:,.0f} MB, left in {scratch} by exports that were killed" in \
        done.stderr.decode()
    assert not list(scratch.glob("bertcli-*-export.*")) and (model / "model.int8.onnx").is_file()


def test_a_signal_during_a_write_waits_for_it_and_scratch_goes(tmp_path, monkeypatch):
    """In process, with os._exit caught: the handler defers to the end of a write, then ends the process after
    removing the registered scratch directories (a signal at any other time ends it at once)."""
    import signal

    from bertcli import export as ex

    class Ended(Exception):
        pass

    def fake_exit(code):
        raise Ended(code)

    monkeypatch.setattr(ex.os, "_exit", fake_exit)
    for name, value in (("writing", 0), ("pending", None), ("scratch", [])):  # as they were, after the test
        monkeypatch.setattr(ex._Stop, name, value)
    scratch = tmp_path / "bertcli-export.x"
    scratch.mkdir()
    (scratch / "model.onnx").write_bytes(b"half")
    steps = []
    with pytest.raises(Ended) as ended:
        with ex.stops_cleanly():
            ex._Stop.scratch.append(str(scratch))
            with ex._writing():  # (nested: a count, the signal waits for the outer stretch)
                with ex._writing():
                    os.kill(os.getpid(), signal.SIGTERM)
                    steps.append("the write went on")
                steps.append("and the stretch around it")
    assert steps == ["the write went on", "and the stretch around it"] and ended.value.args == (143,)
    assert not scratch.exists()
    with pytest.raises(Ended) as ended:
        with ex.stops_cleanly():  # (starts afresh: nothing pending from the block above)
            os.kill(os.getpid(), signal.SIGINT)
            steps.append("not reached")
    assert ended.value.args == (130,) and len(steps) == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are given back

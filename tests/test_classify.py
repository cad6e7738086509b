"""Classification end to end on a tiny model: train, overfit, evaluate, predict in a pipe."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bertcli.errors import DataError
from bertcli.evaluate import evaluate
from bertcli.jobs import finetune
from bertcli.recipes import load_recipe
from conftest import ROOT, run_cli, write_recipe

ROWS = [("the film is wonderful", "pos"), ("a dull and boring plot", "neg"), ("truly a joy to watch", "pos"),
        ("the acting falls flat", "neg"), ("clever and warm story", "pos"), ("painfully slow mess", "neg"),
        ("the ending is superb", "pos"), ("awful lazy script", "neg"), ("i hated it", "neg"), ("i loved it", "pos"),
        ("the cast shines", "mid"), ("it was fine", "mid")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tokenizer_dir):
    d = tmp_path_factory.mktemp("classify")
    train = d / "train.tsv"
    train.write_text("sentence\tlabel\n" + "".join(f"{t}\t{label}\n" for t, label in ROWS), encoding="utf-8")
    recipe = write_recipe(d / "recipe.yaml", {"name": "classify"}, {"train": str(train), "eval": str(train),
                          "max_seq_len": 32}, {"max_steps": 80, "batch_size": 12, "eval_every": 40, "lr": 3e-3},
                          tokenizer=tiny_tokenizer_dir)
    metrics = finetune(load_recipe(recipe), d / "run", resume=False, overwrite=False)
    return d, train, metrics


def test_tiny_model_overfits_its_training_batch(trained):
    d, train, metrics = trained
    assert metrics["eval_accuracy"] == 1.0
    assert evaluate(d / "run", train)["accuracy"] == 1.0
    log = [json.loads(line) for line in (d / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert steps[-1]["loss"] < 0.3 * steps[0]["loss"]
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(steps[0])
    assert [r["step"] for r in log if "eval_accuracy" in r] == [40, 80]
    config = json.loads((d / "run" / "config.json").read_text())
    assert config["id2label"] == {"0": "mid", "1": "neg", "2": "pos"}
    for name in ("recipe.yaml", "metrics.json", "log.jsonl", "model.safetensors", "vocab.txt", "resume.pt"):
        assert (d / "run" / name).is_file()


def test_predict_answers_every_line_in_order(trained, cli):
    d, _, _ = trained
    lines = [t for t, _ in ROWS] + ["", json.dumps({"text": "i loved it"})]
    done = cli("predict", str(d / "run"), stdin=("\n".join(lines) + "\n").encode())
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert len(answers) == len(lines)
    assert [a["label"] for a in answers[:len(ROWS)]] == [label for _, label in ROWS]
    assert answers[len(ROWS)] == {"label": None, "score": None, "scores": {}}
    assert answers[-1]["label"] == "pos" and abs(sum(answers[-1]["scores"].values()) - 1) < 1e-4


def test_predict_takes_long_lines_a_few_at_a_time(trained, cli, monkeypatch):
    """Lines are answered in chunks of at most CHUNK_BYTES (and the reader holds twice that waiting), so lines of a
    megabyte never pile up (200 of them took 8.7 GB); a longer line goes alone. The answers do not change."""
    from bertcli import predict

    d, _, _ = trained
    lines = [t for t, _ in ROWS] * 3 + ["i loved it " * 30]
    stdin = ("\n".join(lines) + "\n").encode()
    whole = cli("predict", str(d / "run"), stdin=stdin)
    monkeypatch.setattr(predict, "CHUNK_BYTES", 40)
    chunks, real = [], predict._predict
    monkeypatch.setattr(predict, "_predict", lambda task, model, examples, size: chunks.append(examples) or
                        real(task, model, examples, size))
    pieces = cli("predict", str(d / "run"), stdin=stdin)
    assert pieces.returncode == whole.returncode == 0
    mine, theirs = ([json.loads(x) for x in done.stdout.splitlines()] for done in (pieces, whole))
    assert [a["label"] for a in mine] == [a["label"] for a in theirs] and len(mine) == len(lines)
    assert max(abs(a["score"] - b["score"]) for a, b in zip(mine, theirs)) < 1e-5  # (batches of other shapes)
    assert mine[-1]["truncated"] and len(chunks) > 3
    assert all(sum(len(e.text.encode()) + 1 for e in chunk[:-1]) < 40 for chunk in chunks)  # (the last took it over)


@pytest.mark.slow
def test_predict_flushes_before_input_ends(trained):
    d, _, _ = trained
    proc = subprocess.Popen([sys.executable, "-m", "bertcli", "predict", str(d / "run")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        proc.stdin.write(b"i loved it\n")
        proc.stdin.flush()
        first = json.loads(proc.stdout.readline())  # answered while stdin is still open
        assert first["label"] == "pos"
        proc.stdin.write(b"i hated it\n")
        proc.stdin.close()
        assert json.loads(proc.stdout.readline())["label"] == "neg"
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


@pytest.mark.slow
def test_reader_closing_the_pipe_early_ends_predict_quietly(trained):
    import os

    d, _, _ = trained
    script = f"yes 'i loved it' | head -n 20000 | {sys.executable} -m bertcli predict {d / 'run'} | head -n 1"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", script], capture_output=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert json.loads(done.stdout)["label"] == "pos"
    assert b"Traceback" not in done.stderr and b"BrokenPipe" not in done.stderr and b"Exception" not in done.stderr, \
        done.stderr


@pytest.mark.slow
def test_unreadable_line_gets_an_error_answer_and_exit_2(trained, cli):
    d, _, _ = trained
    done = cli("predict", str(d / "run"), stdin=b"i loved it\nbad \xff\ni hated it\n")
    answers = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert done.returncode == 2 and len(answers) == 3
    assert answers[0]["label"] == "pos" and answers[2]["label"] == "neg"
    assert "line 2: not UTF-8 text (byte offset 15)" in answers[1]["error"]  # in the stream, as every reader counts
    assert b"1 of 3 input line(s)" in done.stderr and b"Traceback" not in done.stderr


def test_predict_refuses_a_batch_size_that_would_read_without_bound(tmp_path, cli):
    done = cli("predict", str(tmp_path), "--batch-size", "100000", stdin=b"good\n")  # before any model is read
    assert done.returncode == 2 and b"100000 is not in the range 1<=x<=4096" in done.stderr, done.stderr


@pytest.mark.slow
def test_ten_megabyte_line_is_refused_by_name(trained, tmp_path, cli):
    """On stdin it gets an error answer in its place (never held whole); in a data file, exit 2."""
    d, _, _ = trained
    huge = b"word " * 2_000_000 + b"\n"
    done = cli("predict", str(d / "run"), stdin=b"i loved it\n" + huge + b"i hated it\n")
    answers = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert done.returncode == 2 and len(answers) == 3 and b"Traceback" not in done.stderr
    assert answers[0]["label"] == "pos" and answers[2]["label"] == "neg"
    assert "stdin: line 2: the line is 10,000,000 bytes long, over the limit" in answers[1]["error"]
    data = tmp_path / "big.tsv"
    data.write_bytes(b"sentence\tlabel\ngood\tpos\n" + huge.rstrip() + b"\tpos\n")
    done = cli("evaluate", str(d / "run"), "--data", str(data))
    assert done.returncode == 2 and b"big.tsv: line 3: the line is 10,000,003 bytes long" in done.stderr


@pytest.mark.slow
def test_evaluate_cli_table_json_and_unknown_labels(trained, tmp_path, cli):
    d, train, _ = trained
    done = cli("evaluate", str(d / "run"), "--data", str(train), "--out", str(tmp_path / "m.json"))
    assert done.returncode == 0, done.stderr
    assert b"accuracy" in done.stdout and b"confusion" in done.stdout
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["accuracy"] == 1.0 and metrics["confusion"]["pos"]["pos"] == 5
    other = tmp_path / "other.tsv"
    other.write_text("sentence\tlabel\nfine\tpos\nodd\tsurprised\n", encoding="utf-8")
    done = cli("evaluate", str(d / "run"), "--data", str(other))
    assert done.returncode == 2 and b"other.tsv: line 3: label 'surprised' is not one the model knows" in done.stderr


@pytest.mark.slow
def test_existing_output_is_never_replaced_silently(trained, tmp_path, cli):
    d, _, _ = trained
    recipe = d / "recipe.yaml"
    before = (d / "run" / "model.safetensors").read_bytes()
    done = cli("finetune", str(recipe), "--out", str(d / "run"))
    assert done.returncode == 2 and b"--overwrite" in done.stderr
    assert (d / "run" / "model.safetensors").read_bytes() == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    done = cli("finetune", str(recipe), "--out", str(tmp_path / "mine"), "--overwrite")
    assert done.returncode == 2 and (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_malformed_tables_name_file_and_line(tmp_path, tiny_tokenizer_dir):
    from bertcli.tasks.classify import ClassifyOptions, ClassifyTask
    from bertcli.tokenizer import load_tokenizer

    task = ClassifyTask(load_tokenizer(tiny_tokenizer_dir), ClassifyOptions(), 32)
    ragged = tmp_path / "ragged.tsv"
    ragged.write_text("sentence\tlabel\ngood\t1\nno label here\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"ragged.tsv: line 3: 1 columns, but the header has 2"):
        task.read(ragged)
    wrong = tmp_path / "wrong.tsv"
    wrong.write_text("review_text\tstars\ngood\t1\n", encoding="utf-8")
    with pytest.raises(DataError, match="no text column"):
        task.read(wrong)
    named = ClassifyOptions(text_column="review_text", label_column="stars")
    assert ClassifyTask(load_tokenizer(tiny_tokenizer_dir), named, 32).read(wrong)[0].label == "1"
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "good", "label": 1}\n{"text": "bad"\n', encoding="utf-8")
    with pytest.raises(DataError, match="d.jsonl: line 2: cannot be read as JSON"):
        task.read(jsonl)
    binary = tmp_path / "b.tsv"
    binary.write_bytes(b"sentence\tlabel\ngo\x00od\t1\n")
    with pytest.raises(DataError, match="line 2: NUL byte"):
        task.read(binary)


def test_rows_with_an_empty_text_are_counted_and_ner_lines_without_tokens_left_out(tmp_path, tiny_tokenizer_dir,
                                                                                   capsys):
    """A labelled row with no text (`1<TAB>`, or spaces) is read as the model reads it (every row of a file is
    scored, as other tools score it) and said, never kept silently; NER's JSON lines with no tokens have nothing to
    tag: left out and said."""
    from bertcli.data.conll import read_ner
    from bertcli.tasks.classify import ClassifyOptions, ClassifyTask
    from bertcli.tokenizer import load_tokenizer

    task = ClassifyTask(load_tokenizer(tiny_tokenizer_dir), ClassifyOptions(), 32)
    path = tmp_path / "d.tsv"
    path.write_text("sentence\tlabel\ngood\t1\n\t0\n   \t1\nbad\t0\n", encoding="utf-8")
    assert [e.text for e in task.read(path)] == ["good", "", "", "bad"]
    assert capsys.readouterr().err == f"2 row(s) with an empty text, read as the model reads it: no words (first: " \
                                      f"{path}: line 3)\n"
    path.write_text("sentence\tlabel\n\t0\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d.tsv: every text is empty \(is the text column the one named\?\)"):
        task.read(path)
    path = tmp_path / "d.jsonl"
    path.write_text('{"tokens": ["Paris"], "tags": ["B-LOC"]}\n{"tokens": [], "tags": []}\n', encoding="utf-8")
    assert len(read_ner(path)) == 1
    assert capsys.readouterr().err == f"{path}: 1 line(s) with no tokens left out (first: line 2)\n"


def test_a_label_the_model_does_not_know_is_said_in_one_short_message(tiny_tokenizer_dir):
    """A label column that holds the texts makes thousands of labels: the message names a few of them."""
    from bertcli.tasks.classify import ClassifyOptions, ClassifyTask, Example
    from bertcli.tokenizer import load_tokenizer

    labels = [f"a sentence that was read as a label, number {i}" + " very long" * 20 for i in range(3000)]
    task = ClassifyTask(load_tokenizer(tiny_tokenizer_dir), ClassifyOptions(), 32, labels)
    with pytest.raises(DataError) as err:
        task.check_labels([Example("x", None, "an unknown" + " label" * 10_000, "dev.tsv: line 2")])
    assert str(err.value).startswith("dev.tsv: line 2: label 'an unknown label label") and len(str(err.value)) < 1500
    assert "and 2,990 more); 1 unknown label(s)" in str(err.value)


def test_predict_reads_text_and_text_pair_and_refuses_them_under_other_names(tiny_tokenizer_dir):
    from bertcli.tasks.classify import ClassifyOptions, ClassifyTask
    from bertcli.tokenizer import load_tokenizer

    task = ClassifyTask(load_tokenizer(tiny_tokenizer_dir), ClassifyOptions(), 32, ["a", "b"])
    task.segments = 2
    read = task.parse_input('{"text": "good", "text_pair": "bad", "review": "the line\'s own data", "id": 7}', "line 1")
    assert (read.text, read.pair) == ("good", "bad")
    assert task.parse_input('{braces} are "fun"', "line 2").text == '{braces} are "fun"'  # not JSON-like: a text
    for line, message in (('{"text": "good", "sentence2": "bad"}', "not 'sentence2'"),
                          ('{"review": "good"}', "not 'review'"),
                          ('{"text": "", "text_pair": "bad"}', "'text' is empty and 'text_pair' is not"),
                          ('{"text": "good"', "a line starting with {\" is read as a JSON line")):
        with pytest.raises(DataError) as err:
            task.parse_input(line, "line 3")
        assert message in str(err.value)


def test_tables_that_would_be_misread_are_refused_and_glue_layouts_are_read(tmp_path, tiny_tokenizer_dir):
    from bertcli.data.conll import read_ner
    from bertcli.tasks.classify import ClassifyOptions, ClassifyTask
    from bertcli.tasks.ner import NerOptions, NerTask
    from bertcli.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    task = ClassifyTask(tok, ClassifyOptions(), 32)
    refused = {
        "twice.tsv": ("sentence\tlabel\tlabel\ngood\tpos\tx\n", r"twice.tsv: line 1: the header names 'label' more than once"),
        "pairs.jsonl": ('{"text": "a", "label": "same"}\n{"text": "b", "text_b": "c", "label": "diff"}\n',
                        r"pairs.jsonl: line 2: a text pair \('text_b'\), but the first row has none"),
        "mac.tsv": ("sentence\tlabel\rgood\tpos\rbad\tneg\r", r"mac.tsv: line 1: a carriage return \(\\r\) inside the line"),
    }
    for name, (text, message) in refused.items():
        (tmp_path / name).write_text(text, encoding="utf-8", newline="")
        with pytest.raises(DataError, match=message):
            task.read(tmp_path / name)
    (tmp_path / "headed.tsv").write_text("sentence\tlabel\ngood\tpos\n", encoding="utf-8")
    for columns in (["sentence", "label"], ["text", "label"]):  # the label column alone gives it away
        with pytest.raises(DataError, match=r"headed.tsv: line 1: a header row \(sentence, label\), as a field is "
                                            r"named as its column, but task.columns"):
            ClassifyTask(tok, ClassifyOptions(columns=columns), 32).read(tmp_path / "headed.tsv")
    (tmp_path / "cell.tsv").write_text("sentence\tlabel\ngo\rod\tpos\nbad\tneg\n", encoding="utf-8", newline="")
    assert [e.text for e in task.read(tmp_path / "cell.tsv")] == ["go\rod", "bad"]  # a \r in a cell is text
    (tmp_path / "qnli.tsv").write_text("index\tquestion\tsentence\tlabel\n0\twho?\tme.\tentailment\n", encoding="utf-8")
    assert [(e.text, e.pair) for e in task.read(tmp_path / "qnli.tsv")] == [("who?", "me.")]  # the question first
    (tmp_path / "lines.csv").write_text('sentence,label\n"the film is\nwonderful",pos\ni hated it,neg\nbroken\n',
                                        encoding="utf-8")
    with pytest.raises(DataError, match=r"lines.csv: line 5: 1 columns"):  # lines of the file, not records
        task.read(tmp_path / "lines.csv")
    (tmp_path / "lines.csv").write_text('sentence,label\n"the film is\nwonderful",pos\ni hated it,neg\n', encoding="utf-8")
    assert [(e.text, e.where.rsplit(" ", 1)[1]) for e in task.read(tmp_path / "lines.csv")] == [
        ("the film is\nwonderful", "2"), ("i hated it", "4")]  # the line break kept, not the words glued
    (tmp_path / "mac.conll").write_text("EU B-ORG\rrejects O\r", encoding="utf-8", newline="")
    with pytest.raises(DataError, match=r"mac.conll: line 1: a carriage return"):
        read_ner(tmp_path / "mac.conll")
    (tmp_path / "none.conll").write_text("EU O\nrejects O\n\nPeter O\n", encoding="utf-8")
    ner = NerTask(tok, NerOptions(), 32)
    with pytest.raises(DataError, match=r"none.conll: every word is tagged O"):
        ner.labels_from(ner.read(tmp_path / "none.conll"))
    (tmp_path / "bioes.conll").write_text("EU S-PER\n\nGerman B-MISC\ncall E-MISC\n", encoding="utf-8")
    ner.labels = ["O", "B-PER", "I-PER"]
    with pytest.raises(DataError, match=r"bioes.conll: line 3: the sentence from this line has the tag 'B-MISC' \(tags "
                                        r"read as BIO\), which is not one the model knows"):
        ner.check_labels(ner.read(tmp_path / "bioes.conll"))


def test_json_lines_through_a_pipe_are_read_as_json_lines(tmp_path):
    """A pipe (/dev/stdin, <(...)) has no suffix to tell its format: text that starts with `{` is JSON lines
    (a name without a suffix stands for one here); a SQuAD file through a pipe is still one document."""
    import os
    import threading

    from bertcli.data.conll import read_ner
    from bertcli.data.squad import read_squad
    from bertcli.data.tables import read_rows

    rows = {read_rows: '{"text": "a", "label": "x"}\n', read_ner: '{"tokens": ["EU"], "tags": ["B-ORG"]}\n',
            read_squad: '{"id": "1", "question": "Who?", "context": "the doctor", "answers": '
                        '[{"text": "the doctor", "answer_start": 0}]}\n'}
    for reader, text in rows.items():
        fifo = tmp_path / f"{reader.__name__}-pipe"
        os.mkfifo(fifo)
        threading.Thread(target=fifo.write_text, args=(text,), daemon=True).start()
        got = reader(fifo)
        got = got[0] if reader is read_squad else got
        assert len(list(got)) == 1, reader
    (tmp_path / "squad").write_text(json.dumps({"data": [{"paragraphs": [{"context": "the doctor", "qas": [
        {"id": "1", "question": "Who?", "answers": [{"text": "the doctor", "answer_start": 0}]}]}]}]}))
    assert len(read_squad(tmp_path / "squad")[0]) == 1


@pytest.mark.slow
def test_evaluate_report_writes_figures(trained, tmp_path, cli):
    pytest.importorskip("matplotlib")
    d, train, _ = trained
    done = cli("evaluate", str(d / "run"), "--data", str(train), "--report", str(tmp_path / "report"))
    assert done.returncode == 0, done.stderr
    for name in ("confusion.png", "loss.png", "eval.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_predict_int8_quantizes_and_keeps_the_answers(trained, cli):
    from bertcli.jobs import load_for_task
    from bertcli.predict import quantize_int8

    d, _, _ = trained
    model = quantize_int8(load_for_task(d / "run")[0].model)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    lines = ("\n".join(t for t, _ in ROWS) + "\n").encode()
    runs = {name: cli("predict", str(d / "run"), "--precision", name, stdin=lines) for name in ("fp32", "bf16")}
    runs["int8"] = run_cli("predict", str(d / "run"), "--int8", stdin=lines)  # its own process: its warnings are seen
    assert runs["int8"].returncode == 0, runs["int8"].stderr
    assert b"Warning" not in runs["int8"].stderr
    answers = {name: [json.loads(x) for x in done.stdout.decode().splitlines()] for name, done in runs.items()}
    assert [a["label"] for a in answers["int8"]] == [label for _, label in ROWS]
    for other in ("fp32", "bf16"):  # int8 arithmetic really ran (neither of the others), and stayed close
        differences = [abs(a["score"] - b["score"]) for a, b in zip(answers[other], answers["int8"])]
        assert 0 < max(differences) < 0.05

"""Suites and sweeps: several fine-tuning runs into one directory, one table, resumable, and as
careful with the user's files as a single run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bertcli.errors import BertcliError, Interrupted
from bertcli.rundir import LOCK, MARKER
from conftest import REVIEWS, ROOT, STEPPING, stepping_env, write_recipe

SIMILAR = ("sentence1\tsentence2\tscore\n" + "the film is good\tthe film is fine\t4.5\n"
           "a dull plot\ti loved it\t0.5\ni hated it\ti hated it\t5.0\nthe plot\ta film\t1.0\n")


@pytest.fixture
def recipes(tmp_path, tiny_tokenizer_dir) -> list[Path]:
    """Two tiny recipes of different tasks (classification by accuracy, regression by Pearson and
    Spearman), each trained and scored on its own small file."""
    (tmp_path / "reviews.tsv").write_text(REVIEWS, encoding="utf-8")
    (tmp_path / "similar.tsv").write_text(SIMILAR, encoding="utf-8")
    sentiment = write_recipe(tmp_path / "sentiment.yaml", {"name": "classify"},
                             {"train": str(tmp_path / "reviews.tsv"), "eval": str(tmp_path / "reviews.tsv"),
                              "max_seq_len": 16}, {"max_steps": 3}, tokenizer=tiny_tokenizer_dir)
    similar = write_recipe(tmp_path / "similar.yaml", {"name": "regression", "headline": ["pearson", "spearman"]},
                           {"train": str(tmp_path / "similar.tsv"), "eval": str(tmp_path / "similar.tsv"),
                            "max_seq_len": 16}, {"max_steps": 3}, tokenizer=tiny_tokenizer_dir)
    return [sentiment, similar]


def _suite(recipes, out, sets=(), sweeps=(), resume=False, overwrite=False):
    from bertcli.suite import plan, run_suite

    return run_suite(plan(list(recipes), list(sets), list(sweeps)), out, resume, overwrite)


def test_a_suite_runs_each_recipe_into_its_own_directory_and_averages_the_headlines(recipes, tmp_path):
    from bertcli.suite import render

    summary = _suite(recipes, tmp_path / "suite")
    runs = {r["name"]: r for r in summary["runs"]}
    assert list(runs) == ["sentiment", "similar"]
    for name, run in runs.items():
        metrics = json.loads((tmp_path / "suite" / name / "metrics.json").read_text())
        assert run["metrics"] == metrics
    similar = runs["similar"]["metrics"]
    assert runs["similar"]["score"] == pytest.approx((similar["eval_pearson"] + similar["eval_spearman"]) / 2)
    assert runs["sentiment"]["score"] == runs["sentiment"]["metrics"]["eval_accuracy"]
    assert summary["average"] == pytest.approx((runs["sentiment"]["score"] + runs["similar"]["score"]) / 2)
    assert json.loads((tmp_path / "suite" / "suite.json").read_text())["average"] == pytest.approx(summary["average"])
    table = render(summary)
    assert "sentiment" in table and "average" in table and f"{summary['average']:.4f}" in table


def test_a_sweep_runs_the_grid_and_marks_the_best(recipes, tmp_path):
    summary = _suite(recipes[:1], tmp_path / "sweep", sweeps=["train.lr=1e-5,3e-3", "train.seed=1,2"])
    names = [r["name"] for r in summary["runs"]]
    assert names == ["lr=1e-5,seed=1", "lr=1e-5,seed=2", "lr=3e-3,seed=1", "lr=3e-3,seed=2"]
    for run in summary["runs"]:
        saved = yaml.safe_load((tmp_path / "sweep" / run["name"] / "recipe.yaml").read_text())["train"]
        assert (saved["lr"], saved["seed"]) == (float(run["values"]["train.lr"]), int(run["values"]["train.seed"]))
    best = max(summary["runs"], key=lambda r: r["score"])
    assert summary["best"] == {"sentiment": best["name"]}


def test_the_best_run_of_each_recipe_and_their_average_are_marked(recipes, tmp_path):
    """Distinct scores (the tiny runs above often tie): the best is the highest, the average is GLUE's."""
    from bertcli.suite import _write_summary, plan, render

    points = plan(recipes, [], ["train.seed=1,2,3"])
    rows = [{"name": p.name, "group": p.group, "values": p.values, "headline": ["accuracy"], "seconds": 1.0,
             "metrics": {"eval_accuracy": score} if score is not None else {}, "score": score}
            for p, score in zip(points, [0.2, 0.7, None, 0.5, 0.1, 0.3])]
    (tmp_path / "s").mkdir()
    summary = _write_summary(tmp_path / "s", points, rows)
    assert summary["best"] == {"sentiment": "sentiment/seed=2", "similar": "similar/seed=1"}
    assert summary["average"] == pytest.approx((0.7 + 0.5) / 2)
    table = render(summary)
    marked = [line for line in table.splitlines() if "*" in line]
    assert len(marked) == 2 and "seed=2" in marked[0] and "0.7000" in marked[0] and "similar/seed=1" in marked[1]
    assert _write_summary(tmp_path / "s", points, rows[:3])["average"] is None  # a recipe without a score yet


def _stop_the_second_run(monkeypatch) -> list[str]:
    """finetune as it is, but its second call stops as Ctrl-C stops a run; returns the names of the runs called."""
    import bertcli.jobs

    real, calls = bertcli.jobs.finetune, []

    def stopped_second(recipe, out, *args, **kwargs):
        calls.append(out.name)
        if len(calls) == 2:
            raise Interrupted("SIGINT at step 1: saved", 130)
        return real(recipe, out, *args, **kwargs)

    monkeypatch.setattr(bertcli.jobs, "finetune", stopped_second)
    return calls


def test_an_interrupted_suite_resumes_without_running_finished_runs_again(recipes, tmp_path, monkeypatch):
    calls = _stop_the_second_run(monkeypatch)
    with pytest.raises(Interrupted, match="1 of 2 runs finished; the same command with --resume continues it"):
        _suite(recipes, tmp_path / "suite")
    assert [r["name"] for r in json.loads((tmp_path / "suite" / "suite.json").read_text())["runs"]] == ["sentiment"]
    first = (tmp_path / "suite" / "sentiment" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(BertcliError, match="already exists; pass --resume to continue it or pass --overwrite"):
        _suite(recipes, tmp_path / "suite")
    summary = _suite(recipes, tmp_path / "suite", resume=True)
    assert calls == ["sentiment", "similar", "similar"]  # the finished run was kept, not run again
    assert (tmp_path / "suite" / "sentiment" / "model.safetensors").stat().st_mtime_ns == first
    assert [r["name"] for r in summary["runs"]] == ["sentiment", "similar"] and summary["average"] is not None
    with pytest.raises(BertcliError, match=r"was run with another recipe \(train.max_steps: 3 then, 4 now\)"):
        _suite(recipes, tmp_path / "suite", sets=["train.max_steps=4"], resume=True)
    summary = _suite(recipes, tmp_path / "suite", sets=["train.max_steps=4"], overwrite=True)
    assert all(json.loads((tmp_path / "suite" / n / "log.jsonl").read_text().splitlines()[-1])["step"] == 4
               for n in ("sentiment", "similar"))


def test_a_resumed_sweep_refuses_runs_whose_data_changed_since_they_ran(recipes, tmp_path):
    """A finished run is kept by the same recipe; scored on what its eval file held then, it cannot be ranked
    beside runs scored on what the file holds now."""
    _suite(recipes[:1], tmp_path / "sweep", sweeps=["train.seed=1,2"])
    reviews = tmp_path / "reviews.tsv"
    reviews.write_text(reviews.read_text().replace("\tpos", "\tneg"), encoding="utf-8")
    with pytest.raises(BertcliError, match=rf"seed=1: {re.escape(str(reviews))} has changed since the run began; "
                                           "move that run away to run it again"):
        _suite(recipes[:1], tmp_path / "sweep", sweeps=["train.seed=1,2,3"], resume=True)


def test_a_recipe_saved_when_model_dropout_was_always_written_still_matches(recipes, tmp_path):
    """Before model.dropout could be unset, every saved recipe.yaml said 0.1, which meant what unset means
    now (0.1 for a new model; ignored with model.init): a suite resumed across that change keeps its runs."""
    from bertcli.recipes import load_recipe, recipe_to_dict
    from bertcli.recipes import recipe_change

    recipe = load_recipe(recipes[0], ["model.dropout=null"])
    saved = recipe_to_dict(recipe)
    saved["model"]["dropout"] = 0.1
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(saved), encoding="utf-8")
    assert recipe.model.dropout is None and recipe_change(tmp_path, recipe) is None
    assert recipe_change(tmp_path, load_recipe(recipes[0], ["model.dropout=0.2"])) == "model.dropout: 0.1 then, 0.2 now"
    saved["model"]["dropout"] = 0.0
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(saved), encoding="utf-8")
    assert recipe_change(tmp_path, recipe) == "model.dropout: 0.0 then, null now"


# The recipe keys outside task: when suites were first saved (2026-11-30)
FIRST_KEYS = {"data.eval", "data.max_seq_len", "data.train", "model.dropout", "model.hidden_size", "model.init",
              "model.intermediate_size", "model.max_position", "model.num_heads", "model.num_layers", "output",
              "tokenizer", "train.batch_size", "train.epochs", "train.eval_every", "train.grad_accum",
              "train.group_by_length", "train.log_every", "train.lr", "train.max_grad_norm", "train.max_steps",
              "train.precision", "train.save_every", "train.seed", "train.time_budget", "train.warmup_ratio",
              "train.weight_decay"}


def test_a_recipe_saved_before_a_key_existed_matches_that_key_at_the_value_that_ran_then(recipes, tmp_path):
    """A run saved by an older bertcli has no line for a key added since: it ran as that key's listed value
    runs (recipes.ADDED_KEYS), so it matches that value and no other; every key added since is listed."""
    from bertcli.recipes import load_recipe, recipe_to_dict
    from bertcli.recipes import ADDED_KEYS, recipe_change

    recipe = load_recipe(recipes[0])
    saved = recipe_to_dict(recipe)
    now = {f"{part}.{k}" if isinstance(v, dict) else part for part, v in saved.items() for k in (v if isinstance(v, dict) else [0])}
    assert {k for k in now if not k.startswith("task.")} == FIRST_KEYS | set(ADDED_KEYS), \
        "a recipe key was added: list it in recipes.ADDED_KEYS with the value that runs as before"
    for key in ADDED_KEYS:
        part, name = key.split(".")
        del saved[part][name]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(saved), encoding="utf-8")
    assert recipe_change(tmp_path, recipe) is None
    assert recipe_change(tmp_path, load_recipe(recipes[0], ["train.compile=true"])) == "train.compile: false then, true now"


def test_a_run_that_fails_ends_itself_alone_and_the_suite_with_exit_2(recipes, tmp_path, cli):
    done = cli("finetune", str(recipes[0]), "--out", str(tmp_path / "sweep"), "--sweep", "train.lr=1e-3,1e12")
    assert done.returncode == 2, done.stderr.decode()[-2000:]
    assert b"1 of 2 runs failed" in done.stderr and b"lr=1e12" in done.stderr
    summary = json.loads((tmp_path / "sweep" / "suite.json").read_text())
    assert summary["best"] == {"sentiment": "lr=1e-3"} and "error" in summary["runs"][1]
    assert b"lr=1e-3" in done.stdout  # the table of the others



def test_a_second_sigterm_between_runs_ends_the_suite_as_the_first_would(recipes, tmp_path, monkeypatch, cli):
    """Schedulers send SIGTERM more than once: the second, between runs, stops the suite at once, with 143, the
    line that says how to continue, and suite.json holding the run that finished."""
    import bertcli.suite as suite

    write, calls = suite._write_summary, []

    def twice_terminated(*args):
        calls.append(1)
        if len(calls) == 1:  # the first run's row is being written
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return write(*args)

    monkeypatch.setattr(suite, "_write_summary", twice_terminated)
    # (bertcli's handler takes the signals; were it missing, this one fails the test rather than end the session)
    previous = signal.signal(signal.SIGTERM, lambda *_: pytest.fail("SIGTERM reached no handler of bertcli's"))
    try:
        done = cli("finetune", *map(str, recipes), "--out", str(tmp_path / "s"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = done.stderr.decode()
    assert done.returncode == 143 and "SIGTERM again: stopped at once" in err and "--resume continues it" in err, err
    assert [r["name"] for r in json.loads((tmp_path / "s" / "suite.json").read_text())["runs"]] == ["sentiment"]
    monkeypatch.setattr(suite, "_write_summary", write)
    done = cli("finetune", *map(str, recipes), "--out", str(tmp_path / "s"), "--resume")
    assert done.returncode == 0 and b"finished before, kept" in done.stderr, done.stderr.decode()[-2000:]
    from bertcli import cli as entry
    from bertcli.streams import Closed

    monkeypatch.setattr(entry, "guard", lambda: Closed(stdout=True))  # `>&-`: the table is said to be in suite.json
    done = cli("finetune", *map(str, recipes), "--out", str(tmp_path / "s"), "--resume")
    assert done.returncode == 0 and f"stdout is closed: the table is not shown; {tmp_path / 's' / 'suite.json'} has " \
        "it" in done.stderr.decode()

@pytest.mark.slow
def test_a_failed_run_ends_the_suite_with_exit_2_when_the_tables_reader_is_gone(recipes, tmp_path):
    """`| true` (or `| head -1`): the table cannot be written, and the exit code still says a run failed."""
    command = (f"{sys.executable} -m bertcli finetune {recipes[0]} --out {tmp_path / 's'} --sweep train.lr=1e-3,1e12 "
               "2>/dev/null | true; exit ${PIPESTATUS[0]}")
    done = subprocess.run(["bash", "-c", command], env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 2
    assert "error" in json.loads((tmp_path / "s" / "suite.json").read_text())["runs"][1]


def test_nothing_is_run_or_touched_when_one_run_s_directory_is_not_bertcli_s(recipes, tmp_path):
    out = tmp_path / "suite"
    _suite(recipes[:1], out, sweeps=["train.seed=1"])
    (out / "seed=2").mkdir()
    (out / "seed=2" / "notes.txt").write_text("mine")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(BertcliError, match="seed=2: --resume refused: the directory was not written by bertcli"):
        _suite(recipes[:1], out, sweeps=["train.seed=1,2"], resume=True)
    with pytest.raises(BertcliError, match="holds files bertcli did not write"):
        _suite(recipes[:1], out, sweeps=["train.seed=1,2"], overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before and (out / "seed=2" / "notes.txt").read_text() == "mine"
    (out / "notes.txt").write_text("mine too")  # a file of the user's in the suite itself
    (out / "seed=2" / "notes.txt").unlink()
    (out / "seed=2").rmdir()
    with pytest.raises(BertcliError, match=r"--overwrite refused: it holds files bertcli did not write \(notes.txt\)"):
        _suite(recipes[:1], out, sweeps=["train.seed=1,2"], overwrite=True)
    assert not (out / "seed=2").exists()


@pytest.mark.parametrize("args, message", [
    (["--sweep", "train.lr"], "--sweep 'train.lr': expected KEY=V1,V2,..."),
    (["--sweep", "train.lr=1e-3,", ], "with no empty value"),
    (["--sweep", "train.lr=1,2", "--sweep", "train.lr=3"], "--sweep train.lr: given twice"),
    (["--sweep", "train.lrr=1,2"], "train.lrr: unknown key (did you mean 'train.lr'?) (--sweep train.lrr=1)"),
    (["--sweep", "train.lr=-1,2"], "train.lr: must be greater than 0"),
])
def test_a_bad_sweep_is_one_message_and_exit_2_before_any_run(recipes, tmp_path, args, message, cli):
    done = cli("finetune", str(recipes[0]), "--out", str(tmp_path / "s"), *args)
    assert done.returncode == 2 and message in done.stderr.decode(), done.stderr.decode()[-2000:]
    assert b"Traceback" not in done.stderr and not (tmp_path / "s").exists()


def test_suites_refuse_what_they_cannot_run(recipes, tmp_path, tiny_tokenizer_dir, cli):
    (tmp_path / "corpus.txt").write_text("the film is good.\n\nthe plot is dull.\n")
    pretraining = write_recipe(tmp_path / "pt.yaml", {"name": "pretrain"}, {"train": str(tmp_path / "corpus.txt")},
                               {"max_steps": 1}, tokenizer=tiny_tokenizer_dir)
    twin = tmp_path / "other"
    twin.mkdir()
    (twin / "sentiment.yaml").write_bytes(recipes[0].read_bytes())
    for args, message in [
        ([str(recipes[0]), str(twin / "sentiment.yaml"), "--out", str(tmp_path / "s")], "two recipes are named 'sentiment'"),
        ([*map(str, recipes)], "a suite or sweep needs --out DIR"),
        ([*map(str, recipes), "--out", str(tmp_path)], "contains"),  # the recipes and data lie inside it
        ([str(recipes[0]), str(pretraining), "--out", str(tmp_path / "s")],
         "is trained by `bertcli pretrain`; a suite holds fine-tuning recipes"),
    ]:
        done = cli("finetune", *args)
        assert done.returncode == 2 and message in done.stderr.decode(), (args, done.stderr.decode()[-2000:])
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_ctrl_c_in_a_suite_then_resume_finishes_it(recipes, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    long = ["--set", "train.max_steps=12", "--set", "train.eval_every=4"]  # (the signal comes at a step, not a time)
    command = [sys.executable, "-m", "bertcli", "finetune", *map(str, recipes), "--out", str(tmp_path / "s"), *long]
    proc = subprocess.Popen([sys.executable, "-c", STEPPING, *command[3:]], env=stepping_env("SIGINT", 3),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # Ctrl-C at the first run's 3rd step
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and b"the same command with --resume continues it" in err, err.decode()[-2000:]
    assert (tmp_path / "s" / "sentiment" / "resume.pt").is_file()
    done = subprocess.run([*command[:-4], "--set", "train.max_steps=6", "--resume"], env=env, capture_output=True,
                          timeout=300)
    assert done.returncode == 2 and b"was run with another recipe" in done.stderr  # the budget is part of the recipe
    done = subprocess.run([*command, "--resume"], env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert b"[1/2] sentiment: resuming" in done.stderr
    assert [r["name"] for r in json.loads((tmp_path / "s" / "suite.json").read_text())["runs"]] == ["sentiment", "similar"]


def test_a_run_directory_that_is_a_symbolic_link_is_refused_even_on_resume(recipes, tmp_path):
    out = tmp_path / "sweep"
    _suite(recipes[:1], out, sweeps=["train.seed=1,2"])
    elsewhere = tmp_path / "precious"
    (out / "seed=2").rename(elsewhere)  # a run of bertcli's, now outside the suite, and a link in its place
    (out / "seed=2").symlink_to(elsewhere)
    (elsewhere / "metrics.json").unlink()
    before = {p.name: p.read_bytes() for p in elsewhere.iterdir() if p.is_file()}
    with pytest.raises(BertcliError, match="seed=2: is a symbolic link"):
        _suite(recipes[:1], out, sweeps=["train.seed=1,2"], resume=True)
    with pytest.raises(BertcliError, match=r"--overwrite refused: it holds files bertcli did not write \(seed=2\)"):
        _suite(recipes[:1], out, sweeps=["train.seed=1,2"], overwrite=True)
    assert {p.name: p.read_bytes() for p in elsewhere.iterdir() if p.is_file()} == before


def test_names_and_sizes_a_suite_cannot_hold_are_refused_at_once(recipes, tmp_path):
    from bertcli.suite import MAX_NAME, plan

    long_value = "0." + "0" * 300 + "2"  # a valid learning rate, too long for a file name as it is
    points = plan(recipes[:1], [], [f"train.lr=1e-3,{long_value}"])
    assert len(points[1].name) <= MAX_NAME and points[1].name.startswith("lr=0.000")
    values = ",".join(map(str, range(1, 11)))
    axes = [f"{key}={values}" for key in ("train.seed", "train.max_steps", "train.batch_size", "train.log_every",
                                          "train.grad_accum", "train.eval_every", "train.save_every", "model.num_layers")]
    with pytest.raises(BertcliError, match="train.lr is given by both --set and --sweep: one would replace"):
        plan(recipes[:1], ["train.lr=1e-3"], ["train.lr=2e-5,3e-5"])
    for sets, sweep in [("train={lr: 1e-3}", "train.lr=2e-5,3e-5"), ("train.lr=1e-3", "train={lr: 2e-5},{lr: 3e-5}")]:
        with pytest.raises(BertcliError, match=r"--set train(\.lr)? and --sweep train(\.lr)? overlap"):
            plan(recipes[:1], [sets], [sweep])  # a section and a key in it: one replaces the other
    assert [p.recipe.train.seed for p in plan(recipes[:1], ["train.seed=3"], ["train.lr=2e-5,3e-5"])] == [3, 3]
    with pytest.raises(BertcliError, match="100,000,000 runs; at most 1,000"):  # (the grid itself would not fit)
        plan(recipes[:1], [], axes)
    odd = tmp_path / "suite.json.yaml"
    odd.write_bytes(recipes[0].read_bytes())
    with pytest.raises(BertcliError, match="a recipe named 'suite.json' cannot name a run's directory"):
        plan([odd, recipes[1]], [], [])


def test_a_stop_request_inside_another_starts_with_its_signal():
    from bertcli.train import StopRequest

    outer = StopRequest()
    try:
        fresh = StopRequest()
        assert not fresh.is_set()
        fresh.release()
        outer._handle(signal.SIGTERM, None)  # Ctrl-C or SIGTERM between a suite's runs, or while one is prepared
        inner = StopRequest()
        assert inner.signum == signal.SIGTERM  # the run then stops after its first step
        inner.release()
        assert signal.getsignal(signal.SIGINT) == outer._handle
    finally:
        outer.release()


def test_a_single_run_into_a_running_suite_is_refused(recipes, tmp_path, monkeypatch):
    from bertcli.evaluate import check_outputs
    from bertcli.rundir import claim

    out = tmp_path / "suite"
    _suite(recipes[:1], out, sweeps=["train.seed=1,2"])
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; "
            f"from bertcli.rundir import claim; c = claim(Path({str(out)!r}), 'suite', resume=True); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(BertcliError, match=rf"lies in the suite .*, which another bertcli process \(pid {holder.pid}\)"):
            claim(out / "seed=2", "run", resume=True)
        (tmp_path / "link").symlink_to(out / "seed=2")
        monkeypatch.chdir(out / "seed=1")
        for deeper in (out / "seed=2" / "a" / "b" / "c", Path("x"), tmp_path / "link" / "y"):
            with pytest.raises(BertcliError, match="lies in the suite"):
                claim(deeper, "run", resume=False)
            assert not Path(os.path.abspath(deeper)).exists()
        for metrics in (out / "eval.json", out / "seed=2" / "eval.json"):  # evaluate --out FILE
            with pytest.raises(BertcliError, match="lies in the suite"):
                check_outputs(metrics, None, [tmp_path / "elsewhere", recipes[0]])
    finally:
        holder.kill()
        holder.wait()
    claim(out / "seed=2", "run", resume=True).release()  # once the suite has ended


def test_a_refused_overwrite_leaves_the_suite_as_it_was(recipes, tmp_path):
    """A sweep per recipe over a suite of single runs: each recipe's directory holds a run, not a sweep,
    and the refusal comes before the suite's own files (suite.json) are touched."""
    out = tmp_path / "suite"
    _suite(recipes, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(BertcliError, match="sentiment: holds a bertcli run, not a bertcli suite or sweep"):
        _suite(recipes, out, sweeps=["train.seed=1,2"], overwrite=True)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("file, text, message", [
    ("metrics.json", "[]", "metrics.json: not a JSON object"),
    ("metrics.json", '{"eval_accuracy": 0.5', "metrics.json: not JSON"),
    ("metrics.json", '{"eval_accuracy": "high"}', "metrics.json: eval_accuracy is not a number"),
    ("metrics.json", '{"eval_accuracy": 1e400}', "metrics.json: a value that is not a finite number"),
    ("metrics.json", '{"eval_accuracy": 1' + "0" * 400 + "}", "metrics.json: a value that is not a finite number"),
    ("recipe.yaml", "a: " + "[" * 5000 + "]" * 5000, "its recipe.yaml cannot be read \\(YAML refused: nested more than 32 levels"),
    ("recipe.yaml", "- 1\n", "its recipe.yaml cannot be read \\(expected a mapping of sections"),
], ids=["list", "cut", "text", "infinite", "huge-integer", "deep", "not-a-mapping"])
def test_a_finished_run_that_cannot_be_kept_is_refused_before_any_run(recipes, tmp_path, file, text, message):
    out = tmp_path / "sweep"
    _suite(recipes[:1], out, sweeps=["train.seed=1"])
    (out / "seed=1" / file).write_text(text, encoding="utf-8")
    with pytest.raises(BertcliError, match=message):
        _suite(recipes[:1], out, sweeps=["train.seed=1,2"], resume=True)
    assert not (out / "seed=2").exists()


def test_times_in_suite_json_that_are_not_seconds_are_not_shown(recipes, tmp_path):
    from bertcli.suite import render

    out = tmp_path / "sweep"
    _suite(recipes[:1], out, sweeps=["train.seed=1"])
    summary = json.loads((out / "suite.json").read_text())
    summary["runs"][0]["seconds"] = "x"
    (out / "suite.json").write_text(json.dumps(summary))
    again = _suite(recipes[:1], out, sweeps=["train.seed=1,2"], resume=True)
    assert again["runs"][0]["seconds"] is None and isinstance(again["runs"][1]["seconds"], float)
    assert "seed=2" in render(again)


def test_sweep_values_are_split_outside_brackets_and_quotes():
    from bertcli.suite import parse_sweeps

    assert parse_sweeps(["model.init_layers=[0,2,4],[0, 1]", "train.lr=1e-3,2e-3"]) == [
        ("model.init_layers", ["[0,2,4]", "[0, 1]"]), ("train.lr", ["1e-3", "2e-3"])]
    for values in ("[1e-5,2e-5", "1e-5],[2e-5,3e-5]"):
        with pytest.raises(BertcliError, match="unbalanced brackets"):
            parse_sweeps([f"train.lr={values}"])
    assert parse_sweeps(["""data.train='a,b.tsv',"c,\\"d.tsv",it's.tsv,'it''s,e.tsv',['f,g.tsv', h.tsv]"""]) == [
        ("data.train", ["'a,b.tsv'", '"c,\\"d.tsv"', "it's.tsv", "'it''s,e.tsv'", "['f,g.tsv', h.tsv]"])]
    with pytest.raises(BertcliError, match=re.escape("a quote (') is not closed")):
        parse_sweeps(["data.train='a.tsv,b.tsv"])


def test_sweep_values_written_differently_that_give_the_same_recipe_are_refused(recipes, tmp_path, monkeypatch):
    from bertcli.suite import plan

    data = Path(yaml.safe_load(recipes[0].read_text())["data"]["train"])
    (tmp_path / "link.tsv").symlink_to(data)
    for sweep in (f"data.train={data},[{data}]",  # one file, and a list of that one file
                  f"data.train={data},{data.parent}/./{data.name},{tmp_path / 'link.tsv'}",
                  "train.time_budget=30m,1800s", "output=a,b", "train.lr=1e-3,0.001", "train.lr=1e-3,1e-3",
                  "train.weight_decay=0,0.0", "model.dropout=null,0.1"):  # (unset: BERT's 0.1 from scratch)
        with pytest.raises(BertcliError, match="give the same recipe"):
            plan(recipes[:1], [], [sweep])
    assert len(plan(recipes[:1], [], ["train.time_budget=30m,31m"])) == 2
    assert len(plan(recipes[:1], [], ["train.seed=9007199254740993,9007199254740992"])) == 2  # integers exactly
    other = yaml.safe_load(recipes[1].read_text())["data"]["train"]
    assert len(plan(recipes[:1], [], [f"data.train={data},{other}"])) == 2  # two files
    (tmp_path / "sentence").mkdir()
    monkeypatch.chdir(tmp_path)  # a column's name is not a path, though a directory bears it
    assert len(plan(recipes[:1], [], ["task.text_column=sentence,sentence/,./sentence"])) == 3


def test_a_pipe_that_several_runs_would_read_is_refused_before_any_run(recipes, tmp_path):
    from bertcli.suite import check_runs, plan
    from bertcli.train import StopRequest

    os.mkfifo(tmp_path / "fifo")
    stop = StopRequest()
    try:
        for points in (plan(recipes[:1], [f"data.train={tmp_path / 'fifo'}"], ["train.lr=1e-3,2e-3"]),
                       plan(recipes, [f"data.eval={tmp_path / 'fifo'}"], [])):
            with pytest.raises(BertcliError, match="a pipe can be read only once, and 2 runs read it"):
                check_runs(points, ["new", "new"], stop)
            check_runs(points, ["done", "new"], stop)  # resumed with the first run finished: one run reads it
    finally:
        stop.release()


def test_names_alike_but_for_replaced_characters_are_told_apart_and_the_first_keeps_its_name():
    from bertcli.suite import _point_names

    def names(axes):
        import itertools
        return _point_names(axes, [dict(zip((k for k, _ in axes), v)) for v in itertools.product(*(v for _, v in axes))])

    before = names([("data.train", ["a b.tsv", "x.tsv"])])
    after = names([("data.train", ["a b.tsv", "x.tsv", "a/b.tsv", "a_b.tsv", "a+b.tsv"])])
    assert after[:2] == before == ["train=a_b.tsv", "train=x.tsv"]
    assert len(set(after)) == 5 and after[2].startswith("train=a_b.tsv-") and after[3].startswith("train=a_b.tsv-")
    assert after[4] == "train=a+b.tsv"
    two = names([("data.train", ["a_b.tsv", "a b.tsv"]), ("model.init", ["m 1"])])
    assert two[0] == "train=a_b.tsv,init=m_1" and two[1].startswith("train=a_b.tsv,init=m_1-")


def test_a_resumed_sweep_keeps_each_finished_run_in_the_directory_its_values_ran_in(recipes, tmp_path, monkeypatch):
    """Values added on --resume rename no finished run, and a suite that numbered names alike (as bertcli once
    did: 001-, 002-) resumes with its runs where they are."""
    from bertcli.suite import _names_kept, plan

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r v.tsv").write_text(REVIEWS, encoding="utf-8")
    (tmp_path / "r_v.tsv").write_text(REVIEWS, encoding="utf-8")
    out = tmp_path / "sweep"
    _suite(recipes[:1], out, sweeps=["data.train=r v.tsv"])
    finished = (out / "train=r_v.tsv" / "metrics.json").stat().st_mtime_ns
    summary = _suite(recipes[:1], out, sweeps=["data.train=r_v.tsv,r v.tsv"], resume=True)
    names = {r["values"]["data.train"]: r["name"] for r in summary["runs"]}
    assert names["r v.tsv"] == "train=r_v.tsv" and names["r_v.tsv"].startswith("train=r_v.tsv-")
    assert (out / "train=r_v.tsv" / "metrics.json").stat().st_mtime_ns == finished
    (out / "train=r_v.tsv").rename(out / "001-train=r_v.tsv")  # the numbered names of an earlier bertcli
    saved = json.loads((out / "suite.json").read_text())
    saved["runs"] = [dict(r, name="001-train=r_v.tsv") if r["values"]["data.train"] == "r v.tsv" else r
                     for r in saved["runs"]]
    (out / "suite.json").write_text(json.dumps(saved))
    summary = _suite(recipes[:1], out, sweeps=["data.train=r_v.tsv,r v.tsv"], resume=True)
    assert {r["values"]["data.train"]: r["name"] for r in summary["runs"]}["r v.tsv"] == "001-train=r_v.tsv"
    assert (out / "001-train=r_v.tsv" / "metrics.json").stat().st_mtime_ns == finished
    assert not (out / "train=r_v.tsv").exists()
    saved = json.loads((out / "suite.json").read_text())
    saved["runs"][1]["group"] = ["a list"]  # a row that cannot be matched is passed over
    saved["runs"][0]["name"] = "../elsewhere"  # a name of another make in suite.json is not followed
    (out / "suite.json").write_text(json.dumps(saved))
    summary = _suite(recipes[:1], out, sweeps=["data.train=r_v.tsv,r v.tsv"], resume=True)
    assert summary["runs"][0]["name"] == "train=r_v.tsv" and (out / "train=r_v.tsv" / "metrics.json").is_file()
    assert not (tmp_path / "elsewhere").exists()
    points = plan(recipes[:1], [], ["data.train=r_v.tsv,r v.tsv"])
    (out / "001-train=r_v.tsv-0123456789ab").mkdir()
    for name in (str(out / "001-train=r_v.tsv"), "/001-train=r_v.tsv-0123456789ab", "../sweep/001-train=r_v.tsv"):
        rows = {name: {"name": name, "group": points[1].group, "values": points[1].values}}
        assert [p.name for p in _names_kept(points, out, rows)] == [p.name for p in points]
    (tmp_path / "tmp.yaml").write_text(recipes[0].read_text())  # a suite's run named as a directory of /
    points = plan([tmp_path / "tmp.yaml", recipes[1]], [], [])
    assert _names_kept(points, out, {"/tmp": {"name": "/tmp", "group": "tmp", "values": {}}})[0].name == "tmp"


@pytest.mark.parametrize("key", ["task.headline", "task.positive_label", "task.name", "data.eval", "task", "data"])
def test_what_scores_a_sweep_is_not_swept(key):
    from bertcli.suite import parse_sweeps

    with pytest.raises(BertcliError, match=f"--sweep {key}: a sweep ranks its runs against each other"):
        parse_sweeps([f"{key}=a,b"])
    assert parse_sweeps(["task.doc_stride=64,128"]) == [("task.doc_stride", ["64", "128"])]  # it shapes training alone


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 trains on a GPU")
def test_fp16_on_a_cpu_is_refused_before_an_output_directory_is_made(recipes, tmp_path):
    from bertcli.jobs import finetune
    from bertcli.recipes import load_recipe
    from bertcli.suite import plan

    with pytest.raises(BertcliError, match="fp16 needs a CUDA GPU"):
        finetune(load_recipe(recipes[0], ["train.precision=fp16"]), tmp_path / "run", resume=False, overwrite=False)
    assert not (tmp_path / "run").exists()
    fast = yaml.safe_load(recipes[1].read_text())
    fast["train"]["precision"] = "fp16"
    (tmp_path / "fast.yaml").write_text(yaml.safe_dump(fast), encoding="utf-8")
    with pytest.raises(BertcliError, match="fast.yaml: train.precision: fp16 needs a CUDA GPU"):
        plan([recipes[0], tmp_path / "fast.yaml"], [], [])  # before the first run, not when its turn comes


def test_what_a_later_run_reads_is_checked_before_the_first_run_starts(recipes, tmp_path, tiny_classifier_dir):
    """Its data's labels and its checkpoint's layers (a teacher likewise, jobs.prepare): found before any run
    trains, all at once."""
    (tmp_path / "odd.tsv").write_text("sentence\tlabel\nthe film\tmeh\n", encoding="utf-8")
    odd = yaml.safe_load(recipes[0].read_text())
    odd["data"]["eval"] = str(tmp_path / "odd.tsv")
    (tmp_path / "odd.yaml").write_text(yaml.safe_dump(odd), encoding="utf-8")
    deep = yaml.safe_load(recipes[1].read_text())  # layers its checkpoint does not have
    deep["model"] = {"init": str(tiny_classifier_dir), "init_layers": [0, 5]}
    (tmp_path / "deep.yaml").write_text(yaml.safe_dump(deep), encoding="utf-8")
    out = tmp_path / "suite"
    with pytest.raises(BertcliError) as caught:
        _suite([recipes[0], tmp_path / "odd.yaml", tmp_path / "deep.yaml"], out)
    message = str(caught.value)
    assert "odd: " in message and "label 'meh' is not one the model knows" in message, message
    assert "deep: " in message and "model.init_layers" in message, message
    assert not (out / "sentiment").exists() and not (out / "suite.json").exists()
    with pytest.raises(BertcliError) as caught:  # points that read the same are checked (and reported) once
        _suite([tmp_path / "odd.yaml"], tmp_path / "sweep", sweeps=["train.lr=1e-3,2e-3,3e-3"])
    assert str(caught.value).count("label 'meh'") == 1 and str(caught.value).startswith("lr=1e-3: ")


def test_a_suite_of_relative_paths_resumes_only_where_it_started(tmp_path, tiny_tokenizer_dir, monkeypatch):
    for place, rows in (("a", REVIEWS), ("b", "sentence\tlabel\nother words\tpos\nand more\tneg\n")):
        (tmp_path / place).mkdir()
        (tmp_path / place / "reviews.tsv").write_text(rows, encoding="utf-8")
    recipe = write_recipe(tmp_path / "sentiment.yaml", {"name": "classify"},
                          {"train": "reviews.tsv", "eval": "reviews.tsv", "max_seq_len": 16}, {"max_steps": 1},
                          tokenizer=tiny_tokenizer_dir)
    out = tmp_path / "sweep"
    monkeypatch.chdir(tmp_path / "a")
    _suite([recipe], out, sweeps=["train.seed=1"])
    monkeypatch.chdir(tmp_path / "b")  # the same names, other files
    with pytest.raises(BertcliError, match=f"the suite started in {tmp_path / 'a'}.*data.train: reviews.tsv"):
        _suite([recipe], out, sweeps=["train.seed=1,2"], resume=True)
    assert not (out / "seed=2").exists()
    (tmp_path / "a").rename(tmp_path / "moved")  # the project moved: nothing shows the files differ
    monkeypatch.chdir(tmp_path / "moved")
    assert len(_suite([recipe], out, sweeps=["train.seed=1,2"], resume=True)["runs"]) == 2


def test_a_sweep_per_recipe_stopped_before_its_last_recipe_started_resumes(recipes, tmp_path, monkeypatch):
    """The last recipe's sweep directory holds bertcli's marker and lock alone: --resume takes it as it is."""
    calls = _stop_the_second_run(monkeypatch)
    with pytest.raises(Interrupted, match="1 of 4 runs finished"):
        _suite(recipes, tmp_path / "suite", sweeps=["train.seed=1,2"])
    assert sorted(p.name for p in (tmp_path / "suite" / "similar").iterdir()) == sorted([LOCK, MARKER])
    summary = _suite(recipes, tmp_path / "suite", sweeps=["train.seed=1,2"], resume=True)
    assert [r["name"] for r in summary["runs"]] == ["sentiment/seed=1", "sentiment/seed=2", "similar/seed=1",
                                                    "similar/seed=2"]
    assert calls == ["seed=1", "seed=2", "seed=2", "seed=1", "seed=2"]

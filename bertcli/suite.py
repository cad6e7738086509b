"""Several fine-tuning runs as one job: a suite (several recipes, such as GLUE's: one run per recipe),
a sweep (`--sweep KEY=V1,V2,...`: one run per point of the grid), or both (a sweep per recipe).

The runs go into sub-directories of one output directory, one after another: several processes on
one machine would contend for the same cores. One table ranks them by each recipe's headline metrics
(task.headline; their mean when there are several, as GLUE counts a task with two metrics) and marks
the best point of each sweep; suite.json holds the same, rewritten after every run. An interrupted
suite continues with the same command and --resume: finished runs are kept as they are, an
interrupted one resumes from its checkpoint, and a run whose saved recipe differs from the one it
would run now is refused rather than mixed in."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


from bertcli.errors import BertcliError, Interrupted, RecipeError
from bertcli.fileio import atomic_write_text, finite_json
from bertcli.inputs import inputs_change, records, saved_records
from bertcli.recipes import Recipe, load_recipe, recipe_change, recipe_to_dict
from bertcli.rundir import check_apart, claim, marked_kind, precheck, resolved
from bertcli.textio import is_stream

SUMMARY = "suite.json"
MAX_POINTS = 1000  # runs in one grid: beyond any sweep a person means to run one after another
MAX_NAME = 120  # characters of a run's directory name made of its values (longer ones end in a hash)


@dataclass(frozen=True)
class Point:
    """One run of the suite."""

    name: str  # its directory, relative to the suite's
    group: str  # the recipe's name (its file name without .yaml)
    source: Path  # the recipe file
    recipe: Recipe
    values: dict[str, str] = field(default_factory=dict)  # this point's values of the swept keys


# what a sweep's runs are scored by: runs ranked against each other must be scored the same way
FIXED_IN_SWEEP = ("task.name", "task.headline", "task.positive_label", "task.labels", "task.label_column",
                  "data.eval")


def _split_values(values: str) -> list[str]:
    """`V1,V2,...` split at the commas outside brackets and quotes: `[0,2,4],[0,1,2]` is two lists,
    `'a,b.tsv',c.tsv` two files (quotes as YAML reads them: '' inside single quotes, \\" inside double)."""
    parts, depth, start, quote, escaped = [], 0, 0, "", False
    for i, char in enumerate(values):
        if quote:  # inside quotes nothing splits
            if escaped:  # the character after \\ in double quotes, or the second ' of '' in single quotes
                escaped = False
            elif char == quote and not (quote == "'" and values[i + 1:i + 2] == "'"):
                quote = ""
            else:
                escaped = char == "\\" and quote == '"' or char == "'" == quote
            continue
        if char in "'\"" and values[:i].rstrip()[-1:] in ("", ",", "[", "{", ":"):  # a quote opens a value: it's is plain
            quote = char
            continue
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(char, 0)
        if depth < 0:
            break
        if char == "," and depth == 0:
            parts.append(values[start:i])
            start = i + 1
    if quote:
        raise BertcliError(f"--sweep values {values!r}: a quote ({quote}) is not closed")
    if depth != 0:
        raise BertcliError(f"--sweep values {values!r}: unbalanced brackets; each list value is written whole, "
                           "e.g. [0,2,4],[1,3,5]")
    return [v.strip() for v in [*parts, values[start:]]]


def parse_sweeps(sweeps: list[str]) -> list[tuple[str, list[str]]]:
    """`KEY=V1,V2,...` options as (key, values) axes, each value as written (a --set value)."""
    axes: list[tuple[str, list[str]]] = []
    for item in sweeps:
        key, sep, values = item.partition("=")
        key = key.strip()
        choices = _split_values(values)
        if not sep or not key or not all(choices):
            raise BertcliError(f"--sweep {item!r}: expected KEY=V1,V2,... (e.g. --sweep train.lr=2e-5,3e-5,5e-5), "
                               "with no empty value")
        if any(f == key or f.startswith(f"{key}.") for f in FIXED_IN_SWEEP):  # the key, or a section holding it
            raise BertcliError(f"--sweep {key}: a sweep ranks its runs against each other, so each is scored the same "
                               f"way on the same data: {', '.join(FIXED_IN_SWEEP)} stay fixed within a sweep; give "
                               "it with --set, or run one sweep per value")
        if key in (k for k, _ in axes):
            raise BertcliError(f"--sweep {key}: given twice; list all its values in one --sweep")
        axes.append((key, choices))
    return axes


def _point_names(axes: list[tuple[str, list[str]]], grid: list[dict[str, str]]) -> list[str]:
    """Directory names made of each point's values, `lr=2e-5,epochs=2`: the keys' last parts where they
    differ (whole keys where not), and characters a file name should not hold replaced by '_'."""
    leaves = [k.rsplit(".", 1)[-1] for k, _ in axes]
    short = dict(zip((k for k, _ in axes), leaves if len(set(leaves)) == len(leaves) else [k for k, _ in axes]))
    names = [",".join(f"{short[k]}={re.sub(r'[^A-Za-z0-9._+-]', '_', v)}" for k, v in values.items())
             for values in grid]
    names = [n if len(n) <= MAX_NAME else _hashed(n, n) for n in names]  # a file name holds 255 bytes
    seen: set[str] = set()  # values alike but for replaced characters: the first keeps the name, the others
    for i, values in enumerate(grid):  # add a hash of their values (so a value added later renames no run)
        names[i] = names[i] if names[i] not in seen else _hashed(names[i], json.dumps(values))
        seen.add(names[i])
    if len(set(names)) != len(names):  # a value spelt like another's hash
        names = [f"{i + 1:03d}-{n}" for i, n in enumerate(names)]
    return names


def _hashed(name: str, text: str) -> str:
    """`name`, cut to fit, told apart by a hash of `text`."""
    return f"{name[:MAX_NAME - 13]}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _names_kept(points: list[Point], out: Path, earlier: dict[str, dict]) -> list[Point]:
    """On --resume, each run keeps the directory its values ran in before, where the earlier suite told two
    names alike apart another way (numbered, as bertcli once did, or with the hash on the other one): a
    name of the same make (`NNN-` before it, a hash after it) alone, so suite.json names no other path."""
    def base(name: str) -> str:
        return re.fullmatch(r"(?:\d{3}-)?(.*?)(?:-[0-9a-f]{12})?", name, re.DOTALL).group(1)

    def hashed(point: Point) -> str:
        parent, _, last = point.name.rpartition("/")
        return f"{parent}/{_hashed(last, json.dumps(point.values))}".lstrip("/")

    before = {json.dumps([r["group"], r["values"]], sort_keys=True): r["name"] for r in earlier.values()
              if isinstance(r.get("group"), str) and isinstance(r.get("values"), dict)
              and all(isinstance(v, str) for v in r["values"].values())}  # rows of bertcli's make alone
    kept = []
    for point in points:
        name = before.get(json.dumps([point.group, point.values], sort_keys=True), point.name)
        parent, _, last = point.name.rpartition("/")
        if name != point.name and not name.startswith("/") and ".." not in name.split("/") \
                and name.rpartition("/")[0] == parent and base(name.rpartition("/")[2]) == base(last) \
                and (out / name).is_dir():
            point = replace(point, name=name)
        kept.append(point)
    taken = {k.name for k, p in zip(kept, points) if k is not p}  # a new run named as a kept one adds its hash
    kept = [replace(k, name=hashed(k)) if k is p and k.name in taken else k for k, p in zip(kept, points)]
    if len({k.name for k in kept}) != len(kept):
        raise BertcliError(f"{out}: its earlier runs' names (in {SUMMARY}) clash with this sweep's; resume it with "
                           "the values it ran with, or choose another --out")
    return kept


def _shown(values: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def plan(sources: list[Path], overrides: list[str], sweeps: list[str]) -> list[Point]:
    """Every run of the suite, its recipe loaded and checked now: a problem in any of them is reported
    before the first run starts (all at once)."""
    from bertcli.runtime import device_for

    axes = parse_sweeps(sweeps)
    both = next(((s, k) for k, _ in axes for s in (item.partition("=")[0].strip() for item in overrides)
                 if s == k or s.startswith(f"{k}.") or k.startswith(f"{s}.")), None)
    if both is not None:  # one would silently replace the other (a section replaces every key in it)
        if both[0] == both[1]:
            raise BertcliError(f"{both[0]} is given by both --set and --sweep: one would replace the other; give it "
                               "once")
        raise BertcliError(f"--set {both[0]} and --sweep {both[1]} overlap (a section given whole replaces every key "
                           "in it): one would replace the other; give each key once")
    runs = len(sources) * math.prod(len(v) for _, v in axes)
    if runs > MAX_POINTS:
        raise BertcliError(f"--sweep: {runs:,} runs; at most {MAX_POINTS:,} in one suite")
    grid = [dict(zip((k for k, _ in axes), values)) for values in itertools.product(*(v for _, v in axes))]
    groups = [Path(s).name.removesuffix(".yaml").removesuffix(".yml") for s in sources]
    odd = next((g for g in groups if not g or g.startswith(".") or g == SUMMARY or len(g) > MAX_NAME), None)
    if odd is not None and len(sources) > 1:
        raise BertcliError(f"a recipe named {odd!r} cannot name a run's directory in a suite (an empty name, one "
                           f"starting with '.', {SUMMARY} or over {MAX_NAME} characters); rename the file")
    if len(grid) > 1:
        stream = next((s for s in sources if is_stream(Path(s))), None)
        if stream is not None:
            raise BertcliError(f"{stream}: a pipe can be read only once, and a sweep reads its recipe once per run; "
                               "save it to a file first")
    twice = sorted({g for g in groups if groups.count(g) > 1})
    if twice:
        raise BertcliError(f"two recipes are named {twice[0]!r}: each runs into a sub-directory named after its "
                           "file, so their names must differ")
    names = _point_names(axes, grid)
    points, errors = [], []
    runs: dict[tuple[Path, str], dict[str, str]] = {}  # what each point runs: its values
    for source, group in zip(sources, groups):
        for values, name in zip(grid, names):
            try:
                recipe = load_recipe(source, [*overrides, *(f"{k}={v}" for k, v in values.items())])
            except RecipeError as err:
                where = f" (--sweep {_shown(values)})" if values else ""
                errors.append(f"{err}{where}")
                break  # the same problem would come back at every point
            if recipe.task.command != "finetune":
                errors.append(f"{source}: task.name {recipe.task.name} is trained by `bertcli {recipe.task.command}`; "
                              "a suite holds fine-tuning recipes")
                break
            try:
                device_for(recipe.train.precision)  # this machine runs it (fp16 needs a GPU)
            except BertcliError as err:
                errors.append(f"{source}: {err}")
                break
            same = runs.setdefault((source, _runs_as(recipe)), values)
            if same is not values:  # a value listed twice, or written differently (1e-3 and 0.001, 0 and [0])
                errors.append(f"{source}: --sweep {_shown(same)} and {_shown(values)} give the same recipe; "
                              "list each value once")
                break
            path = "/".join(n for n in (group if len(sources) > 1 else "", name if axes else "") if n)
            points.append(Point(path, group, Path(source), recipe, values))
    if errors:
        raise BertcliError("\n".join(errors))
    return points


def _runs_as(recipe: Recipe) -> str:
    """What a suite's run of the recipe does, to tell runs apart however their values are written: the
    files it reads by the files they are (train.tsv, ./train.tsv), a time budget in seconds (30m, 1800s);
    the recipe's `output` is not one (a suite names each run's directory)."""
    from bertcli.jobs import NEW_MODEL_DROPOUT, recipe_inputs
    from bertcli.recipes import parse_duration

    runs = recipe_to_dict(recipe)
    del runs["output"], runs["tokenizer"], runs["model"]["init"], runs["model"]["teacher"]
    del runs["data"]["train"], runs["data"]["eval"]
    runs["reads"] = [(key, str(resolved(path))) for key, path in recipe_inputs(recipe, None)[1:] if path]
    if runs["train"]["time_budget"] is not None:
        runs["train"]["time_budget"] = parse_duration(runs["train"]["time_budget"])
    if recipe.model.init is None and recipe.model.dropout is None:
        runs["model"]["dropout"] = NEW_MODEL_DROPOUT  # unset, a model from scratch gets BERT's
    return json.dumps(runs, sort_keys=True, default=str)


def score(point: Point, metrics: dict[str, Any]) -> float | None:
    """The mean of the point's headline eval metrics (None without them: no eval data)."""
    values = [metrics.get(f"eval_{m}") for m in point.recipe.task.headline_metrics()]
    if not values or any(not isinstance(v, (int, float)) for v in values):
        return None
    return sum(values) / len(values)


MAX_METRICS_BYTES = 1 << 20  # a run's metrics.json holds a few numbers
MAX_SUMMARY_BYTES = 64 << 20  # suite.json: a row of a few hundred bytes for each of at most MAX_POINTS runs


def finished_metrics(path: Path, point: Point) -> dict[str, Any]:
    """A finished run's metrics.json, which the suite keeps and ranks: an object whose numbers are finite,
    its headline metrics numbers; anything else is refused, naming the file."""
    where = path / "metrics.json"
    problem = None
    try:
        metrics = _read_json(where, MAX_METRICS_BYTES)
        if metrics is None:
            problem = f"over {MAX_METRICS_BYTES:,} bytes"
        elif not isinstance(metrics, dict):
            problem = "not a JSON object"
        elif any(isinstance(v, (int, float)) and not isinstance(v, bool) and not _finite(v) for v in metrics.values()):
            problem = "a value that is not a finite number"
        else:
            odd = next((m for m in point.recipe.task.headline_metrics() if f"eval_{m}" in metrics and (
                isinstance(metrics[f"eval_{m}"], bool) or not isinstance(metrics[f"eval_{m}"], (int, float)))), None)
            problem = None if odd is None else f"eval_{odd} is not a number"
    except OSError as err:
        problem = f"cannot be read: {err.strerror}"
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        problem = f"not JSON ({str(err).splitlines()[0][:100]})"
    if problem is not None:
        raise BertcliError(f"{where}: {problem}, so the run's result cannot be kept; run it again with --overwrite, "
                           "or choose another --out")
    return metrics


def _read_json(path: Path, limit: int) -> Any:
    """A JSON file of bertcli's, read up to `limit` bytes (None beyond them)."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    return json.loads(data) if len(data) <= limit else None


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer of hundreds of digits
        return False


def real_directories(path: Path, out: Path) -> None:
    """A run's directory, and the sweep's directory above it, are real directories when they exist: a
    symbolic link would lead bertcli's writes, and removals, to a place it did not make."""
    for p in (path, *path.parents[:len(path.relative_to(out).parts) - 1]):
        if p.is_symlink():
            raise BertcliError(f"{p}: is a symbolic link; a suite writes its runs into directories of its own, so "
                               "bertcli will not follow it: move it away, or choose another --out")
        if p.exists() and not p.is_dir():
            raise BertcliError(f"{p}: exists and is not a directory")


def _action(path: Path, out: Path, point: Point, resume: bool, overwrite: bool) -> str:
    """What to do with a run's directory: "new", "resume", "overwrite" or "done" (finished before:
    kept). Whatever would be refused is refused now, before any run starts."""
    real_directories(path, out)
    empty = not path.exists() or not any(path.iterdir())  # (a real directory: checked above)
    if empty:
        precheck(path, "run")
        return "new"
    if overwrite:
        precheck(path, "run", overwrite=True)
        return "overwrite"
    if not resume:
        precheck(path, "run")  # refuses, saying what is there
    if marked_kind(path) != "run":
        precheck(path, "run", resume=True)  # refuses: not a run of bertcli's
    change = recipe_change(path, point.recipe, ignore=("output",))  # the suite names it
    if change is not None:
        raise BertcliError(f"{path}: was run with another recipe ({change}); run it again with --overwrite, or "
                           "choose another --out")
    saved = saved_records(path)
    change = inputs_change(saved, records(point.recipe, saved))
    if change is not None:  # its scores (or its steps so far) came from what the file held then
        raise BertcliError(f"{path}: {change}; move that run away to run it again (--overwrite runs every run of "
                           "the suite again), or choose another --out")
    if (path / "metrics.json").is_file():
        return "done"
    if (path / "resume.pt").is_file():
        precheck(path, "run", resume=True)
        return "resume"
    precheck(path, "run", overwrite=True)  # stopped before its first checkpoint: its own files go, it starts again
    return "overwrite"


def run_suite(points: list[Point], out: Path, resume: bool, overwrite: bool, keep_memory: bool = False) -> dict:
    """Run every point into `out`, one after another; returns the summary written to suite.json. Ctrl-C or
    SIGTERM, whenever it comes, stops the suite with its runs so far kept: during a run's training, at
    its next step with its checkpoint saved; while a run is being prepared, after its first step; between
    runs, before the next one."""
    from bertcli.train import StopRequest

    stop = StopRequest()
    try:
        return _run_all(points, out, resume, overwrite, keep_memory, stop)
    except KeyboardInterrupt:  # a second signal while the runs were checked or the suite's directories claimed
        signum = stop.signum or signal.SIGINT
        raise Interrupted(f"{signal.Signals(signum).name} again: stopped at once; the same command (with --resume, "
                          "if the suite had started) continues it", 128 + signum) from None
    finally:
        stop.release()


def _run_all(points: list[Point], out: Path, resume: bool, overwrite: bool, keep_memory: bool, stop) -> dict:
    from bertcli.jobs import recipe_inputs

    check_apart(out, [item for p in points for item in recipe_inputs(p.recipe, p.source)])
    precheck(out, "suite", resume, overwrite)
    found = _read_json_or_none(out / SUMMARY, MAX_SUMMARY_BYTES) if resume else None  # the earlier suite.json
    earlier = _earlier_rows(found)
    points = _names_kept(points, out, earlier)
    middles = [out / m for m in sorted({str(Path(p.name).parent) for p in points} - {"."})]  # a sweep per recipe
    again = {path: path.is_dir() and any(path.iterdir()) for path in middles}
    for path in middles:  # refused now, before claiming `out` changes anything in it
        precheck(path, "suite", resume=again[path] and resume, overwrite=again[path] and overwrite)
    if isinstance(found, dict):  # (relative paths from elsewhere name other files: said before what differs)
        _check_directory(out, found.get("directory"), points)
    actions = [_action(out / p.name, out, p, resume and (out / p.name).exists(), overwrite) for p in points]
    kept = {p.name: finished_metrics(out / p.name, p) for p, a in zip(points, actions) if a == "done"}  # read now:
    # one that cannot be is refused before any run starts
    check_runs(points, actions, stop)
    rows: list[dict] = []
    with contextlib.ExitStack() as held:
        held.enter_context(claim(out, "suite", resume, overwrite))
        for path in middles:
            held.enter_context(claim(path, "suite", resume=again[path] and resume, overwrite=again[path] and overwrite))
        try:
            _run_each(points, actions, out, rows, earlier, kept, keep_memory, stop)
        except KeyboardInterrupt:  # a second signal, between runs or while one is prepared: the suite stops now
            _write_summary(out, points, rows)
            name = signal.Signals(stop.signum or signal.SIGINT).name
            raise Interrupted(f"{name} again: stopped at once\nsuite: {len(rows)} of {len(points)} runs "
                              "finished; the same command with --resume continues it",
                              128 + (stop.signum or signal.SIGINT)) from None
        summary = _write_summary(out, points, rows)  # (under the suite's lock)
    failed = [r for r in rows if "error" in r]
    if failed:
        summary["failed"] = len(failed)
    return summary


def _run_each(points: list[Point], actions: list[str], out: Path, rows: list[dict], earlier: dict, kept: dict,
              keep_memory: bool, stop) -> None:
    """Run the points one after another, adding each one's row to `rows` and writing suite.json after each."""
    from bertcli.jobs import finetune, say

    for number, (point, action) in enumerate(zip(points, actions), start=1):
        if stop.is_set():
            _write_summary(out, points, rows)
            raise Interrupted(f"{signal.Signals(stop.signum).name} before {point.name}\nsuite: {number - 1} of "
                              f"{len(points)} runs finished; the same command with --resume continues it",
                              128 + stop.signum)
        path = out / point.name
        verb = {"new": "running", "resume": "resuming", "overwrite": "running again", "done": "finished before, kept"}
        say(f"[{number}/{len(points)}] {point.name}: {verb[action]}")
        row = {"name": point.name, "recipe": str(point.source), "group": point.group, "values": point.values,
               "headline": list(point.recipe.task.headline_metrics())}
        if action == "done":
            row.update(metrics=kept[point.name], seconds=earlier.get(point.name, {}).get("seconds"))
        else:
            start = time.perf_counter()
            try:
                row["metrics"] = finetune(point.recipe, path, resume=action == "resume",
                                          overwrite=action == "overwrite", source=point.source,
                                          keep_memory=keep_memory)
            except Interrupted as err:
                _write_summary(out, points, rows)
                raise Interrupted(f"{err}\nsuite: {number - 1} of {len(points)} runs finished; the same command "
                                  "with --resume continues it", err.exit_code) from None
            except BertcliError as err:  # one run's failure (a diverged learning rate, say) ends only that run
                say(f"{point.name}: failed: {err}")
                row.update(metrics={}, error=str(err))
            row["seconds"] = time.perf_counter() - start
        row["score"] = score(point, row["metrics"])
        rows.append(row)
        _write_summary(out, points, rows)


def check_runs(points: list[Point], actions: list[str], stop) -> None:
    """Each run that will train, prepared as its turn will prepare it (its data read, its checkpoint, layers
    and teacher loaded and checked), then dropped: what does not fit is said before the first run starts,
    not hours into the suite. A run that reads a pipe is left to its turn (a pipe is read once)."""
    from bertcli.jobs import prepare, say

    unique: dict[str, Point] = {}  # points that differ in the learning rate, say, read the same: checked once
    readers: dict[Path, tuple[str, list[str]]] = {}  # each pipe (/dev/stdin and /proc/self/fd/0 alike): its runs
    for point, action in zip(points, actions):
        if action == "done":
            continue
        pipes = {resolved(f): f for f in (*point.recipe.data.train, *point.recipe.data.eval) if is_stream(Path(f))}
        for path, written in pipes.items():
            readers.setdefault(path, (written, []))[1].append(point.name)
        if pipes:
            continue
        read = recipe_to_dict(point.recipe)  # what prepare reads: of train.*, the teacher's losses alone
        read["train"] = {k: v for k, v in read["train"].items() if k.startswith("distill_")}
        unique.setdefault(json.dumps(read, sort_keys=True, default=str), point)
    errors = [f"{written}: a pipe can be read only once, and {len(names)} runs read it ({', '.join(names[:3])}"
              f"{', ...' if len(names) > 3 else ''}); save it to a file first"
              for written, names in readers.values() if len(names) > 1]
    if errors:
        raise BertcliError("\n".join(errors))
    if len(unique) > 1:
        say(f"checking what {len(unique)} runs read before the first starts")
    for point in unique.values():
        if stop.is_set():
            raise Interrupted(f"{signal.Signals(stop.signum).name} while checking the runs; nothing was run",
                              128 + stop.signum)
        try:
            prepare(point.recipe)
        except BertcliError as err:
            errors.append(f"{point.name}: {err}")
    if errors:
        raise BertcliError("\n".join(errors))


def _check_directory(out: Path, started: Any, points: list[Point]) -> None:
    """A suite resumed from another working directory than it started in (`started`, from its suite.json;
    None when written before suites said), whose recipes name relative paths, would read other files than
    its finished runs did (and rank them together): refused."""
    from bertcli.jobs import recipe_inputs

    here = _working_directory()
    if not isinstance(started, str) or here is None or Path(started) == Path(here):
        return
    for point in points:
        for key, value in recipe_inputs(point.recipe, None):
            if key == "recipe" or value is None or Path(value).is_absolute():
                continue
            then, now = Path(started) / value, Path(value)
            try:
                other = then.exists() and now.exists() and not then.samefile(now)
            except OSError:
                other = False
            if other:  # shown to be another file (a project moved or mounted elsewhere is not refused)
                raise BertcliError(f"{out}: the suite started in {started}, and its recipes name relative paths: "
                                   f"{key}: {value} is {then} there, another file than from {here}; resume it "
                                   f"from {started}")


def _working_directory() -> str | None:
    try:
        return os.getcwd()
    except OSError:  # removed while the suite ran
        return None


def _read_json_or_none(path: Path, limit: int) -> Any:
    """An earlier file of the suite's own, or None when it is missing or cannot be read (it is not kept)."""
    try:
        return _read_json(path, limit)
    except (OSError, ValueError, RecursionError):
        return None


def _earlier_rows(summary: Any) -> dict[str, dict]:
    """The rows of an earlier suite.json by run name (for the times of runs kept as they were)."""
    try:
        rows = {r["name"]: r for r in summary["runs"] if isinstance(r, dict) and isinstance(r.get("name"), str)}
    except (KeyError, TypeError):
        return {}
    for row in rows.values():  # a time that is not a finite number of seconds is not shown
        seconds = row.get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < 1e9:
            row["seconds"] = None
    return rows


def _write_summary(out: Path, points: list[Point], rows: list[dict]) -> dict:
    """suite.json: every run so far, the best of each recipe's runs, and the average over recipes of
    those bests once every recipe has one."""
    groups = list(dict.fromkeys(p.group for p in points))
    best: dict[str, dict] = {}
    for group in groups:
        scored = [r for r in rows if r["group"] == group and r["score"] is not None]
        if scored:
            best[group] = max(scored, key=lambda r: r["score"])
    average = sum(r["score"] for r in best.values()) / len(groups) if len(best) == len(groups) else None
    best = {group: r["name"] for group, r in best.items()}
    summary = {"runs": rows, "best": best, "average": average, "planned": len(points),
               "directory": _working_directory()}
    atomic_write_text(out / SUMMARY, finite_json(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def render(summary: dict) -> str:
    """The runs as tables for stdout: each recipe's runs ranked by score (the best marked *), then,
    for several recipes, the best of each and their average."""
    import io
    import shutil
    import sys

    from rich.console import Console
    from rich.table import Table

    terminal = sys.stdout is not None and sys.stdout.isatty()
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=terminal, markup=False, emoji=False,  # the user's text as it is
                      width=shutil.get_terminal_size().columns if terminal else 120)
    rows, best = summary["runs"], summary["best"]
    groups = list(dict.fromkeys(r["group"] for r in rows))
    swept = any(r["values"] for r in rows)

    def metrics_text(row: dict) -> str:
        if "error" in row:
            return "failed: " + row["error"].splitlines()[0].split("; ")[0][:100]
        shown = [f"{m} {row['metrics'][f'eval_{m}']:.4f}" for m in row["headline"] if f"eval_{m}" in row["metrics"]]
        return "  ".join(shown) or "no eval data"

    def seconds_text(seconds: float | None) -> str:
        return "" if seconds is None else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"

    if swept:
        for group in groups:
            table = Table(title=f"{group}: sweep, ranked by {_headline(rows, group)}")
            for column in ("", "run", "headline metrics", "score", "time"):
                table.add_column(column, justify="right" if column in ("score", "time") else "left")
            ranked = sorted((r for r in rows if r["group"] == group),
                            key=lambda r: (r["score"] is None, -(r["score"] or 0.0)))
            for r in ranked:
                table.add_row("*" if best.get(group) == r["name"] else "", r["name"], metrics_text(r),
                              "" if r["score"] is None else f"{r['score']:.4f}", seconds_text(r["seconds"]))
            console.print(table)
    if len(groups) > 1 or not swept:
        table = Table(title="suite" + (": the best run of each recipe" if swept else ""))
        for column in ("recipe", "headline metrics", "score", "time"):
            table.add_column(column, justify="right" if column in ("score", "time") else "left")
        for group in groups:
            r = next((x for x in rows if x["name"] == best.get(group)), None) or next(x for x in rows if x["group"] == group)
            table.add_row(r["name"], metrics_text(r), "" if r["score"] is None else f"{r['score']:.4f}",
                          seconds_text(r["seconds"]))
        if summary["average"] is not None:
            table.add_row("average", "", f"{summary['average']:.4f}",
                          seconds_text(sum(r["seconds"] or 0.0 for r in rows) if all(r["seconds"] is not None for r in rows) else None))
        console.print(table)
    return buffer.getvalue()


def _headline(rows: list[dict], group: str) -> str:
    row = next(r for r in rows if r["group"] == group)
    return row["headline"][0] if len(row["headline"]) == 1 else f"mean of {', '.join(row['headline'])}"

"""What a run reads, by content. A run directory keeps the SHA-256 of the files its recipe names (data,
model.init's weights, the teacher's) in inputs.json, so that --resume, and a suite or sweep that keeps its
finished runs, can tell that one changed since the run began: its steps so far, or its scores, came from
the old one. recipe.yaml says which paths a run read; this says what they held. A file whose size, inode
and times are those recorded is not read again (the change time, ctime, is set by the system on every write
and cannot be set back, as `touch` sets the modification time)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from bertcli.data.corpus import cached_sha256
from bertcli.recipes import Recipe
from bertcli.rundir import INPUTS, SIGNATURE

WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # the first found is the one loading reads (checkpoint.py)


def records(recipe: Recipe, saved: dict[str, dict] | None = None) -> dict[str, dict]:
    """Each input file the recipe names, by the path it names (a shard directory's index.json, which holds
    each shard's own SHA-256; a checkpoint's config.json and the weights file it loads) -> its size, inode,
    times and SHA-256; the SHA-256 is `saved`'s where the rest is the same. A pipe, read once,
    has none."""
    found: dict[str, dict] = {}
    named = [(p, Path(p) / "index.json" if Path(p).is_dir() else Path(p)) for p in (*recipe.data.train, *recipe.data.eval)]
    for directory in (recipe.model.init, recipe.model.teacher):
        if directory:
            weights = next((Path(directory) / w for w in WEIGHTS if (Path(directory) / w).is_file()), None)
            named += [(str(Path(directory) / "config.json"), Path(directory) / "config.json")]
            named += [(str(weights), weights)] if weights is not None else []
    for key, path in named:
        record = _stat(path)
        if record is None:
            continue
        was = (saved or {}).get(key)
        same = isinstance(was, dict) and all(was.get(k) == v for k, v in record.items())
        found[key] = {**record, "sha256": was["sha256"] if same else cached_sha256(path)}
    return found


def _stat(path: Path) -> dict | None:
    try:
        info = path.stat()
    except OSError:
        return None  # (the recipe's checks name a missing file)
    if not stat.S_ISREG(info.st_mode):
        return None
    return {"bytes": info.st_size, "inode": info.st_ino, "mtime_ns": info.st_mtime_ns, "ctime_ns": info.st_ctime_ns}


def saved_records(run: Path) -> dict[str, dict] | None:
    """The records a run directory's inputs.json holds, or None where it has none (a run of a bertcli from
    before it, which cannot tell) or one that is not bertcli's."""
    try:
        saved = json.loads((run / INPUTS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = saved.get("files") if isinstance(saved, dict) and saved.get(SIGNATURE) == 1 else None
    return files if isinstance(files, dict) else None


def inputs_file(found: dict[str, dict]) -> str:
    return json.dumps({SIGNATURE: 1, "files": found}, indent=1, sort_keys=True) + "\n"


def inputs_change(saved: dict[str, dict] | None, now: dict[str, dict]) -> str | None:
    """Which input holds something else now than it held when the run began (`saved`), or None."""
    for key in sorted(set(saved or {}) & set(now)):
        if not isinstance(saved[key], dict) or saved[key].get("sha256") != now[key]["sha256"]:
            return f"{key} has changed since the run began"
    return None

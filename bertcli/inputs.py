"""What a run reads, by content. A run directory keeps the SHA-256 of the files its recipe names (data,
model.init's weights, the teacher's) in inputs.json, so that --resume, and a suite or sweep that keeps its
finished runs, can tell that one changed since the run began: its steps so far, or its scores, came from
the old one. recipe.yaml says which paths a run read; this says what they held."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

from bertcli.data.corpus import file_sha256
from bertcli.recipes import Recipe

INPUTS = "inputs.json"
WEIGHTS = ("config.json", "model.safetensors", "pytorch_model.bin")  # what a checkpoint's outputs come from
_SEEN: dict[tuple, str] = {}  # (path, size, time, inode) -> digest: a suite names the same files in every run


def digests(recipe: Recipe) -> dict[str, str]:
    """Each input path the recipe names (as it names it) -> the SHA-256 of what it holds: a file's bytes,
    a shard directory's index.json (which has each shard's own), a checkpoint's config and weights.
    A pipe, which can be read only once, has none."""
    found: dict[str, str] = {}
    for path in (*recipe.data.train, *recipe.data.eval):
        p = Path(path)
        digest = _file(p) if not p.is_dir() else _file(p / "index.json")
        if digest is not None:
            found[path] = digest
    for path in (recipe.model.init, recipe.model.teacher):
        if path:
            parts = [f"{name}:{_file(Path(path) / name)}" for name in WEIGHTS if (Path(path) / name).is_file()]
            found[path] = hashlib.sha256("\n".join(parts).encode()).hexdigest()
    return found


def _file(path: Path) -> str | None:
    try:
        info = path.stat()
    except OSError:
        return None  # (the recipe's checks name a missing file)
    if not stat.S_ISREG(info.st_mode):
        return None
    key = (str(path.resolve()), info.st_size, info.st_mtime_ns, info.st_ino)
    if key not in _SEEN:
        _SEEN[key] = file_sha256(path)
    return _SEEN[key]


def inputs_change(run: Path, now: dict[str, str]) -> str | None:
    """Which input of the run in `run` holds something else now than when the run began, or None (also for
    a run saved before inputs.json was written, which cannot tell)."""
    try:
        saved = json.loads((run / INPUTS).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        return f"its {INPUTS} cannot be read ({err})"
    if not isinstance(saved, dict):
        return f"its {INPUTS} is not a JSON object"
    return next((f"{path} has changed since the run began" for path in sorted(set(saved) & set(now))
                 if saved[path] != now[path]), None)

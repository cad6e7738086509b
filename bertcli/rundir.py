"""Output directories that bertcli owns: a marker, one writer at a time, and only its own files
ever removed.

A directory that a command writes (a run, a tokenizer, token shards) gets `.bertcli-run`, a small
JSON file naming what it holds. `--overwrite` and the clean-up of a killed run's leftovers act only
on a directory with that marker, and then only on the files that command writes: a directory
holding anything else is refused with the names of what it holds, and nothing in it is touched.

One process writes a directory at a time: it holds an advisory lock (`fcntl.flock`) on
`.bertcli.lock` for as long as it runs. The kernel drops the lock when the process dies, however it
dies, so a SIGKILL never leaves a stale lock; a second writer exits at once, naming the holder's pid.
The lock file also notes the temporary entries its holder is writing (fileio.Notes): a killed writer's
leftovers are the entries noted there, never files found by their names alone.

An output that is, contains or lies inside one of the command's inputs is refused before anything
is touched (`check_apart`).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import stat
import time
from pathlib import Path
from typing import Callable, Iterable

from bertcli import __version__
from bertcli.errors import BertcliError
from bertcli.fileio import Notes, atomic_write_text, hold_notes, release_notes
from bertcli.onnx_engine import GRAPHS, bertcli_graph, unsealed_bertcli_graph  # export adds its own graphs alone

MARKER = ".bertcli-run"
INPUTS = "inputs.json"  # a run's record of what it read (inputs.py)
SIGNATURE = "bertcli_inputs"  # the key that makes an inputs.json bertcli's: a name alone does not
LOCK = ".bertcli.lock"
LOCK_TRIES = 25  # x 20 ms
NOTES_BYTES = 1 << 20  # the most of a lock file read for its notes
ELSEWHERE = "wait for it to end, or choose another --out"  # what to do when another process writes the directory
STAGE_DIR = ".saving"  # files being written; moved into place once complete
_TEMP = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp")  # an atomic write's temporary file of NAME (fileio.atomic_write)
_TOKENIZER = {"tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"}
# what each kind of directory holds: bertcli writes these names and no others
OWN = {
    "run": _TOKENIZER | {"config.json", "model.safetensors", "recipe.yaml", INPUTS, "log.jsonl", "metrics.json",
            "resume.pt", *GRAPHS},
    "tokenizer": _TOKENIZER,
    "shards": {"index.json"},
    "report": {"confusion.png", "loss.png", "eval.png"},
    "suite": {"suite.json"},  # and its runs, each a directory of its own (suite.py)
}
STAGED = {"shards": {"progress.json"}}  # written in the side directory only (an encode's finished shards)
_SHARD_FILE = re.compile(r"\d{5}\.(tokens\.bin|sentences\.npy|documents\.npy|words\.bin)")
WHAT = {"run": "a bertcli run", "tokenizer": "a bertcli tokenizer", "shards": "bertcli token shards",
        "report": "a bertcli report", "suite": "a bertcli suite or sweep"}
NESTED = {"suite": ("run", "suite")}  # a suite holds runs (and, for a suite of sweeps, a sweep per recipe)


def _named(kind: str, name: str, staged: bool = False) -> bool:
    return (name in OWN[kind] or name == MARKER or (staged and name in STAGED.get(kind, ()))
            or (kind == "shards" and _SHARD_FILE.fullmatch(name) is not None))


ANY = None  # `noted` of a side directory's files: the directory itself was noted, so all its temporary files are


def _temporary(kind: str, name: str, staged: bool, noted: frozenset[str] | None) -> bool:
    """An atomic write's temporary file that bertcli noted in the lock file (fileio.Notes) as it made it."""
    match = _TEMP.fullmatch(name)
    return match is not None and (noted is ANY or name in noted) and _named(kind, match.group(1), staged)


def _own_file(kind: str, entry: Path, staged: bool = False, noted: frozenset[str] | None = frozenset()) -> bool:
    """A regular file under a name bertcli writes there (`staged`: in the side directory, where some names are
    bertcli's that are not elsewhere), or a temporary one that the lock file notes (`noted`). bertcli never
    makes a symbolic link, so a link, whatever its name, is the user's."""
    if entry.is_symlink() or not entry.is_file():
        return False
    if entry.name in GRAPHS:  # names other tools give their graphs too: bertcli's say so inside
        return bertcli_graph(entry)
    if entry.name == INPUTS:  # a name added later: in a directory of an older bertcli, it may be yours
        return _inputs_file(entry)
    return entry.name == LOCK or _named(kind, entry.name, staged) or _temporary(kind, entry.name, staged, noted)


def _inputs_file(path: Path) -> bool:
    """An inputs.json that bertcli wrote: a JSON object of its format, of a page at most."""
    try:
        if path.stat().st_size > 1 << 20:
            return False
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and saved.get(SIGNATURE) == 1 and isinstance(saved.get("files"), dict)


def _own_stage(kind: str, entry: Path, noted: frozenset[str]) -> bool:
    """The side directory of a write killed midway, noted in the lock file, holding only files bertcli writes (one
    that vanishes while it is looked at was being published by bertcli)."""
    if entry.name != STAGE_DIR or entry.name not in noted or entry.is_symlink() or not (
            entry.is_dir() or not entry.exists()):
        return False
    try:
        return all(_own_file(kind, child, staged=True, noted=ANY) and child.name != LOCK for child in entry.iterdir())
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _own_nested(kind: str, entry: Path) -> bool:
    """A directory of bertcli's own inside one that holds others (a suite's runs): a real directory
    with the marker of a kind it may hold. It is never removed from outside: its own claim acts on it."""
    return kind in NESTED and not entry.is_symlink() and entry.is_dir() and marked_kind(entry) in NESTED[kind]


def is_own(kind: str, entry: Path, noted: frozenset[str]) -> bool:
    return _own_file(kind, entry, noted=noted) or _own_stage(kind, entry, noted) or _own_nested(kind, entry)


def is_leftover(kind: str, entry: Path, noted: frozenset[str]) -> bool:
    """What a process killed mid-write leaves: a staged checkpoint or an atomic write's temporary file, each
    noted in the lock file as it was made."""
    return _own_stage(kind, entry, noted) or (_temporary(kind, entry.name, False, noted)
                                              and _own_file(kind, entry, noted=noted))


def _unproven_leftover(kind: str, entry: Path) -> bool:
    """Shaped as a killed writer's leftover, and not noted: a bertcli's from before leftovers were noted (or a note
    lost with the machine's power), or the user's. Refused, never removed, and said so."""
    return _own_stage(kind, entry, frozenset({STAGE_DIR})) or (_temporary(kind, entry.name, False, ANY)
                                                               and _own_file(kind, entry, noted=ANY))


def _noted(directory: Path) -> frozenset[str]:
    """The temporary entries that the lock file notes (those of its last holder, or of the holder now)."""
    return _notes_in(_lock_text(directory, NOTES_BYTES)) if _own_lock(directory) else frozenset()


def _lock_text(directory: Path, size: int) -> bytes:
    """The first `size` bytes of the directory's lock file: the holder's pid, then its notes (b"" when unread)."""
    try:
        fd = os.open(directory / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return b""
    try:
        return os.pread(fd, size, 0)
    except OSError:
        return b""
    finally:
        os.close(fd)


def _notes_in(content: bytes) -> frozenset[str]:
    lines = content.decode("utf-8", "replace").split("\n")[1:]  # (the first is the pid)
    return frozenset(line for line in lines if line and "/" not in line and line not in (".", ".."))


def marked_kind(directory: Path) -> str | None:
    """The kind written in the directory's marker, or None when it has no valid marker."""
    path = directory / MARKER
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 4096:
            return None
        kind = json.loads(path.read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    return kind if isinstance(kind, str) and kind in OWN else None


def _own_lock(directory: Path) -> bool:
    """The lock file is bertcli's: a plain file with no other name (a hard link would let the pid
    written into it land in a file of the user's)."""
    path = directory / LOCK
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_nlink == 1


def resolved(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def inside(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_apart(out: Path, inputs: Iterable[tuple[str, str | Path | None]], own: Iterable[Path] = ()) -> None:
    """Refuse an output directory that is, contains or lies inside an input (named by its key, e.g.
    data.train). `own` lists files of the run itself that may be read back (--resume of its recipe.yaml)."""
    target = resolved(out)
    allowed = {resolved(p) for p in own}
    for key, path in inputs:
        if path is None or str(path) == "":
            continue
        source = resolved(path)
        if source in allowed:
            continue
        if inside(source, target) or inside(target, source):
            where = "is" if source == target else ("contains" if inside(source, target) else "lies inside")
            raise BertcliError(f"{out}: the output directory {where} the input {key} ({path}); write the output "
                               "somewhere else (--out), so that nothing you read is replaced")


class Claim:
    """The lock on an output directory, held until `release` (or the process ends)."""

    def __init__(self, directory: Path, fd: int, complete: bool = False, notes: Notes | None = None):
        self.directory = directory
        self.complete = complete  # `claim(..., complete_with=NAME)` found NAME: the work is already done
        self._fd: int | None = fd
        self._notes = notes  # (a directory without the marker has no lock file: nothing is noted there)
        self._key = hold_notes(directory, notes) if notes is not None else None

    def release(self) -> None:
        if self._fd is not None:
            if self._notes is not None:
                release_notes(self._key, self._notes)
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim(out: Path, kind: str, resume: bool = False, overwrite: bool = False, wait: bool = False,
          complete_with: str | Callable[[Path], bool] | None = None, replacing: str = "--overwrite") -> Claim:
    """Make `out` this process's output directory of `kind` ("run", "tokenizer" or "shards").

    - A missing or empty directory is created and marked.
    - An existing one needs `resume` (continue it) or `overwrite` (remove bertcli's files in it);
      both require the marker of the same kind, and `overwrite` refuses a directory that holds
      anything bertcli does not write there.
    - Leftovers of a killed writer are removed, in a marked directory only.
    `wait` blocks on another writer's lock (for bertcli's own cache) instead of refusing; with
    `complete_with`, a marked directory found holding that file (or for which that function says True) once
    the lock is held is kept as it is (another process finished the same work meanwhile) and the claim says
    `complete`. `replacing`
    names what asked to replace the directory, in messages."""
    if resume and overwrite:
        raise BertcliError("--resume and --overwrite exclude each other")
    if not wait:  # (bertcli's own cache waits for its writer and looks only then)
        _refuse_if_locked(out)
        refuse_inside_running_suite(out)
        _check_state(out, kind, resume, overwrite, replacing)  # before anything is created
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        what = "bertcli's cache directory" if wait else "the output directory"  # (only the cache waits)
        raise BertcliError(f"{out}: cannot create {what}: {err.strerror}") from None
    held, noted = _take_lock(out, wait)
    try:
        if complete_with and marked_kind(out) == kind and (
                complete_with(out) if callable(complete_with) else (out / complete_with).is_file()):
            held.complete = True
            return held
        _check_state(out, kind, resume, overwrite, replacing, noted)  # again: another writer may have been here
        for entry in sorted(out.iterdir()):
            if kind == "shards" and resume and entry.name == STAGE_DIR:
                continue  # the finished shards of an encode stopped midway, which the encoder checks and continues
            if is_leftover(kind, entry, noted) or (overwrite and entry.name not in (MARKER, LOCK)
                                                   and is_own(kind, entry, noted) and not _own_nested(kind, entry)):
                _remove(kind, entry)
        held._notes.forget_gone(out)
        if marked_kind(out) is None:
            atomic_write_text(out / MARKER, json.dumps({"kind": kind, "bertcli_version": __version__}) + "\n")
    except BaseException:
        held.release()
        raise
    return held


def _take_lock(directory: Path, wait: bool, instead: str = ELSEWHERE) -> tuple[Claim, frozenset[str]]:
    """Open the directory's lock file, check it is bertcli's and lock it (see _lock); returns the claim that holds
    it and what the last holder noted in it (its temporary entries, fileio.Notes). The file then holds this
    process's pid, and those notes until the caller strikes off what it removed (Notes.forget_gone)."""
    try:
        fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o666)
    except OSError as err:
        raise BertcliError(f"{directory / LOCK}: cannot open the output directory's lock: {err.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            raise BertcliError(f"{directory / LOCK}: is not bertcli's lock file (a plain file of its own): a "
                               f"{'hard link' if stat.S_ISREG(info.st_mode) else 'special file'}; remove it")
        _lock(fd, directory, wait, instead)
    except BaseException:
        os.close(fd)
        raise
    try:
        noted = _notes_in(os.pread(fd, NOTES_BYTES, 0))
    except OSError:
        noted = frozenset()
    try:
        return Claim(directory, fd, notes=Notes(fd, sorted(noted))), noted
    except BaseException:
        os.close(fd)
        raise


def hold(directory: Path) -> Claim:
    """The lock of a directory of bertcli's, to add files to it (bertcli export adds its graphs to a run):
    refused while another process writes it, as claim refuses, and a killed writer's leftovers removed. A
    directory without the marker (a checkpoint from elsewhere) gets no lock file and no clean-up: the lock is
    taken on the directory itself, so that two exports into it do not cross."""
    kind = marked_kind(directory)
    if kind is None:
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise BertcliError(f"{directory}: cannot open the directory: {err.strerror}") from None
        try:
            _lock(fd, directory, wait=False, instead="wait for it to end")
        except BaseException:
            os.close(fd)
            raise
        return Claim(directory, fd)
    refuse_inside_running_suite(directory)
    held, noted = _take_lock(directory, wait=False, instead="wait for it to end")
    try:
        for entry in sorted(directory.iterdir()):
            if is_leftover(kind, entry, noted):  # of a killed writer (a killed export's graph half written)
                _remove(kind, entry)
        held._notes.forget_gone(directory)
    except BaseException:
        held.release()
        raise
    return held


def precheck(out: Path, kind: str, resume: bool = False, overwrite: bool = False, replacing: str = "--overwrite") -> None:
    """What `claim` will refuse, said before a long preparation rather than after it."""
    if resume and overwrite:
        raise BertcliError("--resume and --overwrite exclude each other")
    _refuse_if_locked(out)
    refuse_inside_running_suite(out)
    _check_state(out, kind, resume, overwrite, replacing)


def _refuse_if_locked(out: Path) -> None:
    """A writer at work is named first, whatever else the directory holds (trying its lock changes
    nothing on disk)."""
    path = out / LOCK
    if not _own_lock(out):
        return  # none, or not bertcli's: claim says so
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return  # e.g. a read-only file system: claim says what is wrong
    try:
        _lock(fd, out, wait=False)
    finally:
        os.close(fd)  # releases the trial lock


def _holder(directory: Path) -> int:
    """The pid written into a directory's lock by the process that holds it (0 when unknown)."""
    try:
        return int(_lock_text(directory, 32).split(b"\n")[0].strip() or b"0")  # (notes follow the pid's line)
    except ValueError:
        return 0


def refuse_inside_running_suite(out: Path) -> None:
    """A directory inside a suite that another process is running is that suite's to write (its lock
    covers its runs): a second command there would change a run under the suite's feet."""
    for parent in resolved(out).parents:  # at any depth, however the path is written
        if marked_kind(parent) != "suite" or not _own_lock(parent):
            continue
        holder = _holder(parent)
        if holder == os.getpid():
            return  # this process is the suite: the run is one of its own
        try:
            _refuse_if_locked(parent)
        except BertcliError:
            raise BertcliError(f"{out}: lies in the suite {parent}, which another bertcli process (pid {holder or 'unknown'}) "
                               "is running; wait for it to end, or choose another --out") from None


def _check_state(out: Path, kind: str, resume: bool, overwrite: bool, replacing: str = "--overwrite",
                 noted: frozenset[str] | None = None) -> None:
    """What makes `out` unfit for the command, refused with what to do. `noted`: the lock file's notes, read from
    it when not given (claim gives those it found before it wrote its own)."""
    noted = _noted(out) if noted is None else noted
    option = "--report" if kind == "report" else "--out"  # the option that names the directory
    if out.is_symlink() and not out.is_dir():
        raise BertcliError(f"{out}: is a symbolic link to nothing; name a directory")
    if out.exists() and not out.is_dir():
        raise BertcliError(f"{out}: exists and is not a directory")
    try:
        names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    except OSError as err:
        raise BertcliError(f"{out}: cannot read the output directory: {err.strerror}") from None
    bare = [n for n in names if n != LOCK or not _own_lock(out)]
    if not bare:  # missing or empty (a lock alone: killed before its marker)
        if resume:
            what = "no such directory" if not out.exists() else "the directory is empty"
            raise BertcliError(f"{out}: nothing to resume ({what}); run it without --resume, or name the run with --out")
        return
    if bare == [MARKER] and marked_kind(out) == kind and not resume:
        return  # bertcli's marker and lock alone: a command that failed before it wrote a file left nothing to keep
    found = marked_kind(out)
    if found is None and resume and kind == "run" and "resume.pt" in names and all(
            is_own(kind, p, noted) for p in out.iterdir()):
        return  # a run of a bertcli from before the marker, holding only a run's files: adopted (claim marks it)
    if found is None:
        if resume or overwrite:
            flag = "--resume" if resume else replacing
            raise BertcliError(f"{out}: {flag} refused: the directory was not written by bertcli (it has no {MARKER} "
                               f"marker), so bertcli will not touch it; choose another {option}")
        raise BertcliError(f"{out}: already exists and is not empty; choose another {option}")
    if found != kind:
        raise BertcliError(f"{out}: holds {WHAT[found]}, not {WHAT[kind]}; choose another {option}")
    if not resume and not overwrite:
        stopped = kind == "shards" and "index.json" not in names  # an encode that did not finish
        again = " pass --resume to continue it or" if kind in ("run", "suite") or stopped else ""
        raise BertcliError(f"{out}: already exists;{again} pass --overwrite to replace it")
    # --resume rewrites bertcli's files (and its side directory); --overwrite removes them all
    # (--resume never writes a graph: one that is not bertcli's stays, and predict does not run it as the model's)
    foreign = [p for p in sorted(out.iterdir()) if not is_own(kind, p, noted) and (
        overwrite or p.name == STAGE_DIR or (p.name in OWN[kind] and p.name not in GRAPHS))]
    if foreign:
        names = [p.name + (" (a graph bertcli cannot prove it wrote: exported by a bertcli from before graphs were "
                           "sealed, or edited since)" if p.name in GRAPHS and unsealed_bertcli_graph(p) else "")
                 for p in foreign]
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        shaped = [p.name for p in foreign if _unproven_leftover(kind, p)]
        why = (f" ({', '.join(shaped[:8])}: named as what a bertcli killed while writing leaves, but not noted in "
               f"{LOCK} as bertcli notes what it writes (a bertcli from before such notes, or a power cut): bertcli "
               "cannot prove it wrote it; remove it yourself if it is not yours)" if shaped else "")
        flag = "--resume" if resume else replacing
        raise BertcliError(f"{out}: {flag} refused: it holds files bertcli did not write ({shown}){why}; they are "
                           f"kept, and so is everything else: move them away, or choose another {option}")
    if resume and kind == "run" and bare == [MARKER]:
        raise BertcliError(f"{out}: nothing to resume: the command before stopped before it wrote a file; run it "
                           "again without --resume")
    if resume and kind == "run" and "resume.pt" not in names:
        raise BertcliError(f"{out}: nothing to resume (no resume.pt); start afresh with --overwrite")
    if resume and kind == "shards" and "index.json" in names:
        raise BertcliError(f"{out}: nothing to resume: its encode finished (index.json); pass --overwrite to encode "
                           "again")


def _lock(fd: int, out: Path, wait: bool, instead: str = ELSEWHERE) -> None:
    """Take the lock; without `wait`, refuse when another process keeps it for more than a moment
    (another command's trial of the lock holds it for microseconds)."""
    for attempt in range(1 if wait else LOCK_TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            return
        except BlockingIOError:
            time.sleep(0.02)
        except OSError as err:  # a file system without flock (some NFS, Lustre, FUSE mounts)
            raise BertcliError(f"{out / LOCK}: cannot lock it ({err.strerror}): this file system has no file "
                               "locks, so bertcli cannot make sure it is the only writer; write the run on a "
                               "local disk") from None
    try:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").split("\n")[0].strip() or "unknown"
    except OSError:  # a directory's own descriptor (hold): no pid written in it
        holder = "unknown"
    raise BertcliError(f"{out}: another bertcli process (pid {holder}) is writing this directory; {instead}")


def _remove(kind: str, entry: Path) -> None:
    """Remove one of bertcli's own entries: a file, or the side directory with only bertcli's files
    in it (each checked again as it goes; nothing is removed recursively, so a directory that gained
    anything else stays, and says so)."""
    try:
        if entry.name == STAGE_DIR and entry.is_dir() and not entry.is_symlink():
            for child in entry.iterdir():
                if _own_file(kind, child, staged=True, noted=ANY) and child.name != LOCK:
                    child.unlink()
            entry.rmdir()
        else:
            entry.unlink()
    except FileNotFoundError:
        pass
    except OSError as err:
        raise BertcliError(f"{entry}: cannot remove it ({err.strerror}); nothing else was changed after it") from None

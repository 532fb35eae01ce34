"""The run folder: what a run writes there, who may write, and what ``--overwrite`` may delete.

A run folder holds only what :data:`RUN_ENTRIES` names (plus hidden
temporaries).  ``--overwrite`` deletes those entries and nothing else: it
refuses a folder holding anything a run does not write, and it always
refuses the filesystem root, the home folder, the current folder and every
folder above it.  One process at a time works in a run folder: it holds an
exclusive ``flock`` on :data:`LOCK_NAME` for the whole run, so a second
``run`` (or a ``sample``/``eval`` writing there) is refused while the first
lives, and a lock left by a dead process is taken over with a warning (the
kernel drops ``flock`` locks with their process, so "stale" needs no guess).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path

from .errors import ConfigError, OutputInUse

LOCK_NAME = ".ttfm-distill.lock"
#: names (glob patterns) a run, ``sample`` or ``eval`` writes at the top of a run folder
RUN_ENTRIES = ("config.json", "run_state.json", "student", "checkpoints", "cache", "metrics.json", "samples.png",
               "eval.json", "eval.png", "samples-*step.png", "train_log.jsonl", "validation", "training-curves.png",
               "trackers", LOCK_NAME)
#: the files a resumed run rewrites in place: its settings and its run state (runstate.py)
REWRITTEN = ("config.json", "run_state.json")
#: hidden temporaries left by a kill mid-write (atomic files, folders, moved-aside folders, probes)
TEMPORARY_PATTERNS = (".*.tmp", ".*.old", ".write-test")


def is_run_entry(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in RUN_ENTRIES + TEMPORARY_PATTERNS)


def foreign_entries(out: Path) -> list[str]:
    """Top-level names in ``out`` that no run writes (sorted)."""
    return sorted(p.name for p in out.iterdir() if not is_run_entry(p.name))


def read_run_config(out: Path) -> dict | None:
    """The saved run config of ``out``, or ``None`` when there is none; a damaged one raises ``ConfigError``."""
    from .config import RunConfig
    from .runstate import LEGACY_KEYS

    path = out / "config.json"
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        saved = None
    known = set(RunConfig().to_dict()) | set(LEGACY_KEYS)  # an earlier version's folder: its run state too
    if not (isinstance(saved, dict) and {"teacher", "loss", "max_steps"} <= set(saved) and set(saved) <= known):
        raise ConfigError(f"{path} is not a ttfm-distill run config; choose another --output")
    return saved


def protected_folders() -> list[Path]:
    """Folders ``--overwrite`` never deletes: the root, the home folder, the current folder and its parents."""
    cwd = Path.cwd().resolve()
    return [Path("/").resolve(), Path.home().resolve(), cwd, *cwd.parents]


def check_output(out: Path, overwrite: bool) -> dict | None:
    """Refuse an output folder a run must not use (no writes); return its saved config, if any."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} exists and is a file; choose another --output")
    if not out.exists():
        return None
    if overwrite and out.resolve() in protected_folders():
        raise ConfigError(f"refusing --overwrite on {out}: it is the root, home or current folder or above it; "
                          "pass a run folder")
    foreign = foreign_entries(out)
    saved = read_run_config(out) if (out / "config.json").exists() else None
    if foreign:
        what = "--overwrite" if overwrite else "this output"
        raise ConfigError(f"refusing {what}: {out} holds files ttfm-distill did not write (e.g. {foreign[0]!r}); "
                          "choose another --output")
    return saved


def _remove(p: Path, ignore_errors: bool = False) -> None:
    """Delete a file, a link or a whole folder (a link to a folder is removed, never followed)."""
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    except OSError:
        if not ignore_errors:
            raise


def clear_run(out: Path) -> None:
    """Delete what a run wrote in ``out`` (after :func:`check_output`), keeping the folder and its lock.

    ``config.json`` goes first, so a kill part-way leaves a folder that is no
    longer a run; the next start sweeps the rest (:func:`sweep_unstarted`).
    """
    (out / "config.json").unlink(missing_ok=True)
    for p in sorted(out.iterdir()):
        if p.name != LOCK_NAME and is_run_entry(p.name):
            _remove(p)


def sweep_unstarted(out: Path) -> None:
    """A folder with no ``config.json`` holds no run: drop what a killed ``--overwrite`` left, keep the caches."""
    if (out / "config.json").exists():
        return
    for name in ("checkpoints", "student", "metrics.json", "samples.png", "train_log.jsonl", "validation",
                 "training-curves.png", "trackers"):
        if (out / name).exists() or (out / name).is_symlink():
            _remove(out / name)


def sweep_temporaries(out: Path) -> list[str]:
    """Remove every hidden temporary a killed run left in ``out``, ``checkpoints/`` and ``cache/``.

    A folder moved aside by an interrupted atomic replace (``.student.old``
    with no ``student/``) is put back first.  Returns the names removed.
    """
    from .fileio import recover_dir

    removed = []
    for entry in list(out.glob(".*.old")):
        recover_dir(out / entry.name[1:-4])
    for folder in (out, out / "checkpoints", out / "cache"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.name == LOCK_NAME or not any(fnmatch.fnmatchcase(p.name, t) for t in TEMPORARY_PATTERNS):
                continue
            _remove(p, ignore_errors=True)  # a temporary that will not go is swept again next time
            removed.append(str(p.relative_to(out)))
    return removed


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``out/.ttfm-distill.lock`` for as long as the lock is held.

    ``warn(message)`` is told when a lock left by a dead process is taken over.
    """

    def __init__(self, out: Path, what: str = "run", warn=lambda msg: None):
        self.path, self.what, self.warn, self.fd = Path(out) / LOCK_NAME, what, warn, None

    def acquire(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputInUse(f"{self.path.parent} is in use by another ttfm-distill process ({holder}); "
                              "wait for it to finish or choose another folder") from None
        previous = _read_holder(fd)
        if previous != "unknown":
            self.warn(f"taking over the lock of a ttfm-distill process that is gone ({previous})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} {self.what}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # an empty lock file: the holder ended cleanly
        finally:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "unknown"


def writer_lock(folder: Path, what: str):
    """The run folder's lock for a command that writes into ``folder`` (``sample``, ``eval``), if it is a run folder.

    A run training there holds the lock, so the command is refused in one line instead of
    writing beside (or being swept by) the run; any other folder needs no lock.
    """
    import contextlib

    folder = Path(folder)
    if (folder / "config.json").is_file() or (folder / LOCK_NAME).exists():
        return RunLock(folder, what)
    return contextlib.nullcontext()


#: where ``--overwrite`` moves the previous run until training starts (hidden; swept as a temporary after a kill)
SET_ASIDE = ".overwritten.tmp"


def _walk(root: Path) -> set[str]:
    """Every path under ``root``, relative (links are entries, never followed)."""
    found = set()
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        found.update(str(rel / name) for name in dirs + files)
    return found


class OutputClaim:
    """A run's claim on its output folder, undone by a refusal before training starts.

    Made before anything is written: it notes whether the folder existed (and which of its parents did not),
    every path in it and the bytes of ``config.json`` and ``run_state.json``.  :meth:`acquire` creates the folder, takes its lock,
    sweeps what a killed run left, and for ``--overwrite`` moves the previous run aside (not yet deleted).
    :meth:`undo` puts the folder back as it was found: it removes only paths that were not there (everything
    created since, under the lock), moves the previous run back, restores those two files, and removes the
    folders it created.  :meth:`commit` (training starts) deletes the previous run for good.
    """

    def __init__(self, out: Path, warn=lambda msg: None):
        self.out, self.warn = Path(out), warn
        self.created = []  # folders this claim creates: ``out`` and its missing parents, deepest first
        p = self.out
        while not p.exists() and not p.is_symlink() and p != p.parent:
            self.created.append(p)
            p = p.parent
        self.before = _walk(self.out) if self.out.is_dir() else set()
        #: the bytes of the files a run rewrites in place (a resume): restored by :meth:`undo`
        self.kept = {name: (self.out / name).read_bytes() for name in REWRITTEN
                     if (self.out / name).is_file() and not (self.out / name).is_symlink()}
        self.lock = None

    def acquire(self, overwrite: bool) -> RunLock:
        """Create and probe the folder, lock it, sweep a killed run's leftovers; ``overwrite``: set the run aside."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"cannot write to output folder {self.out}: {e.strerror}") from None
        self.lock = RunLock(self.out, "run", self.warn).acquire()
        sweep_temporaries(self.out)
        if overwrite:
            self._set_aside()
        sweep_unstarted(self.out)
        return self.lock

    def _set_aside(self) -> None:
        """What :func:`clear_run` deletes, moved into :data:`SET_ASIDE` instead (``config.json`` first)."""
        aside = self.out / SET_ASIDE
        aside.mkdir()
        names = sorted(p.name for p in self.out.iterdir() if p.name not in (LOCK_NAME, SET_ASIDE)
                       and is_run_entry(p.name))
        for name in sorted(names, key=lambda n: n != "config.json"):
            os.replace(self.out / name, aside / name)

    def commit(self) -> None:
        """Training starts: the previous run set aside by ``--overwrite`` is deleted."""
        aside = self.out / SET_ASIDE
        if self.lock is not None and aside.is_dir():
            _remove(aside, ignore_errors=True)  # what will not go is swept as a temporary next time

    def _put_back(self) -> None:
        aside = self.out / SET_ASIDE
        if aside.is_dir():
            for p in sorted(aside.iterdir()):
                if (self.out / p.name).exists() or (self.out / p.name).is_symlink():
                    _remove(self.out / p.name)  # made by this run after the previous one was set aside
                os.replace(p, self.out / p.name)
            aside.rmdir()
        new = {rel for rel in _walk(self.out) - self.before if rel.split(os.sep)[0] != SET_ASIDE}
        for rel in sorted(new, key=lambda r: r.count(os.sep), reverse=True):
            p = self.out / rel
            if p.exists() or p.is_symlink():
                _remove(p)
        for name, data in self.kept.items():
            path = self.out / name
            if path.is_file() and path.read_bytes() != data:
                from .fileio import atomic_path

                with atomic_path(path) as tmp:
                    tmp.write_bytes(data)

    def undo(self) -> None:
        """Leave the folder as it was found (a refusal before training); never touches what was there before."""
        if self.lock is not None:  # only under the lock: without it, new paths may be another run's
            try:
                self._put_back()
            except OSError as e:  # the refusal is what the user must see; this is said beside it
                self.warn(f"could not put {self.out} back as it was ({e.strerror or e}); "
                          f"the previous run, if any, is in {self.out / SET_ASIDE}")
                return
        for folder in self.created:
            if not folder.is_dir():
                continue  # a parent made before a deeper mkdir failed
            try:
                folder.rmdir()  # only an empty folder: anything else in it is not this run's
            except OSError:
                break

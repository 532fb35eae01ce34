"""On-disk caches of prepared training data: content keys and resumable chunked builds.

A cache entry is one safetensors file named by a key (a hash of everything the
tensors depend on).  While it is being built, finished chunks live in a
``<name>.parts/`` folder beside it, so an interrupted build keeps its finished
chunks and the next run continues from there.  Every file is written
atomically: a reader sees a whole chunk or none.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..fileio import save_tensors, write_text


def default_cache_dir() -> Path:
    """``$TTFM_DATA_CACHE``, else ``$XDG_CACHE_HOME/ttfm-distill/data`` (``~/.cache/...``)."""
    if os.environ.get("TTFM_DATA_CACHE"):
        return Path(os.environ["TTFM_DATA_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ttfm-distill" / "data"


def content_key(*parts) -> str:
    """A short stable hash of JSON-able ``parts``."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def files_signature(paths) -> list:
    """``(path, size, mtime_ns)`` of each file: changes when any file is edited, added or removed."""
    out = []
    for p in sorted(str(Path(p).resolve()) for p in paths):
        st = os.stat(p)
        out.append((p, st.st_size, st.st_mtime_ns))
    return out


@torch.no_grad()
def teacher_fingerprint(teacher) -> str:
    """What a latent or prompt cache depends on: the teacher's description and weights.

    The weights enter as per-tensor float64 sums, so a re-trained teacher at the
    same path gets new cache entries.  The teacher is frozen, so the key is computed
    once per teacher object (a pass over every weight) and kept on it: the run's
    resume check, the pool and the data caches all ask for it.
    """
    if teacher.fingerprint is not None:
        return teacher.fingerprint
    state = teacher.state_dict()
    sums = [(k, list(v.shape), float(v.detach().double().sum())) for k, v in sorted(state.items())
            if torch.is_tensor(v) and v.is_floating_point()]
    key = content_key(type(teacher).__name__, teacher.source or teacher.name, teacher.describe(), sums)
    teacher.fingerprint = key
    return key


@dataclass
class BuildReport:
    rows: int
    built_rows: int  # rows computed in this call (0: a full cache hit)
    resumed_rows: int  # rows found in an interrupted build's finished chunks
    seconds: float  # this call's build time
    first_build_seconds: float | None  # the build time recorded when the entry was made


def _load(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _read_seconds(path: Path) -> float:
    """The build time an interrupted build recorded; 0 when there is none or it is damaged (it is only reported)."""
    import math

    try:
        seconds = float(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return 0.0
    return seconds if math.isfinite(seconds) and seconds >= 0 else 0.0


def build_chunked(path: Path, n_rows: int, chunk_rows: int, make_chunk: Callable[[int, int], dict],
                  metadata: dict | None = None, progress=None, description: str = "preparing data",
                  log=lambda msg: None) -> tuple[dict, BuildReport]:
    """Load the cache entry ``path`` or build it chunk by chunk.

    ``make_chunk(start, stop)`` returns a dict of tensors with ``stop - start``
    rows each and must depend only on ``(start, stop)`` (so a resumed build
    equals an uninterrupted one).  ``progress``: a rich ``Progress`` or None.
    """
    path = Path(path)
    if path.exists():
        try:
            tensors, meta = _load(path)
            if all(v.shape[0] == n_rows for v in tensors.values()):
                first = float(meta["build_seconds"]) if "build_seconds" in meta else None
                return tensors, BuildReport(n_rows, 0, 0, 0.0, first)
        except Exception:  # noqa: BLE001 - any damage: rebuild
            pass
        log(f"[yellow]cache {path} is damaged or stale; rebuilding it[/]")
    parts = path.with_name(path.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    starts = list(range(0, n_rows, chunk_rows))
    chunks: dict[int, dict] = {}
    for i, start in enumerate(starts):
        f = parts / f"chunk-{i:06d}.safetensors"
        if f.exists():
            try:
                t, _ = _load(f)
                if t and all(v.shape[0] == min(chunk_rows, n_rows - start) for v in t.values()):
                    chunks[i] = t
            except Exception:  # noqa: BLE001 - a damaged chunk is simply rebuilt
                pass
    resumed = sum(min(chunk_rows, n_rows - starts[i]) for i in chunks)
    if resumed:
        log(f"resuming {description}: {resumed} of {n_rows} rows were already done in {parts}")
    previous = _read_seconds(parts / "seconds")
    t0 = time.time()
    task = progress.add_task(description, total=n_rows, completed=resumed) if progress is not None else None
    try:
        for i, start in enumerate(starts):
            if i in chunks:
                continue
            stop = min(start + chunk_rows, n_rows)
            chunk = {k: v.detach().cpu().contiguous() for k, v in make_chunk(start, stop).items()}
            save_tensors(parts / f"chunk-{i:06d}.safetensors", chunk)
            write_text(parts / "seconds", str(previous + time.time() - t0))
            chunks[i] = chunk
            if task is not None:
                progress.update(task, advance=stop - start)
    finally:
        if task is not None:
            progress.remove_task(task)
    tensors = {k: torch.cat([chunks[i][k] for i in range(len(starts))]) for k in chunks[0]} if starts else {}
    seconds = time.time() - t0
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    meta["build_seconds"] = f"{previous + seconds:.3f}"
    save_tensors(path, tensors, metadata=meta)
    shutil.rmtree(parts, ignore_errors=True)
    return tensors, BuildReport(n_rows, n_rows - resumed, resumed, seconds, previous + seconds)


def data_progress(console, enabled: bool):
    """A rich progress display for data preparation (rows, rate, time left)."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                    TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                    console=console, disable=not enabled, transient=False)

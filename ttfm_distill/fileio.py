"""Atomic writes: a reader never sees a half-written file or folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; rename it over ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes 0600, and some writers (safetensors) recreate the file 0600: give the usual permissions
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    """``Path.write_text`` atomically: a kill leaves the old text or the new, never an empty file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data, **dumps) -> None:
    """``data`` as indented JSON, atomically; ``dumps``: more ``json.dumps`` options (``default=str``)."""
    write_text(path, json.dumps(data, indent=2, **{"sort_keys": False, **dumps}) + "\n")


def save_tensors(path: str | Path, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except Exception as e:  # safetensors reports I/O failures (a full disk) as its own error type
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            errno_ = int(code.group(1))
            raise OSError(errno_, os.strerror(errno_), str(path)) from None


def save_torch(path: str | Path, obj) -> None:
    """``torch.save`` atomically; a full disk (which torch reports as an obscure RuntimeError) becomes ENOSPC."""
    import errno

    import torch

    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError:
            if shutil.disk_usage(Path(tmp).parent).free < 1 << 20:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
            raise


def recover_dir(path: str | Path) -> bool:
    """Put back a folder that a kill left moved aside by :func:`atomic_dir` (between its two renames).

    Returns whether anything was restored.
    """
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.is_dir():
        os.replace(old, path)
        return True
    return False


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` whole.

    An older ``path`` is moved aside first and removed only after the new
    one is in place, so a crash leaves either the old or the new folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

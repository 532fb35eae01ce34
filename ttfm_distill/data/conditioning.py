"""Per-row conditioning: class labels and (cached) prompt embeddings."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .errors import DataError

LABEL_COLUMNS = ("label", "labels", "class", "class_label", "fine_label")
CAPTION_COLUMNS = ("text", "caption", "captions", "prompt", "sentence")
PROMPT_CHUNK = 64


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per non-empty line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"cannot read prompt file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise DataError(f"prompt file {path} is not UTF-8 text") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise DataError(f"prompt file {path} holds no prompts (one per line)")
    return prompts


def label_ids(values, names: list[str] | None, num_classes: int, where: str) -> tuple[torch.Tensor, list[str] | None]:
    """Column values -> ``LongTensor (N,)``; strings are numbered in sorted order (returned as names)."""
    values = list(values)
    if any(v is None for v in values):
        raise DataError(f"{where}: row {next(i for i, v in enumerate(values) if v is None)} has no label")
    if values and all(isinstance(v, str) for v in values):
        names = sorted(set(values))
        index = {n: i for i, n in enumerate(names)}
        values = [index[v] for v in values]
    try:
        ids = torch.tensor([int(v) for v in values], dtype=torch.long)
    except (TypeError, ValueError):
        raise DataError(f"{where} holds values that are not class labels (e.g. {values[0]!r})") from None
    if len(ids) and (ids.min() < 0 or (num_classes and ids.max() >= num_classes)):
        raise DataError(f"{where} holds labels in [{int(ids.min())}, {int(ids.max())}], but the teacher has "
                        f"{num_classes} classes (0..{num_classes - 1})")
    return ids, names


def prompts_key(prompts: list[str]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def prompt_table(teacher, prompts: list[str], cache_dir: Path, teacher_fp: str, progress, log):
    """``encode_prompts`` of each unique prompt, cached: (table dict ``(U, ...)``, unique prompts, report)."""
    from .cache import build_chunked

    unique = sorted(set(prompts))
    path = Path(cache_dir) / f"prompts-{prompts_key(unique)}-{teacher_fp}.safetensors"

    @torch.no_grad()
    def make(start, stop):
        out = teacher.encode_prompts(unique[start:stop])
        if not isinstance(out, dict) or not out:
            raise DataError(f"teacher {teacher.name}: encode_prompts must return a dict of tensors")
        return out

    table, report = build_chunked(path, len(unique), PROMPT_CHUNK, make, metadata={"teacher": teacher.name},
                                  progress=progress, description="encoding prompts", log=log)
    if report.built_rows:
        log(f"encoded {report.built_rows} unique prompts in {report.seconds:.1f}s -> {path}")
    else:
        log(f"prompt embeddings: cache hit ({len(unique)} unique prompts) {path}")
    return table, unique, report


class PromptRows:
    """Maps per-row prompts to rows of a prompt-embedding table."""

    def __init__(self, table: dict, unique: list[str], prompts: list[str]):
        index = {p: i for i, p in enumerate(unique)}
        self.table = table
        self.index = torch.tensor([index[p] for p in prompts], dtype=torch.long)

    def rows(self, idx: torch.Tensor) -> dict:
        j = self.index[idx]
        return {k: v[j] for k, v in self.table.items()}


class PromptMemo:
    """Prompt embeddings computed on demand and kept in memory (streamed data)."""

    def __init__(self, teacher):
        self.teacher = teacher
        self.memo: dict[str, dict] = {}

    @torch.no_grad()
    def rows(self, prompts: list[str]) -> dict:
        new = sorted(set(p for p in prompts if p not in self.memo))
        if new:
            out = self.teacher.encode_prompts(new)
            for i, p in enumerate(new):
                self.memo[p] = {k: v[i].detach().cpu() for k, v in out.items()}
        keys = self.memo[prompts[0]].keys()
        return {k: torch.stack([self.memo[p][k] for p in prompts]) for k in keys}

"""Data sources the trainer draws from: every one is a :class:`DataSource`, ``sample(n, generator) -> (x1, cond)``.

Random indices and crop offsets come from the step's generator, so a resumed
run draws exactly the batches of an uninterrupted one (streamed sets excepted:
they are read in a shuffled order that restarts with the run).
"""

from __future__ import annotations

import queue
import threading

import numpy as np
import torch

from typing import Protocol

from .errors import DataError
from .images import to_unit_range


class DataSource(Protocol):
    """What the trainer draws clean samples from.

    ``sample(n, generator)`` returns ``(x1, cond)``: ``x1`` ``(n, *teacher.data_shape)`` in the teacher's
    data space (latents for latent teachers), ``cond`` a dict of batch-first conditioning tensors
    (``class_labels``, prompt embeddings, ...) or ``None``.  ``report`` goes into ``metrics.json``.
    """

    report: dict
    #: the pool's stored teacher solves ``(N, K + 1, *shape)`` (a data-free pool that keeps them), else ``None``
    trajectories: torch.Tensor | None

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, dict | None]: ...


def crop_batch(x: torch.Tensor, size: tuple[int, int], mode: str, generator: torch.Generator | None) -> torch.Tensor:
    """Crop ``x (B, C, H, W)`` to ``size``: the center, or a random window per sample."""
    H, W = x.shape[-2:]
    h, w = size
    if (H, W) == (h, w):
        return x
    if mode == "center":
        top, left = (H - h) // 2, (W - w) // 2
        return x[..., top:top + h, left:left + w]
    tops = torch.randint(0, H - h + 1, (x.shape[0],), generator=generator)
    lefts = torch.randint(0, W - w + 1, (x.shape[0],), generator=generator)
    return torch.stack([xi[..., t:t + h, le:le + w] for xi, t, le in zip(x, tops.tolist(), lefts.tolist())])


class TensorSource:
    """Rows of a prepared tensor (uint8 pixels or float teacher data) with per-row conditioning.

    ``base``: ``(N, C, Hb, Wb)``; a batch is ``base[idx]`` cropped to
    ``shape[-2:]`` (and mapped to [-1, 1] if uint8).  ``cond``: a dict of
    per-row tensors ``(N, ...)`` (e.g. ``class_labels``) or None.
    ``prompts``: a :class:`PromptRows` or None.
    """

    #: no stored solves (a data-free pool that keeps them sets its own)
    trajectories: torch.Tensor | None = None

    def __init__(self, base: torch.Tensor, shape, crop: str = "center", cond: dict | None = None, prompts=None,
                 report=None):
        self.base, self.shape, self.crop = base, tuple(shape), crop
        self.cond, self.prompts = (cond or None), prompts
        self.report = report or {}

    def __len__(self) -> int:
        return self.base.shape[0]

    def sample(self, n: int, generator: torch.Generator):
        idx = torch.randint(0, self.base.shape[0], (n,), generator=generator)
        x = crop_batch(self.base[idx], self.shape[-2:], self.crop, generator)
        if x.dtype == torch.uint8:
            x = to_unit_range(x)
        cond = {k: v[idx] for k, v in self.cond.items()} if self.cond else {}
        if self.prompts is not None:
            cond.update(self.prompts.rows(idx))
        return x, (cond or None)


class _End:
    pass


class StreamingSource:
    """A streamed dataset read by a background thread into a bounded queue of prepared rows.

    ``rows``: a callable ``epoch -> iterator of (uint8 (C, Hb, Wb), label or None, prompt or None)``.
    ``finish``: ``(uint8 batch, labels, prompts, generator) -> (x1, cond or None)`` (encodes latents, prompts).
    """

    trajectories = None

    def __init__(self, rows, finish, prefetch: int = 1024, report=None, name: str = "data"):
        self.rows, self.finish, self.name = rows, finish, name
        self.queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self.report = report or {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._fill, daemon=True, name="ttfm-data")
        self.thread.start()

    def _fill(self):
        epoch = 0
        try:
            while not self.stop.is_set():
                count = 0
                for row in self.rows(epoch):
                    count += 1
                    while not self.stop.is_set():
                        try:
                            self.queue.put(row, timeout=0.2)
                            break
                        except queue.Full:
                            continue
                    if self.stop.is_set():
                        return
                if count == 0:
                    raise DataError(f"dataset {self.name} has no rows")
                epoch += 1
        except BaseException as e:  # noqa: BLE001 - handed to the training thread
            self.queue.put(e)

    def sample(self, n: int, generator: torch.Generator):
        got = []
        while len(got) < n:
            item = self.queue.get()
            if isinstance(item, BaseException):
                self.queue.put(item)  # every later call fails the same way
                raise item
            got.append(item)
        images = torch.from_numpy(np.stack([r[0] for r in got]))
        labels = None if got[0][1] is None else torch.tensor([r[1] for r in got], dtype=torch.long)
        prompts = None if got[0][2] is None else [r[2] for r in got]
        return self.finish(images, labels, prompts, generator)

    def close(self):
        self.stop.set()

"""Data-free training data: clean samples of the teacher's own ODE from noise.

The pool is generated in chunks of :data:`POOL_CHUNK` samples; each finished
chunk is saved at once, so an interrupted generation keeps them and the next
run continues where it stopped.  The noise is one stream from one seed, drawn
chunk by chunk, so a resumed pool equals an uninterrupted one bit for bit.
Class-conditioned teachers get uniformly random class labels; text teachers
get prompts drawn from the ``--prompts`` file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .conditioning import PromptRows, prompt_table, prompts_key, read_prompt_file
from .errors import DataError
from .sources import TensorSource

POOL_CHUNK = 256


class TeacherPool(TensorSource):
    """Pool rows ``samples (N, *data_shape)`` with optional per-row conditioning."""

    def __init__(self, samples: torch.Tensor, labels=None, prompts=None, report=None):
        super().__init__(samples, samples.shape[1:], "center", labels, prompts, report)

    @property
    def samples(self) -> torch.Tensor:
        return self.base


class _NoiseStream:
    """``sample_noise`` rows ``[start, stop)`` of one seeded stream, drawn in order (re-drawn to skip)."""

    def __init__(self, teacher, seed: int):
        self.teacher, self.seed = teacher, seed
        self.generator, self.position = None, None

    def rows(self, start: int, stop: int) -> torch.Tensor:
        if self.position != start:
            self.generator, self.position = torch.Generator().manual_seed(self.seed), 0
            while self.position < start:  # skip finished chunks (cheap next to the ODE solves)
                step = min(POOL_CHUNK, start - self.position)
                self.teacher.sample_noise(step, generator=self.generator)
                self.position += step
        out = self.teacher.sample_noise(stop - start, generator=self.generator)
        self.position = stop
        return out


def build_pool(teacher, cfg, cache: Path, device, log, progress=None, cache_dir: Path | None = None,
               velocity=None) -> TeacherPool:
    """The cached, resumable data-free pool of ``cfg.pool_size`` Euler(``cfg.pool_steps``) teacher samples.

    ``velocity(x, t, cond)``: the field to integrate (default ``teacher.velocity``;
    pass a guided one to sample with guidance).  ``cache_dir``: where prompt
    embeddings are cached (text teachers).
    """
    from ..sampling import euler, uniform_time_grid
    from .cache import build_chunked

    velocity = velocity or teacher.velocity
    n = cfg.pool_size
    conditioning = getattr(teacher, "conditioning", None)
    labels, prompt_rows, tag = None, None, ""
    if conditioning == "class":
        if not getattr(teacher, "num_classes", 0):
            raise DataError(f"teacher {teacher.name} is class-conditioned but reports no number of classes")
        labels = torch.randint(0, teacher.num_classes, (n,), generator=torch.Generator().manual_seed(cfg.seed + 7920))
        tag = f"-classes{teacher.num_classes}"
    elif conditioning == "text":
        if not getattr(cfg, "prompts", None):
            raise DataError(f"teacher {teacher.name} is text-conditioned: data-free mode needs prompts; pass "
                            "--prompts FILE (one prompt per line) or real data with --caption-column")
        from .cache import default_cache_dir, teacher_fingerprint

        prompts = read_prompt_file(cfg.prompts)
        fp = teacher_fingerprint(teacher)
        table, unique, _ = prompt_table(teacher, prompts, Path(cache_dir or default_cache_dir()), fp, progress, log)
        pick = torch.randint(0, len(prompts), (n,), generator=torch.Generator().manual_seed(cfg.seed + 7921))
        prompt_rows = PromptRows(table, unique, [prompts[i] for i in pick.tolist()])
        tag = f"-prompts{prompts_key(prompts)}"

    path = Path(cache) / f"pool-n{n}-euler{cfg.pool_steps}-seed{cfg.seed}{tag}.safetensors"
    grid = uniform_time_grid(cfg.pool_steps, getattr(teacher, "shift", 1.0)).to(device)
    noise = _NoiseStream(teacher, cfg.seed + 7919)

    def make(start, stop):
        idx = torch.arange(start, stop)
        cond = {}
        if labels is not None:
            cond["class_labels"] = labels[idx].to(device)
        if prompt_rows is not None:
            cond.update({k: v.to(device) for k, v in prompt_rows.rows(idx).items()})
        v = (lambda x, t: velocity(x, t, cond)) if cond else velocity
        return {"samples": euler(v, noise.rows(start, stop).to(device), grid).float()}

    tensors, rep = build_chunked(path, n, POOL_CHUNK, make, progress=progress, log=log,
                                 description="data-free pool (teacher ODE)",
                                 metadata={"teacher": str(teacher.name), "solver": f"euler{cfg.pool_steps}"})
    report = {"source": "teacher", "samples": n, "solver": f"euler {cfg.pool_steps} steps", "path": str(path),
              "cache": "hit" if rep.built_rows == 0 else ("resumed" if rep.resumed_rows else "built"),
              "seconds": round(rep.seconds, 2), "generation_seconds": None if rep.first_build_seconds is None else round(rep.first_build_seconds, 2),
              "conditioning": conditioning}
    if rep.built_rows:
        what = f" (resumed: {rep.resumed_rows} were done)" if rep.resumed_rows else ""
        log(f"data-free pool: {n} teacher samples (Euler {cfg.pool_steps} steps) in {rep.seconds:.1f}s{what} -> {path}")
    else:
        took = f", generated in {rep.first_build_seconds:.1f}s" if rep.first_build_seconds is not None else ""
        log(f"data-free pool: {n} teacher samples from the cache{took} ({path})")
    return TeacherPool(tensors["samples"], labels, prompt_rows, report)

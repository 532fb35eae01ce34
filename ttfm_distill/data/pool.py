"""Data-free training data: clean samples of the teacher's own ODE from noise.

The pool is generated in chunks of :data:`POOL_CHUNK` samples; each finished
chunk is saved at once, so an interrupted generation keeps them and the next
run continues where it stopped.  The noise is one stream from one seed, drawn
chunk by chunk, so a resumed pool equals an uninterrupted one bit for bit (and
equals the earlier one-shot pool).  Conditioning comes from
``teacher.sample_cond`` (random class labels for class-conditioned teachers,
the empty prompt for text teachers) drawn from the same stream after the noise,
or, for a text teacher given ``--prompts``, from random lines of that file.
Guidance is whatever ``teacher.velocity`` applies (the run's, baked in at load).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .conditioning import PromptRows, prompt_table, prompts_key, read_prompt_file
from .errors import DataError
from .sources import TensorSource

POOL_CHUNK = 256


class TeacherPool(TensorSource):
    """Pool rows ``samples (N, *data_shape)`` with optional per-row conditioning ``cond`` (dict of ``(N, ...)``).

    ``trajectories`` (optional): states of each row's solve, ``(N, S, *data_shape)``, at the times ``times``
    ``(S,)``, an evenly spaced subset of the solve's grid (``[:, 0]`` the noise, ``[:, -1]`` the sample).
    """

    def __init__(self, samples: torch.Tensor, cond: dict | None = None, prompts=None, report=None,
                 trajectories: torch.Tensor | None = None, times: torch.Tensor | None = None):
        super().__init__(samples, samples.shape[1:], "center", cond, prompts, report)
        self.trajectories, self.times = trajectories, times

    @property
    def samples(self) -> torch.Tensor:
        return self.base

    def trajectory_rows(self, rows: torch.Tensor, i: torch.Tensor, j: torch.Tensor):
        """``(x_s, x_t, s, t, cond)`` of pool ``rows`` at grid indices ``i < j`` (each ``(m,)``)."""
        if self.trajectories is None:
            raise DataError("this pool keeps no trajectories (built with trajectory_fraction=0)")
        x_s, x_t = self.trajectories[rows, i], self.trajectories[rows, j]
        cond = {k: v[rows] for k, v in self.cond.items()} if self.cond else {}
        if self.prompts is not None:
            cond.update(self.prompts.rows(rows))
        return x_s, x_t, self.times[i], self.times[j], (cond or None)


class _NoiseStream:
    """``sample_noise`` rows ``[start, stop)`` of one seeded stream, drawn in order (re-drawn to skip)."""

    def __init__(self, teacher, seed: int):
        self.teacher, self.seed = teacher, seed
        self.generator, self.position = None, None

    def rows(self, start: int, stop: int) -> torch.Tensor:
        if self.position != start:
            self.skip_to(start)
        out = self.teacher.sample_noise(stop - start, generator=self.generator)
        self.position = stop
        return out

    def skip_to(self, start: int) -> torch.Generator:
        """Restart the stream and draw (and drop) its first ``start`` rows, chunk by chunk as generated."""
        self.generator, self.position = torch.Generator().manual_seed(self.seed), 0
        while self.position < start:
            step = min(POOL_CHUNK, start - self.position)
            self.teacher.sample_noise(step, generator=self.generator)
            self.position += step
        return self.generator


def kept_states(steps: int, mode: str | None, levels: int) -> list[int]:
    """Indices of a ``steps``-step solve's states the trajectory rows can use.

    Dyadic pairs of levels ``0..levels`` only ever start and end on multiples of ``steps / 2**levels``, so
    only those are kept (the noise and the sample alone for the 1-step jump); other pair draws need them all.
    """
    if mode == "dyadic" and steps % (2 ** levels) == 0:
        return list(range(0, steps + 1, steps // 2 ** levels))
    return list(range(steps + 1))


def trajectory_states(cfg) -> list[int]:
    """The states of the pool's solves that ``cfg``'s trajectory rows need (none without trajectory rows)."""
    if cfg.trajectory_share() <= 0:
        return []
    return kept_states(cfg.pool_steps, *cfg.trajectory_pairs())


def prompt_conditioning(teacher, cfg, n: int, cache_dir: Path | None, progress, log):
    """For a text teacher given ``--prompts``: ``(PromptRows of n random lines, cache-name tag)``, else ``(None, "")``."""
    if teacher.conditioning != "text" or not cfg.prompts:
        return None, ""
    from .cache import default_cache_dir, teacher_fingerprint

    prompts = read_prompt_file(cfg.prompts)
    table, unique, _ = prompt_table(teacher, prompts, Path(cache_dir or default_cache_dir()),
                                    teacher_fingerprint(teacher), progress, log)
    pick = torch.randint(0, len(prompts), (n,), generator=torch.Generator().manual_seed(cfg.seed + 7921))
    return PromptRows(table, unique, [prompts[i] for i in pick.tolist()]), f"-prompts{prompts_key(prompts)}"


def sampled_conditioning(teacher, seed: int, n: int, log) -> dict | None:
    """``teacher.sample_cond(n)`` drawn from the pool's stream just after its noise (as a one-shot pool draws it)."""
    if teacher.conditioning == "text":
        log("data-free pool of a text teacher without --prompts: every sample uses the empty prompt")
    return teacher.sample_cond(n, generator=_NoiseStream(teacher, seed).skip_to(n)) or None


def pool_file_name(cfg, grid_kind: str = "uniform", tag: str = "", fingerprint: str | None = None) -> str:
    """The cache file of ``cfg``'s pool: its size, solver, steps, time grid (``grid_kind``, resolved), kept
    trajectory states, precision (bf16 only; fp32 pools keep their earlier names), seed, prompts (``tag``) and the
    teacher's weights (``fingerprint``: ``data.cache.teacher_fingerprint``, which a run computes first)."""
    # keyed on the teacher's weights too: a teacher replaced at the same path never reuses an old pool
    key = f"-t{fingerprint[:12]}" if fingerprint else ""
    states = trajectory_states(cfg)
    traj = f"-traj{len(states)}" if states else ""
    gtag = "" if grid_kind == "uniform" else f"-{grid_kind}"
    ptag = "-bf16" if cfg.pool_precision_name() == "bf16" else ""
    return (f"pool-n{cfg.pool_size}-{cfg.pool_solver_name()}{cfg.pool_steps}{gtag}{traj}{ptag}-seed{cfg.seed}{tag}"
            f"{key}.safetensors")


def build_pool(teacher, cfg, cache: Path, device, log, progress=None, cache_dir: Path | None = None,
               velocity=None) -> TeacherPool:
    """The cached, resumable data-free pool of ``cfg.pool_size`` teacher samples (``cfg.pool_solver``, ``cfg.pool_steps``).

    With ``cfg.pool_precision_name() == "bf16"`` the teacher runs under bf16 autocast with its time embedders
    in fp32 (as in training); the solver's states stay fp32.

    With ``cfg.trajectory_fraction > 0`` the states of each solve its trajectory rows need are kept too
    (:func:`trajectory_states`; a pool file of its own).

    ``velocity(x, t, cond)``: the field to integrate (default ``teacher.velocity``).
    ``cache_dir``: where prompt embeddings are cached (text teachers with ``--prompts``).
    """
    from ..sampling import resolve_time_grid, solve_trajectory, time_grid
    from .cache import build_chunked

    velocity = velocity or teacher.velocity
    n = cfg.pool_size
    bf16 = cfg.pool_precision_name() == "bf16"
    if bf16:
        from ..scale import keep_time_embedders_fp32

        keep_time_embedders_fp32(teacher)
    prompt_rows, tag = prompt_conditioning(teacher, cfg, n, cache_dir, progress, log)
    solver = cfg.pool_solver_name()
    states = trajectory_states(cfg)
    keep = bool(states)
    io = teacher.io
    kind = resolve_time_grid(cfg.time_grid, io)
    path = Path(cache) / pool_file_name(cfg, kind, tag, teacher.fingerprint)
    grid = time_grid(cfg.pool_steps, teacher.shift, kind, io).to(device)
    noise = _NoiseStream(teacher, cfg.seed + 7919)
    drawn = {}  # sample_cond's draw, made only if a chunk has to be generated

    def make(start, stop):
        if "cond" not in drawn:
            drawn["cond"] = None if prompt_rows is not None else sampled_conditioning(teacher, cfg.seed + 7919, n, log)
        rows = {k: v[start:stop] for k, v in (drawn["cond"] or {}).items()}
        chunk = {k: v.to(device) for k, v in rows.items()}
        if prompt_rows is not None:
            chunk.update({k: v.to(device) for k, v in prompt_rows.rows(torch.arange(start, stop)).items()})
        field = (lambda x, t: velocity(x, t, chunk)) if chunk else velocity
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            solve = solve_trajectory(field, noise.rows(start, stop).to(device), grid, solver).float()
        out = {"samples": solve[:, -1].contiguous()}
        if keep:
            out["trajectories"] = solve[:, states].contiguous()
        if not bool(torch.isfinite(out["samples"]).all()):  # never cached: a fixed teacher must run again
            bad = int((~torch.isfinite(out["samples"].flatten(1))).any(1).sum())
            raise DataError(f"the teacher's ODE gave NaN/Inf in {bad} pool samples (rows {start}-{stop}, not cached); "
                            "check the teacher's weights and scheduler")
        out.update({f"cond.{k}": v for k, v in rows.items()})  # stored beside the samples, as before
        return out

    tensors, rep = build_chunked(path, n, POOL_CHUNK, make, progress=progress, log=log,
                                 description="data-free pool (teacher ODE)",
                                 metadata={"teacher": str(teacher.name), "solver": f"{solver}{cfg.pool_steps}",
                                           **({"precision": "bf16"} if bf16 else {})})
    stored = {k.removeprefix("cond."): v for k, v in tensors.items() if k.startswith("cond.")}
    report = {"source": "teacher", "samples": n, "solver": f"{solver} {cfg.pool_steps} steps",
              "precision": "bf16" if bf16 else "fp32",
              "time_grid": kind, "path": str(path),
              "cache": "hit" if rep.built_rows == 0 else ("resumed" if rep.resumed_rows else "built"),
              "seconds": round(rep.seconds, 2),
              "generation_seconds": None if rep.first_build_seconds is None else round(rep.first_build_seconds, 2),
              "conditioning": teacher.conditioning}
    if teacher.kind == "image" and not teacher.is_latent:  # pixels: [-1, 1]
        from ..metrics import out_of_range

        report["out_of_range"] = out_of_range(tensors["samples"])
        if report["out_of_range"]["rows"]:
            o = report["out_of_range"]
            log(f"warning: {o['rows']} of {n} pool samples are out of range (a pixel beyond +-{o['bound']}, "
                f"max |x| {o['max_abs']:.3g}): the teacher's own ODE solve leaves the data range")
    if rep.built_rows:
        what = f" (resumed: {rep.resumed_rows} were done)" if rep.resumed_rows else ""
        log(f"data-free pool: {n} teacher samples ({solver} {cfg.pool_steps} steps) in {rep.seconds:.1f}s{what} -> {path}")
    else:
        took = f", generated in {rep.first_build_seconds:.1f}s" if rep.first_build_seconds is not None else ""
        log(f"data-free pool: {n} teacher samples from the cache{took} ({path})")
    if keep:
        report["trajectories"] = {"states": len(states), "times": [round(float(grid[i]), 6) for i in states],
                                  "bytes": tensors["trajectories"].nbytes}
    return TeacherPool(tensors["samples"], stored or None, prompt_rows, report,
                       tensors.get("trajectories"), grid.cpu()[states] if keep else None)

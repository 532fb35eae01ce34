"""Measuring a student against its teacher (docs/method.md, Metrics).

* the run report at the end of training (``metrics.json``) is built on :class:`Evaluation` in ``report.py``.
* :func:`evaluate_student` / :class:`Evaluation`: ``ttfm-distill eval``: the
  student's N jumps and the teacher's Euler and Heun samplers at the same
  number of network evaluations (NFE), from the same noise, scored by the
  flow-map error, Frechet distances in the project classifier's features, KL
  (2-D), FID (with a local Inception file) and speed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .metrics import class_entropy, coverage, flow_map_error, frechet_distance, gaussian_stats, histogram_kl, knn_radii
from .sampling import (euler, fine_reference, heun, sample_flow_map, student_sampler, time_grid,  # noqa: F401
                       uniform_time_grid)
from .errors import TTFMError
from .teachers.analytic import AnalyticTeacher


def split_cond(cond: dict | None, batch_size: int, n: int, device) -> list[dict | None]:
    """``cond`` cut into the batches of ``range(n)`` (a list of ``None`` when there is none)."""
    starts = range(0, n, batch_size)
    if not cond:
        return [None for _ in starts]
    return [{k: v[i:i + batch_size].to(device) for k, v in cond.items()} for i in starts]


# --------------------------------------------------------------------------
# ``ttfm-distill eval``: every sampler at every NFE, scored from the same noise.
# --------------------------------------------------------------------------

METRIC_DESCRIPTIONS = {
    "flow_map_error": "E|x_N - x_ref|^2 / E|x_ref|^2, same noise; x_ref = the teacher's fine RK4 solve (docs/method.md)",
    "fd_test_images": "Frechet distance to the real Fashion-MNIST test images (and their mirror images) in the "
                      "features of the project's classifier",
    "fd_teacher_fine": "Frechet distance to the teacher's fine-solve samples (same noise) in the classifier's features",
    "kl": "KL(target || histogram of samples), 2-D teachers (metrics.histogram_kl: 50x50 grid + overflow cell)",
    "fid_test_images": "FID (Inception features of the --inception file) to real Fashion-MNIST test images",
    "fid_teacher_fine": "FID to the teacher's fine-solve samples",
    "ms_per_sample": "sampling wall time per sample (milliseconds), in batches of --batch-size",
    "samples_per_second": "samples per second, same timing",
    "out_of_range": "fraction of samples with a pixel beyond +-1.5 (pixel image teachers, whose data lie in [-1, 1])",
    "coverage": "diversity: the share of the teacher's fine-solve samples with a sample in their 5-nearest-neighbour "
                "ball, in the classifier's features (Naeem et al.; a collapsed sampler covers few)",
    "class_entropy": "diversity: entropy (nats) of the classifier's class histogram of the samples (log 10 = 2.30 "
                     "when every class is equally frequent); the teacher's fine solve: settings.reference_class_entropy",
}
#: a student whose coverage is below this share of the best teacher sampler's is said to lose diversity
DIVERSITY_SHARE = 0.8
from .metrics import PIXEL_RANGE, out_of_range  # noqa: E402,F401 - re-exported (the pool reports it too)
#: defaults by teacher kind: samples per sampler, and samples per network call
DEFAULT_NUM = {"image": 512, "points": 65536}
DEFAULT_BATCH = {"image": 256, "points": 8192}


class EvalError(TTFMError, ValueError):
    """Settings or models that ``eval`` cannot work with; the message says why."""


@dataclass
class Sampler:
    """One way to turn noise into samples with ``nfe`` network evaluations.

    ``run(x0, nfe)``: ``(B, *shape)`` noise -> samples; ``accepts(nfe)``:
    whether this sampler can use exactly ``nfe`` evaluations.
    """

    name: str
    run: Callable[..., torch.Tensor]
    accepts: Callable[[int], bool] = lambda nfe: nfe >= 1
    #: ``run(x0, nfe, cond)`` takes the batch's conditioning (class labels, prompt embeddings)
    conditional: bool = False


def student_flow_map_sampler(student, shift: float = 1.0, name: str = "student", grid: str = "uniform",
                             io=None) -> Sampler:
    """The student's N jumps on the (teacher-shifted) ``grid`` (sampling.time_grid): N evaluations."""
    io = io if io is not None else student.io
    return Sampler(name, lambda x, n, cond=None: sample_flow_map(student_sampler(student, cond), x,
                                                                 time_grid(n, shift, grid, io).to(x.device)),
                   conditional=True)


def _bound(teacher, cond):
    return lambda x, t: teacher.velocity(x, t, cond)


def teacher_euler_sampler(teacher, grid: str = "uniform") -> Sampler:
    shift, io = float(teacher.shift), teacher.io
    return Sampler("teacher_euler", lambda x, n, cond=None: euler(_bound(teacher, cond), x,
                                                                  time_grid(n, shift, grid, io).to(x.device)),
                   conditional=True)


def teacher_heun_sampler(teacher, grid: str = "uniform") -> Sampler:
    """Heun with ``nfe / 2`` steps; only even ``nfe >= 2`` (the report gives ``null`` for the rest)."""
    shift, io = float(teacher.shift), teacher.io
    return Sampler("teacher_heun", lambda x, n, cond=None: heun(_bound(teacher, cond), x,
                                                                time_grid(n // 2, shift, grid, io).to(x.device)),
                   accepts=lambda n: n >= 2 and n % 2 == 0, conditional=True)


def _finite_rows(x: torch.Tensor) -> int:
    return int((~torch.isfinite(x.reshape(x.shape[0], -1)).all(1)).sum())


class Evaluation:
    """Shared noise, the teacher's fine solve and the scorers; samplers are scored one by one.

    ``num`` noises from ``seed``; the reference is RK4 with ``reference_steps``
    steps.  Image teachers are scored in the shipped classifier's features
    when their pixel images are 1x16x16 (latent teachers are decoded first
    with ``teacher.decode``), 2-D analytic teachers by histogram KL, and with
    ``inception`` (a TorchScript file) by FID.  What cannot be computed is
    listed, with the reason, in :attr:`not_computed`.  ``on_step(label)`` is
    called after each unit of work (for a progress bar).  ``reference``: the
    fine solve of these same noises (``self.reference`` of an earlier
    Evaluation with the same teacher, ``num``, ``seed`` and steps), to skip
    recomputing it.
    """

    def __init__(self, teacher, num: int | None = None, seed: int = 0, reference_steps: int = 32,
                 batch_size: int | None = None, inception=None, device="cpu", on_step=None,
                 keep: int = 0, reference: torch.Tensor | None = None):
        self.kind = teacher.kind
        batch_size = int(batch_size or DEFAULT_BATCH.get(self.kind, 256))
        if reference_steps < 1 or batch_size < 1:
            raise EvalError("--reference-steps and --batch-size must be >= 1")
        self.teacher, self.device, self.batch_size, self.seed = teacher, device, batch_size, seed
        self.num = int(num or DEFAULT_NUM.get(self.kind, 512))
        if self.num < 2:
            raise EvalError(f"--num must be >= 2 (a covariance needs two samples), got {self.num}")
        self.reference_steps = reference_steps
        self.on_step = on_step or (lambda label: None)
        self.not_computed: dict[str, str] = {}
        self.info: dict = {}
        #: the first ``keep`` pixel images of the reference and of each (sampler, nfe), for figures
        self.keep, self.kept = keep, {}
        self.inception = inception
        if isinstance(inception, (str, Path)):
            from .features import load_inception

            self.inception = load_inception(inception)  # fails fast, before any sampling
        g = torch.Generator().manual_seed(seed)
        self.x0 = teacher.sample_noise(self.num, generator=g)
        #: conditioning shared by every sampler: random class labels, or ``None`` (the empty prompt)
        self.cond = teacher.sample_cond(self.num, generator=g)
        if self.cond:
            self.info["conditioning"] = {k: f"{tuple(v.shape)} from teacher.sample_cond, seed {seed}"
                                         for k, v in self.cond.items()}
        shift = float(teacher.shift)
        if reference is not None:  # the same fine solve, saved by an earlier Evaluation of these noises
            if tuple(reference.shape) != tuple(self.x0.shape):
                raise EvalError(f"a saved reference of shape {tuple(reference.shape)} does not fit {self.num} noises "
                                f"of shape {tuple(self.x0.shape[1:])}")
            self.reference = reference.cpu()
        else:
            self.reference = self._chunked(lambda x, c: fine_reference(_bound(teacher, c), x, reference_steps, shift))
        self.on_step(f"reference: RK4 {reference_steps} steps")
        self._setup_scorers()
        if keep and self.kind == "image":
            self.kept["reference"] = self._pixels(self.reference[:keep])

    # ---------------------------------------------------------------- setup --
    def _chunked(self, fn) -> torch.Tensor:
        """``fn(noise chunk, its conditioning)`` over the shared noise, concatenated on the CPU."""
        conds = split_cond(self.cond, self.batch_size, self.num, self.device)
        return torch.cat([fn(x.to(self.device), c).cpu() for x, c in zip(self.x0.split(self.batch_size), conds)])

    def _pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher data -> pixel images in [-1, 1] (``teacher.decode``; identity for pixel teachers)."""
        with torch.no_grad():
            out = [self.teacher.decode(c.to(self.device)).cpu() for c in x.split(self.batch_size)]
        return torch.cat(out).float().clamp(-1, 1)

    def _setup_scorers(self) -> None:
        from .features import CLASSIFIER_IMAGE_SHAPE, load_feature_classifier

        self.classifier = None
        self.kl_teacher = None
        self.fid_real = None
        self.ref_pixels = None
        images = self.kind == "image"
        shape = tuple(self.teacher.image_shape) if images else None
        self.pixel_teacher = images and not self.teacher.is_latent
        if not self.pixel_teacher:
            self.not_computed["out_of_range"] = "only for pixel image teachers (data in [-1, 1])"
        if self.kind == "points" and isinstance(self.teacher, AnalyticTeacher):
            self.kl_teacher = self.teacher
        else:
            self.not_computed["kl"] = "only for 2-D analytic teachers (kind 'points' with an exact density)"
        if not images:
            for key in ("fd_test_images", "fd_teacher_fine", "fid_test_images", "fid_teacher_fine"):
                self.not_computed[key] = f"only for image teachers (this one is kind {self.kind!r})"
            return
        if shape == CLASSIFIER_IMAGE_SHAPE or self.inception is not None:
            self.ref_pixels = self._pixels(self.reference)
        if shape == CLASSIFIER_IMAGE_SHAPE:
            self.classifier = load_feature_classifier()
            ref_features = self.classifier.features(self.ref_pixels)
            self.ref_stats = gaussian_stats(ref_features)
            self.ref_features, self.ref_radii = ref_features, knn_radii(ref_features)
            self.info["reference_class_entropy"] = class_entropy(self.classifier.logits(self.ref_pixels), 10)
            self.info["classifier"] = self.classifier.describe(str(self.teacher.source))
        else:
            reason = f"the feature classifier reads 1x16x16 images; this teacher makes {'x'.join(map(str, shape))}"
            self.not_computed["fd_test_images"] = self.not_computed["fd_teacher_fine"] = reason
        if self.inception is None:
            reason = ("no --inception file given: FID needs a local TorchScript Inception-v3 feature extractor "
                      "(inception-2015-12-05.pt, as StyleGAN3/clean-fid use); nothing is downloaded")
            self.not_computed["fid_test_images"] = self.not_computed["fid_teacher_fine"] = reason
            return
        from .features import inception_features

        self.ref_fid_stats = gaussian_stats(inception_features(self.inception, self.ref_pixels))
        real = self._real_images("test")
        if isinstance(real, str):
            self.not_computed["fid_test_images"] = real
        else:
            self.fid_real = gaussian_stats(inception_features(self.inception, real))
            self.info["fid_real_images"] = (f"{len(real)} random Fashion-MNIST test images, each mirrored with "
                                            f"probability 1/2 (seed {self.seed + 1})")

    def _real_images(self, split: str):
        """``num`` real images of ``split`` (random left-right flips, seeded), or a reason string."""
        from .features import real_fashion_images

        return real_fashion_images(split, self.num, self.seed + 1, tuple(self.teacher.image_shape))

    # -------------------------------------------------------------- scoring --
    def score(self, x: torch.Tensor, against_reference: bool = True) -> dict:
        """Every available metric of samples ``x`` ``(num, *data_shape)`` (teacher data space)."""
        bad = _finite_rows(x)
        if bad:
            return {"nonfinite_samples": bad}
        out = {}
        if against_reference:
            out["flow_map_error"] = flow_map_error(x, self.reference)
        if self.pixel_teacher:
            out["out_of_range"] = out_of_range(x)["fraction"]
        if self.kl_teacher is not None:
            out["kl"] = histogram_kl(x, self.kl_teacher)
        if self.kind == "image" and (self.classifier is not None or self.inception is not None):
            out.update(self._score_pixels(self._pixels(x), against_reference))
        return out

    def _score_pixels(self, pixels: torch.Tensor, against_reference: bool = True) -> dict:
        out = {}
        if self.classifier is not None:
            features = self.classifier.features(pixels)
            stats = gaussian_stats(features)
            out["fd_test_images"] = frechet_distance(*stats, self.classifier.test_mu, self.classifier.test_sigma)
            out["class_entropy"] = class_entropy(self.classifier.logits(pixels), 10)
            if against_reference:
                out["fd_teacher_fine"] = frechet_distance(*stats, *self.ref_stats)
                out["coverage"] = coverage(features, self.ref_features, radii=self.ref_radii)
        if self.inception is not None:
            from .features import inception_features

            stats = gaussian_stats(inception_features(self.inception, pixels))
            if self.fid_real is not None:
                out["fid_test_images"] = frechet_distance(*stats, *self.fid_real)
            if against_reference:
                out["fid_teacher_fine"] = frechet_distance(*stats, *self.ref_fid_stats)
        return out

    def run(self, sampler: Sampler, steps, collect: dict | None = None) -> dict:
        """``{str(nfe): metrics or None}`` for ``sampler`` at each NFE in ``steps``, timed.

        ``collect``: a dict that receives each NFE's samples (``{nfe: (num, *data_shape)}``, CPU), for figures.
        """
        results = {}
        warm = next((n for n in steps if sampler.accepts(n)), None)
        if warm is not None:  # one small untimed call first: lazy initialisation is not sampling time
            first = split_cond(self.cond, 2, 2, self.device)[0]
            sampler.run(self.x0[:2].to(self.device), warm, *((first,) if sampler.conditional else ()))
        for n in steps:
            if not sampler.accepts(n):
                results[str(n)] = None
                self.on_step(f"{sampler.name}: NFE {n} impossible")
                continue
            start = time.perf_counter()
            x = self._chunked(lambda c, k: sampler.run(c, n, k) if sampler.conditional else sampler.run(c, n))
            seconds = time.perf_counter() - start
            if self.keep and self.kind == "image":
                self.kept[(sampler.name, n)] = self._pixels(x[: self.keep])
            if collect is not None:
                collect[n] = x
            row = {"nfe": n, **self.score(x)}
            row["ms_per_sample"] = 1000.0 * seconds / self.num
            row["samples_per_second"] = self.num / seconds
            results[str(n)] = row
            self.on_step(f"{sampler.name}: NFE {n}")
        return results

    def floors(self) -> dict:
        """Scores of the teacher's fine solve, and of real training images where there are some."""
        out = {"teacher_fine": self.score(self.reference, against_reference=False)}
        if self.kind == "image" and (self.classifier is not None or self.inception is not None):
            real = self._real_images("train")
            if isinstance(real, str):
                out["real_train_images"] = {"not_computed": real}
            else:
                out["real_train_images"] = self._score_pixels(real.clamp(-1, 1))
        self.on_step("floors")
        return out

    def settings(self) -> dict:
        return {"num": self.num, "seed": self.seed, "reference": f"rk4, {self.reference_steps} steps",
                "batch_size": self.batch_size, "device": str(self.device), "torch_threads": torch.get_num_threads(),
                "time_grid": f"uniform, shift {float(self.teacher.shift)}"}


def evaluate_student(student, teacher, steps=(1, 2, 4, 8), teacher_steps=None, num: int | None = None, seed: int = 0,
                     reference_steps: int = 32, batch_size: int | None = None, inception=None, device="cpu",
                     show_progress: bool = False, console=None, time_grid: str = "uniform") -> dict:
    """The ``eval`` report: the student (N jumps) and the teacher's Euler and Heun at the same NFE.

    ``teacher_steps``: NFEs for the teacher's samplers (default: ``steps``).
    ``inception``: a TorchScript Inception file (or the loaded module) for FID.
    ``time_grid``: the grid every sampler steps on (the student's ``time_grid``; sampling.time_grid).
    Returns a JSON-ready dict: ``settings``, ``results`` (``{sampler: {nfe:
    metrics or null}}``), ``floors``, ``not_computed`` (metric -> reason),
    ``classifier`` and ``descriptions``.
    """
    steps = tuple(steps)
    teacher_steps = tuple(teacher_steps or steps)
    kind = teacher.kind
    total = 2 + len(steps) + 2 * len(teacher_steps)
    if isinstance(inception, (str, Path)):
        from .features import load_inception

        inception = load_inception(inception)  # a bad file fails before the progress bar starts
    progress = _eval_progress(console, show_progress)
    with progress:
        task = progress.add_task("evaluating", total=total, what="teacher reference")

        def on_step(label):
            progress.update(task, advance=1, what=label)

        ev = Evaluation(teacher, num, seed, reference_steps, batch_size, inception, device, on_step)
        shift = float(teacher.shift)
        results = {"student": ev.run(student_flow_map_sampler(student, shift, grid=time_grid), steps),
                   "teacher_euler": ev.run(teacher_euler_sampler(teacher, time_grid), teacher_steps),
                   "teacher_heun": ev.run(teacher_heun_sampler(teacher, time_grid), teacher_steps)}
        floors = ev.floors()
    return {
        "teacher": str(teacher.source or teacher.name),
        "kind": kind,
        "settings": {**ev.settings(), "steps": list(steps), "teacher_steps": list(teacher_steps),
                     "time_grid": f"{time_grid}, shift {float(teacher.shift)}"},
        "results": results,
        "floors": floors,
        "not_computed": ev.not_computed,
        **ev.info,
        "descriptions": {k: v for k, v in METRIC_DESCRIPTIONS.items() if k not in ev.not_computed},
    }


def _eval_progress(console, enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[what]}"), TimeElapsedColumn(),
                    console=console or Console(stderr=True), disable=not enabled, transient=False)


def teacher_spec_of(config) -> tuple[str, str | None]:
    """``(spec, subfolder)`` for :func:`~ttfm_distill.teachers.loading.load_teacher` from a student's config."""
    from .export import StudentLoadError

    info = config.teacher or {}
    if info.get("source"):
        return str(info["source"]), (info.get("subfolder") or None)
    name = info.get("name")
    if name:
        return (name if str(name).startswith("builtin:") else f"builtin:{name}"), None
    raise StudentLoadError("the student's ttfm_config.json names no teacher; pass --teacher")


def load_student_and_teacher(model: str, teacher: str | None = None, allow_pickle: bool = False):
    """The exported student in ``model`` and its teacher (``teacher`` overrides the recorded one)."""
    from .export import StudentLoadError, load_student, resolve_student_folder
    from .teachers.loading import load_teacher

    folder = resolve_student_folder(model)
    student, config = load_student(folder)
    spec, subfolder = (teacher, None) if teacher else teacher_spec_of(config)
    info = config.teacher or {}
    guidance = config.guidance
    t = load_teacher(spec, subfolder, allow_pickle=allow_pickle,
                     sample_size=config.sample_size if teacher is None else None,
                     guidance_scale=float(guidance["default"] if guidance else info.get("guidance_scale", 1.0)),
                     negative_prompt=info.get("negative_prompt", ""))
    if list(t.data_shape) != list(config.data_shape or t.data_shape):
        raise StudentLoadError(f"the student makes {config.data_shape} samples but teacher {spec} makes "
                               f"{list(t.data_shape)}; pass the teacher it was distilled from with --teacher")
    return folder, student, config, t


def _fmt(row: dict | None, key: str) -> str:
    if row is None:
        return "-"
    value = row.get(key)
    return "nan" if value is None else f"{value:.4g}"


def summary_lines(report: dict) -> list[str]:
    """Short lines for the terminal: each headline metric per NFE, student / teacher Euler / teacher Heun."""
    keys = [k for k in ("flow_map_error", "fd_test_images", "kl", "fid_test_images", "ms_per_sample")
            if k not in report.get("not_computed", {})]
    res = report["results"]
    nfes = sorted({int(n) for r in res.values() for n in r})
    lines = []
    for key in keys:
        cells = []
        for n in nfes:
            trio = [_fmt(res[s].get(str(n)), key) if str(n) in res[s] else "-" for s in res]
            cells.append(f"{n}: " + " / ".join(trio))
        lines.append(f"{key} ({' / '.join(res)}) at NFE " + "; ".join(cells))
    return lines


# --------------------------------------------------------------------------
# Plain warnings: a student worse than the teacher's own sampler, samples out of range.
# --------------------------------------------------------------------------

def _headline(rows: dict) -> str | None:
    keys = ("fd_test_images", "kl", "fid_test_images", "flow_map_error")
    return next((k for k in keys if any(r and r.get(k) is not None for r in rows.values())), None)


def worse_than_teacher(student: dict, teachers: dict[str, dict], key: str | None = None) -> str | None:
    """One line when the student (``{nfe: metrics}``) is worse than the teacher's best sampler at the same NFE.

    ``teachers``: ``{name: {nfe: metrics or None}}`` (lower is better for every metric compared).
    ``None`` when the student is at least as good at every NFE both were measured at.
    """
    key = key or _headline(student)
    if key is None:
        return None
    worse = []
    for n, row in sorted(student.items(), key=lambda kv: int(kv[0])):
        mine = None if row is None else row.get(key)
        if row is not None and row.get("nonfinite_samples"):
            mine = float("inf")
        rivals = [(r[key], name) for name, rows in teachers.items()
                  for r in [rows.get(str(n))] if r is not None and r.get(key) is not None]
        if mine is None or not rivals:
            continue
        best, name = min(rivals)
        if mine > best:
            worse.append((int(n), mine, best, name))
    if not worse:
        return None
    pretty = lambda name: name.replace("teacher_", "")  # noqa: E731
    detail = "; ".join(f"{n}: {mine:.4g} vs {pretty(name)} {best:.4g}" for n, mine, best, name in worse)
    steps = ", ".join(str(n) for n, *_ in worse)
    return (f"the student is WORSE than the teacher's own sampler at the same NFE at {steps} step(s) "
            f"({key}, lower is better: {detail})")


def lost_diversity(student: dict, teachers: dict[str, dict]) -> str | None:
    """One line when the student's coverage at some step count is well below the best of the teacher's samplers
    (``DIVERSITY_SHARE`` of it): the known failure of distribution matching, mode collapse."""
    best = max((r["coverage"] for rows in teachers.values() for r in rows.values() if r and r.get("coverage")),
               default=None)
    if best is None:
        return None
    low = [(n, r["coverage"]) for n, r in sorted(student.items(), key=lambda kv: int(kv[0]))
           if r and r.get("coverage") is not None and r["coverage"] < DIVERSITY_SHARE * best]
    if not low:
        return None
    return ("the student's samples are much LESS DIVERSE than the teacher's (coverage of the teacher's fine solve "
            f"{', '.join(f'{c:.2f} at {n} step(s)' for n, c in low)} against the teacher's best {best:.2f}): "
            "with dm_weight > 0 lower it or raise dm_fake_updates; without it the jump averages modes: train longer "
            "or sample with more steps")


#: what to try when the student is worse than the teacher's own sampler (docs/results.md, "When the student is
#: worse than its teacher"), appended to that warning
WORSE_ADVICE = ("; try: more steps (--max-steps), a lower --lr, the other student output (--set "
                "student_output=native|velocity), and compare the run's validation rows in train_log.jsonl")


def quality_warnings(report: dict) -> list[str]:
    """The plain warnings of an ``eval`` report (or of a run's ``metrics.json``), one line each.

    * the student worse than the teacher's own Euler/Heun at the same NFE (headline metric);
    * flow-map errors above 1 (further from the teacher's solve than the solve is from zero, so a
      ratio to the teacher's error says little);
    * samples out of range (pixel teachers: data in [-1, 1]), the student's or the data-free pool's.
    """
    lines = []
    if "results" in report:  # eval
        res = report["results"]
        student = res.get("student", {})
        teachers = {k: v for k, v in res.items() if k.startswith("teacher")}
    else:  # a run's metrics.json: {measure: {"student": {N: v}, "teacher_euler": {N: v}}}
        tables = {m: report[m] for m in ("flow_map_error", "fd_test_images", "fd_teacher_fine", "out_of_range",
                                         "coverage")
                  if isinstance(report.get(m), dict)}

        def rows(who):
            out = {}
            for m, table in tables.items():
                for n, v in table.get(who, {}).items():
                    out.setdefault(n, {})[m] = v
            return out

        student = rows("student")
        teachers = {"teacher_euler": rows("teacher_euler")}
    line = worse_than_teacher(student, teachers)
    if line:
        lines.append(line + WORSE_ADVICE)
    big = {n: r["flow_map_error"] for n, r in student.items() if r and (r.get("flow_map_error") or 0) > 1}
    if big:
        lines.append("flow-map error above 1 at " + ", ".join(f"{n} step(s) ({v:.3g})" for n, v in big.items())
                     + ": the samples are further from the teacher's fine solve than it is from zero; "
                     "compare FD or the pictures, not the ratio of errors")
    line = lost_diversity(student, teachers)
    if line:
        lines.append(line)
    bad = {n: r["out_of_range"] for n, r in student.items() if r and (r.get("out_of_range") or 0) > 0}
    if bad:
        lines.append(f"student samples out of range (a pixel beyond +-{PIXEL_RANGE}) at "
                     + ", ".join(f"{n} step(s): {100 * v:.1f}%" for n, v in bad.items()))
    pool = (report.get("data") or {}).get("out_of_range") or {}
    if pool.get("rows"):
        lines.append(f"data-free pool samples out of range: {pool['rows']} of {report['data'].get('samples')} "
                     f"({100 * pool['fraction']:.1f}%, max |x| {pool['max_abs']:.3g}, bound +-{pool['bound']}): the "
                     "teacher's own ODE solve leaves the data range, and the student is trained on it; check the "
                     "scheduler (clip_sample, timestep spacing) or use --data with real images")
    return lines


def run_data_report(folder: Path) -> dict | None:
    """The ``data`` block of the ``metrics.json`` of the run that exported the student in ``folder`` (if any)."""
    import json

    folder = Path(folder)
    for candidate in (folder.parent / "metrics.json", folder / "metrics.json"):
        try:
            return json.loads(candidate.read_text()).get("data")
        except (OSError, ValueError, AttributeError):  # missing, damaged, or not a JSON object
            continue
    return None

"""Trajectory supervision (trajectory_fraction) and the pool's solver (pool_solver)."""

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_cfg
from ttfm_distill.config import AUTO_TRAJECTORY_FRACTION, ConfigError, RunConfig
from ttfm_distill.objectives import make_objective
from ttfm_distill.objectives.trajectory import TrajectorySupervised
from ttfm_distill.preflight import resolve_settings, trajectory_rows
from ttfm_distill.trainer import Distillation, run_distillation


def test_a_run_with_trajectories_trains_logs_and_resumes_bit_for_bit(tiny_teacher_dir, tmp_path):
    # with the long jumps too (examples/embedded-tuned.toml's pair): their EMA targets resume as well
    kw = dict(trajectory_fraction=0.25, batch_size=8, loss_options={"long_jump_span": 0.5})
    run_distillation(tiny_cfg(tiny_teacher_dir, tmp_path / "a", max_steps=8, **kw), show_progress=False)
    run_distillation(tiny_cfg(tiny_teacher_dir, tmp_path / "b", max_steps=4, **kw), show_progress=False)
    run_distillation(tiny_cfg(tiny_teacher_dir, tmp_path / "b", max_steps=8, **kw), show_progress=False)
    a = load_file(tmp_path / "a" / "checkpoints" / "step-00000008" / "student.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "step-00000008" / "student.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    run_distillation(tiny_cfg(tiny_teacher_dir, tmp_path / "c", max_steps=8, **{**kw, "trajectory_fraction": 0.0}),
                     show_progress=False)
    c = load_file(tmp_path / "c" / "checkpoints" / "step-00000008" / "student.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the trajectory rows change the update
    import json

    history = json.loads((tmp_path / "a" / "checkpoints" / "step-00000008" / "trainer_state.json").read_text())["history"]
    assert len(history) == 8 and all(h["trajectory"] > 0 for h in history)


def test_an_analytic_teacher_has_no_pool_to_supervise_from(tmp_path):
    cfg = RunConfig(teacher="builtin:checkerboard", output=str(tmp_path / "x"), trajectory_fraction=0.25,
                    max_steps=2)
    with pytest.raises(ConfigError, match="needs a data-free pool"):
        run_distillation(cfg, show_progress=False)
    assert not (tmp_path / "x" / "config.json").exists()
    make_objective("itvm")  # the registry is untouched by the wrapper


def test_trajectory_rows_and_the_heun_pool_are_off_unless_set_and_a_resumed_run_keeps_its_own(tmp_path):
    """Unset: no rows and an Euler pool for every teacher (the rows helped the embedded flow teacher and cost the zoo's
    DiT teacher its 1-step student, docs/results.md); set: rows and a Heun pool; a resumed run keeps its own."""
    auto = RunConfig()
    assert auto.trajectory_fraction is None and auto.trajectory_share() == 0 < AUTO_TRAJECTORY_FRACTION
    assert auto.pool_solver_name() == "euler" and auto.trajectory_pairs() == ("dyadic", 0)
    rows = RunConfig(trajectory_fraction=AUTO_TRAJECTORY_FRACTION)
    assert rows.trajectory_share() == 0.125 and rows.pool_solver_name() == "heun"
    assert RunConfig(data="/some/images").trajectory_share() == 0  # real data: no solves to supervise from
    exact = RunConfig(teacher="builtin:checkerboard")
    assert exact.trajectory_share() == 0 and exact.pool_solver_name() == "euler"
    assert RunConfig(trajectory_fraction=0.0).pool_solver_name() == "euler"
    assert RunConfig(pool_solver="euler").pool_solver_name() == "euler"  # an explicit solver is kept
    # resolved once, from the teacher's prediction type: numbers in config.json, the objective wrapped where there are rows
    cfg, objective = resolve_settings(RunConfig(batch_size=32))  # not known yet (a dry run on a hub id): automatic
    assert cfg.trajectory_fraction is None and not isinstance(objective, TrajectorySupervised)
    cfg, objective = resolve_settings(RunConfig(batch_size=32), "flow")
    assert cfg.trajectory_fraction == 0 and cfg.pool_solver == "euler" and not isinstance(objective, TrajectorySupervised)
    cfg, objective = resolve_settings(RunConfig(batch_size=32, trajectory_fraction=0.125), "flow")
    assert cfg.pool_solver == "heun" and isinstance(objective, TrajectorySupervised) and trajectory_rows(cfg) == 4
    # a noise-predicting (diffusion) teacher: none, an Euler pool (the rows destabilised the DDPM teacher)
    cfg, objective = resolve_settings(RunConfig(), "epsilon")
    assert cfg.trajectory_fraction == 0 and cfg.pool_solver == "euler" and not isinstance(objective, TrajectorySupervised)
    cfg, objective = resolve_settings(RunConfig(teacher="builtin:checkerboard"), "flow")
    assert cfg.trajectory_fraction == 0 and cfg.pool_solver == "euler" and not isinstance(objective, TrajectorySupervised)
    # a resumed run keeps what it resolved to; a folder from before the settings ran without rows
    cfg, objective = resolve_settings(RunConfig(), "flow", {"trajectory_fraction": 0.25, "pool_solver": "euler"})
    assert (cfg.trajectory_fraction, cfg.pool_solver) == (0.25, "euler")
    cfg, objective = resolve_settings(RunConfig(), "epsilon", {"trajectory_fraction": 0.125, "pool_solver": "heun"})
    assert (cfg.trajectory_fraction, cfg.pool_solver) == (0.125, "heun") and isinstance(objective, TrajectorySupervised)
    cfg, objective = resolve_settings(RunConfig(), "flow", {"seed": 0})
    assert (cfg.trajectory_fraction, cfg.pool_solver) == (0.0, "euler")
    from ttfm_distill.config import resume_mismatch

    assert resume_mismatch({"trajectory_fraction": 0.125, "pool_solver": "heun"}, RunConfig().to_dict()) == []
    assert resume_mismatch({"trajectory_fraction": 0.125}, RunConfig(trajectory_fraction=0.0).to_dict()) == [
        "trajectory_fraction"]
    # an exact teacher runs with the defaults (no pool, no rows) instead of being refused
    res = run_distillation(RunConfig(teacher="builtin:checkerboard", output=str(tmp_path / "x"), max_steps=2,
                                     batch_size=16, eval_samples=16, reference_steps=4), show_progress=False)
    assert res is not None and (tmp_path / "x" / "config.json").exists()


def test_batches_carry_rows_of_the_stored_solves(tiny_teacher_dir, tmp_path):
    cfg = tiny_cfg(tiny_teacher_dir, tmp_path / "r", batch_size=8, trajectory_fraction=0.25, max_steps=2,
                   trajectory_time_sampling=None, trajectory_dyadic_levels=None)  # the objective's pairs: all states
    run = Distillation(cfg, show_progress=False)
    run.preflight()
    run.setup_accelerator()
    run.setup_teacher()
    run.claim_output()
    run.setup_data()
    run.start_step = 0
    batch = run.make_batch(0)
    rows = batch.trajectory
    assert batch.x_s.shape[0] == 6 and len(rows) == 2
    times = run.data.times
    for k in range(2):  # each row is a pair of states of one stored solve at grid times
        i, j = int((times - rows.s[k]).abs().argmin()), int((times - rows.t[k]).abs().argmin())
        assert i < j and times[i] == rows.s[k] and times[j] == rows.t[k]
        match = [(torch.equal(tr[i], rows.x_s[k]) and torch.equal(tr[j], rows.x_t[k])) for tr in run.data.trajectories]
        assert any(match)
    assert not torch.equal(run.make_batch(1).trajectory.x_s, rows.x_s)  # a new draw each step
    # on the 1- and 2-step samplers' jumps only: (0, 1), (0, 1/2), (1/2, 1)
    run.cfg.trajectory_time_sampling, run.cfg.trajectory_dyadic_levels = "dyadic", 1
    from ttfm_distill.batch import BatchPath

    run.batches = BatchPath.from_run(run.cfg, run.teacher, run.data)  # the path is fixed when the data is ready
    pairs = set()
    for step in range(30):
        b = run.make_batch(step).trajectory
        pairs |= {(round(float(s), 4), round(float(t), 4)) for s, t in zip(b.s, b.t)}
    assert pairs == {(0.0, 1.0), (0.0, 0.5), (0.5, 1.0)}

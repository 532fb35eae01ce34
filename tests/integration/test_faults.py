"""Interruptions, NaNs and resume: earlier results are never lost or corrupted."""

import json
import os
import signal
import subprocess
import sys
import time
import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_cfg
from ttfm_distill.objectives import OBJECTIVES
from ttfm_distill.objectives.itvm import ItvmObjective
from ttfm_distill.errors import NonFiniteLoss
from ttfm_distill.checkpoints import list_checkpoints
from ttfm_distill.trainer import run_distillation


def test_resumed_run_matches_uninterrupted_bit_for_bit(tiny_teacher_dir, tmp_path):
    ema = dict(ema_decay=0.9, loss_options={"target_model": "ema"}, diagonal_fraction=0.25)
    run_distillation(tiny_cfg(tiny_teacher_dir, tmp_path / "a", max_steps=8, **ema), show_progress=False)
    run_distillation(tiny_cfg(tiny_teacher_dir, tmp_path / "b", max_steps=4, **ema), show_progress=False)
    res = run_distillation(tiny_cfg(tiny_teacher_dir, tmp_path / "b", max_steps=8, **ema), show_progress=False)
    assert res.resumed_from == 4
    for name in ("student.safetensors", "ema.safetensors"):
        a = load_file(tmp_path / "a" / "checkpoints" / "step-00000008" / name)
        b = load_file(tmp_path / "b" / "checkpoints" / "step-00000008" / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # training moved the zero-initialised layer, so equal weights are not vacuous
    final = load_file(tmp_path / "a" / "checkpoints" / "step-00000008" / "student.safetensors")
    assert any(v.abs().sum() > 0 for k, v in final.items() if k.startswith("second_time.linear_2"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_teacher_dir, tmp_path, monkeypatch):
    calls = {"n": 0}

    class NanAfter(ItvmObjective):
        name = "nan-after"

        def __call__(self, *a, **k):
            out = super().__call__(*a, **k)
            calls["n"] += 1
            if calls["n"] > 6:
                out.loss = out.loss * float("nan")
            return out

    monkeypatch.setitem(OBJECTIVES, "nan-after", NanAfter)
    cfg = tiny_cfg(tiny_teacher_dir, tmp_path / "r", max_steps=12, loss="nan-after")
    with pytest.raises(NonFiniteLoss, match="step 6.*last good checkpoint: step 4"):
        run_distillation(cfg, show_progress=False)
    ckpts = list_checkpoints(tmp_path / "r")
    assert [p.name for p in ckpts] == ["step-00000004"]
    sd = load_file(ckpts[0] / "student.safetensors")
    assert all(torch.isfinite(v).all() for v in sd.values())
    assert not (tmp_path / "r" / "student").exists()  # nothing exported from a poisoned run

    calls["n"] = 0
    cfg = tiny_cfg(tiny_teacher_dir, tmp_path / "s", max_steps=10, loss="nan-after", nan_policy="skip")
    res = run_distillation(cfg, show_progress=False)
    assert res.metrics["training"]["skipped_steps"] == 4
    rows = [json.loads(line) for line in (tmp_path / "s" / "train_log.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 11))  # a skipped step keeps its row ...
    assert [r["loss"] is None for r in train] == [False] * 6 + [True] * 4  # ... with no loss and no gradient norm
    assert [r["skipped_steps"] for r in train] == [0] * 6 + [1, 2, 3, 4] and train[-1]["grad_norm"] is None


def test_sigterm_during_training_checkpoints_and_resumes(tiny_teacher_dir, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "ttfm_distill", "run", "--teacher", str(tiny_teacher_dir), "--output", str(out),
            "--max-steps", "100000", "--batch-size", "4", "--set", "pool_size=16", "--set", "pool_steps=2",
            "--set", "checkpoint_every=100000", "-q"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "cache").exists():
        time.sleep(0.5)
    time.sleep(3)  # some training steps
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err  # 128 + SIGTERM, the shell's convention
    assert "interrupted at step" in err and "Traceback" not in err
    ckpts = list_checkpoints(out)
    assert len(ckpts) == 1
    state = json.loads((ckpts[0] / "trainer_state.json").read_text())
    assert state["step"] > 0

import os
import stat

import pytest

import torch

from ttfm_distill.fileio import atomic_dir, atomic_path, save_tensors, write_json


def test_failed_write_keeps_previous_file(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text().strip().startswith("{")
    assert '"a": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_failed_dir_write_keeps_previous_dir(tmp_path):
    target = tmp_path / "student"
    with atomic_dir(target) as tmp:
        (tmp / "w.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "w.txt").write_text("new")
            raise RuntimeError("killed")
    assert (target / "w.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_written_files_get_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "c.json", {})
        save_tensors(tmp_path / "w.safetensors", {"w": torch.ones(2)})  # safetensors recreates its file 0600
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "c.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_resume_accepts_a_run_saved_before_a_setting_existed():
    from ttfm_distill.config import RunConfig, resume_mismatch

    current = RunConfig(max_steps=10).to_dict()
    old = {k: v for k, v in current.items() if k not in ("guidance_scale", "data_crop")}
    assert resume_mismatch(old, current) == []
    assert resume_mismatch(old, {**current, "guidance_scale": 3.0}) == ["guidance_scale"]

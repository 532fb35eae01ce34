"""LoRA students: one copy of the base weights, the teacher on the base, exports that reload."""

import json

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("peft")

from helpers import TINY, cli, lora_inputs as _inputs, lora_student as _lora, tiny_cfg  # noqa: E402
from ttfm_distill.export import load_student  # noqa: E402
from ttfm_distill.lora import load_lora_student  # noqa: E402
from ttfm_distill.objectives.base import flow_map  # noqa: E402
from ttfm_distill.teachers.loading import load_teacher  # noqa: E402
from ttfm_distill.trainer import run_distillation  # noqa: E402


def test_lora_run_through_the_cli_exports_a_merged_student(tiny_teacher_dir, tmp_path):
    out = tmp_path / "lora"
    r = cli("run", "--teacher", tiny_teacher_dir, "--output", out, "--max-steps", 6, "--set", "lora_rank=4",
            "--set", "lora_alpha=8", "--set", "checkpoint_every=3", "--ema-decay", 0, *TINY)  # export = raw weights
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "student" / "flow_map" / "ttfm_config.json").read_text())
    assert meta["lora"] == {"rank": 4, "alpha": 8.0, "targets": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"], "export": "merged"}
    # checkpoints hold the trained tensors only, not a second copy of the base
    ckpt = load_file(out / "checkpoints" / "step-00000006" / "student.safetensors")
    assert ckpt and all(".lora_" in k or k.startswith("second_time.") for k in ckpt)
    # the merged export is a plain student that samples like the in-memory LoRA student
    merged, _ = load_student(out)
    student, _ = _lora(tiny_teacher_dir, lora_alpha=8)
    student.load_trainable_state_dict(ckpt)
    student.eval()
    x, s, t = _inputs(seed=2)
    with torch.no_grad():
        a, b = flow_map(student, x, s, t), flow_map(merged, x, s, t)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(a, flow_map(_lora(tiny_teacher_dir)[0], x, s, t), atol=1e-4)  # it trained
    r = cli("sample", "--model", out, "--steps", 2, "--num", 4, "--output", tmp_path / "s.png")
    assert r.returncode == 0, r.stderr


def test_adapter_export_holds_the_ema_and_reloads(tiny_teacher_dir, tmp_path):
    ema = dict(lora_rank=4, ema_decay=0.5, loss_options={"target_model": "ema"}, lora_export="adapters")
    run_distillation(tiny_cfg(tiny_teacher_dir, tmp_path / "a", max_steps=4, **ema), show_progress=False)
    folder = tmp_path / "a" / "student"
    assert (folder / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((folder / "adapter" / "adapter_config.json").read_text())["r"] == 4
    loaded, teacher, config = load_lora_student(folder)
    assert config.lora["export"] == "adapters"
    ckpt = tmp_path / "a" / "checkpoints" / "step-00000004"
    raw, ema_state = load_file(ckpt / "student.safetensors"), load_file(ckpt / "ema.safetensors")
    assert raw.keys() == ema_state.keys()  # the EMA covers exactly the trained tensors
    assert any(not torch.equal(raw[k], ema_state[k]) for k in raw)
    expected, _ = _lora(tiny_teacher_dir)
    expected.load_trainable_state_dict(ema_state)
    x, s, t = _inputs(seed=3)
    with torch.no_grad():
        assert torch.allclose(loaded(x, s, t), expected.eval()(x, s, t), rtol=1e-6, atol=1e-6)
        assert torch.equal(teacher.velocity(x, t), load_teacher(str(tiny_teacher_dir)).velocity(x, t))
    # the CLI samples the adapter folder (on the teacher it names) like a pipeline built from it
    import numpy as np

    from ttfm_distill.pipeline import TTFMPipeline

    r = cli("sample", "--model", folder, "--steps", 2, "--num", 3, "--seed", 1, "--output", tmp_path / "a.png",
            "--save-raw", tmp_path / "a.npy")
    assert r.returncode == 0, r.stderr
    pipe = TTFMPipeline.from_student(folder)
    x = pipe(num_inference_steps=2, num_images_per_prompt=3, generator=torch.Generator().manual_seed(1),
             output_type="raw").images
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "a.npy")), x)


def test_lora_resume_is_bit_exact(tiny_teacher_dir, tmp_path):
    kw = dict(lora_rank=4, ema_decay=0.9, loss_options={"target_model": "ema"}, diagonal_fraction=0.25)
    run_distillation(tiny_cfg(tiny_teacher_dir, tmp_path / "a", max_steps=8, **kw), show_progress=False)
    run_distillation(tiny_cfg(tiny_teacher_dir, tmp_path / "b", max_steps=4, **kw), show_progress=False)
    res = run_distillation(tiny_cfg(tiny_teacher_dir, tmp_path / "b", max_steps=8, **kw), show_progress=False)
    assert res.resumed_from == 4
    for name in ("student.safetensors", "ema.safetensors"):
        a = load_file(tmp_path / "a" / "checkpoints" / "step-00000008" / name)
        b = load_file(tmp_path / "b" / "checkpoints" / "step-00000008" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

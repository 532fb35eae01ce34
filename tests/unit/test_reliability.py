"""Damaged resume files, incomplete teachers and students, and refusals that leave nothing behind.

Through the real entry point on folders made inside pytest's ``tmp_path``; every file damaged or deleted here
is a copy made by the test.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import edit_weights as _edit_weights


# ---------------------------------------------------------------- damaged resume files ---------------------------
@pytest.mark.parametrize("damage", ["seconds", "chunk", "entry", "entry metadata"])
def test_a_damaged_data_cache_is_rebuilt(tmp_path, damage):
    """The caches of real data and prompts share the pool's resumable builder (``build_chunked``)."""
    from ttfm_distill.data.cache import build_chunked

    def make(start, stop):
        return {"x": torch.arange(start, stop, dtype=torch.float32)}

    path = tmp_path / "pixels-abc.safetensors"
    logs = []
    full, _ = build_chunked(path, 10, 4, make, log=logs.append)
    if damage == "entry":
        path.write_bytes(b"")
    elif damage == "entry metadata":
        save_file(full, str(path), metadata={"build_seconds": ""})
    else:
        parts = path.with_name(path.name + ".parts")
        parts.mkdir()
        save_file(make(0, 4), str(parts / "chunk-000000.safetensors"))
        save_file(make(4, 8), str(parts / "chunk-000001.safetensors"))
        (parts / "seconds").write_text("2.0")
        path.unlink()
        (parts / ("seconds" if damage == "seconds" else "chunk-000001.safetensors")).write_bytes(b"")
    tensors, report = build_chunked(path, 10, 4, make, log=logs.append)
    assert torch.equal(tensors["x"], full["x"])
    assert report.first_build_seconds is not None and report.first_build_seconds >= 0
    if damage == "seconds":
        assert report.resumed_rows == 8
    if damage == "chunk":
        assert report.resumed_rows == 4
    assert torch.equal(load_file(path)["x"], full["x"]) and not path.with_name(path.name + ".parts").exists()


# ---------------------------------------------------------------- incomplete teachers and students ----------------
def test_a_vae_missing_a_tensor_is_refused_for_teachers_and_exports(tmp_path):
    from diffusers import AutoencoderKL

    from ttfm_distill.pipeline import _check_vae
    from ttfm_distill.student import StudentLoadError
    from ttfm_distill.teachers.pipeline import IncompleteWeights, load_vae

    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  layers_per_block=1, norm_num_groups=4).save_pretrained(tmp_path / "good")
    assert load_vae(tmp_path / "good").latent_channels == 4
    _check_vae(tmp_path / "good")  # a whole VAE passes
    bad = _edit_weights(tmp_path / "good", tmp_path / "vae", "diffusion_pytorch_model.safetensors",
                        drop="decoder.conv_out.weight")
    with pytest.raises(IncompleteWeights, match="lack tensor 'decoder.conv_out.weight'"):
        load_vae(bad)
    with pytest.raises(StudentLoadError, match="lack tensor 'decoder.conv_out.weight'"):
        _check_vae(bad)  # what TTFMPipeline.from_pretrained does for an export's vae/, before diffusers loads it
    extra = _edit_weights(tmp_path / "good", tmp_path / "vae2", "diffusion_pytorch_model.safetensors", add="extra.w")
    with pytest.raises(StudentLoadError, match="hold tensor 'extra.w'"):
        _check_vae(extra)


# ---------------------------------------------------------------- custom-code pipelines ---------------------------
@pytest.mark.parametrize("index, code", [
    ({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
      "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"], "image_encoder": [None, None],
      "feature_extractor": ["transformers", "CLIPImageProcessor"], "_diffusers_version": "0.21.0"}, None),
    ({"_class_name": "DiffusionPipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}, None),
    ({"_class_name": ["evil_pipeline", "EvilPipeline"]}, "evil_pipeline.EvilPipeline"),
    ({"_class_name": "NoSuchPipeline"}, "NoSuchPipeline"),
    ({"_class_name": "StableDiffusionPipeline", "unet": ["evil_unet", "EvilUNet"]}, "evil_unet.EvilUNet"),
])
def test_custom_code_is_told_from_diffusers_pipelines(tmp_path, index, code):
    from ttfm_distill.teachers.loading import custom_code

    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert custom_code(tmp_path) == code

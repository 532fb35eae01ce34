"""A whole tiny text-to-image pipeline folder (SD3: VAE, two CLIPs, T5, in-memory tokenizers) as a teacher."""

import pytest
import torch

pytest.importorskip("transformers")


def test_pipeline_teacher_is_latent_text_conditioned_and_guided(sd3_dir):
    from ttfm_distill.teachers.loading import load_teacher

    plain = load_teacher(str(sd3_dir))
    guided = load_teacher(str(sd3_dir), guidance_scale=3.0, negative_prompt="blurry")
    info = guided.describe()
    assert info["latent"] and info["image_shape"] == [3, 16, 16] and info["vae"]["downsampling"] == 2
    assert info["text_encoders"] and info["shift"] == 3.0 and info["conditioning"] == "text"

    cond = guided.encode_prompts(["a cat", "a red house"])
    assert cond["encoder_hidden_states"].shape[:2] == (2, 8 + 256) and cond["pooled_projections"].shape == (2, 8)
    assert (cond["encoder_hidden_states"][0] - cond["encoder_hidden_states"][1]).abs().max() > 1e-3

    x = torch.randn(2, *guided.data_shape)
    t = torch.tensor([0.3, 0.7])
    neg = guided.encode_prompts(["blurry", "blurry"])
    with torch.no_grad():
        v_c, v_n = plain.velocity(x, t, cond), plain.velocity(x, t, neg)
        torch.testing.assert_close(guided.velocity(x, t, cond), v_n + 3.0 * (v_c - v_n), atol=1e-5, rtol=1e-4)
        # no prompt = the pipeline's own empty prompt, not zeros
        torch.testing.assert_close(plain.velocity(x, t), plain.velocity(x, t, plain.encode_prompts(["", ""])))

    images = torch.rand(2, 3, 16, 16) * 2 - 1
    z = guided.encode_images(images)
    assert z.shape == (2, 4, 8, 8) and guided.decode(z).shape == (2, 3, 16, 16)

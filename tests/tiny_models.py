"""Tiny denoisers of every supported family, from shrunk copies of the released configs.

Each entry keeps the key names of a real released ``config.json`` (SD3-medium,
FLUX.1-dev, Sana 600M, PixArt-alpha, DiT-XL-2-256, Lumina-Image-2.0,
AuraFlow, SD 1.5's UNet) with the sizes shrunk, so loading code sees the real
format.  ``data_kw`` is what a latent needs beyond the config (Flux has no
``sample_size``).
"""

from __future__ import annotations

TINY_CONFIGS = {
    "UNet2DConditionModel": dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=[8, 16],
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        layers_per_block=1, cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
        flip_sin_to_cos=True, freq_shift=0,
    ),
    "SD3Transformer2DModel": dict(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
        pos_embed_max_size=16,
    ),
    "FluxTransformer2DModel": dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True,
        axes_dims_rope=[4, 6, 6],
    ),
    "FluxTransformer2DModel-schnell": dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=False,
        axes_dims_rope=[4, 6, 6],
    ),
    "SanaTransformer2DModel": dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=8,
        mlp_ratio=2.5, sample_size=8, patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6,
    ),
    "PixArtTransformer2DModel": dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=16, caption_channels=8, sample_size=8, patch_size=2, norm_type="ada_norm_single",
        norm_num_groups=4,
    ),
    "DiTTransformer2DModel": dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero",
    ),
    "Lumina2Transformer2DModel": dict(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, hidden_size=32, num_layers=1,
        num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16, norm_eps=1e-5,
        scaling_factor=1.0, axes_dim_rope=[4, 6, 6], axes_lens=[32, 32, 32], cap_feat_dim=8,
    ),
    "AuraFlowTransformer2DModel": dict(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        pos_embed_max_size=64,
    ),
}

#: latent size to pass for families whose config has no sample_size
SAMPLE_SIZE = {"FluxTransformer2DModel": 8, "FluxTransformer2DModel-schnell": 8}


def class_name(key: str) -> str:
    return key.split("-")[0]


def build(key: str, seed: int = 0):
    import diffusers
    import torch

    torch.manual_seed(seed)
    cls = getattr(diffusers, class_name(key))
    return cls.from_config(TINY_CONFIGS[key])

"""Built-in denoiser configurations for ``ttfm-distill plan``: no download, no weights.

Each public entry holds the values of the model's published diffusers ``config.json``
(the keys that differ from the class defaults), the latent geometry its pipeline
uses (VAE downsampling factor, native resolution), the text tokens its pipeline
feeds the denoiser, and the parameter count its authors publish, with where that
figure is stated.  ``tests/unit/test_plan.py`` checks the meta-device count against it.

The ``tiny-*`` entries are the shrunk configs of ``tests/tiny_models.py`` (a test
keeps the two equal) and ``fashion16`` is the embedded teacher.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"


@dataclass(frozen=True)
class KnownModel:
    name: str
    class_name: str
    config: dict
    #: pixels per latent cell (the VAE's downsampling factor); 1: a pixel-space model
    vae_factor: int = 8
    #: the pipeline's default image side in pixels
    resolution: int = 1024
    #: text tokens the pipeline passes the denoiser (0: no text)
    text_tokens: int = 0
    #: published parameter count of the denoiser and its rounding (the figure's last significant digit)
    published: float | None = None
    published_step: float | None = None
    published_source: str = ""
    #: hub id of the published weights, for the record only (nothing is downloaded)
    repo: str = ""
    notes: tuple = field(default_factory=tuple)


PUBLIC = [
    KnownModel(
        "sd3.5-medium", "SD3Transformer2DModel",
        dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
             pos_embed_max_size=384, dual_attention_layers=list(range(13)), qk_norm="rms_norm"),
        text_tokens=77 + 256, published=2.5e9, published_step=0.1e9,
        published_source="Stability AI model card: '2.5 billion parameters' (counts the 384x384 positional table too)",
        repo="stabilityai/stable-diffusion-3.5-medium"),
    KnownModel(
        "sd3.5-large", "SD3Transformer2DModel",
        dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
             num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
             pos_embed_max_size=192, qk_norm="rms_norm"),
        text_tokens=77 + 256, published=8.1e9, published_step=0.1e9,
        published_source="Stability AI / diffusers SD3.5 release: '8.1 billion parameters'",
        repo="stabilityai/stable-diffusion-3.5-large"),
    KnownModel(
        "flux.1-dev", "FluxTransformer2DModel",
        dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
             axes_dims_rope=[16, 56, 56]),
        text_tokens=512, published=12e9, published_step=1e9,
        published_source="Black Forest Labs model card: '12 billion parameter rectified flow transformer'",
        repo="black-forest-labs/FLUX.1-dev"),
    KnownModel(
        "sana-1.6b", "SanaTransformer2DModel",
        dict(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
             num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
             caption_channels=2304, mlp_ratio=2.5, sample_size=32, patch_size=1, norm_elementwise_affine=False,
             norm_eps=1e-6),
        vae_factor=32, text_tokens=300, published=1.6e9, published_step=0.1e9,
        published_source="Sana paper and model zoo: 'Sana-1.6B'",
        repo="Efficient-Large-Model/Sana_1600M_1024px_diffusers"),
    KnownModel(
        "pixart-sigma", "PixArtTransformer2DModel",
        dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
             cross_attention_dim=1152, caption_channels=4096, sample_size=128, patch_size=2,
             norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
             use_additional_conditions=False, interpolation_scale=2, num_embeds_ada_norm=1000,
             activation_fn="gelu-approximate", attention_bias=True),
        text_tokens=300, published=0.6e9, published_step=0.1e9,
        published_source="PixArt-Sigma paper: '0.6B parameters'",
        repo="PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"),
]

#: the shrunk configs of tests/tiny_models.py (kept equal by a test), as built-in names
TINY = {
    "UNet2DConditionModel": dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=[8, 16],
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        layers_per_block=1, cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
        flip_sin_to_cos=True, freq_shift=0),
    "SD3Transformer2DModel": dict(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
        pos_embed_max_size=16),
    "FluxTransformer2DModel": dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True,
        axes_dims_rope=[4, 6, 6]),
    "SanaTransformer2DModel": dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=8,
        mlp_ratio=2.5, sample_size=8, patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6),
    "PixArtTransformer2DModel": dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=16, caption_channels=8, sample_size=8, patch_size=2, norm_type="ada_norm_single",
        norm_num_groups=4),
    "DiTTransformer2DModel": dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero"),
    "Lumina2Transformer2DModel": dict(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, hidden_size=32, num_layers=1,
        num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16, norm_eps=1e-5,
        scaling_factor=1.0, axes_dim_rope=[4, 6, 6], axes_lens=[32, 32, 32], cap_feat_dim=8),
    "AuraFlowTransformer2DModel": dict(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        pos_embed_max_size=64),
}
TINY_NAMES = {
    "UNet2DConditionModel": "tiny-unet-cond", "SD3Transformer2DModel": "tiny-sd3", "FluxTransformer2DModel": "tiny-flux",
    "SanaTransformer2DModel": "tiny-sana", "PixArtTransformer2DModel": "tiny-pixart", "DiTTransformer2DModel": "tiny-dit",
    "Lumina2Transformer2DModel": "tiny-lumina2", "AuraFlowTransformer2DModel": "tiny-auraflow",
}
#: text tokens a tiny text model is planned with (the tests' empty prompts are 8 tokens)
TINY_TEXT_TOKENS = 8

#: a CPU-sized SD3-style transformer (for checking the planner against real tensors on a CPU)
SD3_SMALL = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=32,
                 num_attention_heads=8, joint_attention_dim=256, caption_projection_dim=256, pooled_projection_dim=128,
                 pos_embed_max_size=32)

#: text tokens the family's pipeline uses, for teachers read from a folder
FAMILY_TEXT_TOKENS = {"SD3Transformer2DModel": 333, "FluxTransformer2DModel": 512, "SanaTransformer2DModel": 300,
                      "PixArtTransformer2DModel": 300, "UNet2DConditionModel": 77, "Lumina2Transformer2DModel": 256,
                      "AuraFlowTransformer2DModel": 256}
#: Flux has no sample_size in its config; its pipeline's default latent is 128 (1024 px)
FAMILY_DEFAULT_LATENT = {"FluxTransformer2DModel": 128}


def _known() -> dict[str, KnownModel]:
    out = {m.name: m for m in PUBLIC}
    for cls, cfg in TINY.items():
        size = cfg.get("sample_size", 8)
        out[TINY_NAMES[cls]] = KnownModel(TINY_NAMES[cls], cls, cfg, vae_factor=1, resolution=size,
                                          text_tokens=TINY_TEXT_TOKENS if cls in FAMILY_TEXT_TOKENS else 0)
    out["sd3-small"] = KnownModel("sd3-small", "SD3Transformer2DModel", SD3_SMALL, vae_factor=8, resolution=128,
                                  text_tokens=77)
    fashion = json.loads((ASSETS / "fashion16" / "unet" / "config.json").read_text())
    out["fashion16"] = KnownModel("fashion16", fashion["_class_name"], {k: v for k, v in fashion.items()
                                                                        if not k.startswith("_")},
                                  vae_factor=1, resolution=int(fashion["sample_size"]))
    return out


KNOWN_MODELS = _known()
ALIASES = {"builtin:fashion16": "fashion16", "flux-dev": "flux.1-dev", "flux1-dev": "flux.1-dev",
           "sd35-medium": "sd3.5-medium", "sd35-large": "sd3.5-large", "sana": "sana-1.6b", "sana1.6b": "sana-1.6b",
           "pixart-sigma-xl": "pixart-sigma"}


def known_model(name: str) -> KnownModel | None:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    return KNOWN_MODELS.get(key)

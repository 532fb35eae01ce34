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


def tiny_tokenizer(max_length: int):
    """A word-level tokenizer built in memory (no files, no hub), saved in the transformers format."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "<pad> <unk> </s> <s> a an the cat dog photo of red blue green big small house tree".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                   bos_token="<s>", model_max_length=max_length)


def tiny_sd3_pipeline(root, seed: int = 0):
    """A whole tiny StableDiffusion3Pipeline folder: SD3 transformer, VAE, two CLIPs and a T5 with in-memory
    tokenizers (key names of the released configs, sizes shrunk); about 1 MB, loads offline."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = build("SD3Transformer2DModel", seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, scaling_factor=1.5305, shift_factor=0.0609)
    clip = dict(vocab_size=20, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16, projection_dim=4, bos_token_id=3, eos_token_id=2, pad_token_id=0)
    t5 = T5Config(vocab_size=20, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                  relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=2)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**clip)), tokenizer=tiny_tokenizer(8),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**clip)), tokenizer_2=tiny_tokenizer(8),
        text_encoder_3=T5EncoderModel(t5), tokenizer_3=tiny_tokenizer(16),
    )
    pipe.save_pretrained(root)
    return root

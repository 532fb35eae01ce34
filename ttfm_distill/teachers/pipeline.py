"""The parts of a pipeline folder around the denoiser: the VAE of latent teachers and the text encoders.

* :class:`LatentCodec` wraps a diffusers autoencoder: ``encode`` maps images in
  [-1, 1] to the latents the denoiser was trained on (``(z - shift) * scale``),
  ``decode`` maps them back.
* :class:`PromptEncoder` loads the pipeline's text encoders once (lazily, without
  the denoiser or the VAE) and calls the pipeline's own ``encode_prompt``; each
  family's return value becomes the ``cond`` dict its adapter takes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from ..errors import InputError

VAE_CLASSES = ("AutoencoderKL", "AutoencoderDC", "AutoencoderTiny", "AsymmetricAutoencoderKL")


class LatentCodec(nn.Module):
    """Images <-> denoiser latents through a diffusers VAE (frozen)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.scale = float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
        self.shift = float(getattr(cfg, "shift_factor", 0.0) or 0.0)
        blocks = getattr(cfg, "block_out_channels", None) or getattr(cfg, "encoder_block_out_channels", None)
        self.factor = 2 ** (len(blocks) - 1)
        self.image_channels = int(getattr(cfg, "in_channels", 3))
        self.latent_channels = int(cfg.latent_channels)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        out = self.vae.encode(images.to(self.vae.dtype))
        if hasattr(out, "latent_dist"):
            z = out.latent_dist.mode()  # deterministic: cached latents are reproducible
        else:
            z = out.latent if hasattr(out, "latent") else out.latents
        return ((z - self.shift) * self.scale).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.vae.dtype) / self.scale + self.shift
        return self.vae.decode(z, return_dict=False)[0].float().clamp(-1, 1)

    def describe(self) -> dict:
        return {"class_name": type(self.vae).__name__, "scaling_factor": self.scale, "shift_factor": self.shift,
                "downsampling": self.factor, "latent_channels": self.latent_channels,
                "parameters": sum(p.numel() for p in self.vae.parameters())}


class IncompleteWeights(InputError):
    """A model folder whose weights lack a tensor of the model, or hold one it has no place for."""


def load_complete(cls, folder: Path, use_safetensors: bool = True):
    """``cls.from_pretrained(folder)``, refused when the weights lack a tensor of the model or hold one it has no
    place for: diffusers would only warn and leave the missing tensors at their random initial values."""
    import diffusers

    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # its "newly initialized" warning: refused below in one line
    try:
        model, info = cls.from_pretrained(folder, use_safetensors=use_safetensors, low_cpu_mem_usage=False,
                                          output_loading_info=True)
    finally:
        diffusers.utils.logging.set_verbosity(level)
    names = {k: sorted(n[0] if isinstance(n, tuple) else n for n in info.get(k) or ())
             for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    _refuse_incomplete(folder, names["missing_keys"], names["unexpected_keys"], names["mismatched_keys"])
    return model


def check_complete(cls, folder: Path) -> None:
    """Refuse a model folder (diffusers layout, safetensors) whose weights files lack a tensor of ``cls`` built
    from its ``config.json``, or hold one it has no place for, before diffusers loads it with only a warning.
    The model is built without memory (accelerate's empty weights) and only the files' headers are read."""
    import re

    from accelerate import init_empty_weights
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return  # nothing to compare: diffusers' own load reports a folder without weights
    with init_empty_weights():
        expected = set(cls.from_config(cls.load_config(folder)).state_dict())
    found = set()
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            found.update(h.keys())
    ignored = getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or ()
    unexpected = [k for k in found - expected if not any(re.search(p, k) for p in ignored)]
    _refuse_incomplete(folder, sorted(expected - found), sorted(unexpected), [])


def _refuse_incomplete(folder, missing, unexpected, mismatched) -> None:
    for names, what in ((missing, "lack tensor"), (unexpected, "hold tensor"), (mismatched, "have another shape for")):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            why = "its config.json has no place for it" if names is unexpected else "it would run on random values"
            # the tensor first: a long folder path is what a cut line loses
            raise IncompleteWeights(f"the weights {what} {names[0][:60]!r}{more} ({why}); restore the weights and "
                                    f"config.json of {folder}")


def load_vae(folder: Path, use_safetensors: bool = True) -> LatentCodec:
    import json

    import diffusers

    name = json.loads((folder / "config.json").read_text()).get("_class_name")
    if name not in VAE_CLASSES:
        raise InputError(f"{folder} holds a {name}, not a supported VAE ({', '.join(VAE_CLASSES)})")
    return LatentCodec(load_complete(getattr(diffusers, name), folder, use_safetensors=use_safetensors))


def _text_dict(family: str, out) -> dict:
    """The ``cond`` dict of one family from its pipeline's ``encode_prompt`` return value."""
    if family == "SD3Transformer2DModel":  # (embeds, neg, pooled, neg_pooled)
        return {"encoder_hidden_states": out[0], "pooled_projections": out[2]}
    if family == "FluxTransformer2DModel":  # (embeds, pooled, text_ids)
        return {"encoder_hidden_states": out[0], "pooled_projections": out[1]}
    if family in ("SanaTransformer2DModel", "PixArtTransformer2DModel", "Lumina2Transformer2DModel"):
        return {"encoder_hidden_states": out[0], "encoder_attention_mask": out[1]}  # (embeds, mask, neg, neg_mask)
    if family in ("AuraFlowTransformer2DModel", "UNet2DConditionModel"):
        return {"encoder_hidden_states": out[0]}
    raise InputError(f"no prompt encoding for {family}")


def _encode_kwargs(family: str) -> dict:
    if family == "SD3Transformer2DModel":
        return {"prompt_2": None, "prompt_3": None, "do_classifier_free_guidance": False}
    if family == "FluxTransformer2DModel":
        return {"prompt_2": None}
    if family == "UNet2DConditionModel":
        return {"device": torch.device("cpu"), "num_images_per_prompt": 1, "do_classifier_free_guidance": False}
    return {"do_classifier_free_guidance": False}


class PromptEncoder:
    """The pipeline's text encoders, loaded on first use, behind one call: prompts -> ``cond`` dict."""

    def __init__(self, root: Path, family: str, denoiser_subfolder: str, use_safetensors: bool = True):
        self.root = Path(root)
        self.family = family
        self.denoiser_subfolder = denoiser_subfolder
        self.use_safetensors = use_safetensors
        self._pipe = None

    def pipeline(self):
        if self._pipe is None:
            import diffusers

            diffusers.utils.logging.disable_progress_bar()
            try:
                import transformers

                transformers.utils.logging.disable_progress_bar()
                transformers.utils.logging.set_verbosity_error()
            except ImportError:
                raise InputError("text encoders need the transformers package: pip install 'ttfm-distill[text]'") from None
            skip = {self.denoiser_subfolder: None, "vae": None}
            self._pipe = diffusers.DiffusionPipeline.from_pretrained(self.root, use_safetensors=self.use_safetensors,
                                                                     **skip)
        return self._pipe

    @torch.no_grad()
    def __call__(self, prompts: list[str], device=None) -> dict:
        pipe = self.pipeline()
        if device is not None:
            pipe.to(device)
        kwargs = _encode_kwargs(self.family)
        out = pipe.encode_prompt(list(prompts), **kwargs)
        cond = _text_dict(self.family, out)
        return {k: v.float() if v.is_floating_point() else v for k, v in cond.items()}


def text_components(root: Path) -> list[str]:
    """Names of the text encoders a pipeline folder holds (from ``model_index.json``)."""
    import json

    index = root / "model_index.json"
    if not index.exists():
        return []
    spec = json.loads(index.read_text())
    return sorted(k for k, v in spec.items() if k.startswith("text_encoder") and isinstance(v, list) and v[0])

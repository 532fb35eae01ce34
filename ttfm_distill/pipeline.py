"""``TTFMPipeline``: a distilled two-time student as a diffusers pipeline.

An export folder is a diffusers pipeline folder (docs/pipeline.md)::

    model_index.json      _class_name TTFMPipeline and its components
    flow_map/             the two-time student (TwoTimeFlowMap or MlpFlowMap .save_pretrained)
    scheduler/            FlowMapEulerDiscreteScheduler with the teacher's shift
    vae/                  latent students: the teacher's VAE
    text_encoder*/ tokenizer*/   text students: the teacher's text encoders

``TTFMPipeline.from_pretrained(folder)(num_inference_steps=2)`` samples in two
network evaluations; ``ttfm-distill sample`` is a thin shell over
:meth:`TTFMPipeline.__call__`.  Time conventions (diffusers' sigma against the
package's ``t``) are converted in :mod:`ttfm_distill.convention` only, through
:meth:`TwoTimeFlowMap.diffusers_flow_map`.
"""

from __future__ import annotations

import inspect
import json
import sys
import warnings
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, FlowMapEulerDiscreteScheduler, ImagePipelineOutput, ModelMixin  # noqa: F401

# ModelMixin and the student classes are imported here so that diffusers, resolving a standalone folder's component
# module to this one (see TTFMPipeline.from_pretrained), finds the component's class and its base class in it

from .mlp import MlpFlowMap  # noqa: F401 - a component class diffusers may look up in this module
from .student import COMPONENT, StudentConfig, StudentLoadError, TwoTimeFlowMap, load_student  # noqa: F401
from .teachers.pipeline import _encode_kwargs, _text_dict

TEXT_COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
OUTPUT_TYPES = ("pil", "np", "pt", "latent", "raw")


def _load_vae(folder: Path):
    """The VAE of an older student folder, every tensor present (a ``StudentLoadError`` in one line otherwise)."""
    from .errors import TTFMError
    from .teachers.pipeline import load_vae

    try:
        return load_vae(folder).vae
    except TTFMError as e:
        raise StudentLoadError(str(e)) from None
    except Exception as e:  # noqa: BLE001
        raise StudentLoadError(f"cannot load the VAE in {folder}: {str(e).splitlines()[0]}") from None


def _check_vae(folder: Path) -> None:
    """Refuse an export's ``vae/`` whose weights lack a tensor (or hold an unexpected one), in one line."""
    import diffusers

    from .errors import TTFMError
    from .teachers.pipeline import VAE_CLASSES, check_complete

    try:
        name = json.loads((folder / "config.json").read_text()).get("_class_name")
        if name in VAE_CLASSES:  # any other class: diffusers' own load reports it
            check_complete(getattr(diffusers, name), folder)
    except TTFMError as e:
        raise StudentLoadError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - an unreadable config or weights header
        raise StudentLoadError(f"cannot load the VAE in {folder}: {str(e).splitlines()[0]}") from None


class TTFMPipeline(DiffusionPipeline):
    """Few-step sampling from a two-time flow map ``phi(x, s, t)`` distilled by ttfm-distill.

    Components: ``flow_map`` (the student), ``scheduler`` (a ``FlowMapEulerDiscreteScheduler``), and, where the
    teacher has them, ``vae`` and the text encoders and tokenizers of the teacher's pipeline.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->flow_map->vae"
    _optional_components = ["vae", *TEXT_COMPONENTS]

    def __init__(self, flow_map, scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                 tokenizer_2=None, text_encoder_3=None, tokenizer_3=None):
        super().__init__()
        self.register_modules(flow_map=flow_map, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                              text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
        self._prompt_helper = None

    # ------------------------------------------------------------ loading ----
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        folder = Path(pretrained_model_name_or_path)
        if folder.is_dir() and not (folder / "model_index.json").exists() and (folder / "ttfm_config.json").exists():
            raise StudentLoadError(f"{folder} has the older student layout (no model_index.json); convert it once with "
                                   "TTFMPipeline.from_student(folder).save_pretrained(new_folder)")
        index = folder / "model_index.json"
        spec = json.loads(index.read_text()).get(COMPONENT) if index.exists() else None
        if spec and spec[0] and (folder / COMPONENT / f"{spec[0]}.py").exists() and COMPONENT not in kwargs:
            # a standalone folder: read its student with this module's classes, not with the copy shipped in it
            sys.modules.setdefault(spec[0], sys.modules[cls.__module__])
            kwargs[COMPONENT] = load_student(folder / COMPONENT, torch_dtype=kwargs.get("dtype") or kwargs.get("torch_dtype"))
        if folder.is_dir() and (folder / "vae" / "config.json").exists() and "vae" not in kwargs:
            _check_vae(folder / "vae")  # diffusers would load a VAE lacking a tensor with a warning, random values there
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def load_config(cls, *args, **kwargs):
        """As diffusers', but a standalone folder's ``_class_name`` ``[module, class]`` names this class."""
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        if isinstance(config.get("_class_name"), list):
            config["_class_name"] = config["_class_name"][1]
        return out

    def save_pretrained(self, save_directory, standalone: bool = False, **kwargs):
        """diffusers' ``save_pretrained``; ``standalone``: also write the module files (loadable without ttfm-distill)."""
        super().save_pretrained(save_directory, **kwargs)
        if standalone:
            from .standalone import write_standalone

            write_standalone(save_directory)

    @classmethod
    def from_student(cls, student, vae=None, text_components: dict | None = None, device="cpu"):
        """A pipeline around a student (a model, or any student folder: older layouts and LoRA adapters too).

        Folders bring their ``vae/``; text students whose folder has no text encoders take them from the
        teacher's pipeline folder when it still exists locally.
        """
        if isinstance(student, (str, Path)):
            folder = Path(student)
            student = load_student(folder, device=device)
            if vae is None and (folder / "vae" / "config.json").exists():
                vae = _load_vae(folder / "vae")
        config = student.student_config()
        if text_components is None and config.conditioning == "text":
            text_components, pipeline_name = _teacher_text_components(config)
            if text_components and not config.teacher_pipeline:
                student.ttfm_config = config.replace(teacher_pipeline=pipeline_name)
        scheduler = flow_map_scheduler(config)
        return cls(flow_map=student, scheduler=scheduler, vae=vae, **(text_components or {}))

    @classmethod
    def from_lora(cls, teacher, lora_folder, **kwargs):
        """The teacher's pipeline folder (or hub id) with a LoRA student's adapters, read by diffusers' own
        ``load_lora_weights``, and the student's second-time embedding from ``lora_folder``."""
        import diffusers

        from .teachers.schedulers import network_io
        from .student import ADAPTERS, FORMAT, load_tensors

        lora_folder = Path(lora_folder)
        config = StudentConfig.load(lora_folder)
        weights = (config.lora or {}).get("diffusers_weights")
        if not weights:
            raise StudentLoadError(f"{lora_folder} holds no adapters in diffusers' format (its teacher's pipeline has "
                                   "no LoRA loader); use TTFMPipeline.from_student on the folder")
        base = diffusers.DiffusionPipeline.from_pretrained(teacher, **kwargs)
        base.load_lora_weights(str(lora_folder), weight_name=weights)
        network = getattr(base, config.backbone["subfolder"])
        adapter = ADAPTERS[config.backbone["class_name"]]
        null = lora_folder / "null_text.safetensors"
        student = TwoTimeFlowMap(network, second_time_input=config.second_time_input, adapter=adapter,
                                 io=network_io(adapter, network, config.scheduler_config),
                                 null_text=load_tensors(null) if null.exists() else None, guidance=config.guidance,
                                 config=config.replace(student_class="TwoTimeFlowMap", format=FORMAT))
        student.second_time.load_state_dict(load_tensors(lora_folder / "second_time.safetensors"), strict=True)
        if student.guidance_embed is not None:
            student.guidance_embed.load_state_dict(load_tensors(lora_folder / "guidance_embed.safetensors"), strict=True)
        student.to(network.device).eval()
        parts = {k: v for k, v in base.components.items() if k in ("vae", *TEXT_COMPONENTS)}
        return cls(flow_map=student, scheduler=flow_map_scheduler(config), **parts)

    @property
    def student_config(self) -> StudentConfig:
        return self.flow_map.student_config()

    # --------------------------------------------------------- conditioning --
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], device=None) -> dict:
        """Prompts -> the student's text inputs, through the teacher pipeline's own ``encode_prompt``."""
        config = self.student_config
        if self.text_encoder is None or not config.teacher_pipeline:
            raise ValueError("this student folder has no text encoders: export it from a pipeline-folder teacher "
                             "(model_index.json with text_encoder/ and tokenizer/) to sample from prompts")
        if self._prompt_helper is None:
            import diffusers

            pipe_cls = getattr(diffusers, config.teacher_pipeline)
            names = [n for n in inspect.signature(pipe_cls.__init__).parameters if n != "self"]
            self._prompt_helper = pipe_cls(**{n: (getattr(self, n, None) if n in TEXT_COMPONENTS else None)
                                              for n in names})
        family = config.backbone["class_name"]
        out = self._prompt_helper.encode_prompt(list(prompts), **_encode_kwargs(family))
        cond = _text_dict(family, out)
        return {k: (v.float() if v.is_floating_point() else v).to(device or "cpu") for k, v in cond.items()}

    def prepare_conditioning(self, n_prompts: int, per_prompt: int, prompt, class_labels, guidance_scale,
                             negative_prompt, generator) -> dict | None:
        """The batch-first ``cond`` of ``n_prompts * per_prompt`` samples; random class labels come from ``generator``."""
        config = self.student_config
        total = n_prompts * per_prompt
        kind = config.conditioning or "unconditional"
        cond = {}
        if prompt is not None:
            if kind != "text":
                raise ValueError(f"prompt is only for text-conditioned students; this one is {kind}")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            rows = self.encode_prompt(prompts)
            cond.update({k: v.repeat_interleave(per_prompt, dim=0) for k, v in rows.items()})
        if negative_prompt is not None:
            trained = config.teacher.get("negative_prompt", "")
            if negative_prompt != trained:
                raise ValueError(f"this student has the negative prompt {trained!r} distilled in; "
                                 "negative_prompt cannot change it (leave it unset)")
        if kind == "class":
            n = config.num_classes
            if class_labels is None:
                cond["class_labels"] = torch.randint(0, n, (total,), generator=generator)
            else:
                labels = torch.as_tensor([class_labels] if isinstance(class_labels, int) else class_labels).long()
                if labels.numel() and not bool(((labels >= 0) & (labels < n)).all()):
                    raise ValueError(f"class_labels must be in [0, {n}), got {labels.tolist()}")
                if len(labels) == 1:
                    labels = labels.expand(n_prompts)
                if len(labels) != n_prompts:
                    raise ValueError(f"give one class label, or one per prompt ({n_prompts}); got {len(labels)}")
                cond["class_labels"] = labels.repeat_interleave(per_prompt)
        elif class_labels is not None:
            raise ValueError(f"class_labels are only for class-conditional students; this one is {kind}")
        spec = config.guidance
        if guidance_scale is not None:
            if spec is None:
                baked = config.teacher.get("guidance_scale", 1.0)
                raise ValueError(f"this student has guidance {baked} baked in and takes no guidance scale; "
                                 "distil with guidance_range=[lo,hi] for a choosable scale")
            lo, hi = spec["range"]
            if not lo <= guidance_scale <= hi:
                warnings.warn(f"guidance scale {guidance_scale} is outside the trained range [{lo}, {hi}]", stacklevel=3)
            cond["cfg_scale"] = torch.full((total,), float(guidance_scale))
        return cond or None

    # ------------------------------------------------------------- sampling --
    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, num_inference_steps: int = 2,
                 num_images_per_prompt: int = 1, generator: torch.Generator | None = None,
                 class_labels: int | list[int] | None = None, guidance_scale: float | None = None,
                 negative_prompt: str | None = None, output_type: str = "pil", batch_size: int = 256,
                 return_dict: bool = True):
        """Sample ``num_images_per_prompt`` images (per prompt) in ``num_inference_steps`` flow-map jumps.

        ``class_labels``: class-conditional students (default: random labels drawn from ``generator`` after the
        noise). ``guidance_scale``: students distilled with a guidance range. ``output_type``: ``pil``, ``np``,
        ``pt`` (images in [0, 1]), ``latent`` (the sampler's output) or ``raw`` (decoded, in [-1, 1]; points for
        2-D students).
        """
        if int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if int(num_images_per_prompt) < 1 or int(batch_size) < 1:
            raise ValueError("num_images_per_prompt and batch_size must be >= 1")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        config = self.student_config
        points = config.kind == "points"
        if points and output_type == "pil":
            raise ValueError("this student makes 2-D points, not images: use output_type 'pt', 'np' or 'raw'")
        n_prompts = 1 if prompt is None or isinstance(prompt, str) else len(prompt)
        total = n_prompts * int(num_images_per_prompt)
        device = self._execution_device
        dtype = self.flow_map.dtype
        shape = (total, *config.data_shape)
        noise_device = generator.device if generator is not None else torch.device("cpu")
        x0 = float(config.sigma0) * torch.randn(shape, generator=generator, device=noise_device, dtype=torch.float32)
        cond = self.prepare_conditioning(n_prompts, int(num_images_per_prompt), prompt, class_labels, guidance_scale,
                                         negative_prompt, generator)
        train_steps = self.scheduler.config.num_train_timesteps
        starts = range(0, total, int(batch_size))
        out = []
        with self.progress_bar(total=len(starts) * int(num_inference_steps)) as bar:
            for i in starts:
                x = x0[i:i + batch_size].to(device)
                c = {k: (v[i:i + batch_size].to(device, dtype) if v.is_floating_point() and k != "cfg_scale"
                         else v[i:i + batch_size].to(device)) for k, v in cond.items()} if cond else None
                self.scheduler.set_timesteps(int(num_inference_steps), device=device,
                                             sigmas=self.grid_sigmas(int(num_inference_steps)))
                timesteps = self.scheduler.timesteps
                for k, ts in enumerate(timesteps):
                    r = timesteps[k + 1] if k + 1 < len(timesteps) else torch.zeros_like(ts)
                    u = self.flow_map.diffusers_flow_map(x.to(dtype), ts, r, c, num_train_timesteps=train_steps)
                    x = self.scheduler.step(u.float(), ts, x, r_timestep=r).prev_sample
                    bar.update()
                out.append(x)
        latents = torch.cat(out)
        if output_type == "latent":
            images = latents
        else:
            images = self.decode(latents, batch_size)
            if output_type != "raw" and not points:
                from diffusers.image_processor import VaeImageProcessor

                images = VaeImageProcessor(do_normalize=True).postprocess(images, output_type=output_type)
            elif output_type == "np":
                images = images.cpu().numpy()
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def grid_sigmas(self, steps: int) -> list | None:
        """The scheduler's sigmas for a ``time_grid="timesteps"`` student (``None``: its own uniform grid).

        The grid is the student's network reading's (convention.DiffusionIO.timestep_grid), the same as ``eval``'s.
        """
        io = self.flow_map.io
        if self.student_config.time_grid != "timesteps" or io is None or not io.discrete_timesteps:
            return None
        from .convention import sigma_from_t

        return sigma_from_t(io.timestep_grid(steps)[:-1]).tolist()

    def decode(self, latents: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Images in [-1, 1] from the sampler's output (the VAE of latent students; the samples themselves otherwise)."""
        if self.vae is None:
            return latents.float()
        cfg = self.vae.config
        scale = float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
        shift = float(getattr(cfg, "shift_factor", 0.0) or 0.0)
        chunks = []
        for z in latents.split(batch_size):
            z = z.to(self.vae.device, self.vae.dtype) / scale + shift
            chunks.append(self.vae.decode(z, return_dict=False)[0].float().clamp(-1, 1))
        return torch.cat(chunks)


def flow_map_scheduler(config: StudentConfig) -> FlowMapEulerDiscreteScheduler:
    """diffusers' flow-map scheduler on the teacher's grid: its shift at the student's data shape."""
    return FlowMapEulerDiscreteScheduler(num_train_timesteps=1000, shift=float(config.shift))


def _teacher_text_components(config: StudentConfig) -> tuple[dict | None, str | None]:
    """The text encoders and tokenizers of the teacher's pipeline folder (if it still exists locally) and its class."""
    source = Path(str(config.teacher.get("source", ""))).expanduser()
    if not (source / "model_index.json").exists():
        return None, None
    import diffusers

    skip = {name: None for name in ("transformer", "unet", "vae")}
    try:
        teacher = diffusers.DiffusionPipeline.from_pretrained(source, **skip)
    except Exception:  # noqa: BLE001 - without encoders the student samples the empty prompt
        return None, None
    return ({k: v for k, v in teacher.components.items() if k in TEXT_COMPONENTS and v is not None},
            type(teacher).__name__)

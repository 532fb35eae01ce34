"""The export is a diffusers pipeline: TTFMPipeline loads it, samples like `ttfm-distill sample`, and round-trips."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tiny_models import build

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def _one_thread_like_the_subprocesses():
    """The CLI subprocesses run on one thread (ENV); the in-process side must too, or a convolution's summation
    order (and so the last bit of a sample) differs and the byte-for-byte comparisons fail."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli_sample(folder, tmp_path, *args):
    raw = tmp_path / "cli.npy"
    r = subprocess.run([sys.executable, "-m", "ttfm_distill", "sample", "--model", str(folder), "--output",
                        str(tmp_path / "cli.png"), "--save-raw", str(raw), *map(str, args)],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    return torch.from_numpy(np.load(raw))


def trained_like(student, seed=1):
    """Move the second-time (and guidance) embedding off zero so the second time matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.startswith(("second_time.", "guidance_embed.")):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return student


@pytest.fixture(scope="module")
def unet_export(tiny_teacher_dir, tmp_path_factory):
    from ttfm_distill.config import RunConfig
    from ttfm_distill.export import export_student, run_record
    from ttfm_distill.objectives import make_objective
    from ttfm_distill.teachers.loading import load_teacher
    from ttfm_distill.factory import build_student

    teacher = load_teacher(str(tiny_teacher_dir))
    cfg = RunConfig(teacher=str(tiny_teacher_dir))
    student = trained_like(build_student(teacher, cfg))
    folder = tmp_path_factory.mktemp("unet") / "student"
    export_student(student, folder, run_record(cfg, teacher, make_objective(cfg.loss)), teacher=teacher)
    return folder, student.eval()


def test_export_is_a_diffusers_pipeline_folder(unet_export):
    from diffusers import FlowMapEulerDiscreteScheduler

    folder, _ = unet_export
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "TTFMPipeline"
    assert index["flow_map"] == ["ttfm_distill.student", "TwoTimeFlowMap"]
    assert index["scheduler"] == ["diffusers", "FlowMapEulerDiscreteScheduler"]
    assert index["vae"] == [None, None]  # a pixel-space teacher has no VAE
    sched = FlowMapEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    assert sched.config.shift == 1.0
    config = json.loads((folder / "flow_map" / "ttfm_config.json").read_text())
    assert config["format_version"] == 2 and config["student_class"] == "TwoTimeFlowMap"
    assert config["teacher"]["class_name"] == "UNet2DModel" and config["loss"]["name"] == "itvm"


def test_pipeline_samples_equal_the_cli_and_our_sampler(unet_export, tmp_path):
    from ttfm_distill.objectives.base import flow_map
    from ttfm_distill.pipeline import TTFMPipeline
    from ttfm_distill.sampling import sample_flow_map, uniform_time_grid

    folder, student = unet_export
    pipe = TTFMPipeline.from_pretrained(folder)
    out = pipe(num_inference_steps=2, num_images_per_prompt=3, generator=torch.Generator().manual_seed(7),
               output_type="raw").images
    assert out.shape == (3, 1, 8, 8)
    assert torch.equal(out, cli_sample(folder, tmp_path, "--steps", 2, "--num", 3, "--seed", 7))
    # the package's own sampler (float32 uniform grid) on the same noise, through the in-memory student
    x0 = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(7))
    ours = sample_flow_map(lambda x, s, t: flow_map(student, x, s, t), x0, uniform_time_grid(2))
    torch.testing.assert_close(out, ours, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, pipe(num_inference_steps=3, num_images_per_prompt=3,
                                        generator=torch.Generator().manual_seed(7), output_type="raw").images)
    # diffusers' output types: PIL images, numpy and tensors in [0, 1]
    pil = pipe(num_inference_steps=2, generator=torch.Generator().manual_seed(7)).images
    assert len(pil) == 1 and pil[0].size == (8, 8)
    arr = pipe(num_inference_steps=2, generator=torch.Generator().manual_seed(7), output_type="np").images
    pt = pipe(num_inference_steps=2, generator=torch.Generator().manual_seed(7), output_type="pt").images
    assert arr.shape == (1, 8, 8, 1) and pt.shape == (1, 1, 8, 8) and 0 <= pt.min() and pt.max() <= 1
    torch.testing.assert_close(pt, (out[:1] / 2 + 0.5).clamp(0, 1))


def test_round_trip_export_load_save_load_is_identical(unet_export, tmp_path):
    from ttfm_distill import TTFMPipeline  # the top-level name

    folder, _ = unet_export
    a = TTFMPipeline.from_pretrained(folder)
    a.save_pretrained(tmp_path / "again")
    b = TTFMPipeline.from_pretrained(tmp_path / "again")
    kw = dict(num_inference_steps=2, num_images_per_prompt=2, output_type="raw")
    x, y = (p(generator=torch.Generator().manual_seed(3), **kw).images for p in (a, b))
    assert torch.equal(x, y)
    sa, sb = a.flow_map.state_dict(), b.flow_map.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert b.student_config.teacher == a.student_config.teacher


def test_older_layout_loads_and_the_pipeline_says_how_to_convert(unet_export, tmp_path):
    """Format-1 exports (ttfm_config.json at the top): load_student reads them; from_pretrained says what to do."""
    from ttfm_distill.export import load_student
    from ttfm_distill.pipeline import TTFMPipeline
    from ttfm_distill.student import StudentLoadError

    folder, _ = unet_export
    old = tmp_path / "old"
    student, _ = load_student(folder)
    student.save_pretrained(old)
    config = json.loads((old / "ttfm_config.json").read_text())
    del config["student_class"]
    config["format_version"] = 1
    (old / "ttfm_config.json").write_text(json.dumps(config))
    reloaded, cfg = load_student(old)
    assert cfg.student_class == "TwoTimeFlowMap"
    with pytest.raises(StudentLoadError, match=r"older student layout.*from_student") as e:
        TTFMPipeline.from_pretrained(old)
    assert "\n" not in str(e.value) and len(str(e.value)) < 250
    kw = dict(num_inference_steps=2, num_images_per_prompt=2, output_type="raw")
    converted = TTFMPipeline.from_student(old)
    converted.save_pretrained(tmp_path / "new")
    x = TTFMPipeline.from_pretrained(folder)(generator=torch.Generator().manual_seed(0), **kw).images
    y = TTFMPipeline.from_pretrained(tmp_path / "new")(generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(x, y)
    assert torch.equal(x, cli_sample(old, tmp_path, "--steps", 2, "--num", 2, "--seed", 0))  # the CLI reads it too


@pytest.fixture(scope="module")
def dit_export(tmp_path_factory):
    """A class-conditional diffusion teacher (DiT), distilled with a guidance range."""
    from ttfm_distill.config import RunConfig
    from ttfm_distill.export import export_student, run_record
    from ttfm_distill.objectives import make_objective
    from ttfm_distill.teachers.loading import load_teacher
    from ttfm_distill.factory import build_student

    root = tmp_path_factory.mktemp("dit")
    build("DiTTransformer2DModel").save_pretrained(root / "teacher")
    cfg = RunConfig(teacher=str(root / "teacher"), guidance_range=[1.0, 5.0])
    teacher = load_teacher(cfg.teacher, guidance_scale=cfg.default_guidance(), guided=True)
    student = trained_like(build_student(teacher, cfg))
    export_student(student, root / "student", run_record(cfg, teacher, make_objective(cfg.loss)), teacher=teacher)
    return root / "student"


def test_class_labels_and_guidance_scale(dit_export, tmp_path):
    from ttfm_distill.pipeline import TTFMPipeline

    pipe = TTFMPipeline.from_pretrained(dit_export)
    kw = dict(num_inference_steps=2, num_images_per_prompt=2, output_type="latent")

    def run(**extra):
        return pipe(generator=torch.Generator().manual_seed(1), **kw, **extra).images

    a, b = run(class_labels=3), run(class_labels=4)
    assert a.shape == (2, 4, 8, 8) and not torch.allclose(a, b)
    assert torch.equal(a, run(class_labels=[3]))
    assert not torch.allclose(run(class_labels=3, guidance_scale=1.5), run(class_labels=3, guidance_scale=4.5))
    assert torch.equal(run(class_labels=3), run(class_labels=3, guidance_scale=3.0))  # the default scale
    cli = cli_sample(dit_export, tmp_path, "--steps", 2, "--num", 2, "--seed", 1, "--class-label", 3,
                     "--guidance-scale", 2.5)
    assert torch.equal(cli, pipe(generator=torch.Generator().manual_seed(1), num_inference_steps=2,
                                 num_images_per_prompt=2, class_labels=3, guidance_scale=2.5, output_type="raw").images)
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 10\)"):
        run(class_labels=10)
    with pytest.warns(UserWarning, match="outside the trained range"):
        run(class_labels=1, guidance_scale=9.0)
    r = subprocess.run([sys.executable, "-m", "ttfm_distill", "sample", "--model", str(dit_export), "--num", "1",
                        "--guidance-scale", "9", "--output", str(tmp_path / "w.png")], capture_output=True, text=True,
                       env=ENV)
    assert r.returncode == 0 and r.stderr.startswith("warning: guidance scale 9.0 is outside the trained range")
    with pytest.raises(ValueError, match="prompt is only for text-conditioned"):
        run(prompt="a cat")


def test_bad_sampling_arguments_are_one_line_errors(unet_export, tmp_path):
    from ttfm_distill.pipeline import TTFMPipeline

    folder, _ = unet_export
    pipe = TTFMPipeline.from_pretrained(folder)
    for kwargs, match in (({"num_inference_steps": 0}, "num_inference_steps"),
                          ({"class_labels": 1}, "only for class-conditional"),
                          ({"guidance_scale": 2.0}, "baked in"),
                          ({"output_type": "jpg"}, "output_type")):
        with pytest.raises(ValueError, match=match):
            pipe(**kwargs)
    r = subprocess.run([sys.executable, "-m", "ttfm_distill", "sample", "--model", str(folder), "--guidance-scale", "2",
                        "--output", str(tmp_path / "x.png")], capture_output=True, text=True, env=ENV)
    assert r.returncode == 2 and "baked in" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_mlp_student_pipeline_gives_points(tmp_path):
    from ttfm_distill.export import export_student
    from ttfm_distill.mlp import MlpFlowMap
    from ttfm_distill.objectives.base import flow_map
    from ttfm_distill.pipeline import TTFMPipeline
    from ttfm_distill.sampling import sample_flow_map, uniform_time_grid
    from ttfm_distill.student import StudentConfig

    torch.manual_seed(0)
    m = MlpFlowMap(dim=2, width=16, depth=2)
    export_student(m, tmp_path / "m", StudentConfig(data_shape=[2], kind="points"))
    pipe = TTFMPipeline.from_pretrained(tmp_path / "m")
    pts = pipe(num_inference_steps=4, num_images_per_prompt=5, generator=torch.Generator().manual_seed(2),
               output_type="pt").images
    x0 = torch.randn((5, 2), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = sample_flow_map(lambda x, s, t: flow_map(m, x, s, t), x0, uniform_time_grid(4))
    torch.testing.assert_close(pts, ours, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="2-D points"):
        pipe(num_inference_steps=1)


@pytest.fixture(scope="module")
def sd3_export(tmp_path_factory):
    """A tiny text-to-image teacher (SD3 pipeline folder: VAE, two CLIPs, T5) and its exported student."""
    pytest.importorskip("transformers")
    from tiny_models import tiny_sd3_pipeline

    from ttfm_distill.config import RunConfig
    from ttfm_distill.export import export_student, run_record
    from ttfm_distill.objectives import make_objective
    from ttfm_distill.teachers.loading import load_teacher
    from ttfm_distill.factory import build_student

    root = tmp_path_factory.mktemp("sd3")
    teacher_dir = tiny_sd3_pipeline(root / "teacher")
    cfg = RunConfig(teacher=str(teacher_dir))
    teacher = load_teacher(cfg.teacher)
    student = trained_like(build_student(teacher, cfg))
    export_student(student, root / "student", run_record(cfg, teacher, make_objective(cfg.loss)), teacher=teacher)
    return root / "student", teacher


def test_text_student_pipeline_carries_the_teachers_encoders(sd3_export, tmp_path):
    from ttfm_distill.pipeline import TTFMPipeline

    folder, teacher = sd3_export
    index = json.loads((folder / "model_index.json").read_text())
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"):
        assert index[name][0] is not None and (folder / name).is_dir(), name
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["shift"] == 3.0
    pipe = TTFMPipeline.from_pretrained(folder)
    prompt = "a big red house"
    cond = pipe.encode_prompt([prompt])
    expected = teacher.encode_prompts([prompt])
    assert cond.keys() == expected.keys()
    for k in cond:  # the same encoders through the teacher pipeline's own encode_prompt
        torch.testing.assert_close(cond[k], expected[k], atol=1e-5, rtol=1e-5)

    def run(**kw):
        return pipe(num_inference_steps=2, num_images_per_prompt=2, generator=torch.Generator().manual_seed(4),
                    output_type="raw", **kw).images

    images = run(prompt=prompt)
    assert images.shape == (2, 3, 16, 16) and images.min() >= -1 and images.max() <= 1  # decoded by the VAE
    cli = cli_sample(folder, tmp_path, "--steps", 2, "--num", 2, "--seed", 4, "--prompt", prompt)
    assert torch.equal(images, cli)
    assert not torch.allclose(images, run(prompt="a small blue tree"), atol=1e-4)
    torch.testing.assert_close(run(), run(prompt=""))  # no prompt: the teacher's own empty prompt
    assert run(prompt=["a cat", "a dog"]).shape == (4, 3, 16, 16)
    pil = pipe(prompt=prompt, num_inference_steps=1, generator=torch.Generator().manual_seed(0)).images
    assert pil[0].size == (16, 16) and pil[0].mode == "RGB"
    with pytest.raises(ValueError, match="negative prompt"):
        run(prompt=prompt, negative_prompt="blurry")


STANDALONE = """
import sys
sys.modules["ttfm_distill"] = None  # whatever is installed, ttfm-distill cannot be imported here
try:
    import ttfm_distill  # noqa: F401
    raise SystemExit("ttfm_distill is importable")
except ImportError:
    pass
import numpy as np
import torch
from diffusers import DiffusionPipeline

folder, out = sys.argv[1], sys.argv[2]
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
kwargs = {"prompt": sys.argv[3]} if len(sys.argv) > 3 else {}
x = pipe(num_inference_steps=2, num_images_per_prompt=2, generator=torch.Generator().manual_seed(0),
         output_type="raw", **kwargs).images
np.save(out, x.numpy())
print(type(pipe).__name__, type(pipe.flow_map).__module__)
"""


def standalone_sample(folder, tmp_path, *args):
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    r = subprocess.run([sys.executable, "-c", STANDALONE, str(folder), str(tmp_path / "x.npy"), *args],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    name, module = r.stdout.split()[-2:]
    assert name == "TTFMPipeline" and "ttfm_flow_map" in module  # the module file shipped in the folder
    return torch.from_numpy(np.load(tmp_path / "x.npy"))


@pytest.mark.parametrize("which", ["dit", "sd3"])
def test_standalone_folder_loads_where_ttfm_distill_cannot_be_imported(which, request, tmp_path):
    """The folder's own module files: diffusers alone (trust_remote_code) samples what TTFMPipeline samples."""
    from ttfm_distill.pipeline import TTFMPipeline

    if which == "dit":
        folder, args = request.getfixturevalue("dit_export"), ()
    else:
        folder, args = request.getfixturevalue("sd3_export")[0], ("a big red house",)
    pipe = TTFMPipeline.from_pretrained(folder)
    pipe.save_pretrained(tmp_path / "standalone", standalone=True)
    index = json.loads((tmp_path / "standalone" / "model_index.json").read_text())
    assert index["_class_name"] == ["ttfm_pipeline", "TTFMPipeline"] and index["flow_map"][0] == "ttfm_flow_map"
    kw = dict(num_inference_steps=2, num_images_per_prompt=2, output_type="raw")
    if args:
        kw["prompt"] = args[0]
    expected = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(standalone_sample(tmp_path / "standalone", tmp_path, *args), expected)
    # with ttfm-distill installed, TTFMPipeline reads the standalone folder with its own classes
    again = TTFMPipeline.from_pretrained(tmp_path / "standalone")
    assert type(again.flow_map).__module__ == "ttfm_distill.student"
    assert torch.equal(again(generator=torch.Generator().manual_seed(0), **kw).images, expected)


def test_run_export_has_a_hub_model_card(tiny_teacher_dir, tmp_path):
    import shutil

    from helpers import tiny_cfg

    from ttfm_distill.trainer import run_distillation

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    (teacher / "README.md").write_text("---\nlicense: mit\ntags:\n- x\n---\n# a teacher\n")
    run_distillation(tiny_cfg(teacher, tmp_path / "run", max_steps=2, seed=5), show_progress=False)
    folder = tmp_path / "run" / "student"
    card = (folder / "README.md").read_text()
    header = card.split("---")[1]
    for line in ("library_name: diffusers", "pipeline_tag: unconditional-image-generation",
                 "- ttfm-distill", "- flow-map", "license: mit"):
        assert line in header.splitlines(), line
    assert "base_model" not in header and f"`{teacher}`" in card  # a local teacher: named in the text only
    fme = json.loads((tmp_path / "run" / "metrics.json").read_text())["flow_map_error"]
    for n in ("1", "2", "4"):  # the run's own readings, student against teacher at equal NFE
        assert f"| {n} | {fme['student'][n]:.4f} | {fme['teacher_euler'][n]:.4f} |" in card
    assert "![samples](samples.png)" in card and (folder / "samples.png").exists()
    command = next(line for line in card.splitlines() if line.startswith("ttfm-distill run"))
    assert command.startswith(f"ttfm-distill run --teacher {teacher} --max-steps 2 ")  # the settings that differ
    assert " --seed 5 " in command and " --set batch_size=8 " in command and "output" not in command
    assert 'TTFMPipeline.from_pretrained("PATH_OR_HUB_ID")' in card and "hf upload" in card


def test_card_for_builtin_text_and_guidance_students():
    from ttfm_distill.pipeline_card import card_text, run_command
    from ttfm_distill.student import StudentConfig

    text = card_text(StudentConfig(teacher={"source": "org/model", "conditioning": "text", "class_name": "SD3"},
                                   guidance_input={"range": [1, 5], "default": 3}))
    assert "base_model: org/model" in text.split("---")[1].splitlines()
    assert "pipeline_tag: text-to-image" in text and 'prompt="a photo of a cat"' in text
    assert "guidance_scale=3" in text and "license:" not in text  # unknown licence: not guessed
    assert "license: apache-2.0" in card_text(StudentConfig(teacher={"source": "builtin:fashion16"}))
    assert "pipeline_tag" not in card_text(StudentConfig(kind="points", teacher={"source": "builtin:ring"}))
    assert run_command({"teacher": "builtin:fashion16", "max_steps": 50, "lr": 0.5}) == \
        "ttfm-distill run --max-steps 50 --set lr=0.5"
    assert run_command({"teacher": "my dir", "guidance_range": [1, 5]}) == \
        "ttfm-distill run --teacher 'my dir' --set 'guidance_range=[1,5]'"  # quoted for the shell


def test_lora_adapters_in_diffusers_format_sample_like_the_merged_export(sd3_export, tmp_path):
    """Adapters read by the teacher pipeline's own load_lora_weights + the second time == the merged student."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusion3Pipeline
    from safetensors import safe_open

    from ttfm_distill.config import RunConfig
    from ttfm_distill.export import export_student, run_record
    from ttfm_distill.lora import build_lora_student
    from ttfm_distill.objectives import make_objective
    from ttfm_distill.pipeline import TTFMPipeline
    from ttfm_distill.teachers.loading import load_teacher

    source = sd3_export[1].source
    cfg = RunConfig(teacher=source, lora_rank=4, lora_alpha=8)
    student, teacher = build_lora_student(load_teacher(source), cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if p.requires_grad:  # every adapter and the second-time embedding off zero
                p.normal_(0, 0.05, generator=g)
    record = run_record(cfg, teacher, make_objective(cfg.loss))
    export_student(student, tmp_path / "merged", record, teacher=teacher, lora_export="merged")
    export_student(student, tmp_path / "lora", record, teacher=teacher, lora_export="adapters")
    with safe_open(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)  # diffusers' key prefixes
    # diffusers alone reads the adapters onto the teacher's own pipeline class
    plain = StableDiffusion3Pipeline.from_pretrained(source)
    plain.load_lora_weights(str(tmp_path / "lora"), weight_name="pytorch_lora_weights.safetensors")
    import re

    strip = lambda k: re.sub(r"\.(lora_[AB])\.[^.]+\.", r".\1.", k)  # noqa: E731 - drop the adapter's name
    ours = {strip(k): v for k, v in student.network.state_dict().items() if ".lora_" in k}
    theirs = {strip(k): v for k, v in plain.transformer.state_dict().items() if ".lora_" in k}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    merged = TTFMPipeline.from_pretrained(tmp_path / "merged")
    adapted = TTFMPipeline.from_lora(source, tmp_path / "lora")
    kw = dict(prompt="a red house", num_inference_steps=2, num_images_per_prompt=2, output_type="raw")
    a = merged(generator=torch.Generator().manual_seed(5), **kw).images
    b = adapted(generator=torch.Generator().manual_seed(5), **kw).images
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unmerged LoRA adapters"):  # not silently saved as a broken full student
        adapted.save_pretrained(tmp_path / "refused")
    base = TTFMPipeline.from_pretrained(sd3_export[0])  # a different student: the adapters do act
    assert not torch.allclose(a, base(generator=torch.Generator().manual_seed(5), **kw).images, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_pipeline_samples_close_to_float32(unet_export, dtype):
    from ttfm_distill.pipeline import TTFMPipeline

    folder, _ = unet_export
    kw = dict(num_inference_steps=2, num_images_per_prompt=4, output_type="raw")
    full = TTFMPipeline.from_pretrained(folder)(generator=torch.Generator().manual_seed(0), **kw).images
    for pipe in (TTFMPipeline.from_pretrained(folder, dtype=dtype), TTFMPipeline.from_pretrained(folder).to(dtype)):
        assert pipe.flow_map.dtype == dtype
        half = pipe(generator=torch.Generator().manual_seed(0), **kw).images
        assert half.dtype == torch.float32 and torch.isfinite(half).all()
        assert 0 < (half - full).abs().max() < 0.1 * full.abs().max()  # rounded, not a different sample


@pytest.mark.parametrize("key", sorted(__import__("tiny_models").TINY_CONFIGS))
def test_every_family_exports_a_pipeline_that_samples_like_our_sampler(key, tmp_path):
    from helpers import cond_for, save_family
    from tiny_models import SAMPLE_SIZE

    from ttfm_distill.config import RunConfig
    from ttfm_distill.export import export_student, run_record
    from ttfm_distill.objectives import make_objective
    from ttfm_distill.objectives.base import flow_map
    from ttfm_distill.pipeline import TTFMPipeline
    from ttfm_distill.sampling import sample_flow_map, uniform_time_grid
    from ttfm_distill.teachers.loading import load_teacher
    from ttfm_distill.factory import build_student

    save_family(key, tmp_path / "teacher")
    cfg = RunConfig(teacher=str(tmp_path / "teacher"), sample_size=SAMPLE_SIZE.get(key))
    teacher = load_teacher(cfg.teacher, sample_size=cfg.sample_size)
    student = trained_like(build_student(teacher, cfg)).eval()
    export_student(student, tmp_path / "student", run_record(cfg, teacher, make_objective(cfg.loss)), teacher=teacher)
    pipe = TTFMPipeline.from_pretrained(tmp_path / "student")
    labels = (cond_for(teacher, 1) or {}).get("class_labels")  # class-conditional families: one class
    kw = dict(num_inference_steps=3, num_images_per_prompt=2, output_type="latent",
              class_labels=None if labels is None else int(labels[0]))
    x = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    n = 2
    x0 = torch.randn((n, *teacher.data_shape), generator=torch.Generator().manual_seed(0))
    cond = None if labels is None else {"class_labels": labels.expand(n)}
    with torch.no_grad():
        ours = sample_flow_map(lambda y, s, t: flow_map(student, y, s, t, cond), x0, uniform_time_grid(3, teacher.shift))
    assert x.shape == ours.shape == (n, *teacher.data_shape)
    torch.testing.assert_close(x, ours, atol=1e-4, rtol=1e-4)
    pipe.save_pretrained(tmp_path / "again")  # and the round trip is exact
    y = TTFMPipeline.from_pretrained(tmp_path / "again")(generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(x, y)


def test_run_with_standalone_writes_a_folder_diffusers_loads_alone(tiny_teacher_dir, tmp_path):
    from helpers import TINY, cli

    out = tmp_path / "run"
    r = cli("run", "--teacher", tiny_teacher_dir, "--output", out, "--max-steps", 2, "--set", "standalone=true", *TINY)
    assert r.returncode == 0, r.stderr
    index = json.loads((out / "student" / "model_index.json").read_text())
    assert index["_class_name"] == ["ttfm_pipeline", "TTFMPipeline"]
    from ttfm_distill.pipeline import TTFMPipeline

    pipe = TTFMPipeline.from_pretrained(out / "student")
    expected = pipe(num_inference_steps=2, num_images_per_prompt=2, output_type="raw",
                    generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(standalone_sample(out / "student", tmp_path), expected)


def test_model_card_command_leaves_out_what_the_run_filled_in(monkeypatch):
    """The card's command: the objective's own diagonal default and run state (a teacher fingerprint in an earlier
    version's config.json) are not settings."""
    from ttfm_distill import machine
    from ttfm_distill.config import RunConfig
    from ttfm_distill.pipeline_card import run_command
    from ttfm_distill.preflight import resolve_settings

    monkeypatch.setattr(machine, "native_bf16", lambda device_type=None: True)  # a machine where flow runs are bf16

    cfg, _ = resolve_settings(RunConfig(loss="lsd", max_steps=300))
    assert run_command({**cfg.to_dict(), "teacher_fingerprint": "0123456789abcdef", "fitted_steps": None}) == \
        "ttfm-distill run --loss lsd --max-steps 300"
    cfg.diagonal_fraction = 0.5
    assert run_command(cfg.to_dict()) == "ttfm-distill run --loss lsd --max-steps 300 --set diagonal_fraction=0.5"
    # the automatic trajectory rows and pool solver are left out where automatic, kept where set otherwise
    cfg, _ = resolve_settings(RunConfig(trajectory_fraction=0.125))
    assert run_command(cfg.to_dict()) == "ttfm-distill run --set trajectory_fraction=0.125"
    cfg, _ = resolve_settings(RunConfig(teacher="builtin:checkerboard"))
    assert run_command(cfg.to_dict()) == "ttfm-distill run --teacher builtin:checkerboard"
    cfg, _ = resolve_settings(RunConfig(pool_solver="heun"))
    assert run_command(cfg.to_dict()) == "ttfm-distill run --set pool_solver=heun"
    # an epsilon teacher's automatic values (no rows, an Euler pool, no long jumps, lr 2e-4 with a cosine to 0, fp32):
    # nothing to spell out; read as a flow teacher's run on a bf16 machine, only the precision differs
    cfg = RunConfig(teacher="some/ddpm").resolve_automatic("epsilon", bf16_native=machine.native_bf16())
    assert (cfg.trajectory_fraction, cfg.pool_solver) == (0.0, "euler")
    assert run_command(cfg.to_dict(), "epsilon") == "ttfm-distill run --teacher some/ddpm"
    assert run_command(cfg.to_dict()) == "ttfm-distill run --teacher some/ddpm --set mixed_precision=no"
    # a flow run of an earlier version (its rows, long jumps, lr, cosine end and EMA offset filled in): each spelled out
    old = {**cfg.to_dict(), "loss_options": {"long_jump_span": 0.5}, "lr": 4e-4, "lr_final_fraction": 0.25,
           "ema_warmup_offset": 20.0, "trajectory_fraction": 0.125, "pool_solver": "heun", "mixed_precision": "bf16",
           "pool_precision": "bf16"}
    assert run_command(old) == "ttfm-distill run --teacher some/ddpm -L long_jump_span=0.5 --set lr=0.0004" \
        " --set lr_final_fraction=0.25 --set ema_warmup_offset=20.0 --set trajectory_fraction=0.125"


def test_a_reloaded_student_reads_its_network_as_the_teacher_does_clip_included(tmp_path):
    """A diffusion teacher with clip_sample: the exported student reloads with the same clamp as its teacher."""
    from diffusers import DDPMScheduler

    from conftest import tiny_unet
    from ttfm_distill.config import RunConfig
    from ttfm_distill.export import export_student, load_student, run_record
    from ttfm_distill.objectives import make_objective
    from ttfm_distill.teachers.loading import load_teacher
    from ttfm_distill.factory import build_student

    torch.manual_seed(0)
    tiny_unet().save_pretrained(tmp_path / "t" / "unet")
    DDPMScheduler(clip_sample=True, clip_sample_range=1.5).save_pretrained(tmp_path / "t" / "scheduler")
    teacher = load_teacher(str(tmp_path / "t"))
    assert teacher.io.clip_sample == 1.5
    cfg = RunConfig(teacher=str(tmp_path / "t"))
    student = trained_like(build_student(teacher, cfg)).eval()
    export_student(student, tmp_path / "s", run_record(cfg, teacher, make_objective(cfg.loss)), teacher=teacher)
    again, _ = load_student(tmp_path / "s")
    assert again.io.clip_sample == 1.5
    x = 3.0 * torch.randn(4, 1, 8, 8)  # far out, so the clamp acts
    s, t = torch.full((4,), 0.2), torch.full((4,), 0.7)
    with torch.no_grad():
        assert torch.allclose(again(x, s, t), student(x, s, t), atol=1e-5)

"""A hostile battery through the real entry point, wider than the tests: every case runs in decoy folders.

    OMP_NUM_THREADS=1 python benchmarks/safety_battery.py --out benchmarks/results/safety-battery.json

Each case runs ``python -m ttfm_distill ...`` in a fresh temporary folder with ``HOME`` pointed at a decoy
home that holds a fake ``.ssh/id_rsa``; decoy "user" files are placed where a careless tool could delete
them.  A case passes when the exit code is the expected one, stderr's last line is one ``error:`` line of at
most 200 characters with no traceback, every decoy file is still there, byte for byte, and no refused run
left its output folder (or custom code a trace).  Nothing outside the temporary folders is touched.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = ["--set", "pool_size=32", "--set", "pool_steps=4", "--set", "eval_samples=12", "--set", "reference_steps=8",
        "--batch-size", "8", "-q"]


def make_teacher(root: Path) -> Path:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

    torch.manual_seed(0)
    net = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                      down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4)
    net.save_pretrained(root / "unet")
    FlowMatchEulerDiscreteScheduler().save_pretrained(root / "scheduler")
    return root


def decoys(root: Path) -> dict[Path, bytes]:
    files = {root / "home" / ".ssh" / "id_rsa": b"PRIVATE KEY", root / "home" / "notes.txt": b"mine",
             root / "work" / "thesis.tex": b"chapter 1", root / "work" / "sub" / "data.csv": b"1,2,3",
             root / "thesis" / "thesis.tex": b"chapter 2"}
    for p, b in files.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b)
    return files


def cases(teacher: Path, root: Path) -> list[tuple[str, list, Path, int]]:
    """``(name, argv, cwd, expected exit)``; a ``run`` of the tiny teacher unless the argv says otherwise."""
    home, work = root / "home", root / "work"
    run = ["run", "--teacher", str(teacher), "--max-steps", "2", *TINY]
    dry = ["run", "--teacher", str(teacher), "-q"]  # settings cases: no flag that would override the bad value
    cfg = root / "cfg"
    cfg.mkdir()
    (cfg / "lr.json").write_text('{"lr": "fast"}')
    (cfg / "list.json").write_text("[1, 2]")
    (cfg / "ten.toml").write_text('max_steps = "ten"')
    (cfg / "bin.json").write_bytes(b"\xff\xfe\x00binary")
    bad_index = root / "badindex"
    bad_index.mkdir()
    (bad_index / "config.json").write_text(json.dumps({"_class_name": ["UNet2DModel"]}))
    incomplete = damaged_teacher(teacher, root / "incomplete", drop="conv_out.weight")
    unexpected = damaged_teacher(teacher, root / "unexpected", add="extra.weight")
    custom = damaged_teacher(teacher, root / "custom")
    (custom / "model_index.json").write_text(json.dumps({"_class_name": ["evil_pipeline", "EvilPipeline"],
                                                         "unet": ["diffusers", "UNet2DModel"]}))
    (custom / "evil_pipeline.py").write_text(f"open({str(root / 'custom-code-ran')!r}, 'w').close()\n")
    return [
        ("overwrite home", [*run, "--output", str(home), "--overwrite"], work, 2),
        ("overwrite cwd", [*run, "--output", ".", "--overwrite"], work, 2),
        ("overwrite parent", [*run, "--output", "..", "--overwrite"], work / "sub", 2),
        ("overwrite root", [*run, "--output", "/", "--overwrite"], work, 2),
        ("overwrite user folder", [*run, "--output", str(root / "thesis"), "--overwrite"], work, 2),
        ("run into user folder", [*run, "--output", str(root / "thesis")], work, 2),
        ("lr inf", [*dry, "--lr", "inf", "--dry-run"], work, 2),
        ("lr 1e400", [*dry, "--set", "lr=1e400", "--dry-run"], work, 2),
        ("tau nan", [*dry, "-L", "tau=nan", "--dry-run"], work, 2),
        ("grad_clip nan", [*dry, "--set", "grad_clip=nan", "--dry-run"], work, 2),
        ("max_steps 2.5", [*dry, "--set", "max_steps=2.5", "--dry-run"], work, 2),
        ("max_steps string", [*dry, "--set", 'max_steps="10"', "--dry-run"], work, 2),
        ("batch_size abc", [*dry, "--set", "batch_size=abc", "--dry-run"], work, 2),
        ("batch_size 1.5", [*dry, "--set", "batch_size=1.5", "--dry-run"], work, 2),
        ("loss_options 5", [*dry, "--set", "loss_options=5", "--dry-run"], work, 2),
        ("loss_options 5 with -L", [*dry, "--set", "loss_options=5", "-L", "tau=0.1", "--dry-run"], work, 2),
        ("seed 1.5", [*dry, "--set", "seed=1.5", "--dry-run"], work, 2),
        ("json lr fast", [*dry, "--config", str(cfg / "lr.json"), "--dry-run"], work, 2),
        ("json list", [*dry, "--config", str(cfg / "list.json"), "--dry-run"], work, 2),
        ("toml ten", [*dry, "--config", str(cfg / "ten.toml"), "--dry-run"], work, 2),
        ("binary config", [*dry, "--config", str(cfg / "bin.json"), "--dry-run"], work, 2),
        ("class name a list", ["run", "--teacher", str(bad_index), "--dry-run"], work, 2),
        ("batch 1e9", [*run, "--batch-size", "1000000000", "--output", str(root / "r-big")], work, 2),
        ("unknown loss", [*dry, "--loss", "nope", "--dry-run"], work, 2),
        ("offline hub id", ["run", "--teacher", "some-org/some-model-with-a-long-name", "--output",
                            str(root / "r-hub")], work, 2),
        ("teacher lacks a tensor", ["run", "--teacher", str(incomplete), *run[3:], "--output", str(root / "r-inc")],
         work, 2),
        ("teacher extra tensor", ["run", "--teacher", str(unexpected), *run[3:], "--output", str(root / "r-unx")],
         work, 2),
        ("custom-code pipeline", ["run", "--teacher", str(custom), *run[3:], "--output", str(root / "r-custom")],
         work, 2),
        # this round's state: the distribution-matching term, its warm start, the run's watching
        ("dm_weight -1", [*dry, "--set", "dm_weight=-1", "--dry-run"], work, 2),
        ("dm_fake_time bad", [*dry, "--set", "dm_fake_time=sideways", "--dry-run"], work, 2),
        ("dm time range", [*dry, "--set", "dm_time_min=0.99", "--dry-run"], work, 2),
        ("dm with LoRA", [*dry, "--set", "dm_weight=0.3", "--set", "lora_rank=4", "--dry-run"], work, 2),
        ("gan without dm", [*dry, "--set", "dm_gan_weight=0.1", "--set", "dm_weight=0", "--dry-run"], work, 2),
        ("init_from missing", [*dry, "--set", f"init_from={root / 'no-such-run'}", "--dry-run"], work, 2),
        ("validate_every -1", [*dry, "--validate-every", "-1", "--dry-run"], work, 2),
        ("report_to unknown", [*dry, "--report-to", "nope", "--dry-run"], work, 2),
        ("student_output bad", [*dry, "--set", "student_output=sideways", "--dry-run"], work, 2),
        ("refused after the lock", ["run", "--teacher", "builtin:checkerboard", "--set", "trajectory_fraction=0.25",
                                    "--max-steps", "2", "-q", "--output", str(root / "r-new" / "deeper" / "run")],
         work, 2),
    ]


def must_not_exist(root: Path) -> list[Path]:
    """What no case may leave: the output folders of refused runs (and their new parents), custom code's trace."""
    return [root / "r-big", root / "r-hub", root / "r-inc", root / "r-unx", root / "r-custom", root / "r-new",
            root / "custom-code-ran"]


def damaged_teacher(teacher: Path, dst: Path, drop: str | None = None, add: str | None = None) -> Path:
    """A copy of ``teacher`` whose weights lack ``drop`` or hold the extra tensor ``add``."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(teacher, dst)
    f = dst / "unet" / "diffusion_pytorch_model.safetensors"
    w = {k: v.clone() for k, v in load_file(f).items()}
    if drop:
        del w[drop]
    if add:
        w[add] = torch.zeros(3)
    save_file(w, str(f))
    return dst


def one(argv, cwd, env) -> dict:
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "ttfm_distill", *argv], capture_output=True, text=True, cwd=cwd,
                       env=env, timeout=600)
    lines = r.stderr.strip().splitlines()
    return {"code": r.returncode, "last": lines[-1] if lines else "", "lines": len(lines),
            "traceback": "Traceback" in r.stderr, "seconds": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/safety-battery.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher = make_teacher(root / "teacher")
        files = decoys(root)
        env = {**os.environ, "HOME": str(root / "home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        for name, argv, cwd, code in cases(teacher, root):
            res = one(argv, cwd, env)
            intact = all(p.exists() and p.read_bytes() == b for p, b in files.items())
            left = [str(p.relative_to(root)) for p in must_not_exist(root) if p.exists()]
            ok = (res["code"] == code and not res["traceback"] and res["last"].startswith("error: ")
                  and len(res["last"]) <= 200 and intact and not left)
            rows.append({"case": name, "expected_exit": code, **res, "decoys_intact": intact, "left_behind": left,
                         "ok": ok})
            print(f"{'ok ' if ok else 'BAD'} {name:24s} exit {res['code']} ({len(res['last'])} chars) {res['last'][:110]}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": "OMP_NUM_THREADS=1 python benchmarks/safety_battery.py",
                                          "passed": sum(r["ok"] for r in rows), "cases": len(rows), "rows": rows},
                                         indent=2) + "\n")
    print(f"{sum(r['ok'] for r in rows)} of {len(rows)} cases as required; wrote {args.out}")


if __name__ == "__main__":
    main()

"""Train a second teacher unlike the embedded one: an epsilon-prediction DDPM UNet on Fashion-MNIST 16x16.

The recipe is the usual unconditional DDPM one (as diffusers' unconditional training example sets it up),
not this project's: a diffusers ``UNet2DModel``, a ``DDPMScheduler`` with 1000 steps, linear betas,
``prediction_type="epsilon"``, ``clip_sample=True``; the loss is the MSE between the network's output and
the noise at a uniformly drawn integer timestep; AdamW at lr 1e-4 with a linear warm-up and a cosine decay;
an EMA of the weights whose decay warms up as ``1 - (1 + step) ** -0.75`` (capped); random horizontal flips.
Data: Fashion-MNIST (Debian's ``dataset-fashion-mnist``) at 16x16 in [-1, 1], read by
``ttfm_distill.data.fashion_mnist``.

The output is a ``DDPMPipeline`` folder (``model_index.json``, ``unet/``, ``scheduler/``) holding the EMA
weights, which ``ttfm-distill run --teacher FOLDER`` reads.  Re-running the same command resumes from
``FOLDER/train_state.pt`` (model, EMA, optimiser, step, random state); ``--max-seconds`` stops early and
saves.  Settings and training seconds go to ``benchmarks/results/ddpm-teacher.json``.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/ddpm_teacher.py --output /work/ddpm-runs/teacher
    python benchmarks/ddpm_teacher.py --time-steps 20     # measure the seconds per step only

``--prediction-type v_prediction`` trains the same network on the v target instead (Salimans & Ho's
``v = alpha * noise - sigma * x``, what diffusers' ``DDPMScheduler(prediction_type="v_prediction")`` reads),
with the scheduler saved accordingly: the teacher zoo's v-prediction DDPM (benchmarks/zoo.py).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (32, 48, 48),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "norm_num_groups": 8,
}
#: the layout of diffusers' own ``examples/unconditional_image_generation/train_unconditional.py`` shrunk to a
#: 16x16 single-channel dataset: two ResNet layers per block, attention at the lowest resolution (in the down and
#: up path), diffusers' default 32 norm groups
SCRIPT_UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "layers_per_block": 2,
    "norm_num_groups": 32,
}
#: that script's optimiser and EMA defaults (AdamW betas, gradient clip, EMA cap) where they differ from ours
SCRIPT_OPTIM = {"betas": (0.95, 0.999), "grad_clip": 1.0, "ema_max": 0.9999}
LAYOUTS = {"project": UNET_CONFIG, "script": SCRIPT_UNET_CONFIG}
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                    "prediction_type": "epsilon", "clip_sample": True, "clip_sample_range": 1.0}
PREDICTION_TYPES = ("epsilon", "v_prediction")
RESULTS = Path(__file__).resolve().parent / "results" / "ddpm-teacher.json"


def ema_decay(step: int, cap: float) -> float:
    """EMA decay with a warm-up (power 3/4), capped at ``cap``."""
    return min(cap, 1.0 - (1.0 + step) ** -0.75) if step > 0 else 0.0


def lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="/work/ddpm-runs/teacher")
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="project",
                   help="project: blocks 32/48/48, no attention, 8 groups; script: diffusers' train_unconditional.py "
                        "layout at 16x16 (32/64/64, two layers a block, attention at 4x4, 32 groups) with its "
                        "AdamW betas (0.95, 0.999), gradient clip 1 and EMA cap 0.9999")
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES, default="epsilon",
                   help="epsilon: MSE to the noise; v_prediction: MSE to alpha * noise - sigma * x (the scheduler's "
                        "prediction_type is saved to match)")
    p.add_argument("--steps", type=int, default=10000, help="length of the learning-rate schedule")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--weight-decay", type=float, default=1e-6)
    p.add_argument("--ema-max", type=float, default=None, help="EMA cap (default 0.999; 0.9999 for --layout script)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=None, help="stop (and save) after this many seconds")
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--time-steps", type=int, default=0, help="only time this many steps and exit")
    p.add_argument("--results", default=None, help="default: results/ddpm-teacher.json, or ddpm-script-teacher.json "
                                                       "for --layout script; with --prediction-type v_prediction "
                                                       "ddpm-vpred-teacher.json (ddpm-script-vpred-teacher.json)")
    return p.parse_args()


def save_pipeline(ema, scheduler, folder: Path) -> None:
    from diffusers import DDPMPipeline

    DDPMPipeline(unet=ema, scheduler=scheduler).save_pretrained(folder, safe_serialization=True)


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    script = args.layout == "script"
    unet_config = LAYOUTS[args.layout]
    if args.ema_max is None:
        args.ema_max = SCRIPT_OPTIM["ema_max"] if script else 0.999
    vpred = args.prediction_type == "v_prediction"
    if args.results is None:
        name = f"ddpm{'-script' if script else ''}{'-vpred' if vpred else ''}-teacher.json"
        args.results = str(RESULTS.with_name(name))
    scheduler_config = {**SCHEDULER_CONFIG, "prediction_type": args.prediction_type}
    from diffusers import DDPMScheduler, UNet2DModel

    from ttfm_distill.data.fashion_mnist import load_fashion_mnist

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    images, _ = load_fashion_mnist("train", resolution=16)
    data = torch.from_numpy(images)
    scheduler = DDPMScheduler(**scheduler_config)
    acp = scheduler.alphas_cumprod.float()
    model = UNet2DModel(**unet_config)
    ema = UNet2DModel(**unet_config)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            betas=SCRIPT_OPTIM["betas"] if script else (0.9, 0.999))
    state_path = out / "train_state.pt"
    step, seconds = 0, 0.0
    gen = torch.Generator().manual_seed(args.seed)
    if state_path.exists() and not args.time_steps:
        state = torch.load(state_path, weights_only=False)
        if (state["args"]["steps"] != args.steps or state["args"]["lr"] != args.lr
                or state["args"].get("prediction_type", "epsilon") != args.prediction_type
                or state["args"].get("layout", "project") != args.layout):
            raise SystemExit(f"{state_path} was trained with other settings; use another --output")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step, seconds = state["step"], state["seconds"]
        print(f"resuming at step {step} ({seconds:.0f} s so far)", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    total = args.time_steps or args.steps
    start = time.perf_counter()
    losses = []
    model.train()

    def checkpoint():
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "gen": gen.get_state(), "step": step, "seconds": seconds + time.perf_counter() - start,
                    "args": vars(args)}, state_path.with_suffix(".tmp"))
        state_path.with_suffix(".tmp").replace(state_path)

    while step < total:
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_factor(step, args.warmup, args.steps)
        idx = torch.randint(0, data.shape[0], (args.batch_size,), generator=gen)
        x = data[idx]
        flip = torch.rand(args.batch_size, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        noise = torch.randn(x.shape, generator=gen)
        k = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=gen)
        a = acp[k].sqrt()[:, None, None, None]
        s = (1 - acp[k]).sqrt()[:, None, None, None]
        pred = model(a * x + s * noise, k).sample
        target = a * noise - s * x if vpred else noise
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if script:
            torch.nn.utils.clip_grad_norm_(model.parameters(), SCRIPT_OPTIM["grad_clip"])
        opt.step()
        step += 1
        d = ema_decay(step, args.ema_max)
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.mul_(d).add_(pm.detach(), alpha=1 - d)
        losses.append(float(loss.detach()))
        if step % 100 == 0:
            el = seconds + time.perf_counter() - start
            print(f"step {step} loss {sum(losses[-100:]) / len(losses[-100:]):.4f} {el:.0f} s", flush=True)
        if args.time_steps:
            continue
        if step % args.save_every == 0:
            checkpoint()
        if args.max_seconds and seconds + time.perf_counter() - start > args.max_seconds:
            print(f"--max-seconds reached at step {step}", flush=True)
            break
    elapsed = time.perf_counter() - start
    if args.time_steps:
        print(json.dumps({"params": n_params, "steps": args.time_steps, "seconds_per_step": elapsed / args.time_steps,
                          "threads": args.threads, "batch_size": args.batch_size}))
        return
    checkpoint()
    seconds += elapsed
    ema.eval()
    save_pipeline(ema, scheduler, out)
    target = "the v target alpha * noise - sigma * x" if vpred else "the noise"
    record = {"recipe": f"DDPM {args.prediction_type}, MSE on {target}, uniform integer timesteps (diffusers' "
                        "unconditional training example's set-up, written here)",
              "command": "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/ddpm_teacher.py "
                         f"--output {args.output} --steps {args.steps} --layout {args.layout}"
                         + (f" --prediction-type {args.prediction_type}" if vpred else ""),
              "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in unet_config.items()},
              "scheduler": scheduler_config, "params": n_params,
              "settings": {k: v for k, v in vars(args).items() if k not in ("time_steps", "results")},
              "steps_done": step, "train_seconds": round(seconds, 1), "threads": args.threads,
              "final_loss_mean_last_500": round(sum(losses[-500:]) / max(1, len(losses[-500:])), 5),
              "data": "Fashion-MNIST train (60k), 28x28 zero-padded to 32, 2x2 mean-pooled to 16x16, [-1, 1], "
                      "random horizontal flips",
              "ema": f"decay min({args.ema_max}, 1 - (1 + step)^-0.75); the EMA weights are saved"}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()

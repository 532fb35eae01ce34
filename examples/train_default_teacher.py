"""Recipe that trained the embedded default teacher (ttfm_distill/assets/fashion16).

A diffusers ``UNet2DModel`` flow-matching model on Fashion-MNIST at 16x16,
trained with the plain rectified-flow objective in the diffusers convention
(``x = sigma * noise + (1 - sigma) * data``, target ``noise - data``,
timestep ``sigma * 1000``), saved with ``save_pretrained`` beside a
``FlowMatchEulerDiscreteScheduler``.  The weights shipped are the EMA weights.

    apt-get install dataset-fashion-mnist
    python examples/train_default_teacher.py --steps 10000 --stop-after 4000 --output ttfm_distill/assets/fashion16
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

from ttfm_distill.convention import TimestepUnits, flow_matching_training_pair
from ttfm_distill.data.fashion_mnist import load_fashion_mnist

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10000, help="length of the learning-rate schedule")
    p.add_argument("--stop-after", type=int, default=None, help="stop (and save) after this many steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="ttfm_distill/assets/fashion16")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    images, _ = load_fashion_mnist("train", resolution=16)
    data = torch.from_numpy(images)
    model = UNet2DModel(**UNET_CONFIG)
    ema = UNet2DModel(**UNET_CONFIG)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = 200
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(k, args.steps) / args.steps))
    )
    units = TimestepUnits(scale=1000.0)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    last = min(args.steps, args.stop_after or args.steps)
    for step in range(1, last + 1):
        idx = torch.randint(0, data.shape[0], (args.batch_size,), generator=gen)
        x1 = data[idx]
        x1 = torch.where(torch.rand(x1.shape[0], 1, 1, 1, generator=gen) < 0.5, x1, x1.flip(-1))
        noise = torch.randn(x1.shape, generator=gen)
        t = torch.rand(x1.shape[0], generator=gen)
        x_t, timestep, target = flow_matching_training_pair(x1, noise, t, units)
        loss = (model(x_t, timestep).sample - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        if step % 200 == 0 or step == 1:
            el = time.time() - t0
            print(f"step {step}/{args.steps} loss {loss.item():.4f} {el:.0f}s eta {el / step * (args.steps - step):.0f}s", flush=True)
        if step % 2000 == 0 or step == last:
            save(ema, args, step)


def save(ema: UNet2DModel, args, step: int) -> None:
    out = Path(args.output)
    ema.save_pretrained(out / "unet", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).save_pretrained(out / "scheduler")
    (out / "teacher_card.json").write_text(json.dumps({
        "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist), 60k train images, 28x28 zero-padded to 32 and 2x2 mean-pooled to 16x16, [-1, 1], random horizontal flips",
        "objective": "rectified flow, diffusers convention (target noise - data, timestep sigma*1000), uniform sigma",
        "steps": step, "schedule_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "ema": args.ema, "seed": args.seed,
        "recipe": f"python examples/train_default_teacher.py --steps {args.steps} --stop-after {step}",
    }, indent=2))


if __name__ == "__main__":
    main()

"""Train the teacher zoo's class-conditional DiT flow teacher on Fashion-MNIST 16x16 (benchmarks/zoo.py).

A recipe that is not this project's (issue 30): a diffusers ``DiTTransformer2DModel`` (patch 2 on 16x16 pixels,
so 64 tokens; 4 blocks of 2 heads x 32, 393k parameters; the 10 Fashion-MNIST classes,
``num_embeds_ada_norm = 10``) trained as Stable Diffusion 3 trains its transformer, in diffusers' sigma convention:

* times: ``u = sigmoid(n)``, ``n ~ N(0, 1)`` (logit-normal, mean 0, std 1; SD3's ``weighting_scheme=logit_normal``),
  mapped through the scheduler's shift, ``sigma = shift * u / (1 + (shift - 1) * u)`` (continuous here, where
  SD3's script indexes the shifted 1000-entry table);
* ``x_sigma = sigma * noise + (1 - sigma) * x``, network timestep ``1000 * sigma`` (what
  ``FlowMatchEulerDiscreteScheduler`` feeds it), target ``noise - x`` (rectified flow), plain MSE;
* labels dropped to the null class (index 10) for 10% of the samples, so the teacher has an unconditional
  velocity for classifier-free guidance;
* AdamW lr 3e-4 (betas 0.9/0.999, no weight decay) with a linear warm-up and a cosine decay, gradient clip 1,
  EMA of the weights with decay ``min(0.999, 1 - (1 + step)^-0.75)``; adaLN-Zero initialisation (each block's
  modulation and the output layer start at zero, as in the DiT paper); random horizontal flips.

**The label dropout is done here, not by diffusers.** diffusers' DiT builds one ``LabelEmbedding`` per block
(``norm1.emb.class_embedder``) with ``dropout_prob = 0.1`` hard-coded by ``CombinedTimestepLabelEmbeddings``
(so its table has 11 rows: row 10 is the null class), and in ``train()`` mode each of them drops labels
*independently*, with the global RNG, once per block and once more for the output layer (which reuses block
0's embedder): a sample is never consistently unconditional. So the training copy's tables get
``dropout_prob = 0`` and the labels are replaced by 10 once per sample, from this script's own generator; the
saved model is the usual one (its tables keep the 11th row; eval mode never drops).

The output is a pipeline folder laid out as the tool's tests write DiT teachers: ``transformer/`` (the EMA
weights, safetensors), ``scheduler/`` (``FlowMatchEulerDiscreteScheduler``, ``shift`` = ``--shift``) and a
``model_index.json`` naming both (``_class_name: DiffusionPipeline``; no VAE: it is a pixel model, so not a
``DiTPipeline``), with ``id2label``. ``ttfm-distill inspect --teacher FOLDER`` shows a class-conditional flow
teacher with a null class. Re-running the same command resumes from ``FOLDER/train_state.pt``;
``--max-seconds`` stops early and saves.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=. python benchmarks/dit_teacher.py --time-steps 20   # s/step
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=. python benchmarks/dit_teacher.py --output /work/zoo/dit \\
        --steps 5000 --max-seconds 900 --results /work/zoo/dit-teacher.json

Seconds per step (``--time-steps 12``, batch 64, one thread, on the shared 2-core machine under other jobs' load,
so only their ratios mean much): patch 2 with 4 blocks of 2 x 32 heads 0.29 s; 6 blocks of 2 x 32 0.49 s;
4 blocks of 3 x 32 0.52-0.63 s; 6 blocks of 4 x 32 0.83 s; patch 4 with 6 blocks of 4 x 32 0.33 s.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ddpm_teacher import ema_decay, lr_factor  # noqa: E402 - benchmarks/ is the script's folder

LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
NUM_CLASSES = len(LABELS)


def dit_config(layers: int, heads: int, head_dim: int, patch: int) -> dict:
    return {"sample_size": 16, "in_channels": 1, "out_channels": 1, "patch_size": patch, "num_layers": layers,
            "num_attention_heads": heads, "attention_head_dim": head_dim, "num_embeds_ada_norm": NUM_CLASSES,
            "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "activation_fn": "gelu-approximate"}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="/work/zoo/dit")
    p.add_argument("--steps", type=int, default=5000, help="length of the learning-rate schedule")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=250)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--patch", type=int, default=2, choices=(1, 2, 4))
    p.add_argument("--shift", type=float, default=2.0, help="the FlowMatchEulerDiscreteScheduler shift (SD3: 3)")
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--logit-mean", type=float, default=0.0)
    p.add_argument("--logit-std", type=float, default=1.0)
    p.add_argument("--ema-max", type=float, default=0.999)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=None, help="stop (and save) after this many seconds in all")
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--time-steps", type=int, default=0, help="only time this many steps and exit")
    p.add_argument("--results", default=str(Path(__file__).resolve().parent / "results" / "dit-teacher.json"))
    return p.parse_args()


def shifted_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    """diffusers' static shift of a sigma in [0, 1] (FlowMatchEulerDiscreteScheduler, ``shift``)."""
    return shift * u / (1 + (shift - 1) * u)


def adaln_zero_(model) -> None:
    """DiT's adaLN-Zero initialisation: every block's modulation and the output layer start at zero."""
    with torch.no_grad():
        for block in model.transformer_blocks:
            block.norm1.linear.weight.zero_()
            block.norm1.linear.bias.zero_()
        for layer in (model.proj_out_1, model.proj_out_2):
            layer.weight.zero_()
            layer.bias.zero_()


def label_tables(model) -> list:
    return [m for m in model.modules() if type(m).__name__ == "LabelEmbedding"]


def save_pipeline(ema, shift: float, folder: Path) -> None:
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    ema.save_pretrained(folder / "transformer", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift).save_pretrained(folder / "scheduler")
    index = {"_class_name": "DiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "transformer": ["diffusers", "DiTTransformer2DModel"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "id2label": {str(i): name for i, name in enumerate(LABELS)}}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    from diffusers import DiTTransformer2DModel

    from ttfm_distill.data.fashion_mnist import load_fashion_mnist

    config = dit_config(args.layers, args.heads, args.head_dim, args.patch)
    out = Path(args.output)
    torch.manual_seed(args.seed)
    images, labels = load_fashion_mnist("train", resolution=16)
    data, targets = torch.from_numpy(images), torch.as_tensor(labels).long()
    model = DiTTransformer2DModel(**config)
    adaln_zero_(model)
    ema = DiTTransformer2DModel(**config)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False).eval()
    tables = label_tables(model)
    assert tables and all(t.embedding_table.num_embeddings == NUM_CLASSES + 1 for t in tables), \
        "diffusers' DiT no longer keeps a null-class row; the label dropout below needs one"
    for table in tables:  # the dropout is done once per sample below, not once per block by diffusers
        table.dropout_prob = 0.0
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.999))
    state_path = out / "train_state.pt"
    step, seconds = 0, 0.0
    gen = torch.Generator().manual_seed(args.seed)
    losses: list[float] = []
    if state_path.exists() and not args.time_steps:
        state = torch.load(state_path, weights_only=False)
        keys = ("steps", "lr", "layers", "heads", "head_dim", "patch", "shift", "batch_size")
        if any(state["args"].get(k) != getattr(args, k) for k in keys):
            raise SystemExit(f"{state_path} was trained with other settings; use another --output")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step, seconds, losses = state["step"], state["seconds"], state.get("losses", [])
        print(f"resuming at step {step} ({seconds:.0f} s so far)", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    total = args.time_steps or args.steps
    start = time.perf_counter()
    model.train()

    def elapsed() -> float:
        return seconds + time.perf_counter() - start

    def checkpoint():
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "gen": gen.get_state(), "step": step, "seconds": elapsed(), "losses": losses[-1000:],
                    "args": vars(args)}, state_path.with_suffix(".tmp"))
        state_path.with_suffix(".tmp").replace(state_path)

    first = step
    while step < total:
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_factor(step, args.warmup, args.steps)
        b = args.batch_size
        idx = torch.randint(0, data.shape[0], (b,), generator=gen)
        x, y = data[idx], targets[idx]
        flip = torch.rand(b, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        y = torch.where(torch.rand(b, generator=gen) < args.label_dropout, torch.full_like(y, NUM_CLASSES), y)
        noise = torch.randn(x.shape, generator=gen)
        u = torch.sigmoid(args.logit_mean + args.logit_std * torch.randn(b, generator=gen))
        sigma = shifted_sigma(u, args.shift)
        sb = sigma[:, None, None, None]
        pred = model(sb * noise + (1 - sb) * x, timestep=1000.0 * sigma, class_labels=y).sample
        loss = torch.nn.functional.mse_loss(pred, noise - x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        d = ema_decay(step, args.ema_max)
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.mul_(d).add_(pm.detach(), alpha=1 - d)
        losses.append(float(loss.detach()))
        if step % 100 == 0:
            print(f"step {step} loss {sum(losses[-100:]) / len(losses[-100:]):.4f} {elapsed():.0f} s", flush=True)
        if args.time_steps:
            continue
        if step % args.save_every == 0:
            checkpoint()
        if args.max_seconds and elapsed() > args.max_seconds:
            print(f"--max-seconds reached at step {step}", flush=True)
            break
    if args.time_steps:
        took = time.perf_counter() - start
        print(json.dumps({"params": n_params, "steps": args.time_steps, "seconds_per_step": took / args.time_steps,
                          "threads": args.threads, "batch_size": args.batch_size, "config": config}))
        return
    checkpoint()
    seconds = elapsed()
    save_pipeline(ema, args.shift, out)
    steps_here = step - first
    record = {"recipe": "SD3-style rectified flow: logit-normal times (mean {m}, std {s}) through the shift {sh}, "
                        "x = sigma * noise + (1 - sigma) * x, timestep 1000 * sigma, MSE to noise - x; labels dropped "
                        "to the null class for {p:.0%} of samples".format(m=args.logit_mean, s=args.logit_std,
                                                                           sh=args.shift, p=args.label_dropout),
              "command": "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=. python benchmarks/dit_teacher.py "
                         f"--output {args.output} --steps {args.steps}"
                         + (f" --max-seconds {args.max_seconds:g}" if args.max_seconds else ""),
              "transformer": config, "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": args.shift,
                                                   "num_train_timesteps": 1000},
              "params": n_params, "settings": {k: v for k, v in vars(args).items() if k not in ("time_steps", "results")},
              "steps_done": step, "finished_schedule": step >= args.steps, "train_seconds": round(seconds, 1),
              "threads": args.threads,
              "seconds_per_step_last_piece": round((time.perf_counter() - start) / steps_here, 4) if steps_here else None,
              "final_loss_mean_last_500": round(sum(losses[-500:]) / max(1, len(losses[-500:])), 5),
              "data": "Fashion-MNIST train (60k) with its labels, 28x28 zero-padded to 32, 2x2 mean-pooled to 16x16, "
                      "[-1, 1], random horizontal flips",
              "ema": f"decay min({args.ema_max}, 1 - (1 + step)^-0.75); the EMA weights are saved",
              "init": "adaLN-Zero (block modulations and output layer zeroed)"}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()

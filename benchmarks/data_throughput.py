"""Does the data loader keep up with training?  Batches/second of each data source vs training steps/second.

Sources (batch 32, the default run's): a local image folder and a parquet file of
Fashion-MNIST PNGs (read through ``datasets``), the Debian Fashion-MNIST files,
the data-free teacher pool, and the image folder streamed (decoded as read).
Training: steps/second of the default run (embedded teacher, ITVM, batch 32).

    OMP_NUM_THREADS=1 python benchmarks/data_throughput.py --images 2000

Writes benchmarks/results/data_throughput.json.  Timings are wall clock on
whatever machine runs it; compare the ratios, which come from one process.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from ttfm_distill.config import RunConfig
from ttfm_distill.data import build_data


def rate(fn, seconds: float, min_calls: int = 3) -> float:
    """Calls per second of ``fn`` over about ``seconds``."""
    fn()  # warm
    n, start = 0, time.perf_counter()
    while n < min_calls or time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - start)


def training_rate(teacher, batch: int, steps: int) -> float:
    """Steps/second of the default run's training step (data drawn from a fixed tensor: the step alone)."""
    from ttfm_distill.batch import BatchPath, step_generator
    from ttfm_distill.factory import build_student
    from ttfm_distill.objectives import make_objective

    class Zeros:  # the data: a fixed tensor (the step alone is timed)
        def sample(self, n, generator):
            return torch.zeros(n, *teacher.data_shape), None

    cfg = RunConfig()
    objective = make_objective(cfg.loss, **cfg.loss_options)
    student = build_student(teacher, cfg)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr_value())
    path = BatchPath(teacher, Zeros(), cfg.time_sampling, cfg.diagonal_fraction or 0.0, cfg.dyadic_levels)
    k = [0]

    def step():
        g = step_generator(0, 0, k[0])
        k[0] += 1
        loss = objective(student, teacher, path(batch, g), student).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def write_sources(root: Path, n: int):
    """``n`` Fashion-MNIST training images as PNGs in class folders, and the same as one parquet file."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature
    from PIL import Image

    from ttfm_distill.data.fashion_mnist import FASHION_MNIST_CLASSES, find_fashion_mnist, read_idx

    src = find_fashion_mnist()
    images = read_idx(src / "train-images-idx3-ubyte.gz")[:n]
    labels = read_idx(src / "train-labels-idx1-ubyte.gz")[:n]
    folder = root / "images"
    blobs = []
    for i, (img, lab) in enumerate(zip(images, labels)):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        blobs.append(buf.getvalue())
        d = folder / f"c{lab}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:06d}.png").write_bytes(blobs[-1])
    names = [n.replace("/", "-") for n in FASHION_MNIST_CLASSES]
    Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in blobs], "label": labels.tolist()},
                      features=Features({"image": ImageFeature(), "label": ClassLabel(names=names)})
                      ).to_parquet(str(root / "train.parquet"))
    return folder, root / "train.parquet"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000, help="images in the folder / parquet sources")
    ap.add_argument("--seconds", type=float, default=2.0, help="time per source rate measurement")
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--pool", type=int, default=256, help="data-free pool size to generate")
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "data_throughput.json"))
    args = ap.parse_args()

    import datasets

    from ttfm_distill.teachers.loading import load_teacher

    datasets.disable_progress_bars()

    teacher = load_teacher(None)
    batch = RunConfig().batch_size
    results = {"command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python benchmarks/data_throughput.py "
                          f"--images {args.images} --pool {args.pool}",
               "torch_threads": torch.get_num_threads(), "machine": platform.machine(), "batch_size": batch,
               "note": "wall clock on a shared machine; compare ratios within this file", "sources": {}}
    train = training_rate(teacher, batch, args.train_steps)
    results["training_steps_per_second"] = round(train, 3)
    print(f"training (default run, batch {batch}): {train:.2f} steps/s")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder, parquet = write_sources(tmp, args.images)
        log = lambda msg: None  # noqa: E731
        specs = {
            "image folder": dict(data=str(folder)),
            "parquet": dict(data=str(parquet)),
            "fashion-mnist": dict(data="fashion-mnist"),
            "data-free pool": dict(data="teacher", pool_size=args.pool),
            "image folder, streamed": dict(data=str(folder), data_streaming=True),
        }
        for name, kw in specs.items():
            cfg = RunConfig(data_cache=str(tmp / "cache"), **kw)
            row = {}
            start = time.perf_counter()
            source = build_data(teacher, cfg, tmp / "run", "cpu", log)
            row["first_build_seconds"] = round(time.perf_counter() - start, 2)
            if not kw.get("data_streaming"):
                start = time.perf_counter()
                source = build_data(teacher, cfg, tmp / "run", "cpu", log)
                row["cached_build_seconds"] = round(time.perf_counter() - start, 2)
            g = torch.Generator().manual_seed(0)
            x, _ = source.sample(batch, g)
            assert tuple(x.shape) == (batch, *teacher.data_shape), (name, x.shape)
            row["rows"] = len(source) if hasattr(source, "__len__") else None
            if hasattr(source, "queue"):  # streamed: empty the prefetch queue first, then measure decoding
                while source.queue.qsize() >= batch:
                    source.sample(batch, g)
            row["batches_per_second"] = round(rate(lambda: source.sample(batch, g), args.seconds), 1)
            row["x_training_rate"] = round(row["batches_per_second"] / train, 1)
            if hasattr(source, "close"):
                source.close()
            results["sources"][name] = row
            print(f"{name:24s} {row['batches_per_second']:>9.1f} batches/s ({row['x_training_rate']}x training); "
                  f"first build {row['first_build_seconds']}s, cached {row.get('cached_build_seconds', '-')}s")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

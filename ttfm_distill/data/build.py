"""Building the training data source of a run: the data-free pool, an exact 2-D distribution, or real data.

``build_data(teacher, cfg, out, device, log)`` picks the source from ``cfg.data``; :class:`DataBuilder`
prepares real images (and their labels, captions and latents) once into the cache, or streams them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .cache import build_chunked, content_key, data_progress, default_cache_dir, files_signature, teacher_fingerprint
from .conditioning import (CAPTION_COLUMNS, LABEL_COLUMNS, PromptMemo, PromptRows, label_ids, prompt_table,
                           read_prompt_file)
from .errors import DataError
from .images import describe_value, prepare_image, to_unit_range
from .pool import build_pool
from .sources import StreamingSource, TensorSource, crop_batch
from ..teachers.analytic import AnalyticTeacher


CACHE_VERSION = 1
ROW_CHUNK = 512  # rows decoded (and encoded) per saved chunk
ENCODE_BATCH = 64
IMAGE_COLUMNS = ("image", "img", "images", "pixels", "pixel_values", "png", "jpg", "jpeg", "picture")


class ExactData:
    """An analytic teacher's exact data distribution."""

    trajectories = None

    def __init__(self, teacher):
        self.teacher = teacher
        self.report = {"source": "teacher (exact distribution)"}

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, None]:
        return self.teacher.sample_data(n, generator=generator), None


def build_data(teacher, cfg, out: Path, device, log, console=None, show_progress: bool = False):
    """The data source of ``cfg`` for ``teacher``; its ``report`` dict goes into metrics.json."""
    progress = data_progress(console, show_progress and console is not None)
    with progress:
        if cfg.data == "teacher":
            if isinstance(teacher, AnalyticTeacher):
                return ExactData(teacher)
            return build_pool(teacher, cfg, Path(out) / "cache", device, log, progress=progress,
                              cache_dir=_cache_dir(cfg))
        return DataBuilder(teacher, cfg, device, log, progress).build()


def _cache_dir(cfg) -> Path:
    return Path(cfg.data_cache).expanduser() if cfg.data_cache else default_cache_dir()


@dataclass
class Geometry:
    channels: int
    base: tuple[int, int]  # pixel size images are stored at (>= the teacher's)
    target: tuple  # one sample in teacher data space


class DataBuilder:
    """Builds a :class:`TensorSource` (or :class:`StreamingSource`) from a real data set."""

    def __init__(self, teacher, cfg, device, log, progress):
        self.teacher, self.cfg, self.device, self.log, self.progress = teacher, cfg, device, log, progress
        self.cache = _cache_dir(cfg)
        self.conditioning = teacher.conditioning
        self.geometry = self._geometry()
        self._teacher_fp = None

    # ------------------------------------------------------------ setup --
    def _geometry(self) -> Geometry:
        shape = tuple(self.teacher.image_shape)
        if len(shape) != 3:
            raise DataError(f"teacher {self.teacher.name} takes data of shape {shape}, not images; "
                            "use --data teacher")
        c, h, w = shape
        r = self.cfg.data_resolution
        if r is None or r == min(h, w):
            base = (h, w)
        elif r < min(h, w):
            raise DataError(f"data_resolution {r} is below the teacher's image size {h}x{w}; images are resized to "
                            "it and then cropped to the teacher's size, so it must be at least that")
        else:
            base = (round(h * r / min(h, w)), round(w * r / min(h, w)))
        return Geometry(c, base, tuple(self.teacher.data_shape))

    def teacher_fp(self) -> str:
        if self._teacher_fp is None:
            self._teacher_fp = teacher_fingerprint(self.teacher)
        return self._teacher_fp

    def prep_key(self) -> list:
        c = self.cfg
        return [CACHE_VERSION, self.geometry.channels, self.geometry.base, c.data_channels, c.data_range]

    def prepare(self, value, row: int, where: str):
        try:
            return prepare_image(value, self.geometry.channels, *self.geometry.base,
                                 strict=self.cfg.data_channels == "strict", value_range=self.cfg.data_range)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"{where}: row {row} ({describe_value(value)}) is not a usable image: {reason}") from None

    @torch.no_grad()
    def encode(self, u8: torch.Tensor) -> torch.Tensor:
        """uint8 pixels -> teacher data (the VAE of a latent teacher), in batches on the teacher's device."""
        out = []
        for chunk in u8.split(ENCODE_BATCH):
            out.append(self.teacher.encode_images(to_unit_range(chunk).to(self.device)).float().cpu())
        return torch.cat(out)

    # ---------------------------------------------------------- sources --
    def build(self):
        if self.cfg.data == "fashion-mnist":
            return self.fashion_mnist()
        from .hf import open_dataset

        opened = open_dataset(self.cfg.data, self.cfg.data_split, self.cfg.data_streaming, self.cache / "hf-datasets")
        if self.cfg.data_streaming:
            return self.streaming(opened)
        return self.from_dataset(opened)

    def _columns(self, ds, name):
        columns = list(ds.column_names or [])
        features = getattr(ds, "features", None) or {}
        if not columns:  # a stream with unknown features: peek at one row
            columns = list(next(iter(ds)).keys())
        avail = ", ".join(columns)

        def need(col, what):
            if col not in columns:
                raise DataError(f"dataset {name} has no {what} column {col!r}; available columns: {avail}")
            return col

        if self.cfg.data_image_column:
            image = need(self.cfg.data_image_column, "image")
        else:
            from datasets import Image

            image = next((c for c in columns if isinstance(features.get(c), Image)), None)
            image = image or next((c for c in IMAGE_COLUMNS if c in columns), None)
            if image is None:
                raise DataError(f"dataset {name} has no image column; available columns: {avail}; "
                                "name one with --image-column")
        label = None
        if self.cfg.data_label_column:
            label = need(self.cfg.data_label_column, "label")
        elif self.conditioning == "class":
            label = next((c for c in LABEL_COLUMNS if c in columns), None)
            if label is None:
                raise DataError(f"teacher {self.teacher.name} is class-conditioned, but dataset {name} has no label "
                                f"column; available columns: {avail}; name one with --label-column")
        if self.conditioning != "class":
            label = None  # only class-conditioned teachers use labels
        caption = None
        if self.conditioning == "text":
            if self.cfg.data_caption_column:
                caption = need(self.cfg.data_caption_column, "caption")
            elif not self.cfg.prompts:
                caption = next((c for c in CAPTION_COLUMNS if c in columns), None)
                if caption is None:
                    raise DataError(f"teacher {self.teacher.name} is text-conditioned, but dataset {name} has no "
                                    f"caption column; available columns: {avail}; name one with --caption-column "
                                    "or pass --prompts FILE")
        elif self.cfg.data_caption_column:
            need(self.cfg.data_caption_column, "caption")
        return image, label, caption

    def _label_names(self, ds, col):
        feature = (getattr(ds, "features", None) or {}).get(col)
        return list(getattr(feature, "names", None) or []) or None

    def from_dataset(self, opened):
        ds, name = opened.dataset, opened.name
        image_col, label_col, caption_col = self._columns(ds, name)
        if self.cfg.data_max_samples and len(ds) > self.cfg.data_max_samples:
            ds = ds.select(range(self.cfg.data_max_samples))
        n = len(ds)
        if n == 0:
            raise DataError(f"dataset {name} (split {self.cfg.data_split!r}) has no rows")
        from datasets import Image

        raw = ds.select_columns([image_col])
        if isinstance(raw.features.get(image_col), Image):
            raw = raw.cast_column(image_col, Image(decode=False))  # we decode (and report bad files) ourselves
        where = f"dataset {name}, column {image_col!r}"

        def values(start, stop):
            return raw[start:stop][image_col]

        identity = opened.identity + [image_col, n] if opened.identity is not None else None
        base, info = self.prepared_rows(identity, n, values, where)
        labels = prompts = None
        if label_col:
            labels, names = label_ids(ds[label_col], self._label_names(ds, label_col),
                                      self.teacher.num_classes, f"{where.split(',')[0]}, column {label_col!r}")
        if self.conditioning == "text":
            prompts = self.prompts_for(list(ds[caption_col]) if caption_col else None, n)
        info.update({"source": name, "kind": opened.kind, "rows": n, "image_column": image_col,
                     "label_column": label_col, "caption_column": caption_col})
        cond = {"class_labels": labels} if labels is not None else None
        return TensorSource(base, self.geometry.target, self.cfg.data_crop, cond, prompts, info)

    def prompts_for(self, captions: list[str] | None, n: int) -> PromptRows:
        if captions is None:
            captions = read_prompt_file(self.cfg.prompts)
            if len(captions) != n:
                raise DataError(f"prompt file {self.cfg.prompts} has {len(captions)} prompts but the data has {n} rows; "
                                "give one prompt per row (or use a caption column)")
        if any(not isinstance(c, str) for c in captions):
            raise DataError("the caption column holds values that are not text")
        table, unique, _ = prompt_table(self.teacher, captions, self.cache, self.teacher_fp(), self.progress, self.log)
        return PromptRows(table, unique, captions)

    def prepared_rows(self, identity, n, values, where) -> tuple[torch.Tensor, dict]:
        """Decode (and encode, for latent teachers) all rows once, through the on-disk cache."""
        latent = self.teacher.is_latent

        def make(start, stop):
            u8 = torch.from_numpy(np.stack([self.prepare(v, start + i, where) for i, v in enumerate(values(start, stop))]))
            return {"data": self.encode(u8) if latent else u8}

        what = "encoding images with the teacher's VAE" if latent else "decoding images"
        if identity is None:  # not cacheable: build in memory
            tensors = make(0, n)
            return tensors["data"], {"cache": None}
        key = content_key(identity, self.prep_key())
        path = self.cache / (f"latents-{key}-{self.teacher_fp()}.safetensors" if latent else f"pixels-{key}.safetensors")
        tensors, rep = build_chunked(path, n, ROW_CHUNK, make, metadata={"source": where}, progress=self.progress,
                                     description=what, log=self.log)
        if rep.built_rows:
            self.log(f"{what}: {n} rows in {rep.seconds:.1f}s -> {path}")
        else:
            self.log(f"{'latents' if latent else 'images'}: cache hit ({n} rows) {path}")
        base = tensors["data"]
        if tuple(base.shape[1:-2]) != self.geometry.target[:-2] or any(
                b < t for b, t in zip(base.shape[-2:], self.geometry.target[-2:])):
            raise DataError(f"prepared data has shape {tuple(base.shape[1:])}, which does not fit the teacher's "
                            f"data shape {self.geometry.target}")
        return base, {"cache": str(path), "cache_hit": rep.built_rows == 0, "prepare_seconds": round(rep.seconds, 2)}

    def fashion_mnist(self):
        from .fashion_mnist import find_fashion_mnist, load_fashion_mnist, read_idx

        c, (h, w) = self.geometry.channels, self.geometry.base
        latent = self.teacher.is_latent
        info = {"source": "fashion-mnist"}
        if not latent and c == 1 and h == w and h in (16, 28) and tuple(self.teacher.data_shape) == (1, h, w):
            images, labels = load_fashion_mnist("train", resolution=h)  # the embedded teacher's exact recipe
            base, labels = torch.from_numpy(images[: self.cfg.data_max_samples]), labels[: self.cfg.data_max_samples]
        else:
            root = find_fashion_mnist()
            files = [root / "train-images-idx3-ubyte.gz", root / "train-labels-idx1-ubyte.gz"]
            raw = read_idx(files[0])[: self.cfg.data_max_samples]
            labels = read_idx(files[1]).astype("int64")[: self.cfg.data_max_samples]
            base, more = self.prepared_rows(["fashion-mnist", files_signature(files)], len(raw),
                                            lambda a, b: list(raw[a:b]), "fashion-mnist")
            info.update(more)
        info["rows"] = len(base)
        labels_t = torch.from_numpy(labels) if self.conditioning == "class" else None
        if labels_t is not None:
            label_ids(labels_t.tolist(), None, self.teacher.num_classes, "fashion-mnist labels")
        if self.conditioning == "text":
            raise DataError("fashion-mnist has no captions for a text-conditioned teacher; use --data teacher "
                            "--prompts FILE or a dataset with a caption column")
        cond = {"class_labels": labels_t} if labels_t is not None else None
        return TensorSource(base, self.geometry.target, self.cfg.data_crop, cond, None, info)

    def streaming(self, opened):
        ds, name = opened.dataset, opened.name
        image_col, label_col, caption_col = self._columns(ds, name)
        names = self._label_names(ds, label_col) if label_col else None
        where = f"dataset {name}, column {image_col!r}"
        captions_file = read_prompt_file(self.cfg.prompts) if self.conditioning == "text" and not caption_col else None
        if captions_file is not None:
            raise DataError("a streamed dataset needs a caption column for a text-conditioned teacher (--prompts pairs "
                            "prompts with rows of a non-streamed dataset)")
        from datasets import Image

        if isinstance((getattr(ds, "features", None) or {}).get(image_col), Image):
            ds = ds.cast_column(image_col, Image(decode=False))
        num_classes = self.teacher.num_classes
        seed = self.cfg.seed
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # each rank its own shard
            from datasets.distributed import split_dataset_by_node

            ds = split_dataset_by_node(ds, torch.distributed.get_rank(), torch.distributed.get_world_size())

        def rows(epoch):
            stream = ds.shuffle(seed=seed + epoch, buffer_size=STREAM_SHUFFLE_BUFFER)
            for i, row in enumerate(stream):
                if self.cfg.data_max_samples and i >= self.cfg.data_max_samples:
                    break
                label = None
                if label_col:
                    value = row[label_col]
                    label = names.index(value) if isinstance(value, str) and names and value in names else value
                    if not isinstance(label, int) or label < 0 or (num_classes and label >= num_classes):
                        raise DataError(f"dataset {name}, column {label_col!r}: row {i} has label {value!r}, not a "
                                        f"class id in 0..{num_classes - 1}")
                yield self.prepare(row[image_col], i, where), label, (row[caption_col] if caption_col else None)

        latent = self.teacher.is_latent
        memo = PromptMemo(self.teacher) if caption_col else None
        target, crop = self.geometry.target, self.cfg.data_crop

        def finish(u8, labels, prompts, g):
            x = self.encode(u8) if latent else u8
            x = crop_batch(x, target[-2:], crop, g)
            x = to_unit_range(x) if x.dtype == torch.uint8 else x
            cond = {}
            if labels is not None:
                cond["class_labels"] = labels
            if prompts is not None:
                cond.update(memo.rows(prompts))
            return x, (cond or None)

        self.log(f"streaming {name} (shuffle buffer {STREAM_SHUFFLE_BUFFER}); images are decoded as they are read")
        return StreamingSource(rows, finish, report={"source": name, "kind": opened.kind, "streaming": True,
                                                     "image_column": image_col, "label_column": label_col,
                                                     "caption_column": caption_col}, name=name)


STREAM_SHUFFLE_BUFFER = 1000

"""Open ``--data`` through the Hugging Face ``datasets`` library.

``spec`` is a local image folder (class subfolders become labels), a parquet
or arrow file or a folder of them, a ``save_to_disk`` folder, or a hub dataset
id.  Returns the dataset with an identity (what a cache of it depends on).
"""

from __future__ import annotations

import difflib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BUILTIN_SOURCES = ("teacher", "fashion-mnist")


@dataclass
class OpenedDataset:
    dataset: object  # datasets.Dataset or datasets.IterableDataset
    identity: list | None  # None: not cacheable (a streamed hub set)
    kind: str  # imagefolder, parquet, arrow, saved, hub
    name: str


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def open_dataset(spec: str, split: str, streaming: bool, hf_cache: Path | None = None) -> OpenedDataset:
    path = Path(spec).expanduser()
    if path.exists():
        return _open_local(path, split, streaming, hf_cache)
    close = difflib.get_close_matches(spec, BUILTIN_SOURCES, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    if _looks_like_hub_id(spec):
        try:
            return _open_hub(spec, split, streaming)
        except DataError as e:
            raise DataError(f"{e}{hint}") from None
    raise _not_found(spec, hint)


def _not_found(spec: str, hint: str) -> DataError:
    if spec.startswith((".", "~", os.sep)) or spec.endswith(IMAGE_SUFFIXES + (".parquet", ".arrow")):
        return DataError(f"data path {spec} does not exist")
    return DataError(f"data source {spec!r} is not a file, a folder or a hub dataset id; use 'teacher' (data-free), "
                     f"'fashion-mnist', a local folder/parquet/arrow file, or an 'org/name' hub id{hint}")


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    ok = lambda s: s and all(c.isalnum() or c in "-_." for c in s) and not s.startswith((".", "-"))  # noqa: E731
    return 1 <= len(parts) <= 2 and all(ok(p) for p in parts) and not spec.endswith(IMAGE_SUFFIXES + (".parquet", ".arrow"))


def _select_split(ds, split: str, name: str):
    if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # a DatasetDict
        if split not in ds:
            raise DataError(f"dataset {name} has no split {split!r}; available: {', '.join(ds.keys())} "
                            "(choose one with --set data_split=NAME)")
        return ds[split]
    return ds


def _load(builder: str, name: str, split: str, streaming: bool, hf_cache, **kw):
    datasets = _quiet_datasets()
    try:
        return datasets.load_dataset(builder, split=split, streaming=streaming,
                                     cache_dir=str(hf_cache) if hf_cache else None, **kw)
    except ValueError as e:
        if "split" in str(e).lower():
            raise DataError(f"dataset {name} has no split {split!r} ({_first_line(e)}); choose one with "
                            "--set data_split=NAME") from None
        raise DataError(f"cannot read dataset {name}: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; all mean "unreadable"
        raise DataError(f"cannot read dataset {name}: {type(e).__name__}: {_first_line(e)}") from None


def _classify_local(path: Path) -> tuple[str, list[Path]]:
    """``(kind, files)`` of a local source: saved, parquet, arrow or imagefolder; errors when unusable."""
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        return "saved", []
    files = [path] if path.is_file() else _files(path)
    if not files:
        raise DataError(f"data folder {path} is empty; put images (class subfolders become labels), parquet or "
                        "arrow files in it")
    by_kind = {
        "parquet": [f for f in files if f.suffix == ".parquet"],
        "arrow": [f for f in files if f.suffix == ".arrow"],
        "imagefolder": [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES],
    }
    kind = next((k for k, v in by_kind.items() if v), None)
    if kind is None:
        what = "file" if path.is_file() else "folder"
        raise DataError(f"data {what} {path} holds no images ({', '.join(IMAGE_SUFFIXES)}), .parquet or .arrow "
                        "files")
    # an image folder's metadata files (metadata.csv/jsonl) count towards its identity too
    return kind, files if kind == "imagefolder" else by_kind[kind]


def _open_local(path: Path, split: str, streaming: bool, hf_cache) -> OpenedDataset:
    name = str(path)
    kind, used = _classify_local(path)
    if kind == "saved":
        return _open_saved(path, split, streaming)
    if kind == "imagefolder":
        used = _image_files(path, used, split)
        # explicit files: datasets' own folder scan re-globs the tree once per split pattern (minutes for big sets)
        ds = _load("imagefolder", name, split, streaming, hf_cache, data_files={split: [str(f) for f in used]})
    else:
        ds = _load(kind, name, split, streaming, hf_cache, data_files={split: [str(f) for f in used]})
    from .cache import files_signature

    return OpenedDataset(ds, ["local", kind, split, files_signature(used)], kind, name)


SPLIT_FOLDERS = ("train", "test", "validation", "valid", "val", "dev")
METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")


def _image_files(path: Path, files: list[Path], split: str) -> list[Path]:
    """An image folder's files for ``split``: its ``split/`` subfolder when it has split subfolders."""
    if path.is_file():
        return files
    splits = sorted(d.name for d in path.iterdir() if d.is_dir() and d.name in SPLIT_FOLDERS)
    if splits:
        if split not in splits:
            raise DataError(f"image folder {path} has split folders {', '.join(splits)} but no {split!r}; choose one "
                            "with --set data_split=NAME")
        files = [f for f in files if f.relative_to(path).parts[0] == split]
    return [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES or f.name in METADATA_FILES]


def check_data_spec(spec: str) -> str:
    """Cheap checks of ``--data`` before any model loads: the source exists, is not empty, and a hub id is
    reachable (or cached while offline).  Returns a short description."""
    if spec in BUILTIN_SOURCES:
        if spec == "fashion-mnist":
            from .fashion_mnist import find_fashion_mnist

            find_fashion_mnist()
        return spec
    path = Path(spec).expanduser()
    if path.exists():
        return f"{_classify_local(path)[0]} {path}"
    close = difflib.get_close_matches(spec, BUILTIN_SOURCES, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    if not _looks_like_hub_id(spec):
        raise _not_found(spec, hint)
    if hub_offline():
        datasets = _quiet_datasets()
        try:
            datasets.load_dataset_builder(spec)
        except ConnectionError:
            raise DataError(_offline_message(spec, True) + hint) from None
        except Exception:  # noqa: BLE001 - anything else is reported when the data is opened
            pass
    elif not hub_reachable():
        raise DataError(_unreachable_message(spec) + hint)
    return f"hub dataset {spec}"


def _offline_message(spec: str, offline: bool) -> str:
    return (f"dataset {spec!r} is a Hugging Face hub id and is not in the local cache, and the hub is "
            f"{'offline (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set)' if offline else 'unreachable'}; "
            "download it on a machine with network, or pass a local folder or parquet file")


def _unreachable_message(spec: str) -> str:
    return (f"dataset {spec!r} is a Hugging Face hub id, but the hub cannot be reached; if it is in the local "
            "cache set HF_DATASETS_OFFLINE=1, otherwise pass a local folder or parquet file")


def _open_saved(path: Path, split: str, streaming: bool) -> OpenedDataset:
    datasets = _quiet_datasets()
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot read saved dataset {path}: {_first_line(e)}") from None
    ds = _select_split(ds, split, str(path))
    from .cache import files_signature

    identity = ["saved", split, getattr(ds, "_fingerprint", None),
                files_signature(f for f in _files(path) if f.suffix in (".arrow", ".json"))]
    if streaming:
        ds = ds.to_iterable_dataset()
    return OpenedDataset(ds, identity, "saved", str(path))


def hub_offline() -> bool:
    truthy = {"1", "on", "yes", "true"}
    return any(os.environ.get(v, "").strip().lower() in truthy for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _open_hub(spec: str, split: str, streaming: bool) -> OpenedDataset:
    datasets = _quiet_datasets()
    offline = hub_offline()
    if not offline and not hub_reachable():
        raise DataError(_unreachable_message(spec))
    try:
        ds = datasets.load_dataset(spec, split=split, streaming=streaming)
    except ConnectionError:
        raise DataError(_offline_message(spec, offline)) from None
    except ValueError as e:
        raise DataError(f"cannot read hub dataset {spec}: {_first_line(e)} (choose a split with --set "
                        "data_split=NAME)" if "split" in str(e).lower() else
                        f"cannot read hub dataset {spec}: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot read hub dataset {spec}: {type(e).__name__}: {_first_line(e)}") from None
    ds = _select_split(ds, split, spec)
    identity = None if streaming else ["hub", spec, split, getattr(ds, "_fingerprint", None)]
    return OpenedDataset(ds, identity, "hub", spec)

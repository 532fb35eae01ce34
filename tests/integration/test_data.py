"""Training data sources (ttfm_distill.data): real data sets, caches, the data-free pool, bad sources.

All data is made here in tmp_path; nothing touches the network.  The fake
teachers count their encode calls, so the tests can tell a cache hit from a
rebuild.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import make_image_folder, make_parquet, png_bytes


# ------------------------------------------------------ the real entry point --
def test_python_m_entry_point(tmp_path):
    """The literal `python -m ttfm_distill` path: a hub id while offline fails fast, in one line."""
    import time

    e = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    start = time.time()
    r = subprocess.run([sys.executable, "-m", "ttfm_distill", "run", "--data", "someone/some-dataset", "--output",
                        str(tmp_path / "o"), "-q", "--set", f"data_cache={tmp_path}"], capture_output=True, text=True,
                       env=e, timeout=600)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "offline" in lines[0], r.stderr
    assert time.time() - start < 120


# ------------------------------------------------------ the CLI in one process --
def entry_many(cases, cwd=None):
    """Run ``ttfm-distill ARGS`` for each ARGS in ``cases`` through the CLI's entry point (``main``, what
    ``python -m ttfm_distill`` runs), one after another in ONE fresh process (saves the imports per case).
    Returns ``[(exit code, stderr lines)]``."""
    script = f"""
import sys
from ttfm_distill.cli import main
for i, args in enumerate({[[str(a) for a in case] for case in cases]!r}):
    sys.argv = ["ttfm-distill", *args]
    try:
        main()
    except SystemExit as e:
        print(f"@@ exit {{e.code}}", file=sys.stderr, flush=True)
"""
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=e, cwd=cwd, timeout=900)
    assert "Traceback" not in r.stderr, r.stderr
    results, lines = [], []
    for line in r.stderr.splitlines():
        if line.startswith("@@ exit "):
            results.append((int(line.split()[-1]), lines))
            lines = []
        elif line.strip():
            lines.append(line)
    assert len(results) == len(cases), r.stderr
    return results


TINY = ["--max-steps", 3, "--batch-size", 4, "--set", "eval_samples=4", "--set", "reference_steps=4", "-q"]


@pytest.fixture(scope="module")
def cli_session(tiny_teacher_dir, tmp_path_factory):
    """Bad sources, then the acceptance runs, all through the CLI entry point in one process."""
    root = tmp_path_factory.mktemp("cli")
    bad = root / "bad"
    (bad / "empty").mkdir(parents=True)
    (bad / "corrupt" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(bad / "corrupt" / "a" / "ok.png")
    (bad / "corrupt" / "a" / "broken.png").write_bytes(b"this is not a png")
    from datasets import Dataset

    Dataset.from_dict({"pixels": np.zeros((3, 2, 8, 8), np.uint8).tolist()}).to_parquet(str(bad / "twochannel.parquet"))
    Dataset.from_dict({"img": [{"bytes": png_bytes(np.zeros((8, 8), np.uint8)), "path": None}]}).to_parquet(
        str(bad / "nolabel.parquet"))
    images = make_image_folder(root / "images")
    parquet, _ = make_parquet(root / "train.parquet")

    cache = root / "cache"
    common = ["--teacher", tiny_teacher_dir, *TINY, "--set", f"data_cache={cache}"]
    err = ["run", "--output", root / "err", "--overwrite", *common]
    cases = {
        "empty": [*err, "--data", bad / "empty"],
        "corrupt": [*err, "--data", bad / "corrupt"],
        "channels": [*err, "--data", bad / "twochannel.parquet"],
        "column": [*err, "--data", bad / "nolabel.parquet", "--image-column", "image"],
        "hub": [*err, "--data", "someone/some-dataset"],
        "size": [*err, "--data", bad / "corrupt", "--resolution", 4],
        "folder": ["run", "--data", images, "--output", root / "a", *common],
        "folder again": ["run", "--data", images, "--output", root / "b", *common],
        "parquet": ["run", "--data", parquet, "--image-column", "picture", "--output", root / "c", *common],
        "data-free": ["run", "--output", root / "d", "--set", "pool_size=32", "--set", "pool_steps=2", *TINY],
    }
    results = dict(zip(cases, entry_many(list(cases.values()), cwd=root)))
    return root, results


def one_line_error(result, *needles):
    code, lines = result
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("case, needles", [
    ("empty", ["empty"]),
    ("corrupt", ["broken.png", "not a usable image"]),  # an unreadable image is named
    ("channels", ["(2, 8, 8)", "1-, 3- or 4-channel"]),  # a channel count that cannot be fixed
    ("column", ["no image column 'image'", "available columns: img"]),
    ("hub", ["someone/some-dataset", "hub", "offline"]),
    ("size", ["data_resolution 4", "8x8"]),  # a size that cannot be reached by cropping
])
def test_bad_source_is_one_line_error(cli_session, case, needles):
    one_line_error(cli_session[1][case], *needles)


def test_run_on_image_folder_and_parquet_then_caches_hit(cli_session):
    """Acceptance: `run` on a local image folder and a local parquet file; a second run hits the caches."""
    root, results = cli_session
    for case in ("folder", "folder again", "parquet"):
        assert results[case][0] == 0, results[case]
    first = json.loads((root / "a" / "metrics.json").read_text())["data"]
    assert first["rows"] == 6 and first["kind"] == "imagefolder" and first["cache_hit"] is False
    again = json.loads((root / "b" / "metrics.json").read_text())["data"]
    assert again["cache_hit"] is True and again["cache"] == first["cache"]
    data = json.loads((root / "c" / "metrics.json").read_text())["data"]
    assert data["rows"] == 8 and data["kind"] == "parquet" and data["image_column"] == "picture"
    assert (root / "c" / "student" / "flow_map" / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_data_free_run_on_embedded_teacher_reports_pool(cli_session):
    root, results = cli_session
    assert results["data-free"][0] == 0, results["data-free"]
    data = json.loads((root / "d" / "metrics.json").read_text())["data"]
    assert data["source"] == "teacher" and data["samples"] == 32 and data["cache"] == "built"
    assert data["seconds"] > 0 and data["generation_seconds"] >= data["seconds"]
    # the defaults: an Euler pool keeping its samples alone (no trajectory rows unless trajectory_fraction is set)
    assert data["solver"].startswith("euler") and not data.get("trajectories")
    # in bf16 exactly when the run trains in bf16 (the hardware decides the automatic value), under a name of its own
    cfg = json.loads((root / "d" / "config.json").read_text())
    bf16 = cfg["mixed_precision"] == "bf16"
    assert cfg["pool_precision"] == ("bf16" if bf16 else "no") and data["precision"] == ("bf16" if bf16 else "fp32")
    tag = "-bf16" if bf16 else ""
    assert len(list((root / "d" / "cache").glob(f"pool-n32-euler2{tag}-seed0-t*.safetensors"))) == 1  # keyed on the weights

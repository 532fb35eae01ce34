"""The committed 2-D benchmark results have the promised shape (docs/benchmarks.md's tables are printed from them)."""

import json
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


@pytest.mark.parametrize("name", ["toy2d.json", "toy2d-gaussian-mixture.json"])
def test_results_format(name):
    path = RESULTS / name
    if not path.exists():
        pytest.skip("benchmark results not committed")
    res = json.loads(path.read_text())
    assert {"itvm", "lfmd_fd", "lfmd_jvp", "progressive", "lsd", "meanflow", "teacher_euler"} <= set(res)
    for entry in res.values():
        assert set(entry["kl"]) == {"1", "2", "4", "8", "16"}
        assert all(v >= 0 for v in entry["kl"].values())
        assert "seconds" in entry

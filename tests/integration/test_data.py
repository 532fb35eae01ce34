"""Training data sources (ttfm_distill.data): real data sets, caches, the data-free pool, bad sources.

All data is made here in tmp_path; nothing touches the network.  The fake
teachers count their encode calls, so the tests can tell a cache hit from a
rebuild.
"""

import os
import subprocess
import sys


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

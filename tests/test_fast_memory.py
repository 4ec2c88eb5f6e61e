"""Tests for nanograd/fast/memory.py: with keep_freed_memory, a step's arrays reuse the last step's pages."""
import json
import subprocess
import sys

import pytest

CHURN = """
import json, resource, sys
import numpy as np
from nanograd.fast.memory import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "keep" else None
def step():  # a step's pattern: many mid-sized arrays made, then all freed
    arrays = [np.ones(128 * 1024, np.float32) for _ in range(40)]  # 40 x 512 KB
    del arrays
step(); step()  # the first steps may fault either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(json.dumps({"took": took, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def churn(mode):
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True, timeout=60)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_kept_memory_takes_the_page_faults_out_of_later_steps():
    default, kept = churn("default"), churn("keep")
    assert kept["took"] is True
    # by default every step hands its 20 MB back and faults 5,000 pages in again
    assert default["faults"] > 10 * 5000 // 2
    assert kept["faults"] < default["faults"] / 20

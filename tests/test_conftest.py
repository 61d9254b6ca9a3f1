"""The suite's own plumbing, run as a user runs it: pytest in a subprocess."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_tests_left_out_are_counted_in_one_line():
    """Without a CUDA device the `gpu` tests are deselected, and the run says how many and
    why in one line (with -q too), the same count as pytest's own "N deselected"."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--collect-only", "tests/test_gpu.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    text = proc.stdout + proc.stderr
    said = re.findall(r"^(\d+) gpu test\(s\) deselected: no CUDA device here", text, re.M)
    if torch.cuda.is_available():
        assert not said, text
        return
    counted = re.search(r"(\d+) deselected", text)
    assert len(said) == 1 and counted and int(said[0]) == int(counted[1]) > 0, text

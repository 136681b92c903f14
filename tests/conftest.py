"""Shared test setup: repo root first on sys.path, Triton's CPU interpreter, markers.

Markers: `bench` (benchmarks, printed tables; run with `-m bench`), `gpu` (needs CUDA), `slow`
(minutes, not seconds; run with `-m slow`). The default test command runs none of them.
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # our `kernels/` must win over the unrelated PyPI package of that name

# Triton decides at @triton.jit time whether to compile or interpret, so this must be set before
# any kernel module is imported. Without a GPU the interpreter is the only way to run a kernel.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

_OPT_IN = ("bench", "slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "bench: benchmark that prints a table (opt in with -m bench)")
    config.addinivalue_line("markers", "slow: takes minutes (opt in with -m slow)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    markexpr = config.getoption("-m") or ""
    for item in items:
        for name in _OPT_IN:
            if name in item.keywords and name not in markexpr:
                item.add_marker(pytest.mark.skip(reason=f"opt-in: run with -m {name}"))
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))

"""Test set-up: the Triton interpreter on the CPU, GPU tests skipped (and listed) without CUDA."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# Tiny test shapes gain nothing from intra-op threads, and on a loaded 2-core machine spinning
# OpenMP threads made single tests 100x slower. ET_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("ET_TEST_THREADS", "1")))
if not HAS_CUDA:
    # Must be set before triton decorates any kernel (i.e. before energy_train.kernels imports).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs CUDA: GPU test NOT RUN on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if "CUDA" in str(getattr(r, "longrepr", ""))]
    if skipped:
        terminalreporter.write_line(
            f"NOTE: {len(skipped)} GPU test(s) were NOT RUN (no CUDA device): a skip is not a pass.")


@pytest.fixture(params=[0, 1, 2], ids=lambda s: f"seed{s}")
def seed(request):
    torch.manual_seed(request.param)
    return request.param

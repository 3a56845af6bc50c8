import os
import sys

# The project is a folder of scripts, not a package: make its files importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory):
    """One data dir for the whole session: the digits (rendered once, ~10 s) and the
    digits classifier (trained once, ~25 s) are reused by every test that needs them."""
    return str(tmp_path_factory.mktemp("shared-data"))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: over a minute of CPU (the walk of every flag's hostile values, ...); skipped unless "
        "asked for with -m slow, which .ci/run runs after the rest")
    config.addinivalue_line(
        "markers", "cuda: needs a CUDA device (tests/test_cuda.py); skipped with one reason where there is none")
    config.addinivalue_line(
        "markers", "summation_order: compares two computations that are equal in exact arithmetic but sum in "
        "another order (micro-batches, processes, a cache, two optimizer implementations); .ci/run runs these "
        "again under a smaller instruction set (tools/other_cpu.sh), as another CPU would compute them. (A "
        "resumed run repeats the same arithmetic in the same order, so it is bit for bit on any CPU: not marked.)")


def pytest_collection_modifyitems(config, items):
    """The default run (python -m pytest -q tests) leaves the slow tests out; -m slow runs them."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

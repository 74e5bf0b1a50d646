"""Shared fixtures: the ``gpu`` marker skips cleanly where no CUDA device is usable."""
import functools

import pytest


@functools.lru_cache(maxsize=None)
def gpu_available() -> bool:
    from cpattn import gpu_available as available
    return available()


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and CuPy")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

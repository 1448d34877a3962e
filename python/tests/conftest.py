"""Shared fixtures. The tests import `flashmla` as installed (scripts/test-python.sh installs the wheel into a
virtualenv and runs pytest from outside the source tree); FLASHMLA_LIBRARY may point at another libflashmla.so."""

import os
import pathlib
import zlib

import numpy as np
import pytest


def repo_root() -> pathlib.Path:
    """The repository root (README.md lives there)."""
    env = os.environ.get("FLASHMLA_REPO_ROOT")
    if env:
        return pathlib.Path(env)
    return pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id, so every test (and parameter set) is reproducible on its own."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def require_gpu() -> bool:
    """FLASHMLA_REQUIRE_GPU=1 (the GPU workflow): GPU tests must run, not skip."""
    return os.environ.get("FLASHMLA_REQUIRE_GPU") == "1"

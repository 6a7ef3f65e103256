"""Shared fixtures: tiny random Llama-3 checkpoints written once per test session."""

import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax
import pytest

from jaxsloth.tiny import make_tiny_checkpoint

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: tiny_checkpoint(preset, **kwargs) -> path, cached per argument set."""
    cache = {}

    def make(preset="llama3", **kwargs):
        key = (preset, json.dumps(kwargs, sort_keys=True))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"ckpt-{preset}")
            cache[key] = make_tiny_checkpoint(path / "model", preset, **kwargs)
        return cache[key]

    return make

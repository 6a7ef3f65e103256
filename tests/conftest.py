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


@pytest.fixture
def triton_lowering(monkeypatch):
    """Lower Pallas kernels through Triton (JAXSLOTH_PALLAS_INTERPRET=0, jit caches cleared before
    and after, so no interpreted trace is reused or leaks out) and run MLIR's verifier (op and type
    constraints) on every Triton module lowered while the test runs: on a CPU machine this catches
    what only the GPU's Triton parse would report (e.g. an unsigned inline-asm result). Uses a
    private JAX hook; yields a one-item list counting the verified modules, or None where a JAX
    version lacks the hook."""
    from jax._src.pallas.triton import pallas_call_registration as reg

    monkeypatch.setenv("JAXSLOTH_PALLAS_INTERPRET", "0")
    lower = getattr(getattr(reg, "lowering", None), "lower_jaxpr_to_triton_module", None)
    count = None
    if lower is not None:
        count = [0]

        def verified(*args, **kwargs):
            result = lower(*args, **kwargs)
            result.module.operation.verify()
            count[0] += 1
            return result
        monkeypatch.setattr(reg.lowering, "lower_jaxpr_to_triton_module", verified)
    jax.clear_caches()
    try:
        yield count
    finally:
        jax.clear_caches()

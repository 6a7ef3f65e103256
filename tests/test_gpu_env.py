"""jaxsloth.gpu_env: defaults for a long training run, never overriding the user's own settings."""

import os
import subprocess
from pathlib import Path

from jaxsloth.gpu_env import use_whole_gpu

KEYS = ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB")


def test_sets_defaults_from_the_machine(monkeypatch):
    for k in KEYS:
        monkeypatch.delenv(k, raising=False)
    got = use_whole_gpu(device_fraction=0.9, host_fraction=0.5)
    assert got["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90" == os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"]
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    assert abs(int(got["XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"]) - int(ram_gib * 0.5)) <= 1


def test_keeps_what_the_user_set(monkeypatch):
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    monkeypatch.setenv("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", "7")
    assert use_whole_gpu() == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5", "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB": "7"}


def test_bench_job_scripts_parse():
    for script in sorted((Path(__file__).resolve().parents[1] / "bench").glob("*.sh")):
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, (script.name, proc.stderr)

"""Process-wide GPU memory settings a long training run wants, applied before JAX starts its backend.

JAX's defaults suit a notebook sharing the card: the device allocator takes 75% of GPU memory
(XLA_PYTHON_CLIENT_MEM_FRACTION) and the pinned host pool that ``remat="offload"`` fills is capped at
64 GB (XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB). Measured on an H100 host with 125 GiB of RAM
(bench/RESULTS.md): a 70B step at 102,400 tokens could not get its 23.8 GiB of temporaries at 0.75,
and one at 131,072 tokens could not place its 80 GiB of offloaded activations under the 64 GB cap.
Values the user set are kept.
"""

from __future__ import annotations

import os

__all__ = ["use_whole_gpu"]


def _host_ram_gb() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 2**20  # kB -> GiB
    except OSError:
        return None
    return None


def use_whole_gpu(device_fraction: float = 0.95, host_fraction: float = 0.85) -> dict:
    """Set (unless already set) the device memory fraction and the pinned host pool limit (a share
    of the machine's RAM). Returns the values in effect. Call before the first JAX device use."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{device_fraction:.2f}")
    ram = _host_ram_gb()
    if ram:
        os.environ.setdefault("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", str(max(1, int(ram * host_fraction))))
    return {k: os.environ.get(k) for k in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB")}

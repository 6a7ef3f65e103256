"""Where checkpoint loading spends its time: ``jaxsloth.load_model`` under cProfile.

Loads a checkpoint (e.g. the baselines' random 8B one on the GPU machine) with NF4 quantization on
load, waits for the device, and prints the wall time and the functions with the most own time and
the most cumulative time, as JSON lines.

    python bench/load_profile.py --base /dev/shm/llama3-8b-rand [--top 25] [--no-4bit]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="HF checkpoint directory")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--no-4bit", action="store_true", help="load 16-bit (no NF4 quantization)")
    args = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp

    import jaxsloth

    jnp.zeros(1).block_until_ready()  # backend start-up outside the timing
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    model, _ = jaxsloth.load_model(args.base, dtype="bfloat16", load_in_4bit=not args.no_4bit)
    jax.block_until_ready(model.params)
    prof.disable()
    wall = time.perf_counter() - t
    print(json.dumps({"load_s": round(wall, 2), "device": jax.devices()[0].device_kind}), flush=True)
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(args.top)
        print(f"--- by {key}\n" + s.getvalue().split("\n", 6)[-1], flush=True)


if __name__ == "__main__":
    main()

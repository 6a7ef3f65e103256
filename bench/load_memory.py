"""Peak host RAM of ``jaxsloth.load_model`` against the checkpoint's size (CPU is enough).

Writes a random Llama-3-architecture checkpoint of a few hundred MB (sharded safetensors), then
loads it in a fresh process and reports that process's peak RSS (VmHWM) above its RSS after the
imports. On the CPU backend the loaded arrays live in host RAM too, so "one copy of the model"
is the floor: streaming should stay near 1.0x the checkpoint, a load-all-then-convert path ~2x.

    python bench/load_memory.py [--mb 400] [--dtype float32] [--load-in-4bit]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHILD = r"""
import json, sys
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
import jax, jax.numpy as jnp, jaxsloth
jnp.zeros(1).block_until_ready()
before = rss("VmRSS:")
model, _ = jaxsloth.load_model(sys.argv[1], dtype=sys.argv[2], load_in_4bit=sys.argv[3] == "1")
jax.block_until_ready(model.params)
print(json.dumps({"rss_before": before, "peak": rss("VmHWM:"), "rss_after": rss("VmRSS:")}))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=400, help="approximate checkpoint size")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--load-in-4bit", action="store_true")
    args = ap.parse_args(argv)
    from jaxsloth.tiny import make_tiny_checkpoint

    # hidden 1024, intermediate 2816, vocab 384: ~ 13.6M params per layer in f32 = 54 MB per layer
    layers = max(1, round(args.mb * 2**20 / (4 * 13.6e6)))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_tiny_checkpoint(Path(tmp) / "ckpt", "llama3", dtype="float32", shard_bytes=100 * 2**20,
                                    overrides=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                                                   num_attention_heads=8, num_key_value_heads=2))
        size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        out = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), args.dtype, "1" if args.load_in_4bit else "0"],
                             stdout=subprocess.PIPE, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
    extra = r["peak"] - r["rss_before"]
    print(json.dumps({"checkpoint_mb": round(size / 2**20), "layers": layers, "dtype": args.dtype,
                      "load_in_4bit": args.load_in_4bit, "peak_above_imports_mb": round(extra / 2**20),
                      "resident_after_load_mb": round((r["rss_after"] - r["rss_before"]) / 2**20),
                      "peak_over_checkpoint": round(extra / size, 2)}))


if __name__ == "__main__":
    main()

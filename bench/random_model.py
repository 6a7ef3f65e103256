"""Random Llama-3-shaped models built straight into NF4 on the device (no checkpoint, no downloads).

For shapes whose bf16 weights would not fit anywhere convenient (70B: 140 GB in bf16, ~40 GB in
NF4), every projection is drawn with ``jax.random`` one layer at a time on the device, quantized
with ``quantize_nf4`` right away and written into its place in the stacked [L, ...] NF4 arrays
(``convert.load._NF4Stacks``, the loader's own in-place stacks), so the device never holds more
than the NF4 model plus one bf16 matrix. Embeddings / lm_head stay bf16 as after a real load.
Weights: N(0, 0.02) projections, N(0, 1) embeddings, RMSNorm scales 1 + N(0, 0.1) (as
``bench/export_merged_8b.py``'s checkpoint generator).

    from random_model import LLAMA3_70B, random_nf4_model
    model = random_nf4_model(LLAMA3_70B)           # CausalLM, quantized="nf4-random"
    python bench/random_model.py --preset 70b      # builds it, prints size and build time
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from convert.load import _NF4Stacks  # noqa: E402
from export_merged_8b import LLAMA3_8B, TINY  # noqa: E402,F401  (the shapes the benches share)
from jaxsloth.causal_lm import CausalLM  # noqa: E402
from jaxsloth.config import LlamaConfig  # noqa: E402
from jaxsloth.quant import nf4_nbytes, quantize_nf4  # noqa: E402
from jaxsloth.sharding import _frozen_bytes  # noqa: E402  (the model's parameter bytes)

LLAMA3_70B = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                  num_attention_heads=64, num_key_value_heads=8)
PRESETS = {"8b": LLAMA3_8B, "70b": LLAMA3_70B, "tiny": TINY}


def llama3_config(shape: dict) -> LlamaConfig:
    raw = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "rms_norm_eps": 1e-5,
           "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
           "bos_token_id": 128000, "eos_token_id": 128001, **shape}
    return LlamaConfig.from_dict(raw, source="random_model")


def random_nf4_model(shape: dict, *, seed: int = 0, dtype: str = "bfloat16", std: float = 0.02,
                     blocksize: int = 64, double_quant: bool = True) -> CausalLM:
    cfg = llama3_config(shape)
    dt = jnp.dtype(dtype)
    key = jax.random.PRNGKey(seed)
    n_layers, d = cfg.num_hidden_layers, cfg.hidden_size
    linear = cfg.linear_shapes()

    stacks = _NF4Stacks(n_layers)
    for i in range(n_layers):
        for j, (short, shp) in enumerate(linear.items()):
            k = jax.random.fold_in(jax.random.fold_in(key, i), j)
            w = (std * jax.random.normal(k, shp, jnp.float32)).astype(dt)
            stacks.set(short, i, quantize_nf4(w, blocksize=blocksize, double_quant=double_quant))
            del w
    kn = jax.random.fold_in(key, 10**6)
    k_embed, k_head, k_norm = jax.random.split(kn, 3)
    params = {
        # drawn in the model dtype: an f32 draw of a 70B table would be a 4 GB transient on the device
        "embed": jax.random.normal(k_embed, (cfg.vocab_size, d), dt),
        "lm_head": std * jax.random.normal(k_head, (cfg.vocab_size, d), dt),
        "final_norm": jnp.ones((d,), dt),
        "layers": {"attn_norm": (1.0 + 0.1 * jax.random.normal(k_norm, (n_layers, d), jnp.float32)).astype(dt),
                   "mlp_norm": jnp.ones((n_layers, d), dt),
                   **stacks.finish("random_model")},
    }
    return CausalLM(config=cfg, params=params, dtype=jnp.dtype(dt).name, quantized="nf4-random")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    args = ap.parse_args(argv)
    t = time.perf_counter()
    model = random_nf4_model(PRESETS[args.preset])
    jax.block_until_ready(model.params)
    q = model.params["layers"]["q"]
    print(json.dumps({"preset": args.preset, "device": jax.devices()[0].device_kind,
                      "build_s": round(time.perf_counter() - t, 1), "gib": round(_frozen_bytes(model) / 2**30, 2),
                      "q_nf4_gib": round(nf4_nbytes(q) / 2**30, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

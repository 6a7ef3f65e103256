"""Merged bf16 export of a Llama-3 8B-shaped model: wall time and peak host RAM.

Builds a random bf16 base with the real 8B shapes (DESIGN.md: hidden 4096, intermediate 14336,
32 layers, 32 heads, 8 KV heads, vocab 128256) on the device with jax.random, streams it into
5 GB safetensors shards (no downloads), loads it with jaxsloth (NF4 on load by default, or bf16),
attaches a random LoRA r=32 on all seven projections (non-zero B), runs ``export_merged`` in
bf16 and reports, as JSON on the last line:
  - wall seconds of generate / load / export (export includes the jit compiles of the merge);
  - peak host RSS (VmHWM) of each phase: the peak is reset before each phase through
    /proc/self/clear_refs where the kernel allows it, else the process-wide peak is given
    (and ru_maxrss, which is never reset);
  - the output's shard count / sizes and a spot check of one merged tensor against
    W + scaling * B @ A computed separately in numpy.

GPU machine:   python bench/export_merged_8b.py [--bf16] [--workdir /dev/shm/x]
CPU smoke run: python bench/export_merged_8b.py --tiny
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from safetensors import safe_open  # noqa: E402

import jaxsloth  # noqa: E402
from convert.export import export_merged, write_safetensors_streamed  # noqa: E402
from jaxsloth.tiny import build_tokenizer  # noqa: E402

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8)
TINY = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def vm_hwm_kib() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def vm_rss_kib() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def gib(kib):
    return None if kib is None else round(kib / 2**20, 3)


def hf_tensors(shape: dict):
    """(HF name, shape) of a Llama checkpoint, in file order."""
    d, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    hd = d // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (v, d))]
    for layer in range(shape["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [(p + "input_layernorm.weight", (d,)), (p + "self_attn.q_proj.weight", (q, d)),
                (p + "self_attn.k_proj.weight", (kv, d)), (p + "self_attn.v_proj.weight", (kv, d)),
                (p + "self_attn.o_proj.weight", (d, q)), (p + "post_attention_layernorm.weight", (d,)),
                (p + "mlp.gate_proj.weight", (i, d)), (p + "mlp.up_proj.weight", (i, d)),
                (p + "mlp.down_proj.weight", (d, i))]
    out += [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]
    return out


def write_random_base(out: Path, shape: dict, shard_bytes: int, seed: int = 0):
    """Random bf16 weights drawn on the device, streamed tensor by tensor into safetensors shards."""
    out.mkdir(parents=True, exist_ok=True)
    plan = hf_tensors(shape)
    shards, current, size = [], [], 0
    for name, shp in plan:
        nbytes = math.prod(shp) * 2
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, "BF16", shp, nbytes))
        size += nbytes
    shards.append(current)
    key = jax.random.PRNGKey(seed)
    index = {name: k for k, (name, _) in enumerate(plan)}
    shapes = dict(plan)

    def produce(name):
        shp = shapes[name]
        k = jax.random.fold_in(key, index[name])
        if name.endswith("norm.weight"):
            w = 1.0 + 0.1 * jax.random.normal(k, shp, jnp.float32)
        else:
            w = jax.random.normal(k, shp, jnp.float32) * (1.0 if "embed" in name else 0.02)
        return np.asarray(w.astype(jnp.bfloat16))

    weight_map, total = {}, 0
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    for fname, entries in zip(names, shards):
        write_safetensors_streamed(out / fname, entries, produce)
        for name, _, _, nbytes in entries:
            weight_map[name] = fname
            total += nbytes
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "attention_bias": False, "mlp_bias": False, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "max_position_embeddings": 8192, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "bos_token_id": 128000 if shape["vocab_size"] > 128001 else 0,
              "eos_token_id": 128001 if shape["vocab_size"] > 128001 else 1, **shape}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": config["bos_token_id"],
                                                            "eos_token_id": config["eos_token_id"]}))
    build_tokenizer().save_pretrained(str(out))
    return total


def random_lora(model, r: int, seed: int = 1):
    model = jaxsloth.add_lora(model, r=r, lora_alpha=r, target_modules="all", seed=seed)
    key = jax.random.PRNGKey(seed)
    lora = {}
    for k, (name, ab) in enumerate(model.lora.items()):
        b = 0.01 * jax.random.normal(jax.random.fold_in(key, k), ab["b"].shape, jnp.float32)
        lora[name] = {"a": ab["a"], "b": b}
    return model.replace(lora=lora)


def spot_check(model, out: Path, base_dir: Path) -> float:
    """max |exported - (W + s * B @ A)| / max |W| for layer 0's q_proj, recomputed in numpy (f32)."""
    name = "model.layers.0.self_attn.q_proj.weight"
    index = json.loads((out / "model.safetensors.index.json").read_text()) \
        if (out / "model.safetensors.index.json").is_file() else {"weight_map": {name: "model.safetensors"}}
    with safe_open(str(out / index["weight_map"][name]), "numpy") as f:
        got = f.get_tensor(name).astype(np.float32)
    w = model.params["layers"]["q"]
    if model.quantized:
        from jaxsloth.quant import dequantize_nf4
        w0 = np.asarray(dequantize_nf4(jax.tree_util.tree_map(lambda x: x[0], w), jnp.float32))
    else:
        w0 = np.asarray(w[0], np.float32)
    a = np.asarray(model.lora["q"]["a"][0], np.float64)
    b = np.asarray(model.lora["q"]["b"][0], np.float64)
    expect = w0 + model.lora_scaling * (b @ a)
    return float(np.abs(got - expect).max() / np.abs(w0).max())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small shapes: a CPU smoke run of the same code path")
    ap.add_argument("--bf16", action="store_true", help="load the base in bf16 instead of NF4 on load")
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--workdir", default=None,
                    help="where base and export go (default: /dev/shm if it has room, else /tmp)")
    ap.add_argument("--shard-bytes", type=int, default=None, help="export shard limit (default 5e9; tiny 1e6)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--base", default=None, help="an existing bf16 HF checkpoint to export from (skips generating)")
    args = ap.parse_args(argv)

    shape = TINY if args.tiny else LLAMA3_8B
    shard_bytes = args.shard_bytes or (1_000_000 if args.tiny else 5 * 10**9)
    need = 2 * 2 * sum(math.prod(s) for _, s in hf_tensors(shape)) * 1.05
    if args.workdir:
        work = Path(args.workdir)
    else:
        shm = Path("/dev/shm")
        work = (shm if shm.is_dir() and shutil.disk_usage(shm).free > need else Path("/tmp")) / "jaxsloth_export_bench"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    base_dir, out_dir = work / "base", work / "merged"
    result = {"device": str(jax.devices()[0]), "jax": jax.__version__, "shape": shape, "r": args.r,
              "load": "bf16" if args.bf16 else "nf4-on-load", "workdir": str(work), "peak_resettable": reset_peak()}
    try:
        if args.base:
            base_dir = Path(args.base)
            result["base"] = str(base_dir)
            result["base_bytes"] = sum(p.stat().st_size for p in base_dir.glob("*.safetensors"))
        else:
            t = time.perf_counter()
            total = write_random_base(base_dir, shape, shard_bytes)
            result["generate_s"] = round(time.perf_counter() - t, 2)
            result["base_bytes"] = total
            result["generate_peak_rss_gib"] = gib(vm_hwm_kib())

        reset_peak()
        t = time.perf_counter()
        model, _ = jaxsloth.load_model(base_dir, dtype="bfloat16", load_in_4bit=not args.bf16)
        model = random_lora(model, args.r)
        jax.block_until_ready(model.lora)
        result["load_s"] = round(time.perf_counter() - t, 2)
        result["load_peak_rss_gib"] = gib(vm_hwm_kib())
        result["rss_before_export_gib"] = gib(vm_rss_kib())

        reset_peak()
        t = time.perf_counter()
        export_merged(model, out_dir, "bfloat16", max_shard_bytes=shard_bytes)
        result["export_s"] = round(time.perf_counter() - t, 2)
        result["export_peak_rss_gib"] = gib(vm_hwm_kib())
        result["export_peak_above_before_gib"] = round(
            result["export_peak_rss_gib"] - result["rss_before_export_gib"], 3)
        result["ru_maxrss_gib"] = gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        shards = sorted(p for p in out_dir.iterdir() if p.suffix == ".safetensors")
        result["export_shards"] = len(shards)
        result["export_largest_shard_gb"] = round(max(p.stat().st_size for p in shards) / 1e9, 3)
        result["export_bytes"] = sum(p.stat().st_size for p in shards)
        result["export_write_gb_per_s"] = round(result["export_bytes"] / 1e9 / result["export_s"], 2)
        result["spot_check_rel_err"] = spot_check(model, out_dir, base_dir)  # bf16 rounding: <= 2^-8
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

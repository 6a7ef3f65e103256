"""QLoRA training throughput and memory on a random Llama-3 8B-shaped checkpoint (GPU machine).

Generates the checkpoint on the device (bench/export_merged_8b.py's generator: real 8B shapes,
bf16 safetensors shards, no downloads) unless it exists, loads it with NF4 on load, attaches
LoRA r=32 / alpha 32 on q,k,v,o,gate,up,down, and for each remat preset runs the real jitted
training step (gradient accumulation 1, AdamW) on random token batches: warm-up, then timed steps.
Reports per preset: tokens/s, s/step, compiled temp memory and the process's peak device memory,
plus time from checkpoint to first finished step (load + quantize + compile + step). The first
preset's step compiles on a thread while the checkpoint loads (from ``jaxsloth.abstract_model``:
config.json and the safetensors headers), as a user can do; --no-overlap compiles after loading.

Presets run in order of increasing memory (offload, full, none) so the running device peak
after each is that preset's peak.

    python bench/train_throughput.py --workdir /tmp/jx [--presets offload,full,none] [--batch 2 --seq 2048]
    python bench/train_throughput.py --tiny        # CPU smoke run of the same code
Also writes a long-text JSONL (--write-data PATH) for a CLI run on the same checkpoint.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from jaxsloth.gpu_env import use_whole_gpu  # noqa: E402

use_whole_gpu()  # as `jaxsloth train` runs (and torch has the whole card): 95% of it, not JAX's 75%

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxsloth  # noqa: E402
from export_merged_8b import LLAMA3_8B, TINY, write_random_base  # noqa: E402
from jaxsloth.train import TrainingArguments, make_optimizer, make_train_step  # noqa: E402


def peak_gib():
    stats = jax.devices()[0].memory_stats() or {}
    return round(stats.get("peak_bytes_in_use", 0) / 2**30, 2)


def token_batch(ids):
    """A training batch [A, B, S] from token ids [A, B, S + 1]: labels are the next tokens, one row each."""
    ids = np.asarray(ids, np.int32)
    labels = ids[..., 1:]
    return {"input_ids": ids[..., :-1], "labels": labels, "segment_ids": np.ones_like(labels),
            "position_ids": np.broadcast_to(np.arange(labels.shape[-1], dtype=np.int32), labels.shape).copy()}


def random_batch(vocab, batch, seq, seed=0):
    rng = np.random.default_rng(seed)
    return token_batch(rng.integers(0, vocab, size=(1, batch, seq + 1), dtype=np.int32))


def write_text_data(path: Path, n: int, words_per_example: int, seed=0):
    rng = np.random.default_rng(seed)
    vocab = "the of and to in is was for on that with as by at from model data train learn token layer".split()
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(vocab, words_per_example))}) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/jx")
    ap.add_argument("--base", default=None, help="existing HF checkpoint (e.g. the baselines' make_model.py output)")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--presets", default="offload,full,none")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--write-data", default=None, help="also write a long-text JSONL for `jaxsloth train`")
    ap.add_argument("--mesh", default=None,
                    help="device mesh, e.g. data=2 (per-device batch --batch; fsdp=1 runs the shard_map data-parallel step)")
    ap.add_argument("--impl", default=None, choices=["xla", "pallas"], help="kernel implementation (default: per op)")
    ap.add_argument("--sanity", default=None, help="token ids from bench/sanity_data.py: loss-sanity run afterwards")
    ap.add_argument("--sanity-preset", default="full")
    ap.add_argument("--no-overlap", action="store_true",
                    help="compile the first preset after loading, not on a thread while loading")
    ap.add_argument("--profile", default=None, help="trace 2 steps of each preset under DIR/<n> (bench/profile_summary.py)")
    args = ap.parse_args(argv)
    shape = TINY if args.tiny else LLAMA3_8B
    if args.tiny:
        args.seq, args.steps, args.warmup = min(args.seq, 128), 2, 1
    work = Path(args.workdir)
    base = Path(args.base) if args.base else work / ("base-tiny" if args.tiny else "base-8b")
    dev = jax.devices()[0]
    info = {"device": dev.device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
            "batch": args.batch, "seq": args.seq, "r": args.r}
    print(json.dumps(info), flush=True)

    if not (base / "config.json").exists():
        t = time.perf_counter()
        write_random_base(base, shape, shard_bytes=int(5e9))
        print(json.dumps({"generate_s": round(time.perf_counter() - t, 1)}), flush=True)
    if args.write_data:
        write_text_data(Path(args.write_data), n=64, words_per_example=1400 if not args.tiny else 40)

    targs = TrainingArguments(learning_rate=1e-4, max_steps=1000, lr_scheduler_type="constant", weight_decay=0.0)
    presets = args.presets.split(",")
    t0 = time.perf_counter()
    early = None
    if not args.no_overlap and not args.mesh:
        # the preset's library switches are set here, on the main thread, before loading starts
        early = concurrent.futures.ThreadPoolExecutor(1).submit(
            compile_from_abstract, base, apply_preset(presets[0]), targs, args)
    model, _ = jaxsloth.load_model(base, dtype="bfloat16", load_in_4bit=True)
    jax.block_until_ready(model.params)
    t_load = time.perf_counter() - t0
    # the tokenizer is static pytree data: the step (and a step compiled from abstract_model) takes none
    model = lora_to_host(jaxsloth.add_lora(model.replace(tokenizer=None), r=args.r, lora_alpha=args.r))
    print(json.dumps({"load_quantize_s": round(t_load, 1), "peak_gib_after_load": peak_gib()}), flush=True)

    if args.impl:
        model = model.replace(implementation=args.impl)
    model, mesh = place_on_mesh(model, args.mesh, info)
    n_dev = 1 if mesh is None else mesh.size
    info["implementation"] = model.implementation or "default"
    batch = random_batch(model.config.vocab_size, args.batch * n_dev, args.seq)
    tokens = args.batch * n_dev * args.seq

    if mesh is not None:
        from jaxsloth.sharding import shard_batch

        batch = shard_batch(batch, mesh)
    rows = []
    for k, preset in enumerate(presets):
        _, step, lora, opt, ctx = build_step(model, preset, mesh, targs)
        frozen = model.replace(lora=None)
        key = jax.random.PRNGKey(0)
        with ctx:  # the mesh, when there is one
            if k == 0 and early is not None:   # compiled while loading: wait for it, run it
                compiled, t_compile = early.result()
                info["compile_overlapped_s"] = round(t_compile, 1)
                step = compiled
            else:
                t = time.perf_counter()
                compiled = step.lower(lora, opt, frozen, batch, key).compile()
                t_compile = time.perf_counter() - t
            mem = compiled.memory_analysis()
            temp = getattr(mem, "temp_size_in_bytes", 0) / 2**30 if mem is not None else float("nan")
            try:
                lora, opt, m = step(lora, opt, frozen, batch, key)
                first_loss = float(m["loss"])
            except Exception as e:  # noqa: BLE001 - report and go on with the next preset
                print(json.dumps({"preset": preset, "error": str(e)[:300]}), flush=True)
                continue
            if k == 0:
                info["checkpoint_to_first_step_s"] = round(time.perf_counter() - t0, 1)
            for _ in range(args.warmup):
                lora, opt, m = step(lora, opt, frozen, batch, key)
            jax.block_until_ready(m["loss"])
            t = time.perf_counter()
            for _ in range(args.steps):
                lora, opt, m = step(lora, opt, frozen, batch, key)
            loss = float(m["loss"])
            dt = (time.perf_counter() - t) / args.steps
            if args.profile:
                pdir = Path(args.profile) / f"{k}"
                with jax.profiler.trace(str(pdir), create_perfetto_trace=True):
                    for _ in range(2):
                        lora, opt, m = step(lora, opt, frozen, batch, key)
                    jax.block_until_ready(m["loss"])
                try:
                    from profile_summary import summarize

                    prof = summarize(str(pdir), steps=2)
                    print(json.dumps({"preset": preset, "profile": {k2: prof[k2] for k2 in
                                      ("wall_ms", "busy_ms", "sum_ms", "by_class_ms", "top_kernels", "top_hlo_ops")}}), flush=True)
                except (SystemExit, Exception) as e:  # noqa: BLE001 - the trace stays for offline reading
                    print(json.dumps({"preset": preset, "profile_error": str(e)[:300]}), flush=True)
            row = {"preset": preset, "s_per_step": round(dt, 4), "tokens_per_s": round(tokens / dt),
                   "compile_s": round(t_compile, 1), "temp_gib": round(temp, 2), "peak_gib": peak_gib(),
                   "first_loss": round(first_loss, 4), "last_loss": round(loss, 4)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del lora, opt
    if args.sanity:
        info["sanity"] = loss_sanity(model, args.sanity, args.sanity_preset, mesh, targs)
    print(json.dumps({**info, "results": rows}), flush=True)


import pallas_kernels.nf4_matmul as _nm  # noqa: E402
import pallas_kernels.rope as rope_mod  # noqa: E402

NF4_DOT = _nm._dot  # the library defaults, restored between presets
ROPE_DEFAULT = rope_mod.MODEL_DEFAULT_ON_GPU


def _f32_dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype)


def compile_from_abstract(base, mem, targs, args):
    """(compiled step with the memory options ``mem`` (``apply_preset``), seconds) from
    ``jaxsloth.abstract_model`` (no weights needed): runs on a thread while the checkpoint loads.
    The batch and key are small concrete arrays."""
    t = time.perf_counter()
    abstract = jaxsloth.abstract_model(base, dtype="bfloat16", load_in_4bit=True, implementation=args.impl)
    abstract = jax.eval_shape(lambda m: jaxsloth.add_lora(m, r=args.r, lora_alpha=args.r), abstract)
    tx = make_optimizer(targs, targs.max_steps)
    step, lora = make_train_step(tx, **mem), abstract.lora
    batch = random_batch(abstract.config.vocab_size, args.batch, args.seq)
    compiled = step.lower(lora, jax.eval_shape(tx.init, lora), abstract.replace(lora=None), batch,
                          jax.random.PRNGKey(0)).compile()
    return compiled, time.perf_counter() - t


def lora_to_host(model):
    """``model`` with its LoRA as host (numpy) arrays. Each preset's step gets a fresh device copy
    (build_step) and donates it, so the device holds one copy of the adapters, as the PyTorch
    baselines do (and the Trainer with ``donate_model_lora``)."""
    return model.replace(lora=jax.device_get(model.lora))


def place_on_mesh(model, spec: str | None, info: dict):
    """(model placed on the mesh ``spec``, mesh), or (model, None) without a spec; records the mesh in
    ``info``. FSDP meshes run the XLA kernels, as the Trainer does (GSPMD partitions XLA ops only)."""
    if not spec:
        return model, None
    from jaxsloth.sharding import describe, make_mesh, shard_model

    mesh = make_mesh(spec, model=model)
    if mesh.shape["fsdp"] > 1 and model.implementation is None:
        model = model.replace(implementation="xla")
    info["mesh"] = describe(mesh)
    return shard_model(model.replace(lora=None), mesh).replace(lora=model.lora), mesh


def apply_preset(preset: str) -> dict:
    """make_train_step's memory options for ``preset``, after setting the library switches it names
    (jit caches cleared when they change; call it on the main thread).

    preset: a remat name, optionally with memory options: "offload/mlp=2048/group=2/ce=512"
    (mlp: tokens per MLP chunk; group: layers per remat group; ce: tokens per loss chunk; unroll: the
    layer scan's unroll factor, default the library's: straight-line layers with "none", else 1;
    dot=f32: the NF4 GEMM writes f32 and casts, the behaviour before session 2, for A/B;
    tie=1: the experimental NF4 backward barrier; rope=pallas|xla: the RoPE implementation the model
    uses when it leaves the choice to the op).
    """
    import pallas_kernels.nf4_matmul as nm

    remat, *opts = preset.split("/")
    kw = dict(o.split("=") for o in opts)
    mem = {"remat": remat, "packing": False, "mlp_chunk": int(kw["mlp"]) if "mlp" in kw else None,
           "remat_group": int(kw.get("group", 1)), "loss_chunk": int(kw["ce"]) if "ce" in kw else None,
           "layer_unroll": int(kw["unroll"]) if "unroll" in kw else None}
    want = _f32_dot if kw.get("dot") == "f32" else NF4_DOT
    tie = kw.get("tie") == "1"
    rope_impl = kw.get("rope", ROPE_DEFAULT)
    if nm._dot is not want or nm.TIE_BACKWARD_TO_COTANGENT != tie or rope_mod.MODEL_DEFAULT_ON_GPU != rope_impl:
        nm._dot, nm.TIE_BACKWARD_TO_COTANGENT, rope_mod.MODEL_DEFAULT_ON_GPU = want, tie, rope_impl
        jax.clear_caches()
    return mem


def build_step(model, preset: str, mesh, targs):
    """(tx, jitted step, fresh LoRA, optimizer state, context to trace/run in) for one preset
    (``apply_preset``). On a mesh with fsdp=1 the step is the shard_map data-parallel one, else
    GSPMD (as the Trainer)."""
    mem = apply_preset(preset)
    tx = make_optimizer(targs, targs.max_steps)
    lora = model.lora  # host arrays (lora_to_host): placed below as a fresh copy the step may donate
    if mesh is None:
        lora = jax.tree_util.tree_map(jnp.array, lora)
        return tx, make_train_step(tx, **mem), lora, tx.init(lora), contextlib.nullcontext()
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxsloth.sharding import activate, init_opt_state, lora_shardings, opt_state_shardings, shard_lora

    lora = shard_lora(lora, mesh)
    step = make_train_step(tx, **mem,
                           data_parallel=mesh if mesh.shape["fsdp"] == 1 else None,
                           out_shardings=(lora_shardings(lora, mesh), opt_state_shardings(tx, lora, mesh),
                                          NamedSharding(mesh, PartitionSpec())))
    return tx, step, lora, init_opt_state(tx, lora, mesh), activate(mesh)


def loss_sanity(model, path, preset, mesh, targs):
    """Fresh LoRA + AdamW (lr 1e-4, as the torch baselines) on bench/sanity_data.py's token ids."""
    data = np.load(path)
    if data.max() >= model.config.vocab_size:
        raise SystemExit(f"{path}: token id {data.max()} >= vocab_size {model.config.vocab_size} (use --base-id)")
    _, step, lora, opt, ctx = build_step(model, preset, mesh, targs)
    frozen, key, losses = model.replace(lora=None), jax.random.PRNGKey(0), []
    t = time.perf_counter()
    with ctx:
        for i in range(data.shape[0]):
            b = token_batch(data[i][None])
            if mesh is not None:
                from jaxsloth.sharding import shard_batch

                b = shard_batch(b, mesh)
            lora, opt, m = step(lora, opt, frozen, b, key)
            losses.append(float(m["loss"]))
    out = {"shape": list(data.shape), "preset": preset, "losses": [round(x, 4) for x in losses],
           "first": losses[0], "last": losses[-1], "min": min(losses), "mean_last10": float(np.mean(losses[-10:])),
           "finite": bool(np.all(np.isfinite(losses))), "seconds": round(time.perf_counter() - t, 1)}
    print(json.dumps({"sanity": {k: v for k, v in out.items() if k != "losses"}}), flush=True)
    return out


if __name__ == "__main__":
    main()

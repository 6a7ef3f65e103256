"""The ``jaxsloth`` command line: ``demo`` (built-in tiny run), ``train``, ``export``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time


def _demo(args):
    from jaxsloth.demo import run_demo

    run_demo(args.out, steps=args.steps)


def _train(args):
    from jaxsloth.gpu_env import use_whole_gpu

    use_whole_gpu()  # the card and the offload pool, as PyTorch would have them (values set by the user stay)
    import jax

    import jaxsloth
    from convert.export import export_adapter
    from jaxsloth.train import TrainingArguments, train

    t0 = time.perf_counter()
    model, _ = jaxsloth.load_model(args.model, dtype=args.dtype, load_in_4bit=args.load_in_4bit,
                                   max_seq_length=args.max_seq_length, progress=True)
    model = jaxsloth.add_lora(model, r=args.r, lora_alpha=args.lora_alpha, target_modules=args.target_modules,
                              lora_dropout=args.lora_dropout, use_rslora=args.use_rslora, seed=args.seed)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s "
          f"({'NF4' if model.quantized else args.dtype} base, {jax.devices()[0].device_kind})")
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    targs = TrainingArguments(**{k: v for k, v in vars(args).items() if k in fields}, donate_model_lora=True)
    model = train(model, args.data, targs, resume=args.resume)
    adapter = export_adapter(model, f"{args.output_dir}/adapter", overwrite=True)
    summary = {"adapter": str(adapter), "metrics": f"{args.output_dir}/metrics.jsonl",
               "loss_curve": f"{args.output_dir}/loss_curve.png"}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        summary["peak_device_memory_gib"] = round(stats["peak_bytes_in_use"] / 2**30, 2)
    print(json.dumps(summary))


def _add_train_command(sub):
    from jaxsloth.train import SCHEDULES, TrainingArguments

    d = TrainingArguments()
    p = sub.add_parser("train", help="QLoRA/LoRA fine-tuning of a Hugging Face Llama-3 checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face Llama directory (safetensors)")
    p.add_argument("--data", required=True, help="JSON/JSONL/Parquet/CSV file or saved dataset directory")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--load_in_4bit", action="store_true", help="quantize the base to NF4 while loading")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--lora_alpha", type=float, default=16)
    p.add_argument("--lora_dropout", type=float, default=0.0)
    p.add_argument("--use_rslora", action="store_true")
    p.add_argument("--target_modules", nargs="+", default=["q", "k", "v", "o", "gate", "up", "down"])
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "warmup_steps",
                 "logging_steps", "save_steps", "save_total_limit", "seed", "max_seq_length"):
        p.add_argument(f"--{name}", type=int, default=getattr(d, name))
    for name in ("learning_rate", "num_train_epochs", "weight_decay", "max_grad_norm"):
        p.add_argument(f"--{name}", type=float, default=getattr(d, name))
    p.add_argument("--lr_scheduler_type", default=d.lr_scheduler_type, choices=SCHEDULES)
    p.add_argument("--remat", default=d.remat, choices=["none", "full", "offload"],
                   help="activation checkpointing: none (fastest), full (recompute), offload (host RAM)")
    p.add_argument("--remat_group", type=int, default=d.remat_group,
                   help="keep (or offload) the input of every g-th layer only: g-fold less activation memory "
                        "for one more forward recompute per layer")
    p.add_argument("--mlp_chunk", type=int, default=d.mlp_chunk,
                   help="run the MLP over this many tokens at a time (very long sequences)")
    p.add_argument("--loss_chunk", type=int, default=d.loss_chunk,
                   help="tokens per chunk of the fused lm_head + loss (default: 1024 for Llama-3); 256 with "
                        "--mlp_chunk 2048 and --remat offload is the leanest small-batch setting")
    p.add_argument("--layer_unroll", type=int, default=d.layer_unroll,
                   help="unroll the loop over layers this many times; >= the layer count (--remat none only) "
                        "gives straight-line code: 8B bs 1 x 8192 12%% faster steps and 21%% less peak "
                        "memory, for ~2.5x the compile time (default: that with --remat none, else 1)")
    p.add_argument("--packing", action="store_true", help="pack several examples per row")
    p.add_argument("--train_on_responses_only", default=None, type=lambda s: s.lower() in ("1", "true", "yes"),
                   help="loss on responses only (default: on for chat data, off otherwise)")
    p.add_argument("--mesh", default=None,
                   help="device mesh for several GPUs, e.g. data=2,fsdp=1 (sizes multiply to the device count); "
                        "default: all devices on data, or on fsdp when the base is large for one device")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.set_defaults(func=_train)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="jaxsloth", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build a tiny Llama-3 checkpoint and fine-tune it on the CPU (minutes)")
    demo.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")
    demo.set_defaults(func=_demo)
    _add_train_command(sub)
    from convert.export import register_export_command

    register_export_command(sub)
    args = parser.parse_args(argv)
    from jaxsloth.train import TrainingError

    try:
        return args.func(args)
    except (ValueError, OSError, TrainingError) as e:  # bad input, files, training stops: say it plainly
        print(f"jaxsloth {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Compile nf4_mgpu plans on the GPU with Mosaic GPU's SASS/PTX dump on, and count the instructions
of each kernel by opcode (static counts over the whole kernel; the pipeline's loop body is traced
once, so its per-step mix dominates). SASS needs nvdisasm on PATH; the device machine has none
(session 11, run s11_r1), so there only the PTX, ptxas' report and resources come out, and the
counts are of PTX instructions, inline-asm blocks included.

  python bench/diag/mgpu_sass.py --dir <dump dir> --plans "256,128,64,4,1,64+ws" --m 2048 \
      --n 4096 --k 4096

Plans are written as in bench/nf4_mgpu.py. Prints one JSON line per dumped SASS file: its name,
total instructions and the 25 most frequent opcodes.
"""
import argparse
import collections
import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--dir", required=True)
  ap.add_argument("--plans", nargs="+", required=True)
  ap.add_argument("--m", type=int, default=2048)
  ap.add_argument("--n", type=int, default=4096)
  ap.add_argument("--k", type=int, default=4096)
  args = ap.parse_args()
  os.makedirs(args.dir, exist_ok=True)
  os.environ.update(MOSAIC_GPU_DUMP_SASS="1", MOSAIC_GPU_DUMP_PTX="1",
                    MOSAIC_GPU_DUMP_TO=os.path.abspath(args.dir))
  import jax
  import jax.numpy as jnp
  from bench.nf4_mgpu import parse_plan
  from jaxsloth.quant import quantize_nf4
  from pallas_kernels import nf4_mgpu as mod

  w = quantize_nf4(jax.random.normal(jax.random.key(0), (args.n, args.k), jnp.float32) * 0.02)
  for text in args.plans:
    plan, _ = parse_plan(mod, text)
    m = min(args.m, 64) if plan.swap and not plan.gather else args.m
    x = jnp.ones((m, args.k), jnp.bfloat16)
    before = set(os.listdir(args.dir))
    jax.block_until_ready(jax.jit(lambda x, w, plan=plan: mod.nf4_matmul_mgpu(x, w, plan))(x, w))
    new = sorted(set(os.listdir(args.dir)) - before)
    print(json.dumps(dict(plan=text, new_files=new)), flush=True)
  for path in sorted(glob.glob(os.path.join(args.dir, "*"))):
    with open(path, errors="replace") as f:
      text = f.read()
    # SASS lines look like "  /*0a90*/  LOP3.LUT R4, R2, 0xf, RZ, 0xc0, !PT ;"
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", text)
    if not ops and path.endswith(".ptx"):   # PTX: statements split at ";", inline asm included
      ops = re.findall(r"(?:^|[;{])\s*(?:@!?%?\w+\s+)?([a-z][a-z0-9_]*(?:\.[a-z0-9_:]+)*)\s",
                       text, flags=re.M)
      ops = [o for o in ops if not o.startswith(("reg", "loc", "pred", "b32", "b64"))]
    if not ops:
      continue
    base = collections.Counter(o.split(".")[0] for o in ops)
    print(json.dumps(dict(file=os.path.basename(path), total=len(ops),
                          top=base.most_common(25))), flush=True)


if __name__ == "__main__":
  main()

"""Reads bench/nf4_mgpu.py's JSON lines on stdin and prints the timed ones compactly: shape, M, the
impl (a plan as its fields that differ from MgpuPlan's defaults), us per op, ratio to the bf16 dot;
failures as they came."""
import json
import re
import sys

DEFAULTS = dict(tile_m="128", tile_n="128", tile_k="128", stages="4", split="1", chunk="64")


def short(impl: str) -> str:
  if "MgpuPlan(" not in impl:
    return impl
  fields = dict(re.findall(r"(\w+)=(\w+)", impl))
  tail = impl[impl.rindex(")") + 1:]
  keep = [f"{k}={v}" for k, v in fields.items()
          if v not in ("False", "0") and DEFAULTS.get(k) != v and v != "True"]
  flags = [k for k, v in fields.items() if v == "True"]
  return ",".join(keep + flags) + tail


for line in sys.stdin:
  try:
    r = json.loads(line)
  except ValueError:
    print(line.rstrip()[:300])
    continue
  if r.get("kind") == "time":
    print(r["shape"], r["m"], short(r["impl"]), round(r["ms"] * 1e3, 1), round(r["vs_bf16"], 3),
          flush=True)
  elif "failed" in r.get("kind", ""):
    print(json.dumps(r)[:600], flush=True)

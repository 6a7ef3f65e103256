"""Diagnose the interleave + prmt_bf16 mismatch on the GPU: which wrong W would explain the output."""
import dataclasses
import numpy as np
import jax, jax.numpy as jnp
from jaxsloth.quant import quantize_nf4, dequantize_nf4, NF4_CODE
from pallas_kernels import nf4_matmul as mod

n, k, m = 256, 256, 16
w = jax.random.normal(jax.random.key(0), (n, k), jnp.float32) * 0.02
q = quantize_nf4(w)
x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
xf = np.asarray(x, np.float64)
wd = np.asarray(dequantize_nf4(q, jnp.float32), np.float64)        # [n, k]
variants = {"right": wd, "hi/lo swapped": wd.reshape(n, k // 2, 2)[:, :, ::-1].reshape(n, k),
            "both hi": np.repeat(wd[:, 0::2], 2, axis=1), "both lo": np.repeat(wd[:, 1::2], 2, axis=1)}
base = mod.Plan("fused", "xla", decode="prmt_bf16", bn=64, chunk=2, unroll=1, w_lhs=True,
                interleave=True, num_warps=4)
for name, plan in [("interleave bn64 c2", base),
                   ("interleave bn64 c1", dataclasses.replace(base, chunk=1)),
                   ("interleave rhs c1", dataclasses.replace(base, chunk=1, w_lhs=False)),
                   ("interleave prmt", dataclasses.replace(base, decode="prmt")),
                   ("x_split", dataclasses.replace(base, interleave=False, x_split=True))]:
  y = np.asarray(jax.jit(lambda x: mod.nf4_matmul(x, q, plan=plan))(x), np.float64)
  errs = {v: float(np.abs(y - xf @ wv.T).max() / np.abs(xf @ wv.T).max()) for v, wv in variants.items()}
  # per-column error of the right variant: which output rows (N) are wrong
  e = np.abs(y - xf @ wd.T).max(0) / np.abs(xf @ wd.T).max()
  print(name, {k_: round(v, 4) for k_, v in errs.items()}, "bad N rows:", int((e > 0.01).sum()),
        "first:", np.nonzero(e > 0.01)[0][:12].tolist(), flush=True)

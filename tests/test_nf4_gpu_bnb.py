"""Bit-compatibility with bitsandbytes (0.50.2) on an NVIDIA GPU.

Needs torch with CUDA and bitsandbytes (carried to the GPU machine in .whl/site); skipped otherwise.
Run there with XLA_PYTHON_CLIENT_PREALLOCATE=false so that torch and JAX share the card.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
  pytest.skip("needs torch with CUDA", allow_module_level=True)
bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

if jax.default_backend() != "gpu":
  pytest.skip("needs JAX on the GPU", allow_module_level=True)

from convert.bnb import bnb_keys, nf4_from_bnb_tensors  # noqa: E402
from jaxsloth.quant import dequantize_nf4, quantize_nf4  # noqa: E402

pytestmark = pytest.mark.gpu
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _np(t):
  return t.detach().cpu().numpy()


def _mismatch(a, b):
  a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
  return int((a != b).sum()), a.size


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 14336), (192, 320)], ids=str)
def test_quantize_matches_bitsandbytes(dtype, shape):
  torch.manual_seed(sum(shape))
  w = (torch.randn(shape, device="cuda") * 0.02).to(TORCH_DTYPES[dtype])
  qw, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
  _, st_plain = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
  wj = jnp.asarray(_np(w.float())).astype(dtype)
  q = quantize_nf4(wj)
  q_plain = quantize_nf4(wj, double_quant=False)
  report = {
      "codes": _mismatch(q.codes, _np(qw)),
      "absmax_f32": _mismatch(q_plain.absmax, _np(st_plain.absmax)),
      "offset": (float(q.absmax_offset), float(st.offset)),
      "absmax_u8": _mismatch(q.absmax, _np(st.absmax)),
      "nested_absmax": _mismatch(q.nested_absmax, _np(st.state2.absmax)),
  }
  print(f"bnb-compat {dtype} {shape}: {report}")
  # bnb is built with --use_fast_math: its 1/absmax is an approximate reciprocal, which moves a
  # value sitting within an ulp of a decision threshold to the neighbouring code. Measured: 0 such
  # codes for bf16 inputs (whose scaled values are coarse), ~1 per 8M for f32 inputs.
  max_flips = 0 if dtype == "bfloat16" else 4
  assert report["codes"][0] <= max_flips and report["absmax_f32"][0] == 0, report
  # torch's f32 mean (the double-quant offset) sums in a different order than XLA and can land an
  # ulp away; the 8-bit absmax codes stay identical and the nested maxima move by that ulp.
  off_ours, off_bnb = report["offset"]
  assert abs(off_ours - off_bnb) <= 2 * np.spacing(np.float32(off_bnb)), report
  assert report["absmax_u8"][0] == 0, report
  if off_ours == off_bnb:
    assert report["nested_absmax"][0] == 0, report
  else:
    np.testing.assert_allclose(np.asarray(q.nested_absmax), _np(st.state2.absmax), rtol=1e-6)
  # dequantization of bnb's own state through our reader is exact
  t = {"p.weight": _np(qw)}
  t.update({f"p.weight.{k}": _np(v) for k, v in st.as_dict(packed=True).items()})
  r = nf4_from_bnb_tensors("p", t, shape, source="memory")
  ours = np.asarray(dequantize_nf4(r).astype(jnp.float32))      # in the weight's dtype, as bnb
  theirs = _np(F.dequantize_4bit(qw, st).float())
  np.testing.assert_array_equal(ours, theirs)
  ours32 = np.asarray(dequantize_nf4(r, jnp.float32))
  st32 = copy.copy(st)
  st32.dtype = torch.float32
  np.testing.assert_array_equal(ours32, _np(F.dequantize_4bit(qw, st32)))


def test_transformers_bnb_checkpoint_dequantizes_identically(tmp_path):
  transformers = pytest.importorskip("transformers")
  from safetensors import safe_open
  cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=640,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=128)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
  src = tmp_path / "bf16"
  model.save_pretrained(src)
  qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                       bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=torch.bfloat16)
  qmodel = transformers.AutoModelForCausalLM.from_pretrained(src, quantization_config=qc,
                                                             device_map={"": 0})
  dst = tmp_path / "bnb4"
  qmodel.save_pretrained(dst)
  tensors = {}
  for f in sorted(dst.glob("*.safetensors")):
    with safe_open(str(f), framework="pt") as h:
      for k in h.keys():
        tensors[k] = h.get_tensor(k)
  modules = {n: m for n, m in qmodel.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
  assert len(modules) == 7 * cfg.num_hidden_layers
  orig = dict(model.named_parameters())
  n_checked, mismatches = 0, []
  for name, mod in modules.items():
    keys = bnb_keys(name)
    group = {k: _np(tensors[k]) for k in keys}
    shape = (mod.out_features, mod.in_features)
    q = nf4_from_bnb_tensors(name, group, shape, source=str(dst))
    theirs = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
    assert theirs.dtype == torch.bfloat16 and q.dtype == "bfloat16"
    np.testing.assert_array_equal(np.asarray(dequantize_nf4(q).astype(jnp.float32)),
                                  _np(theirs.float()), err_msg=name)
    # and our quantizer, fed the same bf16 weights, writes the same codes and absmax
    w = jnp.asarray(_np(orig[name + ".weight"].float())).astype(jnp.bfloat16)
    ours = quantize_nf4(w)
    codes_bad, _ = _mismatch(ours.codes, group[name + ".weight"])
    abs_bad, _ = _mismatch(ours.absmax, group[name + ".weight.absmax"])
    # codes exact; 8-bit absmax exact unless the f32 mean (offset) lands an ulp away (see above)
    assert codes_bad == 0 and abs_bad <= ours.absmax.size // 10000, (name, codes_bad, abs_bad)
    mismatches.append(abs_bad)
    n_checked += 1
  print(f"bnb checkpoint: {n_checked} Linear4bit modules dequantize identically; our quantizer: "
        f"codes identical, 8-bit absmax mismatches per module {mismatches}")

"""A bitsandbytes "-bnb-4bit" checkpoint loads as NF4, equal to quantizing the 16-bit one on load."""

import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxsloth
from convert.load import load_checkpoint
from convert.bnb import nf4_to_bnb_tensors
from jaxsloth.model import HF_PROJECTION_NAMES
from jaxsloth.quant import quantize_nf4


def _write_bnb_checkpoint(src, dst, double_quant):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    out = {}
    for name, t in tensors.items():
        if any(name.endswith(f"{hf}.weight") for hf in HF_PROJECTION_NAMES.values()):
            q = quantize_nf4(jax.numpy.asarray(t), double_quant=double_quant)
            out.update(nf4_to_bnb_tensors(name[: -len(".weight")], q))
        else:
            out[name] = t
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                  "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": double_quant,
                                  "bnb_4bit_compute_dtype": "bfloat16"}
    (dst / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("double_quant", [True, False])
def test_bnb_checkpoint_equals_quantize_on_load(tiny_checkpoint, tmp_path, double_quant):
    src = tiny_checkpoint("llama3", dtype="bfloat16")
    _write_bnb_checkpoint(src, tmp_path / "bnb", double_quant)
    _, ours, meta = load_checkpoint(src, dtype="bfloat16", load_in_4bit=True, double_quant=double_quant)
    bnb, _ = jaxsloth.load_model(tmp_path / "bnb", dtype="bfloat16")
    assert bnb.quantized == "bnb-4bit" and meta["quantized"] == "nf4-on-load"
    assert bnb.params["layers"]["q"].double_quant == double_quant
    # our quantizer wrote the file: every array read back is identical, nothing was dequantized
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(bnb.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids = np.random.default_rng(0).integers(0, bnb.config.vocab_size, (2, 16))
    np.testing.assert_array_equal(np.asarray(bnb(ids)), np.asarray(bnb.replace(params=ours)(ids)))


def test_bnb_checkpoint_with_missing_quant_state_is_refused(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("llama3", dtype="bfloat16")
    _write_bnb_checkpoint(src, tmp_path / "bnb", True)
    t = load_file(tmp_path / "bnb" / "model.safetensors")
    del t["model.layers.0.self_attn.q_proj.weight.absmax"]
    save_file(t, tmp_path / "bnb" / "model.safetensors")
    with pytest.raises(jaxsloth.CheckpointError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight"):
        jaxsloth.load_model(tmp_path / "bnb")


def test_abstract_model_refuses_bnb_checkpoints(tiny_checkpoint, tmp_path):
    _write_bnb_checkpoint(tiny_checkpoint("llama3", dtype="bfloat16"), tmp_path / "bnb", True)
    with pytest.raises(jaxsloth.CheckpointError, match=r"abstract_checkpoint does not support pre-quantized "
                                                         r"bitsandbytes checkpoints"):
        jaxsloth.abstract_model(tmp_path / "bnb")

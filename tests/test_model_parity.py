"""Logits parity of jaxsloth's Llama with transformers.LlamaForCausalLM (PyTorch, CPU)."""

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

import jaxsloth

PRESETS = ["llama3", "llama3.1", "llama3.2", "odd"]


def _batch(vocab, rng, batch=3, seq=37):
    ids = rng.integers(0, vocab, size=(batch, seq))
    mask = np.ones((batch, seq), np.int64)
    mask[1, 29:] = 0  # right padding
    mask[2, 11:] = 0
    return ids, mask


def _torch_logits(path, ids, mask, dtype=torch.float32):
    ref = LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()
    with torch.no_grad():
        return ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()


@pytest.mark.parametrize("preset", PRESETS)
def test_f32_logits_match_transformers(tiny_checkpoint, preset):
    path = tiny_checkpoint(preset)
    model, _ = jaxsloth.load_model(path, dtype="float32")
    ids, mask = _batch(model.config.vocab_size, np.random.default_rng(0))
    ours = np.asarray(model(ids, mask))
    ref = _torch_logits(path, ids, mask)
    real = mask.astype(bool)  # padded positions are not compared: nothing uses their logits
    rel = np.abs(ours - ref)[real].max() / np.abs(ref[real]).max()
    assert rel <= 1e-5, f"{preset}: max|diff|/max|ref| = {rel:.2e}"


def test_long_sequence_exercises_llama31_scaling(tiny_checkpoint):
    # original_max_position_embeddings is 64 in the tiny 3.1 preset: positions past it hit the scaled band
    path = tiny_checkpoint("llama3.1")
    model, _ = jaxsloth.load_model(path, dtype="float32")
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, size=(1, 200))
    mask = np.ones_like(ids)
    ours = np.asarray(model(ids, mask))
    ref = _torch_logits(path, ids, mask)
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-5


def test_bf16_logits_within_bf16_tolerance(tiny_checkpoint):
    path = tiny_checkpoint("llama3", dtype="bfloat16")
    model, _ = jaxsloth.load_model(path, dtype="bfloat16")
    ids, mask = _batch(model.config.vocab_size, np.random.default_rng(2))
    ours = np.asarray(model(ids, mask))
    ref = _torch_logits(path, ids, mask, dtype=torch.float32)  # f32 compute on the same bf16 weights
    real = mask.astype(bool)
    rel = np.abs(ours - ref)[real].max() / np.abs(ref[real]).max()
    # bf16 has an 8-bit mantissa (eps 2^-8 = 3.9e-3); a few layers of rounding stay within a few eps
    assert rel <= 3e-2, rel
    assert rel > 0, "bf16 compute should differ from the f32 reference somewhere"


def test_sharded_and_single_file_checkpoints_load_identically(tiny_checkpoint):
    single, _ = jaxsloth.load_model(tiny_checkpoint("llama3"), dtype="float32")
    sharded, _ = jaxsloth.load_model(tiny_checkpoint("llama3", shard_bytes=60_000), dtype="float32")
    ids = np.arange(20)[None] % single.config.vocab_size
    np.testing.assert_array_equal(np.asarray(single(ids)), np.asarray(sharded(ids)))


@pytest.mark.parametrize("preset", ["llama3", "odd"])
def test_pallas_kernel_path_matches_transformers(tiny_checkpoint, preset):
    """implementation="pallas" (interpreted on CPU): RMSNorm, the model's RoPE variant (half tables,
    aliased outputs) and, with NF4, the dispatch's kernels give the same logits as transformers /
    the XLA path, padding included."""
    path = tiny_checkpoint(preset)
    model, _ = jaxsloth.load_model(path, dtype="float32")
    ids, mask = _batch(model.config.vocab_size, np.random.default_rng(3))
    ours = np.asarray(model.replace(implementation="pallas")(ids, mask))
    ref = _torch_logits(path, ids, mask)
    real = mask.astype(bool)
    rel = np.abs(ours - ref)[real].max() / np.abs(ref[real]).max()
    assert rel <= 1e-5, f"{preset}: max|diff|/max|ref| = {rel:.2e}"
    if preset == "odd":  # its in-features (200) are not a multiple of NF4's block of 64
        return
    q4, _ = jaxsloth.load_model(path, dtype="float32", load_in_4bit=True)
    a = np.asarray(q4.replace(implementation="pallas")(ids, mask))[real]
    b = np.asarray(q4.replace(implementation="xla")(ids, mask))[real]
    assert np.abs(a - b).max() / np.abs(b).max() <= 1e-5

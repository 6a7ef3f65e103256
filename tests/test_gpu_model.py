"""GPU-only: the model and a training step with the GPU defaults (Pallas kernels, cuDNN attention,
NF4 kernels) against the XLA reference path on the same weights. Skipped without a GPU."""

import jax
import numpy as np
import pytest

import jaxsloth
from jaxsloth.train import accumulated_loss_and_grads

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_gpu_defaults_match_the_xla_path(tiny_checkpoint, load_in_4bit):
    path = tiny_checkpoint("llama3", dtype="bfloat16", overrides=dict(hidden_size=256, intermediate_size=512,
                                                                        num_attention_heads=2, num_key_value_heads=1))
    model, _ = jaxsloth.load_model(path, dtype="bfloat16", load_in_4bit=load_in_4bit)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 256))
    fast = np.asarray(model(ids))                                # cuDNN attention + default kernels
    ref = np.asarray(model.replace(implementation="xla")(ids, np.ones_like(ids)))  # XLA attention + kernels
    assert np.abs(fast - ref).max() / np.abs(ref).max() <= 3e-2


@pytest.mark.parametrize("memory", [dict(remat="full"), dict(remat="none", layer_unroll=4)],
                         ids=["full", "none_unrolled"])
def test_gpu_training_step_matches_the_xla_path(tiny_checkpoint, memory):
    path = tiny_checkpoint("llama3", dtype="bfloat16", overrides=dict(hidden_size=256, intermediate_size=512,
                                                                        num_attention_heads=2, num_key_value_heads=1))
    model, _ = jaxsloth.load_model(path, dtype="bfloat16", load_in_4bit=True)
    model = jaxsloth.add_lora(model, r=8)
    model = model.replace(lora=jax.tree_util.tree_map(lambda x: x + 0.01, model.lora))
    rng = np.random.default_rng(1)
    ids = rng.integers(0, model.config.vocab_size, (1, 2, 257)).astype(np.int32)
    batch = {"input_ids": ids[..., :-1], "labels": ids[..., 1:],
             "segment_ids": np.ones((1, 2, 256), np.int32),
             "position_ids": np.broadcast_to(np.arange(256, dtype=np.int32), (1, 2, 256)).copy()}
    key = jax.random.PRNGKey(0)
    l1, _, g1 = accumulated_loss_and_grads(model.replace(lora=None), model.lora, batch, key, **memory)
    l2, _, g2 = accumulated_loss_and_grads(model.replace(lora=None, implementation="xla"), model.lora, batch, key)
    assert np.isfinite(float(l1)) and abs(float(l1) - float(l2)) / float(l2) <= 2e-2
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 0.1 * np.abs(np.asarray(b)).max() + 1e-6

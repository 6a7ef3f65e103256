"""Memory presets change what is saved, never the numbers: remat, layer groups, MLP chunking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsloth
from jaxsloth import model as llama


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    m, _ = jaxsloth.load_model(tiny_checkpoint("llama3"), dtype="float32")
    m = jaxsloth.add_lora(m, r=4, lora_alpha=8)
    keys = jax.random.split(jax.random.PRNGKey(3), len(m.lora))
    return m.replace(lora={n: {"a": ab["a"], "b": 0.1 * jax.random.normal(k, ab["b"].shape)}
                           for k, (n, ab) in zip(keys, m.lora.items())})


def _loss_and_grads(model, ids, **kw):
    def loss(lora):
        h = llama.hidden_states(model.config, model.params, ids, lora=lora, lora_scaling=model.lora_scaling,
                                dtype=jnp.float32, **kw)
        return jnp.sum(h * jnp.cos(jnp.arange(h.shape[-1])))  # a loss that weighs every hidden unit

    return jax.jit(jax.value_and_grad(loss))(model.lora)


@pytest.mark.parametrize("kw", [
    dict(remat="full"),
    dict(remat="offload"),
    dict(remat="full", remat_group=2),
    dict(remat="offload", remat_group=2),
    dict(mlp_chunk=16),              # 37 tokens: two full chunks and a padded one
    dict(remat="full", mlp_chunk=8),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_preset_gives_the_same_loss_and_lora_gradients(model, kw):
    ids = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 37)))
    ref_loss, ref = _loss_and_grads(model, ids)
    loss, grads = _loss_and_grads(model, ids, **kw)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref)):
        assert np.abs(np.asarray(g) - np.asarray(r)).max() <= 1e-5 * np.abs(np.asarray(r)).max()


def test_bad_remat_group_is_refused(model):
    ids = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="remat_group must"):
        llama.hidden_states(model.config, model.params, ids, remat="full", remat_group=3)
    with pytest.raises(ValueError, match="remat_group must"):
        llama.hidden_states(model.config, model.params, ids, remat="none", remat_group=2)

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
    dict(layer_unroll=2),            # a scan unrolled twice
    dict(layer_unroll=64),           # a Python loop over the layers
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
    with pytest.raises(ValueError, match="layer_unroll must"):
        llama.hidden_states(model.config, model.params, ids, layer_unroll=0)
    with pytest.raises(ValueError, match=r"layer_unroll must .* unless remat='none'"):
        llama.hidden_states(model.config, model.params, ids, remat="full", layer_unroll=2)


@pytest.mark.parametrize("with_mask", ["none", "padding", "packed"])
def test_blockwise_attention_equals_dense(with_mask):
    # GQA (6 query heads over 2 KV heads), 37 tokens in tiles of 8 (a padded last tile)
    b, s, n, m, h = 2, 37, 6, 2, 16
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v = (jax.random.normal(key, (b, s, heads, h)) for key, heads in ((kq, n), (kk, m), (kv, m)))
    mask = seg = None
    if with_mask == "padding":
        mask = jnp.asarray(np.arange(s)[None] < np.array([[37], [20]]))
    if with_mask == "packed":
        seg = jnp.asarray(np.repeat([[1, 2, 3, 0], [1, 1, 2, 0]], [10, 12, 9, 6], axis=1))
    dout = jax.random.normal(kd, q.shape)
    rows = np.ones((b, s), bool) if mask is None else np.asarray(mask)  # padded queries: no defined output

    def run(fn):
        out, vjp = jax.vjp(lambda *x: fn(*x, mask, seg), q, k, v)
        return np.asarray(out)[rows], [np.asarray(g) for g in vjp(dout * jnp.asarray(rows)[..., None, None])]

    dense = run(lambda q_, k_, v_, a, sg: llama.attention(q_, k_, v_, a, sg))
    blocked = run(lambda q_, k_, v_, a, sg: llama.blockwise_attention(q_, k_, v_, a, sg, block=8))
    np.testing.assert_allclose(blocked[0], dense[0], rtol=1e-5, atol=1e-5)
    for g_blk, g_dense in zip(blocked[1], dense[1]):
        np.testing.assert_allclose(g_blk, g_dense, rtol=1e-4, atol=1e-5)


def test_long_packed_rows_take_the_blockwise_path(model, monkeypatch):
    # past BLOCKWISE_FROM an explicit mask must not build [S, S] scores; shrink the threshold to see it
    monkeypatch.setattr(llama, "BLOCKWISE_FROM", 16)
    monkeypatch.setattr(llama, "ATTENTION_BLOCK", 8)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, model.config.vocab_size, (1, 40)))
    seg = jnp.asarray(np.repeat([[1, 2]], [25, 15], axis=1))
    pos = jnp.asarray(np.concatenate([np.arange(25), np.arange(15)])[None])
    packed = np.asarray(model(ids, position_ids=pos, segment_ids=seg))
    alone = np.asarray(model(ids[:, 25:]))  # 15 tokens: the dense path
    np.testing.assert_allclose(packed[0, 25:], alone[0], rtol=1e-5, atol=1e-5 * np.abs(alone).max())


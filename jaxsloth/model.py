"""The Llama-3 forward pass, top to bottom, as pure functions over a params pytree.

Dimension letters: B batch, S sequence, D hidden, N query heads, M key/value heads,
H head dim, I intermediate, V vocab, L decoder layers, R LoRA rank.

Params (HF layout for every projection, W [out, in], so NF4 blocks match bitsandbytes):
    embed       [V, D]
    layers      {attn_norm [L, D], mlp_norm [L, D],
                 q [L, N*H, D], k [L, M*H, D], v [L, M*H, D], o [L, D, N*H],
                 gate [L, I, D], up [L, I, D], down [L, D, I]}   (arrays or stacked NF4)
    final_norm  [D]
    lm_head     [V, D]   (absent when tie_word_embeddings: the embedding is reused)
LoRA (trainable, f32, separate pytree so ``jax.grad`` never sees the base):
    {"q": {"a": [L, R, in], "b": [L, out, R]}, ...} for the targeted projections only.

Decoder layers run under ``jax.lax.scan`` so compile time does not grow with depth; the scan
body is wrapped in ``jax.checkpoint`` with a name-based policy chosen by ``remat``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxsloth.config import LlamaConfig
from jaxsloth.quant import NF4
from jaxsloth.sharding import constrain_heads, constrain_layer, constrain_rows, constrain_split, sequence_split
from pallas_kernels.nf4_matmul import nf4_matmul
from pallas_kernels.rmsnorm import rmsnorm
from pallas_kernels.rope import MODEL_VARIANT, VARIANTS, apply_rope, model_implementation, rope_tables

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
# HF module path of each projection inside a decoder layer (used by convert/ and export).
HF_PROJECTION_NAMES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}

# Remat presets: which named activations a decoder layer keeps for the backward pass.
#   "none":    no jax.checkpoint at all (fastest when memory is plentiful);
#   "full":    save only each layer's input, recompute the rest (Unsloth-style recompute);
#   "offload": like "full" but the saved layer inputs live in pinned host memory (long context).
REMAT_PRESETS = ("none", "full", "offload")


def _precision(dtype) -> jax.lax.Precision | None:
    # f32 runs are the parity reference: ask for true f32 matmuls (no TF32 on GPU).
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def linear(x, w, lora_ab=None, lora_scaling: float = 1.0, *, impl: str | None = None,
           dropout_rate: float = 0.0, dropout_key=None):
    """y = x @ W.T (+ scaling * (drop(x) @ A.T) @ B.T). W is a dense array or NF4; A, B are f32 adapters.

    LoRA dropout (as PEFT) applies to the adapter's input only, and only when a key is given.
    """
    if isinstance(w, NF4):
        y = nf4_matmul(x, w, implementation=impl)
    else:
        y = jnp.einsum("...k,nk->...n", x, w.astype(x.dtype), precision=_precision(x.dtype))
    if lora_ab is not None:
        a = lora_ab["a"].astype(x.dtype)
        b = lora_ab["b"].astype(x.dtype)
        if dropout_key is not None and dropout_rate > 0.0:
            keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, x.shape)
            x = jnp.where(keep, x / (1.0 - dropout_rate), 0).astype(x.dtype)
        xa = jnp.einsum("...k,rk->...r", x, a, precision=_precision(x.dtype))
        y = y + (lora_scaling * jnp.einsum("...r,nr->...n", xa, b, precision=_precision(x.dtype))).astype(y.dtype)
    return y


def causal_mask(attention_mask, segment_ids, seq_len: int):
    """Boolean [B, 1, S, S] mask: causal, keys that are real tokens, and same packed segment."""
    causal = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))[None, None]
    mask = causal
    if attention_mask is not None:
        mask = mask & attention_mask.astype(bool)[:, None, None, :]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return mask


# Beyond this length an explicit mask (packing, padding) no longer takes the dense XLA path, whose
# [B, N, S, S] f32 scores grow quadratically (8B at 16K tokens: 32 GiB per row), but the blockwise one.
BLOCKWISE_FROM = 4096
ATTENTION_BLOCK = 512


def attention(q, k, v, attention_mask=None, segment_ids=None, *, attn_impl: str = "xla"):
    """Causal GQA attention. q [B,S,N,H], k/v [B,S,M,H] -> [B,S,N,H]. Softmax in f32.

    ``attention_mask`` [B, S] marks real keys, ``segment_ids`` [B, S] packed examples. With neither,
    plain causal attention: cuDNN flash attention on GPU. cuDNN's public API has no segment ids,
    so an explicit mask takes the dense XLA path (short rows) or ``blockwise_attention`` (long rows).
    """
    b, s, n, h = q.shape
    m = k.shape[2]
    if attn_impl == "cudnn" and attention_mask is None and segment_ids is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    if s > BLOCKWISE_FROM:
        return blockwise_attention(q, k, v, attention_mask, segment_ids, block=ATTENTION_BLOCK)
    mask = causal_mask(attention_mask, segment_ids, s)
    qg = q.reshape(b, s, m, n // m, h)
    scores = jnp.einsum("bsmgh,btmh->bmgst", qg, k, precision=_precision(q.dtype),
                        preferred_element_type=jnp.float32) * (h ** -0.5)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bmgst,btmh->bsmgh", probs, v, precision=_precision(q.dtype))
    return out.reshape(b, s, n, h)


def blockwise_attention(q, k, v, attention_mask=None, segment_ids=None, *, block: int = ATTENTION_BLOCK):
    """Causal GQA attention in [block x block] tiles with an online softmax (flash-style, in XLA).

    Scores exist one tile at a time ([B, N, block, block] f32); key tiles after the query tile are
    skipped (``lax.cond``), and each query tile is a ``jax.checkpoint`` so the backward recomputes
    its tiles instead of keeping them. Queries with no visible key (padding rows) give 0.
    """
    b, s, n, h = q.shape
    m = k.shape[2]
    g = n // m
    nb = -(-s // block)
    pad = nb * block - s
    valid = jnp.ones((b, s), bool) if attention_mask is None else attention_mask.astype(bool)
    seg = jnp.zeros((b, s), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        valid = jnp.pad(valid, ((0, 0), (0, pad)))
        seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=-1)
    qb = q.reshape(b, nb, block, m, g, h)
    kb = k.reshape(b, nb, block, m, h)
    vb = v.reshape(b, nb, block, m, h)
    valid_b = valid.reshape(b, nb, block)
    seg_b = seg.reshape(b, nb, block)
    scale = h ** -0.5
    prec = _precision(q.dtype)
    offsets = jnp.arange(block)

    def query_tile(i):
        qi, seg_q = qb[:, i], seg_b[:, i]

        def key_tile(carry, j):
            def visit(carry):
                o, mx, l = carry
                sc = jnp.einsum("bqmgh,bkmh->bmgqk", qi, kb[:, j], precision=prec,
                                preferred_element_type=jnp.float32) * scale
                ok = ((i * block + offsets)[:, None] >= (j * block + offsets)[None, :])[None]
                ok = ok & valid_b[:, j][:, None, :] & (seg_q[:, :, None] == seg_b[:, j][:, None, :])
                ok = ok[:, None, None]  # [B, 1, 1, q, k]
                mnew = jnp.maximum(mx, jnp.max(jnp.where(ok, sc, -jnp.inf), axis=-1))
                safe = jnp.where(jnp.isfinite(mnew), mnew, 0.0)
                p = jnp.where(ok, jnp.exp(sc - safe[..., None]), 0.0)
                corr = jnp.where(jnp.isfinite(mx), jnp.exp(mx - safe), 0.0)
                pv = jnp.einsum("bmgqk,bkmh->bmgqh", p.astype(v.dtype), vb[:, j], precision=prec,
                                preferred_element_type=jnp.float32)
                return o * corr[..., None] + pv, mnew, l * corr + p.sum(-1)

            return jax.lax.cond(j <= i, visit, lambda c: c, carry), None

        init = (jnp.zeros((b, m, g, block, h), jnp.float32), jnp.full((b, m, g, block), -jnp.inf, jnp.float32),
                jnp.zeros((b, m, g, block), jnp.float32))
        (o, _, l), _ = jax.lax.scan(key_tile, init, jnp.arange(nb))
        out = o / jnp.where(l > 0, l, 1.0)[..., None]
        return out.transpose(0, 3, 1, 2, 4).astype(q.dtype)  # [B, block, M, G, H]

    tiles = jax.lax.map(jax.checkpoint(query_tile), jnp.arange(nb))  # [nb, B, block, M, G, H]
    return tiles.transpose(1, 0, 2, 3, 4, 5).reshape(b, nb * block, n, h)[:, :s]


def decoder_layer(cfg: LlamaConfig, x, layer, lora, cos, sin, attention_mask, segment_ids, dropout_key=None, *,
                  lora_scaling, impl, attn_impl, lora_dropout=0.0, mlp_chunk: int | None = None):
    """One pre-norm decoder block. x [B, S, D] in the compute dtype.

    ``mlp_chunk`` runs the MLP over the sequence in chunks of that many tokens, each under
    ``jax.checkpoint``: the [B, S, I] intermediates (3.5x the hidden states for Llama-3) then
    exist one chunk at a time, in the forward and in the backward, for very long context.
    """
    b, s, _ = x.shape
    lora = lora or {}

    def proj(name, inp, chunk=None):
        key = None
        if dropout_key is not None:
            key = jax.random.fold_in(dropout_key, PROJECTIONS.index(name))
            key = key if chunk is None else jax.random.fold_in(key, chunk)
        return linear(inp, layer[name], lora.get(name), lora_scaling, impl=impl, dropout_rate=lora_dropout,
                      dropout_key=key)

    h = rmsnorm(x, layer["attn_norm"], cfg.rms_norm_eps, implementation=impl)
    q = proj("q", h).reshape(b, s, cfg.num_attention_heads, cfg.head_dim)
    k = proj("k", h).reshape(b, s, cfg.num_key_value_heads, cfg.head_dim)
    v = proj("v", h).reshape(b, s, cfg.num_key_value_heads, cfg.head_dim)
    q, k = apply_rope(q, k, cos, sin, implementation=model_implementation(impl),
                      config=VARIANTS[MODEL_VARIANT])
    q, k, v = constrain_heads(q), constrain_heads(k), constrain_heads(v)  # no-ops unless FSDP splits S
    attn = constrain_rows(attention(q, k, v, attention_mask, segment_ids, attn_impl=attn_impl))
    attn = attn.reshape(b, s, cfg.q_dim)
    x = x + proj("o", attn)

    h = rmsnorm(x, layer["mlp_norm"], cfg.rms_norm_eps, implementation=impl)

    def mlp(hc, chunk=None):
        return proj("down", jax.nn.silu(proj("gate", hc, chunk)) * proj("up", hc, chunk), chunk)

    if not mlp_chunk or s <= mlp_chunk:
        return x + mlp(h)
    # nd devices hold S/nd tokens each when FSDP splits the sequence (else nd = 1): chunk i takes
    # tokens [i*c, (i+1)*c) of every device's part, so each device works on its own tokens
    nd = sequence_split(b, s)
    local = s // nd
    n = -(-local // mlp_chunk)
    hp = jnp.pad(h.reshape(b, nd, local, -1), ((0, 0), (0, 0), (0, n * mlp_chunk - local), (0, 0)))
    chunks = hp.reshape(b, nd, n, mlp_chunk, -1).transpose(2, 0, 1, 3, 4)  # [n, B, nd, c, D]
    if nd > 1:
        chunks = constrain_split(chunks, 2)
    out = jax.lax.map(lambda xs: jax.checkpoint(mlp)(*xs), (chunks, jnp.arange(n)))
    out = out.transpose(1, 2, 0, 3, 4).reshape(b, nd, n * mlp_chunk, -1)[:, :, :local]
    return x + out.reshape(b, s, -1)


def _remat_policy(remat: str):
    names = ("layer_input",)
    if remat == "full":
        return jax.checkpoint_policies.save_only_these_names(*names)
    if remat == "offload":
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=(), names_which_can_be_offloaded=names,
            offload_src="device", offload_dst="pinned_host")
    raise ValueError(f"remat must be one of {REMAT_PRESETS}, got {remat!r}")


def hidden_states(cfg: LlamaConfig, params, input_ids, attention_mask=None, position_ids=None,
                  segment_ids=None, lora=None, *, lora_scaling: float = 1.0, dtype=jnp.bfloat16,
                  impl: str | None = None, attn_impl: str = "xla", remat: str = "none", remat_group: int = 1,
                  mlp_chunk: int | None = None, lora_dropout: float = 0.0, dropout_key=None,
                  layer_unroll: int | None = 1):
    """Final-normed hidden states [B, S, D] (the input of lm_head).

    ``attention_mask`` [B, S] marks real tokens; with right padding only it may be left None,
    since causal attention never lets a real token see the padding after it.
    ``remat_group`` g > 1 keeps (or offloads) the input of every g-th layer only: layers run in
    groups of g, each group under ``jax.checkpoint`` and each layer inside it again, so the saved
    activations shrink g-fold for one more forward recompute per layer (beyond ~350K tokens the
    offloaded layer inputs of an 8B model no longer fit 128 GB of host RAM at g=1).
    ``layer_unroll`` u unrolls the scan over layers (groups) u-fold (``jax.lax.scan(unroll=u)``);
    u > 1 and >= the number of layers (groups), remat="none" only, replaces the scan by a Python
    loop: straight-line code, no stacked per-layer residual buffers filled by dynamic-update-slice,
    for a longer compile. None: straight-line with remat="none" (8B on an H100: ~12% faster steps
    and less memory for ~2.5x the compile time, bench/RESULTS.md), else 1.
    """
    bsz, seq = input_ids.shape
    if position_ids is None:
        position_ids = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (bsz, seq))
    cos, sin = rope_tables(position_ids, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict)
    x = jnp.take(params["embed"], input_ids, axis=0).astype(dtype)
    layer_fn = functools.partial(decoder_layer, cfg, lora_scaling=lora_scaling, impl=impl, attn_impl=attn_impl,
                                 lora_dropout=lora_dropout, mlp_chunk=mlp_chunk)
    L = cfg.num_hidden_layers
    layer_keys = None if dropout_key is None else jax.random.split(dropout_key, L)
    xs = (params["layers"], lora, layer_keys)

    consts = (cos, sin, attention_mask, segment_ids)

    def layer_step(carry, xs, consts):
        layer, layer_lora, key = xs
        # under a mesh (jaxsloth.sharding.activate): FSDP gathers this layer's 4-bit leaves, not the
        # dequantized weights, and activations stay split by rows; no-ops without a mesh
        layer, layer_lora = constrain_layer((layer, layer_lora))
        out = layer_fn(constrain_rows(carry), layer, layer_lora, *consts, key)
        return constrain_rows(out), None

    if remat_group < 1 or (remat_group > 1 and (remat == "none" or L % remat_group)):
        raise ValueError(f"remat_group must be >= 1, divide num_hidden_layers ({L}) and come with remat "
                         f"'full' or 'offload'; got remat_group={remat_group}, remat={remat!r}")
    if remat_group > 1:
        inner = jax.checkpoint(layer_step, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
        xs = jax.tree_util.tree_map(lambda a: a.reshape(L // remat_group, remat_group, *a.shape[1:]), xs)

        def step(carry, group, consts):
            body = lambda c, g: inner(c, g, consts)  # noqa: E731
            return jax.lax.scan(body, checkpoint_name(carry, "layer_input"), group)[0], None
    else:
        def step(carry, layer_xs, consts):
            return layer_step(checkpoint_name(carry, "layer_input"), layer_xs, consts)

    steps = L // remat_group
    if layer_unroll is None:
        layer_unroll = max(2, steps) if remat == "none" else 1
    straight = layer_unroll > 1 and layer_unroll >= steps
    if layer_unroll < 1 or (straight and remat != "none"):
        # In straight-line code nothing orders a layer's backward recompute after the cotangent that
        # reaches it, and XLA runs the recomputes early: every activation is held, as with "none"
        # (8B, bs 2 x 2048: 24.8 GiB of temporaries with "full" as with "none"; bench/RESULTS.md).
        raise ValueError(f"layer_unroll must be >= 1, and 1 or below the number of scan steps ({steps}) "
                         f"unless remat='none'; got layer_unroll={layer_unroll}, remat={remat!r}")
    if remat != "none":
        step = jax.checkpoint(step, policy=_remat_policy(remat), prevent_cse=False)
    if straight:
        # Straight-line code: each layer's residuals are buffers of their own (no stacking by
        # dynamic-update-slice, no loop-carry copies). Each step is one jitted function, traced once
        # and lowered once (its Pallas kernels too) and called per layer; XLA inlines the calls.
        step_fn = jax.jit(step)
        for i in range(steps):
            x, _ = step_fn(x, jax.tree_util.tree_map(lambda a: a[i], xs), consts)
    else:
        x, _ = jax.lax.scan(lambda c, layer_xs: step(c, layer_xs, consts), x, xs, unroll=layer_unroll)
    return rmsnorm(x, params["final_norm"], cfg.rms_norm_eps, implementation=impl)


def lm_head_weight(cfg: LlamaConfig, params):
    return params["embed"] if cfg.tie_word_embeddings else params["lm_head"]


def logits(cfg: LlamaConfig, params, input_ids, attention_mask=None, position_ids=None, segment_ids=None,
           lora=None, *, lora_scaling: float = 1.0, dtype=jnp.bfloat16, impl: str | None = None,
           attn_impl: str = "xla") -> Any:
    """Logits [B, S, V] in f32 (computed with f32 accumulation from compute-dtype inputs)."""
    h = hidden_states(cfg, params, input_ids, attention_mask, position_ids, segment_ids, lora,
                      lora_scaling=lora_scaling, dtype=dtype, impl=impl, attn_impl=attn_impl)
    w = lm_head_weight(cfg, params).astype(dtype)
    return jnp.einsum("bsd,vd->bsv", h, w, precision=_precision(dtype), preferred_element_type=jnp.float32)

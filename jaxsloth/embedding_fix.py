"""The untrained-token fix: give never-trained embedding rows the mean of the trained ones.

Llama-3 base ships rows that pre-training never updated (the reserved special tokens,
<|eot_id|>, the chat header tokens: 287 rows in 8B base). Their embedding is ~0 and their
lm_head row is ~0 (Llama-3) or one vector shared by all of them (Llama-3.1). Fine-tuning on a
chat template that uses them then starts from a degenerate input and a degenerate output row,
and the loss can blow up. The fix writes the mean of the trained rows into those rows, in
``embed_tokens`` and in ``lm_head`` (once when they are tied), before training; exports carry the
fixed rows (``model.fixed_token_ids`` records which).

Dims: V vocab rows, D hidden.

A row is untrained when
  - max_d |embed[v, d]| <= eps (1e-16), and
  - its lm_head row (untied models) is also <= eps, or is bit-identical to the lm_head row of
    another embed-untrained token (the Llama-3.1 pattern: identical, non-zero rows);
  - and it is not bos / eos / pad (of the config or the tokenizer): those are never touched.
The mean is computed in f32 over the trained rows only (untrained rows are excluded, not
averaged in as zeros) and written back in the matrix's own dtype.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["UNTRAINED_EPS", "find_untrained_tokens", "apply_untrained_token_fix", "untrained_tokens_used",
           "protected_token_ids"]

UNTRAINED_EPS = 1e-16


def protected_token_ids(cfg, tokenizer=None) -> set[int]:
    """bos/eos/pad ids from the config and the tokenizer: never treated as untrained."""
    ids: set[int] = set()
    for value in (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id):
        if value is None:
            continue
        ids.update(int(v) for v in (value if isinstance(value, (tuple, list)) else (value,)))
    if tokenizer is not None:
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tokenizer, attr, None)
            if isinstance(value, int):
                ids.add(value)
    return ids


@jax.jit
def _row_absmax(w):
    return jnp.max(jnp.abs(w), axis=1).astype(jnp.float32)


def _near_zero_rows(w, eps: float) -> np.ndarray:
    """Boolean [V]: rows whose max |value| is <= eps."""
    return np.asarray(_row_absmax(w)) <= eps


def _rows_shared(rows: np.ndarray) -> np.ndarray:
    """Boolean [n]: rows bit-identical to at least one other row of ``rows`` [n, D]."""
    if len(rows) < 2:
        return np.zeros(len(rows), bool)
    flat = np.ascontiguousarray(rows).view(np.uint8).reshape(len(rows), -1)
    _, inverse, counts = np.unique(flat, axis=0, return_inverse=True, return_counts=True)
    return counts[inverse.reshape(-1)] >= 2


def find_untrained_tokens(cfg, params, tokenizer=None, *, eps: float = UNTRAINED_EPS) -> list[int]:
    """Sorted token ids whose embedding (and lm_head) rows were never trained (see module doc).

    ``params`` is the model's params pytree (``params["embed"]`` [V, D], ``params["lm_head"]``
    [V, D] when untied). Only a [V] vector of row maxima and the candidate rows leave the device.
    """
    embed = params["embed"]
    candidates = np.flatnonzero(_near_zero_rows(embed, eps))
    if not cfg.tie_word_embeddings and len(candidates):
        head = params["lm_head"]
        head_zero = _near_zero_rows(head, eps)[candidates]
        # Llama-3.1: the lm_head rows of untrained tokens are one shared non-zero vector
        head_rows = np.asarray(jnp.take(head, jnp.asarray(candidates), axis=0))
        candidates = candidates[head_zero | _rows_shared(head_rows)]
    protected = protected_token_ids(cfg, tokenizer)
    return [int(t) for t in candidates if int(t) not in protected]


@jax.jit
def _write_mean(w, untrained_mask):
    # zero-weighting the untrained rows through `where` == "zero them, then sum": f32 sum of the rest
    total = jnp.sum(w, axis=0, dtype=jnp.float32, where=~untrained_mask[:, None])
    mean = total / (w.shape[0] - jnp.sum(untrained_mask))
    return jnp.where(untrained_mask[:, None], mean.astype(w.dtype)[None, :], w)


def apply_untrained_token_fix(model, token_ids: Iterable[int] | None = None, *, eps: float = UNTRAINED_EPS):
    """Write the mean trained row into the untrained rows of embed (and lm_head). Returns ``(model, fixed_ids)``.

    ``token_ids`` None finds them with :func:`find_untrained_tokens`; an explicit list is used as
    given (bos/eos/pad are still refused). ``fixed_ids`` is the sorted tuple this call changed
    (empty when nothing needed fixing, e.g. a second call); the returned model's
    ``fixed_token_ids`` is the union with the ids fixed before, so exports carry all of them.
    The input model's arrays are not modified.
    """
    cfg, params = model.config, model.params
    vocab = params["embed"].shape[0]
    if token_ids is None:
        ids = find_untrained_tokens(cfg, params, model.tokenizer, eps=eps)
    else:
        ids = sorted({int(t) for t in token_ids})
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"apply_untrained_token_fix: token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        protected = sorted(set(ids) & protected_token_ids(cfg, model.tokenizer))
        if protected:
            raise ValueError(f"apply_untrained_token_fix: token ids {protected} are bos/eos/pad, which are never "
                             "treated as untrained")
    if not ids:
        return model, ()
    if len(ids) >= vocab:
        raise ValueError("apply_untrained_token_fix: every row looks untrained; is this a freshly zeroed model?")

    mask = np.zeros(vocab, bool)
    mask[ids] = True
    mask = jnp.asarray(mask)
    new_params = dict(params)
    new_params["embed"] = _write_mean(params["embed"], mask)
    if not cfg.tie_word_embeddings:
        new_params["lm_head"] = _write_mean(params["lm_head"], mask)
    fixed = tuple(ids)
    all_fixed = tuple(sorted(set(model.fixed_token_ids) | set(fixed)))
    return model.replace(params=new_params, fixed_token_ids=all_fixed), fixed


def untrained_tokens_used(token_ids_used: Iterable[int] | np.ndarray, untrained_ids: Iterable[int]) -> list[int]:
    """The untrained ids that occur in ``token_ids_used`` (e.g. the tokenized dataset or chat template).

    A non-empty result means the fix must be applied before training on that data.
    """
    used = np.unique(np.asarray(list(token_ids_used) if not isinstance(token_ids_used, np.ndarray)
                                else token_ids_used).ravel())
    return sorted(int(t) for t in np.intersect1d(used, np.asarray(list(untrained_ids), dtype=np.int64)))

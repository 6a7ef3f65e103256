"""The object users hold: a Llama-3 causal LM (config + frozen params + optional LoRA + tokenizer).

``CausalLM`` is a Flax struct (a pytree): params and LoRA are its array leaves, everything
else is static. It can be passed straight into ``jax.jit``; ``model.replace(lora=...)`` returns
a new model. The forward pass itself lives in ``jaxsloth.model``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxsloth import model as llama
from jaxsloth.config import LlamaConfig


def default_attention_impl(dtype) -> str:
    """cuDNN flash attention on NVIDIA GPUs for 16-bit compute, the XLA reference elsewhere."""
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "lora_scaling", "impl", "attn_impl"))
def _logits(cfg, params, lora, input_ids, attention_mask, position_ids, segment_ids, *, dtype,
            lora_scaling, impl, attn_impl):
    return llama.logits(cfg, params, input_ids, attention_mask, position_ids, segment_ids, lora,
                        lora_scaling=lora_scaling, dtype=jnp.dtype(dtype), impl=impl, attn_impl=attn_impl)


class CausalLM(struct.PyTreeNode):
    config: LlamaConfig = struct.field(pytree_node=False)
    params: Any
    lora: Any = None
    lora_config: Any = struct.field(pytree_node=False, default=None)
    dtype: str = struct.field(pytree_node=False, default="bfloat16")
    tokenizer: Any = struct.field(pytree_node=False, default=None)
    max_seq_length: int = struct.field(pytree_node=False, default=2048)
    source: str | None = struct.field(pytree_node=False, default=None)
    quantized: str | None = struct.field(pytree_node=False, default=None)
    # token ids whose embedding/lm_head rows the untrained-token fix rewrote (carried into exports)
    fixed_token_ids: tuple[int, ...] = struct.field(pytree_node=False, default=())
    implementation: str | None = struct.field(pytree_node=False, default=None)

    @property
    def lora_scaling(self) -> float:
        return 1.0 if self.lora_config is None else self.lora_config.scaling

    def __call__(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None):
        """Logits [B, S, V] (f32) for token ids [B, S]; attention_mask [B, S] marks real tokens."""
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask)
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
        return _logits(self.config, self.params, self.lora, input_ids, attention_mask, position_ids, segment_ids,
                       dtype=self.dtype, lora_scaling=self.lora_scaling, impl=self.implementation,
                       attn_impl=default_attention_impl(self.dtype))

    def generate(self, prompt: str | list[int], max_new_tokens: int = 32, *, chat: bool = False) -> str:
        """Greedy decoding (no KV cache: meant for the tiny demo model and quick checks)."""
        tok = self.tokenizer
        if tok is None:
            raise ValueError("this model has no tokenizer; pass token ids or load one with the checkpoint")
        if isinstance(prompt, str):
            if chat:
                ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                              tokenize=True)
                ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
            else:
                ids = tok(prompt)["input_ids"]
        else:
            ids = list(prompt)
        stop = {t for t in (tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")) if t is not None}
        total = len(ids) + max_new_tokens
        buf = np.full((1, total), tok.pad_token_id or 0, np.int32)
        buf[0, : len(ids)] = ids
        n = len(ids)
        out = []
        for _ in range(max_new_tokens):
            mask = (np.arange(total) < n)[None].astype(np.int32)
            nxt = int(jnp.argmax(self(buf, mask)[0, n - 1]))
            if nxt in stop:
                break
            buf[0, n] = nxt
            out.append(nxt)
            n += 1
        return tok.decode(out, skip_special_tokens=True)


def abstract_model(path, dtype: str = "bfloat16", load_in_4bit: bool = False, max_seq_length: int = 2048,
                   *, implementation: str | None = None) -> CausalLM:
    """The model ``load_model`` would return, with ``jax.ShapeDtypeStruct`` params and no tokenizer,
    from config.json and the safetensors headers alone (seconds, no weights read).

    For compiling a step while the weights load, e.g. on a thread:
    ``jit(step).lower(abstract.replace(...), ...).compile()``; the compiled step then takes the loaded
    model with ``tokenizer=None`` (the tokenizer is static pytree data). 16-bit checkpoints only.
    """
    from convert.load import abstract_checkpoint

    cfg, params, meta = abstract_checkpoint(path, dtype=dtype, load_in_4bit=load_in_4bit)
    return _model(cfg, params, meta, None, max_seq_length, implementation)


def _model(cfg, params, meta, tokenizer, max_seq_length, implementation) -> CausalLM:
    """The CausalLM of load_checkpoint's / abstract_checkpoint's ``(config, params, meta)``."""
    return CausalLM(config=cfg, params=params, dtype=meta["dtype"], tokenizer=tokenizer,
                    max_seq_length=max_seq_length, source=meta["source"], quantized=meta["quantized"],
                    implementation=implementation)


def load_model(path, dtype: str = "bfloat16", load_in_4bit: bool = False, max_seq_length: int = 2048,
               *, implementation: str | None = None, progress: bool = False):
    """Load a Hugging Face Llama-3 directory. Returns ``(model, tokenizer)``.

    ``load_in_4bit`` quantizes the seven projections of every layer to NF4 while streaming
    (embeddings, norms and lm_head stay in ``dtype``); a bitsandbytes 4-bit checkpoint is read
    as NF4 whatever this flag says.
    """
    from concurrent.futures import ThreadPoolExecutor

    from convert.load import load_checkpoint, load_tokenizer

    # The tokenizer (transformers, and with it torch where installed: ~20 s of imports on the GPU
    # machine, bench/RESULTS.md) loads on a thread while the weights stream in: the reads and the
    # device work release the GIL, so the imports run in their shadow.
    pool = ThreadPoolExecutor(1, thread_name_prefix="jaxsloth-tokenizer")
    try:
        tok_future = pool.submit(load_tokenizer, path)
        cfg, params, meta = load_checkpoint(path, dtype=dtype, load_in_4bit=load_in_4bit, progress=progress)
        tokenizer = tok_future.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # a weights error is raised without waiting
    model = _model(cfg, params, meta, tokenizer, max_seq_length, implementation)
    return model, tokenizer

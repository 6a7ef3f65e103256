"""Tiny random Llama-3-architecture checkpoints, written as real Hugging Face directories.

Used by the tests, the README demo and the benchmarks (no weights are ever downloaded). The
directory has config.json, safetensors (optionally sharded with an index), generation_config.json
and a small byte-level BPE tokenizer that carries Llama-3's special tokens and chat template, so
``transformers.AutoModelForCausalLM`` / ``AutoTokenizer`` load it exactly as they load Llama-3.

Weights are drawn with numpy (no torch needed); like Llama-3 base, the rows of the reserved
special tokens (and, optionally, <|eot_id|> and the header tokens) can be left at zero: the
"untrained tokens" that the embedding fix repairs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

NUM_RESERVED = 8
SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|finetune_right_pad_id|>", "<|eom_id|>", "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(NUM_RESERVED)]

PRESETS = {
    # plain Llama-3: rope theta 500000, no scaling, separate lm_head
    "llama3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, rope_theta=500000.0, rope_scaling=None, tie_word_embeddings=False),
    # Llama-3.1: "llama3" rope scaling
    "llama3.1": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # Llama-3.2 1B/3B style: tied embeddings and scaling
    "llama3.2": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=1, rope_theta=500000.0, tie_word_embeddings=True,
                     rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # sizes that are not powers of two (hidden 96, 3 heads of 32 with 1 KV head, intermediate 200)
    "odd": dict(hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=3,
                num_key_value_heads=1, rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=False),
}

_CORPUS = """The quick brown fox jumps over the lazy dog. Llama models learn from text.
Question: what is 12 plus 7? Answer: 19. Reverse the word cat: tac. Count to five: 1 2 3 4 5.
You are a helpful assistant. The user asks a question and the assistant answers it briefly.
Instruction: add the numbers. Input: 3 and 4. Output: 7. Instruction: uppercase the word. Input: dog. Output: DOG.
0123456789 + - * / = ( ) [ ] { } , . ; : ! ? ' " abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ
"""


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer (transformers' fast tokenizer) with Llama-3's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>", pad_token="<|finetune_right_pad_id|>",
                                   model_max_length=131072)
    fast.chat_template = LLAMA3_CHAT_TEMPLATE
    return fast


def _hf_tensors(cfg: dict, rng: np.random.Generator, dtype, untrained_ids: list[int], init_std: float = 0.02):
    d, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def normal(*shape, std=init_std):
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(dtype)

    def norm_weight():
        # random around 1 so that a wrong norm weight shows in the parity tests
        return (1.0 + 0.1 * rng.standard_normal(d, dtype=np.float32)).astype(dtype)

    embed = normal(v, d, std=1.0)
    embed[untrained_ids] = 0
    yield "model.embed_tokens.weight", embed
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        yield p + "input_layernorm.weight", norm_weight()
        yield p + "self_attn.q_proj.weight", normal(q, d)
        yield p + "self_attn.k_proj.weight", normal(kv, d)
        yield p + "self_attn.v_proj.weight", normal(kv, d)
        yield p + "self_attn.o_proj.weight", normal(d, q)
        yield p + "post_attention_layernorm.weight", norm_weight()
        yield p + "mlp.gate_proj.weight", normal(i, d)
        yield p + "mlp.up_proj.weight", normal(i, d)
        yield p + "mlp.down_proj.weight", normal(d, i)
    yield "model.norm.weight", norm_weight()
    if not cfg["tie_word_embeddings"]:
        # rows of norm ~1 (std d^-1/2) so logits span a useful range, as in a trained model
        head = normal(v, d, std=d ** -0.5)
        head[untrained_ids] = 0
        yield "lm_head.weight", head


def make_tiny_checkpoint(out_dir: str | os.PathLike, preset: str = "llama3", *, seed: int = 0,
                         dtype: str = "float32", shard_bytes: int | None = None,
                         untrained_tokens: bool = False, overrides: dict | None = None,
                         init_std: float = 0.02) -> Path:
    """Write a random Llama-3-architecture HF checkpoint + tokenizer to ``out_dir``; return the path.

    ``shard_bytes`` splits the weights into several files with a ``model.safetensors.index.json``.
    ``untrained_tokens`` zeroes the embedding/lm_head rows of the reserved special tokens,
    <|eot_id|> and the header tokens, as in Llama-3 base. ``init_std`` is the std of the attention
    and MLP projections.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r}; choose one of {sorted(PRESETS)}")
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    cfg = dict(PRESETS[preset], **(overrides or {}))
    cfg["vocab_size"] = max(cfg.get("vocab_size", 0), len(tokenizer))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": init_std,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "torch_dtype": dtype,
        "bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": ids["<|end_of_text|>"],
        "pretraining_tp": 1, "use_cache": True, **cfg,
    }
    untrained = []
    if untrained_tokens:
        untrained = [ids[t] for t in SPECIAL_TOKENS if t.startswith("<|reserved")]
        untrained += [ids["<|eot_id|>"], ids["<|start_header_id|>"], ids["<|end_header_id|>"]]
    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    rng = np.random.default_rng(seed)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        shards, current, size = [], {}, 0
        for name, tensor in _hf_tensors(config, rng, np_dtype, untrained, init_std):
            if shard_bytes and current and size + tensor.nbytes > shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[name] = tensor
            size += tensor.nbytes
        shards.append(current)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map, total = {}, 0
            for k, shard in enumerate(shards):
                fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                for name, t in shard.items():
                    weight_map[name] = fname
                    total += t.nbytes
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": config["bos_token_id"], "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]],
             "do_sample": False}, indent=2))
        tokenizer.save_pretrained(str(tmp))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def addition_records(n: int = 16, seed: int = 0) -> list[dict]:
    """Alpaca-style records "a + b" -> "a+b" (small numbers): a tiny task for tests."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a, b = rng.integers(0, 60, 2)
        out.append({"instruction": "Add.", "input": f"{a} + {b}", "output": str(a + b)})
    return out

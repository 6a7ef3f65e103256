"""Llama-3 model configuration, read from a Hugging Face ``config.json``.

The config is static (hashable, frozen): jitted functions take it as a static argument.
Nothing is hard-coded for a model size; every figure comes from the checkpoint's file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_ROPE_TYPES = ("default", "llama3")


class CheckpointError(ValueError):
    """A checkpoint directory or file that we refuse to load, with the reason."""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # Llama-3.1 "llama3" scaling as a sorted tuple of (key, value) so the config stays hashable.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False

    @property
    def rope_scaling_dict(self) -> dict | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """[out, in] (HF layout) of each projection of one decoder layer."""
        d, i = self.hidden_size, self.intermediate_size
        return {
            "q": (self.q_dim, d),
            "k": (self.kv_dim, d),
            "v": (self.kv_dim, d),
            "o": (d, self.q_dim),
            "gate": (i, d),
            "up": (i, d),
            "down": (d, i),
        }

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "LlamaConfig":
        def need(key):
            if key not in raw or raw[key] is None:
                raise CheckpointError(f"{source}: required field {key!r} is missing")
            value = raw[key]
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CheckpointError(f"{source}: field {key!r} must be a positive integer, found {value!r}")
            return value

        archs = raw.get("architectures") or []
        model_type = raw.get("model_type")
        if model_type != "llama" or (archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs)):
            raise CheckpointError(
                f"{source}: jaxsloth loads Llama checkpoints (model_type 'llama', architectures "
                f"{list(SUPPORTED_ARCHITECTURES)}); found model_type={model_type!r}, architectures={archs!r}"
            )
        if raw.get("auto_map"):
            raise CheckpointError(
                f"{source}: 'auto_map' asks for custom remote code; jaxsloth never runs checkpoint code "
                "(trust_remote_code is not supported)"
            )
        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        kv_heads = raw.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise CheckpointError(
                f"{source}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
            )
        head_dim = raw.get("head_dim") or hidden // heads
        if head_dim % 2:
            raise CheckpointError(f"{source}: head_dim must be even for rotary embeddings, found {head_dim}")
        if raw.get("attention_bias") or raw.get("mlp_bias"):
            raise CheckpointError(f"{source}: attention_bias/mlp_bias are not supported (Llama-3 has no biases)")
        if raw.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{source}: hidden_act must be 'silu', found {raw.get('hidden_act')!r}")

        scaling = raw.get("rope_scaling") or raw.get("rope_parameters")
        rope_theta = raw.get("rope_theta")
        if isinstance(scaling, dict):
            scaling = dict(scaling)
            rope_theta = rope_theta or scaling.pop("rope_theta", None)
            scaling.pop("rope_theta", None)
            rope_type = scaling.get("rope_type", scaling.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise CheckpointError(
                    f"{source}: rope_scaling type {rope_type!r} is not supported (expected one of {SUPPORTED_ROPE_TYPES})"
                )
            if rope_type == "default":
                scaling = None
            else:
                for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                    if key not in scaling:
                        raise CheckpointError(f"{source}: rope_scaling of type 'llama3' lacks {key!r}")
                scaling = tuple(sorted({**scaling, "rope_type": "llama3"}.items()))
        else:
            scaling = None
        eos = raw.get("eos_token_id")
        if isinstance(eos, list):
            eos = tuple(eos)
        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 8192)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=raw.get("pad_token_id"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "LlamaConfig":
        return cls.from_dict(read_json(path, what="config.json"), source=str(path))


def read_json(path: str | Path, *, what: str, expected: str = "a Hugging Face model directory") -> dict:
    """A JSON file's contents, or a CheckpointError naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found (expected {expected})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None

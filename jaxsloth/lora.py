"""LoRA adapters on the seven Llama projections, initialised as PEFT does.

Adapters are f32 and live in their own pytree (``model.lora``), stacked over layers like the
base: {"q": {"a": [L, R, in], "b": [L, out, R]}, ...}. A is Kaiming-uniform (PEFT's default,
``kaiming_uniform_(a=sqrt(5))`` i.e. U(-1/sqrt(in), 1/sqrt(in))), B is zero, so a fresh adapter
leaves the model's output unchanged. Scaling is alpha / r, or alpha / sqrt(r) with rsLoRA.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxsloth.model import HF_PROJECTION_NAMES, PROJECTIONS

# Names users may pass: ours ("q") or PEFT/HF's ("q_proj", "gate_proj").
_ALIASES = {**{p: p for p in PROJECTIONS}, **{hf.split(".")[-1]: p for p, hf in HF_PROJECTION_NAMES.items()}}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    r: int = 16
    lora_alpha: float = 16
    target_modules: tuple[str, ...] = PROJECTIONS
    lora_dropout: float = 0.0
    use_rslora: bool = False
    seed: int = 3407

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def hf_target_modules(self) -> list[str]:
        return [HF_PROJECTION_NAMES[t].split(".")[-1] for t in self.target_modules]


def normalize_targets(target_modules) -> tuple[str, ...]:
    if isinstance(target_modules, str):
        target_modules = PROJECTIONS if target_modules in ("all", "all-linear") else [target_modules]
    out = []
    for name in target_modules:
        if name not in _ALIASES:
            raise ValueError(f"unknown LoRA target module {name!r}; choose from {sorted(_ALIASES)}")
        if _ALIASES[name] not in out:
            out.append(_ALIASES[name])
    if not out:
        raise ValueError("target_modules is empty: name at least one of q,k,v,o,gate,up,down")
    return tuple(p for p in PROJECTIONS if p in out)


def init_lora(cfg, lora_config: LoraConfig):
    """Fresh adapters for every layer: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0 (f32)."""
    shapes = cfg.linear_shapes()
    L, r = cfg.num_hidden_layers, lora_config.r
    keys = jax.random.split(jax.random.PRNGKey(lora_config.seed), len(lora_config.target_modules))
    lora = {}
    for key, name in zip(keys, lora_config.target_modules):
        out_dim, in_dim = shapes[name]
        bound = 1.0 / math.sqrt(in_dim)
        lora[name] = {
            "a": jax.random.uniform(key, (L, r, in_dim), jnp.float32, -bound, bound),
            "b": jnp.zeros((L, out_dim, r), jnp.float32),
        }
    return lora


def add_lora(model, r: int = 16, lora_alpha: float = 16, target_modules=PROJECTIONS, lora_dropout: float = 0.0,
             use_rslora: bool = False, seed: int = 3407):
    """Return ``model`` with fresh LoRA adapters attached (the base stays frozen)."""
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
    if model.lora is not None:
        raise ValueError("model already has LoRA adapters; start from the base model to add new ones")
    cfg = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=normalize_targets(target_modules),
                     lora_dropout=lora_dropout, use_rslora=use_rslora, seed=seed)
    return model.replace(lora=init_lora(model.config, cfg), lora_config=cfg)

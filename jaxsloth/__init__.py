"""jaxsloth: fast, memory-lean QLoRA fine-tuning of Llama-3 in JAX."""

from jaxsloth.causal_lm import CausalLM, load_model
from jaxsloth.config import CheckpointError, LlamaConfig
from jaxsloth.lora import LoraConfig, add_lora

__all__ = ["CausalLM", "CheckpointError", "LlamaConfig", "LoraConfig", "add_lora", "load_model"]
__version__ = "0.1.0"

"""jaxsloth: fast, memory-lean QLoRA fine-tuning of Llama-3 in JAX."""

from convert.export import export_adapter, export_merged, load_adapter
from jaxsloth.causal_lm import CausalLM, load_model
from jaxsloth.config import CheckpointError, LlamaConfig
from jaxsloth.embedding_fix import apply_untrained_token_fix
from jaxsloth.lora import LoraConfig, add_lora
from jaxsloth.train import TrainingArguments, train

__all__ = ["CausalLM", "CheckpointError", "LlamaConfig", "LoraConfig", "TrainingArguments", "add_lora",
           "apply_untrained_token_fix", "export_adapter", "export_merged", "load_adapter", "load_model", "train"]
__version__ = "0.1.0"

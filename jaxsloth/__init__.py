"""jaxsloth: fast, memory-lean QLoRA fine-tuning of Llama-3 in JAX."""

from jaxsloth.causal_lm import CausalLM, abstract_model, load_model
from jaxsloth.config import CheckpointError, LlamaConfig
from jaxsloth.embedding_fix import apply_untrained_token_fix
from jaxsloth.lora import LoraConfig, add_lora
from jaxsloth.train import TrainingArguments, train

# convert.export imports jaxsloth's modules; resolving these lazily keeps `import convert.export`
# working on its own in a fresh interpreter (no import cycle).
_EXPORT_API = ("export_adapter", "export_merged", "load_adapter", "load_model_with_adapter")

__all__ = ["CausalLM", "CheckpointError", "abstract_model", "LlamaConfig", "LoraConfig", "TrainingArguments", "add_lora",
           "apply_untrained_token_fix", "load_model", "train", *_EXPORT_API]
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORT_API:
        from convert import export

        return getattr(export, name)
    raise AttributeError(f"module 'jaxsloth' has no attribute {name!r}")

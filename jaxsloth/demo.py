"""The built-in demo: a tiny random Llama-3 checkpoint, loaded and run on the CPU in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def run_demo(out_dir="demo_out", steps=None):
    import jaxsloth
    from jaxsloth.tiny import make_tiny_checkpoint

    out = Path(out_dir)
    ckpt = make_tiny_checkpoint(out / "tiny-llama3", "llama3", seed=0)
    print(f"wrote a tiny random Llama-3 checkpoint to {ckpt}")
    model, tok = jaxsloth.load_model(ckpt, dtype="float32")
    cfg = model.config
    print(f"loaded: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}")
    ids = np.asarray(tok("12 plus 7 is")["input_ids"])[None]
    logits = model(ids)
    print(f"logits {tuple(logits.shape)}, last-token top-5 ids {np.argsort(-np.asarray(logits[0, -1]))[:5].tolist()}")
    print("greedy continuation (random weights):", repr(model.generate("12 plus 7 is", max_new_tokens=8)))

"""Exports that PyTorch loads: PEFT adapters and merged checkpoints reproduce our logits."""

import argparse
import errno
import json
import logging
import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import jaxsloth
from convert import export as export_mod
from convert.export import (ExportError, export_adapter, export_merged, load_adapter, load_model_with_adapter,
                            register_export_command)
from jaxsloth.config import CheckpointError
from jaxsloth.embedding_fix import apply_untrained_token_fix

F32_REL = 1e-5  # f32 end to end: the two frameworks differ only in summation order


def _trained(path, *, dtype="float32", load_in_4bit=False, fix=False, rslora=False, r=4, alpha=8,
             targets="all", seed=0):
    """A model with a "trained" adapter: random non-zero B, so a dropped or transposed B shows up."""
    model, _ = jaxsloth.load_model(path, dtype=dtype, load_in_4bit=load_in_4bit)
    model = jaxsloth.add_lora(model, r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets, seed=seed)
    rng = np.random.default_rng(seed)
    lora = {k: {"a": v["a"], "b": jnp.asarray(0.05 * rng.standard_normal(v["b"].shape), jnp.float32)}
            for k, v in model.lora.items()}
    model = model.replace(lora=lora)
    if fix:
        model, fixed = apply_untrained_token_fix(model)
        assert fixed
    return model


def _batch(model, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, model.config.vocab_size, size=(2, 24))
    fixed = list(model.fixed_token_ids)
    if fixed:  # the fixed rows must be read (embedding) and scored (lm_head)
        ids[0, 2:2 + min(4, len(fixed))] = fixed[:4]
    mask = np.ones_like(ids)
    mask[1, 17:] = 0
    return ids, mask


def _rel(ours, ref, mask):
    real = mask.astype(bool)
    return float(np.abs(ours - ref)[real].max() / np.abs(ref[real]).max())


def _torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _hf_load(path, **kwargs):
    """AutoModelForCausalLM.from_pretrained, returning (model, loading info, warnings logged or raised)."""
    handler = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                               output_loading_info=True, **kwargs)
    finally:
        logger.removeHandler(handler)
    return model.eval(), info, handler.messages + [str(w.message) for w in caught]


# ---------------------------------------------------------------------------------------------- adapter


@pytest.mark.parametrize("preset,fix,rslora", [
    ("llama3", False, False), ("llama3", True, False), ("llama3", False, True), ("llama3", True, True),
    ("llama3.2", False, False), ("llama3.2", True, True),
])
def test_peft_adapter_reproduces_our_logits(tiny_checkpoint, tmp_path, preset, fix, rslora):
    path = tiny_checkpoint(preset, untrained_tokens=True)
    model = _trained(path, fix=fix, rslora=rslora)
    ids, mask = _batch(model)
    ours = np.asarray(model(ids, mask))
    out = export_adapter(model, tmp_path / "adapter")

    base = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(base, out).eval()
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    ref = _torch_logits(peft_model, ids, mask)
    assert _rel(ours, ref, mask) <= F32_REL, f"max|diff|/max|ref| = {_rel(ours, ref, mask):.2e}"
    # the check can fail: without the adapter the base's logits are far away
    with peft_model.disable_adapter():
        plain = _torch_logits(peft_model, ids, mask)
    assert _rel(ours, plain, mask) > 1e-2


def test_adapter_files_follow_peft_layout(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("llama3", untrained_tokens=True)
    model = _trained(path, fix=True, targets=["q_proj", "down_proj"], r=3, alpha=6)
    out = export_adapter(model, tmp_path / "adapter")
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (3, 6, False)
    assert cfg["target_modules"] == ["q_proj", "down_proj"]
    assert cfg["base_model_name_or_path"] == model.source
    fixed = list(model.fixed_token_ids)
    assert cfg["trainable_token_indices"] == {"embed_tokens": fixed, "lm_head": fixed}
    with safe_open(str(out / "adapter_model.safetensors"), "numpy") as f:
        keys = set(f.keys())
        a = f.get_tensor("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight")
        b = f.get_tensor("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight")
        rows = f.get_tensor("base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta")
    assert len(keys) == 2 * 2 * 2 + 2  # 2 layers x 2 modules x (A, B) + embed/lm_head rows
    assert a.dtype == np.float32 and a.shape == (3, 128) and b.shape == (64, 3)
    np.testing.assert_array_equal(b, np.asarray(model.lora["down"]["b"][1]))
    np.testing.assert_array_equal(rows, np.asarray(model.params["embed"])[fixed])
    assert "trainable_token_indices" in (out / "README.md").read_text()


def test_fixed_rows_as_modules_to_save_for_a_peft_without_trainable_tokens(tiny_checkpoint, tmp_path, monkeypatch):
    path = tiny_checkpoint("llama3", untrained_tokens=True)
    model = _trained(path, fix=True)
    monkeypatch.setattr(export_mod, "peft_supports_trainable_tokens", lambda: False)  # an older peft
    out = export_adapter(model, tmp_path / "adapter")  # "auto" falls back to modules_to_save
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["embed_tokens", "lm_head"] and cfg["trainable_token_indices"] is None
    ids, mask = _batch(model)
    base = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    ref = _torch_logits(PeftModel.from_pretrained(base, out).eval(), ids, mask)
    assert _rel(np.asarray(model(ids, mask)), ref, mask) <= F32_REL
    back = load_adapter(jaxsloth.load_model(path, dtype="float32")[0], out)
    assert back.fixed_token_ids == model.fixed_token_ids
    np.testing.assert_array_equal(np.asarray(back.params["lm_head"]), np.asarray(model.params["lm_head"]))
    tied = _trained(tiny_checkpoint("llama3.2", untrained_tokens=True), fix=True)
    with pytest.raises(ValueError, match="tied embeddings"):
        export_adapter(tied, tmp_path / "tied", embedding_rows="modules_to_save")


def test_omitting_fixed_rows_warns_and_says_so(tiny_checkpoint, tmp_path):
    model = _trained(tiny_checkpoint("llama3", untrained_tokens=True), fix=True)
    with pytest.warns(UserWarning, match="NOT in this adapter"):
        out = export_adapter(model, tmp_path / "adapter", embedding_rows="omit")
    with safe_open(str(out / "adapter_model.safetensors"), "numpy") as f:
        assert all("lora_" in k for k in f.keys())
    assert "NOT in this adapter" in (out / "README.md").read_text()


# ---------------------------------------------------------------------------------------------- merged


@pytest.mark.parametrize("preset", ["llama3", "llama3.2"])
def test_merged_checkpoint_loads_in_transformers_with_our_logits(tiny_checkpoint, tmp_path, preset):
    path = tiny_checkpoint(preset, untrained_tokens=True)
    model = _trained(path, fix=True, rslora=preset == "llama3.2")
    ids, mask = _batch(model)
    ours = np.asarray(model(ids, mask))
    out = export_merged(model, tmp_path / "merged", "float32", max_shard_bytes=200_000)

    hf, info, logged = _hf_load(out, dtype=torch.float32)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and not info["mismatched_keys"]
    assert not [m for m in logged if "missing" in m.lower() or "unexpected" in m.lower() or "newly initialized" in m]
    assert _rel(ours, _torch_logits(hf, ids, mask), mask) <= F32_REL

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["jaxsloth"]["merged_from"] == "dense"
    assert config["jaxsloth"]["fixed_token_ids"] == list(model.fixed_token_ids)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"):
        assert (out / name).is_file(), name
    back, _ = jaxsloth.load_model(out, dtype="float32")  # continue from a merged export
    assert _rel(ours, np.asarray(back(ids, mask)), mask) <= F32_REL


def test_merged_shards_respect_the_limit_and_index_every_tensor(tiny_checkpoint, tmp_path):
    model = _trained(tiny_checkpoint("llama3", untrained_tokens=True))
    limit = 100_000
    out = export_merged(model, tmp_path / "merged", "bfloat16", max_shard_bytes=limit)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p for p in os.listdir(out) if p.endswith(".safetensors"))
    assert sorted(set(index["weight_map"].values())) == shards and len(shards) > 2
    total, seen = 0, set()
    for shard in shards:
        with safe_open(str(out / shard), "numpy") as f:
            names = list(f.keys())
            sizes = [f.get_tensor(n).nbytes for n in names]
            assert all(f.get_tensor(n).dtype.name == "bfloat16" for n in names)
        # a single tensor bigger than the limit gets a shard of its own (embed: 384 x 64 x 2 bytes)
        assert sum(sizes) <= limit or len(names) == 1
        assert all(index["weight_map"][n] == shard for n in names)
        seen |= set(names)
        total += sum(sizes)
    assert seen == set(index["weight_map"]) and total == index["metadata"]["total_size"]
    one = export_merged(model, tmp_path / "single", "bfloat16")
    assert "model.safetensors" in os.listdir(one) and "model.safetensors.index.json" not in os.listdir(one)


def test_merged_export_holds_one_tensor_at_a_time(tiny_checkpoint, tmp_path, monkeypatch):
    # host RAM stays near one tensor (not one shard, not the model): every array handed to the writer
    # is gone by the time the next one arrives
    import weakref

    model = _trained(tiny_checkpoint("llama3"))
    real, alive = export_mod.write_tensor_bytes, []

    def tracking_write(f, array):  # numpy arrays are freed by reference counting: no gc pass needed
        alive.append(sum(r() is not None for r in refs))
        refs.append(weakref.ref(array))
        real(f, array)

    refs = []
    monkeypatch.setattr(export_mod, "write_tensor_bytes", tracking_write)
    export_merged(model, tmp_path / "merged", "bfloat16", max_shard_bytes=10**9)
    assert len(alive) == len(export_mod._merged_plan(model.config)) and max(alive) == 0


def test_merged_from_4bit_equals_our_4bit_model(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("llama3", untrained_tokens=True)
    model = _trained(path, load_in_4bit=True, fix=True)
    ids, mask = _batch(model)
    ours = np.asarray(model(ids, mask))
    out = export_merged(model, tmp_path / "f32", "float32")
    config = json.loads((out / "config.json").read_text())
    assert config["jaxsloth"]["merged_from"] == "dequantized-nf4" and "quantization_config" not in config
    hf, _, _ = _hf_load(out, dtype=torch.float32)
    # f32 export of the dequantized NF4 base: the same weights our 4-bit model computed with
    assert _rel(ours, _torch_logits(hf, ids, mask), mask) <= F32_REL
    bf16 = export_merged(model, tmp_path / "bf16", "bfloat16")
    hf16, _, _ = _hf_load(bf16, dtype=torch.float32)
    # one bf16 rounding of every weight (eps 2^-8) through 2 layers: a few eps of the logit scale
    assert _rel(ours, _torch_logits(hf16, ids, mask), mask) <= 3e-2


def test_merged_from_source_uses_the_16bit_weights(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("llama3", untrained_tokens=True)
    dense = _trained(path)
    quant = _trained(path, load_in_4bit=True)
    a = export_merged(dense, tmp_path / "dense", "float32")
    b = export_merged(quant, tmp_path / "source", "float32", base="source")
    c = export_merged(quant, tmp_path / "nf4", "float32")
    name = "model.layers.1.mlp.up_proj.weight"
    read = {k: safe_open(str(d / "model.safetensors"), "numpy").get_tensor(name) for k, d in
            (("dense", a), ("source", b), ("nf4", c))}
    np.testing.assert_array_equal(read["dense"], read["source"])
    assert np.abs(read["dense"] - read["nf4"]).max() > 1e-3  # NF4 error: the two bases really differ
    assert json.loads((b / "config.json").read_text())["jaxsloth"]["merged_from"] == "source-16bit"


def test_model_without_lora_is_a_plain_export(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("llama3.2", untrained_tokens=True)
    model, _ = jaxsloth.load_model(path, dtype="float32")
    with pytest.raises(ValueError, match="no LoRA adapters"):
        export_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    out = export_merged(model, tmp_path / "plain", "float32")
    with safe_open(str(out / "model.safetensors"), "numpy") as f, \
            safe_open(str(path / "model.safetensors"), "numpy") as g:
        assert set(f.keys()) == set(g.keys())
        for k in g.keys():
            np.testing.assert_array_equal(f.get_tensor(k), g.get_tensor(k))
    assert "No LoRA" in (out / "README.md").read_text()


# ---------------------------------------------------------------------------------------------- load_adapter


def test_load_adapter_round_trip_restores_lora_config_and_fixed_rows(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("llama3", untrained_tokens=True)
    model = _trained(path, fix=True, rslora=True, targets=["q", "v", "gate"], r=6, alpha=12)
    out = export_adapter(model, tmp_path / "adapter")
    base, _ = jaxsloth.load_model(path, dtype="float32")
    back = load_adapter(base, out)
    assert back.lora_config.r == 6 and back.lora_config.lora_alpha == 12 and back.lora_config.use_rslora
    assert back.lora_config.target_modules == ("q", "v", "gate")
    assert back.fixed_token_ids == model.fixed_token_ids
    for k in ("embed", "lm_head"):
        np.testing.assert_array_equal(np.asarray(back.params[k]), np.asarray(model.params[k]))
    jax.tree_util.tree_map(np.testing.assert_array_equal, back.lora, model.lora)
    ids, mask = _batch(model)
    np.testing.assert_array_equal(np.asarray(back(ids, mask)), np.asarray(model(ids, mask)))
    with pytest.raises(ValueError, match="already has LoRA"):
        load_adapter(back, out)
    again, tok = load_model_with_adapter(out, dtype="float32")  # base found through base_model_name_or_path
    assert tok is not None and again.fixed_token_ids == model.fixed_token_ids
    np.testing.assert_array_equal(np.asarray(again(ids, mask)), np.asarray(model(ids, mask)))


def test_load_adapter_reads_peft_saved_adapters(tiny_checkpoint, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    path = tiny_checkpoint("llama3.2", untrained_tokens=True)
    torch.manual_seed(0)
    base = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    peft_model = get_peft_model(base, PeftLoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "up_proj"],
                                                     trainable_token_indices=[5, 9]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.add_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "peft")
    model, _ = jaxsloth.load_model(path, dtype="float32")
    model = load_adapter(model, tmp_path / "peft")
    assert model.fixed_token_ids == (5, 9) and model.lora_config.target_modules == ("k", "up")
    ids, mask = _batch(model)
    ids[0, :2] = [5, 9]
    assert _rel(np.asarray(model(ids, mask)), _torch_logits(peft_model.eval(), ids, mask), mask) <= F32_REL


def test_load_adapter_errors_name_the_problem(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("llama3")
    model = _trained(path)
    out = export_adapter(model, tmp_path / "adapter")
    other, _ = jaxsloth.load_model(tiny_checkpoint("llama3.2"), dtype="float32")
    with pytest.raises(CheckpointError, match=r"k_proj.lora_B.weight has shape \[32, 4\], expected \[16, 4\]"):
        load_adapter(other, out)  # adapter for another model
    deeper, _ = jaxsloth.load_model(tiny_checkpoint("odd"), dtype="float32")
    with pytest.raises(CheckpointError, match=r"missing lora_A of self_attn.q_proj for layers \[2\]"):
        load_adapter(deeper, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj", "qkv_proj"]}))
    fresh, _ = jaxsloth.load_model(path, dtype="float32")
    with pytest.raises(CheckpointError, match="unknown LoRA target module 'qkv_proj'"):
        load_adapter(fresh, out)
    (out / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora"):
        load_adapter(fresh, out)
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        load_adapter(fresh, tmp_path)


# ---------------------------------------------------------------------------------------------- bad input


def test_unknown_target_modules_are_refused(tiny_checkpoint, tmp_path):
    model = _trained(tiny_checkpoint("llama3"))
    weird = model.replace(lora={**model.lora, "qkv": model.lora["q"]})
    with pytest.raises(ValueError, match="unknown target modules"):
        export_adapter(weird, tmp_path / "a")
    with pytest.raises(ValueError, match="unknown target modules"):
        export_merged(weird, tmp_path / "m")
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_merged(model, tmp_path / "m", "int8")
    assert os.listdir(tmp_path) == []


def test_existing_output_is_refused_unless_overwrite(tiny_checkpoint, tmp_path):
    model = _trained(tiny_checkpoint("llama3"))
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_adapter(model, out)
    assert os.listdir(out) == ["keep.txt"]
    export_adapter(model, out, overwrite=True)
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no temp or backup dirs left
    with pytest.raises(ValueError, match="source checkpoint"):
        export_merged(model, model.source, overwrite=True)
    with pytest.raises(ValueError, match="source checkpoint"):
        export_adapter(model, model.source, overwrite=True)
    assert (Path(model.source) / "config.json").is_file()


def test_full_disk_leaves_nothing_behind(tiny_checkpoint, tmp_path, monkeypatch):
    model = _trained(tiny_checkpoint("llama3"))
    previous = export_merged(model, tmp_path / "merged", "float32")
    before = {p: (previous / p).read_bytes() for p in os.listdir(previous)}
    real, calls = export_mod.write_tensor_bytes, []

    def write_until_full(f, array):
        calls.append(1)
        if len(calls) == 5:  # mid-way through the first shard
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, array)

    monkeypatch.setattr(export_mod, "write_tensor_bytes", write_until_full)
    with pytest.raises(ExportError, match="disk full") as e:
        export_merged(model, tmp_path / "new", "float32", max_shard_bytes=50_000)
    assert e.value.errno == errno.ENOSPC and "nothing was written" in str(e.value)
    calls.clear()
    with pytest.raises(ExportError, match="disk full"):
        export_merged(model, tmp_path / "merged", "float32", overwrite=True)  # the old export survives
    calls.clear()
    with pytest.raises(ExportError, match="disk full"):
        export_adapter(model, tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path)) == ["merged"]
    assert {p: (previous / p).read_bytes() for p in os.listdir(previous)} == before


def test_too_little_free_space_is_refused_before_writing(tiny_checkpoint, tmp_path, monkeypatch):
    model = _trained(tiny_checkpoint("llama3"))
    monkeypatch.setattr(export_mod.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(ExportError, match="needs about"):
        export_merged(model, tmp_path / "merged")
    assert os.listdir(tmp_path) == []


def test_unwritable_output_dir_is_a_clear_error(tiny_checkpoint, tmp_path, monkeypatch):
    model = _trained(tiny_checkpoint("llama3"))
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ExportError, match="cannot create the export directory"):
        export_adapter(model, blocker / "adapter")
    ro = tmp_path / "readonly"
    ro.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits: make the directory refuse as a read-only one would
        def refuse(*a, **k):
            raise PermissionError(errno.EACCES, "Permission denied")
        monkeypatch.setattr(export_mod.tempfile, "mkdtemp", refuse)
    else:
        ro.chmod(0o500)
    try:
        with pytest.raises(ExportError, match="permission denied"):
            export_merged(model, ro / "merged")
    finally:
        ro.chmod(0o700)
    assert os.listdir(ro) == []


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_export_merges_an_adapter_onto_its_base(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("llama3.2", untrained_tokens=True)
    model = _trained(path, fix=True)
    adapter = export_adapter(model, tmp_path / "adapter")
    parser = argparse.ArgumentParser()
    register_export_command(parser.add_subparsers(dest="command"))
    runs = ((["--model", str(path), "--adapter-only"], "adapter_config.json"),
            (["--dtype", "float32"], "config.json"))  # no --model: the adapter names its base
    for extra, check in runs:
        out = tmp_path / f"out-{check}"
        args = parser.parse_args(["export", "--adapter", str(adapter), "--out", str(out), "--load-dtype", "float32",
                                  *extra])
        assert args.func(args) == 0 and (out / check).is_file()
    merged, _ = jaxsloth.load_model(tmp_path / "out-config.json", dtype="float32")
    ids, mask = _batch(model)
    assert _rel(np.asarray(model(ids, mask)), np.asarray(merged(ids, mask)), mask) <= F32_REL

"""Bad checkpoints get a clear error naming the file, tensor or field."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxsloth
from jaxsloth import CheckpointError


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("llama3"), dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json not found"):
        jaxsloth.load_model(ckpt)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        jaxsloth.load_model(tmp_path / "nope")


def test_non_llama_architecture(ckpt):
    _edit_config(ckpt, model_type="mistral", architectures=["MistralForCausalLM"])
    with pytest.raises(CheckpointError, match=r"config\.json.*model_type='mistral'"):
        jaxsloth.load_model(ckpt)


def test_remote_code_is_refused(ckpt):
    _edit_config(ckpt, auto_map={"AutoModelForCausalLM": "modeling_x.X"})
    with pytest.raises(CheckpointError, match="trust_remote_code"):
        jaxsloth.load_model(ckpt)


def test_missing_field(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["hidden_size"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'hidden_size' is missing"):
        jaxsloth.load_model(ckpt)


def test_missing_tensor(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        jaxsloth.load_model(ckpt)


def test_extra_tensor(ckpt):
    _edit_tensors(ckpt, lambda t: t.update({"model.layers.7.foo.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.7\.foo\.weight"):
        jaxsloth.load_model(ckpt)


def test_shape_disagrees_with_config(ckpt):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:-1]
    _edit_tensors(ckpt, shrink)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' "
                                               r"has shape \[31, 64\], but config\.json implies \[32, 64\]"):
        jaxsloth.load_model(ckpt)


def test_truncated_file(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: file is truncated"):
        jaxsloth.load_model(ckpt)


def test_truncated_header(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: (file is truncated|corrupt)"):
        jaxsloth.load_model(ckpt)


def test_pickle_only_checkpoint_is_refused_without_unpickling(ckpt):
    (ckpt / "model.safetensors").unlink()
    # a file that would execute code if unpickled: the loader must never open it
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'touch /tmp/pwned'\ntR.")
    with pytest.raises(CheckpointError, match=r"pickle-based weights found \(pytorch_model\.bin\).*safetensors only"):
        jaxsloth.load_model(ckpt)


def test_bad_dtype(ckpt):
    with pytest.raises(ValueError, match="dtype must be"):
        jaxsloth.load_model(ckpt, dtype="int8")


def test_unsupported_rope_type(ckpt):
    _edit_config(ckpt, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(CheckpointError, match="rope_scaling type 'yarn'"):
        jaxsloth.load_model(ckpt)


def _rewrite_header(path, fn):
    """Apply fn to the parsed JSON header of a safetensors file, keeping its data bytes."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    fn(header)
    new = json.dumps(header).encode()
    new += b" " * ((-len(new)) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def test_header_offsets_disagree_with_shape(ckpt):
    name = "model.layers.0.mlp.up_proj.weight"

    def bad(h):
        begin, end = h[name]["data_offsets"]
        h[name]["data_offsets"] = [begin, end - 2]
    _rewrite_header(ckpt / "model.safetensors", bad)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header: tensor "
                                               r"'model\.layers\.0\.mlp\.up_proj\.weight' has data_offsets"):
        jaxsloth.load_model(ckpt)


def test_unknown_dtype_in_header(ckpt):
    def bad(h):
        h["model.norm.weight"]["dtype"] = "F4"
    _rewrite_header(ckpt / "model.safetensors", bad)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.norm\.weight' has a corrupt "
                                               r"or unsupported header entry"):
        jaxsloth.load_model(ckpt)


def test_reader_equals_safetensors_and_prefetch_budget_bounds_reads(ckpt):
    """SafetensorsFile reads exactly what safetensors does (every dtype the tiny file has), and the
    prefetcher hands tensors over in order whatever its byte budget (1 byte: one tensor at a time)."""
    from convert.load import SafetensorsFile, _Prefetcher

    path = ckpt / "model.safetensors"
    ref = load_file(path)
    extra = {"u8": np.arange(7, dtype=np.uint8), "i32": np.arange(-3, 3, dtype=np.int32).reshape(2, 3),
             "f32": np.linspace(-1, 1, 10, dtype=np.float32)}
    tensors = {**ref, **extra}
    save_file(tensors, path)
    sf = SafetensorsFile(path)
    names = sorted(sf.keys())
    largest = max(sf.nbytes(m) for m in names)
    for budget in (1, 1 << 30):
        pf = _Prefetcher([(sf, n) for n in names], budget=budget)
        try:
            for i, n in enumerate(names):
                got = pf.get(i)
                want = tensors[n]
                assert got.dtype == want.dtype and got.shape == want.shape, n
                np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
                assert pf.in_flight <= max(budget, largest)
        finally:
            pf.close()


def test_prefetch_error_reaches_the_consumer(ckpt):
    """A file that shrinks after its header was checked: the reader thread's error is raised by
    get(), naming the file and tensor, and close() does not hang."""
    from convert.load import SafetensorsFile, _Prefetcher

    path = ckpt / "model.safetensors"
    sf = SafetensorsFile(path)
    last = max(sf.keys(), key=lambda n: sf.tensors[n][2])
    data = path.read_bytes()
    path.write_bytes(data[:-8])
    pf = _Prefetcher([(sf, last)])
    try:
        with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{last}' cannot be read"):
            pf.get(0)
    finally:
        pf.close()


@pytest.mark.parametrize("preset,load_in_4bit", [("llama3", True), ("llama3.2", False), ("llama3", False)])
def test_abstract_model_matches_the_loaded_one_and_its_compiled_step_runs(tiny_checkpoint, preset, load_in_4bit):
    """abstract_model has the loaded model's tree, shapes and dtypes (tied embeddings, NF4 or not), and
    a training step compiled from it runs on the loaded model (tokenizer dropped) with the jit's result."""
    from jaxsloth.train import TrainingArguments, make_optimizer, make_train_step

    path = tiny_checkpoint(preset)
    real, _ = jaxsloth.load_model(path, load_in_4bit=load_in_4bit)
    real = real.replace(tokenizer=None)
    abstract = jaxsloth.abstract_model(path, load_in_4bit=load_in_4bit)
    shape_of = lambda t: jax.tree_util.tree_map(lambda a: (a.shape, jnp.dtype(a.dtype)), t)  # noqa: E731
    assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(real)
    assert shape_of(abstract) == shape_of(real)

    tx = make_optimizer(TrainingArguments(max_steps=2), 2)
    step = make_train_step(tx, remat="none", packing=False)
    a_lora = jax.eval_shape(lambda m: jaxsloth.add_lora(m, r=4, lora_alpha=8).lora, abstract)
    batch = {k: jnp.asarray(np.random.default_rng(0).integers(1, 100, (1, 2, 16)), jnp.int32)
             for k in ("input_ids", "labels", "position_ids", "segment_ids")}
    key = jax.random.PRNGKey(0)
    compiled = step.lower(a_lora, jax.eval_shape(tx.init, a_lora), abstract, batch, key).compile()
    lora = jaxsloth.add_lora(real, r=4, lora_alpha=8).lora
    got = compiled(lora, tx.init(lora), real, batch, key)
    lora = jaxsloth.add_lora(real, r=4, lora_alpha=8).lora
    want = step(lora, tx.init(lora), real, batch, key)
    np.testing.assert_allclose(float(got[2]["loss"]), float(want[2]["loss"]), rtol=1e-6)


def test_sharded_checkpoint_loads_as_the_single_file_one(tiny_checkpoint):
    """Several shards (the reader thread switching files, out of index order) give the same arrays."""
    one = tiny_checkpoint("llama3")
    many = tiny_checkpoint("llama3", shard_bytes=20_000)
    assert len(list(many.glob("*.safetensors"))) > 3
    a, _ = jaxsloth.load_model(one, dtype="float32")
    b, _ = jaxsloth.load_model(many, dtype="float32")
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

"""Multi-device training (jaxsloth.sharding) on 8 fake CPU devices: sharded == single-device.

The fake device count is an XLA flag read once when jax starts, so the multi-device halves run in a
child interpreter (this file run as a script) and report JSON; the single-device halves run here.
Tolerances: f32 with "highest" matmul precision; sharding only changes the order of reductions
(all-reduce of partial sums), so losses and gradients agree to a few f32 ulps (rel <= 1e-5).
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

R, ALPHA = 4, 8
TOL = 1e-5


def _records(n=16, seed=0):
    from jaxsloth.tiny import addition_records

    return addition_records(n, seed)


def _build(path, nf4=False):
    """The tiny model (f32 or NF4 base) with LoRA whose B is non-zero, and its training rows."""
    import datasets
    import jax

    import jaxsloth
    from jaxsloth.data import prepare_data

    model, tok = jaxsloth.load_model(path, dtype="float32", load_in_4bit=nf4)
    model = jaxsloth.add_lora(model, r=R, lora_alpha=ALPHA, seed=1)
    keys = jax.random.split(jax.random.PRNGKey(7), len(model.lora))
    lora = {name: {"a": ab["a"], "b": 0.05 * jax.random.normal(k, ab["b"].shape)}
            for k, (name, ab) in zip(keys, model.lora.items())}
    rows = prepare_data(datasets.Dataset.from_list(_records()), tok, 256, train_on_responses_only=True)
    return model.replace(lora=lora), rows


def _train_args(out_dir, per_device, mesh=None):
    from jaxsloth.train import TrainingArguments

    return TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=per_device, learning_rate=3e-3,
                             max_steps=6, save_steps=3, seed=3, progress=False, remat="full", mesh=mesh)


def _losses(trainer):
    return [h["loss"] for h in trainer.history]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ------------------------------------------------------------------------------ child-process halves
def _child_parity(path):
    """Loss and LoRA gradients on one device vs meshes data=2,fsdp=4 and data=8, f32 and NF4 base."""
    import jax

    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxsloth.data import BatchStream
    from jaxsloth.sharding import activate, make_mesh, shard_batch, shard_model
    from jaxsloth.train import accumulated_loss_and_grads, data_parallel_loss_and_grads

    fn = jax.jit(lambda m, lo, b, k: accumulated_loss_and_grads(m, lo, b, k, remat="full"))
    out = {"devices": jax.device_count()}
    for base in ("f32", "nf4"):
        model, rows = _build(path, nf4=base == "nf4")
        batch = BatchStream(rows, batch_size=8, accum_steps=2, seed=0).batch(0)
        key = jax.random.PRNGKey(0)
        loss1, count1, g1 = fn(model.replace(lora=None), model.lora, batch, key)
        for spec in ("data=2,fsdp=4", "data=8"):
            mesh = make_mesh(spec)
            sm = shard_model(model, mesh)
            with activate(mesh):  # as the Trainer runs it: the loss is taken per device
                loss, count, g = fn(sm.replace(lora=None), sm.lora, shard_batch(batch, mesh), key)
            q = sm.params["layers"]["q"]
            q = q.codes if base == "nf4" else q
            if spec == "data=8":  # the shard_map data-parallel path (what the Trainer runs when fsdp=1)
                dp = jax.jit(lambda m, lo, b, k, mesh=mesh: data_parallel_loss_and_grads(mesh, m, lo, b, k,
                                                                                         remat="full"))
                with activate(mesh):
                    dl, dc, dg = dp(sm.replace(lora=None), sm.lora, shard_batch(batch, mesh), key)
                out[f"{base} shard_map data=8"] = {
                    "loss": float(dl), "loss_1dev": float(loss1), "count_equal": int(dc) == int(count1),
                    "loss_rel": _rel(dl, loss1),
                    "grad_rel": max(_rel(a, b) for a, b in zip(jax.tree_util.tree_leaves(dg),
                                                                 jax.tree_util.tree_leaves(g1)))}
            out[f"{base} {spec}"] = {
                "loss": float(loss), "loss_1dev": float(loss1), "count_equal": int(count) == int(count1),
                "loss_rel": _rel(loss, loss1),
                "grad_rel": max(_rel(a, b) for a, b in zip(jax.tree_util.tree_leaves(g),
                                                             jax.tree_util.tree_leaves(g1))),
                "q_shard_shape": list(q.sharding.shard_shape(q.shape)), "q_shape": list(q.shape),
                "lora_a_shard_shape": list(sm.lora["q"]["a"].sharding.shard_shape(sm.lora["q"]["a"].shape)),
            }
        # batch 1 (long context): the row cannot be split, so the sequence is (constrain_rows)
        one = jax.tree_util.tree_map(lambda a: a[:1, :1], batch)
        l1, c1, g1b = fn(model.replace(lora=None), model.lora, one, key)
        mesh = make_mesh("fsdp=8")
        sm = shard_model(model, mesh)
        with activate(mesh):
            ls, cs, gs = fn(sm.replace(lora=None), sm.lora, jax.device_put(one, NamedSharding(mesh, P())), key)
        out[f"{base} one row fsdp=8"] = {
            "loss": float(ls), "loss_1dev": float(l1), "count_equal": int(cs) == int(c1), "loss_rel": _rel(ls, l1),
            "grad_rel": max(_rel(a, b) for a, b in zip(jax.tree_util.tree_leaves(gs), jax.tree_util.tree_leaves(g1b)))}
        # the same row with the MLP in 8-token chunks laid out per device (model.decoder_layer)
        fc = jax.jit(lambda m, lo, b, k: accumulated_loss_and_grads(m, lo, b, k, remat="full", mlp_chunk=8))
        with activate(mesh):
            ls, cs, gs = fc(sm.replace(lora=None), sm.lora, jax.device_put(one, NamedSharding(mesh, P())), key)
        out[f"{base} one row fsdp=8 mlp_chunk"] = {
            "loss": float(ls), "loss_1dev": float(l1), "count_equal": int(cs) == int(c1), "loss_rel": _rel(ls, l1),
            "grad_rel": max(_rel(a, b) for a, b in zip(jax.tree_util.tree_leaves(gs), jax.tree_util.tree_leaves(g1b)))}
    out["constraints"] = _child_constraints(model)
    return out


def _child_constraints(model):
    """Under activate(mesh), constrain_layer gathers one layer (NF4 leaves too), constrain_rows splits rows."""
    import jax

    from jaxsloth.sharding import (activate, constrain_heads, constrain_layer, constrain_rows, make_mesh,
                                   per_device_token_loss, sequence_split, shard_model)

    mesh = make_mesh("data=2,fsdp=4")
    layers = shard_model(model, mesh).params["layers"]
    layer0 = jax.jit(lambda ls: jax.tree_util.tree_map(lambda x: x[0], ls))(layers)
    x = jax.numpy.zeros((8, 16, 64))
    with activate(mesh):
        gathered = jax.jit(constrain_layer)(layer0)
        rows = jax.jit(lambda v: constrain_rows(v * 2))(x)
        one_row = jax.jit(lambda v: constrain_rows(v * 2))(jax.numpy.zeros((1, 16, 64)))
    codes = gathered["q"].codes
    one_mesh = make_mesh("fsdp=8")
    with activate(one_mesh):  # one row of 16 tokens, 8 heads: the sequence is split, attention by heads
        split = sequence_split(1, 16)
        heads = jax.jit(lambda v: constrain_heads(v * 2))(jax.numpy.zeros((1, 16, 8, 4)))
        heads_odd = jax.jit(lambda v: constrain_heads(v * 2))(jax.numpy.zeros((1, 16, 6, 4)))
    seen = []

    def token_loss(h, w, labels):  # what one device sees: its own 8 / 8 = 1 row of 16 tokens
        seen.append(tuple(h.shape))
        return (h @ w.T).sum(), jax.numpy.int32(labels.shape[0])

    x = jax.random.normal(jax.random.PRNGKey(0), (8, 16, 64))
    w = jax.random.normal(jax.random.PRNGKey(1), (10, 64))
    labels = jax.numpy.zeros((8, 16), jax.numpy.int32)
    with activate(mesh):
        loss_sum, count = jax.jit(lambda *a: per_device_token_loss(token_loss, *a))(x, w, labels)
    xo, lo = x[:1], labels[:1]  # one row: each device takes its 2 of the 16 tokens
    with activate(one_mesh):
        one_sum, one_count = jax.jit(lambda *a: per_device_token_loss(token_loss, *a))(xo, w, lo)
    return {"per_device_tokens": list(seen[0]), "per_device_count": int(count),
            "one_row_per_device_tokens": list(seen[1]), "one_row_count": int(one_count),
            "one_row_loss_rel": _rel(one_sum, (xo @ w.T).sum()),
            "sequence_split": split, "heads_shard_shape": list(heads.sharding.shard_shape(heads.shape)),
            "heads_odd_replicated": heads_odd.sharding.is_fully_replicated,
            "per_device_loss_rel": _rel(loss_sum, (x @ w.T).sum()),
            "layer_sharded_before": not layer0["q"].codes.sharding.is_fully_replicated,
            "layer_replicated_after": all(leaf.sharding.is_fully_replicated
                                          for leaf in jax.tree_util.tree_leaves(gathered)),
            "codes_shape": list(codes.shape),
            "rows_shard_shape": list(rows.sharding.shard_shape(rows.shape)),
            "one_row_shard_shape": list(one_row.sharding.shard_shape(one_row.shape))}


def _child_checkpoints(path, fresh_dir, resume_dir):
    """On a data=2,fsdp=2 mesh: train 6 steps from scratch; resume a 1-device run at step 3."""
    from jaxsloth.train import Trainer

    model, rows = _build(path)
    mesh = "data=2,fsdp=2"
    fresh = Trainer(model, rows, _train_args(fresh_dir, 1, mesh), log=lambda *_: None)
    fresh.train()
    resumed = Trainer(model, rows, _train_args(resume_dir, 1, mesh), log=lambda *_: None)
    trained = resumed.train(resume=True)
    a = trained.lora["q"]["a"]
    data_parallel = Trainer(model, rows, _train_args(os.path.join(os.path.dirname(str(fresh_dir)), "dp"), 1, "data=4"), log=lambda *_: None)
    assert data_parallel.data_parallel
    data_parallel.train()
    return {"fresh": _losses(fresh), "resumed": _losses(resumed), "data_parallel": _losses(data_parallel),
            "resumed_lora_devices": len(a.sharding.device_set), "resumed_lora_spec": str(a.sharding.spec)}


def _run_child(devices, *args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} --xla_cpu_multi_thread_eigen=false"}
    proc = subprocess.run([sys.executable, __file__, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def parity(tiny_checkpoint):
    return _run_child(8, "parity", tiny_checkpoint("llama3"))


@pytest.mark.parametrize("base", ["f32", "nf4"])
@pytest.mark.parametrize("spec", ["data=2,fsdp=4", "data=8", "shard_map data=8", "one row fsdp=8",
                                  "one row fsdp=8 mlp_chunk"])
def test_sharded_loss_and_gradients_equal_single_device(parity, base, spec):
    r = parity[f"{base} {spec}"]
    assert parity["devices"] == 8
    assert r["count_equal"]
    assert r["loss_rel"] <= TOL, r
    assert r["grad_rel"] <= TOL, r


def test_fsdp_really_splits_weights_and_adapters(parity):
    for base in ("f32", "nf4"):
        fsdp, data = parity[f"{base} data=2,fsdp=4"], parity[f"{base} data=8"]
        # q [L, 64, 64] (NF4 codes [L, 64, 32]): the out-features dim is split 4 ways under fsdp=4
        assert fsdp["q_shard_shape"][1] * 4 == fsdp["q_shape"][1], fsdp
        assert fsdp["lora_a_shard_shape"] == [2, R // 4, 64], fsdp
        assert data["q_shard_shape"] == data["q_shape"], data  # data parallel: replicated


def test_layer_and_row_constraints_apply_under_a_mesh(parity):
    c = parity["constraints"]
    assert c["layer_sharded_before"] and c["layer_replicated_after"], c  # the per-layer FSDP gather
    assert c["rows_shard_shape"] == [1, 16, 64], c                       # 8 rows over 8 devices
    assert c["one_row_shard_shape"] == [1, 2, 64], c                     # 1 row: its 16 tokens over 8


def test_loss_is_taken_per_device_and_summed(parity):
    c = parity["constraints"]
    assert c["per_device_tokens"] == [16, 64], c  # one row of 16 tokens on each of 8 devices
    assert c["per_device_count"] == 8 * 16, c
    assert c["per_device_loss_rel"] <= TOL, c
    assert c["one_row_per_device_tokens"] == [2, 64], c  # one row: 2 of its 16 tokens per device
    assert c["one_row_count"] == 16, c
    assert c["one_row_loss_rel"] <= TOL, c


def test_attention_is_split_by_heads_when_the_sequence_is(parity):
    c = parity["constraints"]
    assert c["sequence_split"] == 8, c
    assert c["heads_shard_shape"] == [1, 16, 1, 4], c  # 8 heads over 8 devices, whole sequence each
    assert c["heads_odd_replicated"], c                 # 6 heads do not split 8 ways: left to GSPMD


def test_constraints_are_no_ops_without_a_mesh():
    import jax.numpy as jnp

    from jaxsloth.sharding import constrain_layer, constrain_rows

    x = jnp.ones((8, 4))
    tree = {"w": x}
    assert constrain_layer(tree) is tree
    assert constrain_rows(x) is x


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, tmp_path_factory):
    """Checkpoints crossing device counts: 1 device -> 4 devices and 4 devices -> 1 device."""
    from jaxsloth.train import Trainer

    path = tiny_checkpoint("llama3")
    tmp = tmp_path_factory.mktemp("sharded-ckpt")
    model, rows = _build(path)
    # the global batch is per_device x devices: 4 x 1 here, 1 x 4 in the child, the same data
    single = Trainer(model, rows, _train_args(tmp / "one", 4), log=lambda *_: None)
    single.train()
    shutil.copytree(tmp / "one", tmp / "one_to_four")
    shutil.rmtree(tmp / "one_to_four" / "checkpoints" / "6")
    child = _run_child(4, "checkpoints", path, tmp / "four", tmp / "one_to_four")
    shutil.copytree(tmp / "four", tmp / "four_to_one")
    shutil.rmtree(tmp / "four_to_one" / "checkpoints" / "6")
    resumed = Trainer(model, rows, _train_args(tmp / "four_to_one", 4), log=lambda *_: None)
    trained = resumed.train(resume=True)
    return {"single": _losses(single), **child, "four_to_one": _losses(resumed),
            "four_to_one_lora_devices": len(trained.lora["q"]["a"].sharding.device_set)}


def test_sharded_training_matches_single_device_curve(checkpoints):
    np.testing.assert_allclose(checkpoints["fresh"], checkpoints["single"], rtol=TOL)


def test_data_parallel_training_matches_single_device_curve(checkpoints):
    """data=4 (fsdp=1) takes the shard_map path in the Trainer: the same 6-step curve as one device."""
    np.testing.assert_allclose(checkpoints["data_parallel"], checkpoints["single"], rtol=TOL)


def test_checkpoint_from_4_devices_resumes_on_1(checkpoints):
    assert checkpoints["four_to_one_lora_devices"] == 1
    np.testing.assert_allclose(checkpoints["four_to_one"][3:], checkpoints["single"][3:], rtol=TOL)


def test_checkpoint_from_1_device_resumes_on_4(checkpoints):
    assert checkpoints["resumed_lora_devices"] == 4, checkpoints["resumed_lora_spec"]
    np.testing.assert_allclose(checkpoints["resumed"][3:], checkpoints["single"][3:], rtol=TOL)


# --------------------------------------------------------------------------------- mesh spec errors
@pytest.mark.parametrize("spec, message", [
    ("data=2,fsdp=2", "asks for data=2 x fsdp=2 = 4 devices, but 1"),
    ("data=two", "cannot read 'data=two'"),
    ("model=1", "unknown axis 'model'"),
    ("data=1,data=1", "given twice"),
    ("data=0", "size >= 1"),
    ("", "names no axis"),
])
def test_bad_mesh_spec_is_refused(spec, message):
    from jaxsloth.sharding import MeshError, make_mesh

    with pytest.raises(MeshError, match=message):
        make_mesh(spec)


class _Device:
    def __init__(self, bytes_limit):
        self.bytes_limit = bytes_limit

    def memory_stats(self):
        return None if self.bytes_limit is None else {"bytes_limit": self.bytes_limit}


@pytest.mark.parametrize("bytes_limit, expect", [
    (None, {"data": 2, "fsdp": 1}),        # no memory figure (CPU): data parallel
    (80 * 2**30, {"data": 2, "fsdp": 1}),  # base far below a quarter of the card: data parallel
    (2**10, {"data": 1, "fsdp": 2}),       # base above a quarter of the card: FSDP
])
def test_default_mesh_picks_fsdp_only_for_a_large_base(tiny_checkpoint, bytes_limit, expect):
    from jaxsloth.sharding import default_mesh_shape

    model, _ = _build(tiny_checkpoint("llama3"))
    assert default_mesh_shape(2, model, device=_Device(bytes_limit)) == expect


def test_training_arguments_refuse_a_mesh_that_does_not_fit(tiny_checkpoint, tmp_path):
    from jaxsloth.sharding import MeshError
    from jaxsloth.train import Trainer

    model, rows = _build(tiny_checkpoint("llama3"))
    with pytest.raises(MeshError, match="1 CPU device"):
        Trainer(model, rows, _train_args(tmp_path, 2, "data=2"), log=lambda *_: None)


if __name__ == "__main__":
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # as conftest does for the parent
    task, *rest = sys.argv[1:]
    result = _child_parity(*rest) if task == "parity" else _child_checkpoints(*rest)
    print(json.dumps(result))

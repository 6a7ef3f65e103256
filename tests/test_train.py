"""Training: gradient and loss-curve parity with PEFT + PyTorch, accumulation, packing, resume."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import LlamaForCausalLM, get_linear_schedule_with_warmup

import jaxsloth
from jaxsloth.data import BatchStream, prepare_data
from jaxsloth.model import HF_PROJECTION_NAMES
from jaxsloth.train import (TrainingArguments, Trainer, TrainingError, accumulated_loss_and_grads,
                            fix_untrained_tokens_if_used)

R, ALPHA = 4, 8


def _records(n=16, seed=0):
    from jaxsloth.tiny import addition_records

    return addition_records(n, seed)


@pytest.fixture(scope="module")
def setup(tiny_checkpoint):
    import datasets

    path = tiny_checkpoint("llama3")
    model, tok = jaxsloth.load_model(path, dtype="float32")
    model = jaxsloth.add_lora(model, r=R, lora_alpha=ALPHA, seed=1)
    # non-zero B so that every adapter gets a gradient and a wrong one shows
    keys = jax.random.split(jax.random.PRNGKey(7), len(model.lora))
    lora = {name: {"a": ab["a"], "b": 0.05 * jax.random.normal(k, ab["b"].shape)}
            for k, (name, ab) in zip(keys, model.lora.items())}
    model = model.replace(lora=lora)
    rows = prepare_data(datasets.Dataset.from_list(_records()), tok, 256, train_on_responses_only=True)
    return path, model, rows


def _peft_model(path, model):
    ref = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    cfg = PeftLoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=model.lora_config.hf_target_modules)
    peft = get_peft_model(ref, cfg)
    layers = peft.base_model.model.model.layers
    for name, ab in model.lora.items():
        a, b = np.asarray(ab["a"]), np.asarray(ab["b"])
        for i, layer in enumerate(layers):
            mod = layer.get_submodule(HF_PROJECTION_NAMES[name])
            mod.lora_A["default"].weight.data = torch.tensor(a[i])
            mod.lora_B["default"].weight.data = torch.tensor(b[i])
    return peft


def _torch_loss(peft, batch):
    """Mean CE over labels of a [B, S] batch, labels already shifted (as ours)."""
    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    labels = torch.tensor(batch["labels"], dtype=torch.long)
    logits = peft(input_ids=ids).logits  # right padding only: causal attention is exact
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum") / (labels != -100).sum()


def _torch_grads(peft, model):
    layers = peft.base_model.model.model.layers
    out = {}
    for name in model.lora:
        mods = [layer.get_submodule(HF_PROJECTION_NAMES[name]) for layer in layers]
        out[name] = {"a": np.stack([m.lora_A["default"].weight.grad.numpy() for m in mods]),
                     "b": np.stack([m.lora_B["default"].weight.grad.numpy() for m in mods])}
    return out


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def test_lora_gradients_match_peft(setup):
    path, model, rows = setup
    stream = BatchStream(rows, batch_size=4, accum_steps=1, seed=0)
    batch = stream.batch(0)
    loss, _, grads = accumulated_loss_and_grads(model.replace(lora=None), model.lora, batch, jax.random.PRNGKey(0))
    peft = _peft_model(path, model)
    ref_loss = _torch_loss(peft, {k: v[0] for k, v in batch.items()})
    ref_loss.backward()
    ref = _torch_grads(peft, model)
    assert abs(float(loss) - ref_loss.item()) / ref_loss.item() <= 1e-5
    for name in model.lora:
        for part in ("a", "b"):
            assert _rel(grads[name][part], ref[name][part]) <= 1e-4, (name, part)


def test_accumulation_equals_one_big_batch(setup):
    _, model, rows = setup
    base = model.replace(lora=None)
    big = BatchStream(rows, batch_size=8, accum_steps=1, seed=0, shuffle=False).batch(0)
    split = BatchStream(rows, batch_size=2, accum_steps=4, seed=0, shuffle=False).batch(0)
    l1, c1, g1 = accumulated_loss_and_grads(base, model.lora, big, jax.random.PRNGKey(0))
    l4, c4, g4 = accumulated_loss_and_grads(base, model.lora, split, jax.random.PRNGKey(0))
    assert int(c1) == int(c4)
    np.testing.assert_allclose(float(l4), float(l1), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g4), jax.tree_util.tree_leaves(g1)):
        assert _rel(a, b) <= 1e-5


def test_20_step_loss_curve_matches_peft_and_torch_adamw(setup, tmp_path):
    path, model, rows = setup
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             learning_rate=3e-3, max_steps=20, warmup_steps=3, lr_scheduler_type="linear",
                             weight_decay=0.01, max_grad_norm=1.0, seed=5, progress=False, remat="none")
    trainer = Trainer(model, rows, args, log=lambda *_: None)
    trainer.train()
    ours = [h["loss"] for h in trainer.history]

    peft = _peft_model(path, model)
    params = [p for p in peft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, args.warmup_steps, args.max_steps)
    ref = []
    for step in range(args.max_steps):
        batch = trainer.stream.batch(step)
        labels = batch["labels"]
        total = (labels != -100).sum()
        opt.zero_grad()
        step_loss = 0.0
        for a in range(labels.shape[0]):  # accumulate sums, divide once, as HF does with num_items_in_batch
            micro = {k: v[a] for k, v in batch.items()}
            loss = _torch_loss(peft, micro) * (labels[a] != -100).sum() / total
            loss.backward()
            step_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ref.append(step_loss)
    rel = np.abs(np.array(ours) - np.array(ref)) / np.array(ref)
    assert rel.max() <= 1e-3, rel
    assert ours[-1] < ours[0], "the loss should fall over 20 steps"


def test_resume_reproduces_uninterrupted_curve(setup, tmp_path):
    _, model, rows = setup
    kw = dict(per_device_train_batch_size=2, learning_rate=3e-3, max_steps=6, save_steps=3, seed=3,
              progress=False, remat="full")
    full = Trainer(model, rows, TrainingArguments(output_dir=str(tmp_path / "a"), **kw), log=lambda *_: None)
    full.train()
    # an interrupted run: the same directory as it was after step 3
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "6")
    resumed = Trainer(model, rows, TrainingArguments(output_dir=str(tmp_path / "b"), **kw), log=lambda *_: None)
    resumed.train(resume=True)
    a = [h["loss"] for h in full.history]
    b = [h["loss"] for h in resumed.history]
    assert len(b) == 6
    np.testing.assert_allclose(b, a, rtol=1e-6)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5, 6]


def test_non_finite_loss_stops_with_message(setup, tmp_path):
    _, model, rows = setup
    bad = jax.tree_util.tree_map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), model.lora)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, progress=False)
    with pytest.raises(TrainingError, match="non-finite loss"):
        Trainer(model.replace(lora=bad), rows, args, log=lambda *_: None).train()


def test_training_without_lora_is_refused(setup, tmp_path):
    _, model, rows = setup
    with pytest.raises(ValueError, match="add_lora"):
        Trainer(model.replace(lora=None), rows, TrainingArguments(output_dir=str(tmp_path)))


def test_lora_dropout_changes_the_loss_only_when_on(setup):
    _, model, rows = setup
    batch = BatchStream(rows, batch_size=2, accum_steps=1, seed=0).batch(0)
    base = model.replace(lora=None)
    dropped = base.replace(lora_config=dataclasses.replace(model.lora_config, lora_dropout=0.5))
    l0, _, _ = accumulated_loss_and_grads(base, model.lora, batch, jax.random.PRNGKey(0))
    l1, _, _ = accumulated_loss_and_grads(dropped, model.lora, batch, jax.random.PRNGKey(0))
    l2, _, _ = accumulated_loss_and_grads(dropped, model.lora, batch, jax.random.PRNGKey(1))
    assert float(l1) != float(l0) and float(l2) != float(l1)


def test_embedding_fix_is_applied_when_the_data_uses_untrained_tokens(tiny_checkpoint):
    import datasets

    model, tok = jaxsloth.load_model(tiny_checkpoint("llama3", untrained_tokens=True), dtype="float32")
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    chat = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": "yo"}]}])
    plain = datasets.Dataset.from_list([{"text": "hello world"}])
    logs = []
    fixed = fix_untrained_tokens_if_used(model, prepare_data(chat, tok, 64), log=logs.append)
    assert eot in fixed.fixed_token_ids and "<|eot_id|>" in logs[-1]
    row = np.asarray(fixed.params["embed"][eot])
    assert np.abs(row).max() > 0, "the fixed row must no longer be zero"
    untouched = fix_untrained_tokens_if_used(model, prepare_data(plain, tok, 64), log=logs.append)
    assert untouched.fixed_token_ids == () and "none used by the data" in logs[-1]


def test_out_of_memory_gets_actionable_message(setup, tmp_path):
    _, model, rows = setup
    trainer = Trainer(model, rows, TrainingArguments(output_dir=str(tmp_path), max_steps=2, progress=False),
                      log=lambda *_: None)

    def oom(*args):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81.2GiB")

    trainer.step_fn = oom
    with pytest.raises(TrainingError, match=r"out of GPU memory.*max_seq_length.*remat='offload'"):
        trainer.train()


def test_non_finite_step_keeps_the_last_good_checkpoint(setup, tmp_path):
    _, model, rows = setup
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=5, save_steps=1, progress=False)
    trainer = Trainer(model, rows, args, log=lambda *_: None)
    real, calls = trainer.step_fn, []

    def nan_on_third(lora, opt_state, *rest):
        calls.append(1)
        lora, opt_state, m = real(lora, opt_state, *rest)
        if len(calls) == 3:
            m = {**m, "loss": jnp.float32(jnp.nan), "finite": jnp.bool_(False)}
        return lora, opt_state, m

    trainer.step_fn = nan_on_third
    with pytest.raises(TrainingError, match="non-finite loss or gradient at step 3.*last good checkpoint is step 2"):
        trainer.train()
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2]


def test_memory_presets_train_on_the_same_curve(setup, tmp_path):
    _, model, rows = setup
    curves = []
    for i, kw in enumerate([dict(remat="none"), dict(remat="full", remat_group=2, mlp_chunk=32)]):
        args = TrainingArguments(output_dir=str(tmp_path / str(i)), per_device_train_batch_size=2, max_steps=3,
                                 learning_rate=3e-3, progress=False, **kw)
        trainer = Trainer(model, rows, args, log=lambda *_: None)
        trainer.train()
        curves.append([h["loss"] for h in trainer.history])
    np.testing.assert_allclose(curves[1], curves[0], rtol=1e-5)


def test_bad_memory_settings_are_refused(setup, tmp_path):
    _, model, rows = setup
    with pytest.raises(ValueError, match="remat_group"):
        Trainer(model, rows, TrainingArguments(output_dir=str(tmp_path), remat="none", remat_group=2))
    with pytest.raises(ValueError, match="mlp_chunk"):
        Trainer(model, rows, TrainingArguments(output_dir=str(tmp_path), mlp_chunk=0))
    with pytest.raises(ValueError, match="loss_chunk"):
        Trainer(model, rows, TrainingArguments(output_dir=str(tmp_path), loss_chunk=-1))


def test_donated_adapters_and_small_chunks_train_the_same(setup, tmp_path):
    """donate_model_lora: the step takes the model's own LoRA arrays (one device copy, as in torch):
    the same curve as the default copy, and the caller's arrays are gone afterwards (not silently
    kept alive beside the trained ones)."""
    _, model, rows = setup
    kw = dict(per_device_train_batch_size=2, learning_rate=3e-3, max_steps=3, seed=3, progress=False, remat="full")
    kept = Trainer(model, rows, TrainingArguments(output_dir=str(tmp_path / "a"), **kw), log=lambda *_: None)
    kept_model = kept.train()
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(model.lora))  # default: the caller's stays
    mine = jax.tree_util.tree_map(jnp.copy, model.lora)  # a model this test may give away
    given = model.replace(lora=mine)
    # the leanest memory options ride along: they change the schedule of the step, not its values
    donated = Trainer(given, rows, TrainingArguments(output_dir=str(tmp_path / "b"), donate_model_lora=True,
                                                     loss_chunk=16, mlp_chunk=8, **kw), log=lambda *_: None)
    trained = donated.train()
    np.testing.assert_allclose([h["loss"] for h in donated.history], [h["loss"] for h in kept.history], rtol=1e-5)
    assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(mine))
    for a, b in zip(jax.tree_util.tree_leaves(trained.lora), jax.tree_util.tree_leaves(kept_model.lora)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)

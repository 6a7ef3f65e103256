"""The untrained-token fix: which rows it finds, what it writes, what it never touches."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxsloth
from jaxsloth.embedding_fix import (apply_untrained_token_fix, find_untrained_tokens, protected_token_ids,
                                    untrained_tokens_used)
from jaxsloth.tiny import NUM_RESERVED


def _zeroed_ids(tokenizer):
    names = [f"<|reserved_special_token_{i}|>" for i in range(NUM_RESERVED)]
    names += ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    return sorted(tokenizer.convert_tokens_to_ids(n) for n in names)


@pytest.fixture(scope="module")
def llama3(tiny_checkpoint):
    return jaxsloth.load_model(tiny_checkpoint("llama3", untrained_tokens=True), dtype="float32")[0]


@pytest.fixture(scope="module")
def llama32(tiny_checkpoint):
    return jaxsloth.load_model(tiny_checkpoint("llama3.2", untrained_tokens=True), dtype="float32")[0]


def test_finds_exactly_the_zeroed_rows(llama3):
    assert find_untrained_tokens(llama3.config, llama3.params, llama3.tokenizer) == _zeroed_ids(llama3.tokenizer)


def test_trained_checkpoint_has_no_untrained_rows(tiny_checkpoint):
    model, _ = jaxsloth.load_model(tiny_checkpoint("llama3"), dtype="float32")
    assert find_untrained_tokens(model.config, model.params, model.tokenizer) == []
    fixed_model, fixed = apply_untrained_token_fix(model)
    assert fixed == () and fixed_model is model


def test_fix_changes_exactly_the_untrained_rows_to_the_trained_mean(llama3):
    fixed_model, fixed = apply_untrained_token_fix(llama3)
    ids = _zeroed_ids(llama3.tokenizer)
    assert list(fixed) == ids and fixed_model.fixed_token_ids == tuple(ids)
    for key in ("embed", "lm_head"):
        before, after = np.asarray(llama3.params[key]), np.asarray(fixed_model.params[key])
        trained = np.ones(len(before), bool)
        trained[ids] = False
        np.testing.assert_array_equal(after[trained], before[trained])
        mean = before[trained].astype(np.float64).mean(0)
        # f32 sum of ~370 rows of N(0,1)/N(0,0.02) values: agreement to a few f32 ulps of the sum
        np.testing.assert_allclose(after[ids], np.broadcast_to(mean, (len(ids), len(mean))), rtol=1e-4, atol=1e-6)
        assert np.abs(after[ids]).max() > 0


def test_bos_eos_pad_are_never_touched(tiny_checkpoint):
    model, tok = jaxsloth.load_model(tiny_checkpoint("llama3", untrained_tokens=True), dtype="float32")
    special = sorted(protected_token_ids(model.config, tok))
    assert {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id} <= set(special)
    embed = model.params["embed"].at[jnp.asarray(special)].set(0)  # zero them: they still must not count
    head = model.params["lm_head"].at[jnp.asarray(special)].set(0)
    model = model.replace(params={**model.params, "embed": embed, "lm_head": head})
    assert not set(find_untrained_tokens(model.config, model.params, tok)) & set(special)
    fixed_model, _ = apply_untrained_token_fix(model)
    np.testing.assert_array_equal(np.asarray(fixed_model.params["embed"])[special], 0)
    with pytest.raises(ValueError, match="bos/eos/pad"):
        apply_untrained_token_fix(model, [tok.bos_token_id])


def test_tied_embeddings_fixed_once(llama32):
    assert "lm_head" not in llama32.params
    fixed_model, fixed = apply_untrained_token_fix(llama32)
    assert list(fixed) == _zeroed_ids(llama32.tokenizer)
    assert "lm_head" not in fixed_model.params
    after = np.asarray(fixed_model.params["embed"])
    assert np.all(after[list(fixed)] == after[fixed[0]]) and np.abs(after[fixed[0]]).max() > 0


def test_llama31_pattern_identical_nonzero_lm_head_rows(llama3):
    # Llama-3.1: untrained lm_head rows are one shared non-zero vector, not zeros
    ids = _zeroed_ids(llama3.tokenizer)
    head = llama3.params["lm_head"].at[jnp.asarray(ids)].set(jnp.full((64,), 0.37, jnp.float32))
    model = llama3.replace(params={**llama3.params, "lm_head": head})
    assert find_untrained_tokens(model.config, model.params, model.tokenizer) == ids
    # a zero embedding whose lm_head row is distinct and non-zero was trained as an output: not fixed
    head = head.at[ids[0]].set(jnp.linspace(-1, 1, 64))
    model = model.replace(params={**model.params, "lm_head": head})
    assert find_untrained_tokens(model.config, model.params, model.tokenizer) == ids[1:]


def test_bf16_fix_written_in_bf16_from_an_f32_mean(tiny_checkpoint):
    model, _ = jaxsloth.load_model(tiny_checkpoint("llama3", untrained_tokens=True), dtype="bfloat16")
    fixed_model, fixed = apply_untrained_token_fix(model)
    after = fixed_model.params["embed"]
    assert after.dtype == jnp.bfloat16
    before = np.asarray(model.params["embed"], np.float32)
    trained = np.ones(len(before), bool)
    trained[list(fixed)] = False
    expect = before[trained].mean(0)
    np.testing.assert_allclose(np.asarray(after, np.float32)[fixed[0]], expect, rtol=2 ** -8, atol=1e-6)


def test_second_application_is_a_no_op_and_keeps_the_record(llama3):
    once, fixed = apply_untrained_token_fix(llama3)
    twice, again = apply_untrained_token_fix(once)
    assert again == () and twice.fixed_token_ids == fixed
    np.testing.assert_array_equal(np.asarray(once.params["embed"]), np.asarray(twice.params["embed"]))


def test_explicit_token_ids_and_bad_ids(llama3):
    ids = _zeroed_ids(llama3.tokenizer)[:2]
    fixed_model, fixed = apply_untrained_token_fix(llama3, ids)
    assert list(fixed) == ids
    other = _zeroed_ids(llama3.tokenizer)[2]
    assert np.abs(np.asarray(fixed_model.params["embed"])[other]).max() == 0
    with pytest.raises(ValueError, match="outside the vocabulary"):
        apply_untrained_token_fix(llama3, [llama3.config.vocab_size])


def test_untrained_tokens_used_reports_only_tokens_in_the_data(llama3):
    ids = _zeroed_ids(llama3.tokenizer)
    tok = llama3.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    used = tok(chat, add_special_tokens=False)["input_ids"]
    found = untrained_tokens_used(used, ids)
    expect = sorted(tok.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"))
    assert found == expect
    assert untrained_tokens_used(np.array([[1, 2], [3, 4]]), ids) == []

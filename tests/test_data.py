"""Data pipeline: formats, chat template, response-only labels, packing without leaks, bad input."""

import json

import datasets
import numpy as np
import pytest

import jaxsloth
from jaxsloth.data import IGNORE, DataError, prepare_data, tokenize_dataset


@pytest.fixture(scope="module")
def model_tok(tiny_checkpoint):
    return jaxsloth.load_model(tiny_checkpoint("llama3"), dtype="float32")


@pytest.fixture(scope="module")
def tok(model_tok):
    return model_tok[1]


def _chat(q, a):
    return {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q},
                         {"role": "assistant", "content": a}]}


def test_chat_rows_have_one_bos_and_labels_only_on_the_response(tok):
    rows = prepare_data(datasets.Dataset.from_list([_chat("12+7?", "19")]), tok, 128)
    ids = rows.input_ids[0][rows.segment_ids[0] > 0]
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    targets = rows.labels[0][rows.labels[0] != IGNORE]
    assert tok.decode(targets) == "19<|eot_id|>"


def test_chat_text_matches_the_template(tok):
    rec = _chat("hi", "hello there")
    rows = prepare_data(datasets.Dataset.from_list([rec]), tok, 128)
    ids = rows.input_ids[0][rows.segment_ids[0] > 0]
    assert tok.decode(ids) == tok.apply_chat_template(rec["messages"], tokenize=False)


def test_alpaca_loss_everywhere_by_default_and_on_response_when_asked(tok):
    ds = datasets.Dataset.from_list([{"instruction": "Add.", "input": "1 + 2", "output": "3"}])
    full = prepare_data(ds, tok, 256)
    resp = prepare_data(ds, tok, 256, train_on_responses_only=True)
    n_tokens = int((full.segment_ids > 0).sum())
    assert full.num_label_tokens == n_tokens - 1  # every next-token target
    assert tok.decode(resp.labels[0][resp.labels[0] != IGNORE]) == "3<|end_of_text|>"


def test_formats_load_from_local_files(tok, tmp_path):
    recs = [{"instruction": f"Echo {i}.", "output": str(i)} for i in range(5)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    (tmp_path / "d.json").write_text(json.dumps(recs))
    datasets.Dataset.from_list(recs).to_csv(str(tmp_path / "d.csv"))
    datasets.Dataset.from_list(recs).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "saved"))
    counts = {p: prepare_data(tmp_path / p, tok, 256).num_examples
              for p in ("d.jsonl", "d.json", "d.csv", "d.parquet", "saved")}
    assert set(counts.values()) == {5}, counts


def test_truncation_is_counted(tok):
    ds = datasets.Dataset.from_list([{"text": "word " * 200}, {"text": "short"}])
    rows = prepare_data(ds, tok, 32)
    assert rows.truncated == 1 and rows.input_ids.shape[1] == 32


def test_packing_restarts_positions_and_separates_segments(tok):
    ds = datasets.Dataset.from_list([_chat(f"q{i}", f"answer {i}") for i in range(6)])
    rows = prepare_data(ds, tok, 128, packing=True)
    assert len(rows) < 6  # several examples share a row
    seg, pos = rows.segment_ids[0], rows.position_ids[0]
    starts = np.flatnonzero(np.diff(seg, prepend=0) != 0)
    assert (pos[starts[seg[starts] > 0]] == 0).all()
    # the last token of each example predicts nothing: no loss across the boundary
    for s in range(1, seg.max() + 1):
        last = np.flatnonzero(seg == s)[-1]
        assert rows.labels[0][last] == IGNORE


def test_packed_logits_equal_each_example_alone(model_tok):
    model, tok = model_tok
    ds = datasets.Dataset.from_list([_chat("first?", "one"), _chat("second question?", "two two")])
    packed = prepare_data(ds, tok, 128, packing=True)
    assert len(packed) == 1
    logits = np.asarray(model(packed.input_ids, position_ids=packed.position_ids, segment_ids=packed.segment_ids))
    for s in (1, 2):
        where = packed.segment_ids[0] == s
        alone = np.asarray(model(packed.input_ids[0][where][None]))[0]
        np.testing.assert_allclose(logits[0][where], alone, rtol=1e-5, atol=1e-5 * np.abs(alone).max())


def test_empty_dataset(tok):
    with pytest.raises(DataError, match="empty"):
        tokenize_dataset(datasets.Dataset.from_list([]), tok, 64)


def test_missing_columns(tok):
    ds = datasets.Dataset.from_list([{"question": "a", "answer": "b"}])
    with pytest.raises(DataError, match=r"cannot tell the format from columns \['answer', 'question'\]"):
        prepare_data(ds, tok, 64)


def test_all_labels_masked_is_refused(tok):
    # the response is cut off by truncation: nothing left to learn from
    ds = datasets.Dataset.from_list([_chat("a long question " * 20, "x")])
    with pytest.raises(DataError, match="every example has all its labels masked"):
        prepare_data(ds, tok, 16)


def test_chat_without_template_is_refused(tok):
    bare = tok.__class__.from_pretrained(tok.name_or_path)
    bare.chat_template = None
    with pytest.raises(DataError, match="needs a chat template"):
        prepare_data(datasets.Dataset.from_list([_chat("q", "a")]), bare, 64)


def test_missing_file_and_unknown_type(tok, tmp_path):
    with pytest.raises(DataError, match="not found"):
        prepare_data(tmp_path / "nope.jsonl", tok, 64)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match=r"unsupported data file type '\.txt'"):
        prepare_data(tmp_path / "x.txt", tok, 64)

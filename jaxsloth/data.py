"""Training data: local files via ``datasets`` -> tokenized, label-masked, optionally packed rows.

Formats (detected from the columns):
  alpaca  instruction, [input], output            -> the Alpaca prompt, loss on the response only if asked
  chat    messages: [{"role", "content"}, ...]     -> the tokenizer's chat template, loss on assistant turns
  text    text                                     -> plain causal LM on every token

Every row has the same length S (static shapes, one compile). Arrays, all [rows, S]:
  input_ids     int32
  labels        int32, already shifted: labels[t] is the target of position t, -100 = no loss
  segment_ids   int32, 1..k for the examples packed in a row, 0 for padding
  position_ids  int32, restarting at 0 in every segment
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

IGNORE = -100

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


class DataError(ValueError):
    """A dataset we cannot train on, with the reason."""


@dataclasses.dataclass
class Examples:
    """Tokenized examples before packing: token ids and a per-token 'train on this' flag."""

    ids: list[list[int]]
    trainable: list[list[bool]]
    truncated: int = 0
    dropped_no_labels: int = 0


@dataclasses.dataclass
class Rows:
    input_ids: np.ndarray
    labels: np.ndarray
    segment_ids: np.ndarray
    position_ids: np.ndarray
    num_examples: int
    truncated: int
    dropped_no_labels: int

    def __len__(self):
        return self.input_ids.shape[0]

    @property
    def num_label_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


def load_records(path):
    """A ``datasets.Dataset`` from a local JSON/JSONL/Parquet/CSV file or a saved dataset directory."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: dataset not found")
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise DataError(f"{path}: not a dataset saved with Dataset.save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{path}: saved DatasetDict has no 'train' split (has {list(ds)})")
            ds = ds["train"]
        return ds
    kinds = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
    kind = kinds.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported data file type {path.suffix!r} (expected .json, .jsonl, .parquet, .csv "
                        "or a saved dataset directory)")
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:
        raise DataError(f"{path}: cannot read as {kind} ({type(e).__name__}: {e})") from None


def detect_format(columns, source="dataset") -> str:
    cols = set(columns)
    if "messages" in cols:
        return "chat"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if "text" in cols:
        return "text"
    raise DataError(f"{source}: cannot tell the format from columns {sorted(cols)}: expected 'messages' (chat), "
                    "'instruction' + 'output' (+ optional 'input') (Alpaca), or 'text'")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _alpaca_example(tokenizer, rec, responses_only: bool):
    inp = (rec.get("input") or "").strip()
    prompt = ALPACA_PROMPT.format(
        with_input=", paired with an input that provides further context" if inp else "",
        instruction=rec["instruction"], input_block=f"### Input:\n{inp}\n\n" if inp else "")
    p_ids = [tokenizer.bos_token_id] + _encode(tokenizer, prompt)
    r_ids = _encode(tokenizer, str(rec["output"])) + [tokenizer.eos_token_id]
    return p_ids + r_ids, [not responses_only] * len(p_ids) + [True] * len(r_ids)


def _chat_example(tokenizer, messages, responses_only: bool, idx: int):
    """Render with the chat template piece by piece, so each assistant turn's tokens are known exactly."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"example {idx}: 'messages' must be a non-empty list of {{role, content}}")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"example {idx}: every message needs 'role' and 'content', got {m!r}")

    def render(msgs, gen=False):
        if not msgs and not gen:
            return ""
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    ids, train, done = [], [], ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            head = render(messages[:i], gen=True)  # everything up to the assistant header
            piece = head[len(done):]
            ids += _encode(tokenizer, piece)
            train += [not responses_only] * (len(ids) - len(train))
            done = head
        full = render(messages[: i + 1])
        if not full.startswith(done):
            raise DataError("the chat template does not render messages incrementally; cannot mask responses")
        piece_ids = _encode(tokenizer, full[len(done):])
        ids += piece_ids
        train += [m["role"] == "assistant" or not responses_only] * len(piece_ids)
        done = full
    return ids, train


def tokenize_dataset(ds, tokenizer, max_seq_length: int, *, fmt: str | None = None,
                     train_on_responses_only: bool | None = None, source="dataset") -> Examples:
    if len(ds) == 0:
        raise DataError(f"{source}: the dataset is empty")
    fmt = fmt or detect_format(ds.column_names, source)
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{source}: chat-format data needs a chat template, and this tokenizer has none "
                        "(set tokenizer.chat_template or use a checkpoint whose tokenizer_config has one)")
    responses_only = (fmt == "chat") if train_on_responses_only is None else train_on_responses_only
    if fmt == "text" and responses_only:
        raise DataError(f"{source}: 'text' data has no responses to restrict the loss to")
    bos = tokenizer.bos_token_id
    out = Examples([], [])
    for i, rec in enumerate(ds):
        if fmt == "alpaca":
            ids, train = _alpaca_example(tokenizer, rec, responses_only)
        elif fmt == "chat":
            ids, train = _chat_example(tokenizer, rec["messages"], responses_only, i)
        else:
            ids = [bos] + _encode(tokenizer, rec["text"]) + [tokenizer.eos_token_id]
            train = [True] * len(ids)
        while len(ids) > 1 and ids[0] == bos and ids[1] == bos:  # no double BOS whatever the template did
            ids, train = ids[1:], train[1:]
        if len(ids) > max_seq_length:
            ids, train = ids[:max_seq_length], train[:max_seq_length]
            out.truncated += 1
        if not any(train[1:]):
            out.dropped_no_labels += 1
            continue
        out.ids.append(ids)
        out.trainable.append(train)
    if not out.ids:
        raise DataError(f"{source}: every example has all its labels masked (after truncation to "
                        f"max_seq_length={max_seq_length}); nothing to train on")
    return out


def build_rows(examples: Examples, max_seq_length: int, *, packing: bool, pad_id: int,
               pad_to_multiple: int = 64) -> Rows:
    """Turn examples into fixed-length rows (packed first-fit in order, or one example per row)."""
    if packing:
        groups, cur, used = [], [], 0
        for k, ids in enumerate(examples.ids):
            if cur and used + len(ids) > max_seq_length:
                groups.append(cur)
                cur, used = [], 0
            cur.append(k)
            used += len(ids)
        groups.append(cur)
        seq = max_seq_length
    else:
        groups = [[k] for k in range(len(examples.ids))]
        longest = max(len(x) for x in examples.ids)
        seq = min(max_seq_length, -(-longest // pad_to_multiple) * pad_to_multiple)
    n = len(groups)
    input_ids = np.full((n, seq), pad_id, np.int32)
    labels = np.full((n, seq), IGNORE, np.int32)
    segment_ids = np.zeros((n, seq), np.int32)
    position_ids = np.zeros((n, seq), np.int32)
    for r, group in enumerate(groups):
        at = 0
        for s, k in enumerate(group, start=1):
            ids, train = examples.ids[k], examples.trainable[k]
            m = len(ids)
            input_ids[r, at: at + m] = ids
            # shifted targets inside the example only: the last token of an example predicts nothing
            tgt = np.where(np.asarray(train[1:], bool), np.asarray(ids[1:]), IGNORE)
            labels[r, at: at + m - 1] = tgt
            segment_ids[r, at: at + m] = s
            position_ids[r, at: at + m] = np.arange(m)
            at += m
    return Rows(input_ids, labels, segment_ids, position_ids, len(examples.ids), examples.truncated,
                examples.dropped_no_labels)


def prepare_data(path_or_ds, tokenizer, max_seq_length: int, *, packing: bool = False,
                 train_on_responses_only: bool | None = None, fmt: str | None = None) -> Rows:
    """One call from a file (or a ``datasets.Dataset``) to training rows."""
    source = str(path_or_ds) if isinstance(path_or_ds, (str, Path)) else "dataset"
    ds = load_records(path_or_ds) if isinstance(path_or_ds, (str, Path)) else path_or_ds
    examples = tokenize_dataset(ds, tokenizer, max_seq_length, fmt=fmt,
                                train_on_responses_only=train_on_responses_only, source=source)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return build_rows(examples, max_seq_length, packing=packing, pad_id=pad)


class BatchStream:
    """Deterministic batches: epoch-wise permutations from ``seed``; position = optimizer steps done.

    Step k takes rows [k*A*B, (k+1)*A*B) of the concatenated permutations, shaped [A, B, S],
    so resuming at step k gives exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, rows: Rows, batch_size: int, accum_steps: int, seed: int, shuffle: bool = True):
        self.rows, self.b, self.a, self.seed, self.shuffle = rows, batch_size, accum_steps, seed, shuffle
        self._perms = {}

    @property
    def rows_per_step(self) -> int:
        return self.a * self.b

    def _perm(self, epoch):
        if epoch not in self._perms:
            n = len(self.rows)
            self._perms[epoch] = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                                  else np.arange(n))
        return self._perms[epoch]

    def indices(self, step: int) -> np.ndarray:
        n = len(self.rows)
        flat = np.arange(step * self.rows_per_step, (step + 1) * self.rows_per_step)
        return np.array([self._perm(i // n)[i % n] for i in flat])

    def batch(self, step: int) -> dict[str, np.ndarray]:
        idx = self.indices(step)
        shape = (self.a, self.b, -1)
        r = self.rows
        return {"input_ids": r.input_ids[idx].reshape(shape), "labels": r.labels[idx].reshape(shape),
                "segment_ids": r.segment_ids[idx].reshape(shape), "position_ids": r.position_ids[idx].reshape(shape)}

"""Hugging Face Llama directory -> (config, JAX params, tokenizer), streamed tensor by tensor.

Reads config.json, single or sharded ``*.safetensors`` (with ``model.safetensors.index.json``),
and the tokenizer files. Each tensor is read from its memory-mapped file, validated against the
shape the config implies, cast, placed on the device and (with ``load_in_4bit``) quantized to NF4
before the next one is read, so host RAM never holds the model twice. Stacked per-layer arrays
are filled in place (donated updates), not concatenated at the end.

Pre-quantized bitsandbytes 4-bit checkpoints (``quantization_config.quant_method ==
"bitsandbytes"``) are read as NF4 directly, never dequantized to disk or to 16 bits.

Only safetensors are read: pickle-based ``.bin``/``.pt`` files are refused, never unpickled.
"""

from __future__ import annotations

import json
import re
import threading
from typing import NamedTuple
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxsloth.config import CheckpointError, LlamaConfig, read_json
from jaxsloth.model import HF_PROJECTION_NAMES, PROJECTIONS
from jaxsloth.quant import NF4, quantize_nf4

# Buffers some exporters leave in the file; they hold nothing we load.
IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_NORMS = {"input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "mlp_norm"}


def _dtype(name) -> jnp.dtype:
    try:
        dt = jnp.dtype(name)
    except TypeError:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {name!r}") from None
    if dt not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {name!r}")
    return dt


def expected_tensors(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, as the config implies (16-bit checkpoint)."""
    d, v = cfg.hidden_size, cfg.vocab_size
    out = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (v, d)
    shapes = cfg.linear_shapes()
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (d,)
        out[p + "post_attention_layernorm.weight"] = (d,)
        for short, hf in HF_PROJECTION_NAMES.items():
            out[f"{p}{hf}.weight"] = shapes[short]
    return out


def find_weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it. Refuses pickle-only checkpoints."""
    return {name: sf.path for name, sf in _weight_headers(model_dir).items()}


def _weight_headers(model_dir: Path) -> dict[str, SafetensorsFile]:
    """Tensor name -> the parsed header of the file holding it (each file parsed once)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map'): {e}") from None
        headers: dict[Path, SafetensorsFile] = {}
        files = {}
        for name, fname in weight_map.items():
            path = model_dir / fname
            if not path.is_file():
                raise CheckpointError(f"{index}: tensor {name!r} is mapped to {fname}, which does not exist")
            if path not in headers:
                headers[path] = SafetensorsFile(path)
            files[name] = headers[path]
        return files
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in model_dir.iterdir()
                         if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        if pickles:
            raise CheckpointError(
                f"{model_dir}: only pickle-based weights found ({', '.join(pickles)}); jaxsloth reads "
                "safetensors only and never unpickles files. Convert once with transformers: "
                "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)")
        raise CheckpointError(f"{model_dir}: no *.safetensors weight files found")
    files = {}
    for shard in shards:
        sf = SafetensorsFile(shard)
        files.update(dict.fromkeys(sf.keys(), sf))
    return files


# safetensors dtype names -> numpy dtypes (bf16/fp8 via ml_dtypes, which JAX depends on)
_ST_DTYPES = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
              "U32": np.uint32, "I32": np.int32, "U64": np.uint64, "I64": np.int64,
              "F16": np.float16, "F32": np.float32, "F64": np.float64, "BF16": ml_dtypes.bfloat16,
              "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


class SafetensorsFile:
    """One safetensors file's header, validated up front, and whole-tensor reads into fresh arrays.

    The reads are plain ``readinto`` calls at the header's offsets: unlike ``safe_open(...,
    "numpy").get_tensor`` (a copy out of a memory map that holds the GIL), they release the GIL and
    avoid a page fault per 4 KiB, so a reader thread overlaps with the device work and with the
    tokenizer's imports (bench/load_profile.py; bench/RESULTS.md "Checkpoint to first step").
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: file is truncated (shorter than a safetensors header)")
                n = int.from_bytes(head, "little")
                try:
                    header = json.loads(f.read(n))
                    if not isinstance(header, dict):
                        raise ValueError("not a JSON object")
                except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
                    raise CheckpointError(f"{self.path}: corrupt safetensors header") from None
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read safetensors file ({e})") from None
        self.data_start = 8 + n
        self.tensors: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = np.dtype(_ST_DTYPES[meta["dtype"]])
                shape = tuple(int(d) for d in meta["shape"])
                begin, end = (int(o) for o in meta["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor {name!r} has a corrupt or unsupported header entry "
                                      f"{meta!r} (expected dtype one of {sorted(_ST_DTYPES)}, shape, "
                                      "data_offsets)") from None
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or begin < 0:
                raise CheckpointError(f"{self.path}: corrupt safetensors header: tensor {name!r} has "
                                      f"data_offsets {[begin, end]} for shape {list(shape)} {meta['dtype']}")
            self.tensors[name] = (dtype, shape, begin, end)
        end = max((t[3] for t in self.tensors.values()), default=0)
        size = self.path.stat().st_size
        if size < self.data_start + end:
            raise CheckpointError(f"{self.path}: file is truncated ({size} bytes, header promises "
                                  f"{self.data_start + end})")

    def keys(self):
        return self.tensors.keys()

    def nbytes(self, name: str) -> int:
        _, _, begin, end = self.tensors[name]
        return end - begin

    def read(self, name: str, f) -> np.ndarray:
        """Tensor ``name`` as a new array, read through ``f``, an open binary handle on the file."""
        dtype, shape, begin, end = self.tensors[name]
        out = np.empty(shape, dtype)
        try:
            got = _read_at(f, self.data_start + begin, out)
        except OSError as e:
            raise CheckpointError(f"{self.path}: tensor {name!r} cannot be read ({e})") from None
        if got != end - begin:
            raise CheckpointError(f"{self.path}: tensor {name!r} cannot be read (got {got} of {end - begin} "
                                  "bytes); is the file truncated?")
        return out


def _read_at(f, offset: int, out: np.ndarray) -> int:
    f.seek(offset)
    view = memoryview(out.reshape(-1).view(np.uint8))
    got = 0
    while got < len(view):
        k = f.readinto(view[got:])
        if not k:
            break
        got += k
    return got


class _Prefetcher:
    """Reads (file, tensor) pairs in order on a background thread, at most ``budget`` bytes ahead
    of the consumer (one tensor always: a tensor larger than the budget is read alone), so that
    reading the next tensors overlaps with placing and quantizing the current one on the device
    while host RAM holds only a bounded window of the checkpoint."""

    def __init__(self, items: list[tuple[SafetensorsFile, str]], budget: int = 512 << 20):
        self.items, self.budget = items, budget
        self.cond = threading.Condition()
        self.ready: dict[int, np.ndarray] = {}
        self.in_flight = 0     # bytes read and not yet taken
        self.error: BaseException | None = None
        self.stop = False
        self.thread = threading.Thread(target=self._run, name="jaxsloth-safetensors-reader", daemon=True)
        self.thread.start()

    def _run(self):
        path, handle = None, None   # the file being read (items come in file order)
        try:
            for i, (sf, name) in enumerate(self.items):
                size = sf.nbytes(name)
                with self.cond:
                    self.cond.wait_for(lambda: self.stop or self.in_flight == 0
                                       or self.in_flight + size <= self.budget)
                    if self.stop:
                        return
                    self.in_flight += size
                if sf.path != path:
                    if handle is not None:
                        handle.close()
                    path, handle = sf.path, open(sf.path, "rb")
                arr = sf.read(name, handle)
                with self.cond:
                    self.ready[i] = arr
                    self.cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            with self.cond:
                self.error = e
                self.cond.notify_all()
        finally:
            if handle is not None:
                handle.close()

    def get(self, i: int) -> np.ndarray:
        with self.cond:
            self.cond.wait_for(lambda: i in self.ready or self.error is not None)
            if i not in self.ready:
                raise self.error
            arr = self.ready.pop(i)
            self.in_flight -= arr.nbytes
            self.cond.notify_all()
            return arr

    def close(self):
        with self.cond:
            self.stop = True
            self.cond.notify_all()
        self.thread.join()


def _set_layer(stack, i, value):
    return jax.lax.dynamic_update_index_in_dim(stack, value.astype(stack.dtype), i, 0)


_set_layer = jax.jit(_set_layer, donate_argnums=0)


def _bnb_quant_config(raw: dict, source: Path) -> dict | None:
    qc = raw.get("quantization_config")
    if not qc:
        return None
    if qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit"):
        raise CheckpointError(
            f"{source}: quantization_config {qc.get('quant_method')!r} is not supported "
            "(jaxsloth reads 16-bit checkpoints and bitsandbytes 4-bit NF4 checkpoints)")
    if qc.get("bnb_4bit_quant_type", "fp4") != "nf4":
        raise CheckpointError(f"{source}: bnb_4bit_quant_type must be 'nf4', found {qc.get('bnb_4bit_quant_type')!r}")
    skipped = set(qc.get("llm_int8_skip_modules") or [])
    return {"skip": skipped}


class _Plan(NamedTuple):
    """What load_checkpoint will read, from config.json and the safetensors headers alone."""
    cfg: LlamaConfig
    expected: dict[str, tuple[int, ...]]
    linear_names: dict[str, tuple[int, str]]
    bnb_key_sets: dict[str, set[str]]
    items: list[tuple[SafetensorsFile, str]]   # (file, tensor) in file order


def _plan(model_dir: Path) -> _Plan:
    """Validate a checkpoint directory without reading a tensor: config.json, the bitsandbytes
    quantization config, the tensor names against the config, and every tensor's shape and dtype."""
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a directory (expected a Hugging Face model directory)")
    cfg_path = model_dir / "config.json"
    raw_cfg = read_json(cfg_path, what="config.json")
    cfg = LlamaConfig.from_dict(raw_cfg, source=str(cfg_path))
    bnb = _bnb_quant_config(raw_cfg, cfg_path)
    files = _weight_headers(model_dir)

    expected = expected_tensors(cfg)
    linear_names = {f"model.layers.{i}.{hf}.weight": (i, short)
                    for i in range(cfg.num_hidden_layers) for short, hf in HF_PROJECTION_NAMES.items()}
    # bitsandbytes linears: HF name of the weight -> every tensor name of its quant state
    bnb_key_sets: dict[str, set[str]] = {}
    if bnb is not None:
        from convert.bnb import bnb_keys

        present = set(files)
        for n in linear_names:
            prefix = n[: -len(".weight")]
            keys = set(bnb_keys(prefix, double_quant=f"{n}.nested_absmax" in present))
            if keys <= present:
                bnb_key_sets[n] = keys
    bnb_linears = set(bnb_key_sets)
    consumed_extra = set().union(*bnb_key_sets.values()) - bnb_linears if bnb_key_sets else set()

    missing = sorted(set(expected) - set(files))
    extra = sorted(n for n in set(files) - set(expected) - consumed_extra if not IGNORED_TENSORS.match(n))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing tensors: {_preview(missing)}")
        if extra:
            parts.append(f"unexpected tensors: {_preview(extra)}")
        raise CheckpointError(f"{model_dir}: checkpoint does not match config.json "
                              f"({cfg.num_hidden_layers} layers, tie_word_embeddings={cfg.tie_word_embeddings}); "
                              + "; ".join(parts))

    # every header is parsed and every shape and dtype checked before any tensor is read
    items: list[tuple[SafetensorsFile, str]] = []
    for name, sf in files.items():
        if IGNORED_TENSORS.match(name):
            continue
        if name not in sf.tensors:
            raise CheckpointError(f"{sf.path}: tensor {name!r} is listed in the index but not in the file")
        if _owner_linear(name, bnb_linears) is None:
            dtype, shape = sf.tensors[name][:2]
            if shape != expected[name]:
                raise CheckpointError(f"{sf.path}: tensor {name!r} has shape {list(shape)}, but config.json "
                                      f"implies {list(expected[name])}")
            if not np.issubdtype(dtype, np.floating) and dtype.name != "bfloat16":
                raise CheckpointError(f"{sf.path}: tensor {name!r} has dtype {dtype}, expected a float type "
                                      "(a 4-bit tensor needs a bitsandbytes quantization_config)")
        items.append((sf, name))
    items.sort(key=lambda it: (str(it[0].path), it[0].tensors[it[1]][2]))   # file order: sequential reads

    return _Plan(cfg, expected, linear_names, bnb_key_sets, items)


def load_checkpoint(model_dir, *, dtype="bfloat16", load_in_4bit: bool = False, blocksize: int = 64,
                    double_quant: bool = True, progress: bool = False):
    """Load a HF Llama directory. Returns ``(config, params, meta)``.

    ``meta`` records where the weights came from: {"source": dir, "quantized": None | "nf4-on-load"
    | "bnb-4bit", "dtype": name}.
    """
    model_dir = Path(model_dir)
    dt = _dtype(dtype)
    cfg, expected, linear_names, bnb_key_sets, items = _plan(model_dir)
    bnb_linears = set(bnb_key_sets)
    L = cfg.num_hidden_layers
    quantize = load_in_4bit or bool(bnb_linears)
    params = {"embed": None, "final_norm": None,
              "layers": {"attn_norm": jnp.zeros((L, cfg.hidden_size), dt),
                         "mlp_norm": jnp.zeros((L, cfg.hidden_size), dt)}}
    dense_stacks, nf4_layers = {}, _NF4Stacks(L)
    if not quantize:
        for short, shape in cfg.linear_shapes().items():
            dense_stacks[short] = jnp.zeros((L, *shape), dt)

    pbar = None
    if progress:
        from tqdm import tqdm
        pbar = tqdm(total=len(expected), desc="loading", unit="tensor")
    pending_bnb: dict[str, dict[str, np.ndarray]] = {}
    reader = _Prefetcher(items)
    try:
        for k, (sf, name) in enumerate(items):
            path = sf.path
            host = reader.get(k)
            base_linear = _owner_linear(name, bnb_linears)
            if base_linear is not None:
                from convert.bnb import nf4_from_bnb_tensors
                prefix = base_linear[: -len(".weight")]
                bucket = pending_bnb.setdefault(prefix, {})
                bucket[name] = host
                if set(bucket) == bnb_key_sets[base_linear]:
                    i, short = linear_names[base_linear]
                    nf4_layers.set(short, i, nf4_from_bnb_tensors(
                        prefix, pending_bnb.pop(prefix), cfg.linear_shapes()[short], source=str(path)))
                    if pbar:
                        pbar.update()
                continue
            _place(params, dense_stacks, nf4_layers, name, host, dt, linear_names, quantize,
                   blocksize, double_quant)
            del host
            if pbar:
                pbar.update()
    finally:
        reader.close()
    if pbar:
        pbar.close()
    if pending_bnb:
        prefix = next(iter(pending_bnb))
        raise CheckpointError(f"{model_dir}: incomplete bitsandbytes quant state for {prefix!r}")

    if quantize:
        params["layers"].update(nf4_layers.finish(model_dir))
    else:
        params["layers"].update(dense_stacks)
    source = "bnb-4bit" if bnb_linears else ("nf4-on-load" if load_in_4bit else None)
    return cfg, params, {"source": str(model_dir), "quantized": source, "dtype": jnp.dtype(dt).name}


def abstract_checkpoint(model_dir, *, dtype="bfloat16", load_in_4bit: bool = False, blocksize: int = 64,
                        double_quant: bool = True):
    """``load_checkpoint``'s ``(config, params, meta)`` with ``jax.ShapeDtypeStruct`` leaves, from
    config.json and the safetensors headers alone (the checkpoint is validated as for loading; no
    tensor is read): for compiling a training step while the weights load.

    Pre-quantized bitsandbytes checkpoints are refused: their quantization layout is known only
    from the quant state stored with the weights.
    """
    model_dir = Path(model_dir)
    dt = _dtype(dtype)
    plan = _plan(model_dir)
    cfg = plan.cfg
    if plan.bnb_key_sets:
        raise CheckpointError(f"{model_dir}: abstract_checkpoint does not support pre-quantized bitsandbytes "
                              "checkpoints (their layout is in the quant state stored with the weights); "
                              "load them with load_checkpoint")
    sds = jax.ShapeDtypeStruct
    L, d, v = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    params = {"embed": sds((v, d), dt), "final_norm": sds((d,), dt),
              "layers": {"attn_norm": sds((L, d), dt), "mlp_norm": sds((L, d), dt)}}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = sds((v, d), dt)
    file_dtype = {name: sf.tensors[name][0] for sf, name in plan.items}
    stack = lambda a: sds((L, *a.shape), a.dtype)  # noqa: E731
    for short, shape in cfg.linear_shapes().items():
        if load_in_4bit:   # quantized from the file's dtype (layer 0's), as _place does
            src = jnp.dtype(file_dtype[f"model.layers.0.{HF_PROJECTION_NAMES[short]}.weight"])
            q = jax.eval_shape(lambda w: quantize_nf4(w, blocksize=blocksize, double_quant=double_quant),
                               sds(shape, src))
            params["layers"][short] = jax.tree_util.tree_map(stack, q)
        else:
            params["layers"][short] = sds((L, *shape), dt)
    meta = {"source": str(model_dir), "quantized": "nf4-on-load" if load_in_4bit else None,
            "dtype": jnp.dtype(dt).name}
    return cfg, params, meta


class _NF4Stacks:
    """Stacked NF4 weights [L, ...] filled layer by layer in place (no concatenation at the end,
    which would hold the quantized model twice on the device)."""

    def __init__(self, num_layers: int):
        self.num_layers, self.stacks, self.filled = num_layers, {}, {}

    def set(self, short: str, i: int, q: NF4):
        if short not in self.stacks:
            self.stacks[short] = jax.tree_util.tree_map(
                lambda a: jnp.zeros((self.num_layers, *a.shape), a.dtype), q)
            self.filled[short] = set()
        self.stacks[short] = jax.tree_util.tree_map(lambda s, a: _set_layer(s, i, a), self.stacks[short], q)
        self.filled[short].add(i)

    def finish(self, source) -> dict[str, NF4]:
        for short in PROJECTIONS:
            missing = set(range(self.num_layers)) - self.filled.get(short, set())
            if missing:
                raise CheckpointError(f"{source}: no weight loaded for {short} of layers {sorted(missing)[:5]}")
        return dict(self.stacks)


def _owner_linear(name: str, bnb_linears: set[str]) -> str | None:
    if not bnb_linears:
        return None
    base = name.split(".weight")[0] + ".weight"
    return base if base in bnb_linears else None


def _place(params, dense_stacks, nf4_layers, name, host, dt, linear_names, quantize, blocksize, double_quant):
    if name == "model.embed_tokens.weight":
        params["embed"] = jnp.asarray(host, dt)
    elif name == "lm_head.weight":
        params["lm_head"] = jnp.asarray(host, dt)
    elif name == "model.norm.weight":
        params["final_norm"] = jnp.asarray(host, dt)
    elif name in linear_names:
        i, short = linear_names[name]
        if quantize:
            nf4_layers.set(short, i, quantize_nf4(jnp.asarray(host), blocksize=blocksize,
                                                  double_quant=double_quant))
        else:
            dense_stacks[short] = _set_layer(dense_stacks[short], i, jnp.asarray(host))
    else:
        m = _LAYER_KEY.match(name)
        i, rest = int(m.group(1)), m.group(2)
        key = _NORMS[rest]
        params["layers"][key] = _set_layer(params["layers"][key], i, jnp.asarray(host))


def _preview(names: list[str], n: int = 5) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def load_tokenizer(model_dir):
    """The checkpoint's tokenizer via transformers (local files only, never remote code)."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise CheckpointError(f"{model_dir}: no tokenizer files (tokenizer.json / tokenizer_config.json) found")
    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)

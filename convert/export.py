"""JAX model -> files PyTorch loads: PEFT LoRA adapters and merged Hugging Face checkpoints.

Three entry points, all writing atomically (a hidden temp dir next to ``out_dir``, renamed into
place at the end; an existing ``out_dir`` is refused unless ``overwrite=True``; on any error,
including a full disk, nothing is left behind):

- ``export_adapter(model, out_dir)``: ``adapter_model.safetensors`` + ``adapter_config.json`` in
  PEFT's format, f32, keys ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``
  [R, in] / ``...lora_B.weight`` [out, R]. Rows rewritten by the untrained-token fix
  (``model.fixed_token_ids``) travel with it as PEFT ``trainable_token_indices``: only those rows
  are stored (``...embed_tokens.token_adapter.trainable_tokens_delta`` [n, D], and the same for
  ``lm_head`` when it is not tied). PEFT's TrainableTokens layer *replaces* the listed rows by the
  stored values (it is named "delta" but holds the rows themselves). For a peft that predates
  trainable tokens, ``embedding_rows="modules_to_save"`` stores the whole embed_tokens and lm_head
  instead (untied models; "auto" picks it when the installed peft lacks trainable tokens).
- ``export_merged(model, out_dir, dtype)``: a plain HF checkpoint with W + scaling * B @ A in every
  targeted projection (merged in f32, rounded once to ``dtype``), the embedding rows as the model
  holds them (fixed when ``apply_untrained_token_fix`` ran; the export does not run it itself), sharded
  safetensors + index, config.json (no quantization_config), tokenizer and generation config. The
  base W is the model's own weights: the 16-bit arrays it holds, or its NF4 weights dequantized
  (exactly what the 4-bit model computed with); ``base="source"`` re-reads the 16-bit tensors from
  the checkpoint the 4-bit model was quantized from. config.json's ``"jaxsloth"`` field and the
  README.md say which. A model without LoRA gives a plain (re-)export.
  Shards are streamed tensor by tensor straight into their file (the safetensors header is known
  up front from the shapes), so host RAM holds one tensor at a time, not one shard.
- ``load_adapter(model, adapter_dir)``: reads a PEFT LoRA adapter (ours or PEFT's own) back into
  ``model.lora`` / ``model.lora_config`` and the fixed rows into the embeddings, to continue
  training. Merged exports load with ``jaxsloth.load_model`` like any checkpoint.

Dims: L layers, R LoRA rank, D hidden, V vocab; projections are HF layout W [out, in].
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from jaxsloth.config import CheckpointError, read_json
from jaxsloth.lora import LoraConfig, normalize_targets
from jaxsloth.model import HF_PROJECTION_NAMES, PROJECTIONS
from jaxsloth.quant import NF4, dequantize_nf4

__all__ = ["export_adapter", "export_merged", "load_adapter", "load_model_with_adapter", "register_export_command",
           "ExportError", "write_safetensors_streamed", "ADAPTER_WEIGHTS", "ADAPTER_CONFIG", "DEFAULT_MAX_SHARD_BYTES"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
PEFT_PREFIX = "base_model.model."
EMBED_ROWS_KEY = PEFT_PREFIX + "model.embed_tokens.token_adapter.trainable_tokens_delta"
HEAD_ROWS_KEY = PEFT_PREFIX + "lm_head.token_adapter.trainable_tokens_delta"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "added_tokens.json")
_OUT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_HF_SHORT = {hf.split(".")[-1]: short for short, hf in HF_PROJECTION_NAMES.items()}
_LORA_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])"
                       r"(?:\.default)?\.weight$")


class ExportError(OSError):
    """Writing an export failed (disk full, permissions...); nothing was left in the output path."""


# ----------------------------------------------------------------------------------------------
# atomic output directory


def _fail(e: OSError, what: str) -> ExportError:
    reason = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        reason = "no space left on the device (disk full)"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = f"permission denied ({e.strerror or e})"
    return ExportError(e.errno, f"{what}: {reason}")


@contextlib.contextmanager
def _atomic_dir(out_dir, overwrite: bool, protect: tuple = ()):
    """Yield a temp dir beside ``out_dir``; on success it becomes ``out_dir``, on error it is removed."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} exists and is not a directory; choose another output path")
        if not overwrite:
            raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    for p in protect:
        if p is None:
            continue
        p = Path(p).absolute()
        if p == out_dir or out_dir in p.parents:
            raise ValueError(f"refusing to write the export to {out_dir}: it holds the model's source checkpoint "
                             f"{p}, which the export reads; choose another output directory")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    except OSError as e:
        raise _fail(e, f"cannot create the export directory {out_dir}") from e
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the export the usual permissions
        yield tmp
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
            try:
                os.replace(tmp, out_dir)
            except OSError:
                os.replace(old, out_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, (ExportError, FileExistsError)):
            raise _fail(e, f"export to {out_dir} failed, nothing was written") from e
        raise


def _check_free_space(parent: Path, nbytes: int, out_dir):
    free = shutil.disk_usage(parent).free
    if free < nbytes:
        raise ExportError(errno.ENOSPC, f"export to {out_dir} needs about {nbytes / 1e9:.2f} GB but {parent} has "
                                        f"{free / 1e9:.2f} GB free; nothing was written")


def _write_json(path: Path, obj):
    path.write_text(json.dumps(obj, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# streamed safetensors writing


def _safetensors_header(entries: list[tuple[str, str, tuple[int, ...], int]]) -> bytes:
    """Header bytes (length prefix + JSON, space-padded to 8) for (name, dtype, shape, nbytes) in file order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dt, shape, nbytes in entries:
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def write_tensor_bytes(f, array: np.ndarray):
    """Append one tensor's raw little-endian bytes to an open shard (one tensor in host RAM at a time)."""
    f.write(np.ascontiguousarray(array).view(np.uint8).reshape(-1))


def write_safetensors_streamed(path, entries, produce):
    """Write a safetensors file whose tensors are produced one by one, in ``entries`` order.

    ``entries``: (name, safetensors dtype "BF16"|"F16"|"F32", shape, nbytes); ``produce(name)`` returns
    that tensor as a host array. Only one tensor is in host RAM at a time.
    """
    with open(Path(path), "wb") as f:
        f.write(_safetensors_header(entries))
        for name, _, shape, nbytes in entries:
            array = produce(name)
            if tuple(array.shape) != tuple(shape) or array.nbytes != nbytes:
                raise AssertionError(f"internal: {name} produced {array.shape}, planned {shape}")
            write_tensor_bytes(f, array)
            del array


# ----------------------------------------------------------------------------------------------
# LoRA checks shared by both exports


def _check_lora(model, *, required: bool):
    """Validate model.lora against the config; return (lora, lora_config) or (None, None)."""
    if model.lora is None:
        if required:
            raise ValueError("export_adapter: the model has no LoRA adapters, so there is no adapter to export. "
                             "Attach them with jaxsloth.add_lora(model, ...) (and train), or write the base model "
                             "as a plain Hugging Face checkpoint with export_merged(model, out_dir)")
        return None, None
    if model.lora_config is None:
        raise ValueError("model.lora is set but model.lora_config is None: cannot tell r, lora_alpha and scaling")
    lcfg = model.lora_config
    unknown = [k for k in model.lora if k not in PROJECTIONS]
    if unknown:
        hf_names = [HF_PROJECTION_NAMES[p].split(".")[-1] for p in PROJECTIONS]
        raise ValueError(f"model.lora has unknown target modules {unknown}; jaxsloth exports LoRA on "
                         f"{list(PROJECTIONS)} (HF names {hf_names})")
    targets = normalize_targets(list(lcfg.target_modules))  # raises on unknown names in the config
    if set(targets) != set(model.lora):
        raise ValueError(f"lora_config.target_modules {list(targets)} does not match the adapters in model.lora "
                         f"{sorted(model.lora)}")
    cfg, shapes = model.config, model.config.linear_shapes()
    for name in targets:
        out_dim, in_dim = shapes[name]
        a, b = model.lora[name]["a"], model.lora[name]["b"]
        expect = {"a": (cfg.num_hidden_layers, lcfg.r, in_dim), "b": (cfg.num_hidden_layers, out_dim, lcfg.r)}
        for part, arr in (("a", a), ("b", b)):
            if tuple(arr.shape) != expect[part]:
                raise ValueError(f"model.lora[{name!r}][{part!r}] has shape {list(arr.shape)}, expected "
                                 f"{list(expect[part])} (layers, r={lcfg.r}, {name} {shapes[name]})")
    return model.lora, lcfg


def _alpha(value):
    return int(value) if float(value).is_integer() else float(value)


# ----------------------------------------------------------------------------------------------
# PEFT adapter


EMBEDDING_ROWS_MODES = ("auto", "trainable_tokens", "modules_to_save", "omit")
EMBED_FULL_KEY = PEFT_PREFIX + "model.embed_tokens.weight"
HEAD_FULL_KEY = PEFT_PREFIX + "lm_head.weight"


def peft_supports_trainable_tokens() -> bool:
    """True when the installed peft's LoraConfig has ``trainable_token_indices`` (or peft is absent)."""
    try:
        from peft import LoraConfig as PeftLoraConfig
    except ImportError:
        return True  # nothing installed here to be compatible with: write the compact, current format
    return "trainable_token_indices" in getattr(PeftLoraConfig, "__dataclass_fields__", {})


def _embedding_rows_mode(model, embedding_rows: str) -> str | None:
    if embedding_rows not in EMBEDDING_ROWS_MODES:
        raise ValueError(f"export_adapter: embedding_rows must be one of {EMBEDDING_ROWS_MODES}, "
                         f"got {embedding_rows!r}")
    if not model.fixed_token_ids:
        return None
    mode = embedding_rows
    if mode == "auto":
        mode = "trainable_tokens" if peft_supports_trainable_tokens() else "modules_to_save"
    if mode == "modules_to_save" and model.config.tie_word_embeddings:
        raise ValueError("export_adapter: embedding_rows='modules_to_save' cannot carry the fixed rows of a model "
                         "with tied embeddings (PEFT would not update the tied lm_head); use 'trainable_tokens' "
                         "(needs a peft with LoraConfig.trainable_token_indices) or export_merged")
    if mode == "omit":
        warnings.warn(f"export_adapter: the {len(model.fixed_token_ids)} embedding rows rewritten by the "
                      "untrained-token fix are NOT in this adapter; on the original base model those tokens keep "
                      "their untrained rows (see the adapter's README.md)")
    return mode


def adapter_config_dict(model, embedding_rows: str = "auto") -> dict:
    """adapter_config.json contents for ``model`` (PEFT LoraConfig fields)."""
    _, lcfg = _check_lora(model, required=True)
    mode = _embedding_rows_mode(model, embedding_rows)
    ids = [int(t) for t in model.fixed_token_ids]
    tied = model.config.tie_word_embeddings
    tti, modules_to_save = None, None
    if mode == "trainable_tokens":
        # a list targets the input embedding and PEFT ties the lm_head to it; untied: both, same rows
        tti = ids if tied else {"embed_tokens": ids, "lm_head": ids}
    elif mode == "modules_to_save":
        modules_to_save = ["embed_tokens", "lm_head"]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": model.source,
        "r": lcfg.r,
        "lora_alpha": _alpha(lcfg.lora_alpha),
        "lora_dropout": float(lcfg.lora_dropout),
        "target_modules": lcfg.hf_target_modules,
        "bias": "none",
        "use_rslora": bool(lcfg.use_rslora),
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": modules_to_save,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "trainable_token_indices": tti,
        "revision": None,
    }


def adapter_tensors(model, embedding_rows: str = "auto") -> dict[str, np.ndarray]:
    """PEFT key -> f32 array: LoRA A [R, in] / B [out, R] per layer, plus the fixed embedding rows."""
    lora, _ = _check_lora(model, required=True)
    mode = _embedding_rows_mode(model, embedding_rows)
    out = {}
    for name in PROJECTIONS:
        if name not in lora:
            continue
        a = np.asarray(lora[name]["a"], np.float32)
        b = np.asarray(lora[name]["b"], np.float32)
        for i in range(model.config.num_hidden_layers):
            prefix = f"{PEFT_PREFIX}model.layers.{i}.{HF_PROJECTION_NAMES[name]}"
            out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i])
            out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i])
    tied = model.config.tie_word_embeddings
    if mode == "trainable_tokens":
        idx = jnp.asarray([int(t) for t in model.fixed_token_ids])
        out[EMBED_ROWS_KEY] = np.asarray(jnp.take(model.params["embed"], idx, axis=0), np.float32)
        if not tied:
            out[HEAD_ROWS_KEY] = np.asarray(jnp.take(model.params["lm_head"], idx, axis=0), np.float32)
    elif mode == "modules_to_save":  # whole matrices (V x D each): what peft without trainable tokens can load
        out[EMBED_FULL_KEY] = np.asarray(model.params["embed"], np.float32)
        out[HEAD_FULL_KEY] = np.asarray(model.params["lm_head"], np.float32)
    return out


def _adapter_readme(model, config: dict) -> str:
    lcfg = model.lora_config
    ids = list(model.fixed_token_ids)
    lines = [
        "# LoRA adapter exported by jaxsloth", "",
        f"- base model: `{model.source}`",
        f"- r={lcfg.r}, lora_alpha={config['lora_alpha']}, use_rslora={lcfg.use_rslora} "
        f"(scaling {lcfg.scaling:g}), targets: {', '.join(config['target_modules'])}",
        "- weights: f32, PEFT key layout (`adapter_model.safetensors`)", "",
        "Load it with PEFT:", "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "from peft import PeftModel",
        f"base = AutoModelForCausalLM.from_pretrained({model.source!r})",
        "model = PeftModel.from_pretrained(base, '<this directory>')",
        "```", "",
        "or with jaxsloth, to continue training: "
        "`jaxsloth.load_adapter(jaxsloth.load_model(base_dir)[0], '<this directory>')`.", "",
        "## Embedding rows", "",
    ]
    where = "embed_tokens (lm_head is tied to it)" if model.config.tie_word_embeddings else "embed_tokens and lm_head"
    fixed = f"The untrained-token fix rewrote {len(ids)} rows of {where} (token ids {ids}). "
    if not ids:
        lines.append("No embedding rows were changed: the adapter holds LoRA weights only.")
    elif config["trainable_token_indices"] is not None:
        lines.append(fixed + "They travel with this adapter as PEFT `trainable_token_indices`: only those rows are "
                     "stored, and PEFT replaces the base model's rows by them on load. This needs a peft whose "
                     "LoraConfig knows `trainable_token_indices` (checked with peft 0.21).")
    elif config["modules_to_save"]:
        lines.append(fixed + "They travel with this adapter as PEFT `modules_to_save`: the whole embed_tokens and "
                     "lm_head matrices are stored (f32), replacing the base model's on load.")
    else:
        lines.append(fixed + "**They are NOT in this adapter** (exported with embedding_rows='omit'): on the "
                     "original base those tokens keep their untrained rows. Use the merged export, or re-export "
                     "with embedding_rows='trainable_tokens'.")
    return "\n".join(lines) + "\n"


def export_adapter(model, out_dir, *, overwrite: bool = False, embedding_rows: str = "auto") -> Path:
    """Write ``model``'s LoRA adapter (and fixed embedding rows) as a PEFT adapter directory.

    ``embedding_rows`` says how the rows of ``model.fixed_token_ids`` travel: "trainable_tokens"
    (PEFT ``trainable_token_indices``, only those rows), "modules_to_save" (whole embed_tokens and
    lm_head; untied models only), "omit" (warns), or "auto": trainable_tokens unless the installed
    peft predates it. Raises ValueError for a model without LoRA or with unknown target modules,
    FileExistsError when ``out_dir`` exists and ``overwrite`` is False, ExportError (an OSError)
    when writing fails (then nothing is left behind). Returns the output path.
    """
    config = adapter_config_dict(model, embedding_rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # adapter_config_dict already warned about omitted rows
        tensors = adapter_tensors(model, embedding_rows)
    entries = [(k, "F32", v.shape, v.nbytes) for k, v in tensors.items()]
    with _atomic_dir(out_dir, overwrite, protect=(model.source,)) as tmp:
        _check_free_space(tmp, sum(e[3] for e in entries), out_dir)
        write_safetensors_streamed(tmp / ADAPTER_WEIGHTS, entries, tensors.__getitem__)
        _write_json(tmp / ADAPTER_CONFIG, config)
        (tmp / "README.md").write_text(_adapter_readme(model, config))
    return Path(out_dir).absolute()


# ----------------------------------------------------------------------------------------------
# loading an adapter back


def _read_adapter_config(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no {ADAPTER_CONFIG} (expected a PEFT LoRA adapter directory)")
    raw = read_json(path, what=ADAPTER_CONFIG)
    if raw.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type must be 'LORA', found {raw.get('peft_type')!r}")
    unsupported = {
        "use_dora": bool(raw.get("use_dora")), "bias": raw.get("bias", "none") != "none",
        "fan_in_fan_out": bool(raw.get("fan_in_fan_out")), "rank_pattern": bool(raw.get("rank_pattern")),
        "alpha_pattern": bool(raw.get("alpha_pattern")),
        "layers_to_transform": raw.get("layers_to_transform") is not None,
        "modules_to_save": bool(set(raw.get("modules_to_save") or ()) - {"embed_tokens", "lm_head"}),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise CheckpointError(f"{path}: jaxsloth loads plain LoRA adapters; unsupported settings: "
                              + ", ".join(f"{k}={raw.get(k)!r}" for k in bad))
    for key in ("r", "lora_alpha", "target_modules"):
        if raw.get(key) is None:
            raise CheckpointError(f"{path}: required field {key!r} is missing")
    return raw


def load_adapter(model, adapter_dir):
    """``model`` with the LoRA adapter (and fixed embedding rows) of ``adapter_dir`` attached.

    Reads adapters written by :func:`export_adapter` or by PEFT's ``save_pretrained`` (LoRA on
    q/k/v/o/gate/up/down, optional ``trainable_token_indices``). The model must not already have
    adapters. Raises CheckpointError naming the file and tensor when something does not fit.
    """
    adapter_dir = Path(adapter_dir)
    if model.lora is not None:
        raise ValueError("load_adapter: the model already has LoRA adapters; start from the base model")
    cfg_path = adapter_dir / ADAPTER_CONFIG
    raw = _read_adapter_config(cfg_path)
    targets_raw = raw["target_modules"]
    if isinstance(targets_raw, str):
        if targets_raw != "all-linear":
            raise CheckpointError(f"{cfg_path}: target_modules as a regular expression ({targets_raw!r}) is not "
                                  "supported; list the module names")
    try:
        targets = normalize_targets(targets_raw)
    except ValueError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    r = raw["r"]
    lcfg = LoraConfig(r=int(r), lora_alpha=raw["lora_alpha"], target_modules=targets,
                      lora_dropout=float(raw.get("lora_dropout") or 0.0), use_rslora=bool(raw.get("use_rslora")))

    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        others = sorted(p.name for p in adapter_dir.glob("adapter_model.*"))
        hint = f" (found {others}; jaxsloth reads safetensors only and never unpickles files)" if others else ""
        raise CheckpointError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}{hint}")
    cfg = model.config
    L, shapes = cfg.num_hidden_layers, cfg.linear_shapes()
    found: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    rows: dict[str, np.ndarray] = {}
    full: dict[str, np.ndarray] = {}
    unexpected = []
    try:
        handle = safe_open(str(weights), framework="numpy")
    except Exception as e:
        raise CheckpointError(f"{weights}: cannot read safetensors file ({e})") from None
    with handle:
        for key in handle.keys():
            m = _LORA_KEY.match(key)
            short = _HF_SHORT.get(m.group(3)) if m else None
            if short is not None and f"{m.group(2)}.{m.group(3)}" == HF_PROJECTION_NAMES[short]:
                found.setdefault((short, m.group(4)), {})[int(m.group(1))] = handle.get_tensor(key)
            elif key in (EMBED_ROWS_KEY, EMBED_ROWS_KEY + ".default"):
                rows["embed"] = handle.get_tensor(key)
            elif key in (HEAD_ROWS_KEY, HEAD_ROWS_KEY + ".default"):
                rows["lm_head"] = handle.get_tensor(key)
            elif key == EMBED_FULL_KEY and "embed_tokens" in (raw.get("modules_to_save") or ()):
                full["embed"] = handle.get_tensor(key)
            elif key == HEAD_FULL_KEY and "lm_head" in (raw.get("modules_to_save") or ()):
                full["lm_head"] = handle.get_tensor(key)
            else:
                unexpected.append(key)
    if unexpected:
        raise CheckpointError(f"{weights}: unexpected tensors {unexpected[:5]}"
                              + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))
    lora = {}
    for name in targets:
        out_dim, in_dim = shapes[name]
        stacks = {}
        for part, shape in (("A", (lcfg.r, in_dim)), ("B", (out_dim, lcfg.r))):
            layers = found.pop((name, part), {})
            missing = [i for i in range(L) if i not in layers]
            if missing:
                raise CheckpointError(f"{weights}: missing lora_{part} of {HF_PROJECTION_NAMES[name]} for layers "
                                      f"{missing[:5]} (the base model has {L} layers)")
            extra = sorted(i for i in layers if i >= L)
            if extra:
                raise CheckpointError(f"{weights}: lora_{part} of {HF_PROJECTION_NAMES[name]} for layers {extra[:5]}, "
                                      f"but the base model has {L} layers")
            for i in range(L):
                if tuple(layers[i].shape) != shape:
                    raise CheckpointError(
                        f"{weights}: tensor {PEFT_PREFIX}model.layers.{i}.{HF_PROJECTION_NAMES[name]}.lora_{part}"
                        f".weight has shape {list(layers[i].shape)}, expected {list(shape)} "
                        f"(r={lcfg.r}, {name} {shapes[name]})")
            stacks[part] = jnp.asarray(np.stack([layers[i] for i in range(L)]).astype(np.float32))
        lora[name] = {"a": stacks["A"], "b": stacks["B"]}
    if found:
        (name, part), _ = next(iter(found.items()))
        raise CheckpointError(f"{weights}: holds lora_{part} for {HF_PROJECTION_NAMES[name]}, which "
                              f"{ADAPTER_CONFIG}'s target_modules {targets_raw} does not list")

    params, fixed = model.params, tuple(model.fixed_token_ids)
    tti = raw.get("trainable_token_indices")
    if tti is not None or rows:
        params, ids = _apply_token_rows(model, tti, rows, cfg_path, weights)
        fixed = tuple(sorted(set(fixed) | set(ids)))
    if raw.get("modules_to_save"):
        params, ids = _apply_full_matrices(model.config, params, raw["modules_to_save"], full, weights)
        fixed = tuple(sorted(set(fixed) | set(ids)))
    return model.replace(params=params, lora=lora, lora_config=lcfg, fixed_token_ids=fixed)


def _apply_full_matrices(cfg, params, modules, full, weights):
    """modules_to_save embed_tokens / lm_head: replace the matrices; the changed rows count as fixed."""
    params, changed = dict(params), set()
    for module in modules:
        key = "embed" if module == "embed_tokens" else "lm_head"
        if key == "lm_head" and cfg.tie_word_embeddings:
            raise CheckpointError(f"{weights}: modules_to_save lists lm_head, but this model ties it to embed_tokens")
        if key not in full:
            raise CheckpointError(f"{weights}: modules_to_save lists {module} but the file has no "
                                  f"{EMBED_FULL_KEY if key == 'embed' else HEAD_FULL_KEY}")
        value, target = full[key], params[key]
        if value.shape != tuple(target.shape):
            raise CheckpointError(f"{weights}: {module} has shape {list(value.shape)}, expected {list(target.shape)}")
        new = jnp.asarray(value).astype(target.dtype)
        changed |= set(np.flatnonzero(np.asarray(jnp.any(new != target, axis=1))).tolist())
        params[key] = new
    return params, sorted(int(t) for t in changed)


def load_model_with_adapter(adapter_dir, base=None, **load_kwargs):
    """``(model, tokenizer)``: the adapter's base checkpoint loaded with ``jaxsloth.load_model`` and the
    adapter attached (:func:`load_adapter`), ready to continue training.

    ``base`` overrides the adapter's ``base_model_name_or_path`` (a local directory; nothing is
    downloaded). ``load_kwargs`` go to ``load_model`` (dtype, load_in_4bit, max_seq_length...).
    """
    from jaxsloth.causal_lm import load_model

    adapter_dir = Path(adapter_dir)
    raw = _read_adapter_config(adapter_dir / ADAPTER_CONFIG)
    base = base or raw.get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise CheckpointError(f"{adapter_dir / ADAPTER_CONFIG}: base_model_name_or_path {base!r} is not a local "
                              "directory; pass base=<the base checkpoint directory>")
    model, tokenizer = load_model(base, **load_kwargs)
    return load_adapter(model, adapter_dir), tokenizer


def _apply_token_rows(model, tti, rows, cfg_path, weights):
    cfg = model.config
    if tti is None:
        raise CheckpointError(f"{weights}: holds trainable-token rows but {cfg_path.name} has no "
                              "trainable_token_indices")
    per_module = {"embed_tokens": list(tti)} if isinstance(tti, list) else dict(tti)
    bad = [k for k in per_module if k not in ("embed_tokens", "lm_head")]
    if bad:
        raise CheckpointError(f"{cfg_path}: trainable_token_indices for {bad} is not supported (embed_tokens, lm_head)")
    params = dict(model.params)
    all_ids = set()
    for module, ids in per_module.items():
        key = "embed" if module == "embed_tokens" else "lm_head"
        if key == "lm_head" and cfg.tie_word_embeddings:
            if sorted(ids) != sorted(per_module.get("embed_tokens", [])):
                raise CheckpointError(f"{cfg_path}: lm_head is tied to embed_tokens but trainable_token_indices "
                                      "lists different ids for the two")
            continue
        if key not in rows:
            raise CheckpointError(f"{weights}: trainable_token_indices lists {module} but the file has no "
                                  f"{module} rows ({EMBED_ROWS_KEY if key == 'embed' else HEAD_ROWS_KEY})")
        values = rows.pop(key)
        if values.shape != (len(ids), cfg.hidden_size):
            raise CheckpointError(f"{weights}: {module} rows have shape {list(values.shape)}, expected "
                                  f"[{len(ids)}, {cfg.hidden_size}]")
        if ids and not 0 <= min(ids) <= max(ids) < cfg.vocab_size:
            raise CheckpointError(f"{cfg_path}: trainable_token_indices for {module} leave the vocabulary "
                                  f"[0, {cfg.vocab_size})")
        target = params[key]
        params[key] = target.at[jnp.asarray(ids)].set(jnp.asarray(values).astype(target.dtype))
        all_ids |= set(int(t) for t in ids)
    if rows:
        raise CheckpointError(f"{weights}: holds {sorted(rows)} rows that trainable_token_indices does not list")
    return params, sorted(all_ids)


# ----------------------------------------------------------------------------------------------
# merged checkpoint


def _out_dtype(dtype):
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _OUT_DTYPES:
        raise ValueError(f"export_merged: dtype must be one of {list(_OUT_DTYPES)}, got {dtype!r}")
    return name


def _merged_plan(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(HF tensor name, shape) in file order: embed, layer by layer, final norm, lm_head."""
    d = cfg.hidden_size
    shapes = cfg.linear_shapes()
    plan = [("model.embed_tokens.weight", (cfg.vocab_size, d))]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        plan.append((p + "input_layernorm.weight", (d,)))
        plan += [(f"{p}{HF_PROJECTION_NAMES[s]}.weight", shapes[s]) for s in ("q", "k", "v", "o")]
        plan.append((p + "post_attention_layernorm.weight", (d,)))
        plan += [(f"{p}{HF_PROJECTION_NAMES[s]}.weight", shapes[s]) for s in ("gate", "up", "down")]
    plan.append(("model.norm.weight", (d,)))
    if not cfg.tie_word_embeddings:
        plan.append(("lm_head.weight", (cfg.vocab_size, d)))
    return plan


def _shard_plan(plan, itemsize: int, max_shard_bytes: int):
    shards, current, size = [], [], 0
    for name, shape in plan:
        nbytes = math.prod(shape) * itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape, nbytes))
        size += nbytes
    shards.append(current)
    return shards


@jax.jit
def _merge(w, a, b, scaling):
    """W + scaling * B @ A in f32. w: [out, in] array or one layer's NF4; a [R, in], b [out, R]."""
    w = dequantize_nf4(w, jnp.float32) if isinstance(w, NF4) else w.astype(jnp.float32)
    if a is None:
        return w
    delta = jnp.einsum("or,ri->oi", b.astype(jnp.float32), a.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    return w + scaling * delta


def _to_host(x, dtype: str) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(dtype))


_LAYER_TENSOR = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")
_NORM_KEYS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}


def _tensor_producer(model, dtype: str, base: str, source_files):
    """name -> host array in ``dtype``, computing one merged tensor at a time on the device."""
    params, lora = model.params, model.lora or {}
    scaling = jnp.float32(model.lora_scaling)
    by_hf = {hf: short for short, hf in HF_PROJECTION_NAMES.items()}
    handles = {}

    def source_tensor(name):
        path = source_files[name]
        if path not in handles:
            handles.clear()  # shards are read in order: keep one open
            handles[path] = safe_open(str(path), framework="numpy")
        return handles[path].get_tensor(name)

    def produce(name):
        if name == "model.embed_tokens.weight":
            return _to_host(params["embed"], dtype)
        if name == "lm_head.weight":
            return _to_host(params["lm_head"], dtype)
        if name == "model.norm.weight":
            return _to_host(params["final_norm"], dtype)
        m = _LAYER_TENSOR.match(name)
        i, rest = int(m.group(1)), m.group(2)
        if rest in _NORM_KEYS:
            return _to_host(params["layers"][_NORM_KEYS[rest]][i], dtype)
        short = by_hf[rest]
        if base == "source":
            w = jnp.asarray(source_tensor(name))
        else:
            w = jax.tree_util.tree_map(lambda x: x[i], params["layers"][short])
        ab = lora.get(short)
        a, b = (None, None) if ab is None else (ab["a"][i], ab["b"][i])
        return _to_host(_merge(w, a, b, scaling), dtype)

    return produce


def _merged_from(model, base: str) -> str:
    if base == "source":
        return "source-16bit"
    return "dequantized-nf4" if model.quantized else "dense"


def _source_config(model) -> dict:
    path = Path(model.source) / "config.json" if model.source else None
    if path is not None and path.is_file():
        return json.loads(path.read_text())
    cfg = model.config
    raw = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
           "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
           "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
           "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
           "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
           "rope_scaling": cfg.rope_scaling_dict, "tie_word_embeddings": cfg.tie_word_embeddings,
           "max_position_embeddings": cfg.max_position_embeddings, "attention_bias": False, "mlp_bias": False,
           "bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id,
           "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id}
    return raw


def _merged_config(model, dtype: str, base: str) -> dict:
    raw = _source_config(model)
    raw.pop("quantization_config", None)
    if "dtype" in raw or "torch_dtype" not in raw:
        raw["dtype"] = dtype
    if "torch_dtype" in raw:
        raw["torch_dtype"] = dtype
    lcfg = model.lora_config
    raw["jaxsloth"] = {
        "merged_from": _merged_from(model, base),
        "base_dtype": model.dtype,
        "base_quantized": model.quantized,
        "source": model.source,
        "lora": None if model.lora is None else {
            "r": lcfg.r, "lora_alpha": _alpha(lcfg.lora_alpha), "use_rslora": lcfg.use_rslora,
            "target_modules": lcfg.hf_target_modules, "scaling": lcfg.scaling},
        "fixed_token_ids": [int(t) for t in model.fixed_token_ids],
    }
    return raw


def _merged_readme(model, dtype: str, base: str, n_shards: int) -> str:
    origin = {
        "dense": f"the model's own {model.dtype} weights (as loaded from `{model.source}`, no quantization)",
        "dequantized-nf4": f"the model's NF4 weights ({model.quantized}), dequantized to f32: exactly the base the "
                           "4-bit model computed with, not the original 16-bit weights",
        "source-16bit": f"the original 16-bit tensors re-read from `{model.source}` (the 4-bit model was "
                        "quantized from them)",
    }[_merged_from(model, base)]
    if model.lora is None:
        lora = "No LoRA adapters: this is a plain re-export of the base model."
    else:
        lcfg = model.lora_config
        lora = (f"LoRA (r={lcfg.r}, alpha={_alpha(lcfg.lora_alpha)}, rsLoRA={lcfg.use_rslora}, scaling "
                f"{lcfg.scaling:g}) merged into {', '.join(lcfg.hf_target_modules)}: W + scaling * B @ A, "
                f"computed in f32 and rounded once to {dtype}.")
    ids = list(model.fixed_token_ids)
    fix = (f"The untrained-token fix rewrote {len(ids)} embedding/lm_head rows (token ids {ids}); they are in "
           "these weights." if ids else "No embedding rows were changed by the untrained-token fix.")
    return "\n".join([
        "# Merged checkpoint exported by jaxsloth", "",
        f"- base weights: {origin}", f"- {lora}", f"- {fix}",
        f"- {dtype} safetensors in {n_shards} shard(s); `config.json` has no quantization_config and records "
        "the same facts under `\"jaxsloth\"`.", "",
        "Load with `transformers.AutoModelForCausalLM.from_pretrained(dir)` or `jaxsloth.load_model(dir)`.", ""])


def _copy_tokenizer_files(model, tmp: Path) -> bool:
    src = Path(model.source) if model.source else None
    copied = False
    if src is not None and src.is_dir():
        for name in TOKENIZER_FILES + ("generation_config.json",):
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
                copied |= name != "generation_config.json"
    if not copied and model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(tmp))
        copied = True
    return copied


def export_merged(model, out_dir, dtype: str = "bfloat16", *, overwrite: bool = False,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, base: str = "auto", progress: bool = False) -> Path:
    """Write ``model`` with its LoRA merged in as a Hugging Face checkpoint; return the output path.

    ``dtype``: "bfloat16" | "float16" | "float32" of the written weights. ``base``: "auto" merges
    into the weights the model holds (16-bit arrays, or NF4 dequantized); "source" re-reads the
    original 16-bit projections from ``model.source`` (for a model quantized on load). A model
    without LoRA is written as is (plain export). Shards hold at most ``max_shard_bytes`` (a
    bigger single tensor gets a shard of its own). Same atomicity and errors as export_adapter.
    """
    dtype = _out_dtype(dtype)
    if base not in ("auto", "source"):
        raise ValueError(f"export_merged: base must be 'auto' or 'source', got {base!r}")
    if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise ValueError(f"export_merged: max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    _check_lora(model, required=False)
    source_files = None
    if base == "source":
        if model.quantized == "bnb-4bit":
            raise ValueError("export_merged(base='source'): the model was loaded from a bitsandbytes 4-bit "
                             "checkpoint, which has no 16-bit weights to merge into; use base='auto'")
        if not model.source or not Path(model.source).is_dir():
            raise ValueError(f"export_merged(base='source'): the source checkpoint {model.source!r} is not a directory")
        from convert.load import find_weight_files
        source_files = find_weight_files(Path(model.source))

    cfg = model.config
    plan = _merged_plan(cfg)
    itemsize = jnp.dtype(dtype).itemsize
    shards = _shard_plan(plan, itemsize, max_shard_bytes)
    total = sum(nbytes for shard in shards for _, _, nbytes in shard)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    produce = _tensor_producer(model, dtype, base, source_files)
    pbar = None
    if progress:
        from tqdm import tqdm
        pbar = tqdm(total=len(plan), desc="exporting", unit="tensor")

    def produce_counted(name):
        out = produce(name)
        if pbar:
            pbar.update()
        return out

    with _atomic_dir(out_dir, overwrite, protect=(model.source,)) as tmp:
        _check_free_space(tmp, total, out_dir)
        st = _OUT_DTYPES[dtype]
        weight_map = {}
        for fname, shard in zip(names, shards):
            write_safetensors_streamed(tmp / fname, [(n, st, s, b) for n, s, b in shard], produce_counted)
            weight_map.update({n: fname for n, _, _ in shard})
        if len(shards) > 1:
            _write_json(tmp / "model.safetensors.index.json",
                        {"metadata": {"total_size": total}, "weight_map": weight_map})
        _write_json(tmp / "config.json", _merged_config(model, dtype, base))
        if not _copy_tokenizer_files(model, tmp):
            warnings.warn(f"export_merged: no tokenizer files in {model.source} and the model has no tokenizer; "
                          "the export has weights and config only")
        (tmp / "README.md").write_text(_merged_readme(model, dtype, base, len(shards)))
    if pbar:
        pbar.close()
    return Path(out_dir).absolute()


# ----------------------------------------------------------------------------------------------
# command line


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read a size from {text!r} (examples: 5GB, 500MB, 2GiB)")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def _run_export(args):
    from jaxsloth.causal_lm import load_model

    if args.model is None:
        if not args.adapter:
            raise SystemExit("jaxsloth export: give --model (the base checkpoint), --adapter, or both")
        model, _ = load_model_with_adapter(args.adapter, dtype=args.load_dtype, load_in_4bit=args.load_in_4bit,
                                           progress=True)
    else:
        model, _ = load_model(args.model, dtype=args.load_dtype, load_in_4bit=args.load_in_4bit, progress=True)
        if args.adapter:
            model = load_adapter(model, args.adapter)
    if args.mode == "adapter":
        out = export_adapter(model, args.out, overwrite=args.overwrite)
    else:
        out = export_merged(model, args.out, args.dtype, overwrite=args.overwrite,
                            max_shard_bytes=_parse_size(args.max_shard_size), base=args.base, progress=True)
    print(f"wrote {out}")
    return 0


def register_export_command(subparsers):
    """Add ``jaxsloth export`` to an argparse subparsers object; returns the subparser."""
    p = subparsers.add_parser(
        "export", help="write a PEFT adapter or a merged Hugging Face checkpoint",
        description="Load a base checkpoint (and an adapter), then write a merged HF checkpoint (default) or the "
                    "adapter alone in PEFT's format.")
    p.add_argument("--model", help="base Hugging Face checkpoint directory (default: the adapter's "
                   "base_model_name_or_path)")
    p.add_argument("--load-in-4bit", "--load_in_4bit", action="store_true",
                   help="quantize the base to NF4 on load (merged output "
                   "then uses the dequantized NF4 base unless --base source)")
    p.add_argument("--load-dtype", "--load_dtype", default="bfloat16", choices=list(_OUT_DTYPES),
                   help="dtype to load the base in")
    p.add_argument("--adapter", help="adapter directory to load onto the base (jaxsloth or PEFT format)")
    p.add_argument("--out", required=True, help="output directory")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--merged", dest="mode", action="store_const", const="merged",
                      help="merge the adapter into the weights (default)")
    mode.add_argument("--adapter-only", "--adapter_only", dest="mode", action="store_const", const="adapter",
                      help="write the adapter alone (PEFT format)")
    p.set_defaults(mode="merged", func=_run_export)
    p.add_argument("--dtype", default="bfloat16", choices=list(_OUT_DTYPES), help="merged weights dtype")
    p.add_argument("--base", default="auto", choices=["auto", "source"],
                   help="merge into the loaded weights (auto) or the 16-bit tensors of --model (source)")
    p.add_argument("--max-shard-size", "--max_shard_size", default="5GB",
                   help="largest safetensors shard (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return p

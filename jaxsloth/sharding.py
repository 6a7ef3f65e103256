"""Multi-device training: a ("data", "fsdp") device mesh and where every array of a QLoRA run lives.

Mesh axes:
    data   plain data parallelism: the base weights are replicated over it, the batch is split.
    fsdp   fully sharded data parallelism: the batch is split over it too, and every sizeable
           weight (frozen base, NF4 codes and absmax, LoRA adapters, AdamW moments) is split over
           it on one non-layer dim. Inside the layer scan XLA all-gathers one layer's slice when it
           is used and reduce-scatters the LoRA gradients (GSPMD does this from the shardings alone:
           the jitted train step of ``jaxsloth.train`` is unchanged).
So every device gets its own rows (batch over data x fsdp); ``fsdp`` trades communication for
memory. Arrays whose dims the fsdp size does not divide stay replicated (they are the small ones:
norms, NF4 double-quant statistics, odd-sized tiny models).

Default mesh (``make_mesh(None, model=...)``): all devices on ``data`` unless the frozen base takes
more than a quarter of one device's memory, then all on ``fsdp``. Data parallelism moves no weights
at all (the right choice for 8B QLoRA on 80 GB cards, where the 5.7 GB NF4 base fits many times
over); FSDP is for models whose base, activations and optimizer do not fit one card (70B, long
context). Devices that report no memory size (CPU) get ``data``.

Multi-host: call ``jax.distributed.initialize()`` first thing in every process (before anything
touches a device), then build the mesh as usual: ``jax.devices()`` then lists the devices of all
hosts and the mesh spans them. Every process must run the same program on the same data (the
``BatchStream`` is deterministic given the seed); ``shard_batch`` and ``shard_model`` take the full
host arrays and each process keeps only the shards of its own devices. Orbax checkpoints written
from a mesh restore onto any other mesh (or one device): the restore target carries the shardings
of the run that reads it (``abstract_with_shardings``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import threading

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsloth.quant import NF4

__all__ = ["AXES", "RULES", "make_mesh", "parse_mesh_spec", "default_mesh_shape", "shard_model", "shard_batch",
           "shard_lora", "init_opt_state", "opt_state_shardings", "abstract_with_shardings", "describe",
           "activate", "local_trace", "constrain_layer", "constrain_rows", "per_device_token_loss"]

AXES = ("data", "fsdp")

# The one table of logical rules: kind of array -> (mesh axes, dims that may carry them).
# Dims are counted from the first per-layer dim (after the stacked [L] dim of layer weights, which
# is never split: the scan reads one layer at a time). "any": the first of the array's dims that
# the fsdp size divides; none divides -> replicated. Kinds are assigned by `_param_kind`.
RULES: dict[str, tuple[tuple[str, ...] | None, tuple[int, ...] | str]] = {
    "batch": (("data", "fsdp"), (1,)),      # batches [A, B, S]: the rows B, over every device
    "dense_weight": (("fsdp",), "any"),     # embed/lm_head [V, D], projections [L, out, in]
    "nf4_blocks": (("fsdp",), (0,)),        # NF4 codes [L, N, K/2], absmax [L, N, B]: out features N
    "nf4_stats": (None, ()),                # NF4 absmax_offset [L], nested_absmax [L, n]: tiny
    "norm": (None, ()),                     # RMSNorm scales [L, D], [D]: tiny, replicated
    "lora": (("fsdp",), "any"),             # adapters a [L, R, in], b [L, out, R]; AdamW moments follow
}


class MeshError(ValueError):
    """A mesh spec that cannot be built on the devices present."""


# ---------------------------------------------------------------------------------------------- mesh
def parse_mesh_spec(spec: str) -> dict[str, int]:
    """"data=2,fsdp=4" -> {"data": 2, "fsdp": 4}; an axis left out has size 1."""
    sizes = {a: 1 for a in AXES}
    seen = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = re.fullmatch(r"(\w+)\s*=\s*(\d+)", part)
        if not m:
            raise MeshError(f"mesh spec {spec!r}: cannot read {part!r}; write axis=size pairs such as "
                            "'data=2,fsdp=1'")
        axis, size = m.group(1), int(m.group(2))
        if axis not in AXES:
            raise MeshError(f"mesh spec {spec!r}: unknown axis {axis!r}; the axes are {AXES}")
        if axis in seen:
            raise MeshError(f"mesh spec {spec!r}: axis {axis!r} given twice")
        if size < 1:
            raise MeshError(f"mesh spec {spec!r}: axis {axis!r} must have size >= 1, got {size}")
        seen.add(axis)
        sizes[axis] = size
    if not seen:
        raise MeshError(f"mesh spec {spec!r} names no axis; write e.g. 'data=2,fsdp=1'")
    return sizes


def _frozen_bytes(model) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(model.params)))


def default_mesh_shape(n_devices: int, model=None, device=None) -> dict[str, int]:
    """All devices on fsdp when the frozen base takes > 1/4 of one device's memory, else on data."""
    if model is not None and n_devices > 1:
        device = device or jax.devices()[0]
        stats = (device.memory_stats() if hasattr(device, "memory_stats") else None) or {}
        limit = stats.get("bytes_limit")
        if limit and _frozen_bytes(model) > limit / 4:
            return {"data": 1, "fsdp": n_devices}
    return {"data": n_devices, "fsdp": 1}


def make_mesh(spec: str | None = None, *, model=None, devices=None) -> Mesh:
    """A Mesh over ``devices`` (default: every device, of all hosts after jax.distributed.initialize).

    ``spec`` "data=2,fsdp=4" must multiply to the number of devices; None picks the default above.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = default_mesh_shape(n, model) if spec is None else parse_mesh_spec(spec)
    shape = tuple(sizes[a] for a in AXES)
    if int(np.prod(shape)) != n:
        raise MeshError(f"mesh spec {spec!r} asks for {' x '.join(f'{a}={s}' for a, s in zip(AXES, shape))} = "
                        f"{int(np.prod(shape))} devices, but {n} {devices[0].platform.upper()} device(s) are "
                        f"present; make the sizes multiply to {n}")
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices)  # topology-aware order on GPU/TPU
    except Exception:  # noqa: BLE001 - CPU and unusual topologies: plain row-major order
        grid = np.array(devices, dtype=object).reshape(shape)
    try:  # Auto axes: GSPMD decides the collectives (jax.make_mesh would default to Explicit axes)
        from jax.sharding import AxisType

        return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))
    except (ImportError, TypeError):
        return Mesh(grid, AXES)


def describe(mesh: Mesh) -> str:
    return ", ".join(f"{a}={mesh.shape[a]}" for a in AXES) + f" over {mesh.size} {mesh.devices.flat[0].platform} devices"


# ------------------------------------------------------------------------------------------ shardings
def _spec(kind: str, shape, mesh: Mesh, lead: int) -> P:
    """PartitionSpec of an array of ``kind`` whose per-layer dims start at ``lead``."""
    axes, dims = RULES[kind]
    spec = [None] * len(shape)
    if axes is None:
        return P(*spec)
    size = int(np.prod([mesh.shape[a] for a in axes]))
    if size == 1:
        return P(*spec)
    candidates = range(lead, len(shape)) if dims == "any" else [lead + d for d in dims]
    for d in candidates:
        if d < len(shape) and shape[d] % size == 0:
            spec[d] = axes[0] if len(axes) == 1 else axes
            break
    return P(*spec)


def _sharding(kind, x, mesh, lead):
    return NamedSharding(mesh, _spec(kind, x.shape, mesh, lead))


def _param_kind(path) -> tuple[str, int]:
    """(kind, first per-layer dim) of a params leaf from its key path."""
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    lead = 1 if "layers" in keys else 0
    if keys and str(keys[-1]).endswith("norm"):
        return "norm", lead
    return "dense_weight", lead


def _place(x, sharding):
    return jax.device_put(x, sharding)


def param_shardings(params, mesh: Mesh):
    """NamedShardings for a params pytree (dense arrays and NF4 weights)."""

    def one(path, leaf):
        kind, lead = _param_kind(path)
        if isinstance(leaf, NF4):
            fields = {f: NamedSharding(mesh, P()) for f in ("absmax_offset", "nested_absmax")}
            for f in ("codes", "absmax"):
                fields[f] = _sharding("nf4_blocks", getattr(leaf, f), mesh, lead)
            # a NF4 pytree of shardings: same static metadata, sharding leaves
            return dataclasses.replace(leaf, **fields)
        return _sharding(kind, leaf, mesh, lead)

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, NF4))


def lora_shardings(lora, mesh: Mesh):
    return jax.tree_util.tree_map(lambda x: _sharding("lora", x, mesh, 1), lora)


def shard_lora(lora, mesh: Mesh):
    """The LoRA pytree placed on ``mesh`` (fsdp over a non-layer dim when divisible)."""
    return jax.tree_util.tree_map(_place, lora, lora_shardings(lora, mesh))


def shard_model(model, mesh: Mesh):
    """``model`` (a CausalLM) with params and LoRA placed on ``mesh`` per RULES."""
    params = jax.tree_util.tree_map(_place, model.params, param_shardings(model.params, mesh))
    lora = None if model.lora is None else shard_lora(model.lora, mesh)
    return model.replace(params=params, lora=lora)


def batch_sharding(mesh: Mesh, ndim: int = 3) -> NamedSharding:
    axes, (dim,) = RULES["batch"]
    spec = [None] * ndim
    spec[dim] = axes
    return NamedSharding(mesh, P(*spec))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Place a batch dict of [A, B, S] arrays with rows B split over every device of the mesh."""
    axes, (dim,) = RULES["batch"]
    n = int(np.prod([mesh.shape[a] for a in axes]))
    out = {}
    for name, x in batch.items():
        if x.ndim <= dim or x.shape[dim] % n:
            raise MeshError(f"batch field {name!r} has shape {tuple(x.shape)}: its rows (dim {dim}) must be a "
                            f"multiple of the {n} devices of the mesh ({describe(mesh)}); the global batch is "
                            "per_device_train_batch_size x the number of devices")
        out[name] = jax.device_put(x, batch_sharding(mesh, x.ndim))
    return out


def opt_state_shardings(tx, lora, mesh: Mesh):
    """Shardings of ``tx.init(lora)``: every params-shaped subtree (AdamW mu, nu) follows the LoRA
    leaves; counters and other non-param state are replicated."""
    lora_sh = lora_shardings(lora, mesh)
    replicated = NamedSharding(mesh, P())
    abstract = jax.eval_shape(tx.init, lora)
    try:
        import optax

        return optax.tree_map_params(tx, lambda _, s: s, abstract, lora_sh,
                                     transform_non_params=lambda _: replicated)
    except Exception:  # noqa: BLE001 - transforms whose init cannot take optax's placeholder
        by_shape = {tuple(x.shape): s for x, s in zip(jax.tree_util.tree_leaves(lora),
                                                      jax.tree_util.tree_leaves(lora_sh))}
        return jax.tree_util.tree_map(lambda x: by_shape.get(tuple(x.shape), replicated), abstract)


def init_opt_state(tx, lora, mesh: Mesh):
    """``tx.init(lora)`` created directly in its sharded layout (no full copy on one device)."""
    return jax.jit(tx.init, out_shardings=opt_state_shardings(tx, lora, mesh))(lora)


# ------------------------------------------------------------------------- inside the traced model
# GSPMD alone is free to satisfy FSDP by gathering activations, or the *dequantized* weights (8x the
# bytes of the NF4 codes), instead of gathering each layer's 4-bit leaves. Two constraints pin the
# intended plan: at the top of the layer scan body, `constrain_layer(layer)` (gather this layer's
# codes/absmax and LoRA slices) and `constrain_rows(x)` (activations keep their rows split). Both
# are no-ops unless traced under `activate(mesh)`, so single-device code is untouched.

def activate(mesh: Mesh):
    """Context in which the step is traced and run on ``mesh`` (``jax.set_mesh``)."""
    return jax.set_mesh(mesh)


_LOCAL = threading.local()


@contextlib.contextmanager
def local_trace():
    """Code traced inside is per-device (a ``shard_map`` body): the constraint hooks stay no-ops."""
    prev = getattr(_LOCAL, "on", False)
    _LOCAL.on = True
    try:
        yield
    finally:
        _LOCAL.on = prev


def _active_mesh():
    if getattr(_LOCAL, "on", False):
        return None
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or getattr(mesh, "empty", False) or set(AXES) - set(mesh.axis_names):
        return None
    return mesh


def constrain_layer(tree):
    """One layer's weights (dense, NF4 leaves, LoRA) replicated where they are used: the FSDP gather."""
    mesh = _active_mesh()
    if mesh is None or mesh.shape["fsdp"] == 1:
        return tree
    return jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(x, P()), tree)


def _token_split(shape):
    """(mesh, spec, n) for an activation of ``shape`` [B, S, ...] under the active mesh: ``spec`` puts
    the rows over the n devices of the batch axes when n divides B, else the sequence when n divides
    S; None when nothing is split (no mesh, one device, or neither dim divisible)."""
    mesh = _active_mesh()
    if mesh is None or len(shape) == 0:
        return mesh, None, 1
    axes, _ = RULES["batch"]
    n = int(np.prod([mesh.shape[a] for a in axes]))
    if n == 1:
        return mesh, None, 1
    if shape[0] % n == 0:
        return mesh, P(axes), n
    if len(shape) >= 2 and shape[1] % n == 0:
        return mesh, P(None, axes), n
    return mesh, None, n


def constrain_rows(x):
    """Activations [B, S, ...] with rows over every device (when the mesh size divides B).

    When it does not (long context: batch 1 on an FSDP mesh) the sequence dim S is split instead,
    so each device holds and computes 1/n of the tokens of every layer's token-wise work (norms,
    projections, MLP, saved/offloaded layer inputs); attention is split by heads (constrain_heads).
    Without this the one row would be replicated on every device."""
    _, spec, _ = _token_split(x.shape)
    return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


def sequence_split(b: int, s: int) -> int:
    """How many devices ``constrain_rows`` splits the sequence of a [b, s, ...] activation over: the
    batch-axes size when it cannot split the b rows but divides s (long context on FSDP), else 1."""
    _, spec, n = _token_split((b, s))
    return n if spec is not None and spec[0] is None else 1


def constrain_split(x, dim: int):
    """``x`` split over the batch axes along ``dim`` (for activations laid out per device by the caller,
    e.g. MLP chunks [n, B, devices, chunk, D] under a sequence split); a no-op without a mesh."""
    mesh = _active_mesh()
    if mesh is None:
        return x
    axes, _ = RULES["batch"]
    return jax.lax.with_sharding_constraint(x, P(*([None] * dim), axes))


def constrain_heads(x):
    """q/k/v [B, S, N, H] for attention. Where the sequence is split (``sequence_split``) attention
    needs every key: the heads are split over the devices instead (an all-to-all), so each device
    runs causal attention over the whole sequence for N/n of the heads (cuDNN's partitioning supports
    head sharding; a sequence-sharded call would be gathered and run whole on every device). No-op
    otherwise, or when the devices do not divide N."""
    b, s, n_heads = x.shape[:3]
    n = sequence_split(b, s)
    if n == 1 or n_heads % n:
        return x
    axes, _ = RULES["batch"]
    return jax.lax.with_sharding_constraint(x, P(None, None, axes))


def per_device_token_loss(loss_fn, hidden, lm_head, labels):
    """(loss_sum, count) of ``loss_fn(hidden [T, D], lm_head, labels [T])`` over hidden [B, S, D].

    Under ``activate(mesh)`` each device runs ``loss_fn`` on its own rows (``shard_map``) and the
    per-device sums are added outside it. Why: the fused cross-entropy scans over token chunks and
    has a Pallas kernel; GSPMD would gather the tokens to scan them (and cannot partition a Pallas
    call at all), so every device would compute the whole batch's loss. lm_head enters whole.
    """
    d = hidden.shape[-1]
    # rows per device, or for one long row (FSDP, long context) each device's part of the sequence
    mesh, spec, _ = _token_split(hidden.shape)
    if spec is None:
        return loss_fn(hidden.reshape(-1, d), lm_head, labels.reshape(-1))
    axes, _ = RULES["batch"]

    def local(h, w, lab):
        loss_sum, count = loss_fn(h.reshape(-1, d), w, lab.reshape(-1))
        return loss_sum[None], count[None]

    # sums leave the shard_map as [n] arrays and are added by XLA: no psum inside, so the gradient
    # needs no replication bookkeeping (check_vma off: pallas_call has no replication rule)
    loss_sum, count = jax.shard_map(local, mesh=mesh, in_specs=(spec, P(), spec),
                                    out_specs=(P(axes), P(axes)), check_vma=False)(hidden, lm_head, labels)
    return loss_sum.sum(), count.sum()


def abstract_with_shardings(tree):
    """ShapeDtypeStructs carrying each array's current sharding: an Orbax restore target that puts the
    restored arrays where this run keeps them, whatever mesh wrote the checkpoint."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

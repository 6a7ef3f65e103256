"""QLoRA training: one jitted step (gradient accumulation inside), Optax AdamW, Orbax checkpoints.

The loss is the mean token cross-entropy over every non-ignored label of the accumulated batch:
each micro-batch contributes its *summed* loss and its label count, and the sum of gradients is
divided once by the total count, so A micro-batches of B rows give exactly the loss and gradient
of one batch of A*B rows. Only the LoRA pytree is differentiated; the (NF4 or 16-bit) base is a
plain argument. Hyper-parameter names follow Hugging Face's TrainingArguments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsloth import model as llama
from jaxsloth.causal_lm import default_attention_impl
from jaxsloth.data import BatchStream, Rows, prepare_data
from jaxsloth.sharding import per_device_token_loss
from pallas_kernels.cross_entropy import fused_cross_entropy

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, out of memory, bad settings), with what to do."""


@dataclasses.dataclass
class TrainingArguments:
    output_dir: str = "outputs"
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    max_steps: int = -1
    num_train_epochs: float = 1.0
    warmup_steps: int = 0
    lr_scheduler_type: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    logging_steps: int = 1
    save_steps: int = 0
    save_total_limit: int = 2
    seed: int = 3407
    max_seq_length: int = 2048
    packing: bool = False
    train_on_responses_only: bool | None = None
    remat: str = "full"
    remat_group: int = 1  # keep/offload every g-th layer input only (model.hidden_states)
    mlp_chunk: int | None = None  # run the MLP over this many tokens at a time (very long context)
    # tokens per chunk of the fused lm_head + cross-entropy (None: the largest power of two whose
    # logits stay under 640 MiB, 1024 for Llama-3's vocabulary). Smaller chunks lower the peak of a
    # small batch (8B, bs 2 x 2048, remat="offload": 512 -> -0.5 GiB, no measurable time cost).
    loss_chunk: int | None = None
    # unroll the scan over layers this many times (model.hidden_states); >= num_hidden_layers: a
    # Python loop over the layers (remat="none" only: faster steps, less memory, longer compile);
    # None: that loop with remat="none", else 1 (the scan: compiles fastest)
    layer_unroll: int | None = None
    shuffle: bool = True
    progress: bool = True
    # device mesh "data=2,fsdp=1" (jaxsloth.sharding); None: the default for the devices present.
    # Used only when more than one device is present; the global batch is then
    # per_device_train_batch_size x the number of devices.
    mesh: str | None = None
    # Train the model's own LoRA arrays in place: the step donates them, so the device holds one copy
    # of the adapters (as PyTorch trainers do) instead of the caller's plus the trained one (0.31 GiB
    # for 8B at r=32, 1.5 GiB for 70B). The model passed in then must not be used again: its LoRA
    # arrays are deleted; use the model train() returns. The CLI sets it (it owns its model).
    donate_model_lora: bool = False

    def validate(self):
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_seq_length", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr_scheduler_type not in SCHEDULES:
            raise ValueError(f"lr_scheduler_type must be one of {SCHEDULES}, got {self.lr_scheduler_type!r}")
        if self.remat not in llama.REMAT_PRESETS:
            raise ValueError(f"remat must be one of {llama.REMAT_PRESETS}, got {self.remat!r}")
        if self.remat_group < 1 or (self.remat_group > 1 and self.remat == "none"):
            raise ValueError(f"remat_group must be >= 1 and needs remat 'full' or 'offload', got "
                             f"remat_group={self.remat_group} with remat={self.remat!r}")
        if self.mlp_chunk is not None and self.mlp_chunk < 1:
            raise ValueError(f"mlp_chunk must be a positive number of tokens, got {self.mlp_chunk}")
        if self.layer_unroll is not None and self.layer_unroll < 1:
            raise ValueError(f"layer_unroll must be None or >= 1, got {self.layer_unroll}")
        if self.loss_chunk is not None and self.loss_chunk < 1:
            raise ValueError(f"loss_chunk must be a positive number of tokens, got {self.loss_chunk}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("set max_steps > 0 or num_train_epochs > 0")
        if self.mesh is not None:
            from jaxsloth.sharding import parse_mesh_spec

            parse_mesh_spec(self.mesh)


def lr_schedule(args: TrainingArguments, total_steps: int):
    """The learning rate of update k (0-based), identical to transformers' schedulers."""
    base, warm = args.learning_rate, args.warmup_steps
    kind = args.lr_scheduler_type

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = step / max(1, warm)
        if kind == "constant":
            return jnp.asarray(base, jnp.float32)
        if kind == "constant_with_warmup":
            decay = 1.0
        elif kind == "linear":
            decay = jnp.maximum(0.0, (total_steps - step) / max(1, total_steps - warm))
        else:  # cosine, half a period
            progress = (step - warm) / max(1, total_steps - warm)
            decay = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(math.pi * progress)))
        return base * jnp.where(step < warm, warmup, decay)

    return schedule


def make_optimizer(args: TrainingArguments, total_steps: int):
    parts = []
    if args.max_grad_norm and args.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(args.max_grad_norm))
    parts.append(optax.adamw(lr_schedule(args, total_steps), b1=args.adam_beta1, b2=args.adam_beta2,
                             eps=args.adam_epsilon, weight_decay=args.weight_decay))
    return optax.chain(*parts)


def micro_batch_loss(model, lora, batch, key=None, *, remat="none", packing=False, remat_group=1, mlp_chunk=None,
                     loss_chunk=None, layer_unroll=None):
    """(summed token loss f32, label count) of one micro-batch; batch arrays are [B, S]."""
    cfg = model.config
    dtype = jnp.dtype(model.dtype)
    drop = 0.0 if model.lora_config is None else model.lora_config.lora_dropout
    h = llama.hidden_states(
        cfg, model.params, batch["input_ids"], None, batch["position_ids"],
        batch["segment_ids"] if packing else None,  # unpacked rows are right-padded: causal is exact
        lora, lora_scaling=model.lora_scaling, dtype=dtype, impl=model.implementation,
        attn_impl=default_attention_impl(dtype), remat=remat, remat_group=remat_group, mlp_chunk=mlp_chunk,
        lora_dropout=drop, layer_unroll=layer_unroll,
        dropout_key=key if drop > 0 else None)
    head = llama.lm_head_weight(cfg, model.params).astype(dtype)
    # on a mesh (jaxsloth.sharding.activate) each device takes the loss of its own rows
    loss_fn = fused_cross_entropy if loss_chunk is None else functools.partial(fused_cross_entropy,
                                                                               chunk_size=loss_chunk)
    return per_device_token_loss(loss_fn, h, head, batch["labels"])


def _accumulated_sums(model, lora, batch, key, *, remat="none", packing=False, **memory):
    """(summed token loss, label count, summed LoRA gradient) over the micro-batches of batch [A, B, S]."""
    grad_fn = jax.value_and_grad(
        lambda lo, mb, k: micro_batch_loss(model, lo, mb, k, remat=remat, packing=packing, **memory), has_aux=True)
    n_micro = batch["input_ids"].shape[0]
    keys = jax.random.split(key, n_micro)

    def micro(carry, xs):
        g_acc, l_acc, c_acc = carry
        mb, k = xs
        (loss_sum, count), g = grad_fn(lora, mb, k)
        return (jax.tree_util.tree_map(jnp.add, g_acc, g), l_acc + loss_sum, c_acc + count), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, lora)
    (g, loss_sum, count), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.int32(0)), (batch, keys))
    return loss_sum, count, g


def _mean(loss_sum, count, g):
    denom = jnp.maximum(count, 1).astype(jnp.float32)
    return loss_sum / denom, count, jax.tree_util.tree_map(lambda x: x / denom, g)


def accumulated_loss_and_grads(model, lora, batch, key, *, remat="none", packing=False, **memory):
    """Mean loss over all labels of batch [A, B, S] and its gradient w.r.t. ``lora``."""
    return _mean(*_accumulated_sums(model, lora, batch, key, remat=remat, packing=packing, **memory))


def data_parallel_loss_and_grads(mesh, model, lora, batch, key, *, remat="none", packing=False, **memory):
    """``accumulated_loss_and_grads`` on a mesh with fsdp=1: every device runs the single-device code on
    its own rows (``shard_map``: the Pallas kernels run as they do on one GPU, nothing is gathered) and
    the summed losses, label counts and gradients are all-reduced once, before the division, so the
    result equals the single-device step on the whole batch (up to the order of the f32 sums).
    Weights, LoRA and ``key`` enter replicated; dropout masks differ per device (key folded with the
    device's index)."""
    from jax.sharding import PartitionSpec as P

    from jaxsloth.sharding import RULES, local_trace

    if mesh.shape.get("fsdp", 1) != 1:
        raise ValueError(f"data_parallel_loss_and_grads needs fsdp=1, got mesh {dict(mesh.shape)}")
    axes = tuple(a for a in RULES["batch"][0] if a in mesh.axis_names)

    def local(lo, m, b, k):
        k = jax.random.fold_in(k, jax.lax.axis_index(axes))
        with local_trace():  # no mesh constraints inside: this body sees one device's arrays
            sums = _accumulated_sums(m, lo, b, k, remat=remat, packing=packing, **memory)
        return jax.tree_util.tree_map(lambda x: jax.lax.psum(x, axes), sums)

    rows = jax.tree_util.tree_map(lambda _: P(None, axes), batch)
    sums = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), rows, P()), out_specs=P(),
                         check_vma=False)(lora, model, batch, key)
    return _mean(*sums)


def make_train_step(tx, *, remat: str, packing: bool, out_shardings=None, remat_group: int = 1,
                    mlp_chunk: int | None = None, loss_chunk: int | None = None, data_parallel=None,
                    layer_unroll: int | None = None):
    """jit(step)(model, opt_state, batch, key) -> (lora, opt_state, metrics). LoRA/opt state are donated.

    A non-finite loss or gradient leaves the adapters and optimizer unchanged (metrics say so).
    On a mesh, ``out_shardings`` (lora, opt_state, metrics) keeps the new state where the old one was.
    ``data_parallel``: a mesh with fsdp=1 on which the loss and gradients are taken per device
    (``data_parallel_loss_and_grads``) instead of by GSPMD partitioning of the whole step.
    """
    memory = dict(remat=remat, packing=packing, remat_group=remat_group, mlp_chunk=mlp_chunk, loss_chunk=loss_chunk,
                  layer_unroll=layer_unroll)

    def step(lora, opt_state, model, batch, key):
        if data_parallel is None:
            loss, count, grads = accumulated_loss_and_grads(model, lora, batch, key, **memory)
        else:
            loss, count, grads = data_parallel_loss_and_grads(data_parallel, model, lora, batch, key, **memory)
        grad_norm = optax.tree.norm(grads) if hasattr(optax, "tree") else optax.global_norm(grads)
        updates, new_opt = tx.update(grads, opt_state, lora)
        new_lora = optax.apply_updates(lora, updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
        return keep(new_lora, lora), keep(new_opt, opt_state), {"loss": loss, "tokens": count,
                                                                  "grad_norm": grad_norm, "finite": ok}

    if out_shardings is None:
        return jax.jit(step, donate_argnums=(0, 1))
    return jax.jit(step, donate_argnums=(0, 1), out_shardings=out_shardings)


def _is_oom(err: Exception) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


class Trainer:
    """Runs training of ``model.lora`` on prepared ``rows``; checkpoints, logs, resumes."""

    def __init__(self, model, rows: Rows, args: TrainingArguments, *, log=print):
        args.validate()
        if model.lora is None:
            raise ValueError("the model has no LoRA adapters: call jaxsloth.add_lora(model, ...) first")
        self.model, self.rows, self.args, self.log = model, rows, args, log
        self.mesh, self.data_parallel = None, False
        if args.mesh is not None or jax.device_count() > 1:
            from jaxsloth.sharding import describe, make_mesh

            mesh = make_mesh(args.mesh, model=model)  # a spec that does not fit the devices raises here
            if mesh.size > 1:  # one device: no mesh, the plain single-device path
                self.mesh = mesh
                log(f"mesh: {describe(mesh)}")
        n_dev = 1 if self.mesh is None else self.mesh.size
        self.stream = BatchStream(rows, args.per_device_train_batch_size * n_dev, args.gradient_accumulation_steps,
                                  args.seed, shuffle=args.shuffle)
        if args.max_steps > 0:
            self.total_steps = args.max_steps
        else:
            self.total_steps = max(1, math.ceil(args.num_train_epochs * len(rows) / self.stream.rows_per_step))
        self.tx = make_optimizer(args, self.total_steps)
        self.schedule = lr_schedule(args, self.total_steps)
        memory = dict(remat=args.remat, packing=args.packing, remat_group=args.remat_group, mlp_chunk=args.mlp_chunk,
                      loss_chunk=args.loss_chunk, layer_unroll=args.layer_unroll)
        if self.mesh is None:
            self.step_fn = make_train_step(self.tx, **memory)
        else:
            from jax.sharding import NamedSharding, PartitionSpec

            from jaxsloth.sharding import lora_shardings, opt_state_shardings

            # fsdp=1: plain data parallelism, each device runs the one-device step on its rows
            self.data_parallel = self.mesh.shape["fsdp"] == 1
            self.step_fn = make_train_step(
                self.tx, **memory, data_parallel=self.mesh if self.data_parallel else None,
                out_shardings=(lora_shardings(model.lora, self.mesh),
                               opt_state_shardings(self.tx, model.lora, self.mesh),
                               NamedSharding(self.mesh, PartitionSpec())))
        self.out = Path(args.output_dir)
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ checkpoints
    def _manager(self):
        import orbax.checkpoint as ocp

        return ocp.CheckpointManager(
            (self.out / "checkpoints").absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=self.args.save_total_limit, create=True))

    def _save(self, mngr, step, lora, opt_state):
        import orbax.checkpoint as ocp

        mngr.save(step, args=ocp.args.StandardSave({"lora": lora, "opt_state": opt_state}))
        mngr.wait_until_finished()

    def _restore(self, mngr, lora, opt_state):
        import orbax.checkpoint as ocp

        step = mngr.latest_step()
        if step is None:
            return 0, lora, opt_state
        from jaxsloth.sharding import abstract_with_shardings

        # the target carries this run's shardings: a checkpoint from any mesh restores onto this one
        abstract = abstract_with_shardings({"lora": lora, "opt_state": opt_state})
        state = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
        self.log(f"resumed from checkpoint at step {step} ({self.out / 'checkpoints'})")
        return step, state["lora"], state["opt_state"]

    # ------------------------------------------------------------------ loop
    def train(self, resume: bool = False):
        args, model = self.args, self.model
        self.out.mkdir(parents=True, exist_ok=True)
        caller_lora = model.lora
        # the step donates its input: train a copy unless the caller gave its adapters up
        lora = caller_lora if args.donate_model_lora else jax.tree_util.tree_map(jnp.copy, caller_lora)
        if self.mesh is None:
            opt_state = self.tx.init(lora)
        else:
            from jaxsloth.sharding import activate, init_opt_state, shard_batch, shard_lora, shard_model

            # Under FSDP the step is partitioned by GSPMD, and the Pallas kernels (rmsnorm, rope, NF4)
            # have no partitioning rules: GSPMD would gather their operands and run them on the whole
            # batch on every device. Their XLA versions partition; per op on one H100 they cost little
            # (bench/RESULTS.md). The loss keeps its Pallas pass: it runs per device
            # (per_device_token_loss). Plain data parallelism runs per device (shard_map): kernels stay.
            if not self.data_parallel and model.implementation is None:
                model = model.replace(implementation="xla")
            model = shard_model(model.replace(lora=None), self.mesh)
            lora = shard_lora(lora, self.mesh)
            opt_state = init_opt_state(self.tx, lora, self.mesh)
        mngr = self._manager() if (args.save_steps > 0 or resume) else None
        start = 0
        if resume:
            start, lora, opt_state = self._restore(mngr, lora, opt_state)
        if args.donate_model_lora:  # sharded or restored copies replaced them: free the caller's now
            kept = {id(x) for x in jax.tree_util.tree_leaves(lora)}
            for x in jax.tree_util.tree_leaves(caller_lora):
                if id(x) not in kept and not x.is_deleted():
                    x.delete()
        del caller_lora
        metrics_path = self.out / "metrics.jsonl"
        if start == 0:
            metrics_path.unlink(missing_ok=True)
        else:
            self.history = [json.loads(line) for line in metrics_path.read_text().splitlines()
                            if line.strip() and json.loads(line)["step"] <= start] if metrics_path.exists() else []
            metrics_path.write_text("".join(json.dumps(h) + "\n" for h in self.history))
        base_key = jax.random.PRNGKey(args.seed)
        tokens_per_step = self.stream.rows_per_step * self.rows.input_ids.shape[1]

        bar = None
        if args.progress:
            from tqdm import tqdm
            bar = tqdm(total=self.total_steps, initial=start, desc="training", unit="step")
        t_last, last_good = time.perf_counter(), start
        with open(metrics_path, "a") as mf:
            for step in range(start, self.total_steps):
                batch = self.stream.batch(step)
                if self.mesh is not None:
                    batch = shard_batch(batch, self.mesh)
                lr = float(self.schedule(step))
                try:
                    with contextlib.nullcontext() if self.mesh is None else activate(self.mesh):
                        lora, opt_state, m = self.step_fn(lora, opt_state, model.replace(lora=None), batch,
                                                          jax.random.fold_in(base_key, step))
                    loss = float(m["loss"])
                except Exception as e:  # noqa: BLE001 - only OOM is translated; the rest re-raises
                    if _is_oom(e):
                        raise TrainingError(
                            f"out of GPU memory at step {step + 1} (batch {args.per_device_train_batch_size} x "
                            f"{self.rows.input_ids.shape[1]} tokens): try a shorter max_seq_length, "
                            "remat='offload', or a smaller per_device_train_batch_size with more "
                            "gradient_accumulation_steps; JAX uses XLA_PYTHON_CLIENT_MEM_FRACTION of the card "
                            f"({os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.75 by default')})") from e
                    raise
                if not bool(m["finite"]):
                    where = f"; the last good checkpoint is step {last_good}" if mngr and last_good else ""
                    raise TrainingError(f"non-finite loss or gradient at step {step + 1} (loss={loss}); training "
                                        f"stopped before applying it{where}. Lower learning_rate or check the data.")
                now = time.perf_counter()
                rec = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": float(m["grad_norm"]),
                       "label_tokens": int(m["tokens"]), "tokens_per_s": tokens_per_step / (now - t_last),
                       "seconds": now - t_last}
                t_last = now
                self.history.append(rec)
                if (step + 1) % args.logging_steps == 0 or step + 1 == self.total_steps:
                    mf.write(json.dumps(rec) + "\n")
                    mf.flush()
                if bar:
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
                    bar.update()
                if mngr and args.save_steps > 0 and (step + 1) % args.save_steps == 0:
                    self._save(mngr, step + 1, lora, opt_state)
                    last_good = step + 1
        if bar:
            bar.close()
        if mngr:
            mngr.close()
        self.model = model.replace(lora=lora, implementation=self.model.implementation)
        self._plot()
        return self.model

    def _plot(self):
        if not self.history:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([h["step"] for h in self.history], [h["loss"] for h in self.history])
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title("jaxsloth training loss")
        fig.tight_layout()
        fig.savefig(self.out / "loss_curve.png", dpi=120)
        plt.close(fig)


def train(model, data, args: TrainingArguments | None = None, *, resume: bool = False, log=print, **kwargs):
    """Fine-tune ``model`` (with LoRA) on ``data`` (a file path, a ``datasets.Dataset`` or prepared Rows).

    Applies the untrained-token embedding fix first when the data uses such tokens. Returns the
    trained model; per-step metrics are in ``output_dir/metrics.jsonl``.
    """
    args = args or TrainingArguments(**kwargs)
    if kwargs and args is not None and not isinstance(args, TrainingArguments):
        raise TypeError("pass either a TrainingArguments or keyword arguments")
    if model.tokenizer is None and not isinstance(data, Rows):
        raise ValueError("the model has no tokenizer; load it with jaxsloth.load_model or pass prepared Rows")
    rows = data if isinstance(data, Rows) else prepare_data(
        data, model.tokenizer, args.max_seq_length, packing=args.packing,
        train_on_responses_only=args.train_on_responses_only)
    log(f"data: {rows.num_examples} examples in {len(rows)} rows of {rows.input_ids.shape[1]} tokens, "
        f"{rows.num_label_tokens} label tokens; {rows.truncated} truncated to max_seq_length={args.max_seq_length}"
        + (f"; {rows.dropped_no_labels} dropped (no labels left)" if rows.dropped_no_labels else ""))
    model = fix_untrained_tokens_if_used(model, rows, log=log)
    trainer = Trainer(model, rows, args, log=log)
    return trainer.train(resume=resume)


def fix_untrained_tokens_if_used(model, rows: Rows, *, log=print):
    from jaxsloth.embedding_fix import apply_untrained_token_fix, find_untrained_tokens

    candidates = find_untrained_tokens(model.config, model.params, model.tokenizer)
    if not candidates:
        return model
    used = set(np.unique(rows.input_ids[rows.segment_ids > 0]).tolist())
    hit = sorted(set(candidates) & used)
    if not hit:
        log(f"embedding fix: {len(candidates)} untrained token rows in the checkpoint, none used by the data")
        return model
    model, fixed = apply_untrained_token_fix(model, candidates)
    names = model.tokenizer.convert_ids_to_tokens(hit[:8]) if model.tokenizer is not None else hit[:8]
    log(f"embedding fix: the data uses {len(hit)} untrained tokens ({', '.join(map(str, names))}"
        f"{', ...' if len(hit) > 8 else ''}); set {len(fixed)} untrained rows of embed_tokens/lm_head to the "
        "mean of the trained rows")
    return model

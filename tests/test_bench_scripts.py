"""The benchmark helpers that run on the GPU machine, exercised on CPU with tiny shapes.

The GPU figures in bench/RESULTS.md come from these scripts; here they must build the same model
layout the loader builds, train, and report what they claim to report.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))


def _tree_signature(tree):
    import jax

    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return str(treedef), [(tuple(x.shape), str(x.dtype)) for x in leaves]


def test_random_nf4_model_has_the_loaders_layout(tmp_path):
    """bench/random_model.py (70B in NF4 straight on the device) == what load_model builds from a
    checkpoint of the same shape with load_in_4bit: same pytree, shapes and dtypes; finite logits."""
    import jax.numpy as jnp

    import jaxsloth
    from export_merged_8b import write_random_base
    from random_model import TINY, random_nf4_model

    write_random_base(tmp_path / "base", TINY, shard_bytes=10**6)
    (tmp_path / "base" / "config.json").write_text(json.dumps({
        **json.loads((tmp_path / "base" / "config.json").read_text()), "rope_theta": 500000.0}))
    loaded, _ = jaxsloth.load_model(tmp_path / "base", dtype="bfloat16", load_in_4bit=True)
    built = random_nf4_model(TINY)
    assert _tree_signature(built.params) == _tree_signature(loaded.params)
    assert built.config.linear_shapes() == loaded.config.linear_shapes()
    logits = built(jnp.arange(12, dtype=jnp.int32).reshape(2, 6))
    assert logits.shape == (2, 6, TINY["vocab_size"]) and bool(jnp.isfinite(logits).all())
    # deterministic in the seed, different across seeds
    again, other = random_nf4_model(TINY), random_nf4_model(TINY, seed=1)
    q, q2, q3 = (m.params["layers"]["q"].codes for m in (built, again, other))
    assert np.array_equal(np.asarray(q), np.asarray(q2)) and not np.array_equal(np.asarray(q), np.asarray(q3))


def test_sanity_data_is_seeded_text_ids(tmp_path):
    from sanity_data import WORDS, main, make_ids

    a, b = make_ids(3, 2, 40, seed=5), make_ids(3, 2, 40, seed=5)
    assert a.shape == (3, 2, 41) and a.dtype == np.int32 and np.array_equal(a, b)
    assert a.min() >= 1000 and a.max() < 1000 + len(WORDS)
    assert not np.array_equal(a, make_ids(3, 2, 40, seed=6))
    main(["--out", str(tmp_path / "ids.npy"), "--steps", "2", "--batch", "1", "--seq", "8", "--base-id", "10"])
    ids = np.load(tmp_path / "ids.npy")
    assert ids.shape == (2, 1, 9) and ids.min() >= 10


def test_max_context_search_on_a_random_nf4_model(tmp_path, capsys):
    import max_context

    out = tmp_path / "ctx.json"
    max_context.main(["--tiny", "--random-nf4", "--schedule", "64,128", "--compile-only", "256",
                      "--budget", "120", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["max_ok"] == 128 and res["first_fail"] is None
    compiled, ran = res["tries"][0], res["tries"][1:]
    assert compiled["compiled_only"] and compiled["ok"] is None and compiled["footprint_gib"] >= 0
    assert all(t["ok"] and np.isfinite(t["loss"]) for t in ran)


def test_throughput_presets_and_loss_sanity(tmp_path, capsys):
    import train_throughput
    from sanity_data import main as write_ids

    write_ids(["--out", str(tmp_path / "ids.npy"), "--steps", "4", "--batch", "2", "--seq", "32", "--base-id", "100"])
    train_throughput.main(["--tiny", "--workdir", str(tmp_path), "--presets", "full,offload/mlp=32/ce=16/tie=1",
                           "--sanity", str(tmp_path / "ids.npy")])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["preset"] for r in last["results"]] == ["full", "offload/mlp=32/ce=16/tie=1"]
    # same data, same step: memory options change the schedule, not the loss
    assert last["results"][0]["first_loss"] == pytest.approx(last["results"][1]["first_loss"], rel=1e-5)
    s = last["sanity"]
    assert s["finite"] and len(s["losses"]) == 4 and s["last"] < s["first"]


def test_profile_summary_sums_gpu_kernels_by_class(tmp_path):
    """A synthetic trace in the layout jax.profiler writes: kernels on a GPU stream thread are
    classed by name, overlapping kernels count once in busy time, host events are ignored."""
    import gzip

    from profile_summary import summarize

    ev = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
          {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #13(Compute)"}},
          {"ph": "X", "pid": 1, "tid": 7, "ts": 0, "dur": 100, "name": "nvjet_sm90_tss_x", "args": {"hlo_op": "dot.1"}},
          {"ph": "X", "pid": 1, "tid": 7, "ts": 50, "dur": 100, "name": "memcpy128", "args": {"hlo_op": "copy.3"}},
          {"ph": "X", "pid": 1, "tid": 7, "ts": 300, "dur": 40, "name": "nf4_dequant__4"},
          {"ph": "X", "pid": 2, "tid": 1, "ts": 0, "dur": 5000, "name": "python"}]
    (tmp_path / "t").mkdir()
    with gzip.open(tmp_path / "t" / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": ev}, f)
    s = summarize(str(tmp_path), steps=2)
    assert s["kernels"] == 3
    assert s["busy_ms"] == pytest.approx(0.095) and s["wall_ms"] == pytest.approx(0.17)  # per step: /2
    assert s["by_class_ms"]["matmul (cuBLAS/CUTLASS)"] == pytest.approx(0.05)
    assert s["by_class_ms"]["nf4 dequant / matmul (Pallas)"] == pytest.approx(0.02)
    assert [o["op"].rsplit(": ", 1)[1] for o in s["top_hlo_ops"]] == ["dot.1", "copy.3"]


def test_plot_context_draws_extra_series(tmp_path):
    from plot_context import main

    a = tmp_path / "a.json"
    a.write_text(json.dumps({"tries": [{"seq": 1000, "footprint_gib": 10.0, "ok": True},
                                       {"seq": 2000, "footprint_gib": 20.0, "ok": None, "compiled_only": True},
                                       {"seq": 4000, "ok": False, "error": "OOM"}]}))
    out = tmp_path / "p.png"
    main(["--series", f"one GPU={a},{a}", "--ref", "target=3000", "--out", str(out)])
    assert out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"


def test_baseline_max_context_search_grows_then_bisects(monkeypatch):
    """bench/baselines' search: along the schedule until the first OOM, then halving down to the
    granularity; a non-OOM error stops it (fake probes: OOM above 40,000 tokens)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "baselines"))
    import bench_common

    def fake(model, opt, seq, device="cuda"):
        if seq > 40_000:
            return {"seq": seq, "ok": False, "error": "OOM"}
        return {"seq": seq, "ok": True, "s_per_step": 0.0}

    monkeypatch.setattr(bench_common, "try_len", fake)
    out = bench_common.search_max_ctx(None, None, [16384, 32768, 65536, 131072], 4096, 60, log=lambda *_: None,
                                      device="cpu")
    assert [t["seq"] for t in out["tries"]] == [16384, 32768, 65536, 49152, 40960, 36864]
    assert (out["lo_ok"], out["hi_fail"], out["stopped_early"]) == (36864, 40960, None)
    monkeypatch.setattr(bench_common, "try_len", lambda *a, **k: {"seq": a[2], "ok": False, "error": "boom"})
    assert bench_common.search_max_ctx(None, None, [1024, 2048], 512, 60, log=lambda *_: None,
                                       device="cpu")["stopped_early"] == "non-OOM error"


@pytest.mark.parametrize("script,args,expect", [
    ("kernels.py", ["jax", "--small", "--ops", "rope,ce", "--sweep", "rope"], "rope_sweep.txt"),
    ("nf4_matmul.py", ["--section", "sweep", "--tiny", "--buckets", "m1"], "tuned.json"),
])
def test_kernel_benchmarks_run_on_tiny_shapes(tmp_path, script, args, expect):
    """The GPU kernel benchmarks (sweeps included) run end to end on CPU with tiny shapes and write
    their results: a broken candidate or report would otherwise first show up on the GPU."""
    import subprocess

    out = tmp_path / "out"
    res = subprocess.run([sys.executable, str(BENCH / script), *args, "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / expect).exists() and (out / expect).stat().st_size > 0
    if script == "nf4_matmul.py":
        recs = [json.loads(line) for line in (out / "results_sweep.jsonl").read_text().splitlines()]
        assert not [r for r in recs if "error" in r]
        assert json.loads((out / expect).read_text())["m1"]["fwd"] in ("xla", "fused")

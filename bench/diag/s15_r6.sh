# (MgpuPlan.pair was removed after session 15: run at commit 750054b)
# session 15 run 6: pair 2's copy as ld.shared::cluster.v4 from a mapa'd address (r5: the
# vector.load of a cluster_ref made it 6.1x the bf16 dot, 1.20 without its copy and fences):
# the pair 2 GPU tests, then the variants (fences, copy) at M = 2048, results checked
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r6; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 100 python -m pytest -q -n 4 tests/test_nf4_mgpu.py -k "matches_reference_on_gpu and C2" -p no:cacheprovider --tb=line -rf 2>&1 | grep -v Warn | tail -12 > $D/pytest.txt
tail -3 $D/pytest.txt | cut -c1-300
timeout 200 python bench/diag/s15_pull_variants.py --out $D/pull.jsonl --shapes 8b_gate_up,70b_gate_up,8b_down --rounds 3 2>&1 | grep -v Warn | tail -40 | tee $D/pull.txt
date -u >> $D/info.txt

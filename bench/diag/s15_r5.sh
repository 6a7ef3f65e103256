# (MgpuPlan.pair was removed after session 15: run at commit 750054b)
# session 15 run 5: the whole GPU test suite (-m gpu, 4 pytest workers; with the pair plans and
# session 14's decoder plans), then where pair 2's time goes (bench/diag/s15_pull_variants.py:
# without its cluster fences, without its copy) against the same plan unpaired, M = 2048
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r5; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 130 python bench/diag/s15_pull_variants.py --out $D/pull.jsonl --shapes 8b_gate_up --rounds 3 2>&1 | grep -v Warn | tail -12 | tee $D/pull.txt
timeout 380 python -m pytest -q -m gpu tests/ -p no:cacheprovider -n 4 --durations=15 --tb=line -rf 2>&1 | grep -v Warn | tail -40 > $D/pytest_gpu.txt
date -u >> $D/info.txt; tail -3 $D/pytest_gpu.txt

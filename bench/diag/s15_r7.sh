# session 15 run 7: the large-M backward through nf4_mgpu's decode (MGPU_DEQUANT_BWD): the
# dispatch's GPU test (M = 1100, forward and dx), then fwd+bwd A/B at M = 2048
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r7; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 70 python -m pytest -q tests/test_nf4_mgpu.py -k "dispatch_with_the_swap_kernel and 1100" -p no:cacheprovider --tb=short 2>&1 | grep -v Warn | tail -5 | tee $D/pytest.txt
timeout 110 python bench/diag/s15_bwd_dequant.py --out $D/bwd.jsonl --shapes 8b_gate_up,70b_gate_up,8b_down --rounds 3 2>&1 | grep -v Warn | tail -15 | tee $D/bwd.txt
date -u >> $D/info.txt

# session 11 run 5: the mid-M dispatch (gather kernel at 256 <= M <= 1024) checked and timed against the plan it replaced
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r5; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; git log --oneline -1; } > $D/info.txt
timeout 200 python -m pytest -q tests/test_nf4_mgpu.py -k "(matches_reference_on_gpu and e0SG) or dispatch" 2>&1 | tail -25 > $D/pytest.txt
timeout 200 python bench/nf4_mgpu.py --out $D/mgpu.jsonl --ms 256,512,1024 --shapes 70b_gate_up,70b_down,70b_q_o,70b_k_v,8b_gate_up,8b_down,8b_q_o,8b_k_v --plans > $D/mgpu.log 2>&1
timeout 170 python bench/nf4_matmul.py --out $D/table --sections table --ms 256,1024 --impls bf16,ours --budget 160 > $D/table_log.txt 2>&1
date -u >> $D/info.txt; tail -n 3 $D/pytest.txt

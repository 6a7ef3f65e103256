# session 11 run 9: plan.dq with the map and nested absmax in shared memory and the offset read from global memory
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r9; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 90 python -m pytest -q tests/test_nf4_mgpu.py -k "(matches_reference_on_gpu and Q]) or bitwise" 2>&1 | tail -15 > $D/pytest.txt
timeout 170 python bench/nf4_mgpu.py --out $D/small.jsonl --ms 16 --shapes 70b_gate_up,70b_down,70b_q_o,8b_gate_up,8b_down,8b_q_o --plans "64,64,512,2,0,64+swap" "64,64,512,2,0,64+swap+dq" > $D/small.log 2>&1
timeout 60 python bench/nf4_mgpu.py --out $D/small4.jsonl --ms 4 --shapes 70b_gate_up,8b_gate_up,8b_down --plans "64,64,512,2,0,64+swap+dq" > $D/small4.log 2>&1
date -u >> $D/info.txt; tail -n 3 $D/pytest.txt

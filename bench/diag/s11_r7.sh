# session 11 run 7: plan.dq again (run 6's bench check wrongly covered K < 1024 for dq plans, so they were not timed)
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r7; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 100 python -m pytest -q tests/test_nf4_mgpu.py -k "(matches_reference_on_gpu and Q]) or bitwise" 2>&1 | tail -15 > $D/pytest.txt
timeout 150 python bench/nf4_mgpu.py --out $D/small.jsonl --ms 16 --shapes 70b_gate_up,70b_down,70b_q_o,8b_gate_up,8b_down --kernel-only --plans "64,64,512,2,0,64+swap" "64,64,512,2,0,64+swap+dq" > $D/small.log 2>&1
timeout 100 python bench/nf4_mgpu.py --out $D/mid.jsonl --ms 512 --shapes 8b_gate_up,70b_gate_up,70b_q_o --plans "256,128,128,2,1,64+swap+ws+gather" "256,128,128,2,1,64+swap+ws+gather+dq" > $D/mid.log 2>&1
date -u >> $D/info.txt; tail -n 3 $D/pytest.txt

# session 11 run 2: the gather swap kernels (correctness, large M and small M against the current ones)
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r2; mkdir -p $D; nvidia-smi --query-gpu=name,driver_version --format=csv > $D/info.txt
timeout 170 python -m pytest -q -x tests/test_nf4_mgpu.py -k "matches_reference_on_gpu and S" 2>&1 | tail -25 > $D/pytest.txt
timeout 240 python bench/nf4_mgpu.py --out $D/large.jsonl --ms 2048,4096 --shapes 8b_gate_up,70b_gate_up,8b_down --plans "256,128,64,4,1,64+ws" "256,128,64,4,1,64+swap+ws+gather" "256,128,64,4,1,64+swap+ws+gather+skip_decode" "128,128,64,4,1,64+swap+ws+gather" "256,128,128,2,1,64+swap+ws+gather" > $D/large.log 2>&1
timeout 150 python bench/nf4_mgpu.py --out $D/small.jsonl --ms 16 --shapes 70b_gate_up,70b_down,8b_gate_up,70b_q_o --kernel-only --plans "64,64,512,2,0,64+swap" "64,64,512,2,0,64+swap+gather" "64,64,512,2,0,64+swap+gather+skip_decode" > $D/small.log 2>&1
tail -n 3 $D/pytest.txt

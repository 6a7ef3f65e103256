# session 11 run 3: overlap and pingpong on the gather swap kernels
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r3; mkdir -p $D; nvidia-smi --query-gpu=name,driver_version --format=csv > $D/info.txt
timeout 120 python -m pytest -q -x tests/test_nf4_mgpu.py -k "matches_reference_on_gpu and (oe0SG or owe0SG or SPG)" 2>&1 | tail -25 > $D/pytest.txt
timeout 240 python bench/nf4_mgpu.py --out $D/large.jsonl --ms 2048,4096 --shapes 8b_gate_up,70b_gate_up,8b_down --plans "256,128,128,2,1,64+swap+ws+gather" "256,128,64,4,1,64+swap+ws+gather+overlap" "256,128,128,2,1,64+swap+ws+gather+pingpong" "256,128,64,4,1,64+swap+ws+gather+pingpong" > $D/large.log 2>&1
timeout 150 python bench/nf4_mgpu.py --out $D/small.jsonl --ms 16 --shapes 70b_gate_up,70b_down,70b_q_o --kernel-only --plans "64,64,512,2,0,64+swap" "64,64,512,3,0,64+swap+overlap" "64,64,256,4,0,64+swap+overlap" "64,64,512,2,0,64+swap+overlap" > $D/small.log 2>&1
tail -n 3 $D/pytest.txt

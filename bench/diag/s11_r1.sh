set -x
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r1; mkdir -p $D; nvidia-smi --query-gpu=name,driver_version --format=csv > $D/info.txt
timeout 150 python -m pytest -q -x tests/test_nf4_mgpu.py -k "matches_reference_on_gpu and (P or 256x128x64s1c64we0)" 2>&1 | tail -5 > $D/pytest.txt
timeout 120 python bench/diag/mgpu_sass.py --dir /tmp/sass --plans "256,128,64,4,1,64+ws" "256,128,64,4,1,64+ws+pingpong" "64,64,512,2,0,64+swap" --m 2048 --n 8192 --k 8192 > $D/sass.jsonl 2>&1
tar czf $D/sass.tgz -C /tmp sass 2>/dev/null
timeout 200 python bench/nf4_mgpu.py --out $D/large.jsonl --ms 2048,4096 --shapes 8b_gate_up,70b_gate_up,8b_down --plans "256,128,64,4,1,64+ws" "256,128,64,4,1,64+ws+pingpong" "256,128,64,4,1,64+ws+skip_decode" "256,128,64,4,1,64+ws+skip_mma" "128,256,64,4,1,64+ws+pingpong" > $D/large.log 2>&1
timeout 120 python bench/nf4_mgpu.py --out $D/small.jsonl --ms 16 --shapes 70b_gate_up,70b_down,8b_gate_up --kernel-only --plans "64,64,512,2,0,64+swap" "64,64,512,2,0,64+swap+skip_decode" > $D/small.log 2>&1
tail -3 $D/*.log $D/pytest.txt

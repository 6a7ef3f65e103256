# session 11 run 4: the gather swap kernel at mid M (256-1024), against the dispatch; GPU tests of the gather plans
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r4; mkdir -p $D; nvidia-smi --query-gpu=name,driver_version --format=csv > $D/info.txt
timeout 150 python -m pytest -q tests/test_nf4_mgpu.py -k "(matches_reference_on_gpu and e0SG) or dispatch_with" 2>&1 | tail -25 > $D/pytest.txt
timeout 330 python bench/nf4_mgpu.py --out $D/mid.jsonl --ms 256,512,1024 --shapes 8b_gate_up,8b_down,8b_q_o,70b_gate_up,70b_q_o --plans "256,128,128,2,1,64+swap+ws+gather" "128,128,128,3,0,64+swap+ws+gather" > $D/mid.log 2>&1
tail -n 3 $D/pytest.txt

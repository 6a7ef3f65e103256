# session 18 run 2: plan.lag in the warp-specialized gather kernel (each step's last wgmma left in
# flight into the next; 2: even and odd steps decode in two branches, so their register operands
# differ; 1: one body, wrong results, timed unchecked to see what the overlap is worth, also
# without its decode), and tile_k 128 with 2 stages for the 256-row tile: GPU tests of the lag 2
# plans, then M=2048 against the dispatched plan; M=512-1024 and the 128-row plan at 256-512
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r2; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 120 python -m pytest -q -n 4 tests/test_nf4_mgpu.py -m gpu -k "A2" -p no:cacheprovider --tb=line -rf 2>&1 | grep -v Warn | tail -14 > $D/pytest.txt
tail -4 $D/pytest.txt | cut -c1-300
W=256,128,64,4,1,64+swap+ws+gather+lut=16
timeout 220 python bench/nf4_mgpu.py --out $D/m2048.jsonl --ms 2048 --rounds 3 --no-triton \
  --shapes 8b_gate_up,8b_down,70b_q_o,70b_gate_up --plans $W $W+lag=2 $W+lag=1 $W+lag=1+skip_decode \
  $W+skip_decode 256,128,128,2,1,64+swap+ws+gather+lut=8 \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/m2048.txt
timeout 110 python bench/nf4_mgpu.py --out $D/mid.jsonl --ms 512,1024 --rounds 3 --no-triton \
  --shapes 8b_gate_up,70b_q_o --plans $W $W+lag=2 \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/mid.txt
N=128,128,128,3,0,64+swap+ws+gather+lut=32
timeout 80 python bench/nf4_mgpu.py --out $D/narrow.jsonl --ms 256,512 --rounds 3 --no-triton \
  --shapes 8b_down,8b_q_o --plans $N $N+lag=2 \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/narrow.txt
date -u >> $D/info.txt

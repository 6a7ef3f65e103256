# session 16 run 1: plan.finish (the last K range's program adds the other programs' f32 partials,
# behind a per-tile semaphore, and writes y in bf16: no zeroed buffer, no XLA pass after the
# kernel): its GPU tests, then M = 16 and 4 forward times against the dispatch (gather + reduce
# at M = 16; the XLA sum at M = 4) and the bf16 dot, kernel-only figures included
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r1; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 150 python -m pytest -q -n 4 tests/test_nf4_mgpu.py -k "matches_reference_on_gpu and (L32F or SGF)" -p no:cacheprovider --tb=line -rf 2>&1 | grep -v Warn | tail -12 > $D/pytest.txt
tail -4 $D/pytest.txt | cut -c1-400
timeout 330 python bench/nf4_mgpu.py --out $D/finish.jsonl --ms 16,4 --rounds 3 --kernel-only \
  --shapes 70b_gate_up,70b_down,70b_q_o,8b_gate_up,8b_down,8b_q_o \
  --plans "128,64,256,2,0,64+swap+gather+dq+lut=32+finish" "128,64,512,2,0,64+swap+gather+dq+lut=32+finish" \
          "128,64,256,2,0,64+swap+dq+lut=32+finish@8" "128,64,512,2,0,64+swap+dq+lut=32+finish@8" \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/finish.txt
date -u >> $D/info.txt

# session 16 run 2: the nested absmax no longer padded by an XLA pass (`_ne_window`: the last
# copies start early) and plan.finish: GPU tests of the dq and finish plans (the shifted copies run
# at N = 4160), then M = 16 and 1 forward times: the dispatch (now without the pad) against the
# finish plans, auto split and split 2
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r2; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 170 python -m pytest -q -n 4 tests/test_nf4_mgpu.py -m gpu -k "(matches_reference_on_gpu and (q or f)) or dq_equals or lut_equals or dequantize_mgpu_is or dispatch_with_the_swap" -p no:cacheprovider --tb=line -rf 2>&1 | grep -v Warn | tail -12 > $D/pytest.txt
tail -4 $D/pytest.txt | cut -c1-400
timeout 330 python bench/nf4_mgpu.py --out $D/finish.jsonl --ms 16,1 --rounds 3 --no-triton \
  --shapes 70b_gate_up,70b_down,70b_q_o,8b_gate_up,8b_down,8b_q_o \
  --plans "128,64,256,2,0,64+swap+gather+dq+lut=32+finish" "128,64,512,2,0,64+swap+gather+dq+lut=32+finish" \
          "128,64,256,2,2,64+swap+gather+dq+lut=32+finish" \
          "128,64,256,2,0,64+swap+dq+lut=32+finish@8" "128,64,512,2,0,64+swap+dq+lut=32+finish@8" \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/finish.txt
date -u >> $D/info.txt

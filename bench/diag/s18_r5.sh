# session 18 run 5: the session's dispatch (lag 2 mid-M plan to M=2048 on every weight, to 4096 on
# the 70B MLP weights, no waves rule) at M=2048 on the six large weights, 5 interleaved rounds
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r5; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 200 python bench/nf4_mgpu.py --out $D/m2048.jsonl --ms 2048 --rounds 5 --no-triton \
  --shapes 8b_gate_up,8b_down,70b_q_o,70b_gate_up,70b_down,8b_q_o --plans \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/m2048.txt
date -u >> $D/info.txt

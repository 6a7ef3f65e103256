# session 16 run 5: the floor of the timing loop at M <= 16 (bench/diag/s16_floor.py): an op of one
# tiny fusion, and one XLA reduction over the NF4 codes, against the bf16 dot and the dispatch (M = 16,
# 4 and 1: the dispatch at M = 4 not timed since the unpadded nested absmax)
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r5; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 240 python bench/diag/s16_floor.py --out $D/floor.jsonl \
  --shapes 8b_k_v,70b_k_v,8b_q_o,70b_q_o,8b_gate_up,8b_down,70b_gate_up --ms 16,4,1 \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/floor.txt
date -u >> $D/info.txt

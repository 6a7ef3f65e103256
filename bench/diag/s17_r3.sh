# session 17 run 3: the warp-specialized gather kernel with the table (lut 16, tile_k 64, 4
# stages; and the 128-row x tile plan with lut 32 where 256-row tiles make < 100 programs)
# against the dispatch at M = 512-4096 on the larger weights, medians of 3 interleaved rounds
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r3; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 300 python bench/nf4_mgpu.py --out $D/mgpu.jsonl --ms 512,1024,2048,4096 --rounds 3 --no-triton \
  --shapes 8b_gate_up,8b_down,70b_gate_up,70b_q_o,8b_q_o --plans 256,128,64,4,1+swap+ws+gather+lut=16 \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/mgpu.txt
timeout 120 python bench/nf4_mgpu.py --out $D/mgpu128.jsonl --ms 256,512 --rounds 3 --no-triton \
  --shapes 8b_down,8b_q_o --plans 128,128,128,3,0+swap+ws+gather+lut=32 128,128,64,4,0+swap+ws+gather+lut=32 \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/mgpu128.txt
date -u >> $D/info.txt

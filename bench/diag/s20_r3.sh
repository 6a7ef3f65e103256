# session 20, r3: GPU tests of the dispatch (8B down at M = 1 and 13 with K split in 14, 1B down
# at M = 1 on the swap kernel: new) and of bitsandbytes compatibility; the Llama 3.2 down weights
# at M = 1 and 2: the dispatch (now the swap kernel, tile_k 256), the GEMV it replaces at M=1
# ("triton") and the swap plan at tile_k 512 measured in r2; then the all-in-one table at
# M = 1 and 16 with the final dispatch (every 8B and 70B projection, ours / XLA dequant+dot /
# bf16 dot, fwd and fwd+bwd; bitsandbytes dequantize_4bit + torch.matmul in its own process)
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r3; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 110 python -m pytest -q -n 4 -m gpu tests/test_nf4_mgpu.py tests/test_nf4_gpu_bnb.py \
  -k "dispatch or not_a_power or bnb or bitsandbytes" -p no:cacheprovider --tb=short -rf 2>&1 \
  | grep -v Warn > $D/pytest.txt; tail -3 $D/pytest.txt | cut -c1-300
timeout 60 python bench/nf4_mgpu.py --out $D/m1.jsonl --ms 1,2 --rounds 5 --shapes 3b_down,1b_down \
  --plans 128,64,512,2,0,64+swap+dq+lut=32@8 2>&1 | grep -v Warn | python bench/diag/s16_fmt.py \
  | tee $D/m1.txt
timeout 290 python bench/nf4_matmul.py --all --out $D/all --sections table,torch --ms 1,16 \
  --impls bf16,ours,xla --budget 270 > $D/all.txt 2>&1
grep -c "" $D/all.txt; grep -n "deadline\|ERROR\|budget" $D/all.txt | head
date -u >> $D/info.txt

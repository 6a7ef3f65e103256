# session 19, r3: the GPU tests of the dispatch (k/v at M=1900 new) and of bitsandbytes
# compatibility, then the all-in-one table of the issue with the final dispatch: every 8B and 70B
# projection at M = 1, 16, 256, 2048, 4096, 16384, ours / XLA dequant+dot / bf16 dot, fwd and
# fwd+bwd, and bitsandbytes dequantize_4bit + torch.matmul in its own process at the end
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r3; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 100 python -m pytest -q -n 4 -m gpu tests/test_nf4_mgpu.py tests/test_nf4_gpu_bnb.py \
  -k "dispatch or bnb or bitsandbytes" -p no:cacheprovider --tb=line -rf 2>&1 | grep -v Warn \
  | tail -14 > $D/pytest.txt
tail -3 $D/pytest.txt | cut -c1-300
timeout 450 python bench/nf4_matmul.py --all --out $D/all --sections table,torch \
  --ms 1,16,256,2048,4096,16384 --impls bf16,ours,xla --budget 430 > $D/all.txt 2>&1
grep -c "" $D/all.txt; grep -n "deadline\|ERROR\|total" $D/all.txt | head
date -u >> $D/info.txt

# session 19, r2: the k/v weights (N = 1024, no fused plan dispatched above M=256) at M = 256 to
# 16384 on the two mid-M gather plans (r1, M=2048: the 128-row plan 0.957 on 8B k/v against the
# dispatch's 1.373), the 128-row plan with K split in 2 and unsplit; then M=16 on 8B down and
# gate/up with K split one step further than the wave model does (more programs per SM)
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r2; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
N=128,128,128,3
timeout 330 python bench/nf4_mgpu.py --out $D/kv.jsonl --ms 256,1024,2048,4096,16384 --rounds 3 \
  --no-triton --shapes 8b_k_v,70b_k_v --plans 256,128,64,4,1,64+swap+ws+gather+lut=16+lag \
  $N,0,64+swap+ws+gather+lut=32 $N,1,64+swap+ws+gather+lut=32 $N,2,64+swap+ws+gather+lut=32 \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/kv.txt
S=+swap+dq+lut=32+gather
timeout 150 python bench/nf4_mgpu.py --out $D/m16.jsonl --ms 16 --rounds 5 --no-triton \
  --shapes 8b_down,8b_gate_up --plans 128,64,512,2,2,64${S}+finish 128,64,512,2,4,64${S}+finish \
  128,64,512,2,4,64${S}+reduce 128,64,256,2,4,64${S}+finish 128,64,256,2,1,64${S} \
  128,64,256,2,2,64${S}+finish \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/m16.txt
date -u >> $D/info.txt

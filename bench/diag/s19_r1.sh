# prepared in session 18 (no device time left to run it): the persistent form of the mid-M gather
# kernel (plan.persist: one program per SM looping over the tiles, the table copied once, each
# tile's store left running under the next tile's pipeline), with and without lag, and 5 stages
# with y stored 64 x rows at a time (epi_rows, so the 5th stage fits): their GPU tests, then
# M=2048 and 4096 against the dispatch (the lag plan, not persistent) and the persistent plan
# without its decode; the k/v weights at M=2048 (no fused plan dispatched there) against the
# two mid-M plans; ptxas' report on the lag kernel
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r1; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 100 python -m pytest -q -n 4 tests/test_nf4_mgpu.py -m gpu -k "AK or L16K or e64SGL16A or persist" -p no:cacheprovider --tb=line -rf 2>&1 | grep -v Warn | tail -14 > $D/pytest.txt
tail -4 $D/pytest.txt | cut -c1-300
W=256,128,64,4,1,64+swap+ws+gather+lut=16
W5=${W/,4,1,/,5,1,}+lag+epi_rows=64
timeout 200 python bench/nf4_mgpu.py --out $D/m2048.jsonl --ms 2048 --rounds 3 --no-triton \
  --shapes 8b_gate_up,8b_down,70b_q_o,8b_q_o --plans $W+lag+persist $W+persist \
  $W+persist+skip_decode $W5 $W5+persist \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/m2048.txt
timeout 100 python bench/nf4_mgpu.py --out $D/m4096.jsonl --ms 4096 --rounds 3 --no-triton \
  --shapes 8b_gate_up,70b_q_o --plans $W+lag $W+lag+persist $W5+persist \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/m4096.txt
timeout 70 python bench/nf4_mgpu.py --out $D/kv.jsonl --ms 2048 --rounds 3 --no-triton \
  --shapes 8b_k_v,70b_k_v --plans $W+lag 128,128,128,3,0,64+swap+ws+gather+lut=32 \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/kv.txt
# ptxas' report (kernel_N.ptxas in the dump) on the kernel without and with lag: whether it
# serializes the wgmma (a warning), its registers and spills
timeout 60 python bench/diag/mgpu_sass.py --dir $D/dump --plans $W $W+lag \
  --m 2048 --n 4096 --k 4096 > $D/sass.txt 2>&1
grep -i "wgmma\|serializ\|registers\|spill" $D/dump/*.ptxas | cut -c1-200 | head -20
date -u >> $D/info.txt

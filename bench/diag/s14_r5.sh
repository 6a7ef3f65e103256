# session 14 run 5: Nsight Compute's per-instruction (SASS) stall samples of the decoder-warpgroup
# kernel (8B gate/up, M=2048), whole and without its wgmma
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r5; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; ncu --version; } > $D/info.txt 2>&1
for v in "dec 256,128,64,3+decoder" "dec_nomma 256,128,64,3+decoder+skip_mma"; do
  set -- $v
  timeout 150 ncu -k regex:mosaic_gpu --launch-skip 2 --launch-count 1 --section SourceCounters --section WarpStateStats --page source --print-source sass --csv python bench/diag/ncu_one.py --plan "$2" --m 2048 --n 14336 --k 4096 > $D/src_$1.csv 2> $D/src_$1.err
  wc -l $D/src_$1.csv; head -c 600 $D/src_$1.csv; tail -3 $D/src_$1.err
done
gzip $D/*.csv
date -u >> $D/info.txt

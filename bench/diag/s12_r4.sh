# session 12 run 4: Nsight Compute source view (SASS with executed instructions and stall samples
# per line) of the M=16 dq kernel (70B gate/up) and the large-M gather kernel (8B gate/up, M=2048)
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r4; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt 2>&1
S="--section WarpStateStats --section InstructionStats --section SourceCounters --section SchedulerStats"
prof() {  # name plan m n k
  timeout 150 ncu -o /tmp/$1 -k regex:mosaic_gpu --launch-skip 2 --launch-count 1 $S python bench/diag/ncu_one.py --plan "$2" --m $3 --n $4 --k $5 > /tmp/$1.log 2>&1
  ncu --import /tmp/$1.ncu-rep --page source --csv --print-source sass > /tmp/$1_sass.csv 2>&1
  ncu --import /tmp/$1.ncu-rep --page details --print-details all > /tmp/$1_details.txt 2>&1
  ncu --import /tmp/$1.ncu-rep --page raw --csv > /tmp/$1_raw.csv 2>&1
  tar czf $D/$1.tgz -C /tmp $1_sass.csv $1_details.txt $1_raw.csv $1.log
  wc -l /tmp/$1_sass.csv /tmp/$1_details.txt; head -3 /tmp/$1_sass.csv | cut -c1-600
}
prof dq16 "64,64,512,2,0,64+swap+dq" 16 28672 8192
prof gather2048 "256,128,128,2,1,64+swap+ws+gather" 2048 14336 4096
date -u >> $D/info.txt

# session 12 run 3: Nsight Compute on the M=16 dq kernel (70B gate/up, the dispatch's plan, and
# without its decode), the stream kernel, and the large-M gather kernel (8B gate/up, M=2048); SASS
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r3; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; ncu --version; } > $D/info.txt 2>&1
S="--section SpeedOfLight --section MemoryWorkloadAnalysis --section SchedulerStats --section WarpStateStats --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis --section InstructionStats --section SourceCounters"
prof() {  # name plan m n k
  timeout 120 ncu -k regex:mosaic_gpu --launch-skip 2 --launch-count 1 $S python bench/diag/ncu_one.py --plan "$2" --m $3 --n $4 --k $5 > $D/ncu_$1.txt 2>&1
  grep -E "Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Issue Slots Busy|Eligible Warps|Issued Warp|No Eligible|Achieved Occupancy|Registers Per|Shared Memory Config|Block Limit|Warp Cycles Per Issued|max error|ERR" $D/ncu_$1.txt | head -30 | sed "s/^/$1: /"
}
prof dq16 "64,64,512,2,0,64+swap+dq" 16 28672 8192
prof dq16_nodecode "64,64,512,2,0,64+swap+skip_decode" 16 28672 8192
prof gather2048 "256,128,128,2,1,64+swap+ws+gather" 2048 14336 4096
timeout 150 python bench/diag/mgpu_sass.py --dir $D/sass --m 16 --n 28672 --k 8192 --plans "64,64,512,2,0,64+swap+dq" > $D/sass16.txt 2>&1
timeout 100 python bench/diag/mgpu_sass.py --dir $D/sass2 --m 2048 --n 14336 --k 4096 --plans "256,128,128,2,1,64+swap+ws+gather" > $D/sass2048.txt 2>&1
ls $D/sass $D/sass2 | head; cut -c1-600 $D/sass16.txt $D/sass2048.txt
tar czf $D/sass.tgz -C $D sass sass2 && rm -rf $D/sass $D/sass2
date -u >> $D/info.txt

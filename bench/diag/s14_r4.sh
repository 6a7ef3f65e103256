# session 14 run 4: Nsight Compute on the decoder-warpgroup kernel (8B gate/up, M=2048): the whole
# kernel and its decode alone (+skip_mma); where the decoder's warps stall
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r4; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; ncu --version; } > $D/info.txt 2>&1
S="--section SpeedOfLight --section MemoryWorkloadAnalysis --section SchedulerStats --section WarpStateStats --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis --section InstructionStats --section SourceCounters"
prof() {  # name plan m n k
  timeout 150 ncu -k regex:mosaic_gpu --launch-skip 2 --launch-count 1 $S python bench/diag/ncu_one.py --plan "$2" --m $3 --n $4 --k $5 > $D/ncu_$1.txt 2>&1
  grep -E "Duration|Memory Throughput|DRAM Throughput|L2 Cache Throughput|Compute \(SM\) Throughput|Issue Slots Busy|Eligible Warps|Issued Warp|No Eligible|Warp Cycles Per Issued|Shared Memory|Bank|max error|ERR|Stall|stall" $D/ncu_$1.txt | head -40 | sed "s/^/$1: /"
}
prof dec "256,128,64,3+decoder" 2048 14336 4096
prof dec_nomma "256,128,64,3+decoder+skip_mma" 2048 14336 4096
date -u >> $D/info.txt

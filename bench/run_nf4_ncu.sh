#!/usr/bin/env bash
# Nsight Compute profiles of the NF4 kernels at M=16 (70B gate/up): the dispatched plan and the
# listed variants, with shared-memory and pipe metrics. Usage: OUT=dir bash bench/run_nf4_ncu.sh
set -u
OUT=${OUT:-/tmp/nf4ncu}
mkdir -p "$OUT"
M=${M:-16}; N=${N:-28672}; K=${K:-8192}
METRICS=smsp__inst_executed_op_shared_ld.sum,smsp__inst_executed_op_shared_st.sum,sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum,launch__registers_per_thread
for spec in "current:" "s7:decode=prmt,bwd_decode=prmt" ${VARIANTS:-}; do
  name=${spec%%:*}; plan=${spec#*:}
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 120 ncu --kernel-name regex:nf4 --launch-skip 1 \
    --launch-count 1 --section SpeedOfLight --section InstructionStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis --metrics "$METRICS" \
    python bench/nf4_ncu.py --m "$M" --n "$N" --k "$K" --plan "$plan" > "$OUT/ncu_m${M}_$name.txt" 2>&1
  echo "$name: rc=$?"
done

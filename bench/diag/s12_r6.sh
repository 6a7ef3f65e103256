# session 12 run 6: plan.lut with 32 or 16 copies of the table, tile_k 256 / 512, at M=16 on all
# eight weights (kernel-only too), M=4 and M=1; Nsight Compute's instruction mix of the lut kernel
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r6; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt 2>&1
S="--section WarpStateStats --section InstructionStats --section SourceCounters --section SchedulerStats --section SpeedOfLight --section Occupancy"
timeout 100 ncu -o /tmp/lut16 -k regex:mosaic_gpu --launch-skip 2 --launch-count 1 $S python bench/diag/ncu_one.py --plan "64,64,256,2,0,64+swap+dq+lut=32" --m 16 --n 28672 --k 8192 > /tmp/lut16.log 2>&1
ncu --import /tmp/lut16.ncu-rep --page source --csv --print-source sass > /tmp/lut16_sass.csv 2>&1
ncu --import /tmp/lut16.ncu-rep --page details > /tmp/lut16_details.txt 2>&1
tar czf $D/ncu_lut16.tgz -C /tmp lut16_sass.csv lut16_details.txt lut16.log
grep -E "Duration|DRAM Throughput|Issue Slots Busy|Executed Instructions  |No Eligible|Achieved Occupancy|Registers Per|Block Limit Shared|Block Limit Reg" /tmp/lut16_details.txt
P="64,64,256,2,0,64+swap+dq+lut=32@16 64,64,256,2,0,64+swap+dq+lut=16@16 64,64,512,2,0,64+swap+dq+lut=32@16 64,64,512,2,0,64+swap+dq+lut=16@16 64,64,256,3,0,64+swap+dq+lut=16@16"
timeout 330 python bench/nf4_mgpu.py --out $D/small.jsonl --ms 16 --kernel-only --shapes 70b_gate_up,70b_down,70b_q_o,8b_gate_up,8b_down,8b_q_o,70b_k_v,8b_k_v --plans $P > $D/small.log 2>&1
timeout 100 python bench/nf4_mgpu.py --out $D/m4.jsonl --ms 4,8 --shapes 70b_gate_up,70b_down,8b_gate_up,8b_q_o --plans "64,64,256,2,0,64+swap+dq+lut=32@16" "64,64,512,2,0,64+swap+dq+lut=32@16" > $D/m4.log 2>&1
timeout 100 python bench/nf4_mgpu.py --out $D/m1.jsonl --ms 1 --shapes 8b_gate_up,8b_q_o,70b_k_v,8b_k_v,70b_down --plans "64,64,256,2,0,64+swap+dq+lut=32@1" "64,64,256,2,0,64+swap+dq+lut=16@1" "64,64,512,2,0,64+swap+dq+lut=32@1" > $D/m1.log 2>&1
date -u >> $D/info.txt
cat $D/small.jsonl $D/m4.jsonl $D/m1.jsonl | grep -h '"kind": "time"' | python -c "
import sys, json, re
for l in sys.stdin:
  r = json.loads(l); p = r['impl']
  if 'MgpuPlan' in p:
    d = dict(re.findall(r'(\w+)=(\w+)', p)); p = ','.join(d[f] for f in ('tile_n','tile_k','stages','split')) + ''.join('+' + f + '=' + d[f] for f in ('dq','gather','lut','stream') if d.get(f) not in ('False', '0')) + (' kernel' if p.endswith('kernel') else '')
  print(r['shape'], r['m'], round(r['vs_bf16'], 3), round(r['ms'] * 1000, 1), p)"
grep -h 'failed' $D/*.jsonl | cut -c1-300

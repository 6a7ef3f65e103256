#!/bin/bash
# One GPU job, everything side by side on the same card (issue 7): the PyTorch baselines and ours
# on the same random Llama-3 8B-shaped checkpoint.
#   bash bench/run_side_by_side.sh PHASE...
#   phases: info make loadprof data ours ours_fresh u_tp hf hf_std ours_8k u_8k hf_8k export dp ours_ctx u_ctx plot
# Carry .whl/site (bench/baselines/prepare_wheels.sh builds it: bitsandbytes, unsloth, datasets, ...).
# Each phase is skipped when the job's deadline (DEADLINE_S, default 570 s) would be passed.
set -o pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
export PYTHONPATH=$REPO:$REPO/.whl/site${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
MODEL=${MODEL:-/dev/shm/llama3-8b-rand}
SANITY=${SANITY:-/dev/shm/sanity_ids.npy}
START=$(date +%s); DEADLINE_S=${DEADLINE_S:-570}
left() { echo $(( DEADLINE_S - ($(date +%s) - START) )); }
stage() {  # name min_seconds command...
  local name=$1 need=$2; shift 2
  if [ "$(left)" -lt "$need" ]; then echo "SKIP $name: $(left)s left"; return 1; fi
  echo "=== $name $(date +%T)"
  timeout $(( $(left) - 5 )) "$@" 2>&1 | tee "$OUT/$name.log" | grep -v -E "it/s\]|s/it\]|Warning"
}
B=$REPO/bench/baselines
for ph in "$@"; do
  case $ph in
    info) { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
            python3 -c "import jax, sys; sys.path.insert(0, '$B'); import bench_common as b, json; \
print(json.dumps({**b.versions(), 'jax': jax.__version__}))"; } 2>&1 | tee "$OUT/info.txt" ;;
    make) stage make 120 python3 $B/make_model.py --out "$MODEL" ;;
    # where loading the checkpoint (read + NF4 quantize) spends its time
    loadprof) stage loadprof 90 python3 $REPO/bench/load_profile.py --base "$MODEL" ;;
    # loss sanity: the same 50 steps of generated English (bs 2 x 1024) for every framework
    data) python3 $REPO/bench/sanity_data.py --out "$SANITY" --steps 50 --batch 2 --seq 1024 ;;
    ours) stage ours 150 env CUDA_VISIBLE_DEVICES=0 python3 $REPO/bench/train_throughput.py --base "$MODEL" --presets ${PRESETS:-offload,full,none} \
            --warmup 3 --steps 10 $( [ -f "$SANITY" ] && echo --sanity "$SANITY" ) ;;
    # one process per preset (FRESH_PRESETS, comma-separated): each peak is that preset's alone
    ours_fresh) for p in ${FRESH_PRESETS//,/ }; do
            stage "ours_$(echo "$p" | tr '/=' '__')" 60 env CUDA_VISIBLE_DEVICES=0 python3 $REPO/bench/train_throughput.py \
              --base "$MODEL" --presets "$p" --warmup 3 --steps 10; done ;;
    u_tp) stage u_tp 150 env CUDA_VISIBLE_DEVICES=0 python3 $B/bench_unsloth.py --model "$MODEL" --out "$OUT/unsloth_tp.json" \
            --max-seq-length 8192 --bs 2 --seq 2048 --warmup 3 --steps 10 $( [ -f "$SANITY" ] && echo --sanity "$SANITY" ) ;;
    hf)   stage hf 150 env CUDA_VISIBLE_DEVICES=0 python3 $B/bench_hf_bnb.py --model "$MODEL" --out "$OUT/hf.json" --no-kbit-prep \
            --bs 2 --seq 2048 --warmup 3 --steps 10 $( [ -f "$SANITY" ] && echo --sanity "$SANITY" ) ;;
    # bs 1 x 8192 (issue 7's second shape), same frameworks
    ours_8k) stage ours_8k 150 env CUDA_VISIBLE_DEVICES=0 python3 $REPO/bench/train_throughput.py --base "$MODEL" \
            --presets ${PRESETS_8K:-offload,full} --batch 1 --seq 8192 --warmup 3 --steps 10 \
            ${PROFILE:+--profile "$PROFILE"} ;;
    u_8k) stage u_8k 150 env CUDA_VISIBLE_DEVICES=0 python3 $B/bench_unsloth.py --model "$MODEL" \
            --out "$OUT/unsloth_8k.json" --max-seq-length 8192 --bs 1 --seq 8192 --warmup 3 --steps 10 ;;
    hf_8k) stage hf_8k 150 env CUDA_VISIBLE_DEVICES=0 python3 $B/bench_hf_bnb.py --model "$MODEL" \
            --out "$OUT/hf_8k.json" --no-kbit-prep --bs 1 --seq 8192 --warmup 3 --steps 10 ;;
    # merged bf16 export of the same checkpoint (issue 6): wall time and peak host RAM
    export) stage export 100 /usr/bin/time -v python3 $REPO/bench/export_merged_8b.py --base "$MODEL" \
            --workdir /dev/shm/jaxsloth_export ;;
    # data parallel over every GPU of the host (compare with phase ours: one GPU, same per-device batch)
    dp) stage dp 100 python3 $REPO/bench/train_throughput.py --base "$MODEL" --presets ${DP_PRESETS:-full,none} \
            --warmup 3 --steps 10 --mesh data=$(nvidia-smi -L | wc -l) ;;
    # HF's standard QLoRA recipe (prepare_model_for_kbit_training, as TRL does)
    hf_std) stage hf_std 150 env CUDA_VISIBLE_DEVICES=0 python3 $B/bench_hf_bnb.py --model "$MODEL" \
            --out "$OUT/hf_std.json" --bs 2 --seq 2048 --warmup 3 --steps 10 ;;
    plot) python3 $REPO/bench/plot_context.py --ours "$OUT/ours_ctx.json" --unsloth "$OUT/unsloth_ctx.json" \
            --out "$OUT/memory_vs_context.png" ;;
    ours_ctx) stage ours_ctx 200 python3 $REPO/bench/max_context.py --base "$MODEL" --remat offload \
            --remat-group 2 --mlp-chunk 8192 --budget $(( $(left) - 30 )) --out "$OUT/ours_ctx.json" ;;
    u_ctx) stage u_ctx 200 python3 $B/bench_unsloth.py --model "$MODEL" --out "$OUT/unsloth_ctx.json" \
            --max-seq-length 262144 --skip-throughput --maxctx --granularity 4096 \
            --schedule 65536,131072,196608,229376,262144 --maxctx-budget $(( $(left) - 60 )) ;;
  esac
done
echo "done after $(( $(date +%s) - START )) s"

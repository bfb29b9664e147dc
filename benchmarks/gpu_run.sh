#!/usr/bin/env bash
# The GPU check of issue 12, item 5, as one prepared script: the rehearsal at Flickr8k's real size,
# then the existing benchmarks, each JSON written to $OUT (default ./bench_out) with its stderr log.
# Each run has its own time limit so that one slow stage cannot eat the others' share: 9 minutes
# at most, inside the 10-minute limit of one device command. Targets (same synthetic data, one
# H100/H200): cache >= 2,000 images/s end to end; 50 epochs from the cache < 60 s with the
# word-level vocabulary; beam 5 over 1,000 test images < 1 s; the full test evaluation from the
# cache < 10 s.
#
#     bash benchmarks/gpu_run.sh              # on the GPU machine, from the repository root
set -u
OUT="${OUT:-bench_out}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
run() {  # run NAME SECONDS COMMAND...: the JSON to $OUT/NAME.json, progress to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit}s)" >&2
    timeout "$limit" "$@" --output "$OUT/$name.json" > /dev/null 2> "$OUT/$name.log"
    echo "   exit $? after ${SECONDS}s in all" >&2
}
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
run rehearsal 300 python benchmarks/rehearsal.py --mixed_precision bf16 --batch_size 512 --workdir "$OUT/rehearsal_work"
rm -rf "$OUT/rehearsal_work"  # 8,091 JPEGs: too big to bring back
# the cache rate is the rehearsal's cache_images_per_s (bench_cache.py would time the same call again)
run bench_train 90 python benchmarks/bench_train.py --batch_size 512
run bench_generate 90 python benchmarks/bench_generate.py
run bench_eval 60 python benchmarks/bench_eval.py --no_meteor

#!/usr/bin/env bash
# Several frontier.py runs side by side on one GPU (a 135M model leaves most of an H200 idle),
# each process with 2 CPU threads and cut at LIMIT seconds; a run's rows are written as they come,
# so a cut run keeps what it finished. Logs and row files land in OUTDIR (TAG.log, frontier-TAG.json).
#   bash benchmarks/frontier_batch.sh MODEL.gguf DATA_DIR OUTDIR LIMIT "TAG ARGS..." ["TAG ARGS..." ...]
# DATA_DIR holds wikitext2_valid_tokenized.txt and wikitext2_test.txt. Then:
#   python benchmarks/frontier.py merge OUTDIR/frontier-*.json
set -u
[ $# -ge 5 ] || { echo "usage: $0 MODEL DATA_DIR OUTDIR LIMIT 'TAG ARGS...' ..." >&2; exit 2; }
model=$1 data=$2 out=$3 limit=$4
shift 4
mkdir -p "$out"
here=$(dirname "$0")
for job in "$@"; do
    tag=${job%% *} args=${job#* }
    # shellcheck disable=SC2086  # ARGS are words on purpose
    OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1 timeout "$limit" python "$here/frontier.py" run --model "$model" \
        --device cuda --calib-text "$data/wikitext2_valid_tokenized.txt" --test-text "$data/wikitext2_test.txt" \
        --out "$out" --tag "$tag" $args > "$out/$tag.log" 2>&1 &
done
wait

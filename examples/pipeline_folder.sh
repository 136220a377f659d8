#!/usr/bin/env bash
# Segment every slide in a folder; rerun it any time: finished slides are skipped,
# interrupted ones resume where they stopped.
#
#   examples/pipeline_folder.sh SLIDES_DIR RESULTS_DIR
#   METHOD=watershed examples/pipeline_folder.sh /data/slides /data/nuclei
#
# For each slide SLIDES_DIR/NAME.EXT it writes, in RESULTS_DIR:
#   NAME.geojson       nuclei for QuPath (File > Import objects, or drag it onto the slide)
#   NAME.csv           measurements, one row per nucleus
#   NAME.overlay.png   the slide with every nucleus outlined, for a quick look
#   NAME.nucli.zarr/   the run store (tiles and per-tile results; lets a stopped run resume)
# and appends each run's JSON summary to RESULTS_DIR/summary.jsonl.
#
# A slide counts as finished when NAME.geojson exists: nucli writes every output to a
# temporary file and renames it only when complete, so a half-written file never exists.
# A slide that fails is reported and the loop goes on; the exit status is 1 if any failed.
# Ctrl-C stops the loop (rerun to resume). Environment: METHOD (default: nucli's default
# method), NUCLI_ARGS (extra options for `nucli segment`, e.g. "--mpp 0.25").
set -uo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 SLIDES_DIR RESULTS_DIR" >&2
    exit 1
fi
slides_dir=$1
out_dir=$2
if [ ! -d "$slides_dir" ]; then
    echo "error: $slides_dir is not a folder" >&2
    exit 2
fi
mkdir -p "$out_dir" || exit 2

method_args=()
if [ -n "${METHOD:-}" ]; then
    method_args=(--method "$METHOD")
fi
read -r -a extra_args <<< "${NUCLI_ARGS:-}"

done_count=0; skipped=0; failed=()
shopt -s nullglob nocaseglob
for slide in "$slides_dir"/*.{svs,ndpi,mrxs,scn,vms,vmu,bif,tif,tiff,svslide,dcm,png,jpg,jpeg}; do
    [ -f "$slide" ] || continue
    name=$(basename "$slide")
    stem=${name%.*}
    if [ -f "$out_dir/$stem.geojson" ]; then
        echo "skip  $name (done: $out_dir/$stem.geojson)"
        skipped=$((skipped + 1))
        continue
    fi
    echo "run   $name"
    # --json: one summary line per slide on stdout; progress bars are off with --json
    nucli segment "$slide" -o "$out_dir/$stem.geojson" --format csv --overlay "$out_dir/$stem.overlay.png" \
        "${method_args[@]}" "${extra_args[@]}" --json >> "$out_dir/summary.jsonl"
    status=$?
    if [ $status -eq 130 ]; then
        echo "interrupted at $name; rerun the same command to resume" >&2
        exit 130
    elif [ $status -ne 0 ]; then
        echo "FAIL  $name (exit $status; the error is printed above)" >&2
        failed+=("$name")
    else
        done_count=$((done_count + 1))
    fi
done

echo "finished: $done_count segmented, $skipped skipped, ${#failed[@]} failed"
if [ ${#failed[@]} -gt 0 ]; then
    printf 'failed: %s\n' "${failed[@]}"
    exit 1
fi

#!/usr/bin/env bash
# One slide on a SLURM cluster with a job array, no Dask needed:
#   1. tile once          (one job)
#   2. segment in shards  (an array of N independent jobs, `--shard i/N`, all filling the same run store)
#   3. stitch once        (one job, after every shard succeeded)
#
# Usage:  examples/slurm_array.sh SLIDE OUT.geojson [N_SHARDS]
#         METHOD=watershed ACCOUNT=myproject PARTITION=cpu examples/slurm_array.sh slide.svs out/slide.geojson 16
#         (NUCLI_TILE_OPTS="--mpp 0.25" passes extra options to `nucli tile`, e.g. for a slide without a pixel size)
#
# The run store must be on a file system every node sees (e.g. /scratch). A shard that fails or hits its
# time limit can simply be resubmitted: finished tiles are kept, the rerun does only the rest
# (`sbatch --array=<i> ...` with the same command). Shards never write the same tile, so they need no lock.
set -euo pipefail

SLIDE=${1:?usage: slurm_array.sh SLIDE OUT.geojson [N_SHARDS]}
OUT=${2:?usage: slurm_array.sh SLIDE OUT.geojson [N_SHARDS]}
N=${3:-8}
METHOD=${METHOD:-gensegnet}
RUN=${RUN:-${OUT%.geojson}.nucli.zarr}
CPUS=${CPUS:-4}
TILE_OPTS=${NUCLI_TILE_OPTS:-}   # e.g. "--mpp 0.25" for a slide without a pixel size
SBATCH=(sbatch --parsable ${ACCOUNT:+--account="$ACCOUNT"} ${PARTITION:+--partition="$PARTITION"})

mkdir -p "$(dirname "$OUT")" logs

tile_job=$("${SBATCH[@]}" --job-name=nucli-tile --cpus-per-task="$CPUS" --mem=8G --time=01:00:00 \
  --output=logs/%x-%j.out \
  --wrap="nucli tile '$SLIDE' -o '$RUN' --method '$METHOD' $TILE_OPTS --quiet")

# SLURM_ARRAY_TASK_ID runs 0..N-1, exactly the shard numbers --shard expects (i/N, 0-based).
seg_job=$("${SBATCH[@]}" --job-name=nucli-segment --dependency="afterok:$tile_job" --array="0-$((N - 1))" \
  --cpus-per-task="$CPUS" --mem=8G --time=04:00:00 --output=logs/%x-%A_%a.out \
  --wrap="nucli segment '$RUN' --method '$METHOD' --shard \$SLURM_ARRAY_TASK_ID/$N --json")

stitch_job=$("${SBATCH[@]}" --job-name=nucli-stitch --dependency="afterok:$seg_job" \
  --cpus-per-task=2 --mem=8G --time=02:00:00 --output=logs/%x-%j.out \
  --wrap="nucli stitch '$RUN' -o '$OUT' -f csv --json")

echo "submitted: tile $tile_job -> segment array $seg_job (x$N) -> stitch $stitch_job"

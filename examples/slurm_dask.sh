#!/usr/bin/env bash
# One slide with Dask workers started as SLURM jobs by dask-jobqueue.
# This job runs the nucli client: it tiles the slide, hands the tiles to the worker jobs described in
# dask_jobqueue.yaml (the model is loaded once per worker), then stitches and exports. Results are
# written into the run store by the workers, so it must be on a file system every node sees.
#
# Usage:  sbatch examples/slurm_dask.sh SLIDE OUT.geojson
#         CONFIG=my_cluster.yaml METHOD=watershed sbatch examples/slurm_dask.sh slide.svs /scratch/me/slide.geojson
#
# If the client job ends early (time limit, node failure), submit it again: finished tiles are kept.
#SBATCH --job-name=nucli-client
#SBATCH --cpus-per-task=2
#SBATCH --mem=8G
#SBATCH --time=08:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

SLIDE=${1:?usage: sbatch slurm_dask.sh SLIDE OUT.geojson}
OUT=${2:?usage: sbatch slurm_dask.sh SLIDE OUT.geojson}
CONFIG=${CONFIG:-examples/dask_jobqueue.yaml}
METHOD=${METHOD:-gensegnet}
mkdir -p logs "$(dirname "$OUT")"

nucli segment "$SLIDE" -o "$OUT" --method "$METHOD" -f csv \
  --cluster slurm --cluster-config "$CONFIG" --batch-size 4 --json

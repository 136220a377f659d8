#!/usr/bin/env bash
# One slide segmented by Dask workers on GPU nodes, started as SLURM jobs by dask-jobqueue
# (dask_jobqueue_gpu.yaml: one GPU per worker job). This job is the client: it tiles the slide on
# its CPUs, hands batches of tiles to the GPU workers (each builds the model once on its GPU), then
# stitches and exports. The run store must be on a file system every node sees. The client itself
# needs no GPU: with --cluster slurm each worker resolves --device on its own node.
#
# Usage:  sbatch examples/slurm_dask_gpu.sh SLIDE OUT.geojson
#         METHOD=harunet sbatch examples/slurm_dask_gpu.sh slide.svs /scratch/me/slide.geojson
#
# On ONE node with several GPUs no SLURM cluster is needed:
#   nucli segment SLIDE -o OUT.geojson --device cuda --workers 4     # one local worker per GPU
#SBATCH --job-name=nucli-gpu-client
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=08:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

SLIDE=${1:?usage: sbatch slurm_dask_gpu.sh SLIDE OUT.geojson}
OUT=${2:?usage: sbatch slurm_dask_gpu.sh SLIDE OUT.geojson}
CONFIG=${CONFIG:-examples/dask_jobqueue_gpu.yaml}
METHOD=${METHOD:-gensegnet}
mkdir -p logs "$(dirname "$OUT")"

nucli segment "$SLIDE" -o "$OUT" --method "$METHOD" -f csv \
  --device cuda --batch-size "${BATCH:-16}" --cluster slurm --cluster-config "$CONFIG" --json

#!/usr/bin/env bash
# Side-view and back-view generation grids with all three modes (the paper's 2D view-conditioning
# comparison): for each prompt, one grid with rows perpneg/cebm/sd × side/back and columns = seeds.
#
#   examples/view_grids.sh [MODEL] [DEVICE]      # defaults: stabilityai/stable-diffusion-2-1-base cuda
#   SEEDS=0-7 SCHEME=threestudio OUT=grids examples/view_grids.sh
#
# MODEL is a hub id or a local diffusers folder. The weights are downloaded from the Hugging Face
# hub on first use: on a machine without internet access, download them elsewhere and pass the
# local folder (or a populated HF cache). On a GPU the run uses fp16 (set FP16= to disable).
# EXTRA_ARGS is appended to the command (e.g. "--steps 2 --height 64 --width 64" with a tiny local
# model for a CPU smoke run).
#
# The view prompt of an object prompt P is "P, side view" / "P, back view" (threestudio's
# templates); the positive is the interpolated view embedding at the view's azimuth (side 90°,
# back 180°) and the other views are negatives with the SCHEME's weights (authors = the paper's
# stable-dreamfusion weights, threestudio = threestudio's perp_neg_f_* curves), the same weights
# the 3D guidance uses. Prompts: the project page's examples (perp-neg.github.io: a parrot, a panda,
# a lion, a snow leopard) and this repository's corgi. Checkpoint: Stable Diffusion 2.1 base, the
# checkpoint of this repository's perpneg-*.yaml 3D configs.
set -euo pipefail

MODEL="${1:-${MODEL:-stabilityai/stable-diffusion-2-1-base}}"
DEVICE="${2:-${DEVICE:-cuda}}"
OUT="${OUT:-outputs/perpneg-2d/views}"
SEEDS="${SEEDS:-0-3}"
SCHEME="${SCHEME:-authors}"
PYTHON="${PYTHON:-python}"
read -r -a EXTRA <<<"${EXTRA_ARGS:-}"
FP16_FLAG=()
if [[ "$DEVICE" == cuda* && -n "${FP16-1}" ]]; then FP16_FLAG=(--fp16); fi

for prompt in "a parrot" "a panda" "a lion" "a snow leopard" "a corgi"; do
  "$PYTHON" -m threestudio_perpneg generate "$prompt" --view side,back --modes perpneg,cebm,sd \
    --scheme "$SCHEME" --seeds "$SEEDS" --model "$MODEL" --device "$DEVICE" ${FP16_FLAG[@]+"${FP16_FLAG[@]}"} \
    --out "$OUT/${prompt// /_}" ${EXTRA[@]+"${EXTRA[@]}"}
done
echo "grids: $OUT/*/grid.png (rows: mode × view, columns: seeds)"

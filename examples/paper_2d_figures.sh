#!/usr/bin/env bash
# Regenerate the Perp-Neg paper's 2D demo figures (arXiv 2304.04968) with the 2D sampler's CLI,
# each as a grid with the three modes side by side (rows: perpneg, cebm, sd; columns: seeds).
#
#   examples/paper_2d_figures.sh [MODEL] [DEVICE]        # defaults: CompVis/stable-diffusion-v1-4 cuda
#   MODEL=/path/to/sd-v1-4 DEVICE=cuda:1 OUT=figs examples/paper_2d_figures.sh
#
# MODEL is a hub id or a local diffusers folder. The weights are downloaded from the Hugging Face
# hub on first use: on a machine without internet access, download them elsewhere and pass the
# local folder (or a populated HF cache). Needs a GPU for reasonable run times (50 steps, 512 px);
# set FP16=1 to halve memory (fp16 initial noise differs from fp32, so the images change).
# EXTRA_ARGS is appended to every command (e.g. EXTRA_ARGS="--steps 2 --height 64 --width 64"
# with a tiny local model for a CPU smoke run of this script).
#
# Where the settings come from:
# * checkpoint CompVis/stable-diffusion-v1-4, 50 steps, guidance scale 7.5, the checkpoint's own
#   scheduler, float32, "main | extra" prompts with "1 | -w" weights: the official repository's
#   2D script, scripts/image_sample_stable_diffusion.py in github.com/Perp-Neg/Perp-Neg-stablediffusion
#   (its --steps 50 / --scale 7.5 defaults, its from_pretrained("CompVis/stable-diffusion-v1-4"),
#   its --prompt / --weights convention; README: --weights="1|-1.5" --pipeline='perpneg').
# * the peacock ("a peacock, back view | a peacock, front view", weights 1 | -3.5, seed 30,
#   scale 7.5) and astronaut ("an astronaut riding a horse | a jumping horse | a white horse",
#   weights 1 | -0.3 | -0.1) settings: the authors' demo settings as quoted in this project's
#   issue 3 (the demo notebook, notebooks/demo.ipynb of the official repository; its stored copy
#   could not be opened when this was written, so the quoted values are not re-checked here).
#   No seed is published for the astronaut figure: seeds 0-3 are shown.
# The official pipeline draws a seed's initial noise like ours (torch.randn on the pipeline's
# device from torch.Generator(device).manual_seed(seed), batch 1, float32), so seed 30 starts from
# the same noise; its projection has no epsilon and it calls the UNet once per prompt, so expect
# the same effect, not necessarily the same pixels.
set -euo pipefail

MODEL="${1:-${MODEL:-CompVis/stable-diffusion-v1-4}}"
DEVICE="${2:-${DEVICE:-cuda}}"
OUT="${OUT:-outputs/perpneg-2d/paper}"
PYTHON="${PYTHON:-python}"
read -r -a EXTRA <<<"${EXTRA_ARGS:-}"
FP16_FLAG=()
if [[ -n "${FP16:-}" ]]; then FP16_FLAG=(--fp16); fi

common=(--model "$MODEL" --device "$DEVICE" ${FP16_FLAG[@]+"${FP16_FLAG[@]}"} --steps 50 --guidance-scale 7.5
        --modes perpneg,cebm,sd)

# Back view of a peacock with the front view as a negative prompt. The paper's point: the front
# view overlaps the main prompt, so a plain negative prompt (row sd) can remove the peacock along
# with the front view; Perp-Neg (row perpneg) removes only the part perpendicular to the main prompt.
"$PYTHON" -m threestudio_perpneg generate "a peacock, back view | a peacock, front view" \
  --weights "1 | -3.5" --seeds 30 "${common[@]}" --out "$OUT/peacock" ${EXTRA[@]+"${EXTRA[@]}"}

# Concept removal with overlapping negatives: no jumping and no white horse, still a horse.
"$PYTHON" -m threestudio_perpneg generate \
  "an astronaut riding a horse | a jumping horse | a white horse" \
  --weights "1 | -0.3 | -0.1" --seeds 0-3 "${common[@]}" --out "$OUT/astronaut" ${EXTRA[@]+"${EXTRA[@]}"}

echo "grids: $OUT/peacock/grid.png $OUT/astronaut/grid.png (replay any image with --replay <out>/generate.json)"

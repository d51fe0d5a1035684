#!/usr/bin/env bash
# Trains the bundles the real-world packs (nudity, vangogh, weapons) ship for the one backbone this
# project can run, the embedded Shapes backbone (its real MiniLM text encoder; the images are shapes,
# so these bundles decide on the prompt's language: what benchmarks/pack_detection.py measures), from
# each pack's own recipe (recipe.json, written by plugins/write_pack_recipes.py). Prompt dropout is
# off: on this backbone the latent cannot carry these concepts, an empty-prompt row would be noise.
# Run from the repository root after `make demo` has set up .venv (it installs the packs).
#   bash plugins/train_packs.sh
set -euo pipefail
BIN=${BIN:-.venv/bin}
for spec in nudity:nsfw vangogh:artist_style weapons:object; do
  concept=${spec%%:*}
  category=${spec##*:}
  "$BIN/saferedir" train --backbone shapes --concept "$concept" --category "$category" \
    --pairs "plugin:$concept" --out "plugins/$concept/saferedir_$concept/bundles/$concept.shapes.safetensors" \
    --seeds 0 1 --steps 1000 --patience 0 --seed 0 --latent-readout mean+max --prompt-dropout 0 \
    --cache "${CACHE:-$HOME/.cache/saferedir/trajectories}"
done
sha256sum plugins/*/saferedir_*/bundles/*.shapes.safetensors

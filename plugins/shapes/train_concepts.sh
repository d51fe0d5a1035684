#!/usr/bin/env bash
# Trains the Shapes concept pack's three redirector bundles on the shipped Shapes backbone,
# from the pack's own prompt recipes (saferedir_shapes.world.concept_recipe: dictionary synonyms
# and the training wordings of world.WORDINGS / world.NEGATIONS, drawn per world.RECIPES), every trajectory labelled by
# what its image shows (the pack's outcome judge), and writes them next to the backbone weights.
# Run from the repository root after `make demo` has set up .venv.
# The recipes' misspellings come from weights/misspellings.json (python -m saferedir_shapes.misspellings).
#   bash plugins/shapes/train_concepts.sh
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=plugins/shapes/saferedir_shapes/weights
for spec in red:nsfw striped:artist_style star:object; do
  concept=${spec%%:*}
  category=${spec##*:}
  "$BIN/saferedir" train --backbone shapes --concept "$concept" --category "$category" \
    --pairs "plugin:shapes-$concept" --out "$OUT/$concept.safetensors" \
    --seeds 0 1 --steps 1200 --patience 0 --seed 0 --latent-readout mean+max \
    --cache "${CACHE:-$HOME/.cache/saferedir/trajectories}"
done
echo "sha256 pins for saferedir_shapes/policies/demo.yaml:"
sha256sum "$OUT"/red.safetensors "$OUT"/striped.safetensors "$OUT"/star.safetensors

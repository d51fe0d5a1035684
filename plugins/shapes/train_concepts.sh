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
# concept:category:seed -- the training seed (held-out split and initialisation) of each shipped
# bundle: two seeds were trained per concept and the better on the efficacy suite's dev split kept
# (benchmarks/README.md, "Retrain variance")
for spec in red:nsfw:0 striped:artist_style:1 star:object:1; do
  IFS=: read -r concept category seed <<<"$spec"
  "$BIN/saferedir" train --backbone shapes --concept "$concept" --category "$category" \
    --pairs "plugin:shapes-$concept" --out "$OUT/$concept.safetensors" \
    --seeds 0 1 --steps 1200 --patience 0 --seed "$seed" --latent-readout mean+max \
    --cache "${CACHE:-$HOME/.cache/saferedir/trajectories}"
done
echo "sha256 pins for saferedir_shapes/policies/demo.yaml:"
sha256sum "$OUT"/red.safetensors "$OUT"/striped.safetensors "$OUT"/star.safetensors

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
# concept:category:seed:reads -- the training seed (held-out split and initialisation) of each
# shipped bundle (two seeds were trained per concept and the better on the efficacy suite's dev
# split kept: benchmarks/README.md, "Retrain variance") and what its classifier reads: "latent" (the
# latent and timestep alone, trained with half the rows' starting noise redrawn: --renoise 0.5;
# benchmarks/README.md, "A classifier that reads only the latent") or "latent+prompt"
for spec in red:nsfw:0:latent+prompt striped:artist_style:1:latent+prompt star:object:1:latent; do
  IFS=: read -r concept category seed reads <<<"$spec"
  extra=()
  if [ "$reads" = latent ]; then extra=(--renoise 0.5); fi
  "$BIN/saferedir" train --backbone shapes --concept "$concept" --category "$category" \
    --pairs "plugin:shapes-$concept" --out "$OUT/$concept.safetensors" \
    --seeds 0 1 --steps 1200 --patience 0 --seed "$seed" --latent-readout mean+max \
    --classifier-reads "$reads" "${extra[@]}" \
    --cache "${CACHE:-$HOME/.cache/saferedir/trajectories}"
done
echo "sha256 pins for saferedir_shapes/policies/demo.yaml:"
sha256sum "$OUT"/red.safetensors "$OUT"/striped.safetensors "$OUT"/star.safetensors

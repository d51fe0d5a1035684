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
train() {
  "$BIN/saferedir" train --backbone shapes --seeds 0 1 --steps 1200 --patience 0 \
    --cache "${CACHE:-$HOME/.cache/saferedir/trajectories}" "$@"
}
# concept:category:seed -- the training seed (held-out split and initialisation) of each shipped
# bundle (two seeds were trained per concept and the better on the efficacy suite's dev split kept:
# benchmarks/README.md, "Retrain variance"); their classifiers read the latent, timestep and prompt
for spec in red:nsfw:0 striped:artist_style:1; do
  IFS=: read -r concept category seed <<<"$spec"
  train --concept "$concept" --category "$category" --pairs "plugin:shapes-$concept" \
    --out "$OUT/$concept.safetensors" --seed "$seed" --latent-readout mean+max
done
# star decides and redirects with modules apart (benchmarks/README.md, "Deciding and redirecting
# apart"): first a bundle on the one-target recipe (every star paired with a cross) whose heads
# redirect; then, on the recipe, a classifier with its own latent encoder that reads the latent and
# timestep alone (half the rows' starting noise redrawn: --renoise 0.5); the second fit moves nothing
# the redirection reads (--trainable classifier)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
train --concept star --category object --pairs plugin:shapes-star:one-target \
  --out "$stage/star-redirection.safetensors" --seed 1 --latent-readout mean+max
train --concept star --category object --pairs plugin:shapes-star --out "$OUT/star.safetensors" \
  --seed 1 --init "$stage/star-redirection.safetensors" --trainable classifier \
  --classifier-reads latent --classifier-encoder own --renoise 0.5
echo "sha256 pins for saferedir_shapes/policies/demo.yaml:"
sha256sum "$OUT"/red.safetensors "$OUT"/striped.safetensors "$OUT"/star.safetensors

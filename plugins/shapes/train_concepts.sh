#!/usr/bin/env bash
# Trains the Shapes concept pack's three redirector bundles on the shipped Shapes backbone,
# from the pack's own prompt recipes (saferedir_shapes.world.concept_recipe: dictionary synonyms
# and the training wordings of world.WORDINGS / world.NEGATIONS, drawn per world.RECIPES), every trajectory labelled by
# what its image shows (the pack's outcome judge), and writes them next to the backbone weights.
# Run from the repository root after `make demo` has set up .venv.
# The recipes' misspellings come from weights/misspellings.json (python -m saferedir_shapes.misspellings).
#   bash plugins/shapes/train_concepts.sh            # all three
#   bash plugins/shapes/train_concepts.sh star       # only the concepts named
# STAGE=DIR keeps every fit in DIR (a temporary folder, removed at exit, otherwise).
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=plugins/shapes/saferedir_shapes/weights
train() {
  "$BIN/saferedir" train --backbone shapes --seeds 0 1 --steps 1200 --patience 0 \
    --cache "${CACHE:-$HOME/.cache/saferedir/trajectories}" "$@"
}
# Each bundle is made in three fits (striped's then joined by two more classifiers, below), the
# second and third each moving nothing the other reads (benchmarks/README.md, "Deciding and
# redirecting apart", "Latent-only classifiers for red and striped" and "Averaging a refit of the
# heads with its init"):
#   1. the redirection: a bundle on the concept's recipe (star: its one-target recipe, every star
#      paired with a cross), whose classifier reads the latent, timestep and prompt;
#   2. the classifier: on the recipe, from the first fit (--init, --trainable classifier), with a
#      latent encoder of its own, reading the latent and timestep alone, half the rows' starting
#      noise redrawn (--renoise 0.5). No wording moves its decision;
#   3. the heads again: 500 more steps of the redirection alone on the first fit's recipe, from the
#      second (--trainable redirection), every weight then averaged with the second's (--average-init,
#      a uniform soup of the two). The decision is the second fit's, bit for bit.
#   4. red only: its classifier refitted from the third fit as the second was, on red's "descriptions"
#      recipe (world.RED_DESCRIPTIONS: red described by what has the colour, 30% of 360 pairs) with
#      the 384 prompts of the six spent held-out description files added to its pool
#      (plugins/shapes/red_handwritten_pairs.py), every trajectory labelled by the pack's judge
#      (--outcome shapes-red); the heads stay the third fit's, bit for bit (benchmarks/README.md,
#      "Red's classifier on descriptions" and "Spent held-out descriptions as training data").
# concept:category:seed:variant -- the training seed (held-out split and initialisation) of each
# shipped bundle (red and striped: two seeds were trained and the better on the efficacy suite's
# dev split kept: benchmarks/README.md, "Retrain variance") and the first fit's recipe variant
only=" $* "
for name in "$@"; do
  [[ $name == red || $name == striped || $name == star ]] ||
    { echo "train_concepts.sh: no concept '$name' (red, striped, star)" >&2; exit 2; }
done
if [[ -n ${STAGE:-} ]]; then
  stage=$STAGE
  mkdir -p "$stage"
else
  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' EXIT
fi
for spec in red:nsfw:0: striped:artist_style:1: star:object:1:one-target; do
  IFS=: read -r concept category seed variant <<<"$spec"
  [[ $# -eq 0 || $only == *" $concept "* ]] || continue
  recipe="plugin:shapes-$concept${variant:+:$variant}"
  train --concept "$concept" --category "$category" --pairs "$recipe" \
    --out "$stage/$concept-1.safetensors" --seed "$seed" --latent-readout mean+max
  train --concept "$concept" --category "$category" --pairs "plugin:shapes-$concept" \
    --out "$stage/$concept-2.safetensors" --seed "$seed" --init "$stage/$concept-1.safetensors" \
    --trainable classifier --classifier-reads latent --classifier-encoder own --renoise 0.5
  train --concept "$concept" --category "$category" --pairs "$recipe" \
    --out "$stage/$concept-3.safetensors" --seed "$seed" --init "$stage/$concept-2.safetensors" \
    --trainable redirection --steps 500 --average-init
  if [[ $concept == red ]]; then
    "$BIN/python" plugins/shapes/red_handwritten_pairs.py "$stage/red-handwritten.json"
    train --concept "$concept" --category "$category" --pairs "$stage/red-handwritten.json" \
      --outcome shapes-red --out "$stage/$concept-4.safetensors" --seed "$seed" --init "$stage/$concept-3.safetensors" \
      --trainable classifier --classifier-reads latent --classifier-encoder own --renoise 0.5
    cp "$stage/$concept-4.safetensors" "$OUT/$concept.safetensors"
    continue
  fi
  if [[ $concept != striped ]]; then
    cp "$stage/$concept-3.safetensors" "$OUT/$concept.safetensors"
    continue
  fi
  # striped decides by three classifiers (benchmarks/README.md, "An ensemble of classifiers for
  # striped"): the second fit's and two more fits of it from the first fit, on the wide-pool recipe
  # (four times the benign pool), trained at normalised timesteps <= 0.5 only, on sampler seeds 0 1
  # and 0 1 2 3 (the later --seeds replaces train's); the mean of their p(unsafe) decides
  for seeds in "0 1" "0 1 2 3"; do
    train --concept "$concept" --category "$category" --pairs "plugin:shapes-$concept:wide-pool" \
      --out "$stage/$concept-2-${seeds// /}.safetensors" --seed "$seed" --init "$stage/$concept-1.safetensors" \
      --trainable classifier --classifier-reads latent --classifier-encoder own --renoise 0.5 \
      --classify-below 0.5 --seeds $seeds
  done
  "$BIN/saferedir" bundle ensemble "$stage/$concept-3.safetensors" "$stage/$concept-2-01.safetensors" \
    "$stage/$concept-2-0123.safetensors" --out "$OUT/$concept.safetensors"
done
echo "sha256 pins for saferedir_shapes/policies/demo.yaml:"
sha256sum "$OUT"/red.safetensors "$OUT"/striped.safetensors "$OUT"/star.safetensors

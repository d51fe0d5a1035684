#!/usr/bin/env bash
# The Shapes-XL backbone (SDXL's conditioning layout) and its concept bundles, end to end:
#   1. the backbone: the SD-layout Shapes UNet plus SDXL's added text-time conditioning (MiniLM's
#      pooled sentence embedding + time ids through add_embedding), fine-tuned from the shipped
#      SD-layout weights (python -m saferedir_shapes.train_backbone --layout xl);
#   2. its draw accuracy (python -m saferedir_shapes.evaluate --layout xl), also with only the
#      tokens or only the pooled embedding conditioning the UNet;
#   3. the three concept bundles, trained as train_concepts.sh trains the SD-layout ones: with
#      pooled redirection (shipped: weights/xl-*.safetensors, policy shapes:xl) and without it
#      (--no-pooled: bench-out/xl/tokens/*.safetensors, policy benchmarks/policies/shapes-xl-tokens.yaml).
# Then the efficacy table: python benchmarks/efficacy.py --backbone shapes-xl ... (benchmarks/README.md).
# Run from the repository root after `make demo` has set up .venv. SKIP_BACKBONE=1 keeps the weights.
#   bash plugins/shapes/train_xl.sh
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=plugins/shapes/saferedir_shapes/weights
LOGS=${LOGS:-bench-out/xl}
mkdir -p "$LOGS" bench-out/xl/tokens
if [ -z "${SKIP_BACKBONE:-}" ]; then
  "$BIN/python" -m saferedir_shapes.train_backbone --layout xl --init "$OUT/shapes-unet.safetensors" \
    --steps 1500 --lr 2e-4 --added-lr-scale 10 --token-dropout 0.3 --pooled-dropout 0.1 --threads 2 --out "$OUT"
fi
"$BIN/python" -m saferedir_shapes.evaluate --layout xl --n 120 --json "$LOGS/draw.json"
for only in tokens pooled; do
  "$BIN/python" -m saferedir_shapes.evaluate --layout xl --only "$only" --n 120 --sets seen unseen_pairs \
    --no-speed --json "$LOGS/draw-$only.json"
done
for spec in red:nsfw striped:artist_style star:object; do
  concept=${spec%%:*}
  category=${spec##*:}
  for variant in pooled tokens; do
    if [ "$variant" = pooled ]; then out="$OUT/xl-$concept.safetensors"; extra=(); else
      out="bench-out/xl/tokens/$concept.safetensors"; extra=(--no-pooled); fi
    "$BIN/saferedir" train --backbone shapes-xl --concept "$concept" --category "$category" \
      --pairs "plugin:shapes-$concept" --out "$out" "${extra[@]}" \
      --seeds 0 1 --steps 1200 --patience 0 --seed 0 --latent-readout mean+max --quiet \
      --cache "${CACHE:-$HOME/.cache/saferedir/trajectories}" | tee "$LOGS/train-$concept-$variant.json"
  done
done
echo "sha256 pins for saferedir_shapes/policies/xl.yaml:"
sha256sum "$OUT"/xl-red.safetensors "$OUT"/xl-striped.safetensors "$OUT"/xl-star.safetensors

#!/usr/bin/env bash
# Regenerates docs/results/ (the CPU-scale reproduction, on digits, of the findings in docs/science.md).
#   bash launch/env.sh && DPRUNE=.venv/bin/dprune bash docs/results/reproduce.sh
# Grid per model: L1 ratio {0.3,0.5,0.7,0.9} x retrain LR {0.01,0.001} x {L1, L1+OrthP, TPP} x 3
# seeds, plus Scratch-E and Scratch-B (the pruned architecture trained from its constructor's init
# for K1 + K2 and K1 x speedup + K2 epochs, K1 = the base's 60 (MLP) / 15 (CNN) epochs, the LR
# 0.01 retraining schedule stretched to that length); every run of seed s starts from the same
# base model of seed s (S2 or stricter).
# Scratch-E / Scratch-B run under both retraining recipes (LR 0.01 and LR 0.001, each stretched);
# the SX-A / SX-B checks pair the LR 0.01 scratch runs with the L1 runs.
#   MODELS="mlp7 cnn" (default both); SCRATCH_B_RATIOS: the ratios Scratch-B runs at (its budget
#   grows with the speedup: MLP-7 at 0.9 is 60 x 46 + 30 = 2808 epochs; default: all four).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny models: more threads only oversubscribe the cores
DPRUNE=${DPRUNE:-dprune}
OUT=${OUT:-runs/repro}
SEEDS=${SEEDS:-3}
MODELS=${MODELS:-mlp7 cnn}
for model in $MODELS; do
  cfg=configs/repro/digits_$model.yaml
  if [ "$model" = mlp7 ]; then
    ratios="[0-5:0.3,6:0],[0-5:0.5,6:0],[0-5:0.7,6:0],[0-5:0.9,6:0]"
    b_ratios=${SCRATCH_B_RATIOS:-$ratios}
    lrs="0:0.01,10:0.001,20:0.0001|0:0.001,10:0.0001,20:0.00001"
    lr01="0:0.01,10:0.001,20:0.0001"
    lr001="0:0.001,10:0.0001,20:0.00001"
  else
    ratios="[1-3:0.3],[1-3:0.5],[1-3:0.7],[1-3:0.9]"
    b_ratios=${SCRATCH_B_RATIOS:-$ratios}
    lrs="0:0.01,10:0.001|0:0.001,10:0.0001"
    lr01="0:0.01,10:0.001"
    lr001="0:0.001,10:0.0001"
  fi
  for s in $(seq 0 $((SEEDS - 1))); do
    $DPRUNE run "$cfg" prune.method=none retrain.epochs=0 pretrain.checkpoint= seed=$s \
      output.dir=$OUT/${model}_base_s$s
  done
  for method in l1 orthp tpp; do
    case $method in
      l1) extra=() ;;
      orthp) extra=(prune.reinit=orthp) ;;
      tpp) extra=(prune.method=tpp) ;;  # the config's 69-epoch cap; the phase ends when done
    esac
    $DPRUNE sweep "$cfg" --seeds "$SEEDS" --grid "prune.ratios=$ratios" --grid "retrain.lr_schedule=$lrs" \
      --out "$OUT/$model/$method" "${extra[@]}"
  done
  for lr in "$lr01" "$lr001"; do
    suffix=$([ "$lr" = "$lr01" ] && echo "" || echo "_lr001")
    $DPRUNE sweep "$cfg" --seeds "$SEEDS" --grid "prune.ratios=$ratios" --out "$OUT/$model/scratch_e$suffix" \
      prune.reinit=scratch retrain.scratch_budget=E "retrain.lr_schedule=$lr" "name=Scratch-E $lr"
    $DPRUNE sweep "$cfg" --seeds "$SEEDS" --grid "prune.ratios=$b_ratios" --out "$OUT/$model/scratch_b$suffix" \
      prune.reinit=scratch retrain.scratch_budget=B "retrain.lr_schedule=$lr" "name=Scratch-B $lr"
  done
  $DPRUNE report "$OUT/$model"/* --out docs/results/$model.md --plot docs/results/${model}_acc_vs_speedup.png
  $DPRUNE report "$OUT/$model"/* --json > docs/results/$model.json
  for other in l1+orthp tpp; do
    $DPRUNE report "$OUT/$model/l1" "$OUT/$model/$(echo $other | sed 's/l1+//')" --cross "l1,$other" \
      --out docs/results/${model}_cross_l1_vs_${other}.md
  done
  # SX-A / SX-B: Scratch-E / Scratch-B against the L1 runs they derive from (same seeds and ratios)
  $DPRUNE report "$OUT/$model/l1" "$OUT/$model/scratch_e" --out docs/results/${model}_sxa.md
  $DPRUNE report "$OUT/$model/l1" "$OUT/$model/scratch_b" --out docs/results/${model}_sxb.md
done

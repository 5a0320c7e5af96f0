#!/usr/bin/env bash
# Regenerates docs/results/ (the CPU-scale reproduction, on digits, of the findings in docs/science.md).
#   bash launch/env.sh && DPRUNE=.venv/bin/dprune bash docs/results/reproduce.sh
# Grid per model: ratios {0.3,0.5,0.7,0.9} x retrain LR {0.01,0.001} x {L1, L1+OrthP, TPP, Scratch}
# x 3 seeds; every run of a seed starts from that seed's base model (S2 or stricter).
set -euo pipefail
cd "$(dirname "$0")/../.."
DPRUNE=${DPRUNE:-dprune}
OUT=${OUT:-runs/repro}
SEEDS=${SEEDS:-3}
for model in mlp7 cnn; do
  cfg=configs/repro/digits_$model.yaml
  if [ "$model" = mlp7 ]; then
    ratios="[0-5:0.3,6:0],[0-5:0.5,6:0],[0-5:0.7,6:0],[0-5:0.9,6:0]"
    lrs="0:0.01,10:0.001,20:0.0001|0:0.001,10:0.0001,20:0.00001"
  else
    ratios="[1-3:0.3],[1-3:0.5],[1-3:0.7],[1-3:0.9]"
    lrs="0:0.01,10:0.001|0:0.001,10:0.0001"
  fi
  for s in $(seq 0 $((SEEDS - 1))); do
    $DPRUNE run "$cfg" prune.method=none retrain.epochs=0 pretrain.checkpoint= seed=$s \
      output.dir=$OUT/${model}_base_s$s
  done
  for method in l1 orthp tpp scratch; do
    case $method in
      l1) extra=() ;;
      orthp) extra=(prune.reinit=orthp) ;;
      tpp) extra=(prune.method=tpp prune.epochs=5 prune.lr_schedule=0:0.01) ;;
      scratch) extra=(prune.reinit=scratch) ;;
    esac
    $DPRUNE sweep "$cfg" --seeds "$SEEDS" --grid "prune.ratios=$ratios" --grid "retrain.lr_schedule=$lrs" \
      --out "$OUT/$model/$method" "${extra[@]}"
  done
  $DPRUNE report "$OUT/$model"/* --out docs/results/$model.md --plot docs/results/${model}_acc_vs_speedup.png
  $DPRUNE report "$OUT/$model"/* --json > docs/results/$model.json
  for other in l1+orthp tpp scratch; do
    $DPRUNE report "$OUT/$model/l1" "$OUT/$model/$(echo $other | sed 's/l1+//')" --cross "l1,$other" \
      --out docs/results/${model}_cross_l1_vs_${other}.md
  done
done

#!/usr/bin/env bash
# The regime grid (README "FedTiny's regime"), one cell at a time; after each cell the table, plots and the cell's metrics.json
# are copied to simulations/results/regime/ and committed.
# Usage: METHOD_LIST="fedtiny synflow ..." DENSITY=0.003 SEEDS=0 simulations/regime_grid.sh (log: /tmp/grid.log)
cd "$(dirname "$0")/.."
OUT=outputs/regime
RES=simulations/results/regime
mkdir -p $OUT $RES
DENSITY=${DENSITY:-0.01}
SEEDS=${SEEDS:-0}
METHODS_ALL=""
for m in $METHOD_LIST; do
  METHODS_ALL=${METHODS_ALL:+$METHODS_ALL,}$m
  .venv/bin/fedtiny compare --config configs/fashion-mnist-regime.yaml --methods $METHODS_ALL --densities $DENSITY --seeds $SEEDS output_dir=$OUT $EXTRA >> /tmp/grid.log 2>&1
  cp $OUT/comparison.csv $OUT/comparison.md $OUT/*.png $RES/ 2>/dev/null
  for d in $OUT/*/; do n=$(basename $d); [ -f $d/metrics.json ] && mkdir -p $RES/runs && cp $d/metrics.json $RES/runs/$n.json; done
  git add $RES && git commit -q -m "regime grid: $m at density $DENSITY, seeds $SEEDS (simulations/results/regime)" -- $RES
done

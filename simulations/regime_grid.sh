#!/usr/bin/env bash
# The regime grid (README "FedTiny's regime"), one cell at a time so that it can span sittings; after each cell the
# table and plots of every finished cell (`fedtiny compare --report-only`) and the cell's metrics.json are copied to
# simulations/results/regime/ and committed. Finished cells are skipped, an interrupted one resumes.
# Usage: CELLS="fedtiny:0.003:1 synflow:0.003:1" simulations/regime_grid.sh   (method:density:seed; log: /tmp/grid.log)
cd "$(dirname "$0")/.."
CONFIG=configs/fashion-mnist-regime.yaml
OUT=outputs/regime
RES=simulations/results/regime
ALL="fedavg,centralized,fedtiny,fedtiny-noabns,fedtiny-noprogressive,snip,synflow,grasp,prunefl,feddst,imp"
mkdir -p $OUT $RES/runs
for cell in $CELLS; do
  IFS=: read -r m d s <<< "$cell"
  .venv/bin/fedtiny compare --config $CONFIG --methods "$m" --densities "$d" --seeds "$s" output_dir=$OUT >> /tmp/grid.log 2>&1
  .venv/bin/fedtiny compare --report-only --config $CONFIG --methods $ALL --densities 0.01,0.003 --seeds 0,1,2,3,4 \
    output_dir=$OUT >> /tmp/grid.log 2>&1
  cp $OUT/comparison.csv $OUT/comparison.md $OUT/*.png $RES/ 2>/dev/null
  for r in $OUT/*/metrics.json; do cp "$r" "$RES/runs/$(basename "$(dirname "$r")").json"; done
  git add $RES && git commit -q -m "regime grid: $m at density $d, seed $s (simulations/results/regime)" -- $RES
done

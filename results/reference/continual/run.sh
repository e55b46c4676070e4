#!/usr/bin/env bash
# The reference runs of results/reference/continual/README.md, as they were run (2-core CPU, no GPU, one thread per
# run: two runs side by side). Each command line composes the same config as its preset (equal config hashes):
#   experiment=continual/minilm_{lora,curlora}, experiment=continual/smollm2_{lora,curlora}.
set -euo pipefail
export LRBENCH_DATA_DIR=${LRBENCH_DATA_DIR:-../shared/data} OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export LRBENCH_RESULTS_CSV=${LRBENCH_RESULTS_CSV:-results/reference/continual/runs.csv}
for seed in 0 1 2; do
  for method in lora curlora; do
    lrbench experiment=continual/minilm_$method seed=$seed logger=none
    lrbench experiment=continual/smollm2_$method seed=$seed logger=none
  done
done
python -m lowrank_bench.tables "$LRBENCH_RESULTS_CSV" --where model=minilm-l6
python -m lowrank_bench.tables "$LRBENCH_RESULTS_CSV" --where model=smollm2-135m
lrbench-continual-plot "$LRBENCH_RESULTS_CSV" --where model=minilm-l6 --out results/reference/continual/minilm_compare.png
lrbench-continual-plot "$LRBENCH_RESULTS_CSV" --where model=smollm2-135m --out results/reference/continual/smollm2_compare.png

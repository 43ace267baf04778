#!/usr/bin/env bash
# The toy lab (README "Toy lab"): the paper's claims in miniature, on a CPU. All of it is examples/toy_lab.py.
#   bash examples/toy_lab.sh          # quick: ExP-GRPO vs expert SFT vs GRPO on the shipped base, one cell
#   bash examples/toy_lab.sh calibrate  # choose the recipes' lr and beta on plain GRPO -> OUT/calibration.json
#   bash examples/toy_lab.sh full     # calibrate, then every part on 3 base builds x 2 RL seeds, the claims table
#   bash examples/toy_lab.sh grpo|dpo|table3|coef|probe|placement   # one part; placement: where the positive goes
#   bash examples/toy_lab.sh claims   # the claims of OUT's runs (no OUT: the full lab's folder, else the quick run's)
# Knobs (environment): OUT, BUILD_SEEDS, RL_SEEDS, STEPS, BUILD_STEPS, EVAL_EVERY, EVAL_LIMIT, FINAL_LIMIT, JOBS,
# GENERATIONS (G of the GRPO arms; quick 4, else 8), ARMS. Base build 3 (unused in development): BUILD_SEEDS=3.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python examples/toy_lab.py "$@"

#!/usr/bin/env bash
# Toy lab: watch GRPO stall and ExP-GRPO learn, on a CPU, with the project's own scripts (README "Toy lab").
#
# Task: n-digit addition with a digit-by-digit chain of thought (`--dataset addition`, level = digits).
# Stage 1 builds the toy base model once (cached in ~/.cache/expo): it solves 1-3 digit sums, (almost) never
# 5-6 digit ones, but explains those when shown the answer. Stage 2 trains on 5-6 digit sums only, four arms,
# two at a time (one core each), each evaluated on 200 held-out 5-6 digit sums (greedy) every 25 steps:
#   grpo                plain GRPO: on questions it never solves every group has zero signal
#   expo_steps_anchor   ExP-GRPO, explanations kept only if every step is right, also trained under the
#                       explanation prompt (--explanation_check steps --sft_anchor)
#   grpo_true_cot       GRPO + SFT on the true chain of thought (--sft_source expert)
#   expo_paper          ExP-GRPO as in the paper (answer check only, no anchor)
# Then it draws the curves (runs/toy_lab/curves.png) and prints a table.
#
#   bash examples/toy_lab.sh                        # seed 0: ~4.4 min base model (once) + ~12.5 min arms, 2 cores
#   SEED=1 OUT=runs/toy_lab_s1 bash examples/toy_lab.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SEED=${SEED:-0}
OUT=${OUT:-runs/toy_lab}
STEPS=${STEPS:-200}
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false  # one thread per process: two runs share 2 cores
mkdir -p "$OUT"
start=$SECONDS

python -c "import common; print('toy base model:', common.build_toy_model())"

# TOYLAB stage 2: 32 fresh hard prompts a step, G 8, T 1, lr 2e-3, beta 0, lambda 1
arm() {
    local name=$1; shift
    rm -rf "${OUT:?}/$name"
    python expo_grpo.py --model toy --dataset addition --levels 5-6 --batch_size 32 --num_generations 8 \
        --temperature 1.0 --lr 2e-3 --beta 0 --sft_coef 1 --max_steps "$STEPS" --max_new_tokens 48 \
        --micro_batch_size 128 --gen_batch_size 256 --gradient_checkpointing false --save_every 0 \
        --probe_every 0 --log_samples 1 --seed "$SEED" --eval_every 25 --eval_levels 5-6 --eval_limit 200 \
        --eval_n 1 --eval_temperature 0 --output_dir "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1 \
        || { echo "arm $name failed, see $OUT/$name.log"; return 1; }
    echo "arm $name done at $((SECONDS - start))s"
}
arm grpo --sft_source none &
arm expo_steps_anchor --sft_source explanation --explanation_check steps --sft_anchor &
wait
arm grpo_true_cot --sft_source expert &
arm expo_paper --sft_source explanation &
wait

python eval.py plot "$OUT"/{grpo,expo_steps_anchor,grpo_true_cot,expo_paper} --out "$OUT/curves.png" \
    --keys 'eval/accuracy' reward zero_spread expl_verified sft_loss
python - "$OUT" <<'PY'
import json, os, sys
print(f"\n| arm | held-out hard accuracy (greedy) at the end | zero_spread (mean over steps) | kept explanations |")
print("| --- | --- | --- | --- |")
for arm in ("grpo", "expo_steps_anchor", "grpo_true_cot", "expo_paper"):
    rows = [json.loads(l) for l in open(os.path.join(sys.argv[1], arm, "metrics.jsonl"))]
    kept = [r["expl_verified"] for r in rows if "expl_verified" in r]
    print(f"| {arm} | {rows[-1]['eval/accuracy']:.3f} | {sum(r['zero_spread'] for r in rows) / len(rows):.2f} | "
          + (f"{kept[0]:.2f} -> {kept[-1]:.2f}" if kept else "-") + " |")
PY
echo "total $((SECONDS - start))s, load average now: $(cut -d' ' -f1-3 /proc/loadavg)"

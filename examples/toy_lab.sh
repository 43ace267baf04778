#!/usr/bin/env bash
# Toy lab: GRPO stalls where the paper's ExP-GRPO learns, on a CPU, with the project's own scripts (README "Toy lab").
#
# Task: n-digit addition with a digit-by-digit chain of thought (`--dataset addition`, level = digits). Stage 1 builds
# a toy base model (toy.py, cached in ~/.cache/expo) that solves 1-3 digit sums, (almost) never 5-6 digit ones, but
# explains those when shown the answer. Stage 2 trains on 5-6 digit sums only and evaluates greedy accuracy on 200
# held-out 5-6 digit sums; at the end eval.py prints accuracy by level (1-6 digits) of the base and of each arm on
# the same 600 held-out sums (the paper's Table 3, in miniature).
#
#   bash examples/toy_lab.sh          # quick: one base, GRPO vs the paper's ExP-GRPO, ~5 min on 2 cores
#   bash examples/toy_lab.sh full     # five arms on 3 base builds x 2 RL seeds, curves, the grid: ~45 min
#
# The arms (names say what they do):
#   grpo                      plain GRPO (--sft_source none)
#   expo_paper                the paper's ExP-GRPO: explanations written once by the base model (offline),
#                             kept if their answer verifies, lambda 0.04 (the defaults of expo_grpo.py)
#   expo_online_steps_anchor  explanations by the current policy each step, kept only if every step is right,
#                             also trained under the explanation prompt
#   expo_online_answer        explanations by the current policy each step, kept if the answer verifies
#   grpo_true_cot             GRPO + SFT on the dataset's true chain of thought (--sft_source expert)
# Knobs (environment): OUT, BUILD_SEEDS, RL_SEEDS, STEPS, BUILD_STEPS, EVAL_LIMIT, FINAL_LIMIT.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-quick}
OUT=${OUT:-runs/toy_lab_$MODE}
if [ "$MODE" = full ]; then
    BUILD_SEEDS=${BUILD_SEEDS:-"0 1 2"} RL_SEEDS=${RL_SEEDS:-"0 1"} EVAL_EVERY=${EVAL_EVERY:-25}
    ARMS=${ARMS:-"grpo expo_paper expo_online_steps_anchor expo_online_answer grpo_true_cot"}
else
    BUILD_SEEDS=${BUILD_SEEDS:-0} RL_SEEDS=${RL_SEEDS:-0} EVAL_EVERY=${EVAL_EVERY:-50} ARMS=${ARMS:-"grpo expo_paper"}
fi
STEPS=${STEPS:-100}
BUILD_STEPS=${BUILD_STEPS:-600}
EVAL_LIMIT=${EVAL_LIMIT:-200}
FINAL_LIMIT=${FINAL_LIMIT:-600}
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false  # one thread per process: two runs share 2 cores
mkdir -p "$OUT"
start=$SECONDS

flags() {  # the flags of one arm
    case $1 in
        grpo) echo "--sft_source none" ;;
        expo_paper) echo "--sft_source explanation --explanations offline --explanation_check answer" ;;
        expo_online_steps_anchor) echo "--sft_source explanation --explanations online --explanation_check steps --sft_anchor" ;;
        expo_online_answer) echo "--sft_source explanation --explanations online --explanation_check answer" ;;
        grpo_true_cot) echo "--sft_source expert" ;;
        *) echo "unknown arm $1" >&2; return 1 ;;
    esac
}

arm() {  # arm NAME BASE_DIR RL_SEED RUN_DIR
    local name=$1 base=$2 seed=$3 dir=$4
    rm -rf "$dir"
    mkdir -p "$(dirname "$dir")"
    # $(flags) is split into words on purpose
    # shellcheck disable=SC2046
    python expo_grpo.py --model "$base" --dataset addition --levels 5-6 --batch_size 32 --num_generations 8 \
        --temperature 1.0 --lr 2e-3 --beta 0 --sft_coef 0.04 --max_steps "$STEPS" --max_new_tokens 48 \
        --micro_batch_size 128 --gen_batch_size 256 --no_gradient_checkpointing --save_every 0 \
        --probe_every 0 --log_samples 1 --seed "$seed" --eval_every "$EVAL_EVERY" --eval_levels 5-6 \
        --eval_limit "$EVAL_LIMIT" --eval_num_samples 1 --eval_temperature 0 --output_dir "$dir" $(flags "$name") \
        > "$dir.log" 2>&1 || { echo "arm $name failed, see $dir.log"; return 1; }
    echo "$(basename "$dir") done at $((SECONDS - start))s"
}

table_rows=()
for b in $BUILD_SEEDS; do
    base=$(python -c "import toy; print(toy.build_toy_model(seed=$b, steps=$BUILD_STEPS))" | tail -n 1)
    echo "base build $b: $base ($(python -c "import json; d = json.load(open('$base/toy_build.json')); print(', '.join(f'{k} {d[k]}' for k in ('easy_solve', 'hard_solve', 'hard_explain') if k in d))")) at $((SECONDS - start))s"
    # the offline explanations are sampled once, by the first arm that needs them, and cached for the others
    runs=()
    for r in $RL_SEEDS; do
        for a in $ARMS; do runs+=("$a:$r"); done
    done
    for ((i = 0; i < ${#runs[@]}; i += 2)); do  # two runs at a time, one core each
        for job in "${runs[@]:i:2}"; do
            a=${job%%:*} r=${job##*:}
            arm "$a" "$base" "$r" "$OUT/b$b/${a}_r$r" &
        done
        wait
    done
    table_rows+=("b$b:$base")
done

# Table 3 in miniature: greedy accuracy by level of the base and of each arm (RL seed of the first), same sums
r0=${RL_SEEDS%% *}
for row in "${table_rows[@]}"; do
    b=${row%%:*} base=${row#*:}
    models=("base=$base")
    for a in $ARMS; do models+=("$a=$OUT/$b/${a}_r$r0/hf"); done
    for m in "${models[@]}"; do
        python eval.py --model "${m#*=}" --dataset addition --levels 1-6 --limit "$FINAL_LIMIT" --num_samples 1 \
            --temperature 0 --max_new_tokens 48 --gen_batch_size 256 --output_dir "$OUT/$b/eval/${m%%=*}" \
            > "$OUT/$b/eval_${m%%=*}.log" 2>&1 || { echo "eval of ${m%%=*} failed, see $OUT/$b/eval_${m%%=*}.log"; exit 1; }
    done
    echo; echo "base build ${b#b}: accuracy by level (digits) on $FINAL_LIMIT held-out sums, greedy"
    python eval.py compare "$OUT/$b"/eval/*
done

# the held-out hard accuracy of every run at the end, and the curves
python - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
print(f"\n| run | held-out 5-6 digit accuracy, by eval step | zero_spread (mean) | kept explanations, first -> last |")
print("| --- | --- | --- | --- |")
for path in sorted(glob.glob(os.path.join(out, "b*", "*_r*", "metrics.jsonl"))):
    rows = [json.loads(l) for l in open(path)]
    curve = " / ".join(f"{r['eval/accuracy']:.3f}" for r in rows if "eval/accuracy" in r)
    kept = [r["expl_verified"] for r in rows if "expl_verified" in r]
    print(f"| {os.path.relpath(os.path.dirname(path), out)} | {curve} | "
          f"{sum(r['zero_spread'] for r in rows) / len(rows):.2f} | " + (f"{kept[0]:.2f} -> {kept[-1]:.2f}" if kept else "-") + " |")
PY
python eval.py plot "$OUT"/b*/*_r*/ --out "$OUT/curves.png" --keys 'eval/accuracy' reward zero_spread expl_verified sft_loss
echo "total $((SECONDS - start))s, load average now: $(cut -d' ' -f1-3 /proc/loadavg)"

#!/usr/bin/env bash
# The RAViT study at the real schedule (results/ravit_cifar10_cpu/study/PLAN.md):
# three rounds of candidates (16 epochs, seed 0), the choice by the plan's
# validation rule, then the chosen cascade and the ViT with more seeds, the
# claim table over 3 seeds and the published parameters. Nothing is chosen on
# the test split.
# Run from the repository root. One run takes ~50 minutes on one core of a
# 2-core AMD EPYC (Zen 4); every training resumes if restarted, so the same
# script continues where it stopped (a finished run is skipped). STAGE=1..5
# runs one stage only.
set -euo pipefail
STUDY=results/ravit_cifar10_cpu/study
done_() { [[ -f runs/$1/test_logits.npz ]]; }
keep() {  # name config-args: a study run's logits, metrics.jsonl, config and summary, kept
  local cmd="python -m launch.train --config configs/ravit_cifar10.py:$2 --workdir runs/study/$1 --config.eval_every=702"
  mkdir -p "$STUDY/$1"
  cp "runs/study/$1"/{config.json,metrics.jsonl,val_logits.npz,test_logits.npz} "$STUDY/$1/"
  python -m launch.report --summarize "runs/study/$1" --out "$STUDY/$1/training_run" --command "$cmd"
}
stage() { [[ -z ${STAGE:-} || ${STAGE} == "$1" ]]; }

# 1. The reuse (second branch: 2 blocks at width 96).
if stage 1; then
  for v in reuse=token+patch,reuse_init=zeros reuse=none reuse=both,reuse_init=zeros reuse=token,reuse_init=zeros; do
    name=r1_$(echo "$v" | sed -e 's/reuse=//' -e 's/,reuse_init=/_/' -e 's/+/_/g')
    done_ "study/$name" ||
      python -m launch.train --config configs/ravit_cifar10.py:$v \
        --workdir "runs/study/$name" --config.eval_every=702
    keep "$name" "$v"
  done
fi
# Round 1's choice by the rule (SELECTION.md).
REUSE=reuse=token+patch,reuse_init=zeros

# 2. The shape of the helped branch, with round 1's reuse.
if stage 2; then
  for shape in later_depth=3 later_width=64,later_depth=4; do
    name=r2_$(echo "$shape" | sed -e 's/later_depth=3/d3_w96/' -e 's/later_width=64,later_depth=4/d4_w64/')
    done_ "study/$name" ||
      python -m launch.train --config configs/ravit_cifar10.py:$REUSE,$shape \
        --workdir "runs/study/$name" --config.eval_every=702
    keep "$name" "$REUSE,$shape"
  done
fi
# Round 2's choice by the rule (SELECTION.md).
SHAPE=later_depth=3

# 3. Self-distillation of the last exit into the first.
if stage 3; then
  done_ study/r3_d3_sd1 ||
      python -m launch.train --config configs/ravit_cifar10.py:$REUSE,$SHAPE,self_distill=1.0 \
      --workdir runs/study/r3_d3_sd1 --config.eval_every=702
  keep r3_d3_sd1 "$REUSE,$SHAPE,self_distill=1.0"
fi

# 4. The choice over all rounds by the rule (study_metric.py --choose prints
#    it; the script stops if it is not CHOSEN), then seeds 1 and 2 of it. The
#    ViT trains all three seeds with this code, so that each run's
#    metrics.jsonl is kept beside its logits.
CHOSEN=reuse=token+patch,reuse_init=zeros,later_depth=3
CHOSEN_RUN=r2_d3_w96
if stage 4; then
  rule=$(python "$STUDY/study_metric.py" --choose "$STUDY"/r[0-9]_*)
  [[ $rule == "$STUDY/$CHOSEN_RUN" ]] || { echo "the rule chose $rule, not $CHOSEN_RUN"; exit 1; }
  for seed in 0 1 2; do
    done_ "vit_s$seed" ||
      python -m launch.train --config configs/vit_cifar10.py:seed=$seed \
        --workdir "runs/vit_s$seed" --config.eval_every=702
  done
  for seed in 1 2; do
    done_ "ravit_s$seed" ||
      python -m launch.train --config configs/ravit_cifar10.py:$CHOSEN,seed=$seed \
        --workdir "runs/ravit_s$seed" --config.eval_every=702
  done
fi

# 5. The claim table over 3 seeds (thresholds calibrated on each seed's
#    validation split), for the paper's exit rule (entropy) and for the top
#    softmax probability, each run's metrics.jsonl beside its logits, and the
#    published parameters of the seed-0 cascade with the exit rule of the
#    PLAN.md addendum (the higher seed-mean validation accuracy at <= 0.72x).
if stage 5; then
  [[ -e runs/ravit_s0 ]] || ln -s "study/$CHOSEN_RUN" runs/ravit_s0
  for rule in entropy max_prob; do
    out=results/ravit_cifar10_cpu; [[ $rule == entropy ]] || out=$out/$rule
    python -m launch.report --seeds 0,1,2 --run ravit=runs/ravit_s{seed} --baseline runs/vit_s{seed} \
        --budgets 0.55,0.7,0.72 --claims 0.72:1.7:must,0.7:0.5:goal --criterion $rule --out $out \
        --title "RAViT vs ViT, CIFAR-10, 16 epochs, 3 seeds, $rule exits"
  done
  for seed in 0 1 2; do
    cp "runs/ravit_s$seed/metrics.jsonl" "results/ravit_cifar10_cpu/ravit_s${seed}_metrics.jsonl"
    cp "runs/vit_s$seed/metrics.jsonl" "results/ravit_cifar10_cpu/baseline_s${seed}_metrics.jsonl"
  done
  RULE=$(python "$STUDY/study_metric.py" --exit_rule runs/ravit_s0 runs/ravit_s1 runs/ravit_s2)
  # From the seed-0 run's checkpoint, or, where that folder holds logits only,
  # the published file's own variables (the same run's) calibrated again.
  src=(--workdir runs/ravit_s0); [[ -d runs/ravit_s0/checkpoints ]] || src=(--params results/params/ravit_cifar10.npz)
  python -m launch.export --config configs/ravit_cifar10.py:$CHOSEN "${src[@]}" \
      --out results/params/ravit_cifar10.npz --budgets 0.55,0.7,0.72 --baseline_config configs/vit_cifar10.py \
      --criterion "$RULE"
fi

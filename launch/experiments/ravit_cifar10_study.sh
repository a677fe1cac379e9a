#!/usr/bin/env bash
# The RAViT study at the real schedule (results/ravit_cifar10_cpu/study/PLAN.md):
# three rounds of candidates (16 epochs, seed 0), the choice by the plan's
# validation rule, then the chosen cascade and the ViT with seeds 1 and 2, the
# claim table over 3 seeds and the published parameters. Nothing is chosen on
# the test split.
# Run from the repository root. One run takes ~50 minutes on one core of a
# 2-core AMD EPYC (Zen 4); every training resumes if restarted, so the same
# script continues where it stopped. STAGE=1..5 runs one stage only.
set -euo pipefail
STUDY=results/ravit_cifar10_cpu/study
train() {  # workdir config[:args]; a finished run (its test logits written) is left alone
  [[ -f $1/test_logits.npz ]] || python -m launch.train --config "$2" --workdir "$1" --config.eval_every=702
}
candidate() {  # name config[:args]: a study run, its logits, metrics.jsonl, config and summary kept
  train "runs/study/$1" "$2"
  mkdir -p "$STUDY/$1"
  cp "runs/study/$1"/{config.json,metrics.jsonl,val_logits.npz,test_logits.npz} "$STUDY/$1/"
  python -m launch.report --summarize "runs/study/$1" --out "$STUDY/$1/training_run" --command \
      "python -m launch.train --config $2 --workdir runs/study/$1 --config.eval_every=702"
}
metric() { python "$STUDY/study_metric.py" "$@"; }
stage() { [[ -z ${STAGE:-} || ${STAGE} == "$1" ]]; }
R=configs/ravit_cifar10.py

# 1. The reuse (second branch: 2 blocks at width 96).
if stage 1; then
  for v in reuse=token+patch,reuse_init=zeros reuse=none reuse=both,reuse_init=zeros \
           reuse=token,reuse_init=zeros; do
    name=r1_$(echo "$v" | sed -e 's/reuse=//' -e 's/,reuse_init=/_/' -e 's/+/_/g')
    candidate "$name" "$R:$v"
  done
fi
REUSE=reuse=token+patch,reuse_init=zeros   # round 1's choice (SELECTION.md)

# 2. The shape of the helped branch, with round 1's reuse.
if stage 2; then
  candidate r2_d3_w96 "$R:$REUSE,later_depth=3"
  candidate r2_d4_w64 "$R:$REUSE,later_width=64,later_depth=4"
fi
SHAPE=later_depth=3                        # round 2's choice (SELECTION.md)

# 3. Self-distillation of the last exit into the first.
if stage 3; then
  candidate r3_d3_sd1 "$R:$REUSE,$SHAPE,self_distill=1.0"
fi

# 4. The choice (validation rule), then seeds 1 and 2 of it and of the ViT.
#    Seed 0 of the cascade is its study run. The ViT trains all three seeds
#    with this code, so that each run's metrics.jsonl is kept beside its logits.
chosen_args() {  # the chosen run's config arguments, from its summary's command
  local chosen; chosen=$(metric --choose "$STUDY"/r[0-9]_*)
  python -c "import json, re, sys; print(re.search(r'--config \S+?\.py:(\S+)',
             json.load(open(sys.argv[1]))['command']).group(1))" "$chosen/training_run.json"
}
if stage 4; then
  CHOSEN=$(chosen_args); echo "chosen by the rule: $CHOSEN"
  train runs/vit_s0 configs/vit_cifar10.py:seed=0
  for seed in 1 2; do
    train "runs/ravit_s$seed" "$R:$CHOSEN,seed=$seed"
    train "runs/vit_s$seed" "configs/vit_cifar10.py:seed=$seed"
  done
fi

# 5. The claim table over 3 seeds (thresholds calibrated on each seed's
#    validation split) and the published parameters of the seed-0 cascade.
if stage 5; then
  [[ -e runs/ravit_s0 ]] || ln -s "study/$(basename "$(metric --choose "$STUDY"/r[0-9]_*)")" runs/ravit_s0
  python -m launch.report --seeds 0,1,2 --run ravit=runs/ravit_s{seed} --baseline runs/vit_s{seed} \
      --budgets 0.55,0.7,0.72 --claims 0.72:1.7:must,0.7:0.5:goal --out results/ravit_cifar10_cpu
  for seed in 0 1 2; do
    cp "runs/ravit_s$seed/metrics.jsonl" "results/ravit_cifar10_cpu/ravit_s${seed}_metrics.jsonl"
    cp "runs/vit_s$seed/metrics.jsonl" "results/ravit_cifar10_cpu/baseline_s${seed}_metrics.jsonl"
  done
  CHOSEN=$(chosen_args)
  python -m launch.export --config "$R:$CHOSEN" --workdir runs/ravit_s0 --out results/params/ravit_cifar10.npz \
      --budgets 0.55,0.7,0.72 --baseline_config configs/vit_cifar10.py
fi

#!/usr/bin/env bash
# The first RAViT design against the ViT (results/ravit_cifar10_cpu/first_design_16_epochs/,
# ablation/, 2-core CPU, offline CIFAR-10): the helped branch takes the class
# token only, through a default-initialised projection, with 2 blocks (FIRST,
# the config's defaults before the study of ravit_cifar10_study.sh replaced them).
# Both main runs share one recipe (configs/common.py cifar_vit_recipe) at 16
# epochs; each run resumes if restarted, so the same script continues it.
# Run from the repository root. On 2 cores, run the two trainings side by side,
# each pinned to one core (taskset -c 0 / -c 1).
set -euo pipefail
FIRST=reuse=token,reuse_init=default

# 1. Pilot that chose the lighter second branch (3 epochs, validation split).
for v in "later_width=64,later_depth=3" "later_depth=2"; do
  python -m launch.train --config "configs/ravit_cifar10.py:$FIRST,epochs=3,$v" \
      --workdir "runs/pilot_$(echo "$v" | tr ',=' '__')"
done

# 2. The main runs (16 epochs) and the report (thresholds calibrated on val),
#    then the ViT's trained parameters, published for launch.predict /
#    launch.evaluate (the published cascade is the study's).
python -m launch.train --config configs/vit_cifar10.py:epochs=16 --workdir runs/vit_cifar10 --config.eval_every=702
python -m launch.train --config configs/ravit_cifar10.py:$FIRST,later_depth=2,epochs=16 --workdir runs/ravit_cifar10 --config.eval_every=702
python -m launch.report --run ravit=runs/ravit_cifar10 --baseline runs/vit_cifar10 \
    --out results/ravit_cifar10_cpu/first_design_16_epochs --budgets 0.55,0.7,0.72 \
    --title "RAViT 16->32 vs ViT, CIFAR-10, 16 epochs, 2-core CPU"
python -m launch.export --config configs/vit_cifar10.py:epochs=16 --workdir runs/vit_cifar10 \
    --out results/params/vit_cifar10.npz

# 3. Ablations at a shorter schedule (3 epochs for every row). The published
#    full-second-branch row reuses the logits of short_schedule_3_epochs/.
python -m launch.train --config configs/vit_cifar10.py:epochs=3 --workdir runs/vit_cifar10_3ep
python -m launch.train --config configs/ravit_cifar10.py:$FIRST,epochs=3,full --workdir runs/ravit_cifar10_3ep
for v in "" "reuse=none" "stop_grad"; do
  python -m launch.train --config "configs/ravit_cifar10.py:$FIRST,later_depth=2,epochs=3${v:+,$v}" \
      --workdir "runs/abl_ravit${v:+_$(echo "$v" | tr ',=' '__')}"
done
python -m launch.report --run lighter_token=runs/abl_ravit --run no_reuse=runs/abl_ravit_reuse_none \
    --run stop_grad=runs/abl_ravit_stop_grad --run full_second_branch=runs/ravit_cifar10_3ep \
    --baseline runs/vit_cifar10_3ep --out results/ravit_cifar10_cpu/ablation --budgets 0.55,0.7,0.72 \
    --title "RAViT ablations, CIFAR-10, 3 epochs, 2-core CPU"

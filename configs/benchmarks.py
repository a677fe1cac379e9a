r"""What `python -m benchmarks.run` measures, and the targets it judges.

Not a training config: `benchmarks.run` reads it (tests/test_configs.py
leaves it out). Every figure goes into results/bench_cpu.json and .md:

  python -m benchmarks.run all       # the four sections, ~15 min on 2 idle cores
  python -m benchmarks.run train|loop|latency|batched [--quick]

A target is (name, section, goal, what); the section's figure `name` is
judged `>= goal`; a goal of None reports the figure without judging it.
'quick' shrinks every section to a smoke test (figures not judged).
"""

import ml_collections

from configs import common

PARAMS = "results/params"

TARGETS = (
    ("resnet_train_speedup_vs_torch_eager", "train", 1.0,
     "ERDE teacher (ResNet-20) train step vs PyTorch eager, paired"),
    ("erde_student_train_speedup_vs_torch_eager", "train", None,
     "ERDE student (ResNet-8 + the teacher's forward) train step vs PyTorch eager"),
    ("vit_train_speedup_vs_torch_eager", "train", None,
     "CIFAR ViT train step on one device vs PyTorch eager"),
    ("vit_devices4_train_speedup_vs_torch_eager", "train", None,
     "CIFAR ViT train step, batch over 4 host devices, vs PyTorch eager"),
    ("plain_process_over_launcher", "train", 0.95,
     "a plain process (backend.setup, models.build, its own jax.jit step) vs the "
     "launcher's teacher step: reaches its speed"),
    ("train_loop_over_bare_step", "loop", 0.90,
     "train_and_evaluate's loop vs its bare step (real CIFAR-10), paired"),
    ("early_exit_batch1_realized_over_predicted", "latency", 0.85,
     "batch 1, 0.55 budget: measured / MAC-predicted speed-up, worst of RAViT vs the "
     "ViT and the ERDE student vs its final exit, baselines at their best (aim 0.9)"),
    ("batched_realized_over_predicted", "batched", 0.90,
     "DynamicCascade at batch 256/1000/1024, budgets 0.55/0.70: worst measured / "
     "MAC-predicted speed-up over the baseline (RAViT vs ViT, student vs final exit)"),
    ("batched_dynamic_over_no_exit", "batched", 1.0,
     "DynamicCascade vs the same model with no early exit (every exit on every "
     "image), worst over batches and budgets: never slower"),
)


def get_config(arg=None):
  a = common.parse_arg(arg, quick=False)
  q = a.quick or a.runlocal
  c = ml_collections.ConfigDict()
  c.quick = q
  c.params = dict(vit=f"{PARAMS}/vit_cifar10.npz", ravit=f"{PARAMS}/ravit_cifar10.npz",
                  teacher=f"{PARAMS}/erde_teacher.npz", student=f"{PARAMS}/erde_student_s0.npz")
  # rounds: paired rounds after one warm-up round; steps: train steps per variant per round.
  c.train = dict(rounds=1 if q else 12, steps=1 if q else 3, batch=8 if q else 128)
  c.loop = dict(rounds=1 if q else 8, steps=8 if q else 100, train_size=1024 if q else 0)
  c.latency = dict(rounds=1 if q else 20, images=4 if q else 64, budget=0.55)
  c.batched = dict(rounds=1 if q else 8, batches=(32,) if q else (256, 1000, 1024),
                   budgets=(0.55, 0.70))
  return c

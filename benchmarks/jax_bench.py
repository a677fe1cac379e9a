"""JAX measurements: matmul peak, the jitted train step, inference, dynamic exits.

Everything runs the library's own code paths: the train step is
the trainer's own `adaptive_vision.train.build.build(config)` (jitted over
the trainer's mesh, state donated, optimizer and loss from the config); dynamic early exits run
`adaptive_vision.inference.DynamicCascade` (batches) and
`SingleDispatchCascade` (batch 1). Inputs are synthetic batches
already on device (no data pipeline), unless real test images are asked for.
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adaptive_vision import compiler, early_exit, models
from adaptive_vision import sharding as shd
from adaptive_vision.inference import DynamicCascade, SingleDispatchCascade
from adaptive_vision.train import build as build_lib
from adaptive_vision.train.state import param_count
from benchmarks import common

# Schedule length for the optimizer (the benchmark runs a few dozen steps; the
# schedule's value does not change the cost of a step).
SCHEDULE_STEPS = 10_000


# ----------------------------------------------------------------------------
# XLA's view of a compiled program


def cost_flops(compiled) -> Optional[float]:
  """FLOPs XLA's cost analysis counts for one call of `compiled`."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or analysis.get("flops") is None:
    return None
  value = float(analysis["flops"])
  return value if value > 0 else None


def memory_analysis(compiled) -> Optional[dict]:
  try:
    m = compiled.memory_analysis()
  except Exception:
    return None
  if m is None:
    return None
  keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
          "alias_size_in_bytes", "generated_code_size_in_bytes")
  return {k: int(getattr(m, k)) for k in keys if hasattr(m, k)}


def device_peak_memory() -> Optional[int]:
  """Peak bytes in use on the first device (accelerators; None on CPU)."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:
    return None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


# ----------------------------------------------------------------------------
# 1. The machine's ceiling


def matmul_peak(sizes: Sequence[int], dtype: str, *, reps: int, warmup: int) -> dict:
  """FLOP/s of square matmuls [n, n] @ [n, n] through jax.jit.

  The peak is the machine's ceiling, so it is the fastest repetition of the
  best size (3x `reps` repetitions each), not a median: on a shared machine
  other tenants only ever slow a repetition down, and a median-based peak
  measured in a busy minute made the fraction of peak look 40% better than it
  was (results/bench_notes.md). Medians are kept beside it.
  """
  dt = jnp.dtype(dtype)
  out: dict[str, Any] = {"dtype": str(dt), "sizes": {}}
  matmul = jax.jit(lambda a, b: a @ b)
  for n in sizes:
    ka, kb = jax.random.split(jax.random.key(n))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dt)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dt)
    compiled = matmul.lower(a, b).compile()
    t = common.repeat(lambda: compiled(a, b).block_until_ready(), reps=3 * reps, warmup=warmup)
    flops = 2.0 * n ** 3
    out["sizes"][str(n)] = {"median_s": t["median_s"], "min_s": t["min_s"],
                            "flops_per_s": flops / t["min_s"],
                            "median_flops_per_s": flops / t["median_s"],
                            "xla_flops": cost_flops(compiled)}
    common.log(f"  matmul {dt} {n}x{n}: {flops / t['min_s'] / 1e9:.1f} GFLOP/s fastest, "
               f"{flops / t['median_s'] / 1e9:.1f} median (of {t['reps']})")
  best = max(out["sizes"], key=lambda k: out["sizes"][k]["flops_per_s"])
  out["peak_flops_per_s"] = out["sizes"][best]["flops_per_s"]
  out["peak_size"] = int(best)
  out["peak_statistic"] = "fastest repetition of the best size"
  return out


# ----------------------------------------------------------------------------
# Synthetic inputs


def synthetic_batch(config, batch: int, seed: int = 0) -> dict:
  """A batch of the trainer's contract (numpy): 'image' or 'views', and 'label'."""
  rng = np.random.default_rng(seed)
  out = {"label": rng.integers(0, config.model.num_classes, batch).astype(np.int32)}
  resolutions = build_lib.data_views(config)
  if resolutions:
    out["views"] = tuple(rng.normal(size=(batch, r, r, 3)).astype(np.float32)
                         for r in resolutions)
  else:
    s = config.data.image_size
    out["image"] = rng.normal(size=(batch, s, s, 3)).astype(np.float32)
  return out


def synthetic_views(resolutions: Sequence[int], n: int, seed: int = 0) -> tuple:
  """Views of the same random images at each resolution (on device)."""
  top = max(resolutions)
  base = jax.random.normal(jax.random.key(seed), (n, top, top, 3), jnp.float32)
  return tuple(base if r == top else
               jax.image.resize(base, (n, r, r, 3), "linear", antialias=True)
               for r in resolutions)


# ----------------------------------------------------------------------------
# 2. Training


def build_train(config):
  """(model, state, jitted step, device batch, mesh) exactly as the trainer builds them."""
  trainer = build_lib.build(config, total_steps=SCHEDULE_STEPS)
  batch = shd.global_batch(synthetic_batch(config, config.batch_size), trainer.mesh)
  return (trainer.model, trainer.init_state(), trainer.train_step, batch, trainer.mesh,
          trainer.loss_fn)


def train(config, *, steps_per_rep: int, reps: int, warmup: int,
          peak_flops: Optional[float], breakdown: bool = False) -> dict:
  """images/s, XLA FLOP/s and fraction of peak of the jitted train step."""
  start = time.perf_counter()
  model, state, step, batch, mesh, loss_fn = build_train(config)
  setup_s = time.perf_counter() - start
  start = time.perf_counter()
  lowered = step.lower(state, batch, None)
  trace_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  # XLA counts one device's share of a sharded step: scale to the whole step.
  n_dev = int(mesh.devices.size)
  flops = cost_flops(compiled)
  flops = flops * n_dev if flops else None
  params = param_count(state.params)

  start = time.perf_counter()
  state, metrics = compiled(state, batch, None)
  jax.block_until_ready((state, metrics))
  first_run_s = time.perf_counter() - start
  holder = {"state": state, "metrics": metrics}

  def rep():
    s, m = holder["state"], None
    for _ in range(steps_per_rep):
      s, m = compiled(s, batch, None)
    jax.block_until_ready((s, m))
    holder["state"], holder["metrics"] = s, m

  t = common.repeat(rep, reps=reps, warmup=warmup)
  loss = float(holder["metrics"]["loss"])
  if not np.isfinite(loss):
    raise FloatingPointError(f"benchmark train step produced a non-finite loss ({loss})")
  b = config.batch_size
  per_step_s = t["median_s"] / steps_per_rep
  macs = models.exit_macs(config.model)[-1]  # forward MACs per image, all branches
  analytic = 6.0 * macs * b                  # forward 2x + backward 4x MACs
  # Accelerators: each device has its own peak. CPU devices made with
  # --xla_force_host_platform_device_count share the host's cores, whose peak
  # the single-device matmul already measures.
  peak_total = (peak_flops * (1 if jax.default_backend() == "cpu" else n_dev)
                if peak_flops else None)
  out = {
      "batch": b, "params": params, "devices": n_dev,
      "setup_s": setup_s, "trace_s": trace_s, "compile_s": compile_s,
      "first_step_compile_s": trace_s + compile_s, "first_step_run_s": first_run_s,
      "timing": t, "steps_per_rep": steps_per_rep, "step_s": per_step_s,
      "images_per_s": b / per_step_s,
      "xla_flops_per_step": flops, "analytic_flops_per_step": analytic,
      "xla_over_analytic_flops": flops / analytic if flops else None,
      "flops_per_s": flops / per_step_s if flops else None,
      "fraction_of_peak": (flops / per_step_s / peak_total
                           if flops and peak_total else None),
      "memory_analysis": memory_analysis(compiled), "final_loss": loss,
  }
  if breakdown:
    out["breakdown"] = _train_breakdown(model, holder["state"], batch, loss_fn, config,
                                        per_step_s, reps=reps, warmup=warmup)
  return out


def _train_breakdown(model, state, batch, loss_fn, config, step_s, *, reps, warmup):
  """Where a step's time goes: forward, forward+backward, the rest (optimizer, norms)."""
  inputs = models.inputs_from_batch(config.model, batch)
  rng = jax.random.key(0)

  def forward(params):
    logits, _ = model.apply({"params": params}, inputs, train=True, rngs={"dropout": rng})
    return loss_fn(models.as_exits(logits), batch["label"])[0]

  out = {}
  for name, fn in (("forward", forward), ("forward_backward", jax.value_and_grad(forward))):
    compiled = jax.jit(fn).lower(state.params).compile()
    t = common.repeat(lambda: jax.block_until_ready(compiled(state.params)),
                      reps=reps, warmup=warmup)
    out[name] = {"s": t["median_s"], "xla_flops": cost_flops(compiled),
                 "share_of_step": t["median_s"] / step_s}
  out["backward_s"] = out["forward_backward"]["s"] - out["forward"]["s"]
  out["rest_s"] = step_s - out["forward_backward"]["s"]
  out["rest_share_of_step"] = out["rest_s"] / step_s
  out["note"] = ("rest = optimizer update, gradient clipping, norms and metrics "
                 "(step time minus forward+backward)")
  return out


def train_memory(config, steps_count: int) -> dict:
  """Peak RSS of training (run in a child process, one measurement per process)."""
  base = common.peak_rss_bytes()
  _, state, step, batch, _, _ = build_train(config)
  compiled = step.lower(state, batch, None).compile()
  for _ in range(max(1, steps_count)):
    state, metrics = compiled(state, batch, None)
  jax.block_until_ready((state, metrics))
  return dict(common.peak_rss_bytes(), steps=steps_count, batch=config.batch_size,
              rss_after_import_bytes=base["rss_now_bytes"],
              peak_after_import_bytes=base["peak_rss_bytes"],
              device_peak_bytes=device_peak_memory(),
              memory_analysis=memory_analysis(compiled))


# ----------------------------------------------------------------------------
# 4. Inference


def _forward(model):
  return compiler.jit(lambda v, x: model.apply(v, x, train=False)[0])


def _throughput(fn, n: int, *, reps: int, warmup: int) -> dict:
  t = common.repeat(fn, reps=reps, warmup=warmup)
  return dict(t, batch=n, images_per_s=n / t["median_s"])


def _paired_speedup(base_fn, fn, *, reps: int) -> dict:
  """Median over `reps` rounds of time(base_fn) / time(fn), the two timed back to
  back in each round (order alternating), so the machine's drift between
  minutes cancels; two separate medians taken a minute apart do not."""
  ratios = []
  for i in range(max(1, reps)):
    times = {}
    for name, f in ((("base", base_fn), ("other", fn)) if i % 2 == 0
                    else (("other", fn), ("base", base_fn))):
      start = time.perf_counter()
      f()
      times[name] = time.perf_counter() - start
    ratios.append(times["base"] / times["other"])
  return {"median": float(np.median(ratios)), "ratios": [float(r) for r in ratios]}


def _latency(fn, singles: Sequence[Any], *, reps: int) -> dict:
  for x in singles:  # warm-up: compiles every program batch 1 needs
    fn(x)
  times = []
  for _ in range(max(1, reps)):
    for x in singles:
      start = time.perf_counter()
      fn(x)
      times.append(time.perf_counter() - start)
  t = common.summarize(times)
  del t["times_s"]
  t["mean_s"] = float(np.mean(times))
  t["batch"] = 1
  return t


def synthetic_variables(model, inputs, seed: int = 0):
  """Random variables (params, and batch_stats if the model has them) whose
  classifier kernels are not small: zero or tiny heads give every image about
  the same entropy, so no threshold could split them. `inputs`: a batch of the
  model's input (a tuple of views for RAViT)."""
  first2 = (tuple(v[:2] for v in inputs) if isinstance(inputs, (tuple, list))
            else inputs[:2])
  variables = jax.jit(model.init)(jax.random.key(seed), first2)
  key = jax.random.key(seed + 1)

  def fix(path, x):
    name = jax.tree_util.keystr(path)
    if ("head" in name or "dense" in name) and "kernel" in name:
      return 2.0 * jax.random.normal(jax.random.fold_in(key, x.shape[0]), x.shape,
                                     x.dtype) / np.sqrt(x.shape[0])
    return x
  return dict(variables, params=jax.tree_util.tree_map_with_path(fix, variables["params"]))


def synthetic_ravit_variables(model, views, seed: int = 0):
  return synthetic_variables(model, views, seed)


def _threshold_for_fraction(scores: np.ndarray, q: float) -> float:
  """Entropy threshold at which a fraction ~q of `scores` exits (strict <)."""
  s = np.sort(np.asarray(scores, np.float64))
  k = int(round(q * len(s)))
  if k <= 0 or len(s) == 0:
    return 0.0
  if k >= len(s):
    return float(s[-1] + 1.0)
  return float(0.5 * (s[k - 1] + s[k]))


def synthetic_operating_points(exit_logits: np.ndarray, fractions: Sequence[float]) -> list:
  """Entropy thresholds giving first-exit fractions `fractions` on these logits;
  for 3+ exits, each later exit takes the same fraction of those still there."""
  points = []
  num_exits = exit_logits.shape[0]
  ent = np.asarray(early_exit.softmax_entropy(jnp.asarray(exit_logits)))
  for q in fractions:
    remaining = np.ones(exit_logits.shape[1], bool)
    thresholds = []
    for e in range(num_exits - 1):
      t = _threshold_for_fraction(ent[e][remaining], q)
      thresholds.append(t)
      remaining &= ~(ent[e] < t)
    points.append({"label": f"synthetic: {round(100 * q)}% at the first exit",
                   "target_first_exit_fraction": q, "thresholds": thresholds})
  return points


def budget_operating_point(exit_logits: np.ndarray, exit_macs: Sequence[float],
                           target_macs: float) -> dict:
  """Entropy thresholds whose mean MACs on these logits come closest to
  `target_macs` from below: every early exit takes the same fraction q of the
  examples still there (`synthetic_operating_points`), q found by bisection."""
  macs = np.asarray(exit_macs, np.float64)
  ent = np.asarray(early_exit.softmax_entropy(jnp.asarray(exit_logits)))

  def mean_macs(q):
    t = synthetic_operating_points(exit_logits, [q])[0]["thresholds"]
    idx = np.asarray(early_exit.exit_policy(exit_logits, t)) if len(t) else np.zeros(
        ent.shape[1], np.int32)
    return float(macs[idx].mean()), t

  lo, hi = 0.0, 1.0  # mean MACs fall as q rises
  for _ in range(30):
    mid = 0.5 * (lo + hi)
    if mean_macs(mid)[0] <= target_macs:
      hi = mid
    else:
      lo = mid
  m, t = mean_macs(hi)
  return {"label": f"synthetic: mean MACs <= {target_macs / 1e6:.2f} M", "thresholds": t,
          "mean_macs_on_calibration_images": m}


def calibrated_operating_points(report_path: str, num_exits: int, limit: int = 3) -> list:
  """Calibrated points (thresholds chosen on val) from a launch.evaluate report.json."""
  with open(report_path) as f:
    doc = json.load(f)
  reports = doc.get("reports", {})
  points = []
  for name, rep in reports.items():
    if rep.get("num_exits") != num_exits:
      continue
    for p in rep.get("calibrated", []):
      if p.get("thresholds") is None or p.get("error"):
        continue
      points.append({"label": f"calibrated ({name}): {p['target']}",
                     "thresholds": [float(t) for t in p["thresholds"]],
                     "report_test_accuracy": p.get("test_accuracy"),
                     "report_test_exit_fractions": p.get("test_exit_fractions")})
  if not points:
    raise ValueError(f"{report_path} has no calibrated thresholds for a {num_exits}-exit "
                     "model; rerun python -m launch.evaluate ... --out")
  return points[:limit]


def real_test_views(config, n: int) -> tuple[tuple, np.ndarray]:
  """The first n test images of `config.data` as views (numpy), and their labels."""
  from adaptive_vision import data as data_lib
  it = data_lib.make_eval_iterator(config.data, "test", global_batch_size=n,
                                   views=build_lib.data_views(config))
  batch = next(iter(it))
  views = batch["views"] if "views" in batch else (batch["image"],)
  return tuple(np.asarray(v) for v in views), np.asarray(batch["label"])


def inference(vit_config, ravit_config, *, batch: int, latency_images: int, reps: int,
              warmup: int, buckets, fractions: Sequence[float],
              peak_flops: Optional[float], vit_variables=None, ravit_variables=None,
              views=None, labels=None, operating_points=None) -> dict:
  """ViT baseline vs RAViT with dynamic early exits, at `batch` and at batch 1.

  `views`: the RAViT's views (lowest resolution first) of `batch` images;
  synthetic if None. The ViT baseline sees the view at its own resolution.
  """
  vit = models.build(vit_config.model)
  ravit = models.build(ravit_config.model)
  resolutions = tuple(ravit.resolutions)
  synthetic = views is None
  if synthetic:
    views = synthetic_views(resolutions, batch)
  views = tuple(jnp.asarray(v) for v in views)
  vit_size = int(vit_config.model.image_size)
  vit_images = (views[resolutions.index(vit_size)] if vit_size in resolutions
                else jax.random.normal(jax.random.key(1), (batch, vit_size, vit_size, 3)))
  n_single = min(latency_images, batch)
  vit_singles = [vit_images[i:i + 1] for i in range(n_single)]
  ravit_singles = [tuple(v[i:i + 1] for v in views) for i in range(n_single)]

  out: dict[str, Any] = {"batch": batch, "data": "synthetic" if synthetic else "real test images",
                         "params": "random" if ravit_variables is None else "trained checkpoint"}

  # -- ViT baseline
  if vit_variables is None:
    vit_variables = jax.jit(vit.init)(jax.random.key(0), vit_images[:2])
  vit_fwd = _forward(vit)
  compiled = vit_fwd.lower(vit_variables, vit_images).compile()
  vit_flops = cost_flops(compiled)
  base = _throughput(lambda: jax.block_until_ready(compiled(vit_variables, vit_images)), batch,
                     reps=reps, warmup=warmup)
  base["xla_flops_per_image"] = vit_flops / batch if vit_flops else None
  base["fraction_of_peak"] = (vit_flops / base["median_s"] / peak_flops
                              if vit_flops and peak_flops else None)
  vit_macs = models.exit_macs(vit_config.model)[-1]
  base["macs_per_image"] = vit_macs
  # Batch 1 as `SingleDispatchCascade` runs it: weights compiled in, answer fetched.
  host_vit = jax.device_get(vit_variables)
  vit_single = compiler.jit(lambda x: vit.apply(host_vit, x, train=False)[0])
  base["latency"] = _latency(lambda x: jax.device_get(vit_single(x)), vit_singles, reps=reps)
  out["vit"] = base
  common.log(f"  inference ViT: {base['images_per_s']:.0f} img/s at batch {batch}, "
             f"latency {1e3 * base['latency']['median_s']:.2f} ms at batch 1")

  # -- RAViT: every branch on every image (static)
  if ravit_variables is None:
    ravit_variables = synthetic_ravit_variables(ravit, views)
  ravit_macs = [float(m) for m in models.exit_macs(ravit_config.model)]
  ravit_fwd = _forward(ravit)
  compiled_r = ravit_fwd.lower(ravit_variables, views).compile()
  static = _throughput(lambda: jax.block_until_ready(compiled_r(ravit_variables, views)),
                       batch, reps=reps, warmup=warmup)
  static["macs_per_image"] = ravit_macs[-1]
  static["speedup_vs_vit"] = base["median_s"] / static["median_s"]
  static["predicted_speedup"] = vit_macs / ravit_macs[-1]
  out["ravit_static"] = static
  exit_logits = np.stack([np.asarray(x, np.float32)
                          for x in compiled_r(ravit_variables, views)])

  # -- RAViT: dynamic early exits at each operating point
  if operating_points is None:
    operating_points = synthetic_operating_points(exit_logits, fractions)
  cascade = DynamicCascade(ravit, ravit_variables, operating_points[0]["thresholds"],
                           buckets=buckets)
  single = SingleDispatchCascade(ravit, ravit_variables, operating_points[0]["thresholds"])
  points = []
  for op in operating_points:
    cascade.thresholds = op["thresholds"]
    res = cascade.predict(views)  # compiles this point's buckets
    t = _throughput(lambda: cascade.predict(views), batch, reps=reps, warmup=warmup)
    num_exits = len(ravit_macs)
    fractions_measured = np.bincount(res["exit_index"], minlength=num_exits) / batch
    mean_macs = float(fractions_measured @ np.asarray(ravit_macs))
    predicted = vit_macs / mean_macs
    paired = _paired_speedup(lambda: jax.block_until_ready(compiled(vit_variables, vit_images)),
                             lambda: cascade.predict(views), reps=2 * reps)
    measured = paired["median"]
    point = dict(op, exit_fractions=fractions_measured.tolist(), mean_macs=mean_macs,
                 counts=res["counts"].tolist(), padded_counts=res["padded_counts"].tolist(),
                 timing=t, images_per_s=t["images_per_s"], predicted_speedup=predicted,
                 measured_speedup=measured, paired_speedups=paired["ratios"],
                 unpaired_speedup=base["median_s"] / t["median_s"],
                 realized_over_predicted=measured / predicted)
    if labels is not None:
      point["accuracy"] = float(np.mean(res["predictions"] == labels))
    # batch 1: each image alone, one program per call; exits differ per image
    single.thresholds = op["thresholds"]
    lat = _latency(single.predict, ravit_singles, reps=reps)
    single_exits = np.array([int(single.predict(x)["exit_index"][0]) for x in ravit_singles])
    single_macs = float(np.mean(np.asarray(ravit_macs)[single_exits]))
    lat["exit_fractions"] = (np.bincount(single_exits, minlength=num_exits)
                             / len(single_exits)).tolist()
    lat["predicted_speedup"] = vit_macs / single_macs
    lat["measured_speedup"] = base["latency"]["mean_s"] / lat["mean_s"]
    lat["realized_over_predicted"] = lat["measured_speedup"] / lat["predicted_speedup"]
    point["latency"] = lat
    points.append(point)
    common.log(f"  dynamic RAViT [{op['label']}]: exits {np.round(fractions_measured, 3).tolist()}, "
               f"{t['images_per_s']:.0f} img/s, speedup {measured:.2f}x measured vs "
               f"{predicted:.2f}x predicted ({100 * measured / predicted:.0f}%)")
  out["ravit_dynamic"] = points
  out["buckets"] = [int(b) for b in cascade.bucket_sizes(batch)]
  out["programs_compiled"] = int(cascade.num_compiled)
  out["exit_macs"] = ravit_macs
  out["vit_macs"] = vit_macs
  return out

"""Sections `latency` and `batched`: the published early-exit models on real test images.

The models are the parameter files in results/params/ (configs/benchmarks.py:
the ViT, RAViT, the ERDE student), their thresholds those the files store per
MACs budget (calibrated on validation); the images are the first CIFAR-10
test images through the eval pipeline. The process is set up as
`launch.predict`'s ('serve': synchronous dispatch, one device, the launchers'
default). Every baseline runs under both compile-option sets, the library's
('_lib', `backend.choose(workload='serve')`) and XLA's defaults ('_xla'), and
the faster is the baseline; the cascades run under both too, so the serve
options can be chosen by measurement (adaptive_vision/cpu/compiler.py).

latency   one image per call, fetched: the ViT's and the student's final exit
          as one program (weights compiled in) against `SingleDispatchCascade`
          (RAViT, the student) at the `budget` thresholds, as launch.predict
          runs them.
batched   batches of 256, 1000 and 1024 (numpy in, answers fetched): the
          baseline, the cascade with no early exit (every exit on every image,
          one program) and `DynamicCascade` at each budget.

realized / predicted = measured speed-up / (baseline MACs / mean MACs of the
exits the images took); `padded_mean_macs` counts the rows the buckets pad.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from benchmarks import common

FAMILIES = (("ravit", "vit"), ("student", "student"))  # (cascade, baseline model)


def _setup(cfg):
  """The serve process, and per model: (config, variables, meta, module, MACs, backends)."""
  from adaptive_vision import backend
  backend.prepare_process("serve")
  import ml_collections
  from adaptive_vision import export, models
  from configs import vit_cifar10
  lib = backend.choose(workload="serve")
  backends = {"lib": lib}
  if lib.platform == "cpu":
    from adaptive_vision.cpu import compiler
    backends["xla"] = dataclasses.replace(
        lib, compiler_options=tuple(sorted(compiler.XLA_DEFAULT_CPU_OPTIONS.items())))
  out = {}
  for name in ("vit", "ravit", "student"):
    path = cfg.params[name]
    config = vit_cifar10.get_config()  # the CIFAR-10 eval data; the model is the file's
    config.model = ml_collections.ConfigDict(export.read(path)[1]["model"])
    variables, meta = export.load(path, config)
    out[name] = dict(config=config, variables=variables, meta=meta, path=path,
                     model=models.build(config.model, layers=lib.layers),
                     macs=[float(m) for m in models.exit_macs(config.model)])
  return out, backends


def _test_inputs(m: dict, n: int):
  """The first n test images as the model reads them (numpy; RAViT: views)."""
  from adaptive_vision import data, models
  c = m["config"]
  views = models.data_views(c.data.image_size, c.model)
  batch = next(iter(data.make_eval_iterator(c.data, "test", global_batch_size=n, views=views)))
  return models.inputs_from_batch(c.model, batch)


def _thresholds(m: dict, budget: float):
  from adaptive_vision import export
  thresholds, criterion, _ = export.thresholds_for(m["meta"], len(m["macs"]), budget=budget,
                                                   path=m["path"])
  return thresholds, criterion


def _final_exit(m: dict, be, embed: bool):
  """The model's last exit as one program (XLA drops the early heads), fetched."""
  import jax
  model = m["model"]
  if embed:  # weights as constants, as SingleDispatchCascade compiles them
    v = jax.device_get(m["variables"])
    run = be.jit(lambda x: model.apply(v, x)[0][-1])
    return lambda x: np.asarray(run(x))
  run = be.jit(lambda v, x: model.apply(v, x)[0][-1])
  return lambda x: np.asarray(run(m["variables"], x))


def _compare(times: dict, base: str, variant: str, predicted: float) -> dict:
  s = common.speedup(times, base, variant)
  return dict(s, predicted=predicted, realized_over_predicted=s["median"] / predicted,
              what=f"{variant} over {base}")


def _best(variants: dict, names, key: str) -> str:
  """The baseline at its best: the faster of its compilations."""
  return min(names, key=lambda n: variants[n][key])


def _fractions(exits, num_exits: int) -> str:
  f = np.bincount(exits, minlength=num_exits) / len(exits)
  return "/".join(f"{100 * x:.0f}" for x in f) + "%"


def latency(cfg) -> dict:
  from adaptive_vision import early_exit
  from adaptive_vision.inference import SingleDispatchCascade
  c = cfg.latency
  models_, backends = _setup(cfg)
  singles = {}
  for name in ("vit", "ravit", "student"):
    x = _test_inputs(models_[name], c.images)
    singles[name] = [tuple(v[i:i + 1] for v in x) if isinstance(x, tuple) else x[i:i + 1]
                     for i in range(c.images)]
  calls, variants = {}, {}
  for cascade, base in FAMILIES:
    m = models_[cascade]
    thresholds, criterion = _thresholds(m, c.budget)
    for opt, be in backends.items():
      calls[f"{base}_final_{opt}"] = (_final_exit(models_[base], be, embed=True), base)
      calls[f"{cascade}_{opt}"] = (SingleDispatchCascade(
          m["model"], m["variables"], thresholds, criterion, backend=be).predict, cascade)
    # The profile: the same executor with every image sent to exit k, for each k.
    for k in range(len(m["macs"])):
      pinned = early_exit.thresholds_at_exit(k, len(m["macs"]), criterion,
                                             m["config"].model.num_classes)
      calls[f"{cascade}_at_exit{k}_lib"] = (SingleDispatchCascade(
          m["model"], m["variables"], pinned, criterion, backend=backends["lib"]).predict, cascade)
  for name, (fn, model) in calls.items():
    start = time.perf_counter()
    outs = [fn(x) for x in singles[model]]  # compiles what batch 1 needs
    macs = models_[model]["macs"]
    if isinstance(outs[0], dict):
      exits = np.array([int(o["exit_index"][0]) for o in outs])
      variants[name] = {"mean_macs": float(np.mean(np.asarray(macs)[exits])),
                        "exits_taken": _fractions(exits, len(macs)),
                        "exit_fractions": (np.bincount(exits, minlength=len(macs))
                                           / len(exits)).tolist()}
    else:
      variants[name] = {"mean_macs": macs[-1]}
    common.log(f"{name}: first pass {time.perf_counter() - start:.1f} s")

  def run(name: str) -> float:
    fn, model = calls[name]
    start = time.perf_counter()
    for x in singles[model]:
      fn(x)
    return (time.perf_counter() - start) / c.images

  times = common.rounds(list(calls), run, c.rounds)
  for name, t in common.medians(times).items():
    variants[name]["ms_per_image"] = 1e3 * t
  comparisons, figures = {}, {}
  for cascade, base in FAMILIES:
    best = _best(variants, [f"{base}_final_{o}" for o in backends], "ms_per_image")
    for opt in backends:
      name = f"{cascade}_{opt}"
      comparisons[f"{name}_vs_{base}_final"] = _compare(
          times, best, name, variants[best]["mean_macs"] / variants[name]["mean_macs"])
    figures[f"{cascade}_batch1_realized_over_predicted"] = \
        comparisons[f"{cascade}_lib_vs_{base}_final"]["realized_over_predicted"]
    figures[f"{cascade}_best_baseline"] = best
    # Where the time goes: each exit's time (every image sent there) against the
    # baseline's, beside its MAC share; and the executor against the time the
    # per-exit times predict at the exit fractions it took.
    macs = models_[cascade]["macs"]
    at = [variants[f"{cascade}_at_exit{k}_lib"]["ms_per_image"] for k in range(len(macs))]
    for k, t in enumerate(at):
      figures[f"{cascade}_exit{k}_time_share"] = t / variants[best]["ms_per_image"]
      figures[f"{cascade}_exit{k}_mac_share"] = macs[k] / variants[best]["mean_macs"]
    fractions = variants[f"{cascade}_lib"]["exit_fractions"]
    figures[f"{cascade}_time_predicted_over_measured"] = float(
        np.dot(fractions, at) / variants[f"{cascade}_lib"]["ms_per_image"])
  if "xla" in backends:  # how the options compare, per program
    for name in ("vit_final", "ravit", "student_final", "student"):
      comparisons[f"{name}_xla_vs_lib"] = dict(common.speedup(times, f"{name}_lib", f"{name}_xla"),
                                               what="XLA's default options over the library's")
  figures["early_exit_batch1_realized_over_predicted"] = min(
      figures[f"{cascade}_batch1_realized_over_predicted"] for cascade, _ in FAMILIES)
  options = {o: dict(be.compiler_options or ()) for o, be in backends.items()}
  return {"settings": dict(c.to_dict(), params=cfg.params.to_dict(),
                           backend=backends["lib"].describe(), options=options),
          "variants": variants, "comparisons": comparisons, "figures": figures,
          "notes": ["_lib: the library's serve options (what launch.predict runs), _xla: XLA's "
                    "default CPU options; each realized / predicted is against the faster "
                    "baseline (`*_best_baseline`)",
                    f"budget {c.budget}: the thresholds stored in each params file",
                    "*_at_exit<k>_lib: every image sent to exit k (the profile); figures "
                    "*_exit<k>_time_share / *_exit<k>_mac_share: that time and those MACs over "
                    "the best baseline's; *_time_predicted_over_measured: the per-exit times "
                    "weighted by the exit fractions taken, over the cascade's measured time"]}


def batched(cfg) -> dict:
  from adaptive_vision.inference import DynamicCascade
  c = cfg.batched
  models_, backends = _setup(cfg)
  lib = backends["lib"]
  variants, comparisons, realized, no_exit = {}, {}, [], []
  for cascade, base in FAMILIES:
    m, b = models_[cascade], models_[base]
    for n in c.batches:
      x, xb = _test_inputs(m, n), _test_inputs(b, n)
      g = f"{cascade}_n{n}"
      all_exits = lib.jit(lambda v, x, model=m["model"]: model.apply(v, x)[0])
      calls = {f"{g}_{base}_final_{o}": (_final_exit(b, be, embed=False), xb)
               for o, be in backends.items()}
      calls[f"{g}_no_exit"] = (lambda x: [np.asarray(e) for e in all_exits(m["variables"], x)], x)
      for budget in c.budgets:
        dyn = DynamicCascade(m["model"], m["variables"], *_thresholds(m, budget), backend=lib)
        calls[f"{g}_dynamic{budget:g}"] = (dyn.predict, x)
      for name, (fn, inputs) in calls.items():
        out = fn(inputs)  # compiles
        variants[name] = {"mean_macs": m["macs"][-1] if name.endswith("no_exit") else b["macs"][-1]}
        if isinstance(out, dict):
          e = out["exit_index"]
          seg = np.diff(np.concatenate([[0.0], m["macs"]]))
          variants[name] = {"mean_macs": float(np.mean(np.asarray(m["macs"])[e])),
                            "padded_mean_macs": float(out["padded_counts"] @ seg / n),
                            "exits_taken": _fractions(e, len(m["macs"])),
                            "counts": out["counts"].tolist(),
                            "padded_counts": out["padded_counts"].tolist()}

      def run(name: str) -> float:
        fn, inputs = calls[name]
        start = time.perf_counter()
        fn(inputs)
        return time.perf_counter() - start

      common.log(f"{g}: {len(calls)} variants compiled")
      times = common.rounds(list(calls), run, c.rounds)
      for name, t in common.medians(times).items():
        variants[name].update(ms_per_batch=1e3 * t, images_per_s=n / t)
      best = _best(variants, [f"{g}_{base}_final_{o}" for o in backends], "ms_per_batch")
      for budget in c.budgets:
        name = f"{g}_dynamic{budget:g}"
        pred = variants[best]["mean_macs"] / variants[name]["mean_macs"]
        comparisons[f"{name}_vs_{base}_final"] = _compare(times, best, name, pred)
        comparisons[f"{name}_vs_no_exit"] = _compare(
            times, f"{g}_no_exit", name, m["macs"][-1] / variants[name]["mean_macs"])
        realized.append(comparisons[f"{name}_vs_{base}_final"]["realized_over_predicted"])
        no_exit.append(comparisons[f"{name}_vs_no_exit"]["median"])
      comparisons[f"{g}_no_exit_vs_{base}_final"] = _compare(
          times, best, f"{g}_no_exit", variants[best]["mean_macs"] / m["macs"][-1])
  return {"settings": dict(c.to_dict(), params=cfg.params.to_dict(), backend=lib.describe(),
                           devices=1),
          "variants": variants, "comparisons": comparisons,
          "figures": {"batched_realized_over_predicted": min(realized),
                      "batched_dynamic_over_no_exit": min(no_exit)},
          "notes": ["one CPU device: the launchers' default (launch.train --cpu_devices=0; "
                    "launch.evaluate and launch.predict run on one device)",
                    "baseline: the faster of its _lib / _xla compilations, per batch size; "
                    "counts / padded_counts: rows each segment ran on, before / after the "
                    "buckets' padding"]}

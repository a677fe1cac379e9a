"""Targets and the Markdown table of a benchmark result (pure functions of the dict)."""

from __future__ import annotations

from typing import Optional

from benchmarks.common import get_path

# The targets on the 2-core CPU (cifar suite).
TARGETS = (
    ("train_fraction_of_peak", 0.60, "training FLOP/s >= 60% of the measured matmul peak"),
    ("train_speedup_vs_torch_eager", 1.2, "training images/s >= 1.2x PyTorch eager"),
    ("train_speedup_vs_torch_compile", 1.0, "training images/s >= torch.compile"),
    ("early_exit_realized_over_predicted", 0.85,
     "dynamic early exits realize >= 85% of the MAC-predicted speedup (worst point, batch >= 128)"),
    ("early_exit_batch1_realized_over_predicted", 0.80,
     "at batch 1 the early exits realize >= 80% of the MAC-predicted speedup at the "
     "55%-MACs point (worst of RAViT vs ViT and ERDE student vs its final exit)"),
    ("resnet_train_speedup_vs_torch_eager", 1.0,
     "ERDE teacher (ResNet-20) train step images/s >= PyTorch eager (paired, benchmarks.run cnn)"),
    ("train_loop_over_bare_step", 0.90,
     "launch.train's whole loop >= 90% of the bare train step's images/s (paired, "
     "benchmarks.run loop)"),
)


def targets(result: dict) -> list[dict]:
  """The issue's targets, judged for the full cifar suite (they are set for it)."""
  quick = bool(result.get("suite", {}).get("quick"))
  other_suite = result.get("suite", {}).get("name") != "cifar"
  out = []
  for key, goal, text in TARGETS:
    value = result.get(key)
    met: Optional[bool] = None if value is None else bool(value >= goal)
    extra = ""
    if key == "early_exit_realized_over_predicted" and value is not None:
      batch = result.get("early_exit_batch") or 0
      if batch < 128:
        met, extra = None, f" (batch {batch} < 128: not judged)"
    if key == "early_exit_batch1_realized_over_predicted" and get_path(result, "latency", "quick"):
      met, extra = None, " (--quick: not judged)"
    if key == "resnet_train_speedup_vs_torch_eager" and get_path(result, "cnn", "quick"):
      met, extra = None, " (--quick: not judged)"
    if key == "train_loop_over_bare_step" and get_path(result, "train_loop", "train_size"):
      met, extra = None, " (--train-size: not judged)"
    if quick:
      met, extra = None, " (--quick: not judged)"
    elif other_suite:
      met, extra = None, " (the targets are set for the cifar suite: not judged)"
    if value is None:
      reason = _why_missing(result, key)
      summary = f"not measured{': ' + reason if reason else ''}"
    else:
      summary = f"{value:.3f} vs {goal:g}: " + {True: "MET", False: "MISSED",
                                                None: "not judged"}[met] + extra
    out.append({"name": key, "description": text, "value": value, "goal": goal,
                "met": met, "summary": summary})
  return out


# Targets that a paired subcommand measures and writes in with --update.
_BY_SUBCOMMAND = {"resnet_train_speedup_vs_torch_eager": "cnn",
                  "train_loop_over_bare_step": "loop"}


def _why_missing(result: dict, key: str) -> str:
  if key in _BY_SUBCOMMAND:
    return f"`python -m benchmarks.run {_BY_SUBCOMMAND[key]} --update <this file>` measures it"
  torch = result.get("torch") or {}
  if key == "train_speedup_vs_torch_compile":
    return str(torch.get("compile_error") or "")[:200]
  if key == "train_speedup_vs_torch_eager":
    return str(torch.get("eager_error") or "")[:200]
  return ""


def _f(x, fmt="{:.1f}", scale=1.0, none="—"):
  return none if x is None else fmt.format(x * scale)


def _machine_words(m: Optional[dict]) -> str:
  if not m:
    return ""
  return (f" Machine: {m.get('cpu_model')} (family {m.get('cpu_family')}, "
          f"{m.get('cpu_vector_extension')}), {m.get('cpu_count')} cores.")


def rewrite(path: str, result: dict) -> None:
  """Judges the targets again, writes `result` to `path` (JSON) and its
  Markdown beside it (same name, .md): what every `--update` does."""
  import os
  from benchmarks import common
  result["targets"] = targets(result)
  common.write_json(result, path)
  with open(os.path.splitext(path)[0] + ".md", "w") as f:
    f.write(markdown(result))


def markdown(r: dict) -> str:
  m, s = r.get("machine", {}), r.get("suite", {})
  lines = [f"# Benchmark: {s.get('name')} suite{' (--quick)' if s.get('quick') else ''}", ""]
  lines.append(f"Machine: {m.get('cpu_model')}, {m.get('cpu_count')} cores, "
               f"{m.get('memory_gib')} GiB; {m.get('backend')} device "
               f"{m.get('device_kind')} x{m.get('device_count')}; jax {m.get('jax')}, "
               f"flax {m.get('flax')}, torch {m.get('torch')}; python {m.get('python')}. "
               f"Load average at start: {m.get('load_average_at_start')}.")
  if m.get("xla_flags"):
    lines.append(f"XLA_FLAGS: `{m['xla_flags']}`")
  lines += ["", f"Command: `{r.get('command')}`. Medians of {s.get('reps')} repetitions "
            f"after {s.get('warmup')} warm-up; compute dtype {s.get('compute_dtype')}.", ""]

  lines += ["## Targets", "", "| target | measured | goal | result |", "|---|---|---|---|"]
  for t in r.get("targets", []):
    lines.append(f"| {t['description']} | {_f(t['value'], '{:.3f}')} | {t['goal']:g} | "
                 f"{t['summary']} |")

  peak = r.get("peak")
  if peak:
    lines += ["", "## Peak (square matmuls through jax.jit)", "",
              "| dtype | size | GFLOP/s, fastest repetition | GFLOP/s, median |",
              "|---|---|---|---|"]
    for dt in ("float32", "bfloat16"):
      if peak.get(dt):
        for n, v in peak[dt]["sizes"].items():
          lines.append(f"| {dt} | {n} | {_f(v['flops_per_s'], scale=1e-9)} | "
                       f"{_f(v.get('median_flops_per_s'), scale=1e-9)} |")
    if peak.get("bfloat16_skipped"):
      lines.append(f"| bfloat16 | — | {peak['bfloat16_skipped']} | |")
    lines.append(f"\nPeak used for fractions: {peak.get('used_for_fractions')}.")

  train, torch = r.get("train") or {}, r.get("torch") or {}
  if train or torch:
    lines += ["", "## Training (jitted train step, synthetic batches on device)", "",
              "| model | devices | batch | params | images/s | step (ms) | XLA GFLOP/step | "
              f"GFLOP/s | % of {(peak or {}).get('used_for_fractions', '')} peak | "
              "compile / first step (s) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in train.items():
      lines.append(
          f"| {name} (ours) | {v.get('devices', 1)} | {v['batch']} | {v['params']:,} | "
          f"{_f(v['images_per_s'])} | "
          f"{_f(v['step_s'], scale=1e3)} | {_f(v['xla_flops_per_step'], '{:.3g}', 1e-9)} | "
          f"{_f(v['flops_per_s'], scale=1e-9)} | {_f(v['fraction_of_peak'], scale=100)} | "
          f"{_f(v['first_step_compile_s'])} |")
    for mode in ("eager", "compile"):
      v = torch.get(mode)
      if v:
        lines.append(f"| ViT, torch {mode} | {v.get('threads', '')} threads | "
                     f"{v['train']['batch']} | {v['params']:,} | "
                     f"{_f(v['train']['images_per_s'])} | "
                     f"{_f(v['train']['median_s'] / v['train']['steps_per_rep'], scale=1e3)} | "
                     f"— | — | — | {_f(v['first_step_s'])} |")
      elif torch.get(f"{mode}_error"):
        lines.append(f"| ViT, torch {mode} | — | — | — | not run: "
                     f"{torch[f'{mode}_error'][:160]} | | | | | |")
    sp = [f"ours / torch eager {_f(r.get('train_speedup_vs_torch_eager'), '{:.2f}x')}",
          f"ours / torch.compile {_f(r.get('train_speedup_vs_torch_compile'), '{:.2f}x')}"]
    lines.append("\nTraining speed-up: " + ", ".join(sp) + ".")
    bd = get_path(train, "vit", "breakdown") or get_path(train, "vit_one_device", "breakdown")
    if bd:
      lines.append(f"ViT step breakdown (one device): forward {_f(bd['forward']['s'], scale=1e3)} ms, "
                   f"backward {_f(bd['backward_s'], scale=1e3)} ms, optimizer and the rest "
                   f"{_f(bd['rest_s'], scale=1e3)} ms "
                   f"({_f(bd['rest_share_of_step'], scale=100)}% of the step).")

  inf = r.get("inference")
  if inf:
    lines += ["", f"## Inference ({inf['data']}, {inf['params']} params)", "",
              f"| model | exits taken | images/s at batch {inf['batch']} | latency batch 1 (ms) | "
              "speedup vs ViT | MAC-predicted | realized / predicted |",
              "|---|---|---|---|---|---|---|"]
    v = inf["vit"]
    lines.append(f"| ViT baseline | — | {_f(v['images_per_s'], '{:.0f}')} | "
                 f"{_f(v['latency']['median_s'], '{:.2f}', 1e3)} | 1.00 | 1.00 | — |")
    for mode in ("eager", "compile"):
      t = torch.get(mode)
      if t and t.get("inference"):
        lines.append(f"| ViT, torch {mode} | — | {_f(t['inference']['images_per_s'], '{:.0f}')}"
                     f" (batch {t['inference']['batch']}) | "
                     f"{_f(t['latency']['median_s'], '{:.2f}', 1e3)} | "
                     f"{_f(t['inference']['images_per_s'] / v['images_per_s'], '{:.2f}')} | — | — |")
    st = inf["ravit_static"]
    lines.append(f"| RAViT, all branches | — | {_f(st['images_per_s'], '{:.0f}')} | — | "
                 f"{_f(st['speedup_vs_vit'], '{:.2f}')} | {_f(st['predicted_speedup'], '{:.2f}')}"
                 f" | {_f(st['speedup_vs_vit'] / st['predicted_speedup'], '{:.2f}')} |")
    for p in inf.get("ravit_dynamic", []):
      fr = "/".join(f"{100 * x:.0f}" for x in p["exit_fractions"])
      acc = f", acc {100 * p['accuracy']:.2f}%" if p.get("accuracy") is not None else ""
      lines.append(f"| RAViT dynamic, {p['label']}{acc} | {fr}% | {_f(p['images_per_s'], '{:.0f}')}"
                   f" | {_f(p['latency']['median_s'], '{:.2f}', 1e3)} | "
                   f"{_f(p['measured_speedup'], '{:.2f}')} | {_f(p['predicted_speedup'], '{:.2f}')}"
                   f" | {_f(p['realized_over_predicted'], '{:.2f}')} |")
    lines.append(f"\nDynamic executor buckets at batch {inf['batch']}: {inf['buckets']}; "
                 f"{inf['programs_compiled']} programs compiled. Predicted speedup = ViT MACs / "
                 "mean RAViT MACs at the measured exit fractions; the measured speed-up of a "
                 "dynamic point is the median of paired rounds (ViT and RAViT timed back to "
                 "back), so the machine's drift cancels; batch-1 latencies are medians "
                 "over single images (speed-ups at batch 1 are in the JSON).")

  lat = r.get("latency")
  if lat:
    lines += ["", "## Batch-1 latency (one image per call, paired rounds)", "",
              f"Command: `{lat.get('command', r.get('command'))}`. {lat['images']} images per "
              f"round, {lat['rounds']} rounds, operating point: mean MACs <= "
              f"{100 * lat['budget']:g}% of the baseline's; the speed-up is the median over "
              "rounds of baseline time / variant time."
              + {"sync": " Dispatch: synchronous, each call on the calling thread, as "
                         "`launch.predict` serves.",
                 "async": " Dispatch: asynchronous (a training process's default)."}.get(
                     lat.get("dispatch"), "")
              + (f" Machine: {lat['machine'].get('cpu_model')}, {lat['machine'].get('cpu_count')} "
                 f"cores, load average at start {lat['machine'].get('load_average_at_start')}."
                 if lat.get("machine") else ""), "",
              "| variant | ms per image (median) | mean MMACs | exits taken |", "|---|---|---|---|"]
    for name, v in lat["variants"].items():
      fr = "/".join(f"{100 * x:.0f}" for x in v["exit_fractions"]) + "%" if v.get(
          "exit_fractions") else "—"
      lines.append(f"| {name} | {_f(v['median_s'], '{:.3f}', 1e3)} | "
                   f"{_f(v['mean_macs'], '{:.2f}', 1e-6)} | {fr} |")
    lines += ["", "| pair | measured | MAC-predicted | realized / predicted | "
              "same from CPU time | in headline |", "|---|---|---|---|---|---|"]
    for name, p in lat["pairs"].items():
      q1, q3 = p["quartiles"]
      lines.append(f"| {name} | {p['measured_speedup']:.2f}x [{q1:.2f}, {q3:.2f}] | "
                   f"{p['predicted_speedup']:.2f}x | {p['realized_over_predicted']:.2f} | "
                   f"{_f(p.get('cpu_time_realized_over_predicted'), '{:.2f}')} | "
                   f"{'yes' if p['in_headline'] else 'no'} |")
    for name, p in lat["pairs"].items():
      if p.get("time_predicted_speedup"):
        lines.append(f"\n{name}: the plain programs of the exits taken (`*_alone`) predict "
                     f"{p['time_predicted_speedup']:.2f}x from time; the executor reaches "
                     f"{p['measured_over_time_predicted']:.2f} of that.")
    lines += [""] + [f"- {n}" for n in lat.get("notes", [])]

  mem = r.get("memory")
  if mem:
    lines += ["", f"## Peak resident memory of training (batch {mem.get('batch')}, "
              "one process per measurement)", "",
              "| measurement | peak RSS (MiB) | RSS after imports (MiB) | difference (MiB) | "
              "device peak (MiB) |", "|---|---|---|---|---|"]
    for k, v in mem.items():
      if not isinstance(v, dict):
        continue
      if "error" in v:
        lines.append(f"| {k} | failed: {v['error'][:160]} | | | |")
        continue
      after = v.get("rss_after_import_bytes") or 0
      dev = v.get("device_peak_bytes") or v.get("gpu_peak_allocated_bytes")
      lines.append(f"| {k} | {v['peak_rss_bytes'] / 2 ** 20:.0f} | {after / 2 ** 20:.0f} | "
                   f"{(v['peak_rss_bytes'] - after) / 2 ** 20:.0f} | "
                   f"{_f(dev, '{:.0f}', 2 ** -20)} |")

  cnn = r.get("cnn")
  if cnn:
    lines += ["", "## CNN train steps against PyTorch eager (paired rounds)", "",
              f"Command: `{cnn.get('command')}`." + _machine_words(cnn.get("machine")), "",
              "| comparison | speed-up (median) | quartiles |", "|---|---|---|"]
    for name, p in cnn.get("paired_speedups", {}).items():
      q1, q3 = p["quartiles"]
      lines.append(f"| {name} | {p['median']:.3f}x | [{q1:.2f}, {q3:.2f}] |")
  loop = r.get("train_loop")
  if loop:
    q = loop["loop_over_bare"]
    lines += ["", "## Training loop against the bare step (paired rounds)", "",
              f"Command: `{loop.get('command')}`." + _machine_words(loop.get("machine")), "",
              f"Loop {loop['loop_images_per_s']:.1f} images/s, bare step "
              f"{loop['bare_images_per_s']:.1f} images/s: loop / bare **{q['median']:.3f}** "
              f"(quartiles {q['quartiles'][0]:.3f}-{q['quartiles'][1]:.3f}; ratio of the summed "
              f"times {q['summed_time_ratio']:.3f})."]

  secs = r.get("stage_seconds") or {}
  if secs:
    lines += ["", "Stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in secs.items()) + "."]
  if r.get("notes"):
    lines += ["", "Notes:", ""] + [f"- {n}" for n in r["notes"]]
  if r.get("errors"):
    lines += ["", "Errors:", ""] + [f"- {k}: {v}" for k, v in r["errors"].items()]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  # python -m benchmarks.report results/bench_cpu.json  -> rewrites results/bench_cpu.md
  import json
  import os
  import sys
  for path in sys.argv[1:]:
    with open(path) as f:
      result = json.load(f)
    md = os.path.splitext(path)[0] + ".md"
    with open(md, "w") as f:
      f.write(markdown(result))
    print(f"wrote {md}")

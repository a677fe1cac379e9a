r"""Where the train step's time goes: per-op times from a jax.profiler trace.

  python -m benchmarks.investigations.profile [--model vit|ravit] [--batch 128] [--steps 5]
      [--quick] [--top 20] [--out results/profile_vit.json] [--dump-hlo DIR]

Runs the suite's jitted train step (as benchmarks.run does) under
`jax.profiler.trace`, reads the trace back with `jax.profiler.ProfileData`
and sums, per step, the time of every XLA op (thunk) the CPU threads ran,
grouped three ways using the compiled HLO's metadata:

* kind: matmul (dot / convolution, or a fusion around one), copy/transpose,
  other fusions (elementwise, reductions), other ops;
* phase: forward (jvp), backward (transpose(jvp)), optimizer and the rest;
* layer: attn/qkv, attention core, attn/out, mlp/Dense_0, mlp/Dense_1,
  norms, embedding, head, loss, optimizer ...

"busy" sums the durations of the op events, each recorded once on the thread
that ran the op (an op whose work is split over the intra-op thread pool still
counts once), so busy close to the step's wall time means the ops run one
after another, and the step's wall time minus busy is dispatch and waiting.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import tempfile
import time
from typing import Any

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[^\s=]+)\s*=\s*(?P<shape>\(.*?\)|\S+)\s+"
                    r"(?P<op>[\w\-]+)\(")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OPNAME = re.compile(r'op_name="([^"]*)"')
_MATMUL_OPS = {"dot", "convolution"}
_COPY_OPS = {"copy", "transpose", "bitcast", "reshape", "broadcast"}

# (pattern in op_name, layer label); the first match wins.
_LAYERS = (
    (r"/attn/qkv", "attn/qkv"), (r"/attn/out", "attn/out"), (r"/attn/", "attention core"),
    (r"/mlp/Dense_0", "mlp/Dense_0"), (r"/mlp/Dense_1", "mlp/Dense_1"), (r"/mlp/", "mlp gelu"),
    (r"norm", "layer norms"), (r"/embedding", "patch embedding"), (r"/head", "head"),
    (r"reuse_", "RAViT reuse"), (r"pos_embedding|/cls|concatenate", "tokens"),
    (r"log_softmax|take_along_axis|cross|argmax|eq|mean", "loss / metrics"),
)


def parse_hlo(text: str) -> dict[str, dict]:
  """name -> {op, op_name, calls, computation}; computations -> list of opcodes."""
  instrs, comps, current = {}, collections.defaultdict(list), None
  for line in text.splitlines():
    m = _INSTR.match(line)
    if m:
      calls = _CALLS.search(line)
      opname = _OPNAME.search(line)
      instrs[m["name"]] = {"op": m["op"], "calls": calls.group(1) if calls else None,
                           "op_name": opname.group(1) if opname else "",
                           "computation": current}
      if current:
        comps[current].append(m["op"])
      continue
    c = _COMP.match(line)
    if c and "=" not in line.split("{")[0]:
      current = c["name"]
    elif line.strip() == "}":
      current = None
  for info in instrs.values():
    body = comps.get(info["calls"] or "", [])
    info["body_ops"] = sorted(set(body))
  return instrs


def classify(info: dict) -> str:
  op, body = info["op"], set(info.get("body_ops", ()))
  if op in _MATMUL_OPS or (op == "fusion" and body & _MATMUL_OPS):
    return "matmul"
  if op in _COPY_OPS or (op == "fusion" and body and body <= _COPY_OPS | {"parameter"}):
    return "copy/transpose"
  if op == "fusion":
    return "other fusion"
  return f"op: {op}"


def phase(op_name: str) -> str:
  if "transpose(jvp" in op_name:
    return "backward"
  if "jvp(" in op_name:
    return "forward"
  return "optimizer / rest"


def layer(op_name: str) -> str:
  for pattern, label in _LAYERS:
    if re.search(pattern, op_name):
      return label
  if phase(op_name) == "optimizer / rest":
    return "optimizer / norms / rest"
  return "other"


def profile_step(compiled, state, batch, *, steps: int) -> tuple[dict, Any]:
  """Runs `steps` steps under the profiler; returns (per-op ns summed, final state)."""
  import jax
  for _ in range(2):  # warm-up
    state, metrics = compiled(state, batch, None)
  jax.block_until_ready((state, metrics))
  logdir = tempfile.mkdtemp(prefix="av_profile_")
  start = time.perf_counter()
  with jax.profiler.trace(logdir):
    for _ in range(steps):
      state, metrics = compiled(state, batch, None)
    jax.block_until_ready((state, metrics))
  traced_s = time.perf_counter() - start
  files = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
  if not files:
    raise RuntimeError(f"the profiler wrote no trace under {logdir}")
  data = jax.profiler.ProfileData.from_file(files[0])
  per_op: dict[str, int] = collections.Counter()
  threads = set()
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        per_op[ev.name] += ev.duration_ns
        threads.add(line.name)
  return {"per_op_ns": dict(per_op), "traced_s": traced_s, "threads": sorted(threads)}, state


def analyze(compiled, per_op_ns: dict, steps: int, step_s: float, top: int) -> dict:
  hlo = parse_hlo(compiled.as_text())
  rows = []
  for name, ns in per_op_ns.items():
    info = hlo.get(name)
    if info is None:
      continue  # python frames, executor wrappers
    rows.append({"op": name, "ms_per_step": ns / steps / 1e6, "kind": classify(info),
                 "phase": phase(info["op_name"]), "layer": layer(info["op_name"]),
                 "hlo_op": info["op"], "source": info["op_name"][-120:]})
  busy = sum(r["ms_per_step"] for r in rows)
  out: dict[str, Any] = {"step_ms": 1e3 * step_s, "busy_ms_per_step": busy,
                         "ops_seen": len(rows)}
  for key in ("kind", "phase", "layer"):
    agg = collections.Counter()
    for r in rows:
      agg[r[key]] += r["ms_per_step"]
    out[f"by_{key}"] = {k: {"ms": v, "share": v / busy if busy else None}
                        for k, v in agg.most_common()}
  out["top_ops"] = sorted(rows, key=lambda r: -r["ms_per_step"])[:top]
  return out


def _print(result: dict) -> None:
  print(f"step {result['step_ms']:.2f} ms wall; ops busy {result['busy_ms_per_step']:.2f} ms "
        f"(sum of op events; {result['ops_seen']} distinct ops)")
  for key in ("kind", "phase", "layer"):
    print(f"\nby {key}:")
    for k, v in result[f"by_{key}"].items():
      print(f"  {k:28s} {v['ms']:8.3f} ms  {100 * (v['share'] or 0):5.1f}%")
  print("\ntop ops:")
  for r in result["top_ops"]:
    print(f"  {r['ms_per_step']:8.3f} ms  {r['kind']:14s} {r['phase']:16s} {r['layer']:22s} "
          f"{r['op']}")


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(prog="python -m benchmarks.investigations.profile", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--suite", default="cifar", choices=("cifar", "imagenet"))
  p.add_argument("--model", default="vit", choices=("vit", "ravit", "resnet"),
                 help="resnet: the ERDE teacher (configs/erde_cifar10.py:role=teacher)")
  p.add_argument("--quick", action="store_true", help="the tiny --quick models")
  p.add_argument("--batch", type=int, default=None, help="train batch (default: the suite's)")
  p.add_argument("--dtype", default=None)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--top", type=int, default=20)
  p.add_argument("--out", default=None, help="write the result as JSON here")
  p.add_argument("--dump-hlo", default=None, help="write the compiled step's HLO text here")
  args = p.parse_args(argv)

  import jax
  from benchmarks import common, jax_bench, suites
  common.setup_jax()
  suite = suites.get(args.suite, quick=args.quick, train_batch=args.batch, dtype=args.dtype)
  if args.model == "resnet":
    from configs import erde_cifar10
    config = erde_cifar10.get_config("role=teacher")
    config.update(batch_size=args.batch or 128)
    config.data.source = "synthetic"
    config.mesh.data = 1
  else:
    config = suite.vit if args.model == "vit" else suite.ravit
  common.log(f"profiling the {args.model} train step, batch {config.batch_size} ...")
  _, state, step, batch, _, _ = jax_bench.build_train(config)
  compiled = step.lower(state, batch, None).compile()
  if args.dump_hlo:
    os.makedirs(args.dump_hlo, exist_ok=True)
    with open(os.path.join(args.dump_hlo, f"train_step_{args.model}.txt"), "w") as f:
      f.write(compiled.as_text())
  holder = {"s": state}

  def run():
    s, m = holder["s"], None
    for _ in range(args.steps):
      s, m = compiled(s, batch, None)
    jax.block_until_ready((s, m))
    holder["s"] = s

  t = common.repeat(run, reps=3, warmup=1)
  step_s = t["median_s"] / args.steps
  trace, holder["s"] = profile_step(compiled, holder["s"], batch, steps=args.steps)
  result = analyze(compiled, trace["per_op_ns"], args.steps, step_s, args.top)
  result.update(model=args.model, batch=config.batch_size, steps=args.steps,
                machine=common.machine_info(), traced_step_ms=1e3 * trace["traced_s"] / args.steps)
  _print(result)
  common.write_json(result, args.out)
  return result


if __name__ == "__main__":
  main()

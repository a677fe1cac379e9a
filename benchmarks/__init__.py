"""Benchmarks of what users run, on the machine they run on: one runner.

    python -m benchmarks.run all [--quick]     -> results/bench_cpu.json and .md

Sections (each `python -m benchmarks.run <section>`), targets in configs/benchmarks.py:

  run.py         the command line; each section writes itself into the results file
  train.py       train steps through `train.build` (and a plain process) vs PyTorch eager
  loop.py        `train_and_evaluate`'s loop vs its bare step
  inference.py   `latency` (batch 1) and `batched` (DynamicCascade): the published
                 models in results/params/ on real test images
  common.py      paired rounds, speed-up statistics, the machine, child processes
  report.py      targets judged, the Markdown
  torch_vit.py, torch_resnet.py   the PyTorch peers (tests/test_benchmarks.py checks
                 that they compute our logits with our weights copied in)

See docs/benchmarks.md; findings of past measurements are in results/bench_notes.md.
"""

"""Training: optimizer, state, sharded steps, checkpointing and the loop.

`train_and_evaluate(config, workdir)` in `loop.py` is the entry point; the
other modules are pure pieces it composes (and tests use on their own).
"""

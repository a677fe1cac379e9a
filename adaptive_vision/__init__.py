"""adaptive_vision: adaptive-computation image classification in JAX/Flax.

RAViT (resolution-adaptive ViT cascades) and ERDE (entropy-regularized
distillation for early-exit students), with the training, data, evaluation and
compute-accounting pieces they share. See docs/design.md for the contracts.
"""

__version__ = "0.1.0"

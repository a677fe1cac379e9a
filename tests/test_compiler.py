"""adaptive_vision.compiler: which XLA options our programs get, and that they
change what XLA does with a convolution on CPU and nothing else."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from adaptive_vision import compiler

_DIMS = ("NHWC", "HWIO", "NHWC")


def _conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DIMS)


def _ynn_convolutions(compiled) -> int:
  """YNNPACK fusions whose op is a convolution, in the optimized HLO."""
  return len(re.findall(r"%ynn_fusion[\w.]* = [^\n]*op_name=\"[^\"]*conv_general_dilated\"",
                        compiled.as_text()))


def test_options_only_on_cpu():
  assert compiler.options("gpu") is None and compiler.options("tpu") is None
  assert compiler.options("cpu") in (None, compiler.CPU_OPTIONS)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU compiler options")
def test_jit_leaves_convolutions_to_xla_and_keeps_the_values():
  if compiler.options() is None:
    pytest.skip("this jaxlib does not know the YNNPACK fusion option")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 16, 16, 32)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 32, 32)), jnp.float32)
  ours = compiler.jit(_conv).lower(x, w).compile()
  xla_default = jax.jit(_conv).lower(x, w).compile(dict(compiler.XLA_DEFAULT_CPU_OPTIONS))
  assert _ynn_convolutions(ours) == 0
  # The explicit default is XLA's default, and it does use YNNPACK here: were
  # that ever to change, the option would be doing nothing.
  assert _ynn_convolutions(xla_default) == 1
  assert _ynn_convolutions(jax.jit(_conv).lower(x, w).compile()) == 1
  np.testing.assert_allclose(np.asarray(ours(x, w)), np.asarray(xla_default(x, w)),
                             rtol=1e-4, atol=1e-3)


def test_jit_passes_its_arguments_through():
  f = compiler.jit(lambda x, k: x * k, static_argnames="k")
  assert float(f(jnp.float32(2.0), k=3)) == 6.0


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU compiler options")
def test_the_trainer_compiles_its_step_with_the_options():
  """The train step the trainer builds (configs/erde_cifar10.py, ResNet-20) has
  no YNNPACK convolution, while the same step under XLA's default has some:
  this fails if the trainer's jit stops passing the options."""
  if compiler.options() is None:
    pytest.skip("this jaxlib does not know the YNNPACK fusion option")
  from benchmarks import jax_bench
  from configs import erde_cifar10
  config = erde_cifar10.get_config("role=teacher")
  config.batch_size, config.mesh.data, config.data.source = 4, 1, "synthetic"
  _, state, step, batch, _, _ = jax_bench.build_train(config)
  lowered = step.lower(state, batch, None)
  assert _ynn_convolutions(lowered.compile()) == 0
  assert _ynn_convolutions(lowered.compile(dict(compiler.XLA_DEFAULT_CPU_OPTIONS))) > 0

"""The CPU backend's process settings and compile options: which XLA options our
programs get (per workload), that they change what XLA does with a convolution
and nothing else, that a plain `jax.jit` gets them after `backend.setup()`, and
that the allocator setting reuses freed memory."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from adaptive_vision import backend
from adaptive_vision.cpu import compiler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DIMS = ("NHWC", "HWIO", "NHWC")


def _conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DIMS)


def _ynn_convolutions(compiled) -> int:
  """YNNPACK fusions whose op is a convolution, in the optimized HLO."""
  return len(re.findall(r"%ynn_fusion[\w.]* = [^\n]*op_name=\"[^\"]*conv_general_dilated\"",
                        compiled.as_text()))


def test_workload_options():
  for workload in ("train", "serve"):
    assert compiler.options(workload) in (None, compiler.WORKLOAD_OPTIONS[workload])
  with pytest.raises(ValueError, match="workload"):
    compiler.options("benchmark")
  with pytest.raises(ValueError, match="workload"):
    backend.choose(workload="benchmark")


def test_training_programs_leave_convolutions_to_xla_and_keep_the_values():
  assert compiler.supported(), "this jaxlib does not know the YNNPACK fusion option"
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 16, 16, 32)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 32, 32)), jnp.float32)
  ours = backend.choose(workload="train").jit(_conv).lower(x, w).compile()
  xla_default = jax.jit(_conv).lower(x, w).compile(dict(compiler.XLA_DEFAULT_CPU_OPTIONS))
  assert _ynn_convolutions(ours) == 0
  # The explicit default is XLA's default, and it does use YNNPACK here: were
  # that ever to change, the option would be doing nothing.
  assert _ynn_convolutions(xla_default) == 1
  np.testing.assert_allclose(np.asarray(ours(x, w)), np.asarray(xla_default(x, w)),
                             rtol=1e-4, atol=1e-3)


@pytest.mark.slow
def test_the_trainer_compiles_its_step_with_the_options():
  """The train step the trainer builds (configs/erde_cifar10.py, ResNet-20) has
  no YNNPACK convolution, while the same step under XLA's default has some:
  this fails if the trainer's jit stops passing the options."""
  assert compiler.supported()
  import ml_collections
  from adaptive_vision import sharding
  from adaptive_vision.train import build as build_lib
  from configs import erde_cifar10
  config = erde_cifar10.get_config("role=teacher,runlocal")
  config.batch_size = 4
  config.backend.conv = "xla"  # XLA's convolution, where the option decides the kernel
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, model=1)))
  trainer = build_lib.build(config, mesh, total_steps=1)
  state = jax.eval_shape(trainer.init_fn, jax.random.PRNGKey(0))
  batch = {"image": jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.float32),
           "label": jax.ShapeDtypeStruct((4,), jnp.int32)}
  lowered = trainer.train_step.lower(state, batch, None)
  assert _ynn_convolutions(lowered.compile()) == 0
  assert _ynn_convolutions(lowered.compile(dict(compiler.XLA_DEFAULT_CPU_OPTIONS))) > 0


# A plain process: the one documented call, then a plain jax.jit.
_SETUP_PROBE = """
import os, re, sys
from adaptive_vision import backend, models
import ml_collections
be = backend.setup(sys.argv[1])
print(os.environ.get("XLA_FLAGS", ""))
import jax, jax.numpy as jnp
from jax import lax
f = jax.jit(lambda x, w: lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC")))
text = f.lower(jnp.ones((2, 8, 8, 32)), jnp.ones((3, 3, 32, 32))).compile().as_text()
print(len(re.findall(r"%ynn_fusion[\\w.]* = [^\\n]*conv_general_dilated", text)))
print(jax.config.values["jax_default_prng_impl"], jax.config.values["jax_cpu_enable_async_dispatch"])
cfg = ml_collections.ConfigDict(dict(name="resnet", depth=8, exits=(0, 1), image_size=32,
                                     num_classes=10))
model = models.build(cfg, layers=be.layers)
print(type(model).__name__, be.layers.name)
"""


@pytest.mark.slow
@pytest.mark.parametrize("workload", ["train", "serve"])
def test_one_call_gives_a_plain_program_the_backend(workload):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-c", _SETUP_PROBE, workload], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  flags, ynn_convs, prng, layers = proc.stdout.strip().splitlines()[-4:]
  assert compiler.YNN_FUSION_TYPE in flags
  assert ynn_convs == "0"  # the plain jax.jit got the training options
  assert prng.split()[0] == "rbg"
  assert prng.split()[1] == ("False" if workload == "serve" else "True")
  assert layers.startswith("ResNet cpu:")


# -- the allocator ---------------------------------------------------------------

# Allocates, writes and frees 64 MiB five times; prints the minor page faults
# of the last four rounds.
_MALLOC_PROBE = """
import ctypes, ctypes.util, resource, sys
from adaptive_vision.cpu import host_memory
print("applied" if host_memory.keep_freed_memory() else "not applied")
if sys.argv[1] == "defaults":
  host_memory.glibc_defaults()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
n = 64 << 20
def once():
  p = libc.malloc(n)
  ctypes.memset(p, 1, n)
  libc.free(ctypes.c_void_p(p))
once()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
  once()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _malloc_probe(mode, **env):
  proc = subprocess.run([sys.executable, "-c", _MALLOC_PROBE, mode], cwd=ROOT,
                        capture_output=True, text=True, env={**os.environ, **env}, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  applied, faults = proc.stdout.split("\n")[:2]
  return applied, int(faults)


@pytest.mark.requires("glibc")
def test_kept_memory_is_reused_and_defaults_fault_it_in_again():
  applied, kept = _malloc_probe("keep")
  assert applied == "applied"
  _, default = _malloc_probe("defaults")
  # glibc's defaults mmap each 64 MiB block afresh (at least one fault per
  # huge page, one per page without them); kept, the same pages serve again.
  assert default > 4 * 32 and kept < default / 10, (kept, default)


@pytest.mark.requires("glibc")
def test_the_environment_can_leave_the_allocator_alone():
  applied, _ = _malloc_probe("keep", ADAPTIVE_VISION_MALLOC="default")
  assert applied == "not applied"

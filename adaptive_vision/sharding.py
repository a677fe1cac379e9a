"""Device mesh and shardings.

Data parallel by default: the batch is split over the 'data' axis and the
state is replicated. `param_sharding='fsdp'` additionally splits each large
parameter (and its optimizer moments) along one dimension over 'data', which is
what lets a model outgrow one device's memory; XLA inserts the gathers.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from adaptive_vision.config import require

DATA = "data"
MODEL = "model"


def make_mesh(mesh_cfg=None) -> Mesh:
  """`mesh_cfg.data`/`mesh_cfg.model` give axis sizes; -1 means "the rest".

  Without `mesh_cfg`, every device is on the data axis (data=-1, model=1).
  """
  n = jax.device_count()
  if mesh_cfg is None:
    data, model = -1, 1
  else:
    data = int(require(mesh_cfg, "data", "mesh"))
    model = int(require(mesh_cfg, "model", "mesh"))
  if data == -1:
    if n % model:
      raise ValueError(f"mesh.model={model} does not divide the {n} devices")
    data = n // model
  if data * model > n:
    raise ValueError(f"mesh data={data} x model={model} needs more than the {n} "
                     "devices; set mesh.data=-1 to use all devices")
  # A smaller mesh uses the first devices (handy for tests and benchmarks).
  # Auto axes: XLA's partitioner propagates shardings from the inputs, so
  # model code stays free of sharding annotations.
  return jax.make_mesh((data, model), (DATA, MODEL),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[:data * model])


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fsdp_spec(shape, data_size: int, min_size: int) -> P:
  if int(np.prod(shape)) < min_size:
    return P()
  # Split the largest dimension that the data axis divides.
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % data_size == 0:
      spec = [None] * len(shape)
      spec[dim] = DATA
      return P(*spec)
  return P()


def state_shardings(abstract_state, mesh: Mesh, strategy: str = "replicate",
                    min_size: int = 2 ** 14):
  """Shardings for every leaf of the (abstract) train state."""
  if strategy == "replicate":
    return jax.tree_util.tree_map(lambda _: replicated(mesh), abstract_state)
  if strategy != "fsdp":
    raise ValueError(f"param_sharding={strategy!r}; use 'replicate' or 'fsdp'")
  data_size = mesh.shape[DATA]
  return jax.tree_util.tree_map(
      lambda x: NamedSharding(mesh, _fsdp_spec(getattr(x, "shape", ()), data_size, min_size)),
      abstract_state)


def global_batch(batch: dict, mesh: Mesh) -> dict:
  """Host-local numpy batch -> global jax arrays sharded over 'data'.

  Each process passes its own slice; the global batch is their concatenation.
  """
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)

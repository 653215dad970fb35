"""The device mesh, shardings, and host-local numpy batches -> global jax.Arrays.

Every process feeds only its own slice of the global batch; `make_array_from_process_local_data`
stitches the slices into one array sharded over the mesh's `data` axis, so the jitted step sees
the global batch and in-batch negatives span all devices and hosts.
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(data_parallelism: int = -1, devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over `data_parallelism` devices (-1: all of them)."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices) if data_parallelism in (-1, None) else data_parallelism
    if not 1 <= n <= len(devices):
        raise ValueError(f"mesh.data={data_parallelism} but {len(devices)} devices are visible")
    return Mesh(np.asarray(devices[:n]), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data axis, the rest whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's slice of every field -> global arrays sharded on the batch dimension."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """Pairs this process feeds per step; the global batch must split evenly over devices."""
    if global_batch_size % mesh.size:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                         f"{mesh.size} devices of the mesh")
    return global_batch_size // jax.process_count()

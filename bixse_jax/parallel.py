"""The device mesh, shardings, and host-local numpy batches -> global jax.Arrays.

The mesh has two axes: `data` (pure data parallelism) and `fsdp` (data parallelism whose devices
also split the parameters and optimiser state, for encoders too big to replicate). The batch is
split over both; parameters are split over `fsdp` along the dimension their *logical* axis name
maps to (`logical_axis_rules` in the config, MaxText-style), and are whole everywhere else.

Every process feeds only its own slice of the global batch; `make_array_from_process_local_data`
stitches the slices into one array sharded over the mesh, so the jitted step sees the global
batch and in-batch negatives span all devices and hosts.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bixse_jax.errors import ConfigError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch is split over every device of the mesh

# Logical name of each parameter dimension -> mesh axis (None: not split). `embed` is the
# model width, present in every matrix, so splitting it shards every matrix and embedding table.
DEFAULT_LOGICAL_AXIS_RULES = (("embed", FSDP_AXIS), ("vocab", None), ("mlp", None), ("heads", None),
                              ("kv_heads", None), ("head_dim", None))


def make_mesh(data_parallelism: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp) mesh; data_parallelism -1 takes all devices left after fsdp."""
    devices = list(devices if devices is not None else jax.devices())
    if fsdp < 1 or len(devices) % fsdp:
        raise ConfigError(f"mesh.fsdp={fsdp} does not divide the {len(devices)} visible devices")
    data = len(devices) // fsdp if data_parallelism in (-1, None) else data_parallelism
    if not 1 <= data * fsdp <= len(devices):
        raise ConfigError(f"mesh data={data_parallelism} x fsdp={fsdp} needs more than the "
                         f"{len(devices)} visible devices")
    return Mesh(np.asarray(devices[:data * fsdp]).reshape(data, fsdp), BATCH_AXES)


def cpu_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def one_cpu_device_per_core() -> int | None:
    """Splits the host CPU into one XLA device per core; for commands that only encode.

    XLA's CPU backend runs a batched matmul (attention's) on one thread. Encoding splits each batch
    over all devices, so with one device per core every core takes part (+19 to +27% on 2 cores,
    docs/benchmarks.md). Leaves JAX alone when the count was chosen (XLA_FLAGS'
    --xla_force_host_platform_device_count, or JAX_NUM_CPU_DEVICES) or JAX has already started.
    Returns the count it set, else None.
    """
    if ("xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
            or jax.config.jax_num_cpu_devices != -1):
        return None
    cores = cpu_cores()
    try:
        jax.config.update("jax_num_cpu_devices", cores)
    except RuntimeError:  # backends already initialised: too late to change
        return None
    return cores


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch is split over (all of BATCH_AXES that the mesh has)."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_shards(mesh: Mesh | None) -> int:
    """Devices the batch is split over (1 without a mesh)."""
    return 1 if mesh is None else math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device, the rest whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's slice of every field -> global arrays sharded on the batch dimension."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def check_batch_split(global_batch_size: int, mesh: Mesh) -> None:
    """The global batch must split evenly over the mesh's devices (each process feeds its share)."""
    if global_batch_size % mesh.size:
        raise ConfigError(f"train.global_batch_size={global_batch_size} is not divisible by the "
                          f"{mesh.size} devices of the mesh")


def logical_axes(path: tuple[str, ...], ndim: int) -> tuple[str | None, ...]:
    """Logical names of a BERT-family parameter's dimensions, guessed from its HF Flax path: for callers
    that give `param_shardings` no axes. Every model family declares its own (`SentenceEncoder.param_axes()`,
    which models/bert.py declares as this guesses)."""
    leaf, parent = path[-1], path[-2] if len(path) > 1 else ""
    if leaf in ("lora_a", "lora_b"):  # LoRA's A [in, r] and B [r, out]: the kernel's axis on their side
        kernel = logical_axes(path[:-1] + ("kernel",), 2)
        return (kernel[0], "lora") if leaf == "lora_a" else ("lora", kernel[1])
    if leaf == "embedding":
        return ("vocab", "embed")
    if leaf == "kernel":
        if parent in ("query", "key", "value"):
            return ("embed", "heads")
        if path[-3:-1] == ("intermediate", "dense"):
            return ("embed", "mlp")
        if path[-3:-1] == ("output", "dense") and "attention" not in path:
            return ("mlp", "embed")
        return ("heads", "embed") if "attention" in path else ("embed", "embed")
    if ndim == 1:  # biases and LayerNorm scales follow the dimension they add to
        if parent in ("query", "key", "value"):
            return ("heads",)
        return ("mlp",) if path[-3:-1] == ("intermediate", "dense") else ("embed",)
    return (None,) * ndim


def _spec(axes: tuple[str | None, ...], shape: tuple[int, ...], rules: Sequence[tuple[str, str | None]],
          mesh: Mesh) -> P:
    """PartitionSpec from logical names; a dimension the mesh axis does not divide stays whole."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        axis = table.get(name) if name else None
        if axis is None or axis in used or size % mesh.shape[axis]:
            spec.append(None)
        else:
            spec.append(axis)
            used.add(axis)
    return P(*spec)


def param_shardings(params: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, str | None]] = DEFAULT_LOGICAL_AXIS_RULES,
                    encoder_axes: Any = None) -> Any:
    """NamedSharding for every leaf of {"encoder": ..., scalars}; scalars are replicated.

    `encoder_axes`: the encoder tree's logical axis names as its module declares them (a tree of
    tuples, `SentenceEncoder.param_axes()`, as training passes them); None guesses them from BERT's
    parameter paths (`logical_axes`).
    """
    declared = {}
    if encoder_axes is not None:
        declared = {tuple(str(getattr(p, "key", p)) for p in path): axes for path, axes in
                    jax.tree_util.tree_flatten_with_path(encoder_axes, is_leaf=lambda x: isinstance(x, tuple))[0]}

    def sharding(path, leaf) -> NamedSharding:
        names = tuple(str(getattr(p, "key", p)) for p in path)
        shape = tuple(np.shape(leaf))
        if names[0] != "encoder" or not shape:
            return replicated(mesh)
        if encoder_axes is not None:
            if names[1:] not in declared:
                raise ConfigError(f"parameter {'/'.join(names[1:])} has no logical axes in its module")
            axes = declared[names[1:]]
        else:
            axes = logical_axes(names, len(shape))
        return NamedSharding(mesh, _spec(axes, shape, rules, mesh))
    return jax.tree_util.tree_map_with_path(sharding, params)

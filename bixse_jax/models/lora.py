"""LoRA adapters (Hu et al. 2021): a frozen base weight W plus a trainable low-rank update.

A targeted linear layer computes `x W + b + (alpha / r) * dropout(x) A B`, A [in, r] and B [r, out],
B zero at the start, so step 0 is the base model. Everything about adapters lives here:

  LoraSpec                     the settings (rank, alpha, dropout, targets), model.lora.* checked
  Dense                        nn.Dense with HF's parameter names, plus `lora_a` / `lora_b` when targeted
  resolve_targets              a family's valid target names, and its defaults
  split / join                 a parameter tree <-> (adapters, base): what trains, what stays frozen
  cast_base / fingerprint      the base kept in bfloat16; the hash that ties a checkpoint to its base
  init_adapters / merge        A random and B zero into a tree; W + (alpha / r) A B for an export

Adapters sit beside their base weight (`.../q_proj/{kernel, lora_a, lora_b}`), so the base keeps
transformers' names and loads by name, and an adapter's path says which weight it belongs to.
Target names match a layer's dotted path by suffix, as PEFT's `target_modules` do: "q_proj"
matches `model.layers.3.self_attn.q_proj`, "output.dense" BERT's two output projections.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from bixse_jax.errors import ConfigError

ADAPTER_LEAVES = ("lora_a", "lora_b")
BASE_DTYPES = ("float32", "bfloat16")
LORA_AXIS = "lora"  # logical name of the rank dimension: never split (parallel.py's rules leave it whole)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """The adapter settings a model config carries (hashable: it is part of the Flax module)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ()  # resolved names (resolve_targets); () before that

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def spec_from_config(cfg: Any) -> LoraSpec | None:
    """`model.lora` (a ConfigDict, or the dict of a run's config.json) -> LoraSpec, or None when rank
    is 0 (off); a ConfigError names the bad key."""
    rank, base_dtype = cfg.get("rank", 0), cfg.get("base_dtype", "float32")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ConfigError(f"model.lora.rank must be an integer >= 0 (0: off), got {rank!r}")
    if base_dtype not in BASE_DTYPES:
        raise ConfigError(f"model.lora.base_dtype {base_dtype!r} is not one of {BASE_DTYPES}")
    if not rank:
        return None
    alpha, dropout, targets = cfg.get("alpha", 16.0), cfg.get("dropout", 0.0), cfg.get("targets", ())
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ConfigError(f"model.lora.alpha must be > 0 (the update is scaled by alpha / rank), got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ConfigError(f"model.lora.dropout must be in [0, 1), got {dropout!r}")
    if isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    if not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"model.lora.targets must be names of projections, got {tuple(targets)!r}")
    return LoraSpec(rank=rank, alpha=float(alpha), dropout=float(dropout), targets=tuple(targets))


def matches(path: str, target: str) -> bool:
    """PEFT's rule: the dotted path is the target or ends with '.' + target."""
    return path == target or path.endswith("." + target)


def resolve_targets(spec: LoraSpec, linears: Sequence[str], defaults: Sequence[str], family: str) -> LoraSpec:
    """The spec with its targets checked against the family's linear layers (`linears`: paths inside a
    layer, e.g. "self_attn.q_proj"); no targets: the family's `defaults`."""
    targets = spec.targets or tuple(defaults)
    for t in targets:
        if not any(matches(p, t) for p in linears):
            names = sorted({p.rsplit(".", 1)[-1] for p in linears}) + list(linears)
            raise ConfigError(f"model.lora.targets: {t!r} names no projection of {family}; valid names: "
                              f"{', '.join(dict.fromkeys(names))}")
    return dataclasses.replace(spec, targets=targets)


class Dense(nn.Dense):
    """nn.Dense (parameters `kernel`, `bias`, as HF names them) that adds the low-rank update when
    `lora` targets its path; otherwise exactly nn.Dense. `kernel_axes`: the kernel's logical axes
    (modules that declare them), which A and B take on their side, so they shard as the kernel does."""

    lora: LoraSpec | None = None
    kernel_axes: tuple[str, str] | None = None

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        y = super().__call__(inputs)
        spec = self.lora
        if spec is None or not any(matches(".".join(self.path), t) for t in spec.targets):
            return y
        box = lambda init, axes: init if self.kernel_axes is None else nn.with_logical_partitioning(init, axes)
        in_axis, out_axis = self.kernel_axes or (None, None)
        # A as PEFT initialises it (kaiming-uniform: bound 1 / sqrt(fan_in)); B zero.
        a = self.param("lora_a", box(nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                                     (in_axis, LORA_AXIS)), (inputs.shape[-1], spec.rank), self.param_dtype)
        b = self.param("lora_b", box(nn.initializers.zeros, (LORA_AXIS, out_axis)), (spec.rank, self.features),
                       self.param_dtype)
        x = nn.Dropout(spec.dropout)(inputs, deterministic=not spec.dropout or not self.has_rng("dropout"))
        x, a, b = nn.dtypes.promote_dtype(x, a, b, dtype=self.dtype)
        dot = self.dot_general or jax.lax.dot_general
        contract = lambda lhs, rhs: dot(lhs, rhs, (((lhs.ndim - 1,), (0,)), ((), ())))
        return y + contract(contract(x, a).astype(x.dtype), b).astype(y.dtype) * jnp.asarray(spec.scaling, y.dtype)


# --- parameter trees -------------------------------------------------------------------------------

def _flat(tree: dict) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(tree)


def split(params: dict) -> tuple[dict, dict]:
    """(adapters, base): the lora_a / lora_b leaves at their paths, and everything else."""
    flat = _flat(params)
    adapters = {k: v for k, v in flat.items() if k[-1] in ADAPTER_LEAVES}
    base = {k: v for k, v in flat.items() if k[-1] not in ADAPTER_LEAVES}
    return traverse_util.unflatten_dict(adapters), traverse_util.unflatten_dict(base)


def join(base: dict, adapters: dict) -> dict:
    """The inverse of `split`: one tree the modules apply (inside jit: no copy, only a new nesting)."""
    return traverse_util.unflatten_dict({**_flat(base), **_flat(adapters)})


def cast_base(base: dict, dtype: str) -> dict:
    """The frozen base stored in `dtype` (model.lora.base_dtype): matrices and embedding tables only;
    biases and norms stay float32 (they are small, and normalisation is sensitive to them)."""
    if dtype == "float32":
        return base
    return jax.tree.map(lambda x: x.astype(jnp.bfloat16) if np.ndim(x) >= 2 else x, base)


def fingerprint(base: dict) -> str:
    """sha256 of the base's float32 weights (paths, shapes and bytes): which base a checkpoint belongs to."""
    h = hashlib.sha256()
    for path, x in sorted(_flat(base).items()):
        x = np.ascontiguousarray(np.asarray(x, np.float32))
        h.update(f"{'/'.join(path)}:{x.shape};".encode())
        h.update(x.tobytes())
    return h.hexdigest()


def init_adapters(shapes: dict, seed: int) -> dict:
    """Adapters for the lora_a / lora_b leaves of `shapes` (a tree of shape structs): A uniform in
    +-1 / sqrt(fan_in) as PEFT's kaiming-uniform, B zero; float32 numpy, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, s in sorted(_flat(split(shapes)[0]).items()):
        if path[-1] == "lora_a":
            bound = 1.0 / np.sqrt(s.shape[0])
            out[path] = rng.uniform(-bound, bound, s.shape).astype(np.float32)
        else:
            out[path] = np.zeros(s.shape, np.float32)
    return traverse_util.unflatten_dict(out)


def merge(params: dict, spec: LoraSpec) -> dict:
    """Full weights: every adapted kernel becomes W + (alpha / r) A B (float32 numpy); no adapters left."""
    flat = {k: np.asarray(v, np.float32) for k, v in _flat(params).items()}
    for path in [k for k in flat if k[-1] == "lora_a"]:
        layer = path[:-1]
        update = flat.pop(layer + ("lora_a",)).astype(np.float64) @ flat.pop(layer + ("lora_b",)).astype(np.float64)
        flat[layer + ("kernel",)] = (flat[layer + ("kernel",)] + spec.scaling * update).astype(np.float32)
    return traverse_util.unflatten_dict(flat)

"""What any model family's config.json builds, through the family's record (families.py): the
operations every caller needs, written once for all families.

  config_from_hf(hf, **overrides)   config.json's dict -> the config of the family of its model_type
  module(config)                    the Flax module: token ids + mask -> last hidden states
  init_params / param_shapes        random parameters, or their shapes, for any family
  param_axes(config)                logical axis names per parameter, as the module declares them
  with_lora(config, spec)           the config with LoRA adapters on the family's named projections
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from bixse_jax.errors import ConfigError
from bixse_jax.models import families, lora
from bixse_jax.models.families import ModelConfig

__all__ = ["ModelConfig", "config_from_hf", "module", "init_params", "param_shapes", "param_axes", "with_lora"]


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
    model_type = hf.get("model_type")
    family = families.for_model_type(model_type)
    if not family.causal and overrides.pop("bidirectional", False):
        causal = tuple(t for f in families.registered() if f.causal for t in f.model_types)
        raise ConfigError(f"model.bidirectional is for decoder models {causal}, not {model_type} (already bidirectional)")
    return family.config_class.from_hf_dict(hf, **overrides)


def module(config: ModelConfig) -> nn.Module:
    return families.of(config).module(config)


def _init_boxed(config: ModelConfig, rng: jax.Array) -> dict:
    """The parameters, those the module declares axes for in their nn.LogicallyPartitioned box."""
    ids = jnp.zeros((1, 8), jnp.int32)
    return module(config).init(rng, ids, jnp.ones_like(ids))["params"]


def init_params(config: ModelConfig, rng: jax.Array) -> dict:
    """Random float32 parameters (tests, from-scratch runs), without the logical-axis boxes."""
    return nn.unbox(_init_boxed(config, rng))


def param_shapes(config: ModelConfig) -> dict:
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def param_axes(config: ModelConfig) -> dict:
    """The parameter tree with each leaf replaced by its logical axis names, e.g. ("embed", "heads"),
    as the module declares them (nn.with_logical_partitioning); a parameter it declares none for is
    left out, so that parallel.param_shardings names it in its error."""
    boxed = jax.eval_shape(lambda: _init_boxed(config, jax.random.key(0)))
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    flat = traverse_util.flatten_dict(boxed, is_leaf=lambda _, x: is_box(x))
    return traverse_util.unflatten_dict({k: tuple(box.names) for k, box in flat.items() if is_box(box)})


def with_lora(config: ModelConfig, spec: lora.LoraSpec | None) -> ModelConfig:
    """`config` whose targeted projections carry adapters; the targets are checked against the family's
    (a ConfigError lists its valid names), none given: the family's attention projections. None: as it is."""
    if spec is None:
        return config
    family = families.of(config)
    spec = lora.resolve_targets(spec, family.lora_linears, family.lora_default_targets, config.model_type)
    return dataclasses.replace(config, lora=spec)

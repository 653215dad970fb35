"""A sentence encoder: a model family's module, pooling and optional L2 normalisation, as one call."""

from __future__ import annotations

import dataclasses

import jax
from flax import linen as nn

from bixse_jax.errors import ConfigError
from bixse_jax.models import architectures
from bixse_jax.models.pooling import POOLING_MODES, l2_normalize, pool


@dataclasses.dataclass(frozen=True)
class SentenceEncoder:
    """Stateless: parameters are passed in, so the same object serves jit, grad and eval."""

    config: architectures.ModelConfig
    pooling: str = "mean"
    normalize: bool = True

    def __post_init__(self):
        if self.pooling not in POOLING_MODES:
            raise ConfigError(f"pooling {self.pooling!r} is not one of {POOLING_MODES}")

    @property
    def module(self) -> nn.Module:
        return architectures.module(self.config)

    def param_axes(self) -> dict:
        """Logical axis names of every parameter, as the module declares them."""
        return architectures.param_axes(self.config)

    def __call__(self, params: dict, input_ids: jax.Array, attention_mask: jax.Array, *,
                 dropout_rng: jax.Array | None = None) -> jax.Array:
        """[B, T] token ids -> [B, H] float32 embeddings; dropout is on iff a dropout_rng is given."""
        deterministic = dropout_rng is None
        rngs = None if deterministic else {"dropout": dropout_rng}
        hidden = self.module.apply({"params": params}, input_ids, attention_mask,
                                   deterministic=deterministic, rngs=rngs)
        pooled = pool(hidden, attention_mask, self.pooling)
        return l2_normalize(pooled) if self.normalize else pooled

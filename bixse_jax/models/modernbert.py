"""ModernBERT (HF's `modernbert`) as a Flax module: a bidirectional encoder with RoPE and local attention.

As transformers' ModernBertModel: token embeddings -> LayerNorm; each layer is pre-norm (layer 0
has no attention norm: transformers' Identity), attention over a fused Wqkv with RoPE, then a GeGLU
MLP (Wi projects to 2 x intermediate; act(first half) * second half -> Wo); a final LayerNorm.
Layers alternate between global attention (`full_attention`, RoPE theta `global_rope_theta`) and
sliding-window attention (`sliding_attention`, theta `local_rope_theta`), where a token sees the
tokens at most `local_attention // 2` positions away. LayerNorms have no bias unless `norm_bias`.

transformers unpads its batch; here the batch stays padded and no query sees a padding key.
Positions count real tokens only (`cumsum(mask) - 1`), so a text's token states do not depend on
the padding on either side of it (transformers' own padded path numbers left padding too).

The parameter tree keeps transformers' names, nested (`layers/1/attn/Wqkv/kernel`, kernels [in, out],
LayerNorms `weight` and `bias`); every parameter carries logical axis names read by `param_axes`.
Dropout is not implemented (ModernBERT's published configs have none): only 0 is accepted.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from bixse_jax.errors import ConfigError
from bixse_jax.models import families, hf_decoder_io, lora, rope
from bixse_jax.models.bert import (ACTIVATIONS, REMAT_POLICIES, attention_einsum, check_compute_settings,
                                   dense_dtype_and_dot, shard_batch)
from bixse_jax.models.decoder import attend

MODERNBERT_MODEL_TYPES = ("modernbert",)
MODERNBERT_ATTENTION_IMPLS = (None, "xla", "einsum")  # cuDNN's lengths cannot express a sliding window
LAYER_TYPES = ("full_attention", "sliding_attention")
_TRAINING_FIELDS = {"dtype", "matmul_dtype", "remat", "attention_impl", "dense_impl", "hidden_dropout_prob", "lora"}
# Linear layers inside a layer, by path (model.lora.targets match them by suffix: "Wo" both).
LORA_LINEARS = ("attn.Wqkv", "attn.Wo", "mlp.Wi", "mlp.Wo")
LORA_DEFAULT_TARGETS = ("Wqkv", "attn.Wo")


@dataclasses.dataclass(frozen=True)
class ModernBertConfig:
    """Architecture of a ModernBERT encoder, read from a HuggingFace `config.json`."""

    vocab_size: int = 50368
    hidden_size: int = 768
    intermediate_size: int = 1152
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    hidden_activation: str = "gelu"
    max_position_embeddings: int = 8192
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    local_attention: int = 128  # the whole window; a token sees local_attention // 2 on each side
    # transformers 4's field, read only when layer_types is None (so not part of equality)
    global_attn_every_n_layers: int = dataclasses.field(default=3, compare=False)
    layer_types: tuple[str, ...] | None = None  # None: from global_attn_every_n_layers
    global_rope_theta: float = 160000.0
    local_rope_theta: float = 10000.0
    pad_token_id: int | None = 50283
    eos_token_id: int | None = 50282
    model_type: str = "modernbert"
    # Training-time choices shared with EncoderConfig (see bert.py).
    dtype: str = "float32"
    matmul_dtype: str | None = None
    remat: str = "none"
    attention_impl: str | None = None
    dense_impl: str = "xla"
    hidden_dropout_prob: float = 0.0  # no dropout here; only 0 is accepted
    lora: lora.LoraSpec | None = None  # adapters on the targeted projections (models/lora.py)

    def __post_init__(self):
        if self.model_type not in MODERNBERT_MODEL_TYPES:
            raise ConfigError(f"model_type {self.model_type!r} is not {MODERNBERT_MODEL_TYPES}")
        if self.layer_types is None:
            n = self.global_attn_every_n_layers
            object.__setattr__(self, "layer_types", tuple(
                "sliding_attention" if i % n else "full_attention" for i in range(self.num_hidden_layers)))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(LAYER_TYPES):
            raise ConfigError(f"layer_types {list(self.layer_types)} must name one of {LAYER_TYPES} "
                              f"for each of the {self.num_hidden_layers} layers")
        if self.hidden_activation not in ACTIVATIONS:
            raise ConfigError(f"hidden_activation {self.hidden_activation!r} is not supported; "
                              f"supported: {sorted(ACTIVATIONS)}")
        if self.attention_impl not in MODERNBERT_ATTENTION_IMPLS:
            raise ConfigError(f"attention_impl {self.attention_impl!r} is not one of {MODERNBERT_ATTENTION_IMPLS} "
                              f"for modernbert (cuDNN's lengths cannot express a sliding window)")
        check_compute_settings(self)
        if self.hidden_dropout_prob:
            raise ConfigError(f"modernbert encoders here have no dropout; model.dropout must be 0 or unset, "
                              f"got {self.hidden_dropout_prob}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")

    @property
    def dim_per_head(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def half_window(self) -> int:
        """transformers' `sliding_window`: a sliding layer's query sees keys at most this far away."""
        return self.local_attention // 2

    @property
    def position_offset(self) -> int:
        return 0

    def inverse_frequencies(self, layer_type: str) -> np.ndarray:
        theta = self.global_rope_theta if layer_type == "full_attention" else self.local_rope_theta
        return rope.inverse_frequencies(self.dim_per_head, theta)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **overrides: Any) -> "ModernBertConfig":
        """transformers 5's `layer_types` + `rope_parameters`, or 4's `global_attn_every_n_layers`,
        `global_rope_theta` and `local_rope_theta`, both read."""
        if hf.get("rope_scaling"):
            raise ConfigError(f"modernbert: rope_scaling {hf['rope_scaling']!r} is not supported")
        names = {f.name for f in dataclasses.fields(cls)} - _TRAINING_FIELDS  # config.json's "dtype" is storage
        kwargs = {k: v for k, v in hf.items() if k in names and v is not None}
        for key in ("eos_token_id", "pad_token_id"):  # a list of ids: keep the first
            if isinstance(kwargs.get(key), list):
                kwargs[key] = kwargs[key][0] if kwargs[key] else None
        for layer_type, field in (("full_attention", "global_rope_theta"), ("sliding_attention", "local_rope_theta")):
            params = (hf.get("rope_parameters") or {}).get(layer_type) or {}
            if params.get("rope_type", "default") != "default":
                raise ConfigError(f"modernbert: rope_type {params['rope_type']!r} ({layer_type}) is not supported; "
                                  f"supported: ('default',)")
            if "rope_theta" in params:
                kwargs[field] = float(params["rope_theta"])
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """The architecture in transformers' config.json vocabulary (the inverse of `from_hf_dict`): RoPE
        both as transformers 5's per-layer-type `rope_parameters` and as 4's two thetas."""
        hf = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _TRAINING_FIELDS}
        hf["layer_types"] = list(self.layer_types)
        hf["rope_parameters"] = {
            "full_attention": {"rope_type": "default", "rope_theta": self.global_rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": self.local_rope_theta}}
        return hf


def _dense(cfg: ModernBertConfig, features: int, axes: tuple[str, str], use_bias: bool, name: str) -> nn.Dense:
    dtype, dot = dense_dtype_and_dot(cfg)
    return lora.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, dot_general=dot,
                      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]),
                      lora=cfg.lora, kernel_axes=axes, name=name)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm: float32 statistics, parameters `weight` and (if use_bias) `bias`."""
    eps: float
    use_bias: bool
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        axes = nn.with_logical_partitioning
        weight = self.param("weight", axes(nn.initializers.ones, ("embed",)), (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(axis=-1, keepdims=True)
        centred = x32 - mean
        out = centred * jax.lax.rsqrt((centred * centred).mean(axis=-1, keepdims=True) + self.eps) * weight
        if self.use_bias:
            out = out + self.param("bias", axes(nn.initializers.zeros, ("embed",)), (x.shape[-1],), jnp.float32)
        return out.astype(self.dtype)


def _norm(cfg: ModernBertConfig, name: str) -> LayerNorm:
    return LayerNorm(cfg.norm_eps, cfg.norm_bias, cfg.dtype, name=name)


class Attention(nn.Module):
    config: ModernBertConfig

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        heads, d = cfg.num_attention_heads, cfg.dim_per_head
        # Wqkv's output is [3, heads, head_dim]: q, k, v one after the other (transformers' view).
        qkv = _dense(cfg, 3 * heads * d, ("embed", "heads"), cfg.attention_bias, "Wqkv")(x)
        q, k, v = (qkv.reshape(x.shape[:2] + (3, heads, d))[:, :, i] for i in range(3))
        q, k = rope.rotate(q, cos, sin), rope.rotate(k, cos, sin)
        out = attend(q, k, v, mask, cfg.attention_impl, attention_einsum(cfg)).reshape(x.shape[:2] + (heads * d,))
        return _dense(cfg, cfg.hidden_size, ("heads", "embed"), cfg.attention_bias, "Wo")(out)


class MLP(nn.Module):
    """GeGLU: Wo(act(input) * gate), where [input, gate] = Wi(x) split in halves."""
    config: ModernBertConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = _dense(cfg, 2 * cfg.intermediate_size, ("embed", "mlp"), cfg.mlp_bias, "Wi")(x)
        inp, gate = h[..., :cfg.intermediate_size], h[..., cfg.intermediate_size:]
        return _dense(cfg, cfg.hidden_size, ("mlp", "embed"), cfg.mlp_bias, "Wo")(
            ACTIVATIONS[cfg.hidden_activation](inp) * gate)


class EncoderLayer(nn.Module):
    config: ModernBertConfig
    first: bool = False  # layer 0: no attention norm (transformers' nn.Identity)

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        h = x if self.first else _norm(cfg, "attn_norm")(x)
        x = x + Attention(cfg, name="attn")(h, cos, sin, mask)
        return x + MLP(cfg, name="mlp")(_norm(cfg, "mlp_norm")(x))


class _Layers(nn.Module):
    config: ModernBertConfig

    @nn.compact
    def __call__(self, x: jax.Array, rotations: dict, masks: dict) -> jax.Array:
        cfg = self.config
        layer_cls = EncoderLayer
        if cfg.remat != "none":
            layer_cls = nn.remat(EncoderLayer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=True)
        for i, layer_type in enumerate(cfg.layer_types):
            cos, sin = rotations[layer_type]
            x = shard_batch(layer_cls(cfg, i == 0, name=str(i))(shard_batch(x), cos, sin, masks[layer_type]))
        return x


class _Embeddings(nn.Module):
    config: ModernBertConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        x = nn.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=jnp.float32, dtype=cfg.dtype,
                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                     name="tok_embeddings")(input_ids)
        return _norm(cfg, "norm")(x)


class ModernBertModel(nn.Module):
    """Last hidden states [B, T, hidden]; params `embeddings`, `layers/<i>`, `final_norm` as in HF."""
    config: ModernBertConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
                 token_type_ids: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        del token_type_ids, deterministic  # no segments, no dropout
        cfg = self.config
        x = _Embeddings(cfg, name="embeddings")(input_ids)
        real = attention_mask.astype(bool)
        positions = jnp.maximum(jnp.cumsum(real.astype(jnp.int32), axis=1) - 1, 0)
        full = real[:, None, :]  # [B, queries (broadcast), keys]: no query sees a padding key
        distance = jnp.abs(positions[:, :, None] - positions[:, None, :])
        masks = {"full_attention": full, "sliding_attention": full & (distance <= cfg.half_window)}
        rotations = {t: rope.cos_sin(positions, cfg.inverse_frequencies(t)) for t in set(cfg.layer_types)}
        x = _Layers(cfg, name="layers")(x, rotations, masks)
        return _norm(cfg, "final_norm")(x)


# --- transformers' tensor names -> this tree -------------------------------------------------------

_HEADS = ("head.", "decoder.", "classifier.", "drop.")  # task heads of ModernBertFor*: not an embedder's


def torch_to_flax(name: str, array: np.ndarray) -> tuple[tuple[str, ...], np.ndarray] | None:
    """One PyTorch tensor -> (parameter path, array), or None for tensors an embedder ignores.

    ModernBertModel's names (`layers.0.attn.Wqkv.weight`) are the tree's; ModernBertFor*'s carry
    a `model.` prefix, dropped, and their heads are ignored. Linear weights ([out, in]) become
    kernels ([in, out]); the token embedding's weight its `embedding`; LayerNorms keep their names.
    """
    if name.startswith(_HEADS):
        return None
    name = name.removeprefix("model.")
    *parents, leaf = name.split(".")
    if leaf == "weight" and parents and parents[-1] == "tok_embeddings":
        leaf = "embedding"
    elif leaf == "weight" and parents and parents[-1] in ("Wqkv", "Wo", "Wi"):
        leaf, array = "kernel", array.T
    return tuple(parents) + (leaf,), array


# Its tree keeps transformers' names, so the decoders' inverse renaming (kernel -> weight) serves it too.
FAMILY = families.register(families.Family(
    name="modernbert", model_types=MODERNBERT_MODEL_TYPES, config_class=ModernBertConfig, module=ModernBertModel,
    torch_to_flax=torch_to_flax, flax_to_torch=hf_decoder_io.flax_to_torch,
    lora_linears=LORA_LINEARS, lora_default_targets=LORA_DEFAULT_TARGETS,
    hf_architectures={"modernbert": "ModernBertModel"}))

"""Decoder LLMs as encoders: HF's `llama` (Llama 3.x, SmolLM2), `qwen2` and `qwen3` in one Flax module.

The families differ only by switches of `DecoderConfig`: Qwen2 adds biases to q/k/v, Qwen3
RMS-normalises q and k per head, Llama may carry biases (`attention_bias`, `mlp_bias`) and Llama 3's
RoPE scaling. Blocks are pre-norm: RMSNorm -> grouped-query attention with RoPE -> residual,
RMSNorm -> SwiGLU -> residual, and a final RMSNorm. No LM head: an embedder wants the last hidden
states, so tied and untied checkpoints load alike.

Attention is causal unless `bidirectional` (LLM2Vec-style), and never sees padding. Positions count
real tokens only (`cumsum(mask) - 1`), so a text's token states do not depend on how much padding
is on either side of it.

The parameter tree keeps transformers' names, nested (`model/layers/0/self_attn/q_proj/kernel`,
kernels [in, out]); every parameter carries logical axis names (`vocab`, `embed`, `heads`,
`kv_heads`, `mlp`, `head_dim`), read by `param_axes` for sharding.
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

DECODER_MODEL_TYPES = ("llama", "qwen2", "qwen3")
DECODER_ATTENTION_IMPLS = (None, "xla", "einsum")  # cuDNN's lengths cannot say "left padding"
# Linear layers inside a layer, by path (model.lora.targets match them by suffix).
LORA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LORA_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture of a Llama / Qwen2 / Qwen3 decoder, read from a HuggingFace `config.json`."""

    vocab_size: int = 32000
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # None: num_attention_heads (no grouping)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    intermediate_size: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"  # or "llama3"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False  # no LM head here, so only a record of the checkpoint
    pad_token_id: int | None = None
    eos_token_id: int | None = None
    model_type: str = "llama"
    # Not HF's: attention over all real tokens instead of the causal mask (LLM2Vec-style).
    bidirectional: bool = False
    # Training-time choices shared with EncoderConfig (see bert.py).
    dtype: str = "float32"
    matmul_dtype: str | None = None
    remat: str = "none"
    attention_impl: str | None = None
    dense_impl: str = "xla"
    hidden_dropout_prob: float = 0.0  # decoders here have no dropout; only 0 is accepted
    lora: lora.LoraSpec | None = None  # adapters on the targeted projections (models/lora.py)

    def __post_init__(self):
        if self.model_type not in DECODER_MODEL_TYPES:
            raise ConfigError(f"model_type {self.model_type!r} is not a supported decoder; "
                              f"supported: {DECODER_MODEL_TYPES}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
        if self.rope_type not in rope.ROPE_TYPES:
            raise ConfigError(f"rope_type {self.rope_type!r} is not supported; supported: {rope.ROPE_TYPES}")
        if self.attention_impl not in DECODER_ATTENTION_IMPLS:
            raise ConfigError(f"attention_impl {self.attention_impl!r} is not one of {DECODER_ATTENTION_IMPLS} "
                              f"for {self.model_type} (cuDNN's lengths cannot express left padding)")
        check_compute_settings(self)
        if self.hidden_dropout_prob:
            raise ConfigError(f"{self.model_type} encoders have no dropout; model.dropout must be 0 or unset, "
                              f"got {self.hidden_dropout_prob}")
        if self.num_attention_heads % self.kv_heads:
            raise ConfigError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.kv_heads}")

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias  # Qwen2's q/k/v always have biases

    @property
    def o_bias(self) -> bool:
        return self.attention_bias and self.model_type != "qwen2"

    @property
    def position_offset(self) -> int:
        return 0

    def inverse_frequencies(self) -> np.ndarray:
        return rope.inverse_frequencies(self.dim_per_head, self.rope_theta, self.rope_type, self.rope_factor,
                                        self.rope_low_freq_factor, self.rope_high_freq_factor,
                                        self.rope_original_max_position_embeddings)

    def to_hf_dict(self) -> dict[str, Any]:
        """The architecture in transformers' config.json vocabulary (the inverse of `from_hf_dict`).

        RoPE is written both ways: transformers 5's `rope_parameters` and 4's `rope_theta` +
        `rope_scaling`. Training-time fields (dtype, remat, bidirectional, ...) are not HF's.
        """
        rope_params: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type == "llama3":
            rope_params.update(factor=self.rope_factor, low_freq_factor=self.rope_low_freq_factor,
                               high_freq_factor=self.rope_high_freq_factor,
                               original_max_position_embeddings=self.rope_original_max_position_embeddings)
        scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"} if self.rope_type != "default" else None
        hf = {name: getattr(self, name) for name in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "hidden_act", "max_position_embeddings", "rms_norm_eps", "attention_bias", "tie_word_embeddings",
            "pad_token_id", "eos_token_id", "model_type")}
        hf.update(num_key_value_heads=self.kv_heads, head_dim=self.dim_per_head, rope_theta=self.rope_theta,
                  rope_scaling=scaling, rope_parameters=rope_params)
        if self.model_type == "llama":
            hf["mlp_bias"] = self.mlp_bias
        return hf

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **overrides: Any) -> "DecoderConfig":
        """transformers 5's `rope_parameters` or 4's `rope_theta` + `rope_scaling` both read."""
        model_type = hf.get("model_type")
        if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or ()):
            raise ConfigError(f"{model_type}: sliding-window attention layers are not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in hf.items() if k in names and not k.startswith("rope_") and v is not None}
        for key in ("eos_token_id", "pad_token_id"):  # a list of ids: keep the first
            if isinstance(kwargs.get(key), list):
                kwargs[key] = kwargs[key][0] if kwargs[key] else None
        params = dict(hf.get("rope_parameters") or {})
        if not params:
            params = dict(hf.get("rope_scaling") or {})
            params["rope_theta"] = hf.get("rope_theta") or 10000.0
        kwargs["rope_theta"] = float(params.get("rope_theta", 10000.0))
        kwargs["rope_type"] = params.get("rope_type", params.get("type", "default"))
        if kwargs["rope_type"] == "llama3":
            for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                kwargs[f"rope_{key}"] = params[key]
        kwargs.update(overrides)
        return cls(**kwargs)


def _dense(cfg: DecoderConfig, features: int, axes: tuple[str, str], use_bias: bool, name: str) -> nn.Dense:
    dtype, dot = dense_dtype_and_dot(cfg)
    return lora.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, dot_general=dot,
                      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]),
                      lora=cfg.lora, kernel_axes=axes, name=name)


class RMSNorm(nn.Module):
    """HF's LlamaRMSNorm: float32 statistics, parameter `weight` (as HF's Flax Llama names it)."""
    eps: float
    dtype: str = "float32"
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                            (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return weight.astype(self.dtype) * normed.astype(self.dtype)


def gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, einsum=jnp.einsum) -> jax.Array:
    """q [B, T, H, D], k/v [B, S, K, D] (H a multiple of K), boolean mask [B, T, S] -> [B, T, H, D].

    As bert.einsum_attention: float32 exponent and sums, the mask added as a finite bias (a row
    with every key masked, a padding query's, gets uniform weights rather than NaN).
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = (q * jnp.asarray(d ** -0.5, q.dtype)).reshape(b, t, kv, h // kv, d)
    scores = einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    masked = jnp.float32(jnp.finfo(jnp.float32).min / 2)
    scores = scores + jnp.where(mask[:, None, None], 0.0, masked)
    weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True)))
    out = einsum("bkgts,bskd->bkgtd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = out / weights.sum(axis=-1, keepdims=True)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(v.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, impl: str | None,
           einsum=jnp.einsum) -> jax.Array:
    """Attention by the configured implementation: `gqa_attention` ("einsum", the default on a CPU,
    multiplying with `einsum`) or jax.nn.dot_product_attention (None: XLA's choice elsewhere; "xla", "cudnn")."""
    if impl is None and jax.default_backend() == "cpu":
        impl = "einsum"
    if impl == "einsum":
        return gqa_attention(q, k, v, mask, einsum)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=impl)


class Attention(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        heads, kv, d = cfg.num_attention_heads, cfg.kv_heads, cfg.dim_per_head
        q = _dense(cfg, heads * d, ("embed", "heads"), cfg.qkv_bias, "q_proj")(x).reshape(x.shape[:2] + (heads, d))
        k = _dense(cfg, kv * d, ("embed", "kv_heads"), cfg.qkv_bias, "k_proj")(x).reshape(x.shape[:2] + (kv, d))
        v = _dense(cfg, kv * d, ("embed", "kv_heads"), cfg.qkv_bias, "v_proj")(x).reshape(x.shape[:2] + (kv, d))
        if cfg.model_type == "qwen3":  # per-head RMSNorm of q and k, before RoPE
            q = RMSNorm(cfg.rms_norm_eps, cfg.dtype, "head_dim", name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, cfg.dtype, "head_dim", name="k_norm")(k)
        q, k = rope.rotate(q, cos, sin), rope.rotate(k, cos, sin)
        out = attend(q, k, v, mask, cfg.attention_impl, attention_einsum(cfg)).reshape(x.shape[:2] + (heads * d,))
        return _dense(cfg, cfg.hidden_size, ("heads", "embed"), cfg.o_bias, "o_proj")(out)


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""
    config: DecoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        gate = _dense(cfg, cfg.intermediate_size, ("embed", "mlp"), cfg.mlp_bias, "gate_proj")(x)
        up = _dense(cfg, cfg.intermediate_size, ("embed", "mlp"), cfg.mlp_bias, "up_proj")(x)
        return _dense(cfg, cfg.hidden_size, ("mlp", "embed"), cfg.mlp_bias, "down_proj")(
            ACTIVATIONS[cfg.hidden_act](gate) * up)


class DecoderLayer(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        h = RMSNorm(cfg.rms_norm_eps, cfg.dtype, name="input_layernorm")(x)
        x = x + Attention(cfg, name="self_attn")(h, cos, sin, mask)
        h = RMSNorm(cfg.rms_norm_eps, cfg.dtype, name="post_attention_layernorm")(x)
        return x + MLP(cfg, name="mlp")(h)


class _Layers(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        layer_cls = DecoderLayer
        if cfg.remat != "none":
            layer_cls = nn.remat(DecoderLayer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=True)
        for i in range(cfg.num_hidden_layers):
            x = shard_batch(layer_cls(cfg, name=str(i))(shard_batch(x), cos, sin, mask))
        return x


class _Backbone(nn.Module):
    """HF's LlamaModel / Qwen2Model / Qwen3Model (the `model.` prefix of their checkpoints)."""
    config: DecoderConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        cfg = self.config
        x = nn.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=jnp.float32, dtype=cfg.dtype,
                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                     name="embed_tokens")(input_ids)
        real = attention_mask.astype(bool)
        positions = jnp.maximum(jnp.cumsum(real.astype(jnp.int32), axis=1) - 1, 0)
        cos, sin = rope.cos_sin(positions, cfg.inverse_frequencies())
        mask = real[:, None, :]  # [B, queries (broadcast), keys]: no query sees a padding key
        if not cfg.bidirectional:
            t = input_ids.shape[1]
            mask = mask & jnp.tril(jnp.ones((t, t), bool))[None]
        x = _Layers(cfg, name="layers")(x, cos, sin, mask)
        return RMSNorm(cfg.rms_norm_eps, cfg.dtype, name="norm")(x)


class DecoderModel(nn.Module):
    """Last hidden states [B, T, hidden] of a decoder; params under `model/...` as in HF checkpoints."""
    config: DecoderConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
                 token_type_ids: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        del token_type_ids, deterministic  # no segments, no dropout
        return _Backbone(self.config, name="model")(input_ids, attention_mask)


FAMILY = families.register(families.Family(
    name="decoder", model_types=DECODER_MODEL_TYPES, config_class=DecoderConfig, module=DecoderModel,
    torch_to_flax=hf_decoder_io.torch_to_flax, flax_to_torch=hf_decoder_io.flax_to_torch,
    lora_linears=LORA_LINEARS, lora_default_targets=LORA_DEFAULT_TARGETS,
    default_pooling="last", causal=True, lm_embedding=("model", "embed_tokens", "embedding"),
    hf_architectures={"llama": "LlamaModel", "qwen2": "Qwen2Model", "qwen3": "Qwen3Model"},
    base_model_scope="model"))

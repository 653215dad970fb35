"""BERT-family encoder (BERT, MiniLM, RoBERTa, XLM-RoBERTa) in Flax Linen.

The parameter tree is exactly HuggingFace's Flax layout (`embeddings/word_embeddings/embedding`,
`encoder/layer/0/attention/self/query/kernel`, ...), so HF weights load by name and an export is a
plain msgpack of these params. The pooler head is left out: sentence embeddings never use it.
Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `mlp`), read by `param_axes`
for sharding, as the decoders' and ModernBERT's do.

Parameters stay float32 (master weights); `dtype` sets the compute dtype (e.g. bfloat16).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from bixse_jax import parallel
from bixse_jax.errors import ConfigError, UserError
from bixse_jax.models import bf16_matmul, cpu_blas, families, hf_bert_io, lora

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")
# Linear layers inside a layer, by path (model.lora.targets match them by suffix: "dense" all three).
LORA_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                "intermediate.dense", "output.dense")
LORA_DEFAULT_TARGETS = ("query", "key", "value", "attention.output.dense")

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}

REMAT_POLICIES = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


# None: "einsum" on a CPU, jax's own choice elsewhere. "xla" and "cudnn" are
# jax.nn.dot_product_attention's implementations; "einsum" is `einsum_attention` below.
ATTENTION_IMPLS = (None, "xla", "cudnn", "einsum")
DENSE_IMPLS = ("xla", "mkl")  # "mkl": models/cpu_blas.py, float32 on a CPU


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Architecture of a BERT-family encoder, read from a HuggingFace `config.json`."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_dropout_prob: float = 0.1
    model_type: str = "bert"
    # Training-time choices, not part of the HF architecture.
    dtype: str = "float32"  # compute dtype
    # Inputs of the dense layers' matmuls (None: dtype). "bfloat16" with dtype float32 multiplies in
    # bfloat16 but accumulates and keeps activations in float32; on a 2-core CPU with AMX it encoded
    # 1.7x faster than float32 (docs/benchmarks.md).
    matmul_dtype: str | None = None
    remat: str = "none"  # a key of REMAT_POLICIES
    attention_impl: str | None = None  # a key of ATTENTION_IMPLS
    # "mkl": float32 dense layers multiply through Intel MKL on a CPU (models/cpu_blas.py; encoding
    # 1.4x faster than with XLA's dots on a 2-core CPU, docs/benchmarks.md); other backends keep XLA's.
    dense_impl: str = "xla"
    lora: lora.LoraSpec | None = None  # adapters on the targeted projections (models/lora.py)

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
        check_compute_settings(self)
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"attention_impl {self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")

    @property
    def position_offset(self) -> int:
        """RoBERTa-style models number positions from pad_token_id + 1."""
        return self.pad_token_id + 1 if self.model_type in ("roberta", "xlm-roberta") else 0

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **overrides: Any) -> "EncoderConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in hf.items() if k in names}
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | pathlib.Path, **overrides: Any) -> "EncoderConfig":
        path = pathlib.Path(path)
        try:
            hf = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: cannot read the model config: {e}") from e
        try:
            return cls.from_hf_dict(hf, **overrides)
        except (TypeError, ValueError) as e:
            raise UserError(f"{path}: {e}") from e

    def to_hf_dict(self) -> dict[str, Any]:
        """The architecture fields, in HF's config.json vocabulary."""
        skip = {"dtype", "matmul_dtype", "remat", "attention_impl", "dense_impl", "lora"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}


def check_compute_settings(cfg: Any) -> None:
    """How any encoder family computes (dtype, matmul_dtype, dense_impl, remat): one check for all."""
    if cfg.matmul_dtype not in (None, "float32", "bfloat16"):
        raise ConfigError(f"matmul_dtype {cfg.matmul_dtype!r} is not one of None, 'float32', 'bfloat16'")
    if cfg.dense_impl not in DENSE_IMPLS:
        raise ConfigError(f"dense_impl {cfg.dense_impl!r} is not one of {DENSE_IMPLS}")
    if cfg.dense_impl == "mkl" and (cfg.dtype != "float32" or cfg.matmul_dtype not in (None, "float32")):
        raise ConfigError(f"dense_impl 'mkl' multiplies in float32; dtype is {cfg.dtype!r} "
                          f"and matmul_dtype {cfg.matmul_dtype!r}")
    if cfg.remat not in REMAT_POLICIES:
        raise ConfigError(f"remat {cfg.remat!r} is not one of {sorted(REMAT_POLICIES)}")


def shard_batch(x: jax.Array) -> jax.Array:
    """`x` kept split along its batch dimension over the mesh's batch axes, when the step traces under a
    mesh (`jax.set_mesh`, step.loss_fn) whose batch axes are not manual (shard_map) and divide the batch.

    Between layers: under FSDP the weights are split along `embed`, and left to itself XLA may
    resolve the clash by gathering the batch instead of the weights (whole-batch activations on
    every device: 42 GiB of Llama-3.2-1B temporaries a device, docs/benchmarks.md "LoRA").
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    axes = tuple(a for a in parallel.BATCH_AXES if a in mesh.axis_names
                 and mesh.axis_types[mesh.axis_names.index(a)] != jax.sharding.AxisType.Manual)
    if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(axes))


def bf16_fast_path(cfg: Any) -> bool:
    """Whether cfg's matmuls take bf16_matmul's path: bfloat16 inputs into float32 in the forward and
    the backward pass, on a CPU (matmul_dtype bfloat16 over float32 compute, XLA's dense layers)."""
    return (cfg.matmul_dtype == "bfloat16" and cfg.dtype == "float32" and cfg.dense_impl == "xla"
            and jax.default_backend() == "cpu")


def attention_einsum(cfg: Any):
    """The einsum attention multiplies with: bf16_matmul's on the CPU fast path, else jnp's."""
    return bf16_matmul.matmul_fns(bf16_fast_path(cfg))[0]


def dense_dtype_and_dot(cfg: Any) -> tuple[str, Any]:
    """(dtype, dot_general) of a dense layer under cfg's dtype, matmul_dtype and dense_impl."""
    dtype, dot = cfg.dtype, jax.lax.dot_general
    if cfg.dense_impl == "mkl" and jax.default_backend() == "cpu":  # float32, as the config checks
        dot = cpu_blas.dot_general
    elif bf16_fast_path(cfg):  # float32 in and out of the layer; bfloat16 inside each product
        dot = bf16_matmul.dot_general
    elif cfg.matmul_dtype not in (None, cfg.dtype):
        # Inputs (and bias) in matmul_dtype; the product comes out, accumulated, in the compute dtype.
        dtype = cfg.matmul_dtype
        dot = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.dtype(cfg.dtype))
    return dtype, dot


def _dense(cfg: EncoderConfig, features: int, axes: tuple[str, str], name: str) -> nn.Dense:
    """A dense layer whose kernel has logical axes `axes` ([in, out]) and its bias the output's."""
    dtype, dot = dense_dtype_and_dot(cfg)
    return lora.Dense(features, dtype=dtype, param_dtype=jnp.float32, dot_general=dot,
                      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]),
                      lora=cfg.lora, kernel_axes=axes, name=name)


def _layer_norm(cfg: EncoderConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=jnp.float32, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class Embeddings(nn.Module):
    config: EncoderConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
                 token_type_ids: jax.Array) -> jax.Array:
        cfg = self.config
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))
        embed = lambda n, name: nn.Embed(n, cfg.hidden_size, embedding_init=init,
                                         param_dtype=jnp.float32, dtype=cfg.dtype, name=name)
        if cfg.position_offset:  # RoBERTa: positions count real tokens only, after the offset.
            position_ids = jnp.cumsum(attention_mask, axis=1) * attention_mask + cfg.pad_token_id
        else:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        x = (embed(cfg.vocab_size, "word_embeddings")(input_ids)
             + embed(cfg.max_position_embeddings, "position_embeddings")(position_ids)
             + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids))
        x = _layer_norm(cfg, "LayerNorm")(x)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=self.deterministic)


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, attention_mask: jax.Array,
                     einsum=jnp.einsum) -> jax.Array:
    """Softmax attention over [B, T, heads, head_dim] inputs, laid out for XLA's CPU backend.

    Against jax.nn.dot_product_attention's XLA path (measured on a 2-core CPU, MiniLM, 64 x 256
    tokens: docs/benchmarks.md), it works in [B, heads, T, head_dim] order, adds the mask as a bias
    inside the exponent's fusion instead of a separate select, and normalises after the product
    with the values, so the [B, heads, T, T] weights are read once less. The exponent and its sum
    are float32 whatever the compute dtype. `einsum`: jnp.einsum, or bf16_matmul.einsum (the CPU fast path).
    """
    to_heads_first = lambda t: t.transpose(0, 2, 1, 3)
    scale = q.shape[-1] ** -0.5
    scores = einsum("bhqd,bhkd->bhqk", to_heads_first(q * jnp.asarray(scale, q.dtype)), to_heads_first(k),
                        preferred_element_type=jnp.float32)
    # Finite, so a row with every key masked gets uniform weights rather than NaN.
    masked = jnp.float32(jnp.finfo(jnp.float32).min / 2)
    scores = scores + jnp.where(attention_mask[:, None, None, :].astype(bool), 0.0, masked)
    weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True)))
    out = einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), to_heads_first(v),
                     preferred_element_type=jnp.float32)
    out = out / weights.sum(axis=-1, keepdims=True)
    return to_heads_first(out.astype(v.dtype))


class SelfAttention(nn.Module):
    config: EncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        cfg = self.config
        heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        split = lambda t: t.reshape(t.shape[:2] + (heads, head_dim))
        q, k, v = (split(_dense(cfg, cfg.hidden_size, ("embed", "heads"), n)(x)) for n in ("query", "key", "value"))
        impl = cfg.attention_impl
        if impl is None and jax.default_backend() == "cpu":
            impl = "einsum"
        if impl == "einsum":
            out = einsum_attention(q, k, v, attention_mask, attention_einsum(cfg))
        elif impl == "cudnn":  # cuDNN takes right padding as lengths, not a [B,1,1,T] mask
            lengths = attention_mask.sum(-1).astype(jnp.int32)
            out = jax.nn.dot_product_attention(q, k, v, implementation="cudnn",
                                               query_seq_lengths=lengths, key_value_seq_lengths=lengths)
        else:
            mask = attention_mask[:, None, None, :].astype(bool)  # [B, 1 (heads), 1 (queries), T]
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
        return out.reshape(out.shape[:2] + (cfg.hidden_size,))


class AttentionOutput(nn.Module):
    """Dense + dropout + residual LayerNorm (HF's `attention/output` and `output` blocks); `in_axis`:
    the logical axis of its input (the heads' or the MLP's)."""
    config: EncoderConfig
    deterministic: bool = True
    in_axis: str = "heads"

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
        cfg = self.config
        x = _dense(cfg, cfg.hidden_size, (self.in_axis, "embed"), "dense")(x)
        x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=self.deterministic)
        return _layer_norm(cfg, "LayerNorm")(x + residual)


class Attention(nn.Module):
    config: EncoderConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        attended = SelfAttention(self.config, name="self")(x, attention_mask)
        return AttentionOutput(self.config, self.deterministic, name="output")(attended, x)


class Intermediate(nn.Module):
    config: EncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        return ACTIVATIONS[cfg.hidden_act](_dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "dense")(x))


class Layer(nn.Module):
    config: EncoderConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        x = Attention(self.config, self.deterministic, name="attention")(x, attention_mask)
        h = Intermediate(self.config, name="intermediate")(x)
        return AttentionOutput(self.config, self.deterministic, "mlp", name="output")(h, x)


class LayerStack(nn.Module):
    """HF's `encoder/layer/<i>` naming; optional per-layer rematerialisation."""
    config: EncoderConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        cfg = self.config
        layer_cls = Layer
        if cfg.remat != "none":
            layer_cls = nn.remat(Layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=True)
        for i in range(cfg.num_hidden_layers):
            x = shard_batch(layer_cls(cfg, self.deterministic, name=str(i))(shard_batch(x), attention_mask))
        return x


class BertModel(nn.Module):
    """Token states of a BERT-family encoder; params under `embeddings` and `encoder/layer/*`."""
    config: EncoderConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
                 token_type_ids: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = Embeddings(self.config, deterministic, name="embeddings")(input_ids, attention_mask, token_type_ids)
        return _Encoder(self.config, deterministic, name="encoder")(x, attention_mask)


class _Encoder(nn.Module):
    config: EncoderConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        return LayerStack(self.config, self.deterministic, name="layer")(x, attention_mask)


def init_params(config: EncoderConfig, rng: jax.Array) -> dict:
    """Random float32 parameters (for tests and from-scratch benchmarks)."""
    ids = jnp.zeros((1, 8), jnp.int32)
    return nn.unbox(BertModel(config).init(rng, ids, jnp.ones_like(ids))["params"])


def param_shapes(config: EncoderConfig) -> dict:
    """Shapes and dtypes of the parameter tree, without allocating it."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


FAMILY = families.register(families.Family(
    name="bert", model_types=SUPPORTED_MODEL_TYPES, config_class=EncoderConfig, module=BertModel,
    torch_to_flax=hf_bert_io.torch_to_flax, flax_to_torch=hf_bert_io.flax_to_torch,
    lora_linears=LORA_LINEARS, lora_default_targets=LORA_DEFAULT_TARGETS,
    hf_architectures={"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel"},
    pooler_head=True, hf_flax=True, dtype_field=False))

"""Matmuls at a CPU's bfloat16 rate in the forward *and* the backward pass.

On a CPU with native bfloat16 (AMX, AVX512-BF16), XLA multiplies bfloat16 inputs into a float32
result through YNNPACK at 3-6x its float32 rate, but only when the left operand contracts its last
dimension and the output is float32 (docs/benchmarks.md). JAX's own transpose rules break both
conditions in the backward pass: the cotangent arrives in float32, so the input gradient is a
mixed float32 x bfloat16 dot, and the weight gradient x^T @ g contracts the rows, which XLA's fast
path refuses and computes as a float32 dot. The two functions here fix the backward pass by hand:

  dense(x, w)          x[..., K] @ w[K, N]; dx = g @ w^T on XLA's fast path, dw = x^T @ g by MKL's
                       bfloat16 gemm (cpu_blas.gemm_bf16) where it can run, else XLA's dot
  einsum(spec, a, b)   a two-operand einsum (attention's scores and values), each gradient again
                       an einsum of bfloat16 inputs into float32

Inputs are rounded to bfloat16, products accumulate and come out in float32, so master weights,
activations, norms and softmax stay float32; the cotangents are rounded to bfloat16 once per
matmul, as torch's bfloat16 autocast does.
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp

from bixse_jax.models import cpu_blas

_BF16, _F32 = jnp.bfloat16, jnp.float32


@functools.cache
def _mkl_weight_grad() -> bool:
    """MKL's gemm for x^T @ g: on a CPU where it runs, with one device (XLA's partitioner cannot
    split the custom call; several devices keep XLA's dot, correct but slower)."""
    return jax.default_backend() == "cpu" and len(jax.devices()) == 1 and cpu_blas.available()


def _weight_grad(x2: jax.Array, g2: jax.Array) -> jax.Array:
    """x2[M, K]^T @ g2[M, N] -> [K, N] float32, both bfloat16."""
    if _mkl_weight_grad():
        return _varying_like(cpu_blas.gemm_bf16(x2, g2, trans_a=True), x2, g2)
    return jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())), preferred_element_type=_F32)


def _varying_like(out: jax.Array, *inputs: jax.Array) -> jax.Array:
    """Inside shard_map (gradient caching), a custom call's result carries no mesh axes it varies
    over; it varies over its inputs' (as an XLA dot's result would)."""
    varying = lambda x: jax.typeof(x).manual_axis_type.varying
    axes = set().union(*(varying(x) for x in inputs)) - set(varying(out))
    return jax.lax.pcast(out, tuple(sorted(axes)), to="varying") if axes else out


def _forward(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.dot_general(x.astype(_BF16), w.astype(_BF16), (((x.ndim - 1,), (0,)), ((), ())),
                               preferred_element_type=_F32)


@jax.custom_vjp
def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """x[..., K] @ w[K, N] from bfloat16 inputs into float32 (the cotangents of x and w keep their dtypes)."""
    return _forward(x, w)


def _dtype_tag(x: jax.Array) -> jax.Array:
    """An empty array of x's dtype: residuals must be arrays, and the backward pass needs the dtype."""
    return jnp.zeros((0,), x.dtype)


def _dense_fwd(x, w):
    x16 = x.astype(_BF16)
    return _forward(x16, w), (x16, w.astype(_BF16), _dtype_tag(x), _dtype_tag(w))


def _dense_bwd(res, g):
    x16, w16, x_tag, w_tag = res
    x_dtype, w_dtype = x_tag.dtype, w_tag.dtype
    g16 = g.astype(_BF16)
    dx = jax.lax.dot_general(g16, w16, (((g.ndim - 1,), (1,)), ((), ())), preferred_element_type=_F32)
    dw = _weight_grad(x16.reshape(-1, x16.shape[-1]), g16.reshape(-1, g16.shape[-1]))
    return dx.astype(x_dtype), dw.astype(w_dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                preferred_element_type=None) -> jax.Array:
    """`jax.lax.dot_general` for `nn.Dense(dot_general=...)`: x[..., K] @ w[K, N] through `dense`."""
    del precision
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    if (tuple(lhs_contract) != (lhs.ndim - 1,) or tuple(rhs_contract) != (0,) or rhs.ndim != 2
            or lhs_batch or rhs_batch):
        raise ValueError(f"bf16_matmul.dot_general multiplies x[..., K] by w[K, N] only; got {lhs.shape} "
                         f"and {rhs.shape} with dimension numbers {dimension_numbers}")
    out = dense(lhs, rhs)
    return out if preferred_element_type is None else out.astype(preferred_element_type)


def _split(spec: str) -> tuple[str, str, str]:
    inputs, out = spec.replace(" ", "").split("->")
    a, b = inputs.split(",")
    if len(set(a)) != len(a) or len(set(b)) != len(b) or not set(a) <= set(b) | set(out) \
            or not set(b) <= set(a) | set(out):
        raise ValueError(f"bf16_matmul.einsum needs a two-operand einsum without traces or summed-out "
                         f"indices of one operand alone, got {spec!r}")
    return a, b, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a.astype(_BF16), b.astype(_BF16), preferred_element_type=_F32)


def _einsum_fwd(spec, a, b):
    a16, b16 = a.astype(_BF16), b.astype(_BF16)
    return jnp.einsum(spec, a16, b16, preferred_element_type=_F32), (a16, b16, _dtype_tag(a), _dtype_tag(b))


def _einsum_bwd(spec, res, g):
    a16, b16, a_tag, b_tag = res
    a_dtype, b_dtype = a_tag.dtype, b_tag.dtype
    sa, sb, so = _split(spec)
    g16 = g.astype(_BF16)
    da = jnp.einsum(f"{so},{sb}->{sa}", g16, b16, preferred_element_type=_F32)
    db = jnp.einsum(f"{so},{sa}->{sb}", g16, a16, preferred_element_type=_F32)
    return da.astype(a_dtype), db.astype(b_dtype)


_einsum.defvjp(_einsum_fwd, _einsum_bwd)


def einsum(spec: str, a: jax.Array, b: jax.Array, *, preferred_element_type=None) -> jax.Array:
    """jnp.einsum(spec, a, b) from bfloat16 inputs into float32 (or `preferred_element_type`)."""
    _split(spec)
    out = _einsum(spec, a, b)
    return out if preferred_element_type in (None, _F32) else out.astype(preferred_element_type)


def matmul_fns(fast: bool) -> tuple:
    """(einsum, dot_general) a layer multiplies with: this module's when `fast`, else jnp's and lax's."""
    return (einsum, dot_general) if fast else (jnp.einsum, jax.lax.dot_general)

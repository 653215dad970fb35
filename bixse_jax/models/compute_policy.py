"""`matmul_dtype=auto`: which matmul inputs a run gets, decided once from the host and the mesh.

On a CPU with native bfloat16 (Intel AMX or AVX512-BF16), bfloat16 matmul inputs with float32
accumulation train 3.2x faster than float32 (a SmolLM2-135M step, docs/benchmarks.md) and
encode 1.6x faster, with float32 master weights, optimiser state, activations, norms and softmax; so `auto`
picks `bfloat16` there (models/bf16_matmul.py does the backward pass). Elsewhere it keeps the
compute dtype: GPUs and TPUs have their own `model.dtype` settings, a CPU without bfloat16
hardware would emulate it slowly, and a training mesh of several CPU devices (a test setting)
keeps float32, since the weight gradient's MKL call cannot be partitioned.
"""

from __future__ import annotations

import functools

import jax

CHOICES = ("auto", None, "float32", "bfloat16")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def cpu_bf16_flags() -> tuple[str, ...]:
    """The native bfloat16 flags of /proc/cpuinfo this CPU has (empty where none, or not Linux)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return tuple(f for f in BF16_CPU_FLAGS if f in flags)
    except OSError:
        pass
    return ()


def resolve_matmul_dtype(requested: str | None, dtype: str, *, training: bool) -> tuple[str | None, str]:
    """(matmul_dtype for the model config, a sentence for the run's log saying why)."""
    if requested != "auto":
        return requested, f"matmul_dtype={requested} as configured"
    backend = jax.default_backend()
    if backend != "cpu":
        return None, f"matmul_dtype=auto: {backend} keeps the compute dtype {dtype}"
    if dtype != "float32":
        return None, f"matmul_dtype=auto: compute dtype {dtype} is not float32, kept"
    flags = cpu_bf16_flags()
    if not flags:
        return None, "matmul_dtype=auto: this CPU has no native bfloat16 (amx_bf16, avx512_bf16): float32"
    if training and len(jax.devices()) > 1:
        return None, (f"matmul_dtype=auto: {len(jax.devices())} CPU devices: float32 (the bfloat16 weight "
                      f"gradient runs on one device)")
    return "bfloat16", (f"matmul_dtype=auto: bfloat16 matmul inputs, float32 accumulation, weights and "
                        f"activations (CPU with {', '.join(flags)})")


def resolve_dense_impl(choice: str, dtype: str, matmul_dtype: str | None) -> str:
    """--dense-impl resolved: "auto" is "mkl" for float32 matmuls on a CPU where MKL can run and is
    faster than XLA's dots (`cpu_blas.faster_impl`: measured once per host, cached), else "xla".

    Call after `parallel.one_cpu_device_per_core()`: measuring starts JAX's CPU backend."""
    from bixse_jax.errors import UserError
    from bixse_jax.models import cpu_blas
    float32 = dtype == "float32" and matmul_dtype in (None, "float32")
    if choice == "auto":
        if not float32 or jax.default_backend() != "cpu" or not cpu_blas.available():
            return "xla"
        return cpu_blas.faster_impl()["choice"]
    if choice == "mkl":
        if not float32:
            raise UserError(f"--dense-impl mkl multiplies in float32; got --dtype {dtype} --matmul-dtype {matmul_dtype}")
        reason = cpu_blas.unavailable_reason()
        if reason:
            raise UserError(f"--dense-impl mkl: {reason}")
    return choice

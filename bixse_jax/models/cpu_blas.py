"""Float32 dense-layer matmuls through Intel MKL's sgemm on a CPU, as an XLA FFI call.

The dense layers are most of an encoder's work, and XLA's CPU backend multiplies float32 matrices
at well under MKL's rate (docs/benchmarks.md). With `EncoderConfig.dense_impl = "mkl"` every
`nn.Dense` of the encoder calls `cpu_blas_ffi.cc` (built here once with jaxlib's headers, cached)
instead of XLA's dot; attention, layer norms and the rest stay XLA's. Needs the `mkl` wheel
(`pip install 'bixse-jax[mkl]'`) and a C++17 compiler; `unavailable_reason()` says which is
missing. Gradients go through XLA (a custom VJP), so such a model also trains, but only its
forward pass is faster.

XLA's partitioner cannot split the custom call: under `jit` over a sharded batch it would gather
the whole batch onto every device. Run the model per device instead, in `jax.shard_map`, as
`eval/encode.py` does."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from typing import Sequence

import jax
import jax.numpy as jnp
import jaxlib.version

from bixse_jax import parallel

SOURCE = pathlib.Path(__file__).with_name("cpu_blas_ffi.cc")
TARGET = "bixse_mkl_sgemm"
_SGEMM = "cblas_sgemm_64"  # ILP64: 64-bit sizes, as the handler passes them
_MKL: ctypes.CDLL | None = None  # set by _setup


def find_mkl() -> pathlib.Path | None:
    """libmkl_rt from the `mkl` wheel (installed into the environment's lib/), else the system's."""
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        found = sorted(pathlib.Path(prefix, "lib").glob("libmkl_rt.so*"))
        if found:
            return found[-1]
    name = ctypes.util.find_library("mkl_rt")
    return pathlib.Path(name) if name else None


def find_compiler() -> str | None:
    """$CXX, else the first of c++, g++, clang++ on PATH."""
    return next(filter(None, (shutil.which(c) for c in (os.environ.get("CXX", ""), "c++", "g++", "clang++") if c)),
                None)


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("BIXSE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bixse_jax")
    return pathlib.Path(root, "ffi")


def _build(compiler: str) -> pathlib.Path:
    """Compiles the handler once per (source, jaxlib) into the cache; returns the shared library."""
    include = jax.ffi.include_dir()
    key = hashlib.sha256(SOURCE.read_bytes() + jaxlib.version.__version__.encode() + include.encode()).hexdigest()[:16]
    out = _cache_dir() / key / "libbixse_cpu_blas.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed into place, so a concurrent or broken build never
    # leaves a half-written library where a later process would load it.
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        partial = pathlib.Path(tmp, out.name)
        cmd = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{include}", str(SOURCE), "-o", str(partial)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(partial, out)
    return out


@functools.cache
def _setup() -> str | None:
    """Loads MKL and the handler and registers the FFI target; None on success, else why not."""
    mkl_path = find_mkl()
    if mkl_path is None:
        return "Intel MKL (libmkl_rt) was not found: pip install 'bixse-jax[mkl]'"
    compiler = find_compiler()
    if compiler is None:
        return "no C++ compiler (c++, g++ or clang++; or set CXX) to build the MKL matmul handler"
    try:
        mkl = ctypes.CDLL(str(mkl_path), mode=ctypes.RTLD_GLOBAL)
        sgemm = ctypes.cast(getattr(mkl, _SGEMM), ctypes.c_void_p)
    except (OSError, AttributeError) as e:
        return f"{mkl_path}: cannot load {_SGEMM}: {e}"
    try:
        handler = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError) as e:
        return f"cannot build or load the MKL matmul handler: {e}"
    global _MKL
    _MKL = mkl
    handler.bixse_set_sgemm.argtypes = [ctypes.c_void_p]
    handler.bixse_set_sgemm(sgemm)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler.BixseSgemm), platform="cpu")
    return None


def _threads_per_device() -> None:
    """MKL threads per call: the cores over the CPU devices, since every device calls at once.

    With one device per core (the encode commands' setting) that is 1; MKL's default, every core
    per call, would put two threads on each core. MKL_NUM_THREADS, when set, wins."""
    if os.environ.get("MKL_NUM_THREADS") or _MKL is None:
        return
    _MKL.MKL_Set_Num_Threads(max(1, parallel.cpu_cores() // max(1, len(jax.devices("cpu")))))


def unavailable_reason() -> str | None:
    """None when dense_impl="mkl" can run here, else a sentence saying what is missing."""
    return _setup()


def available() -> bool:
    return _setup() is None


def _ffi_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    out = jax.ShapeDtypeStruct(x.shape[:-1] + w.shape[1:], jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x, w)


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x[..., K] @ w[K, N] in float32 by MKL (CPU only); gradients by XLA."""
    return _ffi_matmul(x, w)


def _matmul_fwd(x, w):
    return _ffi_matmul(x, w), (x, w)


def _matmul_bwd(res, g):
    x, w = res
    flat_x, flat_g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    return (g @ w.T).astype(x.dtype), (flat_x.T @ flat_g).astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def ready() -> None:
    """Raises unless MKL is loaded; sets its threads for the CPU devices there are now."""
    reason = _setup()
    if reason is not None:
        raise RuntimeError(f"dense_impl='mkl' is not available: {reason}")
    _threads_per_device()


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: tuple[tuple[Sequence[int], Sequence[int]],
                tuple[Sequence[int], Sequence[int]]], precision=None, preferred_element_type=None) -> jax.Array:
    """`jax.lax.dot_general` for `nn.Dense(dot_general=...)`: its one contraction goes to MKL."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    plain = (tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,) and rhs.ndim == 2
             and not lhs_batch and not rhs_batch)
    if not plain or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
        raise ValueError(f"dense_impl='mkl' multiplies float32 x[..., K] by w[K, N] only; got {lhs.dtype}"
                         f"{lhs.shape} and {rhs.dtype}{rhs.shape} with dimension numbers {dimension_numbers}")
    if preferred_element_type not in (None, jnp.float32):
        raise ValueError(f"dense_impl='mkl' returns float32, not {preferred_element_type}")
    ready()
    return matmul(lhs, rhs)

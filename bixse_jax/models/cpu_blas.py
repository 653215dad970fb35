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
import importlib.metadata
import json
import os
import platform
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import jaxlib.version
import numpy as np

from bixse_jax import parallel

SOURCE = pathlib.Path(__file__).with_name("cpu_blas_ffi.cc")
TARGET = "bixse_mkl_sgemm"
TARGET_BF16 = "bixse_mkl_gemm_bf16"
_SGEMM = "cblas_sgemm_64"  # ILP64: 64-bit sizes, as the handler passes them
_GEMM_BF16 = "cblas_gemm_bf16bf16f32_64"
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


def _cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("BIXSE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bixse_jax"))


def _cache_dir() -> pathlib.Path:
    return _cache_root() / "ffi"


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
    # Before MKL loads: its threads are read from the environment then; MKL_Set_Num_Threads later
    # did not reach the calls XLA's worker threads make (the step ran as with 2 threads).
    threads = _mkl_threads()
    if threads is not None:
        os.environ["MKL_NUM_THREADS"] = str(threads)
    try:
        mkl = ctypes.CDLL(str(mkl_path), mode=ctypes.RTLD_GLOBAL)
        sgemm = ctypes.cast(getattr(mkl, _SGEMM), ctypes.c_void_p)
        gemm_bf16 = ctypes.cast(getattr(mkl, _GEMM_BF16), ctypes.c_void_p)
    except (OSError, AttributeError) as e:
        return f"{mkl_path}: cannot load {_SGEMM} and {_GEMM_BF16}: {e}"
    try:
        handler = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError) as e:
        return f"cannot build or load the MKL matmul handler: {e}"
    global _MKL
    _MKL = mkl
    handler.bixse_set_sgemm.argtypes = [ctypes.c_void_p]
    handler.bixse_set_sgemm(sgemm)
    handler.bixse_set_gemm_bf16.argtypes = [ctypes.c_void_p]
    handler.bixse_set_gemm_bf16(gemm_bf16)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler.BixseSgemm), platform="cpu")
    jax.ffi.register_ffi_target(TARGET_BF16, jax.ffi.pycapsule(handler.BixseGemmBf16), platform="cpu")
    return None


def _threads_per_device() -> None:
    """MKL threads per call: half the cores of each CPU device, since every device calls at once and
    XLA's CPU runtime runs a program's independent ops two at a time.

    With one device per core (the encode commands' setting) that is 1; MKL's default, every core
    per call, would put two threads on each core. One device on 2 cores also gets 1: the SmolLM2
    train step of docs/benchmarks.md took 7.7 s with it and 8.3 s with 2. MKL_NUM_THREADS, when
    set, wins."""
    threads = _mkl_threads()
    if threads is not None and _MKL is not None:
        _MKL.MKL_Set_Num_Threads(threads)


_USER_MKL_THREADS = os.environ.get("MKL_NUM_THREADS")  # as the process started: the user's, which wins


def _mkl_threads() -> int | None:
    """None when the user set MKL_NUM_THREADS, else half the cores of each CPU device."""
    if _USER_MKL_THREADS:
        return None
    return max(1, parallel.cpu_cores() // max(1, len(jax.devices("cpu"))) // 2)


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


def gemm_bf16(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """op(a) @ op(b) for 2-D bfloat16 a and b, accumulated and returned in float32, by MKL (CPU only).

    Either operand may be transposed at no cost, which XLA's fast bfloat16 dot cannot do: its
    weight gradient x^T @ g falls back to a float32 dot at a quarter of the rate. No VJP: the
    callers (models/bf16_matmul.py) use it inside their own backward pass."""
    if a.ndim != 2 or b.ndim != 2 or a.dtype != jnp.bfloat16 or b.dtype != jnp.bfloat16:
        raise ValueError(f"gemm_bf16 takes 2-D bfloat16 operands; got {a.dtype}{a.shape} and {b.dtype}{b.shape}")
    m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
    kb, n = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if k != kb:
        raise ValueError(f"gemm_bf16: op(a) {(m, k)} and op(b) {(kb, n)} do not contract")
    ready()
    out = jax.ShapeDtypeStruct((m, n), jnp.float32)
    return jax.ffi.ffi_call(TARGET_BF16, out)(a, b, trans_a=np.int64(trans_a), trans_b=np.int64(trans_b))


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


# --- which is faster here: MKL's sgemm or XLA's dot ----------------------------------------------
#
# MKL is 1.4-1.5x XLA's dots on the Intel Xeon of docs/benchmarks.md, but dispatches slow kernels on
# other vendors' CPUs (an AMD EPYC host measured 30.6 docs/s with MKL against 41.2 with XLA's dots).
# So "auto" measures once per host: one dense layer's matmul ([ROWS, hidden] x [hidden, 4 hidden],
# rows split over the CPU devices as encoding splits a batch) by each, best of REPEATS, and keeps
# the faster. The result is cached by CPU model, cores, CPU devices, shape and versions.

ROWS = 2048  # tokens per call, over all devices: 8 texts of 256 tokens
REPEATS = 3


def cpu_model() -> str:
    """/proc/cpuinfo's model name (else platform.processor()), e.g. 'AMD EPYC 7B13'."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id ('GenuineIntel', 'AuthenticAMD', ...), else ''."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _mkl_version() -> str:
    try:
        return importlib.metadata.version("mkl")
    except importlib.metadata.PackageNotFoundError:
        found = find_mkl()
        return found.name if found else "none"


def _host_key(hidden: int) -> dict:
    return {"cpu": cpu_model(), "cores": parallel.cpu_cores(), "cpu_devices": len(jax.devices("cpu")),
            "rows": ROWS, "hidden": hidden, "repeats": REPEATS, "jax": jax.__version__,
            "jaxlib": jaxlib.version.__version__, "mkl": _mkl_version()}


def _timed(fn, *args) -> float:
    tick = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - tick


def measure(hidden: int) -> dict[str, float]:
    """Seconds for a feed-forward block's two matmuls, [ROWS, hidden] x [hidden, 4 hidden] and
    [ROWS, 4 hidden] x [4 hidden, hidden], float32, by XLA and by MKL: best of REPEATS, the two
    taking turns so that a busy host slows both alike.

    Rows are split over the CPU devices under shard_map, one MKL call per device, as encoding runs
    (eval/encode.py). ~0.3 s on 2 idle cores at hidden 384, compiling included."""
    ready()
    devices = jax.devices("cpu")
    mesh = jax.sharding.Mesh(devices, ("rows",))
    spec = jax.sharding.PartitionSpec
    rows = -(-ROWS // len(devices)) * len(devices)
    put = lambda shape, s: jax.device_put(jnp.full(shape, 1.0 / shape[-1], jnp.float32),
                                          jax.sharding.NamedSharding(mesh, s))
    x, w1, w2 = put((rows, hidden), spec("rows")), put((hidden, 4 * hidden), spec()), put((4 * hidden, hidden), spec())

    def per_device(mm):
        return jax.jit(jax.shard_map(lambda x, w1, w2: mm(mm(x, w1), w2), mesh=mesh,
                                     in_specs=(spec("rows"), spec(), spec()), out_specs=spec("rows")))

    fns = {"xla_s": per_device(jnp.matmul), "mkl_s": per_device(matmul)}
    for fn in fns.values():
        jax.block_until_ready(fn(x, w1, w2))  # compiles
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(REPEATS):
        for name, fn in fns.items():
            best[name] = min(best[name], _timed(fn, x, w1, w2))
    return best


def faster_impl(hidden: int = 384) -> dict:
    """Whether MKL or XLA multiplies a dense layer faster here: {"choice": "mkl"|"xla", "why": ..., ...}.

    "xla" without measuring when MKL cannot run. Else the cached measurement for this host, or a
    new one (`measure`), written to $BIXSE_CACHE/dense_impl/. If measuring fails, the CPU vendor
    decides: MKL on Intel, XLA elsewhere."""
    reason = unavailable_reason()
    if reason is not None:
        return {"choice": "xla", "why": f"MKL unavailable: {reason}"}
    key = _host_key(hidden)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = _cache_root() / "dense_impl" / f"{digest}.json"
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key and cached.get("choice") in ("mkl", "xla"):
            return {**cached, "why": f"measured earlier ({path})"}
    except (OSError, ValueError):
        pass
    try:
        timings = measure(hidden)
    except Exception as e:  # noqa: BLE001 - any failure falls back to the vendor rule
        intel = cpu_vendor() == "GenuineIntel"
        return {"choice": "mkl" if intel else "xla",
                "why": f"measurement failed ({e}); {'an Intel' if intel else 'not an Intel'} CPU"}
    choice = "mkl" if timings["mkl_s"] < timings["xla_s"] else "xla"
    record = {"key": key, **timings, "choice": choice}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(record, indent=1))
        os.replace(partial, path)
    except OSError:
        pass  # an unwritable cache only means measuring again next time
    return {**record, "why": "measured now"}

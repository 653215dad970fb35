"""Train-step throughput of bixse-jax, comparable with the peer sentence-transformers script.

Times the real step (step_lib.make_optimizer / init_state / make_loss_fn / make_train_step /
jit_train_step, or grad_cache's cached step) on random token ids with the peer's shapes (query 32,
document 128 tokens, no padding) on random-init BERT-base / MiniLM-L6, BiXSE loss, AdamW, and
prints one JSON line per setting: pairs/s, achieved TFLOP/s and MFU (the peer's FLOP formula:
3 x forward matmul FLOPs of the encoder layers, embeddings and loss left out; gradient caching's
extra forward pass is *not* counted, as the peer does not count CachedMNRL's), peak device memory,
compile time and step time (mean/std over timed windows).

Timing: state and batches live on the device before timing; the step donates the old state; the
host does not wait inside a timed window of `--steps` steps, only at its end.

  python benchmarks/train_throughput.py --quick                    # CPU smoke run, < 1 minute
  python benchmarks/train_throughput.py --models bert-base --batches 256,1024 --dtype bfloat16 \\
      --attention cudnn --remat none --chunk 0
  python benchmarks/train_throughput.py --suite gpu --deadline-s 250 --out $OUT/ours.jsonl

Decoder LLMs (random init, real shapes, last-token pooling, no dropout): --models qwen2.5-0.5b,
qwen2.5-1.5b, llama-3.2-1b, smollm2-135m (or tiny-llama for a CPU smoke run); `--fsdp N` shards
parameters and optimiser state over N devices (mesh.fsdp). With --compile-only the state is never
allocated (jax.eval_shape), so a large model's XLA memory plan can be read on a CPU:

  python benchmarks/train_throughput.py --models qwen2.5-0.5b,llama-3.2-1b --batches 256 --chunk 32 \
      --query-len 64 --doc-len 256
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/train_throughput.py \
      --models qwen2.5-1.5b --batches 256 --chunk 32 --query-len 64 --doc-len 256 --fsdp 8 --compile-only

`--lora-rank R` trains LoRA adapters (model.lora.*) on the attention projections over a frozen base
(`--lora-base-dtype bfloat16` stores it in bfloat16).

Each setting runs in a fresh process when there are several (`--isolate`, default): peak memory
is then the setting's own and an out-of-memory cannot poison the next setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import pathlib
import subprocess
import sys
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

MODELS = {  # the peer's two random-init encoders (BertConfig defaults otherwise)
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "minilm-l6": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),  # --quick
}
# Decoder LLMs with their published shapes (DecoderConfig fields), random init.
DECODERS = {
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
                         rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960,
                         rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=True),
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192, head_dim=64,
                         rms_norm_eps=1e-5, rope_theta=5e5, rope_type="llama3", rope_factor=32.0,
                         rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                         rope_original_max_position_embeddings=8192, max_position_embeddings=131072,
                         tie_word_embeddings=True),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                         rms_norm_eps=1e-5, rope_theta=1e5, max_position_embeddings=8192, tie_word_embeddings=True),
    "tiny-llama": dict(model_type="llama", vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=128),  # CPU smoke runs
}
GIB = 2 ** 30
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM")


@dataclasses.dataclass
class Setting:
    model: str
    batch: int
    dtype: str = "bfloat16"
    matmul_dtype: str | None = None  # model.matmul_dtype: bfloat16 over float32 dtype is the CPU fast path
    attention: str = "default"  # default (einsum on a CPU, else jax's choice) | xla | cudnn | einsum
    remat: str = "none"
    chunk: int = 0  # gradient-caching sub-batch; 0 = off
    query_len: int = 32
    doc_len: int = 128
    dropout: float = 0.1  # the peer trains in train mode: BERT's default dropout 0.1
    steps: int = 5  # steps per timed window (no host sync inside)
    repeats: int = 3  # timed windows; step time mean/std is over these
    warmup: int = 2
    prng: str = "threefry2x32"
    compile_only: bool = False  # only XLA's memory plan and the compile time (e.g. on CPU for GPU shapes)
    fsdp: int = 1  # mesh.fsdp: parameters and optimiser state split over this many devices
    lora_rank: int = 0  # model.lora.rank: adapters on the family's attention projections, the base frozen; 0 = off
    lora_base_dtype: str = "float32"  # model.lora.base_dtype: how the frozen base is stored
    peak_tflops: float | None = None  # None: 989 on GPU (H100/H200 dense bf16), no MFU elsewhere
    note: str = ""


def flops_per_step(model: str, batch: int, query_len: int, doc_len: int) -> float:
    """The peer's formula: per token 3 x L x (2 (4 d^2 + 2 d f) + 4 T d), summed over both sides.
    Decoders: q/o of heads x head_dim, k/v of kv_heads x head_dim, SwiGLU's three d x f matrices."""
    if model in DECODERS:
        m = DECODERS[model]
        d, layers, f = m["hidden_size"], m["num_hidden_layers"], m["intermediate_size"]
        hd = m.get("head_dim") or d // m["num_attention_heads"]
        q, kv = m["num_attention_heads"] * hd, m["num_key_value_heads"] * hd
        per_token = lambda seq: 3 * layers * (2 * (2 * d * q + 2 * d * kv + 3 * d * f) + 4 * seq * q)
        return batch * (query_len * per_token(query_len) + doc_len * per_token(doc_len))
    m = MODELS[model]
    d, layers, f = m["hidden_size"], m["num_hidden_layers"], m["intermediate_size"]
    per_token = lambda seq: 3 * layers * (2 * (4 * d * d + 2 * d * f) + 4 * seq * d)
    return batch * (query_len * per_token(query_len) + doc_len * per_token(doc_len))


def _is_oom(message: str) -> bool:
    return any(m in message for m in OOM_MARKERS)


def run_setting(s: Setting) -> dict[str, Any]:
    """Builds, compiles and times one setting in this process; returns its JSON record."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_default_prng_impl", s.prng)
    from bixse_jax import grad_cache, parallel, step as step_lib
    from bixse_jax.default_config import base_config
    from bixse_jax.models import architectures, lora
    from bixse_jax.models.bert import EncoderConfig
    from bixse_jax.models.decoder import DecoderConfig
    from bixse_jax.models.encoder import SentenceEncoder

    device = jax.devices()[0]
    record: dict[str, Any] = {**dataclasses.asdict(s), "platform": device.platform,
                              "device_kind": device.device_kind, "devices": jax.device_count(),
                              "jax": jax.__version__}
    peak = s.peak_tflops if s.peak_tflops is not None else (989.0 if device.platform == "gpu" else None)
    record["peak_tflops"] = peak
    mesh = parallel.make_mesh(-1, s.fsdp)
    if s.batch % mesh.size:
        raise ValueError(f"batch {s.batch} is not divisible by the {mesh.size} devices")
    config = base_config()
    config.train.warmup_steps, config.train.num_steps = 10, 1000
    config.mesh.fsdp = s.fsdp
    attention = None if s.attention == "default" else s.attention
    if s.model in DECODERS:  # no dropout in decoders; last-token pooling
        enc_config = DecoderConfig(**DECODERS[s.model], dtype=s.dtype, matmul_dtype=s.matmul_dtype, remat=s.remat,
                                   attention_impl=attention)
        encoder = SentenceEncoder(enc_config, pooling="last")
        use_dropout = False
    else:
        enc_config = EncoderConfig(**MODELS[s.model], vocab_size=30522, max_position_embeddings=512,
                                   hidden_dropout_prob=s.dropout, dtype=s.dtype, matmul_dtype=s.matmul_dtype,
                                   remat=s.remat,
                                   attention_impl=attention)
        encoder = SentenceEncoder(enc_config)
        use_dropout = s.dropout > 0
    record["parameters"] = sum(math.prod(x.shape) for x in jax.tree.leaves(architectures.param_shapes(enc_config)))
    if s.lora_rank:  # adapters (alpha = 2 rank) on the family's default targets; the base frozen
        enc_config = architectures.with_lora(enc_config, lora.LoraSpec(s.lora_rank, 2.0 * s.lora_rank))
        encoder = dataclasses.replace(encoder, config=enc_config)
        record["lora_targets"] = list(enc_config.lora.targets)
    tx, schedule = step_lib.make_optimizer(config.train)

    def make_state(key):
        params = architectures.init_params(enc_config, key)
        if not s.lora_rank:
            return step_lib.init_state(params, config.loss, tx, seed=0)
        adapters, base = lora.split(params)
        return step_lib.init_state(adapters, config.loss, tx, seed=0, frozen=lora.cast_base(base, s.lora_base_dtype))

    abstract = jax.eval_shape(make_state, jax.random.PRNGKey(0))  # shapes only: nothing allocated
    rules = tuple(tuple(r) for r in config.mesh.logical_axis_rules)
    axes = architectures.param_axes(enc_config)
    param_shardings = parallel.param_shardings(abstract.params, mesh, rules, axes)
    frozen_shardings = parallel.param_shardings({"encoder": abstract.frozen}, mesh, rules, axes)["encoder"] \
        if s.lora_rank else {}
    params_sds = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                              abstract.params, param_shardings)
    record["trained_parameters"] = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))
    replicated = parallel.replicated(mesh)
    state_shardings = abstract.replace(step=replicated, rng=replicated, params=param_shardings,
                                       opt_state=step_lib._opt_state_shardings(tx, params_sds, mesh),
                                       frozen=frozen_shardings)
    if s.compile_only:  # lowered from shapes: a model far larger than this host's memory still compiles
        state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                             abstract, state_shardings)
    else:
        state = jax.jit(make_state, out_shardings=state_shardings)(jax.random.PRNGKey(0))
    if s.chunk:
        grad_cache.check_chunk(s.batch, s.chunk, mesh)
        step = grad_cache.make_cached_train_step(step_lib.make_embed_fn(encoder, use_dropout),
                                                 step_lib.make_objective(config.loss, mesh), tx, schedule,
                                                 chunk=s.chunk, mesh=mesh,
                                                 encoder_specs=grad_cache.param_specs(state.params["encoder"]),
                                                 frozen_specs=grad_cache.param_specs(state.frozen))
    else:
        step = step_lib.make_train_step(step_lib.make_loss_fn(encoder, config.loss, mesh, use_dropout), tx, schedule)
    jitted = step_lib.jit_train_step(step, mesh, state)

    @jax.jit
    def make_batch(key):  # on the device, already sharded: nothing crosses the host while timing
        kq, kd = jax.random.split(key)
        ids = lambda k, n: jax.random.randint(k, (s.batch, n), 5, enc_config.vocab_size, jnp.int32)
        q, d = ids(kq, s.query_len), ids(kd, s.doc_len)
        batch = {"query_input_ids": q, "query_attention_mask": jnp.ones_like(q),
                 "doc_input_ids": d, "doc_attention_mask": jnp.ones_like(d),
                 "query_ids": jnp.arange(s.batch, dtype=jnp.int32), "doc_ids": jnp.arange(s.batch, dtype=jnp.int32),
                 "grades": jnp.full((s.batch,), 0.8, jnp.float32)}
        return jax.lax.with_sharding_constraint(batch, parallel.batch_sharding(mesh))

    if s.compile_only:
        batches = [jax.eval_shape(make_batch, jax.random.PRNGKey(1))]
        batches = [jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.batch_sharding(mesh)),
                                batches[0])]
    else:
        batches = [make_batch(jax.random.PRNGKey(i + 1)) for i in range(2)]
        jax.block_until_ready(batches)

    tick = time.perf_counter()
    compiled = jitted.lower(state, batches[0]).compile()
    record["compile_s"] = round(time.perf_counter() - tick, 2)
    try:
        analysis = compiled.memory_analysis()
        record["compiled_temp_gib"] = round(analysis.temp_size_in_bytes / GIB, 3)
        record["compiled_argument_gib"] = round(analysis.argument_size_in_bytes / GIB, 3)
        record["compiled_output_gib"] = round(analysis.output_size_in_bytes / GIB, 3)
        record["compiled_alias_gib"] = round(analysis.alias_size_in_bytes / GIB, 3)
    except Exception:  # not every backend reports it
        record["compiled_temp_gib"] = record["compiled_argument_gib"] = None
    if s.compile_only:
        return record

    metrics = None
    for i in range(s.warmup):
        state, metrics = compiled(state, batches[i % 2])
    jax.block_until_ready((state, metrics))
    windows = []
    for _ in range(s.repeats):
        tick = time.perf_counter()
        for i in range(s.steps):
            state, metrics = compiled(state, batches[i % 2])
        jax.block_until_ready((state, metrics))
        windows.append((time.perf_counter() - tick) / s.steps)
    loss = float(jax.device_get(metrics["loss"]))
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss}")

    step_s = float(np.mean(windows))
    flops = flops_per_step(s.model, s.batch, s.query_len, s.doc_len)
    stats = device.memory_stats() or {}
    record.update(
        loss=round(loss, 4),
        step_s_mean=round(step_s, 5),
        step_s_std=round(float(np.std(windows)), 5) if len(windows) > 1 else None,
        pairs_per_s=round(s.batch / step_s, 1),
        tflops=round(flops / step_s / 1e12, 3),
        mfu=round(flops / step_s / (peak * 1e12), 4) if peak else None,
        peak_memory_gib=round(stats["peak_bytes_in_use"] / GIB, 2) if "peak_bytes_in_use" in stats else None,
        memory_limit_gib=round(stats["bytes_limit"] / GIB, 2) if "bytes_limit" in stats else None,
    )
    return record


def run_guarded(s: Setting) -> dict[str, Any]:
    """run_setting, with an out-of-memory or any other failure reported as a record with "error"."""
    try:
        return run_setting(s)
    except Exception as e:  # report and go on to the next setting
        message = f"{type(e).__name__}: {e}"
        return {**dataclasses.asdict(s), "error": "out of memory" if _is_oom(message) else "failed",
                "message": message[-1500:]}


def run_isolated(s: Setting, timeout_s: float) -> dict[str, Any]:
    """run_setting in a fresh Python process (its own device memory, peak counter and OOM)."""
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", json.dumps(dataclasses.asdict(s))]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True,
                             timeout=None if math.isinf(timeout_s) else max(timeout_s, 1))
    except subprocess.TimeoutExpired:
        return {**dataclasses.asdict(s), "error": "timeout", "message": f"no result within {timeout_s:.0f} s"}
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    message = (out.stderr or out.stdout)[-1500:]
    kind = "out of memory" if _is_oom(message) else f"process exited with {out.returncode}"
    return {**dataclasses.asdict(s), "error": kind, "message": message}


class Runner:
    """Runs settings in order under an overall deadline, printing and saving one JSON line each."""

    def __init__(self, isolate: bool, deadline_s: float | None, out: pathlib.Path | None,
                 fallback_attention: str | None):
        self.isolate, self.out, self.fallback = isolate, out, fallback_attention
        self.end = None if deadline_s is None else time.monotonic() + deadline_s
        self.records: list[dict[str, Any]] = []

    def left_s(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()

    def emit(self, record: dict[str, Any]) -> dict[str, Any]:
        line = json.dumps(record)
        print(line, flush=True)
        if self.out is not None:
            with open(self.out, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        self.records.append(record)
        return record

    def run(self, s: Setting, min_s: float = 20.0) -> dict[str, Any]:
        if self.left_s() < min_s:
            return self.emit({**dataclasses.asdict(s), "error": "skipped", "message": "time budget spent"})
        record = run_isolated(s, self.left_s()) if self.isolate else run_guarded(s)
        if record.get("error") == "failed" and self.fallback and s.attention != self.fallback and \
                s.attention == "cudnn":
            self.emit(record)  # keep the failure on record, then the same setting with XLA attention
            retry = dataclasses.replace(s, attention=self.fallback, note=(s.note + " attention fallback").strip())
            return self.run(retry, min_s)
        return self.emit(record)


def largest_batch(runner: Runner, probe: dict[str, Any], base: Setting, multiple: int = 256,
                  tries: int = 3) -> dict[str, Any] | None:
    """The largest uncached batch predicted to fit, from the probe's compiled memory, stepping down on OOM.

    XLA plans one step's temporary memory at compile time; it grows linearly with the batch, so
    one probe gives bytes per pair, and (memory limit - arguments) / bytes per pair the batch.
    """
    if "error" in probe or not probe.get("compiled_temp_gib") or not probe.get("memory_limit_gib"):
        return None
    per_pair = probe["compiled_temp_gib"] / probe["batch"]
    free = 0.95 * probe["memory_limit_gib"] - probe["compiled_argument_gib"]  # the state (donated: out = in)
    batch = max(multiple, int(free / per_pair) // multiple * multiple)
    record = None
    for _ in range(tries):
        record = runner.run(dataclasses.replace(base, batch=batch, note="largest uncached batch search"))
        if record.get("error") != "out of memory":
            return record
        batch = max(multiple, int(batch * 0.85) // multiple * multiple)
    return record


def gpu_suite(runner: Runner, peak_tflops: float | None) -> None:
    """The issue's GPU targets, most important first, so a spent time budget drops the extras."""
    fast = dict(dtype="bfloat16", attention="cudnn", remat="none", peak_tflops=peak_tflops)
    bert = runner.run(Setting("bert-base", 1024, **fast))
    if "error" not in bert:
        fast["attention"] = bert["attention"]  # keep the XLA fallback if cuDNN attention failed
    runner.run(Setting("minilm-l6", 4096, **fast))
    # 65,536 pairs through gradient caching (~18 s a step on one H100/H200: one timed step). The
    # loss runs row-blocked (loss.impl auto beyond one block), so no [B, B] matrix is formed; XLA's
    # CPU plan of this step is ~50 GB at sub-batches of 256 pairs and grows with the sub-batch, not
    # with B (docs/benchmarks.md). 32,768 pairs if 65,536 does not fit.
    for batch in (65536, 32768):
        big = runner.run(Setting("bert-base", batch, chunk=256, steps=1, repeats=1, warmup=1, **fast), min_s=60)
        if big.get("error") != "out of memory":
            break
    largest_batch(runner, bert, Setting("bert-base", 1024, **fast))
    # Decoder LLMs (random init, real shapes; XLA attention: cuDNN's lengths cannot say "left padding").
    for model in ("qwen2.5-0.5b", "llama-3.2-1b"):
        runner.run(Setting(model, 256, **{**fast, "attention": "xla"}, steps=3, repeats=2, warmup=1), min_s=60)
    # Extras, if time is left: what the levers give (float32 + XLA attention; remat).
    runner.run(Setting("bert-base", 1024, dtype="float32", attention="xla", remat="none", peak_tflops=peak_tflops))
    runner.run(Setting("bert-base", 1024, **{**fast, "remat": "dots"}))


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _strs(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_strs, default=["bert-base", "minilm-l6"],
                   help=f"comma list of {sorted(MODELS)} or decoders {sorted(DECODERS)}")
    p.add_argument("--batches", type=_ints, default=[256, 1024], help="comma list of global batch sizes (pairs)")
    p.add_argument("--dtype", type=_strs, default=["bfloat16"], help="compute dtypes (params stay float32)")
    p.add_argument("--matmul-dtype", type=_strs, default=["none"],
                   help="matmul input dtypes: none (= --dtype) | bfloat16 (over --dtype float32: the CPU fast path)")
    p.add_argument("--attention", type=_strs, default=["default"], help="default | xla | cudnn | einsum")
    p.add_argument("--remat", type=_strs, default=["none"], help="none | full | dots")
    p.add_argument("--chunk", type=_ints, default=[0], help="gradient-caching sub-batch sizes; 0 = off")
    p.add_argument("--query-len", type=int, default=32)
    p.add_argument("--doc-len", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=5, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--fsdp", type=int, default=1, help="mesh.fsdp: devices that split parameters and optimiser state")
    p.add_argument("--compile-only", action="store_true", help="report compile time and XLA's memory plan only")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="LoRA adapters of this rank on the attention projections, the base frozen (0: full fine-tuning)")
    p.add_argument("--lora-base-dtype", default="float32", help="float32 | bfloat16: how a LoRA run stores its frozen base")
    p.add_argument("--prng", default="threefry2x32", help="jax_default_prng_impl (rbg is faster on GPU)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak for MFU (default: 989, H100/H200 dense bf16, on GPU; none elsewhere)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each setting in its own process (default: when there are several)")
    p.add_argument("--deadline-s", type=float, default=None, help="skip settings once this much time has passed")
    p.add_argument("--attention-fallback", default="xla", help="retry a failed cudnn setting with this ('' = none)")
    p.add_argument("--out", type=pathlib.Path, default=None, help="also append the JSON lines to this file")
    p.add_argument("--quick", action="store_true", help="tiny shapes on CPU, plain and cached step, < 1 minute")
    p.add_argument("--suite", choices=["gpu"], default=None, help="the GPU targets of docs/benchmarks.md")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child is not None:
        print(json.dumps(run_guarded(Setting(**json.loads(args.child)))), flush=True)
        return
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.suite == "gpu":
        runner = Runner(args.isolate is not False, args.deadline_s, args.out, args.attention_fallback or None)
        gpu_suite(runner, args.peak_tflops)
        return
    if args.quick:
        settings = [Setting("tiny", 32, dtype="float32", query_len=8, doc_len=32, chunk=c, steps=3, repeats=2,
                            warmup=1, peak_tflops=args.peak_tflops) for c in (0, 8)]
    else:
        settings = [Setting(m, b, dtype=dt, matmul_dtype=None if mm == "none" else mm, attention=a, remat=r, chunk=c, query_len=args.query_len,
                            doc_len=args.doc_len, dropout=args.dropout, steps=args.steps, repeats=args.repeats,
                            warmup=args.warmup, prng=args.prng, compile_only=args.compile_only, fsdp=args.fsdp,
                            peak_tflops=args.peak_tflops, lora_rank=args.lora_rank,
                            lora_base_dtype=args.lora_base_dtype)
                    for m, b, dt, mm, a, r, c in itertools.product(args.models, args.batches, args.dtype,
                                                                   args.matmul_dtype, args.attention, args.remat,
                                                                   args.chunk)]
    isolate = args.isolate if args.isolate is not None else (len(settings) > 1 and not args.quick)
    runner = Runner(isolate, args.deadline_s, args.out, args.attention_fallback or None)
    for s in settings:
        runner.run(s, min_s=0 if args.deadline_s is None else 20)


if __name__ == "__main__":
    main()

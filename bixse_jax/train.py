"""The training loop: input, evaluation, metrics, checkpoints and preemption around `step.train_step`.

Everything that can fail on bad input (model folder, data files, tokenizer, a checkpoint of
another config) is checked before anything is written, so a failed start leaves the workdir as it
was. The step itself (state, optimiser, objective) is bixse_jax/step.py; gradient caching swaps
in grad_cache.py's loss function.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from tqdm import tqdm

from bixse_jax import checkpoint, experiment, grad_cache, logit_init, matryoshka, parallel, step as step_lib
from bixse_jax.data.prefetch import Prefetcher
from bixse_jax.errors import ConfigError
from bixse_jax.models import lora
from bixse_jax.metric_writers import MetricsWriter
from bixse_jax.preemption import PreemptionGuard


class _PendingSteps:
    """Device metrics of steps not yet read on the host, with the pair indices each step trained on.

    Reading them in one transfer every few steps keeps the host from stalling the device; the
    non-finite flags are checked then (and before every checkpoint).
    """

    def __init__(self, policy: str, describe_pairs: Callable[[int], str]):
        if policy not in ("skip", "stop"):
            raise ConfigError(f"train.on_nonfinite {policy!r} is not 'skip' or 'stop'")
        self.policy, self.describe_pairs = policy, describe_pairs
        self.items: list[tuple[int, step_lib.Metrics]] = []
        self.pairs, self.wait, self.tick = 0, 0.0, time.perf_counter()

    def add(self, step: int, metrics: step_lib.Metrics, pairs: int, data_wait: float) -> None:
        self.items.append((step, metrics))
        self.pairs += pairs
        self.wait += data_wait

    def check(self) -> tuple[dict[str, float] | None, list[dict[str, Any]]]:
        """(mean metrics of the good steps or None, skipped-step records); raises under 'stop'."""
        fetched = jax.device_get([m for _, m in self.items])
        steps = [s for s, _ in self.items]
        skipped = [{"skipped_step": s, "pairs": self.describe_pairs(s)} for s, m in zip(steps, fetched) if m["nonfinite"]]
        for record in skipped:
            message = (f"training step {record['skipped_step'] + 1} (global batch {record['skipped_step']}): "
                       f"non-finite loss or gradients on {record['pairs']}; the update was not applied")
            if self.policy == "stop":
                raise FloatingPointError(message + "; stopping (train.on_nonfinite=stop), the newest checkpoint "
                                         "is the last good state")
            logging.warning(message)
        good = [m for m in fetched if not m["nonfinite"]]
        means = {k: float(np.mean([m[k] for m in good])) for k in good[0] if k != "nonfinite"} if good else None
        if means is not None:
            means["pairs_per_second"] = self.pairs / max(time.perf_counter() - self.tick, 1e-9)
            means["data_wait_seconds"] = self.wait / len(self.items)  # host stall: the step waited for its batch
        self.items, self.pairs, self.wait, self.tick = [], 0, 0.0, time.perf_counter()
        return means, skipped


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
          stop_after_step: int | None = None, show_progress: bool = True,
          command: str | None = None) -> tuple[dict[str, Any], step_lib.TrainState]:
    """Trains (or resumes) in `workdir`; returns the summary and state.

    The summary holds the steps and, when `config.evals` has evaluators, "before" / "after":
    {NAME: {METRIC: value}}; `command`, the command line that ran it, is kept for model cards.

    Everything that can fail on bad input (model folder, data files, tokenizer, a checkpoint of
    another config) is checked before anything is written, so a failed start leaves the workdir
    as it was. SIGTERM, or `stop_after_step`, ends the run after the current step with a checkpoint.
    """
    workdir = checkpoint.workdir_path(workdir)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    parallel.check_batch_split(config.train.global_batch_size, mesh)
    chunk = config.train.grad_cache_chunk
    if chunk:
        grad_cache.check_chunk(config.train.global_batch_size, chunk, mesh)
    logit_init.check(config.loss)
    model = experiment.load_model(config.model, seed=config.seed)
    experiment.check_lengths(config, model)
    matryoshka.check(config.loss, model.config.hidden_size)
    pairs = experiment.load_train_pairs(config.data)
    batcher = experiment.make_batcher(config, model, pairs)
    evaluators = experiment.make_evaluators(config, model)
    config_json = config.to_json_best_effort(indent=2)
    resuming_config = checkpoint.check_config(workdir, config_json)

    tx, schedule = step_lib.make_optimizer(config.train)
    trained, frozen, lora_base = _trained_and_frozen(model, config.model)
    state = step_lib.init_sharded_state(trained, config, tx, mesh, model.encoder.param_axes(), frozen=frozen)
    use_dropout = model.encoder.config.hidden_dropout_prob > 0 or config.model.lora.dropout > 0
    if chunk:  # gradient caching: embed in sub-batches, backprop twice
        loss_fn = grad_cache.make_cached_loss_fn(step_lib.make_embed_fn(model.encoder, use_dropout),
                                                 step_lib.make_objective(config.loss, mesh, model.encoder.normalize),
                                                 chunk=chunk, mesh=mesh,
                                                 encoder_specs=grad_cache.param_specs(state.params["encoder"]),
                                                 frozen_specs=grad_cache.param_specs(state.frozen))
    else:
        loss_fn = step_lib.make_loss_fn(model.encoder, config.loss, mesh, use_dropout)
    step_fn = step_lib.jit_train_step(step_lib.make_train_step(loss_fn, tx, schedule), mesh, state)

    is_lead = jax.process_index() == 0
    workdir.mkdir(parents=True, exist_ok=True)
    manager = checkpoint.make_manager(workdir, keep=config.train.keep_checkpoints,
                                      async_save=config.train.async_checkpoints)
    restored = checkpoint.restore_latest(manager, state)
    summary: dict[str, Any] = {"workdir": str(workdir), **({"command": command} if command else {})}
    if restored is None:
        if is_lead and not resuming_config:
            checkpoint.write_config(workdir, config_json)
        if logit_init.init_mode(config.loss) == "auto":  # a fresh start only: a resume keeps its checkpoint's t, b
            state, summary["init_logit_params"] = _fit_logit_params(state, model, config, batcher, mesh)
    else:
        state, data_state, step = restored
        if data_state.get("next_batch") != step:
            raise checkpoint.CheckpointError(f"{workdir}: checkpoint {step} records data position {data_state}, not {step}")
        checkpoint.check_base(data_state, lora_base, workdir / "checkpoints" / str(step))
        summary["resumed_from_step"] = step
        logging.warning("resumed from checkpoint step %d in %s", step, workdir)
        print(f"[bixse-jax] resumed from checkpoint step {step}", file=sys.stderr, flush=True)

    summary["matmul_dtype"], why = experiment.matmul_policy(config.model)  # said once the inputs are checked
    logging.info(why)
    if is_lead:
        print(f"[bixse-jax] {why}", file=sys.stderr, flush=True)
    _write_host_record(workdir, batcher, first_batch=int(jax.device_get(state.step)))
    writer = MetricsWriter(workdir, enabled=is_lead)
    if "init_logit_params" in summary:  # fitted: a fresh start, so step 0
        fit = summary["init_logit_params"]
        writer.write(0, {"init/log_temperature": fit["log_temperature"], "init/bias": fit["bias"]})
    total = config.train.num_steps if stop_after_step is None else min(stop_after_step, config.train.num_steps)
    first = int(jax.device_get(state.step))
    before = {name: e.evaluate(model.params, logit_params(state)) for name, e in evaluators.items()
              if e.before_training}
    if before:  # the pretrained model's scores (also on a resume), logged as step 0
        summary["before"] = before
        if first == 0:
            writer.write(0, _eval_scalars(before))

    def describe_pairs(step: int) -> str:
        idx = batcher.global_indices(step)
        if pairs is None:  # arrayrecord: record numbers in the built data set
            return "records " + ", ".join(f"#{i}" for i in idx)
        return "pairs " + ", ".join(f"#{i} ({pairs[i].query_id} / {pairs[i].doc_id})" for i in idx)

    pending = _PendingSteps(config.train.on_nonfinite, describe_pairs)

    def flush(done: int) -> None:
        if not pending.items:
            return
        means, skipped = pending.check()
        for record in skipped:
            writer.write(record["skipped_step"] + 1, record)
        if means is not None:
            writer.write(done, means)
            progress.set_postfix(loss=f"{means['loss']:.4f}", pairs_s=f"{means['pairs_per_second']:.1f}")

    progress = tqdm(range(first, total), initial=first, total=total, desc="train",
                    disable=not (show_progress and is_lead), dynamic_ncols=True)
    # Batch k + 1 is read, tokenised and sent to the devices in a thread while step k runs.
    prefetch = Prefetcher(lambda s: parallel.global_batch(batcher.batch(s), mesh), first, total,
                          depth=config.train.prefetch)
    try:
        with PreemptionGuard() as guard:
            for step in progress:
                batch, data_wait = prefetch.timed_get(step)
                state, metrics = step_fn(state, batch)
                pending.add(step, metrics, config.train.global_batch_size, data_wait)
                done = step + 1
                preempted = done < total and guard.should_stop(done)
                if done % config.train.log_every == 0 or done == total or preempted:
                    flush(done)
                due = {name: e for name, e in evaluators.items() if e.every_steps and done % e.every_steps == 0}
                if due and done < total:
                    writer.write(done, _eval_scalars({name: e.evaluate(step_lib.encoder_params(state), logit_params(state))
                                                      for name, e in due.items()}))
                every = config.train.checkpoint_every
                if every and (done % every == 0 or done == total or preempted):
                    flush(done)  # under on_nonfinite=stop, never checkpoint past a bad step
                    checkpoint.save(manager, done, state, {"next_batch": done, **lora_base})
                if preempted:
                    summary["preempted_at_step"] = done
                    break
    finally:  # whatever happened, let started checkpoint writes complete and input workers stop
        progress.close()
        prefetch.close()  # before the batcher it reads from
        getattr(batcher, "close", lambda: None)()
        manager.wait_until_finished()
        manager.close()
    summary["steps"] = int(jax.device_get(state.step))
    final = jax.device_get({k: state.params[k] for k in ("log_temperature", "bias")})
    summary.update({k: float(v) for k, v in final.items()})  # the run's final t and b, for results tables
    if evaluators and summary["steps"] >= config.train.num_steps:
        summary["after"] = {name: e.evaluate(step_lib.encoder_params(state), logit_params(state))
                            for name, e in evaluators.items()}
        writer.write(summary["steps"], _eval_scalars(summary["after"]))
    writer.close()
    if is_lead and summary["steps"] >= config.train.num_steps:
        with (workdir / "summary.jsonl").open("a") as f:
            f.write(json.dumps(summary) + "\n")
    return summary, state


def _fit_logit_params(state: step_lib.TrainState, model: Any, config: ml_collections.ConfigDict, batcher: Any,
                      mesh: Any) -> tuple[step_lib.TrainState, dict[str, Any]]:
    """`loss.init_logit_params='auto'`: t and b fitted to the starting encoder (bixse_jax/logit_init.py)
    on the run's first batches, as global arrays (every device's rows: the global batch), put into the
    state with its sharding; returns the state and the fit's record."""
    n = min(config.loss.init_fit_batches, max(config.train.num_steps, 1))
    cells_fn = logit_init.make_cells_fn(model.encoder, config.loss, mesh, config.loss.init_fit_rows)
    batches = (parallel.global_batch(batcher.batch(s), mesh) for s in range(n))
    fit = logit_init.fit_from_batches(cells_fn, step_lib.encoder_params(state), batches, config.loss)
    params = dict(state.params)
    for key in ("log_temperature", "bias"):
        params[key] = jax.device_put(np.asarray(fit[key], np.float32), state.params[key].sharding)
    message = (f"[bixse-jax] loss.init_logit_params=auto: t={fit['log_temperature']:.4f} (exp(t)="
               f"{math.exp(fit['log_temperature']):.3f}), b={fit['bias']:.4f} from {fit['cells']} cells of "
               f"{fit['batches']} batches ({fit['iterations']} Newton steps)")
    if fit["at_scale_floor"]:
        message += "; WARNING: exp(t) hit its floor: the starting model's cosines do not rise with the targets"
    logging.info(message)
    print(message, file=sys.stderr, flush=True)
    return state.replace(params=params), fit


def _trained_and_frozen(model: Any, cfg: ml_collections.ConfigDict) -> tuple[dict, dict | None, dict[str, Any]]:
    """(trained encoder params, frozen base or None, the checkpoint's record of the base): without LoRA
    the whole encoder trains; with it the adapters do, over the base kept in `model.lora.base_dtype`."""
    if model.config.lora is None:
        return model.params, None, {}
    adapters, base = lora.split(model.params)
    record = {"lora_base": {"model": cfg.name_or_path, "sha256": lora.fingerprint(base)}}
    return adapters, lora.cast_base(base, cfg.lora.base_dtype), record


def logit_params(state) -> tuple[float, float]:
    """The run's current (t, b), for the evaluators' calibration metrics."""
    t, b = jax.device_get((state.params["log_temperature"], state.params["bias"]))
    return float(t), float(b)


def _eval_scalars(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """{NAME: {METRIC: value}} -> {"eval/NAME/METRIC": value}, the TensorBoard and metrics.jsonl keys."""
    return {f"eval/{name}/{metric}": value for name, metrics in results.items() for metric, value in metrics.items()}


def _write_host_record(workdir: epath.Path, batcher: Any, first_batch: int) -> None:
    """WORKDIR/hosts/process_I.json: what this process feeds, to debug multi-host input."""
    record = {"process_index": jax.process_index(), "process_count": jax.process_count(),
              "local_devices": [str(d) for d in jax.local_devices()], "local_batch_size": batcher.local_batch_size,
              "first_batch": first_batch, "first_batch_local_pairs": batcher.local_indices(first_batch).tolist()}
    (workdir / "hosts").mkdir(parents=True, exist_ok=True)
    (workdir / "hosts" / f"process_{jax.process_index()}.json").write_text(json.dumps(record, indent=1))

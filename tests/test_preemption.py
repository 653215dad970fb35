"""Preemption: SIGTERM stops with a checkpoint and exit 0; kill -9 never leaves a partial checkpoint.

Both end bit-identical to an uninterrupted run of the same config.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp

from bixse_jax import train
from train_utils import cli_overrides, flat_params, pairs_jsonl, tiny_config

ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
       # Every restart compiles the same step: a persistent cache turns that into a lookup.
       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _start(workdir, overrides, log):
    cmd = [sys.executable, "-m", "bixse_jax.cli", "train", "--workdir", str(workdir), *overrides]
    env = {**ENV, "JAX_COMPILATION_CACHE_DIR": str(workdir.parent / "jax_cache")}
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def _lines(path) -> int:
    return sum(1 for _ in open(path)) if path.exists() else 0


def _wait_for_new_metrics(proc, metrics, seen, timeout=180) -> bool:
    """True once metrics.jsonl has grown past `seen` lines; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _lines(metrics) > seen:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    raise TimeoutError("training made no progress")


def _complete_steps(workdir) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def _assert_same_params(reference_state, workdir, step):
    restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state", reference_state)
    for a, b in zip(flat_params(reference_state), flat_params(restored)):
        np.testing.assert_array_equal(a, b)


def test_sigterm_saves_and_resumes_bit_identical(tiny_model_dir, tmp_path):
    data = pairs_jsonl(tmp_path / "pairs.jsonl")
    settings = {"train.num_steps": 40, "train.log_every": 1, "train.checkpoint_every": 1000}
    workdir = tmp_path / "run"
    with open(tmp_path / "log.txt", "w") as log:
        proc = _start(workdir, cli_overrides(tiny_model_dir, data, **settings), log)
        assert _wait_for_new_metrics(proc, workdir / "metrics.jsonl", 2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, (tmp_path / "log.txt").read_text()[-3000:]
    output = (tmp_path / "log.txt").read_text()
    stopped = int(re.search(r"bixse-jax: stopped at step (\d+) of 40", output).group(1))  # the run's last words
    assert 3 <= stopped < 40 and _complete_steps(workdir) == [stopped]
    assert not (workdir / "summary.jsonl").exists()  # not finished

    config = tiny_config(tiny_model_dir, data, num_steps=40, log_every=1, checkpoint_every=1000)
    resumed_summary, resumed = train.train(config, workdir, show_progress=False)
    assert resumed_summary["resumed_from_step"] == stopped
    _, uninterrupted = train.train(config, tmp_path / "reference", show_progress=False)
    for a, b in zip(flat_params(uninterrupted), flat_params(resumed)):
        np.testing.assert_array_equal(a, b)


def test_kill_nines_resume_from_complete_checkpoints(tiny_model_dir, tmp_path):
    data = pairs_jsonl(tmp_path / "pairs.jsonl")
    settings = {"train.num_steps": 60, "train.log_every": 1, "train.checkpoint_every": 3}
    workdir = tmp_path / "run"
    metrics = workdir / "metrics.jsonl"
    rng = np.random.default_rng(0)
    kills = 0
    for attempt in range(5):  # each restart costs a process start; five random kills suffice
        complete_before = _complete_steps(workdir)
        log_path = tmp_path / f"log{attempt}.txt"
        with open(log_path, "w") as log:
            proc = _start(workdir, cli_overrides(tiny_model_dir, data, **settings), log)
            # Let it train 1 to 5 logged steps (checkpoints come every 3), then kill at a random moment.
            if not _wait_for_new_metrics(proc, metrics, _lines(metrics) + int(rng.integers(0, 5))):
                break  # the run finished before this kill
            time.sleep(float(rng.uniform(0.0, 1.0)))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            kills += 1
        resumed = re.findall(r"\[bixse-jax\] resumed from checkpoint step (\d+)", log_path.read_text())
        if complete_before:  # it must have resumed from the newest complete checkpoint
            assert resumed == [str(complete_before[-1])], log_path.read_text()[-2000:]
        else:
            assert resumed == []
        leftovers = [p.name for p in (workdir / "checkpoints").iterdir() if not p.name.isdigit()]
        assert all("tmp" in name for name in leftovers), leftovers  # partial writes stay in temp folders
    assert kills >= 3
    with open(tmp_path / "final.txt", "w") as log:
        proc = _start(workdir, cli_overrides(tiny_model_dir, data, **settings), log)
        assert proc.wait(timeout=300) == 0, (tmp_path / "final.txt").read_text()[-3000:]
    assert _complete_steps(workdir)[-1] == 60

    config = tiny_config(tiny_model_dir, data, num_steps=60, log_every=1, checkpoint_every=3)
    _, uninterrupted = train.train(config, tmp_path / "reference", show_progress=False)
    _assert_same_params(uninterrupted, workdir, 60)

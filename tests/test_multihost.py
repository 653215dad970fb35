"""Two JAX processes on localhost (4 CPU devices each) train like one process with 8 devices."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp

from bixse_jax import train
from train_utils import cli_overrides, flat_params, logged, pairs_jsonl, tiny_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(workdir, overrides, *extra):
    return [sys.executable, "-m", "bixse_jax.cli", "train", "--workdir", str(workdir), *overrides, *extra]


def test_two_processes_equal_one_process(tiny_model_dir, tmp_path):
    data = pairs_jsonl(tmp_path / "pairs.jsonl")
    # t, b under Adam after the start's fit: the tiny random model's cosines barely rise with the targets,
    # and a refit every step turns the two layouts' float noise into 3e-5 of the loss by step 4.
    steps = {"train.num_steps": 4, "train.log_every": 1, "train.checkpoint_every": 4,
             "loss.follow_logit_params": "adam"}
    workdir = tmp_path / "two_procs"
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen(_cli(workdir, cli_overrides(tiny_model_dir, data, **steps), "--jax_distributed",
                                   f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                   f"--process_id={i}", "--distributed_timeout=60"),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]

    # The same run in this process, on its 8 devices.
    config = tiny_config(tiny_model_dir, data, num_steps=4, log_every=1, checkpoint_every=4)
    config.loss.follow_logit_params = "adam"
    _, single = train.train(config, tmp_path / "one_proc", show_progress=False)
    np.testing.assert_allclose(logged(workdir, "init/bias"), logged(tmp_path / "one_proc", "init/bias"), rtol=1e-5)

    assert len(logged(workdir)) == 4
    np.testing.assert_allclose(logged(workdir), logged(tmp_path / "one_proc"), rtol=1e-5)
    restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "4" / "state", single)
    for a, b in zip(flat_params(single), flat_params(restored)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)

    # Each process fed only its own half of every global batch.
    hosts = [json.loads((workdir / "hosts" / f"process_{i}.json").read_text()) for i in range(2)]
    assert [h["process_count"] for h in hosts] == [2, 2] and [len(h["local_devices"]) for h in hosts] == [4, 4]
    halves = [set(h["first_batch_local_pairs"]) for h in hosts]
    assert len(halves[0]) == len(halves[1]) == 8 and not halves[0] & halves[1]
    one = json.loads((tmp_path / "one_proc" / "hosts" / "process_0.json").read_text())
    assert halves[0] | halves[1] == set(one["first_batch_local_pairs"])


def test_unreachable_coordinator_fails_within_the_timeout(tiny_model_dir, tmp_path):
    data = pairs_jsonl(tmp_path / "pairs.jsonl")
    cmd = _cli(tmp_path / "run", cli_overrides(tiny_model_dir, data), "--jax_distributed",
               f"--coordinator_address=127.0.0.1:{_free_port()}", "--num_processes=2", "--process_id=1",
               "--distributed_timeout=5")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    assert out.returncode == 1
    assert "could not join the JAX cluster" in out.stderr and "127.0.0.1" in out.stderr
    assert not (tmp_path / "run").exists()

"""Errors a user reads: bad input ends any command with one line `bixse-jax COMMAND: error: ...` and
exit status 2; --verbose adds the traceback; a bug keeps its traceback."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from bixse_jax import cli, errors
from bixse_jax.data import sources
from bixse_jax.models import hf_io

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.py"


def _train(tmp_path: pathlib.Path, *flags: str) -> subprocess.CompletedProcess:
    """`bixse-jax train` on the demo config in a real process (absl's flags are process-global)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    cmd = [sys.executable, "-m", "bixse_jax.cli", "train", "--config", str(DEMO_CONFIG),
           "--workdir", str(tmp_path / "run"), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


@pytest.fixture
def bad_jsonl(tmp_path) -> pathlib.Path:
    path = tmp_path / "bad.jsonl"
    good = {"query": "heart rate", "document": "the heart beats", "score": 0.5}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "score": 1.7}) + "\n")
    return path


def test_train_bad_data_line_is_one_line_naming_file_line_and_field(tmp_path, bad_jsonl):
    out = _train(tmp_path, "--config.data.kind=jsonl", f"--config.data.path={bad_jsonl}", "--config.evals.demo.kind=none")
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [
        f'bixse-jax train: error: {bad_jsonl}:2: field "score": must be in [0, 1], got 1.7'], out.stderr
    assert not (tmp_path / "run").exists()

    out = _train(tmp_path, "--config.data.kind=jsonl", f"--config.data.path={bad_jsonl}", "--config.evals.demo.kind=none",
                 "--verbose")
    assert out.returncode == 2
    assert "Traceback (most recent call last)" in out.stderr and "DataError" in out.stderr
    assert out.stderr.splitlines()[-1].startswith(f"bixse-jax train: error: {bad_jsonl}:2: ")


def test_train_config_key_and_value_errors_are_one_line(tmp_path):
    out = _train(tmp_path, "--config.train.lerning_rate=1e-4")
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1, out.stderr
    assert out.stderr.startswith("bixse-jax train: error: --config.train.lerning_rate: ")
    assert "did you mean --config.train.learning_rate?" in out.stderr and str(DEMO_CONFIG) in out.stderr

    out = _train(tmp_path, "--config.train.learning_rate=fast")
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1, out.stderr
    assert out.stderr.startswith("bixse-jax train: error: flag --config.train.learning_rate=fast: ")
    assert "is of type float" in out.stderr


def test_eval_missing_beir_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bixse-jax", "eval", "--model", "unused", "--beir", str(tmp_path / "nowhere")])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"bixse-jax eval: error: {tmp_path / 'nowhere'}: BEIR folder not found\n"

    with pytest.raises(SystemExit) as e:
        cli.main(["bixse-jax", "eval", "--model", "unused", "--beir", str(tmp_path / "nowhere"), "--verbose"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.splitlines()[-1] == f"bixse-jax eval: error: {tmp_path / 'nowhere'}: BEIR folder not found"


@pytest.mark.parametrize("bug", [ValueError, RuntimeError])
def test_a_bug_keeps_its_traceback(tmp_path, capsys, monkeypatch, bug):
    def broken(*args, **kwargs):
        raise bug("a bug, not bad input")

    monkeypatch.setattr(sources, "read_beir_eval", broken)
    with pytest.raises(bug, match="a bug, not bad input"):
        cli.main(["bixse-jax", "eval", "--model", "unused", "--beir", str(tmp_path)])
    assert "error:" not in capsys.readouterr().err


def test_unknown_command_and_bad_flags_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bixse-jax", "trian"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["bixse-jax", "mine", "--model", "m", "--beir", "b", "--k", "0", "--out", "o"])
    assert e.value.code == 2 and "--k must be >= 1" in capsys.readouterr().err


def test_user_input_errors_are_user_errors():
    assert issubclass(sources.DataError, errors.UserError) and issubclass(hf_io.ModelLoadError, errors.UserError)
    assert issubclass(errors.ConfigError, errors.UserError) and issubclass(errors.UserError, ValueError)
    with pytest.raises(errors.ConfigError, match="unknown data kind 'csv'"):
        sources.load_pairs("csv", "x.csv")


def test_verbose_requested_and_one_line():
    assert errors.verbose_requested(["--model", "m", "--verbose"])
    assert errors.verbose_requested(["-verbose"]) and errors.verbose_requested(["--verbose=true"])
    assert not errors.verbose_requested(["--verbose", "--noverbose"])
    assert not errors.verbose_requested(["--verbose=false"]) and not errors.verbose_requested([])
    assert not errors.verbose_requested(["--", "--verbose"]) and not errors.verbose_requested(["verbose"])
    assert errors.one_line(errors.UserError("a: weights differ\n  missing (2): x, y\n")) == \
        "a: weights differ; missing (2): x, y"

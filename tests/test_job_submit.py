"""`ray job submit` end to end: pipelines/pretrain.py as a job on a separate local head, with Ray's token auth on; the
job runs on Ray's public API only (no module of the lean wing in its driver or workers: tests/import_record/ records
the imports of every process the head starts).

How the head is isolated from everything else on the machine (the test session's own `ray_local` cluster, other
people's clusters): `ray stop` would kill EVERY Ray process on the machine, so it is never called. Instead the head
runs as `ray start --head --block` in its own process group, on free ports, with its own short --temp-dir and its
own token (RAY_AUTH_TOKEN, so ~/.ray/auth_token is neither read nor written). With --block, `ray start` owns the
processes it started: SIGTERM makes it shut down exactly that cluster (its reaper also cleans up if it dies).
A raylet can take ~30 s to drain after a Train job: whatever is left after 10 s is killed by
process group (it holds only what that `ray start` launched), then any process naming the temp dir, by pid.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
IMPORT_RECORDER = Path(__file__).resolve().parent / "import_record"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_dashboard(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"{url}/api/gcs_healthz", timeout=2)  # unauthenticated health check
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    pytest.fail(f"the dashboard at {url} did not answer in {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def head():
    """(dashboard address, client env) of a private head; stopped by SIGTERM to its `ray start --block`."""
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # Unix socket paths must stay under 107 bytes
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(
        # every process of the head, job drivers and workers included, loads tests/import_record/sitecustomize.py
        PYTHONPATH=os.pathsep.join(p for p in (str(IMPORT_RECORDER), env.get("PYTHONPATH")) if p),
        NANOGPT_IMPORT_RECORD=str(Path(temp_dir) / "imports.txt"),
        RAY_AUTH_MODE="token",  # Ray 2.60 keeps token auth on; the client must say so too
        RAY_AUTH_TOKEN=secrets.token_hex(16),  # this cluster's own token, for the head and every client call
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` is this venv's
    )
    dashboard_port = _free_port()
    ports = {flag: _free_port() for flag in (
        "--port", "--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
        "--metrics-export-port", "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port")}
    log = Path(temp_dir) / "head.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp_dir}",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
             *(f"{flag}={port}" for flag, port in ports.items())],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_for_dashboard(address, proc, log)
        yield address, env
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started, and only those
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # a raylet drains for ~30 s after a Train job: no need to wait for it
            os.killpg(proc.pid, signal.SIGKILL)  # the group holds only what this `ray start` launched
            proc.wait(timeout=30)
        for pid, _ in _processes_of(temp_dir):  # anything of this cluster that left the group
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _processes_of(temp_dir: str) -> list[tuple[int, str]]:
    """(pid, command line) of every process whose command line names `temp_dir` (Linux /proc; elsewhere none)."""
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if temp_dir in cmd:
                found.append((int(entry), cmd))
    return found


def _ray(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _submit_and_wait(address: str, env: dict, job_id: str, command: list[str]) -> tuple[int, str]:
    """`ray job submit` of `command` from the repo as working dir, waiting: the CLI follows the job's logs to the
    end and then prints its final status (`Job '<id>' succeeded` or `failed`, then exit status 1). (exit status,
    everything it printed)."""
    submitted = _ray(env, "job", "submit", "--address", address, "--working-dir", str(REPO),
                     "--submission-id", job_id, "--", *command, timeout=420)
    output = submitted.stdout + submitted.stderr
    assert f"Job '{job_id}' submitted successfully" in output, output[-6000:]
    assert re.search(f"Job '{job_id}' (succeeded|failed|was stopped)", output), f"no final status:\n{output[-6000:]}"
    return submitted.returncode, output


def _imports(record: Path) -> dict[str, set[int]]:
    """{module: the pids that imported it}, from tests/import_record/'s record."""
    imports: dict[str, set[int]] = {}
    for line in record.read_text().splitlines() if record.exists() else []:
        pid, module = line.split()
        imports.setdefault(module, set()).add(int(pid))
    return imports


def test_pretrain_as_a_ray_job(head, tmp_path, shakespeare_path):
    address, env = head
    record = Path(env["NANOGPT_IMPORT_RECORD"])
    record.unlink(missing_ok=True)
    out, data = tmp_path / "runs", tmp_path / "shards"
    code, logs = _submit_and_wait(address, env, "pretrain-debug", [
        "python", "pipelines/pretrain.py", "--config", "debug", "--train.max_iters=10", "--train.eval_interval=5",
        "--optim.lr_decay_iters=10", "--run.num_workers=2", f"--run.out_dir={out}", "--run.name=job",
        f"--data.dir={data}", f"--data.input={shakespeare_path}",  # no shards yet: the job prepares them
        "--sample=40", f"--export-nanogpt={tmp_path / 'ckpt.pt'}", f"--export-hf={tmp_path / 'hf'}",
    ])
    assert code == 0 and "Job 'pretrain-debug' succeeded" in logs, logs[-6000:]
    assert (data / "manifest.json").is_file()
    run_dir = out / "job"
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == ["checkpoint_000005", "checkpoint_000010"]
    assert f"best checkpoint: {run_dir / 'checkpoint_000010'} (step 10, val loss" in logs
    assert (tmp_path / "ckpt.pt").is_file() and (tmp_path / "hf" / "config.json").is_file()
    assert (run_dir / "metrics.jsonl").is_file()
    # Ray's public API only: the driver and both workers imported the trainer module, none a module of the wing
    imports = _imports(record)
    assert len(imports.get("pipelines.ray_adapter.trainer", set())) >= 3, imports
    assert [m for m in imports if m != "pipelines.ray_adapter.trainer"] == [], imports
    assert "Reporting training result" not in logs  # Ray Train's line of every report, quiet on the public path


def test_bad_config_job_fails_with_the_reason(head, tmp_path):
    address, env = head
    code, logs = _submit_and_wait(address, env, "pretrain-bad", [
        "python", "pipelines/pretrain.py", "--config", "debug", "--train.max_iter=5", f"--run.out_dir={tmp_path}",
    ])
    assert code == 1 and "Job 'pretrain-bad' failed" in logs, logs[-6000:]
    assert "unknown config key 'train.max_iter'; did you mean 'train.max_iters'" in logs

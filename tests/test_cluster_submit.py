"""End to end: a real local Ray cluster, a job submitted with ``ray job submit``.

This is how bifta runs in production (``infra/submit.sh``): the code of this checkout is
shipped with ``infra/runtime_env.yaml`` through the Ray Jobs API and ``python -m jobs.label``
runs as the job's driver on the cluster. The cluster here is one head node on 127.0.0.1,
started by this test, with the same virtualenv (so the "image" has every dependency).

Isolation from other Ray users on the machine (other tests, other developers):

* every port is a free one picked here, so no default port (6379, 8265, 10001, 52365...)
  is taken from, or collides with, anyone else;
* the cluster's temp dir (sockets, logs, the ``ray_current_cluster`` address file that a
  plain ``ray.init()`` would otherwise find and join) lives in a private folder;
* it is stopped by terminating the ``ray start --block`` process this test started (which
  kills the processes *it* spawned), never with ``ray stop``: ``ray stop`` has no
  address or temp-dir option and kills every Ray process on the machine.

Authentication: this Ray version supports token auth (``RAY_AUTH_MODE=token``). A new
cluster from ``ray.init()`` turns it on by default and writes ``~/.ray/auth_token``; ``ray
start --head`` turns it on whenever a token already exists (e.g. that file, left by any
earlier ``ray.init()``), but the ``ray job`` CLI sends the token only when
``RAY_AUTH_MODE=token`` is set in *its* environment. To be deterministic the test sets
the mode and a private token file (``RAY_AUTH_TOKEN_PATH``) explicitly for both sides,
and checks that the dashboard refuses a request without the token.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.s3_server import free_port

ROOT = Path(__file__).resolve().parent.parent
TEST_TIMEOUT_S = 300  # the whole test, cluster start to stop
START_TIMEOUT_S = 120


def _distinct_free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


@dataclass
class LocalCluster:
    dashboard_url: str
    gcs_address: str
    env: dict[str, str]  # environment for `ray job ...` clients (auth on)
    temp_dir: str
    log_path: Path


def _tail(path: Path, limit: int = 4000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-limit:]
    return ""


def _stop(process: subprocess.Popen) -> None:
    """Stop the `ray start --block` process we started and everything in its session."""
    if process.poll() is None:
        # SIGTERM lets `ray start --block` shut down the GCS, raylet, dashboard... it spawned.
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    # Anything left in the process group we created (start_new_session=True): by its id.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


@contextlib.contextmanager
def local_cluster(num_cpus: int = 2) -> Iterator[LocalCluster]:
    base = tempfile.mkdtemp(prefix="bifta-ray-", dir="/tmp")  # short: Unix socket paths max ~107 chars
    temp_dir = os.path.join(base, "ray")
    token_path = os.path.join(base, "auth_token")
    Path(token_path).write_text(secrets.token_hex(32))
    os.chmod(token_path, 0o600)

    (gcs_port, dash_port, client_port, nm_port, om_port, agent_http, agent_grpc, rtenv_port,
     metrics_port) = _distinct_free_ports(9)
    env = {
        **os.environ,
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        "RAY_TMPDIR": base,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": token_path,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(name, None)
    log_path = Path(base) / "ray-start.log"
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    cmd = [
        ray_bin, "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
        "--ray-client-server-port", str(client_port), "--node-manager-port", str(nm_port),
        "--object-manager-port", str(om_port), "--dashboard-agent-listen-port", str(agent_http),
        "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(rtenv_port),
        "--metrics-export-port", str(metrics_port), "--num-cpus", str(num_cpus), "--num-gpus", "0",
        "--temp-dir", temp_dir,
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=base,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{dash_port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        token = Path(token_path).read_text().strip()
        while True:
            if process.poll() is not None:
                pytest.fail(f"ray start exited with {process.returncode}:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                pytest.fail(f"Ray dashboard not up at {url} within {START_TIMEOUT_S}s:\n{_tail(log_path)}")
            request = urllib.request.Request(url + "/api/version", headers={"Authorization": f"Bearer {token}"})
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(1.0)
        yield LocalCluster(dashboard_url=url, gcs_address=f"127.0.0.1:{gcs_port}", env=env,
                           temp_dir=temp_dir, log_path=log_path)
    finally:
        _stop(process)
        shutil.rmtree(base, ignore_errors=True)


def _ray_job(cluster: LocalCluster, *args: str, timeout: float,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    command, *rest = args
    return subprocess.run([ray_bin, "job", command, "--log-style", "record", "--log-color", "false", *rest],
                          env=cluster.env if env is None else env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_ray_job_submit_labels_images(imagenet_sample: Path, tmp_path: Path) -> None:
    started = time.monotonic()

    def left() -> float:
        remaining = TEST_TIMEOUT_S - (time.monotonic() - started)
        if remaining <= 5:
            pytest.fail(f"cluster submission test exceeded {TEST_TIMEOUT_S}s")
        return remaining

    out = tmp_path / "labels"
    submission_id = f"bifta-test-{secrets.token_hex(4)}"
    with local_cluster() as cluster:
        # Token auth is really on: the Jobs API refuses a request without the token.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(cluster.dashboard_url + "/api/jobs/", timeout=10)
        assert refused.value.code in (401, 403)

        # ... and the `ray job` CLI sends the token only when its environment says RAY_AUTH_MODE=token
        # (a token file alone is not enough).
        no_mode = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_MODE"}
        listed = _ray_job(cluster, "list", "--address", cluster.dashboard_url, timeout=min(60, left()), env=no_mode)
        assert listed.returncode != 0
        assert "401" in listed.stdout + listed.stderr or "Authentication required" in listed.stdout + listed.stderr

        while True:
            submit = _ray_job(
                cluster, "submit", "--address", cluster.dashboard_url, "--submission-id", submission_id,
                "--working-dir", str(ROOT), "--runtime-env", str(ROOT / "infra" / "runtime_env.yaml"),
                "--", "python", "-m", "jobs.label", str(imagenet_sample / "images"),
                "--labels", "cat,dog", "--out", str(out), "--model", "bifta-tiny-vit", "--pretrained", "random",
                "--limit", "4", "--num-views", "4", "--quiet",
                timeout=left(),
            )
            logs = submit.stdout + submit.stderr
            # A busy machine: the node's job agent may register after the dashboard answers; the job
            # was not created, and Ray's answer says to try again (the same submission id is free).
            if submit.returncode == 0 or "No available agent to submit job" not in logs or left() < 60:
                break
            time.sleep(2)
        assert submit.returncode == 0, f"ray job submit failed ({submit.returncode}):\n{logs[-6000:]}"
        assert "succeeded" in logs.lower(), logs[-4000:]
        # The job ran the uploaded copy of this checkout, not the repository in place.
        assert "Uploading package gcs://_ray_pkg_" in logs or "already exists" in logs, logs[-4000:]

        status = _ray_job(cluster, "status", "--address", cluster.dashboard_url, submission_id, timeout=min(60, left()))
        assert status.returncode == 0, status.stderr[-2000:]
        assert "succeeded" in (status.stdout + status.stderr).lower(), status.stdout[-2000:]

        table = pq.read_table(str(out))
        assert table.num_rows == 4  # one label set, four images
        assert set(table.column("status").to_pylist()) == {"ok"}
        assert len(set(table.column("image_id").to_pylist())) == 4
        assert (out / "_bifta_summary.json").is_file()

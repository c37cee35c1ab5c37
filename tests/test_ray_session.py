"""pipelines/ray_adapter/session.py decides, before ray is imported, whether it starts a local instance (Ray reads the
loopback and token settings at its import), and knows afterwards whether this process started the Ray it uses;
which local instances run the dashboard (Ray's State API); and the lean wing's head without the monitor and API
server lasts only while the instance starts (tests/test_ray_exposure.py looks at their processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.ray_adapter import session
from pipelines.ray_adapter.lean.head import Node, head_without_extras

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("address, env, recorded, local", [
    (None, {}, False, True),
    (None, {}, True, False),  # the cluster `ray start` left on this machine
    (None, {"RAY_ADDRESS": "127.0.0.1:6379"}, False, False),  # `ray job submit` sets it
    (None, {"RAY_ADDRESS": "local"}, True, True),
    ("local", {"RAY_ADDRESS": "127.0.0.1:6379"}, True, True),
    ("auto", {}, False, False),  # whatever runs here, else Ray's error
    ("10.0.0.5:6379", {}, False, False),
    ("ray://head:10001", {}, False, False),
])
def test_which_address_starts_a_local_instance(tmp_path, monkeypatch, address, env, recorded, local):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if recorded:
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text("10.0.0.5:6379")
    assert session.starts_local_instance(address) is local


def test_the_entry_points_import_ray_only_through_init_ray():
    """Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER (loopback) and RAY_AUTH_MODE when it is imported: the drivers'
    modules, and the decision whether a local instance starts, must not import it first."""
    code = ("import sys\nimport pipelines.prepare, pipelines.pretrain, pipelines.tune, pipelines.ray_adapter.trainer\n"
            "from pipelines.ray_adapter import lean, lean_switch, session\n"
            "session.starts_local_instance(None); session.ray_is_up(); lean.usable()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.stdout.strip() == "[]"


def test_this_process_started_the_sessions_ray_and_a_task_did_not(ray_local):
    assert session.started_local_instance() is True  # the fixture's ray.init(address="local") in this process

    @ray_local.remote
    def in_a_task() -> bool:
        return session.started_local_instance()

    assert ray_local.get(in_a_task.remote()) is False


def test_only_an_instance_with_the_dashboard_names_its_state_api(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert session._dashboard_args(False) == {"include_dashboard": False}
    assert "RAY_API_SERVER_ADDRESS" not in os.environ
    with_dashboard = session._dashboard_args(True)
    assert with_dashboard["include_dashboard"] is True and with_dashboard["dashboard_host"] == "127.0.0.1"
    assert os.environ["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{with_dashboard['dashboard_port']}"


def test_leaving_out_the_head_extras_lasts_only_while_the_instance_starts():
    ray_own = Node.start_api_server, Node.start_monitor
    with pytest.raises(RuntimeError), head_without_extras(dashboard=False):
        assert Node.start_api_server != ray_own[0] and Node.start_monitor != ray_own[1]
        raise RuntimeError("ray.init failed")
    assert (Node.start_api_server, Node.start_monitor) == ray_own
    with head_without_extras(dashboard=True):  # the dashboard needs its API server, not the monitor
        assert Node.start_api_server == ray_own[0] and Node.start_monitor != ray_own[1]
    assert (Node.start_api_server, Node.start_monitor) == ray_own

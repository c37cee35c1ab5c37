"""Which local Ray instances run the dashboard (Ray's State API): a sweep driver's, which Ray Train's placement-group
cleaner asks about the trials Tune stops; a training job's own instance does without it and without the API server;
neither runs the autoscaler's monitor (tests/test_ray_exposure.py looks at their processes)."""

from __future__ import annotations

import os

import pytest
import ray

from pipelines.ray_adapter.session import LOCAL_INSTANCE_ENV, _head_without_extras, _prepare_local_instance


def test_only_a_sweep_asks_its_local_instance_for_the_dashboard(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    for key in LOCAL_INSTANCE_ENV:  # set by _prepare_local_instance; restored after the test
        monkeypatch.setenv(key, os.environ.get(key, LOCAL_INSTANCE_ENV[key]))
    constants = ray._private.ray_constants
    monkeypatch.setattr(constants, "ENABLE_RAY_CLUSTER", constants.ENABLE_RAY_CLUSTER)

    assert _prepare_local_instance(state_api=False) == {"include_dashboard": False}
    assert "RAY_API_SERVER_ADDRESS" not in os.environ
    sweep = _prepare_local_instance(state_api=True)
    assert sweep["include_dashboard"] is True and sweep["dashboard_host"] == "127.0.0.1"
    assert os.environ["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{sweep['dashboard_port']}"


def test_leaving_out_the_head_extras_lasts_only_while_the_instance_starts():
    node = ray._private.node.Node
    ray_own = node.start_api_server, node.start_monitor
    with pytest.raises(RuntimeError), _head_without_extras(state_api=False):
        assert node.start_api_server != ray_own[0] and node.start_monitor != ray_own[1]
        raise RuntimeError("ray.init failed")
    assert (node.start_api_server, node.start_monitor) == ray_own
    with _head_without_extras(state_api=True):  # a sweep's instance keeps its API server, not the monitor
        assert node.start_api_server == ray_own[0] and node.start_monitor != ray_own[1]
    assert (node.start_api_server, node.start_monitor) == ray_own

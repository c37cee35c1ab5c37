"""The cluster YAMLs are checked offline by Ray's own autoscaler schema; the KubeRay manifest by structure."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_cloud_cluster_yaml_passes_ray_validation(name):
    # Private API (pinned Ray): the same check `ray up` runs, with no cloud SDK or credentials.
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((CLUSTER / name).read_text()))
    validate_config(config)
    assert config["head_node_type"] in config["available_node_types"]
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start  # never exposed publicly; reach it via `ray dashboard`
    assert "pip install -q -e ~/nanogpt-ray" in " ".join(config["setup_commands"])


def test_ray_validation_catches_a_typo():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    config["head_node_type"] = "haed"
    with pytest.raises(ValueError, match="`head_node_type` must be one of `available_node_types`"):
        validate_config(prepare_config(config))
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    config["available_node_types"]["head"]["node_config"] = "m5.large"  # a string where a mapping belongs
    with pytest.raises(Exception, match="is not of type 'object'"):
        validate_config(prepare_config(config))


def test_fake_cluster_yaml_offers_cpu_and_gpu_nodes():
    config = yaml.safe_load((CLUSTER / "local-fake.yaml").read_text())
    assert config["provider"]["type"] == "fake_multinode"
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert any(t["resources"].get("GPU", 0) >= 1 and t["max_workers"] >= 1 for t in types.values())


def test_kuberay_manifest_autoscales_gpu_workers():
    manifest = yaml.safe_load((CLUSTER / "kuberay" / "raycluster-gpu.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayCluster")
    spec = manifest["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["rayVersion"] == "2.60.0"
    [gpu] = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"

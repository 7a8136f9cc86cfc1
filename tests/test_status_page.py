"""The status page at / in a real headless browser (Debian's chromium, driven by Playwright),
over two hosts and a gateway with an admin token; /status.json as scripts read it; and the
Grafana dashboard in deploy/, whose queries may name only metrics the servers export."""

import json
import os
import re
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from airouter.v1 import gateway_pb2, gateway_pb2_grpc, model_host_pb2, model_host_pb2_grpc
from gateway.server import start_gateway
from modelhost.config import HostConfig, embedded_model_config
from modelhost.server import start_host
from tests.conftest import CONTEXT, LoopThread, gateway_config, wait_for_health, wait_until
from tests.streaming import gateway_request

CHROMIUM = "/usr/bin/chromium"
ADMIN = "page-admin-token-51c2"
DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana" / "airouter.json"


@dataclass
class Cluster:
    loop: LoopThread
    hosts: list[Any]
    gateway: Any
    http: str
    host_metrics: list[str]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp("page")
    (directory / "admin").write_text(ADMIN)
    loop = LoopThread()
    hosts, metrics = [], []
    for preload in (True, False):
        model = embedded_model_config().model_copy(
            update={"context_length": CONTEXT, "slots": 2, "batch_tokens": 128, "preload": preload}
        )
        config = HostConfig(
            listen="127.0.0.1:0", device="cpu", cache_dir=Path.home() / ".cache" / "airouter",
            models=[model], metrics_listen="127.0.0.1:0",
        )  # fmt: skip
        host = loop.run(start_host(config, "cpu"))
        wait_for_health(f"127.0.0.1:{host.port}")
        hosts.append(host)
        assert host.metrics is not None
        metrics.append(f"http://127.0.0.1:{host.metrics.port}/metrics")
    config = gateway_config(
        [f"127.0.0.1:{h.port}" for h in hosts],
        http_listen="127.0.0.1:0",
        admin_token_file=directory / "admin",
    )
    gateway = loop.run(start_gateway(config))
    assert gateway.http is not None
    yield Cluster(loop, hosts, gateway, f"http://127.0.0.1:{gateway.http.port}", metrics)
    loop.run(gateway.stop(0))
    for host in hosts:
        loop.run(host.stop(0))
    loop.close()


def _status(cluster: Cluster, token: str | None = ADMIN) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(cluster.http + "/status.json", headers=headers)
    with urllib.request.urlopen(request, timeout=30) as answer:
        found: dict[str, Any] = json.loads(answer.read())
        return found


def test_status_json_needs_the_admin_token_and_holds_no_secret(cluster: Cluster) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        _status(cluster, token=None)
    assert refused.value.code == 401
    status = _status(cluster)
    assert {h["address"] for h in status["hosts"]} == {f"127.0.0.1:{h.port}" for h in cluster.hosts}
    assert ADMIN not in json.dumps(status)
    with urllib.request.urlopen(cluster.http + "/", timeout=30) as page:  # the page is open
        assert b"<title>airouter</title>" in page.read()


@pytest.mark.skipif(
    not Path(CHROMIUM).exists() or shutil.which("chromium") is None,
    reason="Debian's chromium is not installed (apt install chromium)",
)
def test_the_page_follows_the_cluster_live(cluster: Cluster, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    first, second = (f"127.0.0.1:{h.port}" for h in cluster.hosts)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 420, "height": 900})  # a phone's width
        page.goto(cluster.http + "/")
        expect(page.locator("#login")).to_be_visible()  # it asks for the admin token
        page.fill("#token", ADMIN)
        page.click("#login button")
        expect(page.locator(f'[data-host="{first}"]')).to_be_visible()
        expect(page.locator(f'[data-host="{second}"]')).to_be_visible()
        model = page.locator(f'[data-host="{second}"] [data-model="gemma-3-270m"] [data-state]')
        expect(model).to_have_attribute("data-state", "not_loaded")
        with grpc.insecure_channel(second) as channel:
            model_host_pb2_grpc.ModelHostStub(channel).LoadModel(
                model_host_pb2.LoadModelRequest(model="gemma-3-270m")
            )
        expect(model).to_have_attribute("data-state", "ready", timeout=30_000)

        with grpc.insecure_channel(f"127.0.0.1:{cluster.gateway.port}") as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            # Long enough for the page's polls (every 2 s) to see it between 0 and 12 on a
            # fast machine too: 24 tokens an item ended in under 4 s on a Xeon.
            items = [
                gateway_pb2.BatchItem(
                    custom_id=f"i{i}", request=gateway_request(prompt="Count:", max_tokens=96)
                )
                for i in range(12)
            ]
            admin = (("authorization", f"Bearer {ADMIN}"),)
            batch = stub.SubmitBatch(gateway_pb2.SubmitBatchRequest(items=items), metadata=admin)
        bar = page.locator(f'[data-batch="{batch.batch.id}"] [data-progress]')
        seen: set[int] = set()

        def progressed() -> bool:
            seen.add(int(bar.get_attribute("data-progress") or 0))
            return 12 in seen

        wait_until(progressed, timeout=120)
        assert len(seen) > 2, f"the bar never moved in between: {sorted(seen)}"

        screenshot = os.environ.get("AIROUTER_SCREENSHOT")
        page.screenshot(path=screenshot or str(tmp_path / "status.png"), full_page=True)

        cluster.loop.run(cluster.hosts[1].stop(0))
        down = page.locator(f'[data-host="{second}"] > [data-state]')
        expect(down).to_have_attribute("data-state", "down", timeout=30_000)
        expect(page.locator(f'[data-host="{second}"] [data-detail]')).not_to_be_empty()
        browser.close()


def test_the_grafana_dashboard_names_only_metrics_the_servers_export(cluster: Cluster) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert len(expressions) >= 8
    named = {m for e in expressions for m in re.findall(r"\bairouter_[a-z_]+", e)}
    request = urllib.request.Request(
        cluster.http + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}
    )
    exported: set[str] = set()
    for source in [request, cluster.host_metrics[0]]:  # the first host stays up throughout
        with urllib.request.urlopen(source, timeout=30) as answer:
            for line in answer.read().decode().splitlines():
                if line.startswith("# TYPE "):
                    name, kind = line.split()[2:4]
                    exported.add(name)
                    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
                    exported.update(name + s for s in suffixes.get(kind, []))
    assert named and named <= exported, sorted(named - exported)

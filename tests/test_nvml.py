"""NVML telemetry per GPU, against a fake NVML: host status, `airouter status` and /metrics.
(The real NVML ran once on an H200: see the README's CUDA check.)"""

import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from airouter.cli import format_status
from modelhost.memory import MemoryProbe
from modelhost.metrics import HostCollector
from modelhost.servicer import host_status_pb

GIB = 1 << 30


@dataclass
class _Board:
    name: str | bytes
    total: int
    used: int
    busy: int
    celsius: int
    milliwatts: int | None  # None: the board does not report power


BOARDS = [
    _Board("NVIDIA GeForce RTX 3090", 24 * GIB, 6 * GIB, 37, 61, 275_000),
    _Board(b"NVIDIA A2", 16 * GIB, 1 * GIB, 0, 40, None),
]


class _NVMLError(Exception):
    pass


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = _NVMLError  # type: ignore[attr-defined]
    nvml.NVML_TEMPERATURE_GPU = 0  # type: ignore[attr-defined]
    nvml.nvmlInit = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetCount = lambda: len(BOARDS)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = lambda i: BOARDS[i]  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetName = lambda b: b.name  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetMemoryInfo = lambda b: SimpleNamespace(  # type: ignore[attr-defined]
        total=b.total, used=b.used, free=b.total - b.used
    )
    nvml.nvmlDeviceGetUtilizationRates = lambda b: SimpleNamespace(  # type: ignore[attr-defined]
        gpu=b.busy, memory=0
    )
    nvml.nvmlDeviceGetTemperature = lambda b, sensor: b.celsius  # type: ignore[attr-defined]

    def power(board: _Board) -> int:
        if board.milliwatts is None:
            raise _NVMLError("Not Supported")
        return board.milliwatts

    nvml.nvmlDeviceGetPowerUsage = power  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    yield nvml


def status_with(probe: MemoryProbe):  # type: ignore[no-untyped-def]
    residency = SimpleNamespace(
        memory=probe,
        stats=SimpleNamespace(
            hits=0, misses=0, evictions=0, loads=0, load_failures=0, load_seconds=0.0
        ),
        device="cuda",
        budget_bytes=30 * GIB,
        models_bytes=lambda: 0,
        models=[],
        draining=False,
    )
    return host_status_pb(residency)  # type: ignore[arg-type]


def test_every_gpu_is_read_and_a_missing_figure_is_zero(fake_nvml: types.ModuleType) -> None:
    probe = MemoryProbe("cuda")
    memory = probe.read()
    assert (memory.total, memory.used) == (40 * GIB, 7 * GIB)  # the budget's view, all GPUs
    first, second = probe.gpus()
    assert (first.index, first.name, first.utilization_percent) == (0, BOARDS[0].name, 37)
    assert (first.temperature_celsius, first.power_watts) == (61, 275.0)
    assert second.name == "NVIDIA A2" and second.power_watts == 0.0  # bytes decoded, no power
    assert MemoryProbe("cpu").gpus() == []


def test_host_status_the_status_table_and_metrics_show_each_gpu(
    fake_nvml: types.ModuleType,
) -> None:
    status = status_with(MemoryProbe("cuda"))
    assert [g.name for g in status.gpus] == ["NVIDIA GeForce RTX 3090", "NVIDIA A2"]
    assert status.gpus[0].memory_used_bytes == 6 * GIB
    table = format_status(status)
    assert "gpu 0 NVIDIA GeForce RTX 3090: 6.0 GiB of 24.0 GiB used, 37% busy, 61 C, 275 W" in (
        table
    )
    assert "gpu 1 NVIDIA A2: 1.0 GiB of 16.0 GiB used, 0% busy, 40 C, 0 W" in table
    samples = {
        (s.name, s.labels.get("gpu")): s.value
        for family in HostCollector(lambda: status).collect()
        for s in family.samples
    }
    assert samples["airouter_modelhost_gpu_utilization_ratio", "0"] == pytest.approx(0.37)
    assert samples["airouter_modelhost_gpu_memory_total_bytes", "1"] == 16 * GIB
    assert samples["airouter_modelhost_gpu_temperature_celsius", "0"] == 61
    assert samples["airouter_modelhost_gpu_power_watts", "0"] == 275.0


def test_a_cpu_host_reports_no_gpus() -> None:
    status = status_with(MemoryProbe("cpu"))
    assert not status.gpus
    assert "gpu " not in format_status(status)

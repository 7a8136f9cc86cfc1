"""models.toml: every mistake is refused at start with the line and the field it is in."""

import tomllib
from pathlib import Path

import pytest

from modelhost.config import ConfigError, HostConfig, load_config
from modelhost.engines import engine_kind

ROOT = Path(__file__).resolve().parent.parent


def config_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "models.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[[models]]\nname = "a"\n\n[[models]]\nname = "b"\nslots = 0\n',
            "line 6, models[1].slots: Input should be greater than or equal to 1",
        ),
        ('[[models]]\nname = "a"\nkeep_alive = -5\n', "line 3, models[0].keep_alive: Value error"),
        (
            '[[models]]\nname = "a"\ncache_type_k = "q5_1"\n',
            "line 3, models[0].cache_type_k: Input should be 'f16', 'q8_0' or 'q4_0'",
        ),
        (
            '[[models]]\nname = "a"\ncache_type_v = "q8_0"\nflash_attention = false\n',
            "line 1, models[0]: Value error, cache_type_v = 'q8_0' needs flash attention",
        ),
        ("[[models]]\nslots = 2\n", "line 1, models[0].name: Field required"),
        ('memory_budget = "lots"\n', "line 1, memory_budget: Value error, 'lots' is not a size"),
        ('memory_reserve = "150%"\n', "line 1, memory_reserve: Value error, '150%' is not a share"),
        (
            '[[models]]\nname = "a"\n[[models]]\nname = "b"\naliases = ["a"]\n',
            "the name 'a' is used by both 'a' and 'b'",
        ),
        (
            '[[models]]\nname = "m"\nengine = "mlx"\ngpu_layers = 10\nflash_attention = true\n',
            "line 1, models[0]: Value error, flash_attention, gpu_layers: llama.cpp settings, "
            "which the MLX engine that runs this model does not have",
        ),
        (
            '[[models]]\nname = "m"\nengine = "mlx"\nsample_in_graph = true\n',
            "line 1, models[0]: Value error, sample_in_graph: llama.cpp settings",
        ),
        (
            '[[models]]\nname = "e"\nkind = "embedding"\nsample_in_graph = true\n',
            "line 1, models[0]: Value error, sample_in_graph: an embedding model samples no tokens",
        ),
        (
            '[[models]]\nname = "a"\nengine = "vllm"\n',
            "line 3, models[0].engine: Value error, unknown engine 'vllm'; use auto, llama.cpp, "
            "mlx",
        ),
    ],
)
def test_a_bad_config_names_the_line_and_field(tmp_path: Path, text: str, expected: str) -> None:
    message = config_error(tmp_path, text)
    assert expected in message, message
    assert str(tmp_path / "models.toml") in message


def test_a_missing_model_file_names_its_line(tmp_path: Path) -> None:
    message = config_error(tmp_path, '[[models]]\nname = "a"\n\npath = "nowhere.gguf"\n')
    assert "line 4, models[0].path" in message and "nowhere.gguf does not exist" in message


def test_sizes_and_shares_are_understood(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text('memory_budget = "1.5GiB"\nmemory_reserve = "2 GiB"\n')
    config = load_config(path)
    assert config.memory_budget == "1.5GiB" and config.memory_reserve == "2 GiB"
    assert config.models[0].preload  # the embedded default loads at start


def test_the_shipped_example_is_a_valid_config() -> None:
    data = tomllib.loads((ROOT / "deploy" / "models.example.toml").read_text())
    config = HostConfig.model_validate(data)
    names = [m.name for m in config.models]
    assert names == ["gemma-3-270m", "qwen2.5-7b", "qwen2.5-coder-14b", "qwen2.5-7b-mlx"]
    assert config.models[0].pinned and config.models[1].cache_type_v == "q8_0"
    assert config.models[3].engine == "auto"


def test_an_mlx_model_directory_is_a_model_path(tmp_path: Path) -> None:
    (tmp_path / "gemma-mlx").mkdir()
    path = tmp_path / "models.toml"
    path.write_text('[[models]]\nname = "a"\npath = "gemma-mlx"\n')
    model = load_config(path).models[0]
    assert model.path == tmp_path / "gemma-mlx"
    assert engine_kind(model) == "mlx"
    assert engine_kind(model.model_copy(update={"engine": "llama.cpp"})) == "llama.cpp"

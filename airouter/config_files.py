"""Reading a TOML config into a pydantic model, with errors that name the line and field."""

import tomllib
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

ModelT = TypeVar("ModelT", bound=BaseModel)


class ConfigError(Exception):
    """The config cannot be used; the message names the file, the line, the key and the fix."""


def load_toml_config(
    cls: type[ModelT], path: Path | None, overrides: dict[str, object]
) -> tuple[ModelT, str]:
    """Reads the TOML file (if any), applies the flags that were given (None: not given), and
    validates; returns the config and the file's text (for where())."""
    data: dict[str, object] = {}
    text = ""
    if path is not None:
        try:
            text = path.read_text()
            data = tomllib.loads(text)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls.model_validate(data), text
    except ValidationError as exc:
        problems = "; ".join(
            f"{where(text, err['loc'])}{key(err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{path or 'flags'}: {problems}") from exc


def key(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as the TOML reader sees it: models[0].slots."""
    key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)
    return key.lstrip(".") or "config"


def where(text: str, loc: tuple[int | str, ...]) -> str:
    """'line N, ' for the TOML line that sets loc (or opens its table); '' when not found.

    tomllib keeps no positions, so this follows the layout `[[models]]` tables are written in:
    the n-th `[[models]]` header, then its `key =` line.
    """
    lines = text.splitlines()
    start, end = 0, len(lines)
    keys = [part for part in loc if isinstance(part, str)]
    index = loc[1] if len(loc) >= 2 else None
    in_table = isinstance(index, int)
    if isinstance(index, int):
        headers = [i for i, line in enumerate(lines) if line.strip() == f"[[{loc[0]}]]"]
        if index >= len(headers):
            return ""
        start = headers[index]
        later = [i for i, line in enumerate(lines) if i > start and line.lstrip().startswith("[")]
        end = later[0] if later else len(lines)
        keys = keys[1:]
    elif loc:
        tables = [i for i, line in enumerate(lines) if line.lstrip().startswith("[")]
        end = tables[0] if tables else len(lines)
    if keys:
        for i in range(start, end):
            name = lines[i].split("=", 1)[0].strip()
            if "=" in lines[i] and name == keys[0]:
                return f"line {i + 1}, "
    return f"line {start + 1}, " if in_table else ""

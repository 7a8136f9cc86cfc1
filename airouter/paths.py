"""Where airouter keeps its state by default: a module without imports of its own, for the
commands that must start fast (`airouter up`) as much as for the gateway."""

import os
from pathlib import Path


def default_batch_db() -> Path:
    """$XDG_STATE_HOME/airouter/batches.sqlite3 (~/.local/state when unset)."""
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "airouter" / "batches.sqlite3"


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/airouter (~/.cache when unset): the embedded models, assembled."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "airouter"

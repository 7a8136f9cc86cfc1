"""airouter: shared pieces of the gateway and the modelhost (protocol stubs, errors, logging)."""

import argparse
import os
from collections.abc import Sequence
from typing import Any

LOG_LEVELS = ("debug", "info", "warning", "error")


def installed_version() -> str:
    """The installed airouter's version; "unknown" from a source tree never installed."""
    # Imported here: importlib.metadata costs every command's start some 40 ms.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("airouter")
    except PackageNotFoundError:
        return "unknown"


class _VersionAction(argparse.Action):
    """argparse's "version" action, looking the version up only when it is asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(f"{parser.prog} {installed_version()}")  # on stdout, as argparse's own
        parser.exit()


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """--version, on every command."""
    parser.add_argument("--version", action=_VersionAction)


def add_log_level_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level", default="info", choices=LOG_LEVELS, help="least severe lines logged"
    )


def import_numpy_with_one_blas_thread() -> None:
    """Imports numpy with its bundled OpenBLAS on one thread. Loaded as it is, that OpenBLAS
    starts a thread per core and they spin: about 0.15 s of CPU at each server's start, taken
    from the model's load on a two-core machine, for no gain (numpy does no linear algebra
    here worth threads). The variable is put back afterwards, so that a BLAS loaded later
    (MLX's) still uses every core; a value the user set is left as it is."""
    set_by_user = "OPENBLAS_NUM_THREADS" in os.environ
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        import numpy  # noqa: F401
    finally:
        if not set_by_user:
            del os.environ["OPENBLAS_NUM_THREADS"]

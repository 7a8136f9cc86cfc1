"""airouter: shared pieces of the gateway and the modelhost (protocol stubs, errors, logging)."""

import argparse
from importlib.metadata import PackageNotFoundError, version

LOG_LEVELS = ("debug", "info", "warning", "error")


def installed_version() -> str:
    """The installed airouter's version; "unknown" from a source tree never installed."""
    try:
        return version("airouter")
    except PackageNotFoundError:
        return "unknown"


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """--version, on every command."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}")


def add_log_level_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level", default="info", choices=LOG_LEVELS, help="least severe lines logged"
    )

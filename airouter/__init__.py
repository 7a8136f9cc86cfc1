"""airouter: shared pieces of the gateway and the modelhost (protocol stubs, errors, logging)."""

import argparse
from importlib.metadata import PackageNotFoundError, version

LOG_LEVELS = ("debug", "info", "warning", "error")


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """--version, on every command."""
    try:
        installed = version("airouter")
    except PackageNotFoundError:  # run from a source tree that was never installed
        installed = "unknown"
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed}")


def add_log_level_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level", default="info", choices=LOG_LEVELS, help="least severe lines logged"
    )

"""Folders the tests write in (batch databases, the servers' files), all inside one that is
removed when the test run ends: runs leave nothing behind in the system's temporary folder."""

import tempfile
from pathlib import Path

_ROOT = tempfile.TemporaryDirectory(prefix="airouter-tests-")


def scratch_dir() -> Path:
    """A new, empty folder for one test's files."""
    return Path(tempfile.mkdtemp(dir=_ROOT.name))

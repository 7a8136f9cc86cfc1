"""The committed stubs in airouter/v1/ are exactly what protos/generate.py makes now."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "generate_protos", ROOT / "protos" / "generate.py"
    )
    assert spec is not None and spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)

    fresh = {p.name: p.read_bytes() for p in generator.generate(tmp_path)}
    committed = {p.name: p.read_bytes() for p in (ROOT / "airouter" / "v1").glob("*_pb2*.py*")}
    assert fresh, "protoc produced nothing"
    stale = sorted(
        name for name in fresh.keys() | committed.keys() if fresh.get(name) != committed.get(name)
    )
    assert not stale, f"stale stubs {stale}: run `python protos/generate.py` and commit the result"

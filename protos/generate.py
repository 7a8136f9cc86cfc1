"""Regenerates the Python stubs in airouter/v1/ from protos/airouter/v1/*.proto.

Run `python protos/generate.py` after editing a .proto; tests/test_protos.py fails while the
committed stubs differ from what this produces.
"""

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def generate(out_dir: Path) -> list[Path]:
    """Writes the stubs under out_dir (as out_dir/airouter/v1/...) and returns their paths."""
    protos = sorted(PROTO_ROOT.glob("airouter/v1/*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            *(str(p) for p in protos),
        ]
    )
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    return sorted((out_dir / "airouter" / "v1").glob("*_pb2*.py*"))


if __name__ == "__main__":
    for path in generate(ROOT):
        print(path.relative_to(ROOT))
    sys.exit(0)

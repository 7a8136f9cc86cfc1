"""The `gateway` command: numpy is imported first, with one BLAS thread
(airouter.import_numpy_with_one_blas_thread), then the gateway."""

import sys

from airouter import import_numpy_with_one_blas_thread


def main() -> int:
    import_numpy_with_one_blas_thread()
    from gateway.cli import main as cli

    return cli()


if __name__ == "__main__":
    sys.exit(main())

"""The `modelhost` command. `serve` first starts loading its first preloaded model's weights
(modelhost.early_load), then imports the rest of the modelhost while they load."""

import sys

from airouter import import_numpy_with_one_blas_thread


def main() -> int:
    import_numpy_with_one_blas_thread()
    if sys.argv[1:2] == ["serve"]:
        from modelhost import early_load

        early_load.start(sys.argv[2:])
    from modelhost.cli import main as cli

    return cli()


if __name__ == "__main__":
    sys.exit(main())

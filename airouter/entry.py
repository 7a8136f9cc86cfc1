"""The `airouter` command: `up` starts at once, everything else goes to the full CLI."""

import sys


def main() -> int:
    if sys.argv[1:2] == ["up"]:
        from airouter.up import main as up

        return up(sys.argv[2:])
    from airouter.cli import main as cli

    return cli()


if __name__ == "__main__":
    sys.exit(main())

"""`modelhost serve`: keep models resident on this machine and stream their tokens.
`modelhost convert-gguf`: turn a GGUF into an MLX model directory for the MLX engine."""

import argparse
import signal
import sys
from pathlib import Path

import structlog

from airouter import add_common_flags, add_log_level_flag, grpc_server
from airouter.config_files import ConfigError
from airouter.logs import configure_logging
from airouter.security import SecurityError, add_security_flags, security_flags
from airouter.tracing import add_tracing_flag, tracing_for
from modelhost.config import DEFAULT_LISTEN, load_config
from modelhost.device import DEVICES, DeviceError, resolve_device
from modelhost.server import start_host

_log = structlog.get_logger()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelhost", description=__doc__)
    add_common_flags(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the configured models over gRPC")
    serve.add_argument("--listen", help=f"HOST:PORT to listen on (default {DEFAULT_LISTEN})")
    serve.add_argument("--device", choices=DEVICES, help="where to decode (default auto)")
    serve.add_argument("--config", type=Path, help="models.toml; default: the two embedded models")
    serve.add_argument("--metrics-listen", help="HOST:PORT for Prometheus /metrics (default: none)")
    serve.add_argument(
        "--memory-budget", help="memory the models may use, e.g. 6GiB (default: all but 15%%)"
    )
    add_security_flags(serve)
    add_tracing_flag(serve)
    add_log_level_flag(serve)
    convert = commands.add_parser(
        "convert-gguf",
        help="convert a GGUF (Gemma 3) into an mlx-lm model directory",
        description="Dequantizes the GGUF's weights, renames them as mlx-lm loads them, "
        "rebuilds the tokenizer from its vocabulary and quantizes again with mlx-lm.",
    )
    convert.add_argument("gguf", type=Path, help="the GGUF file")
    convert.add_argument(
        "out", type=Path, help="the directory to write (a new one, or one it wrote before)"
    )
    convert.add_argument(
        "--quantize",
        choices=["q8", "q4", "none"],
        default="q8",
        help="q8 (default) keeps greedy output equal to llama.cpp's; none keeps float32, "
        "fastest on a CPU with a BLAS; q4 of already-quantized weights drifts",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "convert-gguf":
        return _convert(args)

    configure_logging(args.log_level)
    with tracing_for("airouter-modelhost", args.otlp_endpoint):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        config = load_config(
            args.config,
            listen=args.listen,
            device=args.device,
            metrics_listen=args.metrics_listen,
            memory_budget=args.memory_budget,
            **security_flags(args),
        )
        device = resolve_device(config.device)
    except (ConfigError, DeviceError, SecurityError) as exc:
        print(f"modelhost: {exc}", file=sys.stderr)
        return 2
    try:
        grpc_server.run(_serve(config, device))
    except SecurityError as exc:
        print(f"modelhost: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"modelhost: {exc}", file=sys.stderr)
        return 1
    return 0


def _convert(args: argparse.Namespace) -> int:
    try:
        from tqdm import tqdm

        from modelhost.engines.mlxlm.convert import ConversionError, convert_gguf
    except ImportError as exc:
        print(f"modelhost: {exc.name} is missing; pip install 'airouter[mlx]'", file=sys.stderr)
        return 2
    if not args.gguf.is_file():
        print(f"modelhost: {args.gguf} is not a file", file=sys.stderr)
        return 2

    def progress(items, total, what):  # type: ignore[no-untyped-def]
        return tqdm(items, total=total, unit=" " + what, file=sys.stderr)

    # SIGTERM ends the conversion as Ctrl-C does: its staging directory is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        out = convert_gguf(args.gguf, args.out, quantize=args.quantize, progress=progress)
    except ConversionError as exc:
        print(f"modelhost: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("modelhost: interrupted; OUT is as it was", file=sys.stderr)
        return 130
    # Absolute: models.toml resolves a relative path against its own folder, not this one.
    out = out.absolute()
    print(f'wrote {out}; serve it with path = "{out}" in models.toml', file=sys.stderr)
    return 0


async def _serve(config, device: str) -> None:  # type: ignore[no-untyped-def]
    host = await start_host(config, device)
    _log.info(
        "modelhost_serving",
        listen=config.listen,
        port=host.port,
        device=device,
        metrics_port=host.metrics.port if host.metrics else None,
        models=[m.name for m in config.models],
    )
    await grpc_server.serve_until_signalled(
        host.server,
        host.health,
        config.shutdown_grace_s,
        host.close,
        on_draining=host.residency.drain,
    )


if __name__ == "__main__":
    sys.exit(main())

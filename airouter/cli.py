"""`airouter`: talk to a gateway from the shell.

airouter generate "Why is the sky blue?"     tokens as they arrive
airouter generate --json "..."               one JSON object per event
airouter models                              the models the gateway can reach
"""

import argparse
import json
import os
import sys

import grpc
from google.protobuf import json_format

from airouter.v1 import gateway_pb2, gateway_pb2_grpc, generate_pb2

DEFAULT_GATEWAY = "127.0.0.1:50050"
DEFAULT_MODEL = "gemma-3-270m"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="airouter", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--gateway",
        default=os.environ.get("AIROUTER_GATEWAY", DEFAULT_GATEWAY),
        help="gateway HOST:PORT (default $AIROUTER_GATEWAY or %(default)s)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate text from a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=DEFAULT_MODEL)
    gen.add_argument("--max-tokens", type=int)
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[], help="stop string; repeatable")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, not as a chat turn")
    gen.add_argument("--json", action="store_true", help="print one JSON object per event")

    models = commands.add_parser("models", help="list the models the gateway can reach")
    models.add_argument("--json", action="store_true")

    args = parser.parse_args(argv)
    with grpc.insecure_channel(args.gateway) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        try:
            if args.command == "generate":
                return _generate(stub, args)
            return _models(stub, args)
        except grpc.RpcError as exc:
            print(f"airouter: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130


def _generate(stub: gateway_pb2_grpc.GatewayStub, args: argparse.Namespace) -> int:
    request = gateway_pb2.GatewayGenerateRequest(
        model=args.model,
        sampling=generate_pb2.SamplingParameters(temperature=args.temperature, seed=args.seed),
        stopping=generate_pb2.StoppingCriteria(max_tokens=args.max_tokens, stop=args.stop),
    )
    if args.raw:
        request.prompt = args.prompt
    else:
        request.chat.messages.add(role="user", content=args.prompt)
    finished = None
    for response in stub.Generate(request):
        if args.json:
            print(json.dumps(json_format.MessageToDict(response)), flush=True)
        elif response.HasField("token"):
            sys.stdout.write(response.token.text)
            sys.stdout.flush()
        if response.HasField("finished"):
            finished = response.finished
    if finished is None:
        print("airouter: the stream ended without a final message", file=sys.stderr)
        return 1
    if not args.json:
        print()
    if finished.reason == generate_pb2.FINISH_REASON_ERROR:
        print(f"airouter: generation failed: {finished.error_message}", file=sys.stderr)
        return 1
    return 0


def _models(stub: gateway_pb2_grpc.GatewayStub, args: argparse.Namespace) -> int:
    response = stub.ListModels(gateway_pb2.GatewayListModelsRequest())
    if args.json:
        print(json.dumps(json_format.MessageToDict(response), indent=2))
        return 0
    print(f"{'MODEL':<24} {'STATE':<11} {'CONTEXT':>7} {'SLOTS':>5}  HOSTS")
    for m in response.models:
        state = generate_pb2.ModelState.Name(m.state).removeprefix("MODEL_STATE_").lower()
        print(f"{m.name:<24} {state:<11} {m.context_length:>7} {m.slots:>5}  {', '.join(m.hosts)}")
    for host in response.unreachable_hosts:
        print(f"(unreachable: {host})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

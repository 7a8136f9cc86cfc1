"""`airouter batch ...`: run OpenAI batch files through the gateway.

airouter batch submit requests.jsonl --wait -o results.jsonl
airouter batch results BATCH_ID -o results.jsonl     (resumes where a dropped stream ended)
airouter batch status BATCH_ID | list | cancel BATCH_ID
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import IO

import grpc

from airouter.batch_file import batch_output, read_batch_file
from airouter.errors import InvalidArgument
from airouter.labels import JSON_HELP, enum_label, message_json
from airouter.v1 import gateway_pb2, gateway_pb2_grpc

# A results stream that drops (the gateway restarts) is resumed for this long.
RESUME_FOR_S = 60.0


BATCH_ID_HELP = "the batch's id, as submit printed it (batch list shows them all)"


def add_batch_commands(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    batch = commands.add_parser("batch", help="run an OpenAI batch file (JSONL) on the hosts")
    actions = batch.add_subparsers(dest="batch_command", required=True)
    submit = actions.add_parser("submit", help="store a batch file at the gateway and run it")
    submit.add_argument("file", type=Path, help="OpenAI batch input: {custom_id, url, body}")
    submit.add_argument("--id", default="", help="your id for the batch (safe to resubmit)")
    submit.add_argument("--wait", action="store_true", help="then write the results")
    submit.add_argument("-o", "--output", type=Path, help="results file (default stdout)")
    results = actions.add_parser("results", help="write a batch's results as OpenAI JSONL")
    results.add_argument("batch_id", help=BATCH_ID_HELP)
    results.add_argument("-o", "--output", type=Path, help="results file (default stdout)")
    status = actions.add_parser("status", help="a batch's state and counts")
    status.add_argument("batch_id", help=BATCH_ID_HELP)
    status.add_argument("--json", action="store_true", help=JSON_HELP)
    listing = actions.add_parser("list", help="every stored batch, newest first")
    listing.add_argument("--json", action="store_true", help=JSON_HELP)
    cancel = actions.add_parser("cancel", help="stop a batch")
    cancel.add_argument("batch_id", help=BATCH_ID_HELP)


def run_batch(stub: gateway_pb2_grpc.GatewayStub, args: argparse.Namespace) -> int:
    command = args.batch_command
    if command == "submit":
        try:
            items = read_batch_file(args.file)
        except (OSError, InvalidArgument) as exc:
            print(f"airouter: {args.file}: {exc}", file=sys.stderr)
            return 2
        response = stub.SubmitBatch(gateway_pb2.SubmitBatchRequest(batch_id=args.id, items=items))
        if not args.wait and args.output is None:
            print(f"{len(items)} items stored", file=sys.stderr)
            print(response.batch.id)  # the one line a script reads
            return 0
        print(f"{response.batch.id}  {len(items)} items stored", file=sys.stderr)
        return write_results(stub, response.batch.id, args.output)
    if command == "results":
        return write_results(stub, args.batch_id, args.output)
    if command == "status":
        batch = stub.GetBatch(gateway_pb2.GetBatchRequest(batch_id=args.batch_id)).batch
        print(message_json(batch) if args.json else format_batch(batch))
        return 0
    if command == "list":
        batches = stub.ListBatches(gateway_pb2.ListBatchesRequest()).batches
        for batch in batches:
            print(message_json(batch) if args.json else format_batch(batch))
        return 0
    batch = stub.CancelBatch(gateway_pb2.CancelBatchRequest(batch_id=args.batch_id)).batch
    print(format_batch(batch))
    return 0


def write_results(stub: gateway_pb2_grpc.GatewayStub, batch_id: str, output: Path | None) -> int:
    """Streams the results into the OpenAI output format, resuming after a dropped stream;
    progress on stderr. Exits 1 when an item failed."""
    batch = stub.GetBatch(gateway_pb2.GetBatchRequest(batch_id=batch_id)).batch
    created = batch.created_at.seconds
    out: IO[str] = output.open("w") if output else sys.stdout
    last, counts, dropped_at = 0, batch.counts, None
    try:
        while True:
            request = gateway_pb2.StreamBatchResultsRequest(batch_id=batch_id, after_sequence=last)
            try:
                for message in stub.StreamBatchResults(request):
                    line = batch_output(message.result, batch_id, created)
                    out.write(json.dumps(line, separators=(",", ":")) + "\n")
                    last, counts, dropped_at = message.result.sequence, message.counts, None
                    _progress(counts)
                break
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                dropped_at = dropped_at or time.monotonic()
                if time.monotonic() - dropped_at > RESUME_FOR_S:
                    raise
                time.sleep(1.0)  # the gateway may be restarting: resume after `last`
    finally:
        if output:
            out.close()
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    print(
        f"{batch_id}: {counts.succeeded} succeeded, {counts.failed} failed, "
        f"{counts.cancelled} cancelled of {counts.total}",
        file=sys.stderr,
    )
    return 1 if counts.failed else 0


def _progress(counts: gateway_pb2.BatchCounts) -> None:
    if not sys.stderr.isatty():
        return
    done = counts.succeeded + counts.failed + counts.cancelled
    width = 30
    filled = width * done // max(counts.total, 1)
    sys.stderr.write(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{counts.total}  "
        f"failed {counts.failed}  running {counts.running}  "
    )
    sys.stderr.flush()


def format_batch(batch: gateway_pb2.Batch) -> str:
    c = batch.counts
    state = enum_label(gateway_pb2.BatchState, batch.state)
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(batch.created_at.seconds))
    return (
        f"{batch.id}  {state:<11} {created}  total {c.total}  succeeded {c.succeeded}  "
        f"failed {c.failed}  cancelled {c.cancelled}  running {c.running}  pending {c.pending}"
    )

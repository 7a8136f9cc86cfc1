"""A batch and its items' results as the gateway's core sees them: what the batch runner
keeps and answers with, and the gRPC door (gateway.wire) and the store translate."""

import enum
from dataclasses import dataclass

from gateway.generation import ChoiceOutput, Finished


class BatchState(enum.IntEnum):
    """Where a batch is; the numbers are the ones the database holds."""

    IN_PROGRESS = 1
    COMPLETED = 2
    CANCELLING = 3  # cancelled; items that were running are being stopped
    CANCELLED = 4


class ItemState(enum.IntEnum):
    """Where an item is; the numbers are the ones the database holds."""

    PENDING = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5


FINAL_ITEM_STATES = (ItemState.SUCCEEDED, ItemState.FAILED, ItemState.CANCELLED)


@dataclass
class ItemResult:
    """The outcome of one item."""

    custom_id: str
    index: int  # its position in the submitted batch, from 0
    state: ItemState  # SUCCEEDED, FAILED or CANCELLED
    attempts: int  # how many times it was sent to a host
    chat: bool  # a chat (an OpenAI chat.completion) rather than a raw prompt
    text: str = ""  # SUCCEEDED
    finished: Finished | None = None  # SUCCEEDED: reason, usage, timings, model, host
    error_code: str = ""  # the status name of the last failure (FAILED, CANCELLED)
    error_message: str = ""
    sequence: int = 0  # the order in which results were recorded, from 1
    choices: tuple[ChoiceOutput, ...] = ()  # every choice, when more than text was asked for


@dataclass(frozen=True)
class Counts:
    """A batch's items by state."""

    total: int
    pending: int
    running: int
    succeeded: int
    failed: int
    cancelled: int


@dataclass(frozen=True)
class BatchInfo:
    """A batch as callers see it."""

    id: str
    state: BatchState
    counts: Counts
    created_at: float  # seconds since the epoch
    finished_at: float | None  # when its last item got its result

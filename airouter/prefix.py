"""Prompt prefixes as chains of block hashes, the same on the gateway and on every host, so the
gateway can tell which host holds the start of a prompt without a tokenizer.

A conversation's blocks are its messages: block k's hash covers messages 0..k (role and
content), so two conversations share the hashes of the messages they share from the start. A
raw prompt's blocks are byte ranges ending at 1, 2, ..., 8 KiB and then at doubling sizes (16,
32, 64 KiB, ...): a prompt of n bytes has O(log n) blocks, and a shared prefix is credited at
least half its length. Each block also carries where it ends, in bytes of content, which a host
turns into tokens by the prompt's own bytes-per-token.
"""

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from airouter.output import Turn

# Raw prompts: a block boundary every STEP bytes up to LINEAR_UNTIL, then at doubling sizes.
STEP = 1024
LINEAR_UNTIL = 8 * 1024
# The gateway's routing looks at no more than this many blocks of a prompt, so that scoring
# costs the event loop the same for a chat of 20,000 messages as for one of 40: the last
# TAIL_BLOCKS (where a conversation's next turn parts from its last) and a sample of the rest
# at absolute positions 0-3 and then growing by half (the same positions in every prompt, so
# two prompts that share a long start share sampled blocks). A block's hash covers everything
# before it, so a sampled hit still says how much of the prompt is shared.
TAIL_BLOCKS = 32
HEAD_BLOCKS = 4


@dataclass(frozen=True)
class Block:
    """One prefix: the hash of everything up to its end, and that end in bytes of content."""

    hash: int  # 64-bit
    end: int


def _chain(previous: bytes, data: bytes) -> bytes:
    return hashlib.blake2b(previous + data, digest_size=8).digest()


def message_blocks(messages: Sequence[Turn]) -> list[Block]:
    """A conversation's blocks: one per message, each covering it and all before it."""
    blocks: list[Block] = []
    digest, end = b"chat", 0
    for turn in messages:
        role, content = turn[0], turn[1]
        if len(turn) > 2:  # a tool's result or an assistant's calls: those count too
            content = f"{content}\0{turn[2:]!r}"
        data = content.encode("utf-8", "surrogatepass")
        digest = _chain(digest, role.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
        end += len(data)
        blocks.append(Block(int.from_bytes(digest, "little"), end))
    return blocks


def prompt_blocks(prompt: str) -> list[Block]:
    """A raw prompt's blocks (see the module's docstring); none for a prompt under STEP bytes."""
    data = prompt.encode("utf-8", "surrogatepass")
    blocks: list[Block] = []
    digest, start, end = b"text", 0, STEP
    while end <= len(data):
        digest = _chain(digest, data[start:end])
        blocks.append(Block(int.from_bytes(digest, "little"), end))
        start, end = end, end + STEP if end < LINEAR_UNTIL else end * 2
    return blocks


@dataclass(frozen=True)
class Prefix:
    """A prompt's blocks, and the bytes of its content in all."""

    blocks: list[Block]
    size: int

    def token_ends(self, prompt_tokens: int) -> dict[int, int]:
        """Each block's hash with where it ends in tokens, once the prompt's token count is
        known: the template's own tokens and the bytes per token spread evenly, which is close
        enough to rank hosts by."""
        return {b.hash: prompt_tokens * b.end // max(self.size, 1) for b in self.blocks}


NO_PREFIX = Prefix([], 0)


def prefix_of(prompt: str | None, messages: Sequence[Turn] | None) -> Prefix:
    if messages:
        blocks = message_blocks(messages)
        return Prefix(blocks, blocks[-1].end)
    text = prompt or ""
    return Prefix(prompt_blocks(text), len(text.encode("utf-8", "surrogatepass")))


def routing_blocks(blocks: list[Block]) -> list[Block]:
    """The blocks routing looks at: at most TAIL_BLOCKS + ~HEAD_BLOCKS + log1.5(n) of them."""
    if len(blocks) <= TAIL_BLOCKS + HEAD_BLOCKS:
        return blocks
    head, index = [], 0
    while index < len(blocks) - TAIL_BLOCKS:
        head.append(blocks[index])
        index = index + 1 if index < HEAD_BLOCKS else index + index // 2
    return head + blocks[-TAIL_BLOCKS:]

"""What the gateway knows about which host holds the start of a prompt, for prefix-aware
routing (see the README's "Prefix-aware routing").

Two sources, both keyed by airouter.prefix's block hashes (no tokenizer needed here):
- each host's own report: ModelStatus.cached_prefixes in every WatchStatus update, the blocks
  whose KV cells its slots hold now. It is the truth, but up to a status interval old;
- the prompts this gateway sent to a host that the host has not reported since: a request in
  flight (its prefill is under way), or one that finished, until an update arrives at least
  STATUS_LAG_S after it finished. This covers a burst that shares a document and a
  conversation's next turn sent the moment the last one ended; it never outlives the host's
  next reports, so a host that lost a prefix stops attracting it.
And a conversation's last host, for requests that say which conversation they belong to.
"""

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from airouter.prefix import Block, Prefix
from gateway.hosts import Host

# A host's update taken this long after a request finished shows that request's prefix.
STATUS_LAG_S = 0.5
# Conversations whose last host is remembered.
CONVERSATIONS = 10_000
# Prompt bytes per token, to weigh a sent prompt's blocks before the host reports them.
BYTES_PER_TOKEN = 4


@dataclass(frozen=True)
class PrefixPolicy:
    """How far a prefix hit may pull a request away from the least loaded host."""

    enabled: bool = True
    # Hits of fewer prompt tokens do not count: their prefill costs next to nothing.
    min_tokens: int = 64
    # The host holding the prefix is chosen unless the request would wait there behind more
    # requests than this beyond what it would wait behind on the least loaded host.
    max_queue_gap: int = 1


DEFAULT_PREFIX_POLICY = PrefixPolicy()


@dataclass
class SentPrompt:
    """A prompt the gateway sent to a host: its blocks' hashes with their ends in tokens."""

    model: str
    tokens: dict[int, int]
    finished_at: float | None = None


@dataclass
class PrefixMemory:
    clock: Callable[[], float] = time.monotonic
    _sent: dict[str, list[SentPrompt]] = field(default_factory=dict)
    _conversations: OrderedDict[str, str] = field(default_factory=OrderedDict)

    def sent(self, host: Host, model: str, prefix: Prefix) -> SentPrompt | None:
        if not prefix.blocks:
            return None
        tokens = {b.hash: b.end // BYTES_PER_TOKEN for b in prefix.blocks}
        prompt = SentPrompt(model, tokens)
        self._live(host).append(prompt)  # pruned here too: a host never ranked stays bounded
        return prompt

    def finished(self, prompt: SentPrompt, prefix: Prefix, prompt_tokens: int) -> None:
        """The request ended; with the host's token count its blocks' ends are the host's."""
        prompt.finished_at = self.clock()
        if prompt_tokens:
            prompt.tokens = prefix.token_ends(prompt_tokens)

    def expected_hit(self, host: Host, model: str, blocks: list[Block]) -> int:
        """Prompt tokens `host` is expected to hold for a prompt of these blocks (a prompt's
        routing_blocks): the most that its report or a prompt sent to it shares."""
        held = host.held_prefixes(model)
        best = 0
        for block in reversed(blocks):  # the host reports a few blocks per slot
            if block.hash in held:
                best = held[block.hash]
                break
        wanted = {b.hash for b in blocks}
        for prompt in self._live(host):
            if prompt.model == model:
                shared = wanted & prompt.tokens.keys()
                if shared:
                    best = max(best, *(prompt.tokens[h] for h in shared))
        return best

    def forget(self, address: str) -> None:
        """The host left the pool: nothing of it is kept."""
        self._sent.pop(address, None)
        for conversation in [c for c, a in self._conversations.items() if a == address]:
            del self._conversations[conversation]

    def _live(self, host: Host) -> list[SentPrompt]:
        """The host's sent prompts that its reports do not show yet; drops the rest."""
        sent = self._sent.setdefault(host.address, [])
        reported = host.status_received_at
        sent[:] = [
            p for p in sent if p.finished_at is None or reported < p.finished_at + STATUS_LAG_S
        ]
        return sent

    def remember(self, conversation: str, host: Host) -> None:
        if not conversation:
            return
        self._conversations[conversation] = host.address
        self._conversations.move_to_end(conversation)
        while len(self._conversations) > CONVERSATIONS:
            self._conversations.popitem(last=False)

    def last_host(self, conversation: str) -> str | None:
        return self._conversations.get(conversation) if conversation else None

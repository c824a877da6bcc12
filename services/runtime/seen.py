"""What one process knows of its consumer's deliveries, to skip a per-chat queue read.

A handler that must not run a subject's (chat's) message before the subject's earlier
ones are settled (the core's turn order, the egress's send order; ADRs 0009, 0033) reads
the stream for an earlier message of the subject. That read is needed only when another
process may hold one. A consumer hands out a filtered stream's messages for the first
time in stream order, each delivery under the next consumer sequence (`sequence.consumer`
in the ack reply). So when this process was handed *every* delivery up to a message's
consumer sequence -- or every one it was not handed is known acked, hence settled (the
consumer's ack floor) -- every earlier message of the subject came to it, and it knows
which of those it settled. `Seen.clear_before` says so without I/O; anything else (a gap:
another puller, a stale owner's late pull, a fairness hand-back, a consumer made again)
leaves the caller to read, as before. See docs/adr/0035-fewer-round-trips-per-message.md.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

# Deliveries remembered above the contiguous mark, and recent ones (to tell an in-place
# retry of a delivery from a consumer sequence handed out twice): past these, start over.
MAX_TRACKED = 8192


class Handed(Protocol):
    """The parts of a delivery this needs (services.runtime.consumer.Delivery)."""

    subject: str
    stream_seq: int

    @property
    def msg(self) -> object: ...


def consumer_seq(d: Handed) -> int | None:
    """The delivery's consumer sequence, or None when it has none (not a JetStream reply)."""
    try:
        seq = d.msg.metadata.sequence.consumer  # type: ignore[attr-defined]
    except Exception:  # a delivery made by hand (tests) or an unparsable reply subject
        return None
    return seq if isinstance(seq, int) and seq > 0 else None


class Seen:
    """Deliveries of one consumer handed to this process, and which are still unsettled."""

    def __init__(self, known_upto: int | None = None) -> None:
        # Every delivery with a consumer sequence <= `upto` was handed here or is acked;
        # None: not known yet (a shared durable this process joined late): `anchor` it.
        self.upto = known_upto
        self.above: set[int] = set()  # handed here, above `upto`
        self.recent: OrderedDict[int, int] = OrderedDict()  # consumer seq -> stream seq
        self.open: dict[str, dict[int, int]] = {}  # subject -> {stream seq: consumer seq}
        self.epoch = 0  # counts the times the knowledge started over or skipped a gap

    def handed(self, d: Handed) -> None:
        """Note a delivery handed to this process (again for an in-place retry: no-op)."""
        c = consumer_seq(d)
        if c is None:
            return
        known = self.recent.get(c)
        if known is not None:
            if known != d.stream_seq:
                self.reset()  # one consumer sequence for two messages: the consumer was made again
            return
        if self.upto is not None and c <= self.upto:
            self.reset()  # a sequence at or below what was accounted for: made again
        self.recent[c] = d.stream_seq
        if len(self.recent) > MAX_TRACKED:
            self.recent.popitem(last=False)
        self.open.setdefault(d.subject, {})[d.stream_seq] = c
        self.above.add(c)
        self._advance()
        if len(self.above) > MAX_TRACKED or sum(map(len, self.open.values())) > MAX_TRACKED:
            self.reset()  # too much unknown: fall back to reading until anchored again

    @contextmanager
    def handling(self, d: Handed) -> Iterator[None]:
        """Around a handler: the delivery is handed here, and settled if the handler
        returns (one that raises leaves it unsettled: it will be handled again)."""
        self.handed(d)
        yield
        self.settled(d)

    def settled(self, d: Handed) -> None:
        """Note that this process settled the delivery's message (the handler returned)."""
        earlier = self.open.get(d.subject)
        if earlier is not None:
            earlier.pop(d.stream_seq, None)
            if not earlier:
                del self.open[d.subject]

    def anchor(self, acked_upto: int) -> bool:
        """Every delivery up to `acked_upto` is acked (the consumer's ack floor), so
        settled: count it as accounted for. True if that skipped deliveries this process
        was not handed (what it remembers of such subjects may be stale: `epoch` moves)."""
        if self.upto is not None and acked_upto <= self.upto:
            return False
        # Stops at the first sequence not handed here; a full walk only covers what was.
        skipped = any(c not in self.above for c in range((self.upto or 0) + 1, acked_upto + 1))
        self.upto = acked_upto
        self.above = {c for c in self.above if c > acked_upto}
        self._advance()
        if skipped:
            self.epoch += 1
        return skipped

    def gap(self) -> bool:
        """True when nothing can be skipped until an anchor: not known, or a delivery
        handed elsewhere lies below one handed here."""
        return self.upto is None or bool(self.above)

    def clear_before(self, d: Handed) -> bool:
        """True if every earlier message of the delivery's subject is known settled by
        this process or acked: no other process can hold one, no read needed."""
        c = consumer_seq(d)
        if c is None or self.upto is None or c > self.upto:
            return False
        earlier = self.open.get(d.subject, {})
        return all(seq >= d.stream_seq for seq in earlier)

    def reset(self) -> None:
        """Forget everything: read again until anchored."""
        self.upto = None
        self.above.clear()
        self.recent.clear()
        self.open.clear()
        self.epoch += 1

    def _advance(self) -> None:
        if self.upto is None:
            return
        while self.upto + 1 in self.above:
            self.upto += 1
            self.above.discard(self.upto)

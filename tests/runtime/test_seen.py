"""`Seen`: when a process may skip the per-chat queue read (ADR 0035), without a server."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.runtime.seen import Seen


@dataclass
class _Seq:
    consumer: int


@dataclass
class _Meta:
    sequence: _Seq


@dataclass
class _Msg:
    metadata: _Meta


@dataclass
class D:
    subject: str
    stream_seq: int
    consumer: int
    msg: _Msg = field(init=False)

    def __post_init__(self) -> None:
        self.msg = _Msg(_Meta(_Seq(self.consumer)))


def test_every_delivery_handed_here_and_settled_means_no_read() -> None:
    seen = Seen(known_upto=0)
    first, second = D("chat.a", 10, 1), D("chat.a", 12, 2)
    seen.handed(first)
    assert seen.clear_before(first)
    seen.settled(first)
    seen.handed(second)
    assert seen.clear_before(second)


def test_an_earlier_job_of_the_chat_not_settled_here_means_a_read() -> None:
    seen = Seen(known_upto=0)
    first, second = D("chat.a", 10, 1), D("chat.a", 12, 2)
    seen.handed(first)  # handed back (nak): not settled
    seen.handed(second)
    assert not seen.clear_before(second)
    assert seen.clear_before(D("chat.b", 13, 3)) is False  # not handed yet: unknown
    seen.handed(D("chat.b", 13, 3))
    assert seen.clear_before(D("chat.b", 13, 3))  # other chats are not held


def test_a_delivery_handed_elsewhere_means_a_read_until_it_is_acked() -> None:
    seen = Seen(known_upto=0)
    later = D("chat.a", 12, 2)  # consumer seq 1 went to another puller
    seen.handed(later)
    assert not seen.clear_before(later)
    assert seen.gap()
    assert seen.anchor(1)  # the ack floor passed it: settled there; what we cached may be old
    assert seen.clear_before(later)


def test_a_consumer_sequence_handed_out_twice_starts_over() -> None:
    seen = Seen(known_upto=0)
    seen.handed(D("chat.a", 10, 1))
    seen.handed(D("chat.a", 10, 1))  # an in-place retry of the same delivery: no change
    assert seen.upto == 1
    again = D("chat.a", 11, 1)  # the same sequence for another message: the consumer is new
    seen.handed(again)
    assert seen.upto is None
    assert not seen.clear_before(again)


def test_a_shared_consumer_joined_late_is_unknown_until_anchored() -> None:
    seen = Seen()
    d = D("chat.a", 40, 7)
    seen.handed(d)
    assert not seen.clear_before(d)
    assert seen.anchor(5)  # 6 is neither acked nor ours
    assert not seen.clear_before(d)
    seen.anchor(6)
    assert seen.clear_before(d)


def test_a_late_joiner_handed_every_delivery_up_to_the_floor_skipped_nothing() -> None:
    seen = Seen()  # joined a shared consumer late: nothing known
    for c in (1, 2, 3):
        seen.handed(D("chat.a", 10 + c, c))
    assert seen.anchor(3) is False  # each delivery up to the floor came here
    assert seen.epoch == 0  # what it remembers stays good

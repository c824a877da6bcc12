"""The stream reader: complete, in order, bounded, from/to a sequence, even when slow."""

from __future__ import annotations

import asyncio

from contracts.events import FactRemembered
from services.runtime.bus import Bus
from services.runtime.reader import read


async def fill(bus: Bus, n: int) -> None:
    for start in range(0, n, 500):
        await asyncio.gather(
            *(
                bus.publish(
                    f"plugins.memory.whatsapp.a{i % 3}",
                    FactRemembered(account=f"a{i % 3}", chat="c", key=str(i), value="v"),
                )
                for i in range(start, min(n, start + 500))
            )
        )


async def test_a_slow_reader_still_gets_every_message_in_order(bus: Bus) -> None:
    await fill(bus, 6000)
    seqs = []
    async for stored in read(bus, "PLUGINS", batch=250):
        seqs.append(stored.seq)
        if stored.seq % 500 == 0:
            await asyncio.sleep(0.05)  # a reader busy writing elsewhere
    assert seqs == list(range(1, 6001))


async def test_it_reads_a_window_and_a_subject(bus: Bus) -> None:
    await fill(bus, 300)
    window = [s.seq async for s in read(bus, "PLUGINS", start_seq=101, stop_seq=200)]
    assert window == list(range(101, 201))
    only = [s.subject async for s in read(bus, "PLUGINS", subject="plugins.memory.whatsapp.a1")]
    assert len(only) == 100
    assert set(only) == {"plugins.memory.whatsapp.a1"}


async def test_an_empty_or_missing_stream_reads_nothing(bus: Bus) -> None:
    assert [s async for s in read(bus, "PLUGINS")] == []
    assert [s async for s in read(bus, "NO_SUCH_STREAM")] == []


async def test_a_subject_with_no_messages_ends_at_once_instead_of_waiting(bus: Bus) -> None:
    # Given a stream with messages, none of them on the subject asked for
    await fill(bus, 10)
    # When it is read on that subject, the read ends (pytest-timeout would catch a hang:
    # an unanswered pull waits for its expiry and is then asked again, forever)
    found = await asyncio.wait_for(
        _all(read(bus, "PLUGINS", subject="plugins.memory.whatsapp.nobody")), 1.5
    )
    # Then it is simply empty
    assert found == []


async def _all(reading: object) -> list[object]:
    return [s async for s in reading]  # type: ignore[attr-defined]


def test_the_position_is_parsed_from_both_reply_subject_forms_like_nats_py_does() -> None:
    from nats.aio.msg import Msg

    from services.runtime.reader import _position

    v1 = "$JS.ACK.PLUGINS.c1.1.42.7.1764151200123456789.5"
    v2 = "$JS.ACK._.ACCHASH.PLUGINS.c1.1.42.7.1764151200123456789.5.rnd"
    for reply in (v1, v2):
        meta = Msg.Metadata._from_reply(reply)
        expected = (meta.sequence.stream, 1764151200123456789, meta.num_pending)
        assert _position(reply) == expected == (42, 1764151200123456789, 5)

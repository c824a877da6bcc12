"""A handover asked the moment an acquisition is on record is answered by the new owner:
the owner listens for handovers before it records (and counts) `LeaseAcquired`, so whoever
sees that record finds it listening -- never "nobody holds the account"."""

from __future__ import annotations

import asyncio

from contracts import subjects
from contracts.codec import decode_any
from contracts.events import LeaseAcquired
from services.channel.owner import HandoverReply
from services.ops.accounts import handover
from services.runtime.bus import Bus, connect
from services.runtime.errors import ServiceError
from services.runtime.nats_server import EmbeddedNats
from tests.conftest import role, wait_until


async def test_a_handover_asked_as_soon_as_the_acquisition_is_recorded_is_answered(
    bus: Bus, nats_server: EmbeddedNats
) -> None:
    answers: list[HandoverReply | ServiceError] = []
    asked: list[asyncio.Task[None]] = []
    async with connect(nats_server.url, name="operator") as operator:

        async def ask() -> None:
            try:
                answers.append(await handover(operator, "default", timeout=10))
            except ServiceError as exc:
                answers.append(exc)

        async def on_record(msg: object) -> None:
            event = decode_any(msg.data)  # type: ignore[attr-defined]
            if isinstance(event, LeaseAcquired) and not asked:
                asked.append(asyncio.create_task(ask()))  # at once, from the callback

        # Given an operator who asks for a handover the moment an acquisition is recorded
        sub = await operator.nc.subscribe(subjects.accounts("whatsapp", "default"), cb=on_record)
        await operator.nc.flush()
        try:
            # When a worker takes the account
            async with role(bus, "whatsapp"):
                await wait_until(lambda: len(answers) == 1, 30, "the handover answered")
        finally:
            await sub.unsubscribe()
            await asyncio.gather(*asked, return_exceptions=True)
    # Then the new owner answered it (and released), rather than nobody
    (answer,) = answers
    assert isinstance(answer, HandoverReply), answer
    assert answer.released

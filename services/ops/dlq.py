"""`svc dlq`: list, inspect, requeue and drop dead letters. Actions are recorded as events
(`DeadLetterRequeued`, `DeadLetterDropped` on `deadletter._ops`), never by deleting."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from contracts import subjects
from contracts.codec import decode, decode_any
from contracts.errors import ContractError
from contracts.events import (
    DeadLetterDropped,
    DeadLettered,
    DeadLetterRequeued,
    SendMessage,
    derived_id,
)
from contracts.streams import DEADLETTER, OUTBOUND
from services.runtime.bus import Bus
from services.runtime.errors import ServiceError
from services.runtime.reader import read


@dataclass
class Letter:
    """A dead letter and what operators did with it."""

    seq: int
    letter: DeadLettered
    actions: list[DeadLetterRequeued | DeadLetterDropped] = field(default_factory=list)

    @property
    def state(self) -> str:
        """open, requeued or dropped."""
        if not self.actions:
            return "open"
        return "requeued" if isinstance(self.actions[-1], DeadLetterRequeued) else "dropped"

    @property
    def cause(self) -> str:
        """What went wrong: the last attempt's error (a letter's reason may only say that
        it gave up), else the reason."""
        errors = self.letter.errors
        return errors[-1].error if errors and errors[-1].error else self.letter.reason

    def summary(self) -> dict[str, Any]:
        """The row `svc dlq ls` prints: the cause, with the attempt count beside it."""
        return {
            "seq": self.seq,
            "at": self.letter.at.isoformat(timespec="seconds"),
            "state": self.state,
            "source": self.letter.source_subject,
            "job_id": self.letter.job_id,
            "attempts": len(self.letter.errors),
            "reason": self.cause,
            "letter_reason": self.letter.reason,
            "payload_truncated": self.letter.payload_truncated,
        }


async def letters(bus: Bus) -> dict[int, Letter]:
    """Every dead letter by stream sequence, with the actions taken on it."""
    found: dict[int, Letter] = {}
    async for stored in read(bus, DEADLETTER.name):
        try:
            event = decode_any(stored.data)
        except ContractError:
            continue
        if isinstance(event, DeadLettered):
            found[stored.seq] = Letter(stored.seq, event)
        elif (
            isinstance(event, DeadLetterRequeued | DeadLetterDropped) and event.letter_seq in found
        ):
            found[event.letter_seq].actions.append(event)
    return found


async def dropped(bus: Bus) -> int:
    """How many DEADLETTER messages the stream's limits (max age / bytes) discarded."""
    state = (await bus.js.stream_info(DEADLETTER.name)).state
    return discarded(state.messages, state.first_seq, state.last_seq)


def discarded(messages: int | None, first_seq: int | None, last_seq: int | None) -> int:
    """Messages a limits stream no longer holds from its start: it starts at sequence 1,
    so a first sequence above 1 (or no message left after some) means the oldest are gone."""
    if not messages:
        return max(int(last_seq or 0), 0)
    return max(int(first_seq or 1) - 1, 0)


def resolve(found: dict[int, Letter], ref: str | int) -> int:
    """The sequence of the letter `ref` names: its sequence number, or a unique prefix of
    its job id (or of its letter id). ServiceError, in one line, when none or several do."""
    text = str(ref).strip()
    if text.isdigit() and int(text) in found:
        return int(text)
    if not text:
        raise ServiceError("name a dead letter: its sequence or a prefix of its job id")
    matches = sorted(
        seq
        for seq, letter in found.items()
        if (letter.letter.job_id or "").startswith(text) or letter.letter.id.startswith(text)
    )
    if len(matches) == 1:
        return matches[0]
    if not matches:
        where = f"at sequence {text} and none" if text.isdigit() else "and none at a sequence"
        raise ServiceError(
            f"no dead letter {where} with a job id starting {text!r}: see 'svc dlq ls --all'"
        )
    shown = ", ".join(map(str, matches[:5])) + (", ..." if len(matches) > 5 else "")
    raise ServiceError(
        f"{text!r} matches {len(matches)} dead letters (sequences {shown}):"
        " give more of the job id, or the sequence"
    )


async def one(bus: Bus, ref: str | int) -> Letter:
    """The dead letter `ref` names (sequence or job id prefix), or a clear error."""
    found = await letters(bus)
    return found[resolve(found, ref)]


def details(letter: Letter) -> dict[str, Any]:
    """Everything `svc dlq show` prints: the letter, its payload decoded when it is JSON."""
    doc: dict[str, Any] = msgspec.to_builtins(letter.letter)
    try:
        doc["payload"] = msgspec.json.decode(letter.letter.payload)
    except msgspec.DecodeError:
        doc["payload"] = letter.letter.payload.decode("utf-8", "backslashreplace")
    doc["seq"] = letter.seq
    doc["state"] = letter.state
    doc["actions"] = [msgspec.to_builtins(a) for a in letter.actions]
    return doc


async def requeue(
    bus: Bus,
    ref: str | int,
    *,
    actor: str,
    reason: str,
    force: bool = False,
    client: str = "",
    via: str = "cli",
) -> str:
    """Send a dead letter back; an OUTBOUND job gets a new job id linked to the original.
    Recorded with who (`actor`) and from where (`client`, `via`)."""
    letter = await one(bus, ref)
    seq = letter.seq
    if letter.letter.payload_truncated:
        raise ServiceError(
            f"dead letter {seq} keeps only part of its payload"
            f" ({letter.letter.payload_size} bytes, cut): it cannot be sent back; drop it"
        )
    if letter.letter.source_subject_sha256:
        raise ServiceError(
            f"dead letter {seq} came on a subject that cannot be carried"
            " (too long or not UTF-8): it cannot be sent back; drop it"
        )
    if letter.state != "open" and not force:
        raise ServiceError(
            f"dead letter {seq} is already {letter.state}; add --force to requeue again"
        )
    dead = letter.letter
    new_job_id = None
    if dead.source_stream == OUTBOUND.name:
        try:
            job = decode(dead.payload, SendMessage)
        except ContractError as exc:
            raise ServiceError(
                f"dead letter {seq} holds no valid job ({exc}); drop it instead"
            ) from None
        new_job_id = derived_id("requeue", job.job_id, str(seq), str(len(letter.actions)))
        again = SendMessage(
            id=new_job_id,
            job_id=new_job_id,
            channel=job.channel,
            account=job.account,
            chat=job.chat,
            text=job.text,
            reply_to=job.reply_to,
            cause_id=job.cause_id,
            requeued_from=job.job_id,
        )
        await bus.publish(subjects.outbound(job.channel, job.account, job.chat), again)
        target = f"job {new_job_id} (from job {job.job_id})"
    else:
        await bus.publish_bytes(
            dead.source_subject,
            dead.payload,
            msg_id=f"requeue:{seq}:{len(letter.actions)}",
            headers=dead.headers,
        )
        target = dead.source_subject
    await bus.publish(
        subjects.DEADLETTER_OPS_SUBJECT,
        DeadLetterRequeued(
            letter_seq=seq,
            letter_id=dead.id,
            new_job_id=new_job_id,
            actor=actor,
            reason=reason,
            client=client,
            via=via,
        ),
    )
    return target


async def drop(
    bus: Bus, ref: str | int, *, actor: str, reason: str, client: str = "", via: str = "cli"
) -> int:
    """Discard a dead letter, recording who, from where and why; its sequence."""
    letter = await one(bus, ref)
    seq = letter.seq
    if letter.state != "open":
        raise ServiceError(f"dead letter {seq} is already {letter.state}")
    await bus.publish(
        subjects.DEADLETTER_OPS_SUBJECT,
        DeadLetterDropped(
            letter_seq=seq,
            letter_id=letter.letter.id,
            actor=actor,
            reason=reason,
            client=client,
            via=via,
        ),
    )
    return seq

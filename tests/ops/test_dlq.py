"""`svc dlq`: the cause in the listing, job id prefixes, letters dropped by the limits
(issue 11 items 12 and 18), against a real nats-server."""

from __future__ import annotations

import json

from contracts import subjects
from contracts.events import AttemptError, DeadLettered
from services.runtime.bus import Bus
from services.runtime.nats_server import EmbeddedNats
from tests.conftest import Processes, arun_svc

QUEUE = subjects.outbound("whatsapp", "acct-1", "1@s.whatsapp.net")


async def _letter(bus: Bus, job_id: str, *, reason: str, errors: list[str]) -> int:
    letter = DeadLettered(
        source_stream="OUTBOUND",
        source_subject=QUEUE,
        source_seq=1,
        reason=reason,
        errors=[AttemptError(attempt=i + 1, error=e) for i, e in enumerate(errors)],
        payload=b"{}",
        job_id=job_id,
    )
    ack = await bus.publish(subjects.deadletter(QUEUE), letter)
    return int(ack.seq)


async def test_dlq_ls_shows_the_cause_with_the_attempt_count_beside_it(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    # Given a letter whose reason only says that it gave up
    errors = ["sim: injected transient failure", "sim: 1@s.whatsapp.net is not on WhatsApp"]
    await _letter(bus, "a" * 32, reason="gave up after 2 attempts", errors=errors)
    shown = await arun_svc("dlq", "ls", env=processes.env(NATS_URL=nats_server.url))
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.decode().splitlines()
    # Then the listing shows the last error (the cause), with 2 tries beside it
    assert lines[1].split()[3] == "2"
    assert lines[2].strip() == f"job {'a' * 32}: sim: 1@s.whatsapp.net is not on WhatsApp"


async def test_dlq_show_requeue_and_drop_accept_a_unique_job_id_prefix(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    env = processes.env(NATS_URL=nats_server.url)
    first = await _letter(bus, "abc" + "0" * 29, reason="x", errors=["x"])
    second = await _letter(bus, "abd" + "0" * 29, reason="y", errors=["y"])
    # A unique prefix names its letter
    shown = await arun_svc("dlq", "show", "abc", env=env)
    assert shown.returncode == 0, shown.stderr
    assert f'"seq":{first}' in shown.stdout.decode().replace(" ", "")
    # An ambiguous one is refused in one line that says how many it matches
    ambiguous = await arun_svc("dlq", "drop", "ab", "--reason", "test", env=env)
    assert ambiguous.returncode != 0
    (line,) = ambiguous.stderr.decode().splitlines()
    assert "'ab' matches 2 dead letters" in line
    dropped = await arun_svc("dlq", "drop", "abd", "--reason", "test", env=env)
    assert dropped.returncode == 0, dropped.stderr
    assert dropped.stdout.decode().strip() == f"dropped dead letter {second}"
    # The sequence still works
    by_seq = await arun_svc("dlq", "show", str(first), env=env)
    assert by_seq.returncode == 0, by_seq.stderr


async def test_dlq_ls_and_status_say_when_the_limits_dropped_older_letters(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    # Given DEADLETTER at its limit (here 2 messages), so the oldest letter is discarded
    info = await bus.js.stream_info("DEADLETTER")
    info.config.max_msgs = 2
    await bus.js.update_stream(info.config)
    for n in range(3):
        await _letter(bus, f"{n}" * 32, reason="x", errors=["x"])
    shown = await arun_svc("dlq", "ls", env=processes.env(NATS_URL=nats_server.url))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.decode().splitlines()[0] == (
        "1 older dead letters were dropped by the DEADLETTER limits"
    )
    # and `svc status` says it too (text and --json)
    status = await arun_svc("status", env=processes.env(NATS_URL=nats_server.url))
    assert status.returncode == 0, status.stderr
    assert "1 older dead letters were dropped by the DEADLETTER limits" in status.stdout.decode()
    data = await arun_svc("status", "--json", env=processes.env(NATS_URL=nats_server.url))
    assert json.loads(data.stdout)["dead_letters_dropped"] == 1

"""The services layer's errors. Handlers map them to acks explicitly (see consumer.py)."""

from __future__ import annotations

import nats.errors
import nats.js.errors

from contracts.events import AttemptError

# NATS itself unreachable or electing a leader, not the message's fault: a consumer retries
# these without using up an attempt (ADR 0045). Not every nats error: a payload too large
# or a revision conflict is the message's own, and counts.
NATS_OUTAGE: tuple[type[Exception], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.StaleConnectionError,
    nats.errors.NoServersError,
    nats.errors.OutboundBufferLimitError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)


class ServiceError(Exception):
    """Base of every error raised by the services layer."""


class ConfigError(ServiceError):
    """Invalid configuration; the message is one line naming the variable and the fix."""


class NatsUnavailableError(ServiceError):
    """NATS could not be reached."""


class ProvisioningError(ServiceError):
    """A stream or bucket exists with a config that conflicts with ours."""


class StreamsMissingError(ServiceError):
    """A reading command found streams missing (a fresh server), so its answer would be
    wrong; the message names them and how to create them."""


class EmbeddedServerError(ServiceError):
    """The embedded nats-server could not start."""


class TransientError(ServiceError):
    """Retry later, after the wait the consumer's RetryPolicy sets for this attempt;
    `delay` asks for at least that long (e.g. a server's Retry-After), within the policy's cap."""

    def __init__(self, message: str, *, delay: float = 0.0) -> None:
        super().__init__(message)
        self.delay = delay


class PermanentError(ServiceError):
    """Retrying cannot help: the message is dead-lettered at once (with `errors`, the
    history of earlier attempts, when the handler kept one)."""

    def __init__(self, message: str, *, errors: list[AttemptError] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


class AbandonError(ServiceError):
    """Stop working on this message without judging it (e.g. the lease was lost): it is
    handed back for redelivery after `delay` seconds; no attempt is counted."""

    def __init__(self, message: str, *, delay: float = 0.0) -> None:
        super().__init__(message)
        self.delay = delay


class NatsRefusedError(ConfigError):
    """The server refused us: credentials (authorization) or TLS. Retrying cannot help
    until the configuration changes."""


class NatsConnectionLostError(ServiceError):
    """The NATS connection is closed for good (the client will not reconnect): the process
    must exit so its supervisor restarts it."""


class EmbeddedServerExitedError(EmbeddedServerError):
    """The embedded nats-server child exited while we depended on it."""

"""The services layer's errors. Handlers map them to acks explicitly (see consumer.py)."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error raised by the services layer."""


class ConfigError(ServiceError):
    """Invalid configuration; the message is one line naming the variable and the fix."""


class NatsUnavailableError(ServiceError):
    """NATS could not be reached."""


class ProvisioningError(ServiceError):
    """A stream or bucket exists with a config that conflicts with ours."""


class EmbeddedServerError(ServiceError):
    """The embedded nats-server could not start."""


class TransientError(ServiceError):
    """Retry later: the message is redelivered after `delay` seconds."""

    def __init__(self, message: str, *, delay: float = 1.0) -> None:
        super().__init__(message)
        self.delay = delay


class PermanentError(ServiceError):
    """Retrying cannot help: the message is dead-lettered at once."""

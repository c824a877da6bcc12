"""The contracts layer's errors."""


class ContractError(ValueError):
    """Base of every error raised by the contracts layer."""


class InvalidSubjectError(ContractError):
    """A subject, account or chat token does not fit the subject grammar."""


class DecodeError(ContractError):
    """Bytes that are not a valid event or command of the expected type."""

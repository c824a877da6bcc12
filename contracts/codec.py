"""JSON codec: one encoder, cached typed decoders, errors that say what was wrong."""

from __future__ import annotations

from functools import cache
from typing import Any, TypeVar, cast

import msgspec

from contracts.errors import DecodeError
from contracts.events import AnyMessage

T = TypeVar("T")

_encoder = msgspec.json.Encoder()


def encode(obj: Any) -> bytes:
    """Encode an event, command or payload struct as JSON bytes."""
    return _encoder.encode(obj)


@cache
def _decoder(kind: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(kind)


def decode(data: bytes, kind: type[T]) -> T:
    """Decode `data` as `kind` (a Struct or a union of them); raise DecodeError on bad input."""
    try:
        result: T = _decoder(cast(Any, kind)).decode(data)
    except msgspec.ValidationError as exc:
        raise DecodeError(f"invalid {_name(kind)}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise DecodeError(f"malformed JSON for {_name(kind)}: {exc}") from None
    except RecursionError:
        raise DecodeError(f"malformed JSON for {_name(kind)}: nested too deeply") from None
    return result


def decode_any(data: bytes) -> AnyMessage:
    """Decode any known event or command by its `type` tag."""
    return decode(data, AnyMessage)  # type: ignore[arg-type]


def _name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("contracts.events.", "")

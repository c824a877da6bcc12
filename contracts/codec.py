"""JSON codec: one encoder, cached typed decoders, errors that say what was wrong."""

from __future__ import annotations

from collections.abc import Callable
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


def _name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("contracts.events.", "")


@cache
def decoder(kind: type[T]) -> Callable[[bytes], T]:
    """`decode` for one `kind`, made once: for loops over many messages (hashing a union
    type on every call, as a cache lookup does, costs as much as decoding a small event)."""
    typed = msgspec.json.Decoder(kind).decode
    name = _name(kind)

    def run(data: bytes) -> T:
        try:
            result: T = typed(data)
        except msgspec.ValidationError as exc:
            raise DecodeError(f"invalid {name}: {exc}") from None
        except msgspec.DecodeError as exc:
            raise DecodeError(f"malformed JSON for {name}: {exc}") from None
        except RecursionError:
            raise DecodeError(f"malformed JSON for {name}: nested too deeply") from None
        return result

    return run


def decode(data: bytes, kind: type[T]) -> T:
    """Decode `data` as `kind` (a Struct or a union of them); raise DecodeError on bad input."""
    return decoder(cast(Any, kind))(data)  # type: ignore[no-any-return]


_decode_any: Callable[[bytes], AnyMessage] = decoder(AnyMessage)


def decode_any(data: bytes) -> AnyMessage:
    """Decode any known event or command by its `type` tag."""
    return _decode_any(data)

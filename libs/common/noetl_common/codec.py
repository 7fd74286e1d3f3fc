"""Bytes on the wire: JSON encodings of the message models, one decoder per stream.

Both runtimes go through this (the in-memory bus too), so a value that cannot be encoded fails in
embedded mode exactly as it would on Kafka.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from noetl_common.messages import Command, Event, Inbound

_INBOUND: TypeAdapter[Any] = TypeAdapter(Inbound)


class DecodeError(ValueError):
    """A message that cannot be decoded or validated: it belongs on the dead-letter topic with this reason."""


def encode(message: BaseModel) -> bytes:
    return message.model_dump_json().encode()


def decode_inbound(raw: bytes, *, strict: bool = False) -> Any:
    """strict: no coercion (a bool or a string is not a time): what a client posts over HTTP must be what
    the message schema (and the API's document) says, not merely convertible to it."""
    return _decode(lambda: _INBOUND.validate_json(raw, strict=strict))


def decode_command(raw: bytes) -> Command:
    return _decode(lambda: Command.model_validate_json(raw))


def decode_event(raw: bytes) -> Event:
    return _decode(lambda: Event.model_validate_json(raw))


def _decode(parse: Any) -> Any:
    try:
        return parse()
    except ValidationError as exc:
        raise DecodeError(f"invalid message: {exc.error_count()} error(s): {exc.errors()[0]['msg']} "
                          f"at {'.'.join(map(str, exc.errors()[0]['loc']))}") from exc
    except ValueError as exc:
        raise DecodeError(f"undecodable message: {exc}") from exc

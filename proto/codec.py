"""Encoding of bus messages (MessagePack) and the JSON Schemas exported for tool authors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from .messages import MESSAGE_TYPES, Message, ScaleDecision, ScaleDemand
from .subjects import Subjects

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()
_decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}


class DecodeError(ValueError):
    """A bus payload that is not a valid message of the expected type."""


def encode(msg: msgspec.Struct) -> bytes:
    """Encode one bus message."""
    return _encoder.encode(msg)


def decoder(kind: Any) -> msgspec.msgpack.Decoder[Any]:
    """A cached typed decoder for ``kind`` (a Struct type or a union of them)."""
    dec = _decoders.get(kind)
    if dec is None:
        dec = _decoders[kind] = msgspec.msgpack.Decoder(kind)
    return dec


def decode(data: bytes, kind: type[T]) -> T:
    """Decode ``data`` as ``kind``; any malformed payload raises :class:`DecodeError`."""
    try:
        return decoder(kind).decode(data)  # type: ignore[no-any-return]
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise DecodeError(f"invalid {getattr(kind, '__name__', kind)}: {e}") from None


def message_type_for_subject(subjects: Subjects, subject: str) -> Any:
    """The message type (or union) carried on ``subject``; ``None`` if the subject is not ours."""
    p = subjects.prefix + "."
    if not subject.startswith(p):
        return None
    rest = subject[len(p) :]
    head = rest.split(".", 1)[0]
    if head == "snapshot":
        return MESSAGE_TYPES["SnapshotRequest"]
    table: dict[str, Any] = {
        "kv": MESSAGE_TYPES["KVEventBatch"],
        "pod": MESSAGE_TYPES["PodState"],
        "req": MESSAGE_TYPES["RequestEvent"],
        "scale": ScaleDemand | ScaleDecision,
        "tokenize": MESSAGE_TYPES["TokenizeRequest"],
        "schedule": MESSAGE_TYPES["ScheduleRequest"],
    }
    if rest == "index.lookup":
        return MESSAGE_TYPES["LookupRequest"]
    return table.get(head)


def export_schemas(dest: Path) -> list[Path]:
    """Write one JSON Schema file per bus message into ``dest``; return the files written."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name, cls in sorted(MESSAGE_TYPES.items()):
        schema = msgspec.json.schema(cls)
        schema["$comment"] = (
            "infermesh bus message; payloads are MessagePack maps with this shape. "
            f"Schema version {Message.__struct_defaults__[0]}."
        )
        path = dest / f"{name}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written

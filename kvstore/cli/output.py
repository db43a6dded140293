"""Rendering for the CLI: aligned text tables for people, JSON for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import IO, Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message


def proto_to_dict(message: Message) -> dict[str, Any]:
    """Every field (defaults included) with integers kept as numbers and bytes as hex.

    ``json_format.MessageToDict`` writes 64-bit integers as strings, which is
    right for JavaScript and wrong for the shell scripts this output is for.
    """
    result: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if _is_repeated(field):
            result[field.name] = [_convert(field, item) for item in value]
        else:
            result[field.name] = _convert(field, value)
    return result


def _is_repeated(field: FieldDescriptor) -> bool:
    # protobuf >= 5 spells it ``is_repeated`` (``label`` is deprecated, then gone)
    return bool(getattr(field, "is_repeated", False))


def _convert(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return proto_to_dict(value)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return bytes(value).hex()
    return value


def print_json(data: Any, out: IO[str] | None = None) -> None:
    json.dump(data, out or sys.stdout, indent=2, sort_keys=False, default=str)
    (out or sys.stdout).write("\n")


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """A plain aligned table; columns whose index is in ``right`` are right-aligned (numbers)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def percent(part: int | float, whole: int | float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"

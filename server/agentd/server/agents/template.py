"""Instructions templates: ``{key}`` is replaced by the run's ``context["key"]``.

The syntax is Python's ``str.format`` reduced to named keys: ``{{`` and ``}}`` are literal
braces; positional fields (``{}``, ``{0}``), attribute or index access (``{user.name}``,
``{items[0]}``), conversions (``{x!r}``) and format specs (``{x:>10}``) are refused when the
definition is validated, so a template that validates renders the same way every time and
can only fail at run time on a key the run's context does not hold.

A key is a letter or ``_`` followed by letters, digits, ``_`` or ``-`` (at most 64). Values
render as: a string as itself; ``true``/``false``/``null``, numbers (a float that is a whole
number without its ``.0``: protobuf Struct carries every number as a double), lists and
objects as JSON.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from typing import Any, Mapping

TEMPLATE_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed template: literal text and context keys, in order."""

    pieces: tuple[tuple[str, str | None], ...]  # (literal text, key or None)

    @property
    def keys(self) -> tuple[str, ...]:
        """The context keys the template uses, each once, in order of first use."""
        return tuple(dict.fromkeys(key for _, key in self.pieces if key is not None))

    def missing(self, context: Mapping[str, Any]) -> list[str]:
        return [key for key in self.keys if key not in context]

    def render(self, context: Mapping[str, Any]) -> str:
        """The text with every key replaced; ``KeyError`` for a key ``context`` lacks."""
        parts: list[str] = []
        for literal, key in self.pieces:
            parts.append(literal)
            if key is not None:
                parts.append(render_value(context[key]))
        return "".join(parts)


def parse_template(text: str) -> Template:
    """Parse ``text``; ``ValueError`` with a message for the person who wrote it."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ValueError(f"bad template: {exc}; write {{{{ and }}}} for literal braces") from None
    pieces: list[tuple[str, str | None]] = []
    for literal, field_name, format_spec, conversion in parsed:
        if field_name is None:
            pieces.append((literal, None))
            continue
        shown = "{" + field_name + (f"!{conversion}" if conversion else "") + (f":{format_spec}" if format_spec else "") + "}"
        if field_name == "" or field_name.isdigit():
            raise ValueError(
                f"bad template: {shown} is a positional field; name a context key, as in {{user}} "
                "(write {{ and }} for literal braces)"
            )
        if not TEMPLATE_KEY_RE.match(field_name):
            what = "attribute or index access" if ("." in field_name or "[" in field_name) else "not a context key name"
            raise ValueError(
                f"bad template: {shown} is {what}; a key is a letter or _ then letters, digits, _ or - "
                "(write {{ and }} for literal braces)"
            )
        if conversion is not None or format_spec:
            raise ValueError(
                f"bad template: {shown} has a conversion or format spec; only plain {{key}} is allowed "
                "(write {{ and }} for literal braces)"
            )
        pieces.append((literal, field_name))
    return Template(tuple(pieces))


def render_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)

"""Redaction: secrets in task arguments and results never reach Redis, the stream or the
WebSocket. The collector applies it to each task event before anything is written.

- ``POLLEN_REDACT_KEYS``: key patterns (``fnmatch``, case-insensitive; ``password``,
  ``*token*``). In ``args``, ``kwargs`` and ``result`` (celery sends them as Python ``repr``
  text; a custom event may send JSON), the value of every dict key that matches, at any depth,
  becomes ``'[redacted]'``. Text that cannot be read as Python tokens and mentions a pattern
  is replaced whole.
- ``POLLEN_REDACT_FIELDS``: ``<task name pattern>=<field>+<field>,...`` (fields among
  ``args``, ``kwargs``, ``result``, ``exception``, ``traceback``): those fields of those tasks
  are replaced whole. An event that does not carry its task's name (task-succeeded carries
  none) hands such fields to ``apply_events.lua``, which knows the name, with the patterns as
  Lua patterns: the stored and streamed value is the field or the marker, and the marker when
  the name is not known yet (it fails closed).

Both are settings of the collector, read by ``shared/settings.py`` (a bad rule stops the
service) and, for the task name rules, put in ``apply_events.lua``'s configuration.
"""

from __future__ import annotations

import ast
import fnmatch
import io
import re
import tokenize
from dataclasses import dataclass
from functools import cache
from typing import Any

from shared.scripts import lua_pattern

#: What a redacted value becomes, as celery would show the string.
MARKER_TEXT = "[redacted]"
MARKER = repr(MARKER_TEXT)
#: The fields a ``POLLEN_REDACT_FIELDS`` rule may name.
FIELDS = ("args", "kwargs", "result", "exception", "traceback")
#: The fields key patterns look into.
KEYED = ("args", "kwargs", "result")

_OPEN, _CLOSE = "([{", ")]}"


class RedactionError(ValueError):
    """A ``POLLEN_REDACT_*`` setting that cannot be read (the message says why)."""


def parse_keys(text: str) -> tuple[str, ...]:
    return tuple(p.strip().lower() for p in text.split(",") if p.strip())


def parse_fields(text: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``((task name pattern, fields), ...)`` of ``POLLEN_REDACT_FIELDS``."""
    rules = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        pattern, sep, names = part.partition("=")
        fields = tuple(f.strip() for f in names.split("+") if f.strip())
        if not sep or not pattern.strip() or not fields:
            raise RedactionError(f"{part!r}: expected <task name pattern>=<field>+<field>")
        if any(c in pattern for c in "[]"):
            # apply_events.lua matches these too, with Lua patterns: * and ? only
            raise RedactionError(f"{part!r}: task name patterns take * and ? only, not [...]")
        unknown = [f for f in fields if f not in FIELDS]
        if unknown:
            raise RedactionError(f"{part!r}: unknown field(s) {unknown}, expected {FIELDS}")
        rules.append((pattern.strip(), fields))
    return tuple(rules)


@dataclass(frozen=True)
class Redactor:
    keys: tuple[str, ...] = ()
    fields: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @staticmethod
    @cache
    def from_settings(redact_keys: str, redact_fields: str) -> Redactor:
        """The redactor of ``POLLEN_REDACT_KEYS`` and ``POLLEN_REDACT_FIELDS`` (made once)."""
        return Redactor(parse_keys(redact_keys), parse_fields(redact_fields))

    @property
    def active(self) -> bool:
        return bool(self.keys or self.fields)

    @property
    def named_fields(self) -> frozenset[str]:
        """Every field some task name rule replaces."""
        return frozenset(f for _, fields in self.fields for f in fields)

    def fields_of(self, name: str) -> frozenset[str]:
        return frozenset(
            f for pattern, fs in self.fields for f in fs if fnmatch.fnmatchcase(name, pattern)
        )

    def lua_rules(self) -> list[list[Any]]:
        """The task name rules as ``apply_events.lua`` takes them: ``[[lua pattern, {field}]]``."""
        return [[lua_pattern(pattern), list(fields)] for pattern, fields in self.fields]

    def key_matches(self, key: str) -> bool:
        low = key.lower()
        return any(fnmatch.fnmatchcase(low, p) for p in self.keys)

    def event(self, obj: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """Redact a task event (a dict, changed in place). Returns whether it changed and the
        fields held for ``apply_events.lua`` (the event carries no task name and a name rule
        may replace them), already taken out of ``obj``."""
        changed = False
        held: dict[str, Any] = {}
        name = obj.get("name")
        if self.fields:
            if isinstance(name, str) and name:
                for field in self.fields_of(name):
                    if field in obj and obj[field] is not None:
                        obj[field] = MARKER
                        changed = True
            else:
                for field in self.named_fields:
                    if field in obj:
                        held[field] = obj.pop(field)
                        changed = True
        if self.keys:
            for field in KEYED:
                source = held if field in held else obj
                if field in source:
                    value = self.value(source[field])
                    if value is not source[field]:
                        source[field] = value
                        changed = True
        return changed, held

    def value(self, value: Any) -> Any:
        """``value`` with matching keys' values redacted: repr text or JSON."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            out = {
                k: (MARKER if isinstance(k, str) and self.key_matches(k) else self.value(v))
                for k, v in value.items()
            }
            return out if out != value else value
        if isinstance(value, list):
            items = [self.value(v) for v in value]
            return items if any(a is not b for a, b in zip(items, value, strict=True)) else value
        return value

    def _mentioned(self, text: str) -> bool:
        """Whether some key pattern may match in ``text``: the longest part of each pattern
        without wildcards appears in it (a pattern of wildcards only always may)."""
        low = text.lower()
        for pattern in self.keys:
            parts = [p for p in re.split(r"[*?\[\]]+", pattern) if p]
            if not parts or max(parts, key=len) in low:
                return True
        return False

    def text(self, text: str, depth: int = 0) -> str:
        """A Python ``repr`` (or JSON) with the values of matching keys replaced by the marker:
        ``'key': value`` in dicts, ``key=value`` in calls, and the same inside string values
        (JSON or a repr passed as a string)."""
        if not self._mentioned(text):
            return text  # no pattern can match: nothing to look at
        try:
            edits = self._edits(text, depth)
        except (tokenize.TokenError, SyntaxError, IndentationError, ValueError):
            return MARKER  # unreadable, and it mentions a pattern: fail closed
        if not edits:
            return text
        out, last = [], 0
        for start, end, replacement in edits:
            out.append(text[last:start])
            out.append(replacement)
            last = end
        out.append(text[last:])
        return "".join(out)

    def _edits(self, text: str, depth: int) -> list[tuple[int, int, str]]:
        """``(start, end, replacement)`` of what to redact, in order and not overlapping."""
        lines = text.splitlines(keepends=True)
        starts = [0]
        for line in lines:
            starts.append(starts[-1] + len(line))

        def offset(pos: tuple[int, int]) -> int:
            return starts[pos[0] - 1] + pos[1]

        tokens = [
            t
            for t in tokenize.generate_tokens(io.StringIO(text).readline)
            if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT)
            and t.type not in (tokenize.DEDENT, tokenize.ENDMARKER)
        ]
        edits: list[tuple[int, int, str]] = []
        i = 0
        while i < len(tokens):
            tok = tokens[i]
            after = tokens[i + 1].string if i + 1 < len(tokens) else ""
            keyed = (tok.type == tokenize.STRING and after == ":" and self._key(tok.string)) or (
                tok.type == tokenize.NAME
                and after == "="
                and i > 0
                and tokens[i - 1].string in ("(", ",")
                and self.key_matches(tok.string)
            )
            if keyed and i + 2 < len(tokens):
                start = offset(tokens[i + 2].start)
                depth_, j = 0, i + 2
                while j < len(tokens):
                    s = tokens[j].string
                    if s in _OPEN:
                        depth_ += 1
                    elif s in _CLOSE:
                        if depth_ == 0:
                            break
                        depth_ -= 1
                    elif s == "," and depth_ == 0:
                        break
                    j += 1
                end = offset(tokens[j - 1].end) if j < len(tokens) else len(text)
                edits.append((start, end, MARKER))
                i = j
                continue
            if tok.type == tokenize.STRING and depth < 3:
                # a string value holding JSON or a repr of its own: redacted inside
                inner = ast.literal_eval(tok.string)
                if isinstance(inner, str):
                    redacted = self.text(inner, depth + 1)
                    if redacted != inner:
                        edits.append((offset(tok.start), offset(tok.end), repr(redacted)))
            i += 1
        return edits

    def _key(self, literal: str) -> bool:
        match = re.fullmatch(r"[rRbBuU]{0,2}(['\"])(.*)\1", literal, re.S)
        return match is not None and self.key_matches(match.group(2))

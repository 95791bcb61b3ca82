"""Flower's task-filter query syntax (``/api/tasks?search=``), parsed and evaluated as Flower.

This mirrors ``flower/utils/search.py`` (Flower 2.2): the same tokenizer, grammar, limits and
error messages, and the same matching rules over the same normalized fields (casefolded uuid,
name, state, worker, args, kwargs, result; ``state:`` exact; ``kwargs:key=value`` exact on the
literal-evaluated kwargs). Flower is not imported at run time; the tests compare with it.
Pollen adds two fields a term may name, ``exception:`` and ``traceback:`` (substrings, as
``result:``); a term without a field searches Flower's fields only, as Flower.

``prefilter()`` turns a query into the conservative form ``query_tasks.lua`` evaluates inside
Redis: it may accept a task the query rejects (then Python decides, with ``matches``) but never
rejects one the query accepts.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from shared.keys import HIDDEN

#: Fields a term may name: Flower's, then Pollen's own (``POLLEN_FIELDS``).
POLLEN_FIELDS = ("exception", "traceback")
SEARCH_FIELDS = frozenset({"name", "state", "worker", "args", "kwargs", "result", *POLLEN_FIELDS})
#: The JSON fields of the task hash a ``Document`` holds as text, in its order.
TEXT_FIELDS = ("args", "kwargs", "result", *POLLEN_FIELDS)
EXACT_FIELDS = frozenset({"state"})
MIN_SUBSTRING_LENGTH = 3
MAX_QUERY_LENGTH = 2048
MAX_QUERY_TOKENS = 128
MAX_QUERY_DEPTH = 5


class QuerySyntaxError(ValueError):
    def __init__(self, message: str, position: int | None = None) -> None:
        self.message = message
        self.position = position
        detail = message if position is None else f"{message} at position {position}"
        super().__init__(f"{detail}.")


@dataclass(frozen=True, slots=True)
class MatchAll:
    pass


@dataclass(frozen=True, slots=True)
class Term:
    field: str | None
    value: str


@dataclass(frozen=True, slots=True)
class And:
    children: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Or:
    children: tuple[Expr, ...]


Expr = MatchAll | Term | And | Or


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str
    value: str
    position: int


def _append(tokens: list[_Token], kind: str, value: str, position: int) -> None:
    tokens.append(_Token(kind, value, position))
    if len(tokens) > MAX_QUERY_TOKENS:
        raise QuerySyntaxError(f"Query exceeds {MAX_QUERY_TOKENS} tokens")


def _tokenize(raw: str) -> list[_Token]:
    tokens: list[_Token] = []
    index, length = 0, len(raw)
    while index < length:
        if raw[index].isspace():
            index += 1
            continue
        position = index
        if raw[index] in "()":
            _append(tokens, "LPAREN" if raw[index] == "(" else "RPAREN", raw[index], position)
            index += 1
            continue
        value: list[str] = []
        quoted = in_quote = False
        while index < length:
            char = raw[index]
            if char == "\\" and index + 1 < length and raw[index + 1] in ('"', "\\"):
                value.append(raw[index + 1])
                index += 2
                continue
            if char == '"':
                quoted = True
                in_quote = not in_quote
                index += 1
                continue
            if not in_quote and (char.isspace() or char in "()"):
                break
            value.append(char)
            index += 1
        if in_quote:
            raise QuerySyntaxError("Unterminated quoted phrase", position)
        text = "".join(value)
        if not text:
            raise QuerySyntaxError("Empty search term", position)
        if not quoted and text in ("AND", "OR"):
            kind = text
        elif not quoted and text == "NOT":
            raise QuerySyntaxError("NOT is not supported", position)
        else:
            kind = "TERM"
        _append(tokens, kind, text, position)
    tokens.append(_Token("EOF", "", length))
    return tokens


class _Parser:
    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.index = 0

    @property
    def current(self) -> _Token:
        return self.tokens[self.index]

    def advance(self) -> _Token:
        token = self.current
        self.index += 1
        return token

    def parse(self) -> Expr:
        if self.current.kind == "EOF":
            return MatchAll()
        expression = self.parse_or(0)
        if self.current.kind != "EOF":
            raise QuerySyntaxError(f"Unexpected {self.current.value!r}", self.current.position)
        return expression

    def parse_or(self, depth: int) -> Expr:
        children = [self.parse_and(depth)]
        while self.current.kind == "OR":
            operator = self.advance()
            if self.current.kind in ("EOF", "RPAREN", "AND", "OR"):
                raise QuerySyntaxError("OR must be followed by a search term", operator.position)
            children.append(self.parse_and(depth))
        return _combine(Or, children)

    def parse_and(self, depth: int) -> Expr:
        children = [self.parse_primary(depth)]
        while self.current.kind not in ("EOF", "RPAREN", "OR"):
            if self.current.kind == "AND":
                operator = self.advance()
                if self.current.kind in ("EOF", "RPAREN", "AND", "OR"):
                    raise QuerySyntaxError(
                        "AND must be followed by a search term", operator.position
                    )
            elif self.current.kind not in ("TERM", "LPAREN"):
                raise QuerySyntaxError(f"Unexpected {self.current.value!r}", self.current.position)
            children.append(self.parse_primary(depth))
        return _combine(And, children)

    def parse_primary(self, depth: int) -> Expr:
        token = self.current
        if token.kind == "LPAREN":
            if depth >= MAX_QUERY_DEPTH:
                raise QuerySyntaxError(
                    f"Query nesting exceeds {MAX_QUERY_DEPTH} levels", token.position
                )
            self.advance()
            if self.current.kind == "RPAREN":
                raise QuerySyntaxError("Empty group", token.position)
            expression = self.parse_or(depth + 1)
            if self.current.kind != "RPAREN":
                raise QuerySyntaxError("Missing closing parenthesis", token.position)
            self.advance()
            return expression
        if token.kind != "TERM":
            raise QuerySyntaxError("Expected a search term", token.position)
        self.advance()
        return _parse_term(token)


def _combine(node: type[And] | type[Or], children: list[Expr]) -> Expr:
    flat: list[Expr] = []
    for child in children:
        candidates = child.children if isinstance(child, node) else (child,)
        for candidate in candidates:
            if candidate not in flat:
                flat.append(candidate)
    if len(flat) == 1:
        return flat[0]
    return node(tuple(flat))


def _parse_term(token: _Token) -> Term:
    field: str | None = None
    value = token.value
    if ":" in value:
        candidate, candidate_value = value.split(":", 1)
        if candidate.casefold() in SEARCH_FIELDS:
            field = candidate.casefold()
            value = candidate_value
    if field is None and value.startswith("-"):
        raise QuerySyntaxError("Negation with '-' is not supported", token.position)
    if not value:
        raise QuerySyntaxError("Search qualifier requires a value", token.position)
    exact = field in EXACT_FIELDS or (field == "kwargs" and "=" in value)
    if not exact and len(value.strip()) < MIN_SUBSTRING_LENGTH:
        raise QuerySyntaxError(
            f"Substring search terms must contain at least {MIN_SUBSTRING_LENGTH} characters",
            token.position,
        )
    return Term(field, value)


def parse_query(raw: str | None) -> Expr:
    """The query's expression tree; ``QuerySyntaxError`` (a 400) on bad syntax."""
    query = (raw or "").strip()
    if len(query) > MAX_QUERY_LENGTH:
        raise QuerySyntaxError(f"Query exceeds {MAX_QUERY_LENGTH} characters")
    return _parse_cached(query)


@lru_cache(maxsize=512)
def _parse_cached(query: str) -> Expr:
    return _Parser(_tokenize(query)).parse()


# --- evaluation (Python: exact, as Flower) ---------------------------------------------------


def normalize(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace").casefold()
    return str(value).casefold()


def _kwargs_pairs(value: Any) -> frozenset[str]:
    mapping = value if isinstance(value, dict) else None
    if mapping is None and isinstance(value, str):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            parsed = None
        if isinstance(parsed, dict):
            mapping = parsed
    if not mapping:
        return frozenset()
    return frozenset(f"{normalize(k)}={normalize(v)}" for k, v in mapping.items())


def _kwargs_query_pair(value: str) -> str | None:
    if "=" not in value:
        return None
    key, item = value.split("=", 1)
    return f"{key.strip()}={item.strip()}"


@dataclass(slots=True)
class Document:
    """The searchable fields of a task, normalized as Flower's ``SearchDocument``."""

    uuid: str
    name: str
    state: str
    worker: str
    args: str
    kwargs: str
    result: str
    raw_kwargs: Any
    exception: str = ""
    traceback: str = ""

    @classmethod
    def of(
        cls,
        uuid: str,
        name: Any,
        state: Any,
        worker: Any,
        args: Any,
        kwargs: Any,
        result: Any,
        exception: Any = None,
        traceback: Any = None,
    ) -> Document:
        return cls(
            normalize(uuid),
            normalize(name),
            normalize(state),
            normalize(worker),
            normalize(args),
            normalize(kwargs),
            normalize(result),
            kwargs,
            normalize(exception),
            normalize(traceback),
        )

    def text(self, field: str | None) -> str:
        if field is None:
            return "\x00".join(
                (self.uuid, self.name, self.state, self.worker, self.args, self.kwargs, self.result)
            )
        value: str = getattr(self, field)
        return value


def matches(expr: Expr, doc: Document) -> bool:
    if isinstance(expr, MatchAll):
        return True
    if isinstance(expr, And):
        return all(matches(child, doc) for child in expr.children)
    if isinstance(expr, Or):
        return any(matches(child, doc) for child in expr.children)
    value = normalize(expr.value)
    if expr.field in EXACT_FIELDS:
        return bool(doc.state) and doc.state == value
    if expr.field == "kwargs":
        pair = _kwargs_query_pair(value)
        if pair is not None:
            return pair in _kwargs_pairs(doc.raw_kwargs)
    return value in doc.text(expr.field)


# --- prefilter (Lua: conservative) -------------------------------------------------------------

#: Fields of the task hash whose few distinct values Python matches exactly (``Known``).
VALUE_FIELDS = {"name": HIDDEN.name, "state": HIDDEN.state, "worker": HIDDEN.worker}
#: A prefilter that no task passes.
NEVER: list[Any] = ["n"]


@dataclass(frozen=True, slots=True)
class Known:
    """The raw values of the indexed fields (task names, states, worker hostnames) in Redis."""

    names: frozenset[str] = frozenset()
    states: frozenset[str] = frozenset()
    workers: frozenset[str] = frozenset()

    def values(self, field: str) -> frozenset[str]:
        return {"name": self.names, "state": self.states, "worker": self.workers}[field]


def needs_known(expr: Expr) -> bool:
    """Whether ``prefilter`` reads ``Known`` for this query (a term on name, state, worker or
    on no field)."""
    if isinstance(expr, And | Or):
        return any(needs_known(c) for c in expr.children)
    return isinstance(expr, Term) and (expr.field is None or expr.field in VALUE_FIELDS)


def prefilter(expr: Expr, known: Known) -> list[Any] | None:
    """The query as nested lists for ``query_tasks.lua`` (None for MatchAll):

    - ``["and", ...]``, ``["or", ...]``;
    - ``["v", hash field, {raw value: true}]``: the task's ``_n``/``_s``/``_w`` is one of these
      (decided here, exactly, over the known values: few, and Flower's casefold applies);
    - ``["t", field, lowercase value, anchor?]``: a substring of ``args``, ``kwargs``, ``result``,
      ``exception``, ``traceback`` or, with field ``""``, of the first three or the uuid (Lua
      decides ASCII text, else answers maybe); ``anchor`` (``_anchor``) lets Lua reject most
      tasks with plain finds;
    - ``["m"]``: maybe (Python decides); ``["n"]``: no task.
    """
    if isinstance(expr, MatchAll):
        return None
    return _pre(expr, known)


def implied(pre: list[Any] | None) -> dict[str, frozenset[str]]:
    """The raw values of ``_n``/``_s``/``_w`` every task passing ``pre`` has (its ``v`` terms
    at the top level of an AND): the query engine walks those values' indexes."""
    if pre is None:
        return {}
    nodes = pre[1:] if pre[0] == "and" else [pre]
    out: dict[str, frozenset[str]] = {}
    for node in nodes:
        if node[0] == "v":
            values = frozenset(node[2])
            out[node[1]] = out[node[1]] & values if node[1] in out else values
    return out


def _pre(expr: Expr, known: Known) -> list[Any]:
    if isinstance(expr, And | Or):
        children = [_pre(c, known) for c in expr.children]
        if isinstance(expr, And):
            if NEVER in children:
                return NEVER
            return ["and", *children]
        children = [c for c in children if c != NEVER]
        if not children:
            return NEVER
        return children[0] if len(children) == 1 else ["or", *children]
    assert isinstance(expr, Term)
    value = normalize(expr.value)
    if expr.field in VALUE_FIELDS:
        return _values(expr.field, value, known)
    if expr.field == "kwargs" and "=" in value:
        return ["m"]
    text = _text(expr.field or "", value, expr.value)
    if expr.field is not None:
        return text
    return _pre_or([*(_values(f, value, known) for f in VALUE_FIELDS), text])


def _pre_or(children: list[list[Any]]) -> list[Any]:
    children = [c for c in children if c != NEVER]
    if not children:
        return NEVER
    return children[0] if len(children) == 1 else ["or", *children]


def _values(field: str, value: str, known: Known) -> list[Any]:
    if field in EXACT_FIELDS:
        hits = [v for v in known.values(field) if normalize(v) and normalize(v) == value]
    else:
        hits = [v for v in known.values(field) if value in normalize(v)]
    if not hits:
        return NEVER
    return ["v", VALUE_FIELDS[field], dict.fromkeys(sorted(hits), True)]


#: Characters that stand for themselves in any text and in its stored JSON whatever the case:
#: no letter (casefolding a non-ASCII character only ever yields ASCII letters), nothing JSON may
#: escape ('"', backslash, control characters, '/').
ANCHOR_CHARS = frozenset(" !#$%&'()*+,-.0123456789:;<=>?@[]^_`{|}~")


def _anchor(value: str) -> str:
    """The longest run of ``ANCHOR_CHARS`` in ``value``: a task whose raw uuid and JSON strings
    lack it cannot match, whatever their case, encoding or escapes."""
    best = run = ""
    for c in value:
        run = run + c if c in ANCHOR_CHARS else ""
        if len(run) > len(best):
            best = run
    return best


def _text(field: str, value: str, raw: str) -> list[Any]:
    # Lua compares ASCII lowercase; a quote, NUL or \x01 would meet its JSON quoting or markers
    if not value.isascii() or value != raw.lower() or any(c in value for c in '"\x00\x01'):
        return ["m"]
    anchor = _anchor(value)
    return ["t", field, value, anchor] if anchor else ["t", field, value]

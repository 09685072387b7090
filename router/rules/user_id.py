"""Finding the user ID in a request: headers, cookies, the query, a capped JSON or form body.

Sources are tried in the order the rule file lists them; the first one that yields a
non-empty value wins. No source ever raises: anything missing, malformed, truncated or in
the wrong encoding simply yields no ID from that source, and the next one is tried.

    header  view.headers[name.lower()] (the proxy keeps the first of repeated headers)
    cookie  the first cookie of that name in the Cookie header; surrounding quotes removed
    query   the first `name=` in the query string, URL-decoded (+ is a space)
    json    a dotted path (`user.id`, `items[0].id`) into the body, when the content type
            is application/json or */*+json and the body is complete; a JSON string is
            taken as it is, a JSON integer as its decimal digits, anything else is no ID
    form    the first `name=` in an application/x-www-form-urlencoded body, URL-decoded,
            when the body is complete

Everything that depends only on the rule file (lower-cased names, parsed JSON paths,
labels) is prepared once by `compile_sources`. `source_outcomes` tells, for
`grayroute explain`, what each source gave and why a source gave nothing; it follows
`extract_user_id` step by step (the tests hold the two to the same answers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote_plus

import orjson

if TYPE_CHECKING:
    from router.rules.decide import RequestView
    from router.rules.model import UserIdSource

__all__ = [
    "COOKIE",
    "FORM",
    "HEADER",
    "JSON",
    "QUERY",
    "Source",
    "body_kind",
    "compile_sources",
    "extract_user_id",
    "parse_json_path",
    "source_outcomes",
]

# Source kinds as small ints: the extraction loop compares them per source.
HEADER: Final = 0
COOKIE: Final = 1
QUERY: Final = 2
JSON: Final = 3
FORM: Final = 4
_KINDS: Final = {"header": HEADER, "cookie": COOKIE, "query": QUERY, "json": JSON, "form": FORM}
NO_BODY: Final = -1  # body_kind() of a content type no source reads

JsonStep = str | int


@dataclass(frozen=True, slots=True)
class Source:
    kind: int  # HEADER ... FORM
    key: str  # lower-case header name, cookie/query/form name, or the JSON path text
    steps: tuple[JsonStep, ...]  # JSON path steps; () for other kinds
    label: str  # "header:X-User-Id", reported as Decision.user_id_source


def compile_sources(sources: tuple[UserIdSource, ...]) -> tuple[Source, ...]:
    compiled: list[Source] = []
    for s in sources:
        kind = _KINDS[s.kind]
        key = s.name.lower() if kind == HEADER else s.name
        steps = parse_json_path(s.name) if kind == JSON else ()
        compiled.append(Source(kind, key, steps, s.label))
    return tuple(compiled)


def parse_json_path(text: str) -> tuple[JsonStep, ...]:
    """'user.id' -> ('user', 'id'); 'items[0].id' -> ('items', 0, 'id'); ValueError if bad."""
    steps: list[JsonStep] = []
    i, n = 0, len(text)
    if not text:
        raise ValueError("the path is empty")
    expect_name = True  # at the start or after a dot a name may come (at the start, also [N])
    while i < n:
        c = text[i]
        if c == "[":
            end = text.find("]", i)
            if end < 0:
                raise ValueError(f"`[` at position {i + 1} is not closed")
            index = text[i + 1 : end]
            if not (index.isascii() and index.isdigit()):
                raise ValueError(f"[{index}] is not an array index (write e.g. [0])")
            if expect_name and steps:
                raise ValueError(f"a name is missing before [{index}]")
            steps.append(int(index))
            i = end + 1
            expect_name = False
        elif c == ".":
            if expect_name:
                raise ValueError(f"a name is missing at position {i + 1}")
            i += 1
            expect_name = True
            if i == n:
                raise ValueError("the path ends with a dot")
        elif c == "]":
            raise ValueError(f"unexpected `]` at position {i + 1}")
        else:
            if not expect_name:
                raise ValueError(f"a dot is missing before position {i + 1}")
            end = i
            while end < n and text[end] not in ".[]":
                end += 1
            steps.append(text[i:end])
            i = end
            expect_name = False
    return tuple(steps)


# Content-Type values as clients most often send them, and their body_kind: one dict
# probe instead of partition, strip and lower (body_kind runs up to twice per request).
_COMMON_BODY_KINDS: Final = {
    "application/json": JSON,
    "application/json; charset=utf-8": JSON,
    "application/json;charset=UTF-8": JSON,
    "application/x-www-form-urlencoded": FORM,
    "application/x-www-form-urlencoded; charset=utf-8": FORM,
}


def body_kind(content_type: str | None) -> int:
    """JSON, FORM or NO_BODY for a Content-Type header value (parameters ignored)."""
    if not content_type:
        return NO_BODY
    kind = _COMMON_BODY_KINDS.get(content_type)
    if kind is not None:
        return kind
    mime = content_type.partition(";")[0].strip().lower()
    if mime == "application/json" or (mime.endswith("+json") and "/" in mime):
        return JSON
    if mime == "application/x-www-form-urlencoded":
        return FORM
    return NO_BODY


_NOTHING: Final[tuple[None, None]] = (None, None)
_UNSET: Final = object()  # body not parsed yet
_NO_DOC: Final = object()  # body absent, incomplete, of another type, or not parseable


def extract_user_id(
    sources: tuple[Source, ...], view: RequestView
) -> tuple[str, str] | tuple[None, None]:
    """(user ID, source label) from the first source that yields one, else (None, None)."""
    doc: object = _UNSET
    form: object = _UNSET
    for src in sources:
        kind = src.kind
        value: str | None
        if kind == HEADER:
            value = view.headers.get(src.key)
        elif kind == COOKIE:
            value = _cookie(view.headers.get("cookie"), src.key)
        elif kind == QUERY:
            value = _param(view.query, src.key)
        elif kind == JSON:
            if doc is _UNSET:
                doc = _json_document(view)
            value = None if doc is _NO_DOC else _json_value(doc, src.steps)
        else:
            if form is _UNSET:
                form = _form_text(view)
            value = _param(form, src.key) if isinstance(form, str) else None
        if value:
            return value, src.label
    return _NOTHING


def _cookie(header: str | None, name: str) -> str | None:
    if not header or name not in header:
        return None
    for part in header.split(";"):
        key, sep, value = part.partition("=")
        if sep and key.strip() == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
                value = value[1:-1]
            return value
    return None


def _param(text: str, name: str) -> str | None:
    """The first `name=value` of a query string or form body, URL-decoded."""
    if not text or (name not in text and "%" not in text and "+" not in text):
        return None
    for part in text.split("&"):
        key, _, value = part.partition("=")
        if key != name and (("%" not in key and "+" not in key) or _unquote(key) != name):
            continue
        return _unquote(value)
    return None


def _unquote(text: str) -> str | None:
    if "%" not in text and "+" not in text:
        return text
    try:
        return unquote_plus(text, errors="strict")
    except UnicodeDecodeError:
        return None  # percent-encoded bytes that are not UTF-8: no ID


def _json_document(view: RequestView) -> object:
    body = view.body
    if body is None or not view.body_complete:
        return _NO_DOC
    if body_kind(view.headers.get("content-type")) != JSON:
        return _NO_DOC
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:  # also invalid UTF-8, too deep, integers beyond 64 bits
        return _NO_DOC


def _json_value(doc: object, steps: tuple[JsonStep, ...]) -> str | None:
    for step in steps:
        if isinstance(step, int):
            if not isinstance(doc, list) or step >= len(doc):
                return None
            doc = doc[step]
        else:
            if not isinstance(doc, dict):
                return None
            doc = doc.get(step)
    if isinstance(doc, str):
        return doc
    if isinstance(doc, int) and not isinstance(doc, bool):  # true/false are not IDs
        return str(doc)
    return None


def _form_text(view: RequestView) -> str | None:
    body = view.body
    if body is None or not view.body_complete:
        return None
    if body_kind(view.headers.get("content-type")) != FORM:
        return None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return None


# -- why a source gave no user ID (grayroute explain; not on the hot path) ----------------

FOUND: Final = "found"
NOT_TRIED: Final = "not tried: an earlier source gave the user ID"
_ID_TYPES: Final = "where a string or an integer was expected"
_BODY_TYPES: Final = {
    JSON: "application/json or */*+json",
    FORM: "application/x-www-form-urlencoded",
}


def source_outcomes(
    sources: tuple[Source, ...], view: RequestView, body_size: int
) -> list[tuple[str, str]]:
    """(label, outcome) for every source, in order: `found`, or why it gave no user ID
    (absent, empty, wrong content type, body too large, not JSON, a float ...), and
    `not tried` after the one that found it. `body_size` is the whole request body's
    length (0: none); the view holds at most body_limit bytes of it."""
    out: list[tuple[str, str]] = []
    found = False
    for src in sources:
        if found:
            out.append((src.label, NOT_TRIED))
            continue
        outcome = _outcome(src, view, body_size)
        found = outcome == FOUND
        out.append((src.label, outcome))
    return out


def _outcome(src: Source, view: RequestView, body_size: int) -> str:
    kind = src.kind
    if kind == HEADER:
        return _value_outcome(view.headers.get(src.key), f"no {_name(src)} header")
    if kind == COOKIE:
        header = view.headers.get("cookie")
        if header is None:
            return "absent: no Cookie header"
        return _value_outcome(_cookie(header, src.key), f"no {src.key}= in the Cookie header")
    if kind == QUERY:
        return _param_outcome(view.query, src.key, "query")
    problem = _body_problem(kind, view, body_size)
    if problem is not None:
        return problem
    body = view.body
    assert body is not None
    if kind == FORM:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"the body is not UTF-8 ({exc.reason} at byte {exc.start})"
        return _param_outcome(text, src.key, "form body")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return f"not JSON: {exc}"
    return _json_outcome(doc, src)


def _name(src: Source) -> str:
    return src.label.partition(":")[2]


def _value_outcome(value: str | None, absent: str) -> str:
    if value is None:
        return f"absent: {absent}"
    return FOUND if value else "empty"


def _param_outcome(text: str | None, name: str, where: str) -> str:
    value = _param(text or "", name)
    if value is not None:
        return FOUND if value else "empty"
    for part in (text or "").split("&"):
        key = part.partition("=")[0]
        if key == name or _unquote(key) == name:
            return "percent-encoded bytes that are not UTF-8"
    return f"absent: no {name}= in the {where}"


def _body_problem(kind: int, view: RequestView, body_size: int) -> str | None:
    content_type = view.headers.get("content-type")
    if body_kind(content_type) != kind:
        shown = f"`{content_type}`" if content_type else "none"
        return f"wrong content type: {shown} (this source reads {_BODY_TYPES[kind]})"
    if body_size == 0:
        return "absent: no body"
    body = view.body
    if body is None:
        return "the body was not read (body_limit is 0)"
    if not view.body_complete:
        return f"the body ({body_size} bytes) is larger than body_limit ({len(body)} bytes)"
    return None


def _json_outcome(doc: object, src: Source) -> str:
    where: list[str] = []
    for step in src.steps:
        shown = _json_path(where) or "the body"
        if isinstance(step, int):
            if not isinstance(doc, list):
                return f"absent: {shown} is {_json_kind(doc)}, not a list"
            if step >= len(doc):
                return f"absent: {shown} has {len(doc)} items, no [{step}]"
            doc = doc[step]
            where.append(f"[{step}]")
        else:
            if not isinstance(doc, dict):
                return f"absent: {shown} is {_json_kind(doc)}, not an object"
            if step not in doc:
                return f"absent: no {src.key} in the body"
            doc = doc[step]
            where.append(step)
    if isinstance(doc, str):
        return FOUND if doc else "empty"
    if isinstance(doc, int) and not isinstance(doc, bool):
        return FOUND
    if isinstance(doc, float):
        return f"a float ({doc!r}) {_ID_TYPES}"
    return f"{_json_kind(doc)} {_ID_TYPES}"


def _json_path(steps: list[str]) -> str:
    text = ""
    for step in steps:
        text += step if step.startswith("[") or not text else "." + step
    return text


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, int):
        return "an integer"
    return "a string"

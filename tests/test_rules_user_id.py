"""Finding the user ID: every source kind, and every way a source yields nothing."""

from __future__ import annotations

import orjson
import pytest

from router.rules.decide import RequestView
from router.rules.model import UserIdSource
from router.rules.user_id import (
    FORM,
    JSON,
    NO_BODY,
    Source,
    body_kind,
    compile_sources,
    extract_user_id,
    parse_json_path,
)

JSON_CT = {"content-type": "application/json"}
FORM_CT = {"content-type": "application/x-www-form-urlencoded"}


def sources(*pairs: tuple[str, str]) -> tuple[Source, ...]:
    return compile_sources(tuple(UserIdSource(kind, name) for kind, name in pairs))


def view(
    headers: dict[str, str] | None = None,
    query: str = "",
    body: bytes | None = None,
    complete: bool = True,
) -> RequestView:
    return RequestView("GET", "/", query, "h", headers or {}, "", body, complete)


def uid(pairs: list[tuple[str, str]], v: RequestView) -> tuple[str | None, str | None]:
    return extract_user_id(sources(*pairs), v)


# -- JSON paths ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "steps"),
    [
        ("user.id", ("user", "id")),
        ("user_id", ("user_id",)),
        ("items[0].id", ("items", 0, "id")),
        ("a[1][2]", ("a", 1, 2)),
        ("[0].id", (0, "id")),
        ("data.users[10]", ("data", "users", 10)),
        ("x-y.z w", ("x-y", "z w")),
    ],
)
def test_parse_json_path(text: str, steps: tuple[str | int, ...]) -> None:
    assert parse_json_path(text) == steps


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("user..id", "name is missing at position 6"),
        (".id", "name is missing at position 1"),
        ("user.", "ends with a dot"),
        ("items[x]", "[x] is not an array index"),
        ("items[-1]", "[-1] is not an array index"),
        ("items[0", "not closed"),
        ("items]", "unexpected `]`"),
        ("items[0]id", "dot is missing"),
        ("a.[0]", "name is missing before [0]"),
    ],
)
def test_parse_json_path_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_json_path(text)


@pytest.mark.parametrize(
    ("content_type", "kind"),
    [
        ("application/json", JSON),
        ("application/json; charset=utf-8", JSON),
        ("Application/JSON", JSON),
        ("application/vnd.api+json", JSON),
        ("application/merge-patch+json; charset=utf-8", JSON),
        ("application/x-www-form-urlencoded", FORM),
        ("application/x-www-form-urlencoded; charset=UTF-8", FORM),
        # The spellings clients send most (a dict probe), beside others of the same kind.
        ("application/json;charset=UTF-8", JSON),
        ("application/x-www-form-urlencoded; charset=utf-8", FORM),
        ("application/jsonx", NO_BODY),
        ("text/plain", NO_BODY),
        ("multipart/form-data; boundary=x", NO_BODY),
        ("+json", NO_BODY),
        ("", NO_BODY),
        (None, NO_BODY),
    ],
)
def test_body_kind(content_type: str | None, kind: int) -> None:
    assert body_kind(content_type) == kind


# -- head sources -------------------------------------------------------------------------


def test_header_source_uses_lower_case_name_and_labels_as_written() -> None:
    v = view({"x-user-id": "42"})
    assert uid([("header", "X-User-Id")], v) == ("42", "header:X-User-Id")


def test_missing_and_empty_values_fall_through_to_the_next_source() -> None:
    pairs = [("header", "X-User-Id"), ("cookie", "uid"), ("query", "userId")]
    assert uid(pairs, view({"x-user-id": ""}, query="userId=7")) == ("7", "query:userId")
    assert uid(pairs, view({"cookie": "uid="}, query="userId=7")) == ("7", "query:userId")
    assert uid(pairs, view({})) == (None, None)


def test_first_listed_source_wins() -> None:
    pairs = [("query", "userId"), ("header", "X-User-Id")]
    v = view({"x-user-id": "h"}, query="userId=q")
    assert uid(pairs, v) == ("q", "query:userId")


@pytest.mark.parametrize(
    ("cookie", "expected"),
    [
        ("uid=42", "42"),
        ("a=1; uid=42; b=2", "42"),
        ("a=1;uid=42", "42"),
        ('uid="42"', "42"),
        ("uid=42; uid=43", "42"),  # the first one counts
        ("xuid=1; uidx=2", None),
        ("uid", None),
        ("", None),
        ("uid=%34%32", "%34%32"),  # cookies are not URL-decoded
    ],
)
def test_cookie(cookie: str, expected: str | None) -> None:
    got, label = uid([("cookie", "uid")], view({"cookie": cookie}))
    assert got == expected
    assert label == ("cookie:uid" if expected else None)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("userId=42", "42"),
        ("a=1&userId=42&b=2", "42"),
        ("userId=42&userId=43", "42"),
        ("userId=a%20b", "a b"),
        ("userId=a+b", "a b"),
        ("userId=%E4%B8%AD", "中"),
        ("user%49d=9", "9"),  # the name is URL-decoded too
        ("userId=%FF", None),  # percent-encoded bytes that are not UTF-8
        ("userId=", None),
        ("userId", None),
        ("userIdx=1&xuserId=2", None),
        ("", None),
    ],
)
def test_query(query: str, expected: str | None) -> None:
    assert uid([("query", "userId")], view(query=query))[0] == expected


def test_query_first_occurrence_counts_even_when_empty() -> None:
    pairs = [("query", "userId"), ("header", "X-User-Id")]
    v = view({"x-user-id": "h"}, query="userId=&userId=5")
    assert uid(pairs, v) == ("h", "header:X-User-Id")


# -- JSON bodies --------------------------------------------------------------------------


def json_uid(
    path: str, body: bytes | None, complete: bool = True, ct: str | None = None
) -> str | None:
    headers = {"content-type": ct} if ct is not None else JSON_CT
    return uid([("json", path)], view(headers, body=body, complete=complete))[0]


@pytest.mark.parametrize(
    ("doc", "path", "expected"),
    [
        ({"user": {"id": "u-7"}}, "user.id", "u-7"),
        ({"user": {"id": 42}}, "user.id", "42"),
        ({"user": {"id": -5}}, "user.id", "-5"),
        ({"user": {"id": 0}}, "user.id", "0"),
        ({"user": {"id": 4.0}}, "user.id", None),  # floats are not IDs
        ({"user": {"id": 1e3}}, "user.id", None),
        ({"user": {"id": True}}, "user.id", None),  # nor are booleans
        ({"user": {"id": None}}, "user.id", None),
        ({"user": {"id": ["42"]}}, "user.id", None),
        ({"user": {"id": {"v": 1}}}, "user.id", None),
        ({"user": {"id": ""}}, "user.id", None),
        ({"user": "42"}, "user.id", None),  # a step into a non-object
        ({"user_id": "9"}, "user_id", "9"),
        ({"items": [{"id": 1}, {"id": 2}]}, "items[1].id", "2"),
        ({"items": [{"id": 1}]}, "items[1].id", None),  # out of range
        ({"items": {"0": {"id": 1}}}, "items[0].id", None),  # an index into an object
        ([{"id": "a"}], "[0].id", "a"),
        ({"a": {"b": {"c": {"d": "deep"}}}}, "a.b.c.d", "deep"),
        ({"id": "中文"}, "id", "中文"),
    ],
)
def test_json_values(doc: object, path: str, expected: str | None) -> None:
    assert json_uid(path, orjson.dumps(doc)) == expected


def test_json_big_integer_keeps_every_digit() -> None:
    assert json_uid("id", b'{"id": 18446744073709551615}') == "18446744073709551615"


def test_json_integer_beyond_64_bits_is_no_id_not_an_error() -> None:
    assert json_uid("id", b'{"id": 123456789012345678901234567890}') is None


@pytest.mark.parametrize(
    "body",
    [
        b'{"user": {"id": 42}',  # truncated
        b"not json",
        b"",
        b'{"user": {"id": "\xff\xfe"}}',  # not UTF-8
        '{"user": {"id": "é"}}'.encode("latin-1"),
        b"[" * 5000 + b"]" * 5000,  # deeper than the parser allows
    ],
)
def test_bad_json_bodies_yield_no_id(body: bytes) -> None:
    assert json_uid("user.id", body) is None


def test_json_needs_a_complete_body() -> None:
    body = orjson.dumps({"user": {"id": 42}})
    assert json_uid("user.id", body, complete=False) is None
    assert json_uid("user.id", None) is None


@pytest.mark.parametrize(
    ("ct", "expected"),
    [
        ("application/json; charset=utf-8", "42"),
        ("application/problem+json", "42"),
        ("text/plain", None),
        ("application/x-www-form-urlencoded", None),
        ("", None),
    ],
)
def test_json_needs_a_json_content_type(ct: str, expected: str | None) -> None:
    assert json_uid("user.id", b'{"user": {"id": 42}}', ct=ct) == expected


def test_two_json_sources_share_one_parse_and_fall_through() -> None:
    pairs = [("json", "user.id"), ("json", "user_id")]
    v = view(JSON_CT, body=b'{"user": {"name": "x"}, "user_id": "7"}')
    assert uid(pairs, v) == ("7", "json:user_id")


# -- form bodies --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "complete", "ct", "expected"),
    [
        (b"a=1&userId=42", True, "application/x-www-form-urlencoded", "42"),
        (b"userId=a+b%21", True, "application/x-www-form-urlencoded; charset=utf-8", "a b!"),
        (b"userId=1&userId=2", True, "application/x-www-form-urlencoded", "1"),
        (b"userId=42", False, "application/x-www-form-urlencoded", None),  # over body_limit
        (b"userId=42", True, "application/json", None),
        (b"userId=42", True, "multipart/form-data", None),
        (b"userId=\xff", True, "application/x-www-form-urlencoded", None),  # not UTF-8
        (b"userId=%ff", True, "application/x-www-form-urlencoded", None),
        (b"other=1", True, "application/x-www-form-urlencoded", None),
    ],
)
def test_form(body: bytes, complete: bool, ct: str, expected: str | None) -> None:
    v = view({"content-type": ct}, body=body, complete=complete)
    got, label = uid([("form", "userId")], v)
    assert got == expected
    assert label == ("form:userId" if expected else None)


def test_form_absent_body_is_no_id() -> None:
    assert uid([("form", "userId")], view(FORM_CT, body=None)) == (None, None)


def test_body_sources_do_not_hide_later_head_sources() -> None:
    pairs = [("json", "user.id"), ("form", "userId"), ("header", "X-User-Id")]
    v = view({"content-type": "text/plain", "x-user-id": "h"}, body=b"{}")
    assert uid(pairs, v) == ("h", "header:X-User-Id")


def test_no_sources() -> None:
    assert extract_user_id((), view({"x-user-id": "1"})) == (None, None)

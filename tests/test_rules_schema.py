"""rules/schema.json: generated from the validator's key tables, and in step with it.

The schema is checked here with a small validator of the keywords it uses (the project
does not depend on `jsonschema`); where `jsonschema` is installed, it checks too.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.rules import check_text
from router.rules.model import SOURCE_KINDS
from router.rules.rollout_block import ERROR_RATE_KEYS, GATES_KEYS, LATENCY_KEYS, ROLLOUT_KEYS
from router.rules.schema import SECTIONS, build_schema, docs_tables, schema_text, update_docs
from router.rules.validate import (
    HEALTH_KEYS,
    MATCH_KEYS,
    PIN_KEYS,
    ROUTE_KEYS,
    TOP_KEYS,
    UPSTREAM_KEYS,
)

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / "rules" / "schema.json"
DOCS = ROOT / "docs" / "rules.md"
SHIPPED = [ROOT / "rules" / "demo.yaml", *sorted((ROOT / "rules" / "examples").glob("*.yaml"))]
MODELINE = re.compile(r"^# yaml-language-server: \$schema=(\S+)$", re.MULTILINE)


def shipped_schema() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    return data


# -- in step -------------------------------------------------------------------------


def test_schema_file_is_the_generated_one() -> None:
    assert SCHEMA_FILE.read_text(encoding="utf-8") == schema_text(), (
        "rules/schema.json is out of date: run `python -m router.rules.schema > rules/schema.json`"
    )


def test_docs_key_tables_are_the_generated_ones() -> None:
    text = DOCS.read_text(encoding="utf-8")
    for name in SECTIONS:
        assert f"<!-- BEGIN keys:{name} " in text, f"docs/rules.md has no table for {name}"
    assert update_docs(text) == text, (
        "docs/rules.md's key tables are out of date: "
        "run `python -m router.rules.schema --docs docs/rules.md`"
    )


def test_update_docs_replaces_only_the_tables() -> None:
    table = docs_tables()["match"]
    stale = table.replace("compared upper-case", "OLD TEXT")
    text = f"intro\n\n{stale}\n\noutro\n"
    assert update_docs(text) == f"intro\n\n{table}\n\noutro\n"


def _props(schema: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = schema["$defs"][name]["properties"]
    return found


def test_key_sets_are_the_validators() -> None:
    schema = shipped_schema()
    assert list(schema["properties"]) == list(TOP_KEYS)
    assert list(_props(schema, "upstream")) == list(UPSTREAM_KEYS)
    assert list(_props(schema, "health_check")) == list(HEALTH_KEYS)
    assert list(_props(schema, "source")) == list(SOURCE_KINDS)
    assert list(_props(schema, "route")) == list(ROUTE_KEYS)
    assert list(_props(schema, "match")) == list(MATCH_KEYS)
    assert list(_props(schema, "pin")) == list(PIN_KEYS)
    assert list(_props(schema, "rollout")) == list(ROLLOUT_KEYS)
    assert list(_props(schema, "gates")) == list(GATES_KEYS)
    assert list(_props(schema, "error_rate")) == list(ERROR_RATE_KEYS)
    assert list(_props(schema, "latency")) == list(LATENCY_KEYS)


def test_unknown_keys_are_refused_wherever_the_validator_refuses_them() -> None:
    schema = shipped_schema()
    objects = [schema, *(schema["$defs"][n] for n in SECTIONS if n != "file")]
    assert all(o["additionalProperties"] is False for o in objects)


def test_every_key_is_described() -> None:
    schema = shipped_schema()
    for props in [schema["properties"], *(_props(schema, n) for n in SECTIONS if n != "file")]:
        for key, sub in props.items():
            assert sub.get("description", "").strip(), key
    assert "Never holds for a request without a user ID." in _props(schema, "pin")["users"][
        "description"
    ]
    assert _props(schema, "route")["salt"]["description"].endswith("Default: the route's name.")


def test_a_key_the_schema_does_not_describe_stops_the_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    route = SECTIONS["route"]
    monkeypatch.setitem(SECTIONS, "route", dataclasses.replace(route, keys=(*route.keys, "lua")))
    with pytest.raises(RuntimeError, match=r"describe \['lua'\]"):
        build_schema()


def test_schema_is_draft_2020_12() -> None:
    assert shipped_schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"


# -- a validator for the keywords the schema uses ------------------------------------------

KEYWORDS = {
    "$schema", "$defs", "$ref", "title", "description",
    "type", "const", "pattern", "minimum", "maximum", "exclusiveMinimum",
    "properties", "required", "additionalProperties", "propertyNames",
    "minProperties", "maxProperties", "items", "minItems", "maxItems", "anyOf", "oneOf",
}  # fmt: skip


def _is(value: object, kind: str) -> bool:
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    raise AssertionError(f"type {kind} is not used by the schema")


def errors(value: object, schema: dict[str, Any], root: dict[str, Any], at: str = "") -> list[str]:
    """Where `value` breaks `schema` (a JSON pointer-ish path each), [] when it does not."""
    found: list[str] = []
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        found += errors(value, target, root, at)
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_is(value, k) for k in kinds):
            return [*found, f"{at}: not {'/'.join(kinds)}"]
    if "const" in schema and (type(value) is not type(schema["const"]) or value != schema["const"]):
        found.append(f"{at}: not {schema['const']!r}")
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        found.append(f"{at}: does not match {schema['pattern']}")
    if _is(value, "number"):
        assert isinstance(value, int | float)
        if "minimum" in schema and value < schema["minimum"]:
            found.append(f"{at}: below minimum")
        if "maximum" in schema and value > schema["maximum"]:
            found.append(f"{at}: above maximum")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            found.append(f"{at}: not above exclusiveMinimum")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        found += [f"{at}/{k}: required" for k in schema.get("required", ()) if k not in value]
        if len(value) < schema.get("minProperties", 0):
            found.append(f"{at}: too few keys")
        if len(value) > schema.get("maxProperties", len(value)):
            found.append(f"{at}: too many keys")
        for key, item in value.items():
            if "propertyNames" in schema:
                found += errors(key, schema["propertyNames"], root, f"{at}/{key} (name)")
            if key in props:
                found += errors(item, props[key], root, f"{at}/{key}")
            elif schema.get("additionalProperties") is False:
                found.append(f"{at}/{key}: unknown key")
            elif isinstance(schema.get("additionalProperties"), dict):
                found += errors(item, schema["additionalProperties"], root, f"{at}/{key}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            found.append(f"{at}: too few items")
        if len(value) > schema.get("maxItems", len(value)):
            found.append(f"{at}: too many items")
        if "items" in schema:
            for i, item in enumerate(value):
                found += errors(item, schema["items"], root, f"{at}/{i}")
    if "anyOf" in schema and all(errors(value, s, root, at) for s in schema["anyOf"]):
        found.append(f"{at}: matches none of anyOf")
    if "oneOf" in schema and sum(not errors(value, s, root, at) for s in schema["oneOf"]) != 1:
        found.append(f"{at}: does not match exactly one of oneOf")
    return found


def _keywords(node: object, inside_properties: bool = False) -> set[str]:
    if isinstance(node, list):
        return set().union(*(_keywords(n) for n in node)) if node else set()
    if not isinstance(node, dict):
        return set()
    if inside_properties:  # keys here are names, not keywords
        return set().union(*(_keywords(v) for v in node.values())) if node else set()
    used = set(node)
    for key, value in node.items():
        if key not in ("const", "required"):
            used |= _keywords(value, inside_properties=key in ("properties", "$defs"))
    return used


def test_the_schema_uses_only_keywords_checked_here() -> None:
    assert _keywords(shipped_schema()) <= KEYWORDS


def schema_errors(text: str) -> list[str]:
    schema = shipped_schema()
    return errors(yaml.safe_load(text), schema, schema)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_rule_files_follow_the_schema(path: Path) -> None:
    assert schema_errors(path.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_rule_files_name_the_schema(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    m = MODELINE.match(text)
    assert m is not None, f"{path.name}: no `# yaml-language-server: $schema=...` first line"
    assert (path.parent / m.group(1)).resolve() == SCHEMA_FILE


# Files the router accepts must never get a red squiggle in an editor.
ACCEPTED: list[Path | str] = [
    ROOT / "benchmarks" / "rules.yaml",
    """\
format: 1
upstreams:
  "1.10": {endpoints: ["[::1]:9001", "backend.local:80"], connect_timeout: 0.5,
           read_timeout: 2m, health_check: {path: /up, interval: 1500ms}}
  old: {endpoints: []}
  v2: {endpoints: ["10.0.0.2:9002"], health_check: {}}
user_id: [{header: X-User-Id}, {cookie: 7}, {query: 1}, {json: "items[0].id"}, {form: u}]
body_limit: 1 MiB
routes:
  - name: 7
    match: {hosts: [API.example.com, "::1"], path_prefix: /a, methods: [get, PATCH]}
    user_id: []
    body_limit: 0
    pins:
      - {to: v2, users: [42, "007", 1.5], user_ranges: [[-5, 10]], user_suffixes: [7]}
      - {to: v2, user_pattern: 12, user_percent: 33.33, headers: {X-A: 3}}
      - {to: "1.10", client_cidrs: ["10.1.0.0/8", "2001:db8::/32"], headers: {}}
      - {to: v2, users: []}
    split: {"1.10": 0.01, v2: replicas, old: replicas}
    salt: 2024
  - {name: rest, split: replicas}
  - {name: last, match: {hosts: [x.com]}, to: 1.10}
""",
]


@pytest.mark.parametrize("source", ACCEPTED, ids=["benchmarks", "every-key"])
def test_files_the_router_accepts_follow_the_schema(source: Path | str) -> None:
    text = source.read_text(encoding="utf-8") if isinstance(source, Path) else source
    assert not [p for p in check_text(text, "rules.yaml") if p.severity == "error"]
    assert schema_errors(text) == []


# (where, what to set there): each makes the file wrong in a way the schema sees.
SPEC = yaml.safe_load((ROOT / "rules" / "examples" / "spec.yaml").read_text(encoding="utf-8"))
ROLLOUT = {"canary": "orders-v1.1", "stable": "orders-v1", "steps": [1, 5, 20, 50, 100]}
BROKEN: list[tuple[str, tuple[str | int, ...], object]] = [
    ("unknown top key", ("upstream",), {}),
    ("unknown upstream key", ("upstreams", "orders-v1", "endpoint"), []),
    ("unknown health_check key", ("upstreams", "orders-v1", "health_check"), {"url": "/x"}),
    ("unknown route key", ("routes", 0, "mtach"), {}),
    ("unknown match key", ("routes", 0, "match", "host"), ["x"]),
    ("unknown pin key", ("routes", 0, "pins", 0, "user"), ["1"]),
    ("unknown source", ("user_id", 0), {"heder": "X"}),
    ("two sources in one item", ("user_id", 0), {"header": "X", "cookie": "c"}),
    ("format 2", ("format",), 2),
    ("format as text", ("format",), "1"),
    ("to and split", ("routes", 0, "to"), "orders-v1"),
    ("pin without a condition", ("routes", 0, "pins", 0), {"to": "orders-v2"}),
    ("pin without to", ("routes", 0, "pins", 0), {"users": ["1"]}),
    ("percent above 100", ("routes", 0, "pins", 4, "user_percent"), 101),
    ("percent as text", ("routes", 0, "pins", 4, "user_percent"), "5%"),
    ("range of three", ("routes", 0, "pins", 1, "user_ranges"), [[1, 2, 3]]),
    ("negative weight", ("routes", 0, "split", "orders-v1"), -1),
    ("weight as text", ("routes", 0, "split", "orders-v1"), "95%"),
    ("split: replica", ("routes", 0, "split"), "replica"),
    ("bad duration", ("upstreams", "orders-v2", "read_timeout"), "30 sec"),
    ("zero duration", ("upstreams", "orders-v2", "read_timeout"), 0),
    ("bad size", ("body_limit",), "64 kilobytes"),
    ("endpoint as URL", ("upstreams", "orders-v1", "endpoints", 0), "http://h:1"),
    ("path_prefix without /", ("routes", 0, "match", "path_prefix"), "orders"),
    ("empty methods", ("routes", 0, "match", "methods"), []),
    ("no routes", ("routes",), []),
    ("no upstreams", ("upstreams",), {}),
    ("route name true", ("routes", 1, "name"), True),
    ("rollout without canary", ("routes", 0, "rollout"), {"stable": "orders-v1", "steps": [5]}),
    ("unknown rollout key", ("routes", 0, "rollout"), {"canary": "a", "stable": "b", "step": [1]}),
    ("percent without sign", ("routes", 0, "rollout"), ROLLOUT | {"gates": {"max_error_rate": 1}}),
    ("step above 100", ("routes", 0, "rollout"), ROLLOUT | {"steps": [5, 150]}),
    ("unknown gate", ("routes", 0, "rollout"), ROLLOUT | {"gates": {"errors": {}}}),
    ("quantile 99", ("routes", 0, "rollout"), ROLLOUT | {"gates": {"latency": {"quantile": 99}}}),
]


def _set(doc: Any, where: tuple[str | int, ...], value: object) -> None:
    for step in where[:-1]:
        doc = doc[step]
    doc[where[-1]] = value


@pytest.mark.parametrize(("where", "value"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_the_schema_refuses_what_the_validator_refuses(
    where: tuple[str | int, ...], value: object
) -> None:
    doc = copy.deepcopy(SPEC)
    _set(doc, where, value)
    text = yaml.safe_dump(doc, sort_keys=False)
    assert [p for p in check_text(text, "rules.yaml") if p.severity == "error"]
    schema = shipped_schema()
    assert errors(doc, schema, schema)


def test_missing_required_keys() -> None:
    schema = shipped_schema()
    for key in ("format", "upstreams", "routes"):
        doc = {k: v for k, v in SPEC.items() if k != key}
        assert errors(doc, schema, schema) == [f"/{key}: required"]


# -- the real thing, where it is installed --------------------------------------------


def test_jsonschema_agrees() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = shipped_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for source in [*SHIPPED, *ACCEPTED]:
        text = source.read_text(encoding="utf-8") if isinstance(source, Path) else source
        assert list(validator.iter_errors(yaml.safe_load(text))) == [], source
    for _, where, value in BROKEN:
        doc = copy.deepcopy(SPEC)
        _set(doc, where, value)
        assert list(validator.iter_errors(doc)), where

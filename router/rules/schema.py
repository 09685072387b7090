"""The JSON Schema of the rule file (format 1), and the key tables of docs/rules.md.

Editors read rules/schema.json to complete keys, show what each one means and flag
unknown or misplaced keys while a rule file is written (VS Code with the YAML extension,
JetBrains IDEs, any yaml-language-server client). It is generated, never edited:

    python -m router.rules.schema > rules/schema.json
    python -m router.rules.schema --docs docs/rules.md    rewrite the generated key tables

What each key means is written once, in the tables below, and feeds both the schema's
`description`s and the docs' key tables, so the two cannot disagree. The key sets are the
validator's own (validate.TOP_KEYS, ROUTE_KEYS, ...): a key added there without a line
here stops the build with a message saying so, and tests/test_rules_schema.py fails
until the schema and the docs are regenerated.

The schema checks shape only; `grayroute check` stays the authority. It cannot know which
upstream names a file defines, whether a regular expression compiles or a duration is
above 0, and it knows nothing of the warnings.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from typing import Any

from router.rules.model import SOURCE_KINDS, USER_CONDITIONS
from router.rules.rollout_block import ERROR_RATE_KEYS, GATES_KEYS, LATENCY_KEYS, ROLLOUT_KEYS
from router.rules.validate import (
    CORE_ROUTE_KEYS,
    DNS_KEYS,
    FORMAT,
    HEALTH_KEYS,
    MATCH_KEYS,
    PIN_KEYS,
    ROUTE_ACTIONS,
    ROUTE_EXTENSION_KEYS,
    TOP_KEYS,
    UPSTREAM_KEYS,
)

__all__ = ["build_schema", "docs_tables", "main", "schema_text", "update_docs"]

Schema = dict[str, Any]

DRAFT = "https://json-schema.org/draft/2020-12/schema"


@dataclass(frozen=True, slots=True)
class Key:
    """One key of a mapping: what it means, its default as the docs show it, its shape."""

    text: str
    default: str
    schema: Schema


@dataclass(frozen=True, slots=True)
class Section:
    title: str  # how the docs' table names the key column
    keys: tuple[str, ...]  # the validator's table, in its order
    required: tuple[str, ...]
    docs: dict[str, Key]
    defaults: bool = True  # the docs' table has `required` and `default` columns


# -- shapes shared by several keys -----------------------------------------------------

_TOKEN = "^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"  # header and cookie names, methods
_NAME: Schema = {"type": ["string", "number"]}  # text; a bare number counts as written
_REF = {
    name: {"$ref": f"#/$defs/{name}"} for name in ("duration", "size", "user_id", "percent")
}
_UPSTREAM_NAME: Schema = {"$ref": "#/$defs/upstream_name"}

DEFS: Schema = {
    "duration": {
        "description": "1s, 500ms, 2m, 1h, or a number of seconds; more than 0.",
        "anyOf": [
            {"type": "number", "exclusiveMinimum": 0},
            {
                "type": "string",
                "pattern": r"^\s*(\d+(\.\d+)?|\.\d+)\s*([mM][sS]|[sSmMhH])?\s*$",
            },
        ],
    },
    "percent": {
        "description": "A percentage with its sign: 1%, 0.5%, 99.9%.",
        "type": "string",
        "pattern": r"^\s*(\d+(\.\d+)?|\.\d+)\s*%\s*$",
    },
    "size": {
        "description": "A number of bytes, or a number with a unit: B, KB (1000 bytes), "
        "KiB (1024 bytes), MB, MiB, GB, GiB.",
        "anyOf": [
            {"type": "integer", "minimum": 0},
            {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*([bB]|[kKmMgG][iI]?[bB])?\s*$"},
        ],
    },
    "upstream_name": {
        "description": "The name of an upstream defined under `upstreams`.",
        "type": ["string", "number"],
    },
    "user_id": {
        "description": "Where the user ID is found: sources tried in order; the first that "
        "yields a non-empty value wins.",
        "type": "array",
        "items": {"$ref": "#/$defs/source"},
    },
    "split_clients": {
        "description": "nginx split_clients, bit-exact (MurmurHash2 of `key`, nginx's "
        "percent arithmetic, `*`). See docs/migration.md.",
        "type": "object",
        "required": ["key", "buckets"],
        "properties": {
            "key": {
                "description": 'nginx variables and text, e.g. "${remote_addr}AAA", "$cookie_uid".',
                "type": "string",
            },
            "buckets": {
                "description": 'In order: `- "0.5%": UPSTREAM` (two decimals at most) or '
                '`- "*": UPSTREAM` (the rest).',
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "minProperties": 1,
                    "maxProperties": 1,
                    "additionalProperties": {"$ref": "#/$defs/upstream_name"},
                },
            },
            "unmatched": {
                "description": "The upstream for hashes no bucket takes (nginx: an empty value).",
                "$ref": "#/$defs/upstream_name",
            },
        },
        "additionalProperties": False,
    },
    "lua": {
        "description": "An OpenResty routing script decides, run unchanged on LuaJIT. See "
        "docs/migration.md.",
        "type": "object",
        "required": ["file"],
        "properties": {
            "file": {"description": "The script, relative to the rule file.", "type": "string"},
            "phase": {
                "description": "As rewrite_by_lua, access_by_lua or set_by_lua. Default: rewrite.",
                "anyOf": [{"const": "rewrite"}, {"const": "access"}, {"const": "set"}],
            },
            "var": {
                "description": "rewrite/access: the variable the script sets to the upstream. "
                "Default: backend.",
                "type": "string",
            },
            "variables": {
                "description": 'More user variables, as nginx `set $NAME "";`.',
                "type": "object",
                "additionalProperties": {"type": ["string", "number"]},
            },
            "map": {
                "description": 'Value or ngx.exec target -> upstream, e.g. "@canary": orders-v2.',
                "type": "object",
                "additionalProperties": {"$ref": "#/$defs/upstream_name"},
            },
            "default": {
                "description": "When the script chooses no upstream. Default: a 500 answer.",
                "$ref": "#/$defs/upstream_name",
            },
            "fallback": {
                "description": "When the script fails. Default: a 500 answer, as nginx.",
                "$ref": "#/$defs/upstream_name",
            },
            "cpu_budget": {
                "description": "CPU time a request may use. Default: 10ms.",
                "$ref": "#/$defs/duration",
            },
            "client_body_buffer_size": {
                "description": "As nginx's. Default: 8KiB.",
                "$ref": "#/$defs/size",
            },
        },
        "additionalProperties": False,
    },
    "direct_response": {
        "description": "The route answers itself; nothing goes upstream. See docs/rules.md.",
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {
                "description": "200-599 (not a redirect: use `redirect`), or 444 to close the "
                "connection without an answer, as nginx.",
                "type": "integer",
                "anyOf": [{"minimum": 200, "maximum": 599}, {"const": 444}],
            },
            "body": {
                "description": "The answer's body. Default: none (4xx and 5xx get the router's "
                "short JSON error body).",
                "type": ["string", "number"],
            },
            "content_type": {
                "description": "Default with a body: text/plain; charset=utf-8.",
                "type": "string",
            },
        },
        "additionalProperties": False,
    },
    "redirect": {
        "description": "The route answers with a redirect built from the request. See "
        "docs/rules.md.",
        "type": "object",
        "properties": {
            "status": {
                "description": "Default: 301.",
                "anyOf": [{"const": c} for c in (301, 302, 303, 307, 308)],
            },
            "scheme": {
                "description": "Makes the Location absolute. Default: a relative Location.",
                "anyOf": [{"const": "http"}, {"const": "https"}],
            },
            "host": {
                "description": "Default: the request's host (with `scheme`).",
                "type": "string",
            },
            "port": {
                "description": "Default: none.",
                "type": "integer",
                "minimum": 1,
                "maximum": 65535,
            },
            "path": {
                "description": "The new path. Default: the request's path.",
                "type": "string",
                "pattern": "^/",
            },
            "prefix_rewrite": {
                "description": "Replaces the matched path_prefix (or path_exact).",
                "type": "string",
                "pattern": "^/",
            },
            "regex_rewrite": {"$ref": "#/$defs/regex_rewrite"},
            "strip_query": {
                "description": "Leave out the request's query. Default: false.",
                "type": "boolean",
            },
        },
        "additionalProperties": False,
    },
    "regex_rewrite": {
        "description": "Every match of `pattern` in the path is replaced by `substitution` "
        "(\\1 or \\g<name> for groups).",
        "type": "object",
        "required": ["pattern", "substitution"],
        "properties": {
            "pattern": {"description": "A regular expression.", "type": "string"},
            "substitution": {"description": "The replacement text.", "type": "string"},
        },
        "additionalProperties": False,
    },
    "weight": {
        "description": "A number of 0 or more with at most two decimals, or `replicas` "
        "(the upstream's number of endpoints).",
        "anyOf": [{"type": "number", "minimum": 0}, {"const": "replicas"}],
    },
}


def _list(items: Schema, min_items: int = 0) -> Schema:
    schema: Schema = {"type": "array", "items": items}
    if min_items:
        schema["minItems"] = min_items
    return schema


# -- what every key means ----------------------------------------------------------------

FILE = Section(
    "key",
    TOP_KEYS,
    ("format", "upstreams", "routes"),
    {
        "format": Key("The format version; must be `1`.", "", {"const": FORMAT}),
        "upstreams": Key(
            "Named pools of endpoints, one per service version (at least one).",
            "",
            {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": {"$ref": "#/$defs/upstream"},
            },
        ),
        "user_id": Key(
            "Where the user ID is found, in order: `- header: NAME`, `- cookie: NAME`, "
            "`- query: NAME`, `- json: PATH`, `- form: NAME`.",
            "no sources",
            _REF["user_id"],
        ),
        "body_limit": Key(
            "At most this much of a request body is held to find the user ID; a larger "
            "body yields no ID from the body and is still forwarded whole.",
            "`64KiB`",
            _REF["size"],
        ),
        "routes": Key(
            "The routes, checked in order; the first whose `match` holds decides (at least one).",
            "",
            _list({"$ref": "#/$defs/route"}, min_items=1),
        ),
        "lua_shared_dicts": Key(
            "*Extension* (nginx migration): `NAME: SIZE` for `ngx.shared.NAME` in Lua routes, "
            "as nginx's `lua_shared_dict`; one per worker.",
            "none",
            {"type": "object", "additionalProperties": _REF["size"]},
        ),
    },
)

UPSTREAM = Section(
    "key",
    UPSTREAM_KEYS,
    ("endpoints",),
    {
        "endpoints": Key(
            "`HOST:PORT` list; IPv6 addresses in brackets. Requests go round-robin over the "
            "healthy ones. An endpoint listed twice gets twice the share (a warning). Empty "
            "while a version is scaled to zero: then no `to`, pin or split weight above 0 "
            "may name it, unless it has a `fallback` with endpoints. Or `{dns: NAME, port: "
            "PORT}`: one endpoint per address the name has, looked up again every `interval` "
            "(see below).",
            "",
            {
                "anyOf": [
                    _list(
                        {
                            "type": "string",
                            "pattern": r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):[0-9]{1,5}$",
                        }
                    ),
                    {"$ref": "#/$defs/dns_endpoints"},
                ]
            },
        ),
        "connect_timeout": Key(
            "Time to open a connection to an endpoint.",
            "the server's `--connect-timeout` (2 s)",
            _REF["duration"],
        ),
        "read_timeout": Key(
            "Time to wait for the upstream's answer.",
            "the server's `--read-timeout` (30 s)",
            _REF["duration"],
        ),
        "health_check": Key(
            "*Extension*: probe every endpoint with `GET path` every `interval`; an endpoint "
            "that fails is skipped until it passes again.",
            "none",
            {"$ref": "#/$defs/health_check"},
        ),
        "fallback": Key(
            "Another upstream that takes this one's requests while none of its endpoints is "
            "up (or it has none) instead of a 502 (503 with none); its own `fallback` is next "
            "when it is down too. Counted in `grayroute_fallback_requests_total`.",
            "none",
            _UPSTREAM_NAME,
        ),
        "max_fails": Key(
            "*Extension* (passive health, as nginx's `max_fails`): an endpoint whose "
            "connections fail (refused, timed out) this many times within `fail_timeout` is "
            "skipped for `fail_timeout`; `0` never skips it.",
            "`1`",
            {"type": "integer", "minimum": 0},
        ),
        "fail_timeout": Key(
            "*Extension* (as nginx's `fail_timeout`): the window in which `max_fails` "
            "failures count, and how long the endpoint is then skipped.",
            "the server's `--fail-timeout` (10 s)",
            _REF["duration"],
        ),
    },
)

HEALTH_CHECK = Section(
    "key",
    HEALTH_KEYS,
    (),
    {
        "path": Key(
            "The path probed; a 2xx or 3xx answer counts as healthy.",
            "`/healthz`",
            {"type": "string", "pattern": "^/"},
        ),
        "interval": Key("Time between two probes of an endpoint.", "`5s`", _REF["duration"]),
    },
)

DNS_ENDPOINTS = Section(
    "key",
    DNS_KEYS,
    ("dns", "port"),
    {
        "dns": Key(
            "A DNS name, e.g. a headless Service `orders-v1.shop.svc.cluster.local`: each of "
            "its A and AAAA records is one endpoint (one ready pod). No such name "
            "(NXDOMAIN) or no records is zero endpoints, never an error.",
            "",
            {"type": "string", "pattern": r"^[A-Za-z0-9_.-]+$"},
        ),
        "port": Key(
            "The port every address is reached on.",
            "",
            {"type": "integer", "minimum": 1, "maximum": 65535},
        ),
        "interval": Key(
            "Time between two lookups (100ms at least). A failed lookup keeps the "
            "endpoints found last.",
            "`5s`",
            _REF["duration"],
        ),
    },
)

SOURCE = Section(
    "source",
    SOURCE_KINDS,
    (),
    {
        "header": Key(
            "A request header (the name ignores case); of repeated headers, the first.",
            "",
            {"type": "string", "pattern": _TOKEN},
        ),
        "cookie": Key(
            "A cookie in the Cookie header.", "", {"type": ["string", "number"], "pattern": _TOKEN}
        ),
        "query": Key("A query parameter, URL-decoded.", "", _NAME),
        "json": Key(
            "A field of a JSON body, by a dotted path (`user.id`, `items[0].id`): a JSON "
            "string as it is, a JSON integer as its digits.",
            "",
            _NAME,
        ),
        "form": Key(
            "A field of an `application/x-www-form-urlencoded` body, URL-decoded.", "", _NAME
        ),
    },
    defaults=False,
)

ROUTE = Section(
    "key",
    CORE_ROUTE_KEYS,
    ("name",),
    {
        "name": Key(
            "Unique; metrics, logs and `explain` report it. The default `salt`.", "", _NAME
        ),
        "match": Key(
            "Conditions on the request (`hosts`, `path_prefix`, `methods`); every one given "
            "must hold.",
            "every request",
            {"$ref": "#/$defs/match"},
        ),
        "pins": Key(
            "Major versions, by user: checked first, in order; the first pin that holds "
            "sends the request to its `to`.",
            "none",
            _list({"$ref": "#/$defs/pin"}),
        ),
        "to": Key(
            "The one upstream for every request of the route that no pin took. A route has "
            "exactly one of `to` and `split` (or one of the extensions `split_clients`, "
            "`lua`, `direct_response`, `redirect`).",
            "",
            _UPSTREAM_NAME,
        ),
        "split": Key(
            "Minor versions, by weight: `UPSTREAM: WEIGHT` lines, or `replicas` to weigh "
            "every upstream by its number of endpoints. Sticky: a user ID always gets the "
            "same upstream.",
            "",
            {
                "anyOf": [
                    {"const": "replicas"},
                    {
                        "type": "object",
                        "minProperties": 1,
                        "additionalProperties": {"$ref": "#/$defs/weight"},
                    },
                ]
            },
        ),
        "salt": Key(
            "Feeds the hash of `split` and `user_percent`; a new salt picks a fresh sample "
            "of users.",
            "the route's `name`",
            _NAME,
        ),
        "user_id": Key(
            "This route's own sources; they replace the file's `user_id` (`[]`: no user ID).",
            "the file's",
            _REF["user_id"],
        ),
        "body_limit": Key(
            "*Extension*: replaces the file's `body_limit` for this route.",
            "the file's",
            _REF["size"],
        ),
        "rollout": Key(
            "Progressive rollout of the split's canary: the router judges it against the "
            "stable version on this route's split traffic and moves its weight step by "
            "step, or back to 0 (docs/rollout.md). Only with `split`.",
            "none",
            {"$ref": "#/$defs/rollout"},
        ),
    },
)

# Route keys of the nginx migration (router/rules/lua_routes.py): described here, added
# after the format-1 keys in the schema and in the docs' route table.
ROUTE_EXTENSIONS: dict[str, Key] = {
    "split_clients": Key(
        "*Extension* (nginx migration): instead of `to`/`split`, nginx's split_clients: "
        '`key` (nginx variables), `buckets` (`- "0.5%": UPSTREAM`, `- "*": UPSTREAM`), '
        "`unmatched`. Every user lands in the bucket nginx gives them.",
        "",
        {"$ref": "#/$defs/split_clients"},
    ),
    "lua": Key(
        "*Extension* (nginx migration): instead of `to`/`split`, an OpenResty routing "
        "script decides: `file`, `phase`, `var`, `map`, `default`, `fallback` "
        "(docs/migration.md).",
        "",
        {"$ref": "#/$defs/lua"},
    ),
    "direct_response": Key(
        "*Extension*: instead of `to`/`split`, the route answers itself: `status`, `body`, "
        "`content_type`.",
        "",
        {"$ref": "#/$defs/direct_response"},
    ),
    "redirect": Key(
        "*Extension*: instead of `to`/`split`, the route answers with a redirect: `status`, "
        "`scheme`, `host`, `port`, `path` or `prefix_rewrite` or `regex_rewrite`, "
        "`strip_query`.",
        "",
        {"$ref": "#/$defs/redirect"},
    ),
    "prefix_rewrite": Key(
        "*Extension*: the path sent upstream has the matched `path_prefix` (or "
        "`path_exact`) replaced by this text; the query is kept.",
        "the path as received",
        {"type": "string", "pattern": "^/"},
    ),
    "regex_rewrite": Key(
        "*Extension*: the path sent upstream has every match of `pattern` replaced by "
        "`substitution`; the query is kept.",
        "the path as received",
        {"$ref": "#/$defs/regex_rewrite"},
    ),
}

MATCH = Section(
    "condition",
    MATCH_KEYS,
    (),
    {
        "hosts": Key(
            "The Host header, lower-cased and without its port, is one of these: exact "
            "names, or (*extension*) wildcards `*.example.com` (names ending in "
            "`.example.com`) and `www.example.*` (names starting with `www.example.`).",
            "any host",
            _list({"type": "string"}, min_items=1),
        ),
        "path_exact": Key(
            "*Extension*: the path (without the query) is exactly this text. A match has one "
            "of `path_prefix`, `path_exact` and `path_regex`.",
            "any path",
            {"type": "string", "pattern": "^/"},
        ),
        "path_regex": Key(
            "*Extension*: this regular expression is found in the path (without the query); "
            "anchor it with `^` and `$` to match the whole path.",
            "any path",
            {"type": "string"},
        ),
        "host_regex": Key(
            "*Extension*: this regular expression is found in the Host header, lower-cased "
            "and without its port.",
            "any host",
            {"type": "string"},
        ),
        "headers": Key(
            "*Extension*: every listed header is present and its regular expression is found "
            "in its value (the first of repeated headers), as a pin's `headers`.",
            "any headers",
            {
                "type": "object",
                "propertyNames": {"pattern": _TOKEN},
                "additionalProperties": _NAME,
            },
        ),
        "default_host": Key(
            "*Extension*: `true`: the Host matches no route's `hosts` or `host_regex` (or "
            "there is none), as nginx's default server.",
            "any host",
            {"type": "boolean"},
        ),
        "path_prefix": Key(
            "The path (without the query) starts with this text. A plain prefix: `/api` also "
            "matches `/apiary`; write `/api/` for the folder. Case matters.",
            "any path",
            {"type": "string", "pattern": "^/"},
        ),
        "methods": Key(
            "The method is one of these, compared upper-case.",
            "any method",
            _list({"type": "string", "pattern": _TOKEN}, min_items=1),
        ),
    },
)

_NO_ID = " Never holds for a request without a user ID."

PIN = Section(
    "key",
    PIN_KEYS,
    ("to",),
    {
        "to": Key("Required: the upstream this pin sends requests to.", "", _UPSTREAM_NAME),
        "users": Key("Holds when the user ID is one of these (exact text).", "", _list(_NAME)),
        "user_ranges": Key(
            "Holds when the user ID is all ASCII digits and its value is inside one "
            "`[low, high]` range, both ends included (`007` is 7).",
            "",
            _list({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}),
        ),
        "user_suffixes": Key("Holds when the user ID ends with one of these.", "", _list(_NAME)),
        "user_pattern": Key(
            "Holds when this regular expression matches the whole user ID.", "", _NAME
        ),
        "user_percent": Key(
            "Holds when the user's bucket, from a stable hash of the salt and the user ID, is "
            "below this percentage (0-100, at most two decimals); raising it only adds users.",
            "",
            {"type": "number", "minimum": 0, "maximum": 100},
        ),
        "headers": Key(
            "Holds when every listed header is present and its regular expression is found "
            "in its value.",
            "",
            {
                "type": "object",
                "propertyNames": {"pattern": _TOKEN},
                "additionalProperties": _NAME,
            },
        ),
        "client_cidrs": Key(
            "Holds when the client address is in one of these networks: the peer's, or with "
            "`--trusted-proxy` the first untrusted hop of `X-Forwarded-For`.",
            "",
            _list({"type": "string"}),
        ),
    },
    defaults=False,
)

_COUNT: Schema = {"type": "integer", "minimum": 1}

ROLLOUT = Section(
    "key",
    ROLLOUT_KEYS,
    ("canary", "stable"),
    {
        "canary": Key(
            "The upstream whose weight the rollout drives; in the route's split (at 0 "
            "where the rollout starts).",
            "",
            _UPSTREAM_NAME,
        ),
        "stable": Key(
            "The upstream the canary is compared with; it takes the remainder of the "
            "weight the two have in the split.",
            "",
            _UPSTREAM_NAME,
        ),
        "steps": Key(
            "The canary's weight (percent of the two versions' traffic) at each step, "
            "increasing, above 0 and at most 100. After the last step the canary has "
            "100. Leave out with `split: replicas`: the rollout then only guards.",
            "required without `split: replicas`",
            _list({"type": "number", "exclusiveMinimum": 0, "maximum": 100}, min_items=1),
        ),
        "interval": Key("Time between two analyses.", "`30s`", _REF["duration"]),
        "min_requests": Key(
            "Requests each version needs in an interval; with fewer the gates say NODATA, "
            "which holds the weight and is never a failure.",
            "`200`",
            _COUNT,
        ),
        "max_nodata": Key(
            "NODATA intervals in a row after which the rollout is Paused.", "`10`", _COUNT
        ),
        "failures": Key(
            "FAIL verdicts within one step that roll the canary back (weight 0, Failed).",
            "`2`",
            _COUNT,
        ),
        "gates": Key(
            "What is judged every interval: `error_rate`, `latency`, `max_error_rate`.",
            "all three, with their defaults",
            {"$ref": "#/$defs/gates"},
        ),
        "notify": Key(
            "http(s) URLs that get a JSON POST on every phase change.",
            "none",
            _list({"type": "string", "pattern": "^https?://"}),
        ),
    },
)

GATES = Section(
    "gate",
    GATES_KEYS,
    (),
    {
        "error_rate": Key(
            "Fails when the canary's failure rate (5xx, connect errors, timeouts) exceeds "
            "the stable version's by more than `max_increase` and a one-sided test says "
            "the canary fails more often, at `confidence`.",
            "`{max_increase: 1%, confidence: 99%}`",
            {"$ref": "#/$defs/error_rate"},
        ),
        "latency": Key(
            "Fails when the canary's `quantile` exceeds both `max_ratio` x the stable "
            "version's and the stable version's + `min_increase`, and a one-sided test "
            "says so at `confidence`.",
            "`{quantile: 0.99, max_ratio: 1.2, min_increase: 50ms, confidence: 99%}`",
            {"$ref": "#/$defs/latency"},
        ),
        "max_error_rate": Key(
            "Hard guard: a canary failing more than this over at least 20 requests is "
            "rolled back at once (held when the stable version fails as much).",
            "`50%`",
            _REF["percent"],
        ),
    },
)

ERROR_RATE = Section(
    "key",
    ERROR_RATE_KEYS,
    (),
    {
        "max_increase": Key(
            "How much higher than the stable version's the canary's failure rate may be.",
            "`1%`",
            _REF["percent"],
        ),
        "confidence": Key(
            "How sure the test must be that the canary fails more often (below 100%).",
            "`99%`",
            _REF["percent"],
        ),
    },
)

LATENCY = Section(
    "key",
    LATENCY_KEYS,
    (),
    {
        "quantile": Key(
            "The latency quantile compared, between 0 and 1.",
            "`0.99`",
            {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        ),
        "max_ratio": Key(
            "How many times the stable version's quantile the canary's may be (1 or more).",
            "`1.2`",
            {"type": "number", "minimum": 1},
        ),
        "min_increase": Key(
            "How much above the stable version's quantile the canary's may be in any case, "
            "so that fast services are not failed for a millisecond.",
            "`50ms`",
            {"anyOf": [{"const": 0}, _REF["duration"]]},
        ),
        "confidence": Key(
            "How sure the test must be that more of the canary's requests are slower "
            "than the threshold than the quantile allows (below 100%).",
            "`99%`",
            _REF["percent"],
        ),
    },
)

SECTIONS: dict[str, Section] = {
    "file": FILE,
    "upstream": UPSTREAM,
    "dns_endpoints": DNS_ENDPOINTS,
    "health_check": HEALTH_CHECK,
    "source": SOURCE,
    "route": ROUTE,
    "match": MATCH,
    "pin": PIN,
    "rollout": ROLLOUT,
    "gates": GATES,
    "error_rate": ERROR_RATE,
    "latency": LATENCY,
}


def _meaning(name: str, key: str) -> str:
    text = SECTIONS[name].docs[key].text
    return text + _NO_ID if name == "pin" and key in USER_CONDITIONS else text


def _description(name: str, key: str) -> str:
    default = SECTIONS[name].docs[key].default
    text = _meaning(name, key)
    return f"{text} Default: {default.replace('`', '')}." if default else text


def _object(name: str) -> Schema:
    section = SECTIONS[name]
    missing = [k for k in section.keys if k not in section.docs]
    extra = [k for k in section.docs if k not in section.keys]
    if missing or extra:
        raise RuntimeError(
            f"router/rules/schema.py is out of step with the validator ({name}): "
            f"describe {missing or 'nothing more'}, remove {extra or 'nothing'}"
        )
    schema: Schema = {"type": "object"}
    if section.required:
        schema["required"] = list(section.required)
    schema["properties"] = {
        key: {"description": _description(name, key), **section.docs[key].schema}
        for key in section.keys
    }
    schema["additionalProperties"] = False  # a misspelt key is an error, never ignored
    return schema


def build_schema() -> Schema:
    """The JSON Schema (draft 2020-12) of a rule file, as a dict ready for json.dumps."""
    top = _object("file")
    defs: Schema = dict(DEFS)
    defs["upstream"] = _object("upstream")
    defs["health_check"] = _object("health_check")
    defs["dns_endpoints"] = _object("dns_endpoints")
    defs["source"] = {
        **_object("source"),
        "description": "One source per item, e.g. `header: X-User-Id`.",
        "minProperties": 1,
        "maxProperties": 1,
    }
    route = _object("route")
    for key in ROUTE_EXTENSION_KEYS:
        ext = ROUTE_EXTENSIONS[key]
        text = f"{ext.text} Default: {ext.default}." if ext.default else ext.text
        route["properties"][key] = {"description": text, **ext.schema}
    defs["route"] = {
        **route,
        "oneOf": [{"required": [key]} for key in ROUTE_ACTIONS],
    }
    defs["match"] = _object("match")
    for name in ("rollout", "gates", "error_rate", "latency"):
        defs[name] = _object(name)
    defs["pin"] = {
        **_object("pin"),
        "description": "Holds when all the conditions it names hold; it names at least one.",
        "minProperties": 2,  # `to` and at least one condition
    }
    return {
        "$schema": DRAFT,
        "title": f"Grayroute rule file (format {FORMAT})",
        "description": "Where each request goes: upstreams, user ID sources and routes. "
        "Check a file with `grayroute check`; the format is described in docs/rules.md.",
        **top,
        "$defs": dict(sorted(defs.items())),
    }


def schema_text() -> str:
    """rules/schema.json as it must be, byte for byte."""
    return json.dumps(build_schema(), indent=2, ensure_ascii=False) + "\n"


# -- the docs' key tables ----------------------------------------------------------------

_BEGIN = "<!-- BEGIN keys:{} (generated: python -m router.rules.schema --docs docs/rules.md) -->"
_END = "<!-- END keys:{} -->"
_BLOCK = re.compile(r"<!-- BEGIN keys:(\w+) .*?-->\n.*?<!-- END keys:\1 -->", re.DOTALL)


def docs_tables() -> dict[str, str]:
    """Each section's Markdown table, between its markers, by section name."""
    tables: dict[str, str] = {}
    for name, section in SECTIONS.items():
        if section.defaults:
            rows = [
                f"| {section.title} | required | default | meaning |",
                "| --- | --- | --- | --- |",
            ]
            for key in section.keys:
                required = "yes" if key in section.required else "no"
                default = section.docs[key].default
                rows.append(f"| `{key}` | {required} | {default} | {_meaning(name, key)} |")
            if name == "route":
                for key in ROUTE_EXTENSION_KEYS:
                    ext = ROUTE_EXTENSIONS[key]
                    rows.append(f"| `{key}` | no | {ext.default} | {ext.text} |")
        else:
            rows = [f"| {section.title} | meaning |", "| --- | --- |"]
            rows += [f"| `{key}` | {_meaning(name, key)} |" for key in section.keys]
        tables[name] = "\n".join([_BEGIN.format(name), *rows, _END.format(name)])
    return tables


def update_docs(text: str) -> str:
    """`text` with every generated table replaced by its current version."""
    tables = docs_tables()
    return _BLOCK.sub(lambda m: tables[m.group(1)], text)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        sys.stdout.write(schema_text())
        return 0
    if len(args) == 2 and args[0] == "--docs":
        with open(args[1], encoding="utf-8") as f:
            text = f.read()
        with open(args[1], "w", encoding="utf-8") as f:
            f.write(update_docs(text))
        return 0
    print("usage: python -m router.rules.schema [--docs docs/rules.md]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""The one exception tree of Grayroute, and how errors become HTTP answers.

    GrayrouteError                 every error Grayroute raises on purpose
    ├── ConfigError                bad server settings (command line); one line, exit 1
    ├── RulesError                 a rule file that does not follow the format; carries
    │                              every Problem found, each with FILE:LINE:COLUMN
    └── ProxyError                 a request that cannot be proxied; has an HTTP status
        ├── NoRouteError           404: no route matched
        ├── BadRequestError        400: malformed or ambiguous request framing
        ├── MethodNotAllowed       405: TRACE (refused as nginx does)
        ├── HeaderTimeout          408: the request head did not arrive in time
        ├── ExpectationFailed      417: an Expect other than 100-continue
        ├── BodyTooLarge           413: a request body over --max-body-bytes
        ├── TargetTooLong          414: a request target over --max-target-bytes
        ├── HeadersTooLarge        431: a header section over --max-header-bytes/-count
        ├── InternalError          500: a bug in Grayroute (logged with its traceback)
        ├── NoEndpoints            503: the upstream has no endpoints now (a DNS name with
        │                          no records: zero replicas)
        ├── TooManyTunnels         503: a WebSocket upgrade while --max-tunnels are open
        ├── UpstreamUnavailable    502: every endpoint refused or reset the connection
        ├── UpstreamBadResponse    502: the upstream answered something that is not HTTP
        └── UpstreamTimeout        504: connect or read timeout

Errors of other libraries (OSError, httptools errors, yaml errors) are translated into
these at the boundary where they happen; nothing above that boundary sees them.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong (or worth a warning) in a rule file."""

    file: str
    line: int  # 1-based
    column: int  # 1-based
    path: str  # e.g. routes[0].split.orders-v9
    message: str  # what is wrong
    hint: str = ""  # what to do
    severity: str = "error"  # "error" or "warning"

    def __str__(self) -> str:
        hint = f" ({self.hint})" if self.hint else ""
        prefix = "warning: " if self.severity == "warning" else ""
        return f"{self.file}:{self.line}:{self.column}: {prefix}{self.path}: {self.message}{hint}"


class GrayrouteError(Exception):
    """Base of every error Grayroute raises on purpose."""


class ConfigError(GrayrouteError):
    """Server settings that cannot work (listen address, workers, timeouts, ...)."""


class RulesError(GrayrouteError):
    """A rule file that was rejected; `problems` lists every error found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class ProxyError(GrayrouteError):
    status: int = 502
    reason: str = "Bad Gateway"
    code: str = "proxy_error"

    def __init__(self, detail: str = "") -> None:
        self.detail = detail
        super().__init__(detail or self.code)


class NoRouteError(ProxyError):
    status, reason, code = 404, "Not Found", "no_route"


class BadRequestError(ProxyError):
    status, reason, code = 400, "Bad Request", "bad_request"


class MethodNotAllowed(ProxyError):
    status, reason, code = 405, "Method Not Allowed", "method_not_allowed"


class HeaderTimeout(ProxyError):
    status, reason, code = 408, "Request Timeout", "header_timeout"


class ExpectationFailed(ProxyError):
    status, reason, code = 417, "Expectation Failed", "expectation_failed"


class BodyTooLarge(ProxyError):
    status, reason, code = 413, "Content Too Large", "body_too_large"


class TargetTooLong(ProxyError):
    status, reason, code = 414, "URI Too Long", "target_too_long"


class HeadersTooLarge(ProxyError):
    status, reason, code = 431, "Request Header Fields Too Large", "headers_too_large"


class InternalError(ProxyError):
    status, reason, code = 500, "Internal Server Error", "internal_error"


class NoEndpoints(ProxyError):
    status, reason, code = 503, "Service Unavailable", "no_endpoints"


class TooManyTunnels(ProxyError):
    status, reason, code = 503, "Service Unavailable", "too_many_tunnels"


class UpstreamUnavailable(ProxyError):
    status, reason, code = 502, "Bad Gateway", "upstream_unavailable"


class UpstreamBadResponse(ProxyError):
    status, reason, code = 502, "Bad Gateway", "upstream_bad_response"


class UpstreamTimeout(ProxyError):
    status, reason, code = 504, "Gateway Timeout", "upstream_timeout"


def error_body(code: str, detail: str) -> bytes:
    """The short JSON body of every error the router answers itself."""
    return orjson.dumps({"error": code, "detail": detail})

"""The routing decision: a pure function of (snapshot, request view).

`decide()` is called by the proxy for every request and by `grayroute explain` for
every line it reads; both must get the same answer for the same input.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping


class RequestView:
    """What the rules may look at in one request.

    `headers` maps lower-case names to the first value seen; the proxy fills in only the
    names the snapshot asks for (`Snapshot.header_names`). `body` is None when the body
    was not read, else its first `body_limit` bytes; `body_complete` says whether those
    bytes are the whole body. `client_ip` is the address the pins look at (already
    resolved through trusted proxies by the caller).
    """

    __slots__ = ("body", "body_complete", "client_ip", "headers", "host", "method", "path", "query")

    def __init__(
        self,
        method: str,
        path: str,
        query: str,
        host: str,
        headers: Mapping[str, str],
        client_ip: str,
        body: bytes | None = None,
        body_complete: bool = False,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.host = host
        self.headers = headers
        self.client_ip = client_ip
        self.body = body
        self.body_complete = body_complete


class Decision:
    """Where one request goes, and why.

    `route` is None when no route matched (the proxy answers 404). `reason` is a short
    human-readable account, e.g. ``pin[0] users``, ``split 95/5 -> orders-v1``, ``to``.
    """

    __slots__ = ("reason", "route", "upstream", "user_id", "user_id_source")

    def __init__(
        self,
        route: str | None,
        upstream: str | None,
        user_id: str | None,
        user_id_source: str | None,
        reason: str,
    ) -> None:
        self.route = route
        self.upstream = upstream
        self.user_id = user_id
        self.user_id_source = user_id_source
        self.reason = reason

    def as_dict(self) -> dict[str, str | None]:
        return {
            "route": self.route,
            "upstream": self.upstream,
            "user_id": self.user_id,
            "user_id_source": self.user_id_source,
            "reason": self.reason,
        }

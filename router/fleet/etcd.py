"""A small etcd v3 client over etcd's JSON gateway (the `/v3/...` HTTP endpoints), on httpx.

Only what the router needs: range (at a revision), put, txn (compare-and-swap on a key's
mod_revision), watch (a streamed response, one JSON object per line), leases (grant,
keep-alive, revoke), compaction (for tests and tools), user/password authentication and
TLS. Keys and values are bytes; the gateway wants them base64-encoded and answers int64
numbers as strings, both handled here. A field etcd leaves at its zero value is absent
from its answers (`succeeded`, `kvs`, `count`, a lease's `TTL`): read with defaults.

    EtcdClient(endpoints, tls=..., username=..., password=..., timeout=2.0)
        range(key, ...)  get(key)  put(key, value)  delete(key)  txn(compare, ok, else)
        watch(key, start_revision)   (async context manager: an async iterator of batches)
        lease_grant(ttl)  lease_keepalive(id)  lease_revoke(id)  compact(revision)

Endpoints are tried in order; a request moves on to the next one only when the
connection could not be made (the request was not sent), so a put or txn is never sent
twice. Exceptions (errors of httpx are translated here, at the boundary):

    EtcdError               every failure of this module
    ├── EtcdUnavailable     no endpoint could be reached, a timeout, a closed stream, or
    │                       etcd answered that it cannot serve now (no leader)
    ├── EtcdCompacted       the revision asked for was compacted (`compact_revision`)
    ├── EtcdAuthError       authentication failed or permission denied
    └── EtcdRequestError    etcd refused the request (`code`: the gRPC status code)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import orjson

__all__ = [
    "EtcdAuthError",
    "EtcdClient",
    "EtcdCompacted",
    "EtcdError",
    "EtcdRequestError",
    "EtcdUnavailable",
    "KeyValue",
    "Lease",
    "RangeResult",
    "TLSConfig",
    "TxnResult",
    "WatchBatch",
    "WatchEvent",
    "create_revision_is",
    "delete_op",
    "mod_revision_is",
    "prefix_end",
    "put_op",
    "range_op",
]

# httpx logs every request at INFO: a watch reconnecting would flood the router's log.
logging.getLogger("httpx").setLevel(logging.WARNING)

# gRPC status codes etcd answers with (google.golang.org/grpc/codes).
_INVALID_ARGUMENT = 3
_PERMISSION_DENIED = 7
_OUT_OF_RANGE = 11  # "mvcc: required revision has been compacted" (or is a future one)
_UNAVAILABLE = 14
_UNAUTHENTICATED = 16


class EtcdError(Exception):
    """A failure talking to etcd; the message says what and where."""


class EtcdUnavailable(EtcdError):
    """No endpoint could be reached or answered in time; try again later."""


class EtcdCompacted(EtcdError):
    """The revision asked for is older than the compaction at `compact_revision`."""

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


class EtcdAuthError(EtcdError):
    """Wrong user name or password, or the user may not do this."""


class EtcdRequestError(EtcdError):
    """etcd refused the request; `code` is the gRPC status code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """Files for TLS to etcd: the CA that signed etcd's certificate (None: the system's),
    and a client certificate and key when etcd requires one."""

    cacert: str | None = None
    cert: str | None = None
    key: str | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.cacert)
        if self.cert:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class RangeResult:
    revision: int  # the store's revision when the range was served
    kvs: tuple[KeyValue, ...]
    count: int
    more: bool


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int  # after the txn (its own revision when it wrote something)
    responses: tuple[dict[str, Any], ...]  # decoded: "range" answers carry `kvs`

    def range_kvs(self, index: int) -> tuple[KeyValue, ...]:
        """The key-values of the range at `index` in the branch that ran."""
        answer = self.responses[index].get("response_range") or {}
        return tuple(_kv(kv) for kv in answer.get("kvs") or ())


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: Literal["put", "delete"]
    kv: KeyValue


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """One message of a watch: `created` (the first one, no events) or events."""

    revision: int
    events: tuple[WatchEvent, ...]
    created: bool = False


@dataclass(frozen=True, slots=True)
class Lease:
    id: int
    ttl: int


# -- building requests -------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes a range cover every key starting with `prefix`."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # every key


def mod_revision_is(key: bytes, revision: int) -> dict[str, Any]:
    """Compare: the key was last written at `revision` (0: the key does not exist)."""
    return {"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}


def create_revision_is(key: bytes, revision: int) -> dict[str, Any]:
    """Compare: the key was created at `revision` (0: it does not exist)."""
    return {
        "key": _b64(key),
        "target": "CREATE",
        "result": "EQUAL",
        "create_revision": str(revision),
    }


def put_op(key: bytes, value: bytes, lease: int = 0) -> dict[str, Any]:
    put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        put["lease"] = str(lease)
    return {"request_put": put}


def range_op(key: bytes) -> dict[str, Any]:
    return {"request_range": {"key": _b64(key)}}


def delete_op(key: bytes) -> dict[str, Any]:
    return {"request_delete_range": {"key": _b64(key)}}


def _kv(raw: dict[str, Any]) -> KeyValue:
    return KeyValue(
        key=_unb64(raw.get("key")),
        value=_unb64(raw.get("value")),
        create_revision=int(raw.get("create_revision", 0)),
        mod_revision=int(raw.get("mod_revision", 0)),
        version=int(raw.get("version", 0)),
        lease=int(raw.get("lease", 0)),
    )


def _revision(body: dict[str, Any]) -> int:
    return int((body.get("header") or {}).get("revision", 0))


def _error(status: int, body: Any, where: str) -> EtcdError:
    """The exception for an error answer of etcd (`{"error", "code", "message"}`)."""
    message = (
        str(body.get("message") or body.get("error") or body) if isinstance(body, dict) else ""
    )
    code = int(body.get("code", 0)) if isinstance(body, dict) else 0
    text = f"etcd {where}: {message or f'HTTP {status}'}"
    if code == _OUT_OF_RANGE and "compacted" in message:
        return EtcdCompacted(text, 0)
    if code in (_PERMISSION_DENIED, _UNAUTHENTICATED) or (
        code == _INVALID_ARGUMENT and ("authentication failed" in message or "user name" in message)
    ):
        return EtcdAuthError(text)
    if code == _UNAVAILABLE or (status >= 500 and not code):
        return EtcdUnavailable(text)
    return EtcdRequestError(text, code)


# -- the client ----------------------------------------------------------------------------


class EtcdClient:
    """One connection pool to an etcd cluster; `await aclose()` when done.

    `endpoints` are HOST:PORT of the cluster's client URLs (http, or https with `tls`).
    `timeout` bounds each unary request and the connection of a watch, not a watch's
    silence (a watch may rightly see nothing for hours).
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        tls: TLSConfig | None = None,
        username: str = "",
        password: str = "",
        timeout: float = 2.0,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        scheme = "https" if tls is not None else "http"
        self.endpoints = tuple(endpoints)
        self._bases = [f"{scheme}://{ep}" for ep in endpoints]
        self._current = 0
        self._username = username
        self._password = password
        self._token: str | None = None
        self.timeout = timeout
        verify: ssl.SSLContext | bool = tls.context() if tls is not None else False
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            verify=verify,
            trust_env=False,  # an HTTP(S)_PROXY meant for the Internet must not carry this
            limits=httpx.Limits(max_keepalive_connections=4),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def endpoint(self) -> str:
        """The endpoint in use now (the last that answered)."""
        return self.endpoints[self._current]

    # -- plumbing --------------------------------------------------------------------------

    async def _authenticate(self) -> str:
        body = await self._post_raw(
            "/v3/auth/authenticate",
            {"name": self._username, "password": self._password},
            "authenticate",
            auth=False,
        )
        token = body.get("token")
        if not token:
            raise EtcdAuthError(f"etcd authenticate as {self._username!r}: no token in the answer")
        self._token = str(token)
        return self._token

    async def _headers(self, auth: bool) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if auth and self._username:
            headers["authorization"] = self._token or await self._authenticate()
        return headers

    async def _post(self, path: str, body: dict[str, Any], what: str) -> dict[str, Any]:
        try:
            return await self._post_raw(path, body, what)
        except EtcdAuthError:
            if not self._username or self._token is None:
                raise
            # Tokens expire (simple tokens after 5 minutes idle); one fresh login, then give up.
            self._token = None
            return await self._post_raw(path, body, what)

    async def _post_raw(
        self, path: str, body: dict[str, Any], what: str, *, auth: bool = True
    ) -> dict[str, Any]:
        content = orjson.dumps(body)
        headers = await self._headers(auth)
        response = await self._send(lambda base: self._http.post(
            base + path, content=content, headers=headers
        ), what)  # fmt: skip
        try:
            answer = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            answer = None
        if response.status_code != 200 or not isinstance(answer, dict) or "error" in answer:
            raise _error(response.status_code, answer, what)
        return answer

    async def _send(
        self, call: Callable[[str], Awaitable[httpx.Response]], what: str
    ) -> httpx.Response:
        """`call(base_url)` on the current endpoint, moving on while connections fail."""
        last: Exception | None = None
        for attempt in range(len(self._bases)):
            index = (self._current + attempt) % len(self._bases)
            try:
                response: httpx.Response = await call(self._bases[index])
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                last = exc  # nothing was sent: the next endpoint may take it
                continue
            except httpx.HTTPError as exc:
                raise EtcdUnavailable(
                    f"etcd {what} at {self.endpoints[index]}: {_describe(exc)}"
                ) from exc
            self._current = index
            return response
        raise EtcdUnavailable(
            f"etcd {what}: no endpoint reachable ({', '.join(self.endpoints)}): "
            f"{_describe(last) if last else 'no endpoint'}"
        ) from last

    # -- key-value ---------------------------------------------------------------------------

    async def range(
        self,
        key: bytes,
        *,
        range_end: bytes | None = None,
        prefix: bool = False,
        revision: int = 0,
        keys_only: bool = False,
        limit: int = 0,
    ) -> RangeResult:
        body: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            range_end = prefix_end(key)
        if range_end is not None:
            body["range_end"] = _b64(range_end)
        if revision:
            body["revision"] = str(revision)
        if keys_only:
            body["keys_only"] = True
        if limit:
            body["limit"] = str(limit)
        answer = await self._post("/v3/kv/range", body, f"range {key!r}")
        kvs = tuple(_kv(kv) for kv in answer.get("kvs") or ())
        return RangeResult(
            revision=_revision(answer),
            kvs=kvs,
            count=int(answer.get("count", 0)),
            more=bool(answer.get("more", False)),
        )

    async def get(self, key: bytes, revision: int = 0) -> tuple[KeyValue | None, int]:
        """The key's value (None when absent) and the store's revision it was read at."""
        result = await self.range(key, revision=revision)
        return (result.kvs[0] if result.kvs else None), result.revision

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        """Write; the revision of the write."""
        answer = await self._post("/v3/kv/put", put_op(key, value, lease)["request_put"], "put")
        return _revision(answer)

    async def delete(self, key: bytes, *, prefix: bool = False) -> int:
        """Delete `key` (every key under it with prefix=True); the number deleted."""
        body: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _b64(prefix_end(key))
        answer = await self._post("/v3/kv/deleterange", body, f"delete {key!r}")
        return int(answer.get("deleted", 0))

    async def txn(
        self,
        compare: Sequence[dict[str, Any]],
        success: Sequence[dict[str, Any]],
        failure: Sequence[dict[str, Any]] = (),
    ) -> TxnResult:
        """All of `compare` hold: run `success`, else `failure`; atomically."""
        body = {"compare": list(compare), "success": list(success), "failure": list(failure)}
        answer = await self._post("/v3/kv/txn", body, "txn")
        return TxnResult(
            succeeded=bool(answer.get("succeeded", False)),
            revision=_revision(answer),
            responses=tuple(answer.get("responses") or ()),
        )

    async def compact(self, revision: int) -> None:
        """Discard the history before `revision` (what etcd's auto-compaction does)."""
        await self._post("/v3/kv/compaction", {"revision": str(revision)}, "compaction")

    # -- watch -------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def watch(
        self, key: bytes, start_revision: int = 0, *, prefix: bool = False
    ) -> AsyncIterator[AsyncIterator[WatchBatch]]:
        """Watch `key` from `start_revision` (0: from now on).

        Yields an async iterator of batches: first one with `created=True`, then one per
        change. It raises EtcdCompacted when `start_revision` was compacted (read the
        whole value again, then watch from that read's revision + 1), and
        EtcdUnavailable when the stream ends or breaks.
        """
        create: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            create["range_end"] = _b64(prefix_end(key))
        if start_revision:
            create["start_revision"] = str(start_revision)
        content = orjson.dumps({"create_request": create})
        headers = await self._headers(True)
        # No read timeout: silence is normal on a watch. The caller checks liveness.
        timeout = httpx.Timeout(self.timeout, read=None)
        stack = contextlib.AsyncExitStack()
        async with stack:

            async def open_stream(base: str) -> httpx.Response:
                request = self._http.build_request(
                    "POST", base + "/v3/watch", content=content, headers=headers, timeout=timeout
                )
                # The answer's head comes at once from a live etcd; a frozen one (or a
                # partition) would keep us waiting forever without this bound. Not
                # asyncio.wait_for: on 3.11 it can swallow a cancellation that arrives as
                # the answer does, and the watch would then never stop.
                try:
                    async with asyncio.timeout(self.timeout):
                        return await self._http.send(request, stream=True)
                except TimeoutError:
                    raise EtcdUnavailable(
                        f"etcd watch at {base}: no answer within {self.timeout:g} s"
                    ) from None

            response = await self._send(open_stream, "watch")
            stack.push_async_callback(response.aclose)
            if response.status_code != 200:
                await response.aread()
                try:
                    body = orjson.loads(response.content)
                except orjson.JSONDecodeError:
                    body = None
                raise _error(response.status_code, body, "watch")
            yield self._batches(response)

    async def _batches(self, response: httpx.Response) -> AsyncIterator[WatchBatch]:
        where = f"watch at {self.endpoint}"
        try:
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                try:
                    message = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise EtcdUnavailable(
                        f"etcd {where}: unreadable message {line[:80]!r}"
                    ) from exc
                if "error" in message:
                    raise _error(200, message["error"], "watch")
                result = message.get("result") or {}
                if result.get("canceled"):
                    compacted = int(result.get("compact_revision", 0))
                    if compacted:
                        raise EtcdCompacted(
                            f"etcd {where}: revisions before {compacted} were compacted", compacted
                        )
                    reason = str(result.get("cancel_reason") or "canceled by etcd")
                    if "user name" in reason or "permission denied" in reason or "auth" in reason:
                        self._token = None  # a login again may help the next watch
                        raise EtcdAuthError(f"etcd {where}: {reason}")
                    raise EtcdUnavailable(f"etcd {where}: {reason}")
                events = tuple(
                    WatchEvent(
                        "delete" if ev.get("type") == "DELETE" else "put", _kv(ev.get("kv") or {})
                    )
                    for ev in result.get("events") or ()
                )
                yield WatchBatch(_revision(result), events, created=bool(result.get("created")))
        except httpx.HTTPError as exc:
            raise EtcdUnavailable(f"etcd {where}: {_describe(exc)}") from exc
        raise EtcdUnavailable(f"etcd {where}: the stream ended")

    # -- leases -----------------------------------------------------------------------------

    async def lease_grant(self, ttl: int) -> Lease:
        answer = await self._post("/v3/lease/grant", {"TTL": str(ttl)}, "lease grant")
        return Lease(int(answer["ID"]), int(answer.get("TTL", 0)))

    async def lease_keepalive(self, lease_id: int) -> int:
        """Renew the lease once; its TTL now, 0 when it has expired (or never existed)."""
        answer = await self._post("/v3/lease/keepalive", {"ID": str(lease_id)}, "lease keepalive")
        return int((answer.get("result") or {}).get("TTL", 0))

    async def lease_revoke(self, lease_id: int) -> None:
        """End the lease now; the keys attached to it are deleted."""
        with contextlib.suppress(EtcdRequestError):  # already expired: nothing to revoke
            await self._post("/v3/lease/revoke", {"ID": str(lease_id)}, "lease revoke")

    # -- auth administration (tests, setup tools) ------------------------------------------

    async def enable_auth(self, root_password: str) -> None:
        """Create the root user and role and turn authentication on (a fresh cluster)."""
        await self._post("/v3/auth/role/add", {"name": "root"}, "role add")
        await self._post(
            "/v3/auth/user/add", {"name": "root", "password": root_password}, "user add"
        )
        await self._post("/v3/auth/user/grant", {"user": "root", "role": "root"}, "user grant")
        await self._post("/v3/auth/enable", {}, "auth enable")


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

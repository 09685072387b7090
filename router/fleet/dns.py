"""Endpoints that follow the pods: the addresses of `endpoints: {dns, port, interval}`
upstreams, found in DNS by the supervisor and put in force in every worker.

    EndpointDiscovery   in the supervisor: one task per DNS upstream, each looking its
                        name up (A and AAAA) every `interval`, beside the traffic and never
                        on its path; what it finds goes to `publish(upstream, endpoints)`,
                        which the supervisor turns into the effective state that every
                        worker applies (router/rules/effective.py)
    Resolver            one lookup of a name, both address families, its outcome named
                        as the metric's `result` (LOOKUP_RESULTS)

What a lookup means for an upstream's endpoints (one per address, on `port`):

    ok          the name's addresses, sorted; a name with neither A nor AAAA records has
                zero endpoints
    nxdomain    the name does not exist: zero endpoints (zero replicas: a Deployment
                scaled to nothing; never an error)
    timeout, servfail, error
                nothing was learnt: the endpoints found last stay in force

One resolver per router, in the supervisor: workers never look anything up, and they
all route with the same addresses.

The library is dnspython's asyncio resolver. It is pure Python and typed; it reads
/etc/resolv.conf with its search domains and ndots as libc applies them (short Kubernetes
names work as they do for any program in the pod), takes servers on any port, and raises
a distinct exception for NXDOMAIN, SERVFAIL and timeouts, which are the results counted
here; with no cache it asks the server every time. aiodns (pycares, c-ares) would bring a
C extension and c-ares' answer cache (on by default since c-ares 1.23, to be turned
off), for a speed that a few lookups every few seconds do not need.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from router.server import format_hostport

if TYPE_CHECKING:
    import dns.asyncresolver

    from router.rules.model import DnsEndpoints, Upstream

__all__ = [
    "LOOKUP_RESULTS",
    "LOOKUP_TIMEOUT",
    "EndpointDiscovery",
    "Lookup",
    "Resolver",
    "classify",
]

log = logging.getLogger("grayroute.dns")

LOOKUP_RESULTS = ("ok", "nxdomain", "timeout", "servfail", "error")
# A lookup (both families, every server and search domain) with no answer by then is a
# timeout; the next one starts on schedule.
LOOKUP_TIMEOUT = 2.0
RESOLV_CONF = "/etc/resolv.conf"

Endpoint = tuple[str, int]
Endpoints = tuple[Endpoint, ...]
Publish = Callable[[str, Endpoints | None], None]


@dataclass(frozen=True, slots=True)
class Lookup:
    """The outcome of looking a name up once."""

    result: str  # one of LOOKUP_RESULTS
    addresses: tuple[str, ...] | None  # None: nothing learnt (keep what is in force)
    detail: str = ""  # why it failed, for the log and /rules


def classify(exc: BaseException) -> str:
    """The `result` of a lookup that raised `exc` (any but `ok`)."""
    import dns.exception
    import dns.resolver

    if isinstance(exc, dns.resolver.NXDOMAIN):
        return "nxdomain"
    if isinstance(exc, dns.exception.Timeout):
        return "timeout"
    if isinstance(exc, dns.resolver.NoNameservers):
        # Each server's failure: (server, tcp, port, exception or rcode text, response).
        errors = exc.kwargs.get("errors") or []
        answers = [e[3] for e in errors if len(e) > 3]
        if any(a == "SERVFAIL" for a in answers):
            return "servfail"
        if answers and all(isinstance(a, dns.exception.Timeout) for a in answers):
            return "timeout"
    return "error"


def sort_addresses(addresses: Sequence[str]) -> tuple[str, ...]:
    """Unique, IPv4 before IPv6, in numeric order: the same list however DNS orders it,
    so a reordered answer changes nothing."""
    unique = {ipaddress.ip_address(a) for a in addresses}
    return tuple(str(ip) for ip in sorted(unique, key=lambda ip: (ip.version, ip.packed)))


class Resolver:
    """Looks names up with the given servers, or the system's (/etc/resolv.conf)."""

    def __init__(self, servers: Sequence[Endpoint] = (), resolv_conf: str = RESOLV_CONF) -> None:
        """Raises OSError (or dnspython's NoResolverConfiguration, a DNSException) when
        no servers are given and `resolv_conf` names none."""
        import dns.asyncresolver
        import dns.nameserver

        resolver: dns.asyncresolver.Resolver
        if servers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in servers]
            # Names are taken as written (made absolute): no search domains to apply.
            self._search = False
        else:
            resolver = dns.asyncresolver.Resolver(filename=resolv_conf)
            self._search = True  # as libc would: search domains and ndots from the file
        resolver.cache = None  # every lookup asks: the interval is the only schedule
        resolver.lifetime = LOOKUP_TIMEOUT
        self._resolver = resolver
        # HOST:PORT of each server, for /rules.
        self.servers = [
            format_hostport(ns, resolver.port)
            if isinstance(ns, str)
            else format_hostport(ns.address, ns.port)
            if isinstance(ns, dns.nameserver.AddressAndPortNameserver)
            else str(ns)
            for ns in resolver.nameservers
        ]

    async def lookup(self, name: str) -> Lookup:
        """A and AAAA of `name`, asked at the same time; never raises (but cancellation)."""
        answers = await asyncio.gather(
            self._addresses(name, "A"), self._addresses(name, "AAAA"), return_exceptions=True
        )
        found: list[str] = []
        failure: BaseException | None = None
        for answer in answers:
            if isinstance(answer, BaseException):
                if not isinstance(answer, Exception):
                    raise answer  # cancelled: not a lookup result
                result = classify(answer)
                if result == "nxdomain":  # the name does not exist, whatever the other says
                    return Lookup("nxdomain", (), str(answer))
                failure = failure or answer
            else:
                found += answer
        if failure is not None:
            return Lookup(classify(failure), None, str(failure) or type(failure).__name__)
        try:
            return Lookup("ok", sort_addresses(found))
        except ValueError as exc:  # not an address: a broken answer
            return Lookup("error", None, str(exc))

    async def _addresses(self, name: str, rdtype: str) -> list[str]:
        answer = await self._resolver.resolve(
            name, rdtype, search=self._search, raise_on_no_answer=False
        )
        return [rr.address for rr in answer.rrset] if answer.rrset is not None else []


@dataclass(eq=False)
class _Followed:
    """One DNS upstream being followed."""

    spec: DnsEndpoints
    task: asyncio.Task[None] | None = None
    looked_up: asyncio.Event = field(default_factory=asyncio.Event)  # after the first
    endpoints: Endpoints | None = None  # what was published last
    last: Lookup | None = None
    last_at: str = ""  # ISO 8601


class EndpointDiscovery:
    """Follows every DNS upstream of the rules in force (see the module docstring)."""

    def __init__(
        self,
        publish: Publish,
        counts: MutableMapping[tuple[str, str], int],
        servers: Sequence[Endpoint] = (),
        resolv_conf: str = RESOLV_CONF,
    ) -> None:
        self._publish = publish
        self._counts = counts  # (upstream, result) -> lookups; the metrics read it
        self._servers = tuple(servers)
        self._resolv_conf = resolv_conf
        self._resolver: Resolver | None = None
        self._followed: dict[str, _Followed] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def follow(self, upstreams: Mapping[str, Upstream]) -> None:
        """Follow the DNS upstreams among `upstreams` (the rules just put in force): new
        ones are looked up at once; one no longer from DNS (or gone) goes back to the
        file's endpoints; one whose name, port or interval changed starts over, its
        endpoints in force until its first lookup."""
        wanted = {name: spec.dns for name, spec in upstreams.items() if spec.dns is not None}
        for name in list(self._followed):
            if wanted.get(name) != self._followed[name].spec:
                followed = self._followed.pop(name)
                if followed.task is not None:
                    followed.task.cancel()
                if name not in wanted:
                    self._publish(name, None)
        for name, spec in wanted.items():
            if name not in self._followed:
                followed = _Followed(spec)
                self._followed[name] = followed
                for result in LOOKUP_RESULTS:
                    self._counts.setdefault((name, result), 0)
                followed.task = self._keep(self._run(name, followed))

    async def settle(self, timeout: float) -> list[str]:
        """Wait until every followed upstream had its first lookup, at most `timeout`
        seconds; the names of those that had none (they have no endpoints yet)."""
        waiting = [f.looked_up.wait() for f in self._followed.values()]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.gather(*waiting)
        return [name for name, f in self._followed.items() if not f.looked_up.is_set()]

    def describe(self) -> dict[str, Any]:
        """Per DNS upstream, for /rules: the name, the endpoints in use, the last lookup."""
        out: dict[str, Any] = {}
        for name, f in self._followed.items():
            out[name] = {
                "name": f.spec.name,
                "port": f.spec.port,
                "interval": f.spec.interval,
                "servers": self._resolver.servers if self._resolver is not None else [],
                "last_lookup": None
                if f.last is None
                else {"result": f.last.result, "at": f.last_at, "detail": f.last.detail},
            }
        return out

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._followed.clear()

    # -- inside ---------------------------------------------------------------------------

    def _keep(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run(self, name: str, followed: _Followed) -> None:
        loop = asyncio.get_running_loop()
        spec = followed.spec
        while True:
            started = loop.time()
            lookup = await self._lookup(spec.name)
            self._record(name, followed, lookup)
            followed.looked_up.set()
            # On its own schedule: `interval` from the start of one lookup to the next.
            await asyncio.sleep(max(0.0, spec.interval - (loop.time() - started)))

    async def _lookup(self, name: str) -> Lookup:
        if self._resolver is None:
            try:
                self._resolver = Resolver(self._servers, self._resolv_conf)
            except Exception as exc:  # no resolv.conf, or it names no server
                return Lookup("error", None, f"no DNS servers: {exc}; give --resolver HOST:PORT")
        try:
            return await self._resolver.lookup(name)
        except Exception as exc:  # a bug in a library, not an answer: keep what we have
            log.exception("looking up %s failed", name)
            return Lookup("error", None, repr(exc))

    def _record(self, name: str, followed: _Followed, lookup: Lookup) -> None:
        key = (name, lookup.result)
        self._counts[key] = self._counts.get(key, 0) + 1
        previous = followed.last
        followed.last = lookup
        followed.last_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        spec = followed.spec
        if lookup.addresses is None:
            # Said once per run of failures, not at every interval.
            if previous is None or previous.result != lookup.result:
                kept = len(followed.endpoints or ())
                log.warning(
                    "upstream %s: looking up %s failed (%s: %s); keeping its %d endpoint%s",
                    name, spec.name, lookup.result, lookup.detail, kept, "" if kept == 1 else "s",
                )  # fmt: skip
            return
        endpoints = tuple((address, spec.port) for address in lookup.addresses)
        if endpoints == followed.endpoints:
            return
        before = followed.endpoints
        followed.endpoints = endpoints
        if lookup.result == "nxdomain":
            log.warning("upstream %s: %s does not exist (NXDOMAIN): no endpoints", name, spec.name)
        else:
            shown = ", ".join(format_hostport(*ep) for ep in endpoints[:8])
            more = f" and {len(endpoints) - 8} more" if len(endpoints) > 8 else ""
            log.info(
                "upstream %s: %d endpoint%s from %s%s%s",
                name,
                len(endpoints),
                "" if len(endpoints) == 1 else "s",
                spec.name,
                f": {shown}{more}" if endpoints else "",
                "" if before is None else f" (was {len(before)})",
            )
        self._publish(name, endpoints)

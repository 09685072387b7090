"""Server settings: how the router listens, runs and times out.

Settings are stored as given (from the command line), then validated once by
`Settings.validate()`; a user error becomes one `ConfigError` line and exit 1.
Rule-file contents (upstreams, routes) are not settings: see `router.rules`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from router.errors import ConfigError
from router.history import (
    DEFAULT_AUDIT_MAX_BYTES,
    DEFAULT_HISTORY_MAX_AGE,
    DEFAULT_HISTORY_MAX_VERSIONS,
    HistoryBounds,
)


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    """'127.0.0.1:8080' -> ('127.0.0.1', 8080); '[::1]:80' -> ('::1', 80)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what}: {text!r} is not HOST:PORT (e.g. 127.0.0.1:8080)")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


# Seconds an endpoint whose connection failed is skipped (nginx's fail_timeout).
DEFAULT_FAIL_TIMEOUT = 10.0

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and "localhost"; any other name counts as reachable."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(slots=True)
class Settings:
    rules_path: str = "rules/demo.yaml"
    listen: str = "127.0.0.1:8080"
    # TLS listeners, and the (certificate, key) files they serve: tls_cert[i] with
    # tls_key[i]; the first pair is the default when SNI names no other (router.tls).
    listen_tls: list[str] = field(default_factory=list)
    tls_cert: list[str] = field(default_factory=list)
    tls_key: list[str] = field(default_factory=list)
    admin: str = "127.0.0.1:9090"
    workers: int = 1
    # Defaults for upstreams that do not set their own (seconds).
    connect_timeout: float = 2.0
    read_timeout: float = 30.0
    # An endpoint that refused a connection or timed out is skipped this long (seconds).
    fail_timeout: float = DEFAULT_FAIL_TIMEOUT
    # Idle keep-alive connections kept per upstream endpoint, per worker.
    upstream_keepalive: int = 64
    # Clients idle longer than this between requests are closed (seconds).
    keepalive_timeout: float = 75.0
    # Time to receive a whole request head (seconds); slow-header clients are cut off.
    header_timeout: float = 30.0
    # What one client may send; nginx's equivalents are compared in docs/operations.md.
    max_header_bytes: int = 32 * 1024  # request line and header section -> 431
    max_header_count: int = 100  # header fields -> 431
    max_target_bytes: int = 8 * 1024  # request target -> 414
    max_body_bytes: int = 1 << 30  # request body, 0 for no limit -> 413
    max_connections: int = 10_000  # client connections per worker; more are closed at once
    # WebSocket tunnels (router.tunnel): open at once per worker (more get 503), and the
    # seconds one may carry no byte either way before it is closed.
    max_tunnels: int = 10_000
    tunnel_idle_timeout: float = 300.0
    # Requests per client connection, and its age (seconds), after which the connection
    # closes following its next answer; 0 = no limit (nginx keepalive_requests/_time).
    keepalive_requests: int = 1000
    keepalive_time: float = 3600.0
    # An upstream's response header section -> 502 (nginx proxy_buffer_size, one page).
    max_response_header_bytes: int = 4096
    # Request body bytes held before the upstream is chosen, so that a slow uploader
    # holds no upstream connection for a small body; 0 = stream at once (nginx
    # proxy_request_buffering on/off).
    request_buffer_bytes: int = 64 * 1024
    # Routes match the normalised path (`..`, `.`, `//`, %XX of unreserved characters),
    # as nginx matches locations; the target is forwarded as received.
    normalize_paths: bool = True
    # Header fields whose name has `_` are dropped (nginx underscores_in_headers off).
    underscores_in_headers: bool = False
    # TRACE is answered 405 (as nginx does) unless allowed.
    allow_trace: bool = False
    # Workers freeze the objects of start-up out of the garbage collector and collect the
    # young generation less often (short stalls of every connection of a worker otherwise).
    gc_tuning: bool = True
    # Proxies whose X-Forwarded-For we believe when resolving the client address.
    trusted_proxies: list[str] = field(default_factory=list)
    # How long SIGTERM waits for requests in flight (seconds).
    drain_timeout: float = 10.0
    # Where the rules history (kept versions, audit log) lives; "" = the default next to
    # the rule file (router.history.resolve_state_dir).
    state_dir: str = ""
    # How much of that history is kept (0: no bound of that kind); router.history.
    audit_max_bytes: int = DEFAULT_AUDIT_MAX_BYTES
    history_max_age: float = DEFAULT_HISTORY_MAX_AGE  # seconds
    history_max_versions: int = DEFAULT_HISTORY_MAX_VERSIONS
    # JSON-lines access log shared by all workers; "" = off.
    access_log: str = ""
    # How often the rule file is checked for changes (seconds); 0 = only on SIGHUP.
    watch_interval: float = 0.25
    # Bearer token the admin address requires (all but /healthz and /readyz); required
    # when the admin address is not loopback.
    admin_token: str = ""
    # DNS servers (HOST:PORT) that find the endpoints of `endpoints: {dns: ...}`
    # upstreams; empty = the system's, from /etc/resolv.conf.
    resolvers: list[str] = field(default_factory=list)
    log_level: str = "info"
    # How often each worker sends its metric totals to the supervisor (seconds).
    metrics_interval: float = 0.5
    # Rules in etcd (rules_path etcd://...): TLS files and credentials for the cluster.
    etcd_cacert: str = ""
    etcd_cert: str = ""
    etcd_key: str = ""
    etcd_user: str = ""
    etcd_password: str = ""
    # A fleet's rollouts (rules in etcd): this router's id among the routers ("" = its
    # --listen address, router.fleet.default_router_id), and the TTL (seconds)
    # of the leader's lease: how long a dead leader goes unnoticed.
    router_id: str = ""
    leader_ttl: int = 5

    def validate(self) -> None:
        parse_hostport(self.listen, "--listen")
        for address in self.listen_tls:
            parse_hostport(address, "--listen-tls")
        if len(self.tls_cert) != len(self.tls_key):
            raise ConfigError(
                f"--tls-cert and --tls-key come in pairs: {len(self.tls_cert)} certificate(s), "
                f"{len(self.tls_key)} key(s)"
            )
        if self.listen_tls and not self.tls_cert:
            raise ConfigError("--listen-tls: give the certificate, --tls-cert FILE --tls-key FILE")
        if self.tls_cert and not self.listen_tls:
            raise ConfigError("--tls-cert: no --listen-tls HOST:PORT to serve it on")
        if self.rules_path.startswith("etcd://"):
            from router.fleet import EtcdLocation

            EtcdLocation.parse(self.rules_path)
        if self.etcd_key and not self.etcd_cert:
            raise ConfigError("--etcd-key: give the certificate too (--etcd-cert FILE)")
        if self.etcd_password and not self.etcd_user:
            raise ConfigError("an etcd password is set but no --etcd-user")
        if not 1 <= self.leader_ttl <= 5:
            raise ConfigError(f"--leader-ttl: {self.leader_ttl} must be 1 to 5 seconds")
        if self.router_id and (not self.router_id.isprintable() or " " in self.router_id):
            raise ConfigError(
                f"--router-id: {self.router_id!r}: give a name without spaces, e.g. the pod's"
            )
        parse_hostport(self.admin, "--admin")
        if self.workers < 1:
            raise ConfigError(f"--workers: {self.workers} must be at least 1")
        for name in (
            "connect_timeout",
            "read_timeout",
            "fail_timeout",
            "keepalive_timeout",
            "header_timeout",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be a positive number")
        admin_host, _ = parse_hostport(self.admin, "--admin")
        if not self.admin_token and not is_loopback(admin_host):
            raise ConfigError(
                f"--admin: {self.admin} is reachable from other machines; give --admin-token "
                "TOKEN, or use a loopback address such as 127.0.0.1"
            )
        if self.log_level.lower() not in LOG_LEVELS:
            raise ConfigError(
                f"--log-level: {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}"
            )
        if self.drain_timeout < 0:
            raise ConfigError("--drain-timeout: must be zero or a positive number")
        if self.watch_interval < 0:
            raise ConfigError("--watch-interval: must be 0 (off) or a positive number")
        if self.metrics_interval <= 0:
            raise ConfigError("metrics_interval: must be a positive number")
        for name in ("max_header_bytes", "max_header_count", "max_target_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: must be at least 1")
        if self.max_body_bytes < 0:
            raise ConfigError("--max-body-bytes: must be 0 (no limit) or a positive number")
        if self.max_connections < 1:
            raise ConfigError("--max-connections: must be at least 1")
        if self.max_tunnels < 0:
            raise ConfigError("--max-tunnels: must be 0 (no WebSocket) or a positive number")
        if self.tunnel_idle_timeout <= 0:
            raise ConfigError("--tunnel-idle-timeout: must be a positive number")
        for name in ("audit_max_bytes", "history_max_age", "history_max_versions"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be 0 (no bound) or more")
        for name in ("keepalive_requests", "request_buffer_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be 0 (off) or more")
        if self.keepalive_time < 0:
            raise ConfigError("--keepalive-time: must be 0 (no limit) or a positive number")
        if self.max_response_header_bytes < 1:
            raise ConfigError("--max-response-header-bytes: must be at least 1")
        for cidr in self.trusted_proxies:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ConfigError(f"--trusted-proxy: {cidr!r} is not an address or CIDR") from exc

        for resolver in self.resolvers:
            host, _ = parse_hostport(resolver, "--resolver")
            try:
                ipaddress.ip_address(host)
            except ValueError as exc:
                raise ConfigError(
                    f"--resolver: {resolver!r}: give the DNS server's IP address and port, "
                    "e.g. 10.96.0.10:53"
                ) from exc

    @property
    def resolver_addrs(self) -> list[tuple[str, int]]:
        return [parse_hostport(r, "--resolver") for r in self.resolvers]

    @property
    def history_bounds(self) -> HistoryBounds:
        return HistoryBounds(self.audit_max_bytes, self.history_max_age, self.history_max_versions)

    @property
    def listen_addr(self) -> tuple[str, int]:
        return parse_hostport(self.listen, "--listen")

    @property
    def tls_pairs(self) -> list[tuple[str, str]]:
        return list(zip(self.tls_cert, self.tls_key, strict=True))

    @property
    def admin_addr(self) -> tuple[str, int]:
        return parse_hostport(self.admin, "--admin")

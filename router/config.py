"""Server settings: how the router listens, runs and times out.

Settings are stored as given (from the command line), then validated once by
`Settings.validate()`; a user error becomes one `ConfigError` line and exit 1.
Rule-file contents (upstreams, routes) are not settings: see `router.rules`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from router.errors import ConfigError


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    """'127.0.0.1:8080' -> ('127.0.0.1', 8080); '[::1]:80' -> ('::1', 80)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what}: {text!r} is not HOST:PORT (e.g. 127.0.0.1:8080)")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


@dataclass(slots=True)
class Settings:
    rules_path: str = "rules/demo.yaml"
    listen: str = "127.0.0.1:8080"
    admin: str = "127.0.0.1:9090"
    workers: int = 1
    # Defaults for upstreams that do not set their own (seconds).
    connect_timeout: float = 2.0
    read_timeout: float = 30.0
    # Idle keep-alive connections kept per upstream endpoint, per worker.
    upstream_keepalive: int = 64
    # Clients idle longer than this between requests are closed (seconds).
    keepalive_timeout: float = 75.0
    # Time to receive a whole request head (seconds); slow-header clients are cut off.
    header_timeout: float = 30.0
    # Proxies whose X-Forwarded-For we believe when resolving the client address.
    trusted_proxies: list[str] = field(default_factory=list)
    # How long SIGTERM waits for requests in flight (seconds).
    drain_timeout: float = 10.0
    # Where reload history, worker metrics and other state live.
    state_dir: str = ""
    admin_token: str = ""
    log_level: str = "info"

    def validate(self) -> None:
        parse_hostport(self.listen, "--listen")
        parse_hostport(self.admin, "--admin")
        if self.workers < 1:
            raise ConfigError(f"--workers: {self.workers} must be at least 1")
        for name in ("connect_timeout", "read_timeout", "keepalive_timeout", "header_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be a positive number")
        for cidr in self.trusted_proxies:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ConfigError(f"--trusted-proxy: {cidr!r} is not an address or CIDR") from exc

    @property
    def listen_addr(self) -> tuple[str, int]:
        return parse_hostport(self.listen, "--listen")

    @property
    def admin_addr(self) -> tuple[str, int]:
        return parse_hostport(self.admin, "--admin")

"""The fleet: what several routers share, and what they find out about the pods.

    dns.py        endpoints from DNS: `endpoints: {dns, port, interval}` upstreams looked
                  up by the supervisor and put in force in every worker
    etcd.py       a small etcd v3 client over etcd's JSON gateway (httpx): range, put,
                  txn, watch, leases, user/password auth, TLS
    source.py     where the rules come from (a file, a ConfigMap, an etcd key): one
                  interface the supervisor uses, the etcd watch, the state-dir cache
    revisions.py  `grayroute push`, and `history`/`rollback` on an etcd key
    lease.py      a leader among the routers (KEY/leader), values that live as long as
                  their router (KEY/counts/ROUTER)
    counts.py     the rollout counts of the fleet: each router publishes its own, the
                  leader sums them (a router.rollout.stats CountSource)
    rollouts.py   a fleet's rollouts: the leader judges and writes each rollout's state
                  at KEY/rollouts/ROUTE; every router puts it in force

This module itself is only the spelling of an etcd rules location and of a router's id,
cheap to import (the workers use it to know that their rules come from the supervisor's
copies).
"""

from __future__ import annotations

import hashlib
import re
import socket
from dataclasses import dataclass

from router.errors import ConfigError

ETCD_SCHEME = "etcd://"


def default_router_id(host: str, port: int) -> str:
    """A router's id in a fleet: its --listen address with the port in use. A wildcard
    address (0.0.0.0, ::) is the same on every router, so the host's name stands for it
    (in Kubernetes, the pod's name)."""
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_etcd_url(text: str) -> bool:
    """True for `etcd://HOST:PORT[,HOST:PORT...]/KEY` (the rules live in etcd)."""
    return text.startswith(ETCD_SCHEME)


@dataclass(frozen=True, slots=True)
class EtcdLocation:
    """Where rules live in etcd: the cluster's client endpoints and one key.

    `etcd://10.0.0.1:2379,10.0.0.2:2379/grayroute/rules` is endpoints ("10.0.0.1:2379",
    "10.0.0.2:2379") and key "/grayroute/rules": the key is the URL's path, its leading
    slash included (as `etcdctl get /grayroute/rules` names it).
    """

    endpoints: tuple[str, ...]
    key: str

    @classmethod
    def parse(cls, text: str) -> EtcdLocation:
        """Raises ConfigError with an example when `text` is not such a URL."""
        example = "e.g. etcd://127.0.0.1:2379/grayroute/rules"
        if not is_etcd_url(text):
            raise ConfigError(f"{text!r} is not an etcd URL ({example})")
        hosts, slash, key = text[len(ETCD_SCHEME) :].partition("/")
        if not slash or not key.strip("/"):
            raise ConfigError(f"{text}: no key after the endpoints ({example})")
        endpoints = tuple(h.strip() for h in hosts.split(",") if h.strip())
        if not endpoints:
            raise ConfigError(f"{text}: no HOST:PORT before the key ({example})")
        for endpoint in endpoints:
            host, sep, port = endpoint.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
                raise ConfigError(f"{text}: {endpoint!r} is not HOST:PORT ({example})")
        return cls(endpoints, "/" + key)

    @property
    def url(self) -> str:
        return f"{ETCD_SCHEME}{','.join(self.endpoints)}{self.key}"

    @property
    def key_bytes(self) -> bytes:
        return self.key.encode("utf-8")

    def state_dir_name(self) -> str:
        """A directory name for this key's state (the cached rules), the same whichever
        endpoints are given: `etcd-rules-HASH8` for /grayroute/rules."""
        tag = hashlib.sha256(self.key_bytes).hexdigest()[:8]
        last = re.sub(r"[^A-Za-z0-9._-]", "_", self.key.rstrip("/").rpartition("/")[2])
        return f"etcd-{last or 'key'}-{tag}"

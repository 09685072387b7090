"""Server settings: stored as given, validated once, one clear line per mistake."""

from __future__ import annotations

import pytest

from router.config import Settings
from router.errors import ConfigError


def test_resolvers_are_addresses_with_ports() -> None:
    settings = Settings(resolvers=["10.96.0.10:53", "[fd00::10]:5353"])
    settings.validate()
    assert settings.resolver_addrs == [("10.96.0.10", 53), ("fd00::10", 5353)]
    assert Settings().resolver_addrs == []  # the system's, from /etc/resolv.conf


@pytest.mark.parametrize(
    ("resolver", "message"),
    [
        ("10.96.0.10", "--resolver: '10.96.0.10' is not HOST:PORT"),
        ("kube-dns:53", "--resolver: 'kube-dns:53': give the DNS server's IP address and port"),
        ("10.96.0.10:99999", "--resolver: '10.96.0.10:99999' is not HOST:PORT"),
    ],
)
def test_bad_resolvers(resolver: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        Settings(resolvers=[resolver]).validate()

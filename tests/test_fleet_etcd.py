"""The etcd v3 JSON-gateway client against a real etcd (Debian's etcd-server) on loopback."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from lua_compat.nginx_check import free_ports
from router.config import Settings
from router.fleet import EtcdLocation
from router.fleet.etcd import (
    EtcdAuthError,
    EtcdClient,
    EtcdCompacted,
    EtcdUnavailable,
    TLSConfig,
    mod_revision_is,
    prefix_end,
    put_op,
    range_op,
)
from router.fleet.source import etcd_client

from conftest import EtcdServer, LocalCA


def test_prefix_end() -> None:
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"


async def test_put_range_and_binary_values(etcd: EtcdServer, etcd_key: str) -> None:
    key = etcd_key.encode()
    value = bytes(range(256)) + "é\n".encode()  # every byte survives base64 both ways
    async with EtcdClient([etcd.endpoint]) as client:
        absent, read_at = await client.get(key)
        assert absent is None and read_at > 0
        revision = await client.put(key, value)
        kv, _ = await client.get(key)
        assert kv is not None
        assert (kv.value, kv.mod_revision, kv.create_revision, kv.version) == (
            value, revision, revision, 1,
        )  # fmt: skip
        second = await client.put(key, b"two")
        old, _ = await client.get(key, revision=second - 1)
        assert old is not None and old.value == value  # a read at an older revision
        await client.put(key + b"/x", b"1")
        listing = await client.range(key, prefix=True, keys_only=True)
        assert [kv.key for kv in listing.kvs] == [key, key + b"/x"]
        assert all(kv.value == b"" for kv in listing.kvs)
        assert await client.delete(key, prefix=True) == 2


async def test_txn_compare_and_swap_on_mod_revision(etcd: EtcdServer, etcd_key: str) -> None:
    key = etcd_key.encode()
    async with EtcdClient([etcd.endpoint]) as client:
        # mod_revision 0: the key must not exist yet.
        created = await client.txn([mod_revision_is(key, 0)], [put_op(key, b"a")], [range_op(key)])
        assert created.succeeded
        again = await client.txn([mod_revision_is(key, 0)], [put_op(key, b"b")], [range_op(key)])
        assert not again.succeeded
        (current,) = again.range_kvs(0)
        assert (current.value, current.mod_revision) == (b"a", created.revision)
        swapped = await client.txn(
            [mod_revision_is(key, created.revision)], [put_op(key, b"b")], [range_op(key)]
        )
        assert swapped.succeeded and swapped.revision > created.revision
        kv, _ = await client.get(key)
        assert kv is not None and kv.value == b"b"


async def test_watch_from_a_revision_and_after_compaction(etcd: EtcdServer, etcd_key: str) -> None:
    key = etcd_key.encode()
    async with EtcdClient([etcd.endpoint]) as client:
        first = await client.put(key, b"1")
        second = await client.put(key, b"2")
        async with client.watch(key, first) as batches:
            seen: list[tuple[str, bytes, int]] = []
            created = False
            async for batch in batches:
                created = created or batch.created
                seen += [(e.type, e.kv.value, e.kv.mod_revision) for e in batch.events]
                if len(seen) == 2:
                    await client.delete(key)
                if len(seen) == 3:
                    break
        assert created
        assert seen[:2] == [("put", b"1", first), ("put", b"2", second)]
        assert seen[2][0] == "delete"

        third = await client.put(key, b"3")
        await client.compact(third)
        with pytest.raises(EtcdCompacted) as info:
            async with client.watch(key, first) as batches:
                async for _ in batches:
                    pass
        assert info.value.compact_revision == third
        with pytest.raises(EtcdCompacted):
            await client.get(key, revision=first)


async def test_leases(etcd: EtcdServer, etcd_key: str) -> None:
    key = etcd_key.encode()
    async with EtcdClient([etcd.endpoint]) as client:
        lease = await client.lease_grant(5)
        assert lease.ttl == 5
        await client.put(key, b"alive", lease=lease.id)
        assert await client.lease_keepalive(lease.id) == 5
        kv, _ = await client.get(key)
        assert kv is not None and kv.lease == lease.id
        await client.lease_revoke(lease.id)
        kv, _ = await client.get(key)
        assert kv is None  # the key went with its lease
        assert await client.lease_keepalive(lease.id) == 0
        await client.lease_revoke(lease.id)  # already gone: nothing to do


async def test_endpoints_are_tried_in_turn(etcd: EtcdServer, etcd_key: str) -> None:
    (dead,) = free_ports(1)
    async with EtcdClient([f"127.0.0.1:{dead}", etcd.endpoint], timeout=1.0) as client:
        await client.put(etcd_key.encode(), b"x")
        assert client.endpoint == etcd.endpoint
    async with EtcdClient([f"127.0.0.1:{dead}"], timeout=1.0) as client:
        with pytest.raises(EtcdUnavailable, match="no endpoint reachable"):
            await client.get(etcd_key.encode())


async def test_watch_ends_when_etcd_dies(own_etcd: EtcdServer) -> None:
    async with EtcdClient([own_etcd.endpoint]) as client:
        with pytest.raises(EtcdUnavailable):
            async with client.watch(b"/k") as batches:
                async for batch in batches:
                    if batch.created:
                        own_etcd.kill()


async def test_a_watch_on_a_frozen_etcd_gives_up(own_etcd: EtcdServer) -> None:
    assert own_etcd.proc is not None
    os.kill(own_etcd.proc.pid, signal.SIGSTOP)  # it accepts connections, answers nothing
    try:
        async with EtcdClient([own_etcd.endpoint], timeout=0.5) as client:
            with pytest.raises(EtcdUnavailable, match=r"no answer within 0\.5 s"):
                async with client.watch(b"/k"):
                    pass
    finally:
        os.kill(own_etcd.proc.pid, signal.SIGCONT)


async def test_user_and_password(own_etcd: EtcdServer) -> None:
    async with EtcdClient([own_etcd.endpoint]) as admin:
        await admin.enable_auth("s3cret")
    async with EtcdClient([own_etcd.endpoint]) as anonymous:
        with pytest.raises(EtcdAuthError):
            await anonymous.put(b"/k", b"v")
    async with EtcdClient([own_etcd.endpoint], username="root", password="wrong") as wrong:
        with pytest.raises(EtcdAuthError, match="authentication failed"):
            await wrong.get(b"/k")
    async with EtcdClient([own_etcd.endpoint], username="root", password="s3cret") as root:
        revision = await root.put(b"/k", b"v")
        async with root.watch(b"/k", revision) as batches:
            async for batch in batches:
                if batch.events:
                    assert batch.events[0].kv.value == b"v"
                    break
        root._token = "expired"  # a token etcd no longer knows: one fresh login, then on
        kv, _ = await root.get(b"/k")
        assert kv is not None and kv.value == b"v"


async def test_tls(tls_ca: LocalCA, tmp_path: Path) -> None:
    cert, key = tls_ca.issue("127.0.0.1", "localhost")
    server = EtcdServer(tmp_path / "etcd-tls", tls=(cert, key, str(tls_ca.cafile)))
    server.start()
    try:
        # As `grayroute serve --etcd-cacert FILE` builds it.
        settings = Settings(etcd_cacert=str(tls_ca.cafile))
        async with etcd_client(EtcdLocation((server.endpoint,), "/k"), settings) as ok:
            revision = await ok.put(b"/k", b"over TLS")
            kv, _ = await ok.get(b"/k")
            assert kv is not None and (kv.value, kv.mod_revision) == (b"over TLS", revision)
        # A CA that did not sign etcd's certificate: refused, never sent in the clear.
        other = LocalCA(tmp_path / "other-ca")
        async with EtcdClient(
            [server.endpoint], tls=TLSConfig(cacert=str(other.cafile)), timeout=2.0
        ) as untrusting:
            with pytest.raises(EtcdUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
                await untrusting.get(b"/k")
        async with EtcdClient([server.endpoint], timeout=2.0) as plain:
            with pytest.raises(EtcdUnavailable):
                await plain.get(b"/k")
    finally:
        server.stop()

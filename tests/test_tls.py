"""TLS termination (router/tls.py): certificate loading and SNI as pure functions, then
handshakes through the real router with Python's ssl, httpx and curl as clients, then
`grayroute serve` with certificates rotated on disk as cert-manager rotates a Secret.

Certificates come from a throw-away CA made by trustme in each test (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from router.config import Settings
from router.demo import DemoUpstream, RouterStartError
from router.errors import ConfigError
from router.tls import (
    ALPN_PROTOCOLS,
    CertificateSet,
    failure_reason,
    load_certificate,
)

from conftest import LocalCA, RunningProxy, Serve, poll, scrape, until

RULES = """
format: 1
upstreams:
  v1: {{endpoints: ["{v1}"]}}
  v2: {{endpoints: ["{v2}"]}}
user_id:
  - header: X-User-Id
routes:
  - name: all
    pins:
      - to: v2
        users: ["42"]
    to: v1
"""


def der_of(cert_file: str) -> bytes:
    """The leaf certificate of a PEM chain file, as the DER a client sees."""
    pem = Path(cert_file).read_text()
    end = pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")
    return ssl.PEM_cert_to_DER_cert(pem[:end])


async def handshake(
    port: int, server_name: str | None, ctx: ssl.SSLContext
) -> tuple[bytes, str, str | None]:
    """Connect, and say which certificate (DER), TLS version and ALPN protocol we got.

    The router counts a handshake when it reads the client's last message, which may
    be after the client is done: tests wait for counters with `until`."""
    _, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname=server_name
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
        return der, ssl_object.version(), ssl_object.selected_alpn_protocol()
    finally:
        writer.close()


async def curl(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "10", *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


requires_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


# -- certificates and SNI, no sockets ------------------------------------------------------
def test_sni_chooses_by_name_wildcard_then_default(tls_ca: LocalCA) -> None:
    api = load_certificate(*tls_ca.issue("api.example.com", "api2.example.com"))
    wild = load_certificate(*tls_ca.issue("*.example.com"))
    other = load_certificate(*tls_ca.issue("api.example.com", "other.test"))
    certs = CertificateSet([api, wild, other], digest="d")
    assert api.names == ("api.example.com", "api2.example.com")
    assert api.label == "api.example.com" and wild.label == "*.example.com"
    assert certs.select("api.example.com") is api
    assert certs.select("API2.Example.COM.") is api  # names are case-insensitive; FQDN dot
    assert certs.select("www.example.com") is wild
    # A wildcard covers one label only (RFC 6125 6.4.3), not the apex or two labels.
    assert certs.select("a.b.example.com") is api
    assert certs.select("example.com") is api
    assert certs.select("other.test") is other
    assert certs.select(None) is api and certs.select("") is api  # no SNI: the first pair
    assert certs.select("unknown.test") is api
    assert certs.label_of(wild.context) == "*.example.com"


def test_a_certificate_without_san_is_chosen_by_its_common_name(tls_ca: LocalCA) -> None:
    leaf = tls_ca.ca.issue_cert(common_name="legacy.test")
    cert = tls_ca.dir / "legacy.pem"
    key = tls_ca.dir / "legacy.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    loaded = load_certificate(str(cert), str(key))
    assert loaded.names == ("legacy.test",)
    assert loaded.not_after > time.time()


def test_bad_certificate_files_are_one_clear_line(tls_ca: LocalCA, tmp_path: Path) -> None:
    cert, key = tls_ca.issue("a.test")
    _, other_key = tls_ca.issue("b.test")
    with pytest.raises(ConfigError, match=r"--tls-cert .*nope\.pem: cannot read it"):
        load_certificate(str(tmp_path / "nope.pem"), key)
    with pytest.raises(ConfigError, match=r"--tls-cert .*key1\.pem: not a PEM certificate"):
        load_certificate(key, key)
    with pytest.raises(ConfigError, match=r"--tls-key .*key2\.pem: does not match --tls-cert"):
        load_certificate(cert, other_key)
    with pytest.raises(ConfigError, match=r"--tls-key .*: not a PEM private key"):
        load_certificate(cert, cert)
    with pytest.raises(ConfigError, match=r"--tls-key .*missing\.key: cannot read it"):
        load_certificate(cert, str(tmp_path / "missing.key"))


def test_an_encrypted_key_is_refused_without_prompting(tls_ca: LocalCA) -> None:
    from cryptography.hazmat.primitives import serialization

    cert, key = tls_ca.issue("a.test")
    private = serialization.load_pem_private_key(Path(key).read_bytes(), password=None)
    Path(key).write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ConfigError, match="the key is encrypted"):
        load_certificate(cert, key)


def test_settings_need_certificates_and_listeners_in_pairs() -> None:
    with pytest.raises(ConfigError, match="come in pairs: 2 certificate"):
        Settings(listen_tls=["127.0.0.1:0"], tls_cert=["a", "b"], tls_key=["k"]).validate()
    with pytest.raises(ConfigError, match="--listen-tls: give the certificate"):
        Settings(listen_tls=["127.0.0.1:0"]).validate()
    with pytest.raises(ConfigError, match="no --listen-tls"):
        Settings(tls_cert=["a"], tls_key=["k"]).validate()
    with pytest.raises(ConfigError, match="--listen-tls: 'nope' is not HOST:PORT"):
        Settings(listen_tls=["nope"], tls_cert=["a"], tls_key=["k"]).validate()
    Settings(listen_tls=["127.0.0.1:0"], tls_cert=["a"], tls_key=["k"]).validate()


def test_failure_reasons() -> None:
    def err(reason: str) -> ssl.SSLError:
        exc = ssl.SSLError(1, reason)
        exc.reason = reason  # type: ignore[misc]
        return exc

    assert failure_reason(err("UNSUPPORTED_PROTOCOL")) == "version"
    assert failure_reason(err("NO_SHARED_CIPHER")) == "cipher"
    assert failure_reason(err("HTTP_REQUEST")) == "plain_http"
    assert failure_reason(err("TLSV1_ALERT_UNKNOWN_CA")) == "certificate_rejected"
    assert failure_reason(err("WRONG_VERSION_NUMBER")) == "malformed"
    assert failure_reason(err("SOMETHING_NEW")) == "other"
    assert failure_reason(ssl.SSLEOFError()) == "incomplete"


# -- through the router in this process ----------------------------------------------------
@pytest.fixture
async def tls_setup(
    backends: Any, proxy: Any, tls_ca: LocalCA
) -> tuple[RunningProxy, list[Any], dict[str, tuple[str, str]]]:
    v1, v2 = await backends("v1", "v2")
    pairs = {
        "a": tls_ca.issue("a.test"),
        "b": tls_ca.issue("b.test", "*.b.test"),
    }
    rp = await proxy(RULES.format(v1=v1.endpoint, v2=v2.endpoint), tls=list(pairs.values()))
    return rp, [v1, v2], pairs


async def test_sni_picks_the_certificate_python_client(
    tls_setup: tuple[RunningProxy, list[Any], dict[str, tuple[str, str]]], tls_ca: LocalCA
) -> None:
    rp, _, pairs = tls_setup
    ctx = tls_ca.client_context()  # verifies the chain and the name: a wrong pick fails
    assert (await handshake(rp.tls_port, "a.test", ctx))[0] == der_of(pairs["a"][0])
    assert (await handshake(rp.tls_port, "b.test", ctx))[0] == der_of(pairs["b"][0])
    assert (await handshake(rp.tls_port, "x.b.test", ctx))[0] == der_of(pairs["b"][0])
    loose = tls_ca.client_context()
    loose.check_hostname = False
    der, version, alpn = await handshake(rp.tls_port, None, loose)  # no SNI: the default
    assert der == der_of(pairs["a"][0]) and version == "TLSv1.3" and alpn is None
    expected = {("a.test", "TLSv1.3"): 2, ("b.test", "TLSv1.3"): 2}
    await until(lambda: rp.metrics.handshakes == expected)


async def test_alpn_offers_http11_only_and_tls12_works(
    tls_setup: tuple[RunningProxy, list[Any], dict[str, tuple[str, str]]], tls_ca: LocalCA
) -> None:
    rp, _, _ = tls_setup
    ctx = tls_ca.client_context()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    _, version, alpn = await handshake(rp.tls_port, "a.test", ctx)
    assert (version, alpn) == ("TLSv1.2", "http/1.1")
    assert ALPN_PROTOCOLS == ("http/1.1",)
    # A TLS 1.2 client offering only ciphers outside the modern list is refused.
    weak = tls_ca.client_context()
    weak.maximum_version = ssl.TLSVersion.TLSv1_2
    weak.set_ciphers("AES128-SHA256:AES256-SHA")  # RSA key exchange: no forward secrecy
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await handshake(rp.tls_port, "a.test", weak)
    await until(lambda: rp.metrics.handshake_failures["cipher"] == 1)


async def test_requests_over_tls_are_forwarded_as_https(
    tls_setup: tuple[RunningProxy, list[Any], dict[str, tuple[str, str]]], tls_ca: LocalCA
) -> None:
    rp, (v1, v2), _ = tls_setup
    transport = httpx.AsyncHTTPTransport(verify=tls_ca.client_context())
    async with httpx.AsyncClient(transport=transport, timeout=10.0) as client:
        # httpx resolves a.test itself: connect to 127.0.0.1 and send SNI a.test instead.
        client.headers["Host"] = f"a.test:{rp.tls_port}"
        for user, expected in (("1", "v1"), ("42", "v2"), ("1", "v1")):
            resp = await client.get(
                f"https://127.0.0.1:{rp.tls_port}/x",
                headers={"X-User-Id": user},
                extensions={"sni_hostname": "a.test"},
            )
            assert resp.status_code == 200, resp.text
            assert resp.json()["version"] == expected
    seen = v1.seen + v2.seen
    assert len(seen) == 3
    for info in seen:
        headers = {k.lower(): v for k, v in info["headers"]}
        assert headers["x-forwarded-proto"] == "https"
        assert headers["host"] == f"a.test:{rp.tls_port}"
    # one TLS connection carried all three requests (keep-alive)
    assert sum(rp.metrics.handshakes.values()) == 1
    # the plain listener still says http
    async with httpx.AsyncClient(timeout=10.0) as client:
        resp = await client.get(f"{rp.url}/x")
    headers = {k.lower(): v for k, v in resp.json()["headers"]}
    assert headers["x-forwarded-proto"] == "http"


@requires_curl
async def test_sni_and_alpn_with_curl(
    tls_setup: tuple[RunningProxy, list[Any], dict[str, tuple[str, str]]], tls_ca: LocalCA
) -> None:
    rp, _, _ = tls_setup
    port = rp.tls_port
    for name in ("a.test", "b.test", "deep.b.test"):
        rc, out, err = await curl(
            "--cacert", str(tls_ca.cafile),
            "--resolve", f"{name}:{port}:127.0.0.1",
            "--http2",  # offered; ALPN answers http/1.1
            "-H", "X-User-Id: 42",
            "-w", "\n%{http_version}",
            f"https://{name}:{port}/hello",
        )  # fmt: skip
        assert rc == 0, err  # curl checked the certificate against the name
        body, _, http_version = out.rpartition("\n")
        assert http_version == "1.1"
        assert orjson.loads(body)["version"] == "v2"
    # A name no certificate has gets the default (a.test), which curl finds wrong for
    # the name once the handshake is done.
    rc, _, err = await curl(
        "--cacert", str(tls_ca.cafile),
        "--resolve", f"c.test:{port}:127.0.0.1",
        f"https://c.test:{port}/",
    )  # fmt: skip
    assert rc == 60 and "c.test" in err, err
    expected = {("a.test", "TLSv1.3"): 2, ("b.test", "TLSv1.3"): 2}
    await until(lambda: rp.metrics.handshakes == expected)
    # A client that does not trust our CA says so during the handshake.
    rc, _, err = await curl("--resolve", f"a.test:{port}:127.0.0.1", f"https://a.test:{port}/")
    assert rc == 60, err
    await until(lambda: rp.metrics.handshake_failures["certificate_rejected"] == 1)


async def test_old_tls_versions_are_refused_python_client(
    tls_setup: tuple[RunningProxy, list[Any], dict[str, tuple[str, str]]], tls_ca: LocalCA
) -> None:
    rp, _, _ = tls_setup
    for old in ("TLSv1", "TLSv1_1"):
        ctx = tls_ca.client_context()
        # Python and OpenSSL 3 refuse to offer these unless told to, with a warning.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            version = getattr(ssl.TLSVersion, old)
            ctx.minimum_version = version
            ctx.maximum_version = version
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await handshake(rp.tls_port, "a.test", ctx)
    # The router saw both offers and refused them for their version (so the clients
    # really offered TLS 1.0 and 1.1: this is no client that gave up on its own).
    await until(lambda: rp.metrics.handshake_failures["version"] == 2)
    assert not rp.metrics.handshakes


@requires_curl
async def test_old_tls_versions_are_refused_curl(
    tls_setup: tuple[RunningProxy, list[Any], dict[str, tuple[str, str]]], tls_ca: LocalCA
) -> None:
    rp, _, _ = tls_setup
    for version in ("1.0", "1.1"):
        rc, _, err = await curl(
            "--cacert", str(tls_ca.cafile),
            "--resolve", f"a.test:{rp.tls_port}:127.0.0.1",
            f"--tlsv{version}", "--tls-max", version,
            "--ciphers", "DEFAULT:@SECLEVEL=0",
            f"https://a.test:{rp.tls_port}/",
        )  # fmt: skip
        assert rc == 35, err  # SSL connect error
    await until(lambda: rp.metrics.handshake_failures["version"] == 2)
    rc, _, err = await curl(
        "--cacert", str(tls_ca.cafile),
        "--resolve", f"a.test:{rp.tls_port}:127.0.0.1",
        "--tlsv1.2", "--tls-max", "1.2",
        f"https://a.test:{rp.tls_port}/",
    )  # fmt: skip
    assert rc == 0, err
    await until(lambda: rp.metrics.handshakes == {("a.test", "TLSv1.2"): 1})


async def test_plain_http_and_unfinished_handshakes_are_counted(
    tls_setup: tuple[RunningProxy, list[Any], dict[str, tuple[str, str]]],
) -> None:
    rp, (v1, v2), _ = tls_setup
    reader, writer = await asyncio.open_connection("127.0.0.1", rp.tls_port)
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing proxied
    writer.close()
    await until(lambda: rp.metrics.handshake_failures["plain_http"] == 1)
    # A client that connects and says nothing, and one that closes at once.
    _, silent = await asyncio.open_connection("127.0.0.1", rp.tls_port)
    _, gone = await asyncio.open_connection("127.0.0.1", rp.tls_port)
    gone.close()
    assert rp.tls is not None
    await until(lambda: len(rp.tls._started) == 2)
    assert rp.tls.sweep(time.monotonic()) == 0  # they may still finish
    # handshake_timeout (header_timeout, 30 s) + 1 s later, neither can finish any more
    assert rp.tls.sweep(time.monotonic() + rp.tls.handshake_timeout + 1.5) == 2
    assert rp.metrics.handshake_failures["incomplete"] == 2
    silent.close()
    assert not v1.seen and not v2.seen


async def test_reload_serves_new_certificates_and_keeps_open_connections(
    tls_setup: tuple[RunningProxy, list[Any], dict[str, tuple[str, str]]], tls_ca: LocalCA
) -> None:
    rp, _, pairs = tls_setup
    assert rp.tls is not None
    ctx = tls_ca.client_context()
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", rp.tls_port, ssl=ctx, server_hostname="a.test"
    )
    old_der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    assert old_der == der_of(pairs["a"][0])
    # The same names, a new certificate and key, written over the old files.
    cert, key = tls_ca.issue("a.test")
    shutil.copyfile(cert, pairs["a"][0])
    shutil.copyfile(key, pairs["a"][1])
    assert await rp.tls.reload()
    assert (await handshake(rp.tls_port, "a.test", ctx))[0] == der_of(cert) != old_der
    # The connection opened before the reload goes on, on its certificate.
    writer.write(b"GET /still HTTP/1.1\r\nHost: a.test\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200 ")
    writer.close()
    # A broken pair (a key of another certificate) is refused; the pairs in force stay.
    _, wrong_key = tls_ca.issue("a.test")
    shutil.copyfile(wrong_key, pairs["a"][1])
    assert not await rp.tls.reload()
    assert (await handshake(rp.tls_port, "a.test", ctx))[0] == der_of(cert)


# -- `grayroute serve` ---------------------------------------------------------------------
def secret_dir(root: Path, tls_ca: LocalCA, stamp: str, names: tuple[str, ...]) -> Path:
    """A Kubernetes Secret volume as kubelet writes it: tls.crt -> ..data/tls.crt, with
    ..data a symlink to a timestamped directory that is swapped on every update."""
    target = root / f"..{stamp}"
    cert, key = tls_ca.issue(*names, directory=target)
    os.rename(cert, target / "tls.crt")
    os.rename(key, target / "tls.key")
    link = root / "..data_tmp"
    link.symlink_to(target.name)
    os.rename(link, root / "..data")  # atomic swap, as kubelet does
    for name in ("tls.crt", "tls.key"):
        if not (root / name).is_symlink():
            (root / name).symlink_to(f"..data/{name}")
    return target


async def peer_der(port: int, ctx: ssl.SSLContext, name: str = "a.test") -> bytes:
    return (await handshake(port, name, ctx))[0]


async def test_serve_rotates_a_secret_without_dropping_connections(
    tmp_path: Path, tls_ca: LocalCA, upstreams: dict[str, DemoUpstream], serve_router: Serve
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.format(v1=upstreams["v1"].endpoint, v2=upstreams["v2"].endpoint))
    secret = tmp_path / "secret"
    secret.mkdir()
    first = secret_dir(secret, tls_ca, "2026_01_01", ("a.test",))
    router = await serve_router(
        rules,
        workers=2,
        args=(
            "--listen-tls", "127.0.0.1:0",
            "--tls-cert", str(secret / "tls.crt"),
            "--tls-key", str(secret / "tls.key"),
        ),
    )  # fmt: skip
    (tls_url,) = router.tls_urls
    port = int(tls_url.rsplit(":", 1)[1])
    ctx = tls_ca.client_context()
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="a.test"
    )
    assert writer.get_extra_info("ssl_object").getpeercert(binary_form=True) == der_of(
        str(first / "tls.crt")
    )

    async def request_on_open_connection(path: str) -> dict[str, Any]:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: a.test\r\nX-User-Id: 42\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 "), head
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        body: dict[str, Any] = orjson.loads(await reader.readexactly(length))
        return body

    before = await request_on_open_connection("/before")
    assert before["version"] == "v2"
    headers = {k.lower(): v for k, v in before["headers"].items()}
    assert headers["x-forwarded-proto"] == "https"

    second = secret_dir(secret, tls_ca, "2026_02_01", ("a.test",))
    new_der = der_of(str(second / "tls.crt"))

    async def rotated() -> bool:
        # new connections land on either worker: ten in a row must get the new one
        return all([await peer_der(port, ctx) == new_der for _ in range(10)])

    await poll(rotated)
    assert (await request_on_open_connection("/after"))["version"] == "v2"  # not dropped

    # A rotation to a broken pair (the key of another certificate) changes nothing.
    broken = secret / "..2026_03_01"
    broken.mkdir()
    shutil.copyfile(second / "tls.crt", broken / "tls.crt")
    _, other_key = tls_ca.issue("a.test", directory=broken)
    shutil.copyfile(other_key, broken / "tls.key")
    (secret / "..data_tmp").symlink_to(broken.name)
    os.rename(secret / "..data_tmp", secret / "..data")
    async with httpx.AsyncClient(timeout=10.0) as client:

        async def counted() -> dict[tuple[str, ...], float] | None:
            m = await scrape(client, router)
            failed = m.get(("grayroute_tls_certificate_reloads_total", "result=failure"))
            return m if failed == 1 else None

        m = await poll(counted)
        assert await peer_der(port, ctx) == new_der
        assert m[("grayroute_tls_certificate_reloads_total", "result=success")] == 1
        expiry = m[
            (
                "grayroute_tls_certificate_expiry_timestamp_seconds",
                "certificate=a.test",
                f"file={secret / 'tls.crt'}",
            )
        ]
        assert expiry > time.time()

        async def handshakes_counted() -> dict[tuple[str, ...], float] | None:
            m = await scrape(client, router)
            key = ("grayroute_tls_handshakes_total", "certificate=a.test", "version=TLSv1.3")
            return m if m.get(key, 0) >= 12 else None

        await poll(handshakes_counted)
    writer.close()


async def test_serve_refuses_to_start_with_a_bad_certificate(
    tmp_path: Path, tls_ca: LocalCA, upstreams: dict[str, DemoUpstream], serve_router: Serve
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.format(v1=upstreams["v1"].endpoint, v2=upstreams["v2"].endpoint))
    cert, _ = tls_ca.issue("a.test")
    _, other_key = tls_ca.issue("b.test")
    with pytest.raises(RouterStartError) as info:
        await serve_router(
            rules,
            workers=1,
            args=("--listen-tls", "127.0.0.1:0", "--tls-cert", cert, "--tls-key", other_key),
        )
    assert info.value.returncode == 1
    log = (tmp_path / "router.log").read_text()
    assert f"grayroute: --tls-key {other_key}: does not match --tls-cert {cert}" in log
    assert "Traceback" not in log



async def test_a_browser_loads_a_page_over_tls(
    tls_setup: tuple[RunningProxy, list[Any], dict[str, tuple[str, str]]],
    chromium: Callable[..., Any],
) -> None:
    """Headless Chromium: the certificate for the name it asks (trusted by its key),
    TLS 1.3, ALPN http/1.1 although it offers h2, and the page from the upstream."""
    rp, _, pairs = tls_setup
    driver = await asyncio.to_thread(
        chromium, trust=(pairs["b"][0],), hosts={"www.b.test": "127.0.0.1"}
    )
    await asyncio.to_thread(driver.get, f"https://www.b.test:{rp.tls_port}/page")
    text = await asyncio.to_thread(lambda: driver.find_element("tag name", "body").text)
    page = orjson.loads(text)
    assert page["version"] == "v1" and page["path"] == "/page"
    headers = {k.lower(): v for k, v in page["headers"]}
    assert headers["x-forwarded-proto"] == "https"
    assert headers["host"] == f"www.b.test:{rp.tls_port}"
    assert "headlesschrome" in headers["user-agent"].lower()
    protocol = await asyncio.to_thread(
        driver.execute_script,
        "return performance.getEntriesByType('navigation')[0].nextHopProtocol",
    )
    assert protocol == "http/1.1"
    assert ("b.test", "TLSv1.3") in rp.metrics.handshakes
    assert not rp.metrics.handshake_failures

"""TLS termination: certificates, SNI, reloading them when their files change, and the
handshake counters.

    grayroute serve RULES --listen 0.0.0.0:80 --listen-tls 0.0.0.0:443 \\
        --tls-cert api.pem --tls-key api.key --tls-cert www.pem --tls-key www.key

    load_certificates()   each (certificate, key) pair into an ssl.SSLContext of its own,
                          with the names it answers for (its SAN DNS names, else its
                          subject CN); any problem is one ConfigError line naming the file.
                          The supervisor calls it at start (a bad file: exit 1) and before
                          it tells workers to reload; each worker loads the files itself.
    CertificateSet        the loaded pairs, frozen. SNI picks by exact name, then by a
                          one-label wildcard (`*.example.com`); the first pair is the
                          default, for clients that send no name or one no pair has.
    TlsTerminator         per worker: the one SSLContext of every TLS listener. It holds no
                          certificate itself: its SNI callback switches each handshake to
                          the chosen pair's context in the CertificateSet in force, so a
                          reload swaps one reference, new handshakes get the new
                          certificate and connections already open keep theirs. It also
                          counts handshakes (by certificate and version) and failures (by
                          reason), by observing `SSLObject.do_handshake`.
    CertificateWatch      in the supervisor: watches the files (router.watch, through
                          symlinks, as cert-manager swaps a Secret), checks a change, asks
                          the workers to reload, and keeps what /metrics says.

The protocol settings are Mozilla's "intermediate" profile, as an nginx config spells
them: `ssl_protocols TLSv1.2 TLSv1.3; ssl_ciphers TLS12_CIPHERS;`. TLS 1.3 uses OpenSSL's
default suites (all AEAD). ALPN offers `http/1.1` only: HTTP/2 is not spoken here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn, Protocol

from router.errors import ConfigError
from router.watch import FilesWatcher, files_digest

if TYPE_CHECKING:
    from cryptography import x509

log = logging.getLogger("grayroute.tls")

# ECDHE only (forward secrecy), AEAD only; ECDSA first because it is the cheaper signature.
TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
ALPN_PROTOCOLS = ("http/1.1",)

# Seconds a closed TLS connection waits for the client's close_notify before the socket
# is closed anyway (nginx's lingering_timeout is 5 s too).
SHUTDOWN_TIMEOUT = 5.0

# Why a handshake failed, from OpenSSL's reason codes; anything else is "other". Clients
# that close or stall before the handshake ends count as "incomplete" (see TlsTerminator).
_FAILURE_REASONS: dict[str, str] = {
    **dict.fromkeys(
        (
            "UNSUPPORTED_PROTOCOL",
            "VERSION_TOO_LOW",
            "UNSUPPORTED_SSL_VERSION",
            "TLSV1_ALERT_PROTOCOL_VERSION",
        ),
        "version",
    ),
    **dict.fromkeys(
        (
            "NO_SHARED_CIPHER",
            "NO_CIPHERS_AVAILABLE",
            "NO_SHARED_GROUPS",
            "NO_SUITABLE_SIGNATURE_ALGORITHM",
            "NO_SHARED_SIGNATURE_ALGORITHMS",
            "TLSV1_ALERT_INSUFFICIENT_SECURITY",
            "SSLV3_ALERT_HANDSHAKE_FAILURE",
        ),
        "cipher",
    ),
    **dict.fromkeys(("HTTP_REQUEST", "HTTPS_PROXY_REQUEST"), "plain_http"),
    **dict.fromkeys(
        (
            "TLSV1_ALERT_UNKNOWN_CA",
            "SSLV3_ALERT_BAD_CERTIFICATE",
            "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
            "SSLV3_ALERT_CERTIFICATE_EXPIRED",
            "SSLV3_ALERT_CERTIFICATE_REVOKED",
            "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
            "TLSV1_ALERT_ACCESS_DENIED",
        ),
        "certificate_rejected",
    ),
    **dict.fromkeys(
        (
            "WRONG_VERSION_NUMBER",
            "UNKNOWN_PROTOCOL",
            "PACKET_LENGTH_TOO_LONG",
            "RECORD_LENGTH_MISMATCH",
            "LENGTH_MISMATCH",
            "BAD_PACKET_LENGTH",
            "UNEXPECTED_MESSAGE",
            "BAD_EXTENSION",
            "DECODE_ERROR",
        ),
        "malformed",
    ),
}
FAILURE_REASONS = (*sorted(set(_FAILURE_REASONS.values())), "incomplete", "other")


def failure_reason(exc: BaseException) -> str:
    """The metrics label of a failed handshake."""
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return "incomplete"
    reason = getattr(exc, "reason", None)
    return _FAILURE_REASONS.get(reason, "other") if isinstance(reason, str) else "other"


def server_context() -> ssl.SSLContext:
    """A server SSLContext with the protocol settings above and no certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.set_alpn_protocols(list(ALPN_PROTOCOLS))
    # Client-initiated renegotiation is a denial-of-service lever and nothing needs it.
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx


# -- certificates ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Certificate:
    """One loaded (certificate, key) pair."""

    cert_file: str
    key_file: str
    names: tuple[str, ...]  # lower-case DNS names; "*.example.com" for a wildcard
    label: str  # what metrics call it: its first name (or the file's name)
    not_after: float  # expiry, seconds since the Unix epoch
    context: ssl.SSLContext


class CertificateSet:
    """The pairs in force, frozen; `select()` is the SNI lookup."""

    __slots__ = ("_exact", "_labels", "_wildcard", "certificates", "default", "digest")

    def __init__(self, certificates: Sequence[Certificate], digest: str) -> None:
        if not certificates:
            raise ValueError("at least one certificate")
        self.certificates = tuple(certificates)
        self.default = certificates[0]
        self.digest = digest  # of the files' bytes (router.watch.files_digest)
        self._exact: dict[str, Certificate] = {}
        self._wildcard: dict[str, Certificate] = {}  # "example.com" for "*.example.com"
        for cert in certificates:  # the first pair to claim a name keeps it
            for name in cert.names:
                if name.startswith("*."):
                    self._wildcard.setdefault(name[2:], cert)
                else:
                    self._exact.setdefault(name, cert)
        self._labels = {cert.context: cert.label for cert in certificates}

    def select(self, server_name: str | None) -> Certificate:
        """The pair for a client's SNI name: exact, then wildcard, then the default."""
        if not server_name:
            return self.default
        name = server_name.lower().rstrip(".")
        cert = self._exact.get(name)
        if cert is None:
            # A wildcard covers exactly one label (RFC 6125 6.4.3): *.a.com is not a.com.
            _, dot, parent = name.partition(".")
            cert = self._wildcard.get(parent) if dot else None
        return cert if cert is not None else self.default

    def label_of(self, context: ssl.SSLContext) -> str:
        return self._labels.get(context, "")


def _no_password() -> NoReturn:
    # Without a callback OpenSSL would prompt on the terminal and hang the worker.
    raise ConfigError("the key is encrypted; give an unencrypted key (e.g. `openssl pkey`)")


def _names_of(cert: x509.Certificate) -> tuple[str, ...]:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if not names:  # clients no longer accept the CN, but choosing by it costs nothing
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return tuple(dict.fromkeys(n.lower().rstrip(".") for n in names if n))


def load_certificate(cert_file: str, key_file: str) -> Certificate:
    """One pair, checked; raises ConfigError naming the flag and the file."""
    from cryptography import x509

    try:
        with open(cert_file, "rb") as f:
            pem = f.read()
    except OSError as exc:
        raise ConfigError(f"--tls-cert {cert_file}: cannot read it: {exc.strerror}") from exc
    try:
        leaf = x509.load_pem_x509_certificates(pem)[0]  # the leaf, then its chain
    except ValueError as exc:
        raise ConfigError(
            f"--tls-cert {cert_file}: not a PEM certificate (expected -----BEGIN CERTIFICATE-----)"
        ) from exc
    context = server_context()
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_password)
    except ConfigError as exc:
        raise ConfigError(f"--tls-key {key_file}: {exc}") from exc
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                f"--tls-key {key_file}: does not match --tls-cert {cert_file} "
                "(give the key the certificate was issued for)"
            ) from exc
        raise ConfigError(
            f"--tls-key {key_file}: not a PEM private key for --tls-cert {cert_file} "
            f"({exc.reason or exc})"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"--tls-key {key_file}: cannot read it: {exc.strerror}") from exc
    names = _names_of(leaf)
    return Certificate(
        cert_file=cert_file,
        key_file=key_file,
        names=names,
        label=names[0] if names else os.path.basename(cert_file),
        not_after=leaf.not_valid_after_utc.timestamp(),
        context=context,
    )


def certificate_paths(pairs: Sequence[tuple[str, str]]) -> list[str]:
    return [path for pair in pairs for path in pair]


def load_certificates(pairs: Sequence[tuple[str, str]]) -> CertificateSet:
    """Every (certificate, key) pair, in order; raises ConfigError on the first bad one."""
    try:
        digest = files_digest(certificate_paths(pairs))
    except OSError:
        digest = ""  # load_certificate says which file and why
    return CertificateSet([load_certificate(c, k) for c, k in pairs], digest)


# -- the worker's side -----------------------------------------------------------------
class HandshakeMetrics(Protocol):
    def tls_handshake(self, certificate: str, version: str) -> None: ...

    def tls_handshake_failed(self, reason: str) -> None: ...


class _ObservedSSLObject(ssl.SSLObject):
    """What every TLS connection of a TlsTerminator is: an SSLObject whose handshake is
    counted. uvloop's TLS layer drives it (`SSLContext.sslobject_class`); reads and writes
    after the handshake are the standard class's own."""

    terminator: TlsTerminator  # set on the subclass each terminator makes
    _handshake_id = -1

    def do_handshake(self) -> None:
        terminator = self.terminator
        hid = self._handshake_id
        if hid < 0:
            hid = self._handshake_id = terminator.handshake_started()
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            terminator.handshake_failed(hid, exc)
            raise
        terminator.handshake_done(hid, self)


class TlsTerminator:
    """The TLS side of one worker: the listeners' SSLContext, SNI, reload, counters.

    A handshake that neither succeeds nor fails (the client closed the connection or
    stopped sending; uvloop aborts it after `handshake_timeout`) is never reported by
    the TLS layer: each started handshake is remembered by a number, and those still
    open `handshake_timeout` + 1 s later are counted as "incomplete".
    """

    def __init__(
        self,
        certificates: CertificateSet,
        pairs: Sequence[tuple[str, str]],
        metrics: HandshakeMetrics,
        handshake_timeout: float,
    ) -> None:
        self.certificates = certificates
        self.pairs = tuple(pairs)
        self.metrics = metrics
        self.handshake_timeout = handshake_timeout
        self.context = server_context()
        self.context.sni_callback = self._on_server_name
        self.context.sslobject_class = type(
            "ObservedSSLObject", (_ObservedSSLObject,), {"terminator": self}
        )
        self._ids = itertools.count()
        self._started: dict[int, float] = {}  # handshakes in progress -> when they began
        self._sweeper: asyncio.Task[None] | None = None

    async def serve(
        self, sock: socket.socket, protocol_factory: Callable[[], asyncio.Protocol], backlog: int
    ) -> asyncio.AbstractServer:
        """A TLS listener on a bound socket; starts counting incomplete handshakes."""
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())
        return await asyncio.get_running_loop().create_server(
            protocol_factory,
            sock=sock,
            backlog=backlog,
            ssl=self.context,
            ssl_handshake_timeout=self.handshake_timeout,
            ssl_shutdown_timeout=SHUTDOWN_TIMEOUT,
        )

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    async def reload(self) -> bool:
        """Load the files again; new handshakes get the new pairs. False if they failed."""
        loop = asyncio.get_running_loop()
        try:
            certificates = await loop.run_in_executor(None, load_certificates, self.pairs)
        except ConfigError as exc:
            log.error("certificates not reloaded, keeping those in force: %s", exc)
            return False
        if certificates.digest != self.certificates.digest:
            self.certificates = certificates
            log.info("certificates reloaded: %s", describe(certificates))
        return True

    # -- called by the TLS layer, once per handshake (never per request) ----------------
    def _on_server_name(
        self, ssl_object: ssl.SSLObject, server_name: str | None, _context: ssl.SSLContext
    ) -> None:
        ssl_object.context = self.certificates.select(server_name).context

    def handshake_started(self) -> int:
        hid = next(self._ids)
        self._started[hid] = time.monotonic()
        return hid

    def handshake_done(self, hid: int, ssl_object: ssl.SSLObject) -> None:
        self._started.pop(hid, None)
        label = self.certificates.label_of(ssl_object.context)
        if not label:  # a pair replaced by a reload during this handshake
            label = self.certificates.select(ssl_object.server_hostname).label
        self.metrics.tls_handshake(label, ssl_object.version() or "")

    def handshake_failed(self, hid: int, exc: BaseException) -> None:
        self._started.pop(hid, None)
        reason = failure_reason(exc)
        self.metrics.tls_handshake_failed(reason)
        log.debug("TLS handshake failed (%s): %s", reason, exc)

    def sweep(self, now: float) -> int:
        """Count the handshakes that can no longer finish; how many there were."""
        limit = now - self.handshake_timeout - 1.0
        stale = [hid for hid, began in self._started.items() if began < limit]
        for hid in stale:
            del self._started[hid]
            self.metrics.tls_handshake_failed("incomplete")
        return len(stale)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.sweep(time.monotonic())


def describe(certificates: CertificateSet) -> str:
    """One line for the log: each pair's names and expiry."""
    return "; ".join(
        f"{','.join(c.names) or c.label} (expires "
        f"{time.strftime('%Y-%m-%d', time.gmtime(c.not_after))})"
        for c in certificates.certificates
    )


# -- the supervisor's side ---------------------------------------------------------------
class CertificateStatus(Protocol):
    """Where the supervisor's metrics read the certificates in force."""

    certificates: list[tuple[str, str, float]]  # (label, certificate file, expiry)
    certificate_reloads: dict[str, int]


class CertificateWatch:
    """The supervisor's certificates: checked at start, watched, reloaded, reported.

    A change is loaded and checked here first; only a good one makes the workers reload
    (`notify`). A bad one (a key that does not match, a half-written file) is logged and
    counted, and every worker keeps serving the pairs in force.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]],
        certificates: CertificateSet,
        notify: Callable[[], None],
        status: CertificateStatus,
        interval: float,
    ) -> None:
        self.pairs = tuple(pairs)
        self.certificates = certificates
        self.notify = notify
        self.status = status
        self.interval = interval
        self.watcher = (
            FilesWatcher(
                certificate_paths(self.pairs),
                lambda: self.certificates.digest,
                lambda: self.request("watch"),
                interval,
            )
            if interval > 0
            else None
        )
        self._trigger: str | None = None
        self._wake = asyncio.Event()
        self._report()

    def request(self, trigger: str) -> None:
        """Reload at the next step of `run` (trigger: "watch" or "sighup")."""
        self._trigger = trigger
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                if self.watcher is not None:
                    self.watcher.tick(loop.time())
                if self._trigger is not None:
                    trigger, self._trigger = self._trigger, None
                    await self.reload(trigger)
            except Exception:  # never let a surprise stop watching
                log.exception("watching the certificates failed; trying again")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval or None):
                    await self._wake.wait()

    async def reload(self, trigger: str) -> bool:
        loop = asyncio.get_running_loop()
        try:
            certificates = await loop.run_in_executor(None, load_certificates, self.pairs)
        except ConfigError as exc:
            self.status.certificate_reloads["failure"] += 1
            log.error("certificates not reloaded (%s), keeping those in force: %s", trigger, exc)
            return False
        if certificates.digest == self.certificates.digest:
            return True
        self.certificates = certificates
        self.status.certificate_reloads["success"] += 1
        self._report()
        log.info("certificates reloaded (%s): %s", trigger, describe(certificates))
        self.notify()
        return True

    def _report(self) -> None:
        self.status.certificates = [
            (c.label, c.cert_file, c.not_after) for c in self.certificates.certificates
        ]

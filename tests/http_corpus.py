"""Malformed and ambiguous raw requests, each with the status the router must answer.

None of them may reach an upstream. `H` is a valid request prefix for routes that match
everything: the cases differ from a valid request in one place each.
"""

from __future__ import annotations

H = b"Host: a\r\nX-User-Id: 42\r\n"

MALFORMED: list[tuple[str, bytes, int]] = [
    # -- framing: request smuggling ----------------------------------------------------
    (
        "cl-and-te",
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "te-and-cl",
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "cl-twice-same",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        400,
    ),
    (
        "cl-twice-different",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        400,
    ),
    ("cl-list", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3, 3\r\n\r\nabc", 400),
    ("cl-negative", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", 400),
    ("cl-plus", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +3\r\n\r\nabc", 400),
    ("cl-hex", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x3\r\n\r\nabc", 400),
    ("cl-space-inside", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1 2\r\n\r\n", 400),
    ("cl-empty", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: \r\n\r\n", 400),
    (
        "cl-huge",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 99999999999999999999999\r\n\r\n",
        400,
    ),
    ("te-gzip", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\n", 400),
    (
        "te-gzip-chunked",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "te-chunked-twice",
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    ("te-identity", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n\r\n", 400),
    (
        "te-chunked-typo",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunkedx\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "te-space-before-colon",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "te-http10",
        b"POST / HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    # -- chunks ---------------------------------------------------------------------------
    (
        "chunk-size-not-hex",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunk-size-negative",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunk-size-overflow",
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunk-size-space",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunk-ext-bad",
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\n3;\x01\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunk-data-too-long",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunk-bare-lf",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n",
        400,
    ),
    # -- header lines -----------------------------------------------------------------
    ("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X-A: one\r\n two\r\n\r\n", 400),
    ("obs-fold-tab", b"GET / HTTP/1.1\r\n" + H + b"X-A: one\r\n\ttwo\r\n\r\n", 400),
    ("space-before-colon", b"GET / HTTP/1.1\r\n" + H + b"X-A : one\r\n\r\n", 400),
    ("no-colon", b"GET / HTTP/1.1\r\n" + H + b"X-A one\r\n\r\n", 400),
    ("empty-name", b"GET / HTTP/1.1\r\n" + H + b": one\r\n\r\n", 400),
    ("name-with-space", b"GET / HTTP/1.1\r\n" + H + b"X A: one\r\n\r\n", 400),
    ("name-with-at", b"GET / HTTP/1.1\r\n" + H + b"X@A: one\r\n\r\n", 400),
    ("name-non-ascii", b"GET / HTTP/1.1\r\n" + H + b"X-\xc3\xa9: one\r\n\r\n", 400),
    ("value-nul", b"GET / HTTP/1.1\r\n" + H + b"X-A: o\x00ne\r\n\r\n", 400),
    ("value-bare-cr", b"GET / HTTP/1.1\r\n" + H + b"X-A: o\rne\r\n\r\n", 400),
    ("value-control", b"GET / HTTP/1.1\r\n" + H + b"X-A: o\x07ne\r\n\r\n", 400),
    ("header-bare-lf", b"GET / HTTP/1.1\n" + b"Host: a\nX-User-Id: 42\n\n", 400),
    ("header-cr-only", b"GET / HTTP/1.1\r" + b"Host: a\r\r", 400),
    ("two-hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nX-User-Id: 42\r\n\r\n", 400),
    (
        "expect-other",
        b"POST / HTTP/1.1\r\n" + H + b"Expect: 200-ok\r\nContent-Length: 1\r\n\r\nx",
        417,
    ),
    # -- request line --------------------------------------------------------------------
    ("method-unknown", b"FOO / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("method-lowercase", b"get / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("method-with-space", b"GE T / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("target-space", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("target-control", b"GET /a\x01b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("target-nul", b"GET /a\x00 HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("target-missing", b"GET HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("version-missing", b"GET /\r\n" + H + b"\r\n", 400),
    ("version-2", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 400),
    ("version-1.2", b"GET / HTTP/1.2\r\n" + H + b"\r\n", 400),
    ("version-lowercase", b"GET / http/1.1\r\n" + H + b"\r\n", 400),
    ("version-junk", b"GET / HTTP/1.1x\r\n" + H + b"\r\n", 400),
    ("leading-space", b" GET / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
    ("connect-method", b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 400),
    # nginx answers TRACE 405 (it would echo credentials back to a script)
    ("trace-method", b"TRACE / HTTP/1.1\r\n" + H + b"\r\n", 405),
    # -- Host (RFC 9112 3.2: 400 for none in HTTP/1.1, for an invalid value) -------------
    ("http11-no-host", b"GET / HTTP/1.1\r\nX-User-Id: 42\r\n\r\n", 400),
    ("host-space-slash", b"GET / HTTP/1.1\r\nHost: a b/c\r\nX-User-Id: 42\r\n\r\n", 400),
    ("host-slash", b"GET / HTTP/1.1\r\nHost: a/../b\r\n\r\n", 400),
    ("host-empty", b"GET / HTTP/1.1\r\nHost: \r\n\r\n", 400),  # nginx: 400 too
    ("host-bad-port", b"GET / HTTP/1.1\r\nHost: a:80x\r\n\r\n", 400),
    ("host-userinfo", b"GET / HTTP/1.1\r\nHost: evil@a\r\n\r\n", 400),
    ("host-bad-ipv6", b"GET / HTTP/1.1\r\nHost: [::zz]\r\n\r\n", 400),
    ("host-bad-ipv6-colons", b"GET / HTTP/1.1\r\nHost: [1::2::3]:80\r\n\r\n", 400),
    ("host-bad-escape", b"GET / HTTP/1.1\r\nHost: a%zz\r\n\r\n", 400),
    # absolute-form: the target's authority is the Host (RFC 9112 3.2.2); no userinfo
    ("absolute-userinfo", b"GET http://evil@a/x HTTP/1.1\r\nHost: b\r\n\r\n", 400),
    ("absolute-not-http", b"GET ftp://a/x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("absolute-no-host", b"GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("absolute-bad-host", b"GET http://a%zz/x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    # -- paths nginx refuses (ngx_http_parse_complex_uri) --------------------------------
    ("path-above-root", b"GET /../etc/passwd HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("path-above-root-encoded", b"GET /a/%2e%2e/%2E%2E/x HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("path-bad-escape", b"GET /a%zz HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("path-cut-escape", b"GET /a%4 HTTP/1.1\r\n" + H + b"\r\n", 400),
    # -- Upgrade offers are declined, their framing checked as any request's ------------
    (
        "upgrade-cl-and-te",
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Connection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "upgrade-bad-chunk",
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Connection: Upgrade\r\nUpgrade: h2c\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nGET /smuggled HTTP/1.1\r\n\r\n",
        400,
    ),
    (
        "upgrade-body-over-limit",
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Connection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 1001\r\n\r\n",
        413,
    ),
    (
        "upgrade-chunked-over-limit",
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Connection: Upgrade\r\nUpgrade: h2c\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"3e9\r\n"
        + b"x" * 1001
        + b"\r\n0\r\n\r\n",
        413,
    ),
    # a malformed trailer section is a malformed request (its short body was held)
    (
        "trailer-bare-lf",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\nX-T: 1\n\r\n",
        400,
    ),
]

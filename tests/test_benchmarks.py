"""benchmarks/: the upstreams, the harness's checks, and a short locust run through a real
`grayroute serve` (the smoke test QA's load runs rely on)."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `benchmarks` is a folder of the repo, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import harness as h  # noqa: E402
from benchmarks.run import top_summary  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def _get(
    addr: str, method: str = "GET", headers: dict[str, str] | None = None, body: bytes | None = None
) -> tuple[int, str | None, bytes]:
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request(method, "/api/orders", body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheader("X-Version"), resp.read()
    finally:
        conn.close()


@pytest.fixture
def backends(tmp_path: Path) -> Iterator[dict[str, str]]:
    proc = h.start_python_backends(h.VERSIONS, None, tmp_path)
    try:
        yield proc.info["backends"]
    finally:
        proc.stop()


@pytest.fixture
def grayroute(backends: dict[str, str], tmp_path: Path) -> Iterator[h.Proc]:
    rules = h.write_rules_for(h.load_rules(), backends, tmp_path / "rules.yaml")
    proc = h.start_grayroute(rules, None, tmp_path, workers=1)
    try:
        yield proc
    finally:
        proc.stop()


def test_backends_answer_with_their_version(backends: dict[str, str]) -> None:
    for version, addr in backends.items():
        assert _get(addr) == (200, version, version.encode())
        status, header, body = _get(
            addr, "POST", {"Content-Type": "application/json"}, h.json_body("42")
        )
        assert (status, header, body) == (200, version, version.encode())


def test_backends_keep_alive_and_pipelining(backends: dict[str, str]) -> None:
    import socket

    host, port = backends["v1.1"].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
        data = b""
        while data.count(b"v1.1") < 6:  # header + body, three times
            chunk = s.recv(65536)
            assert chunk, "closed early"
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 3


def test_rule_file_pattern_is_uid_mod_100_below_10() -> None:
    exp = h.expectation(h.load_rules())
    assert exp.split == pytest.approx({"v1": 0.9, "v1.1": 0.1})
    assert exp.pin_to == "v2"
    assert exp.pattern is not None
    for uid in [*range(0, 3000), 999_999, 1_000_000, 123_405, 123_410]:
        assert bool(exp.pattern.fullmatch(str(uid))) == (uid % 100 < 10), uid
    assert exp.pattern.fullmatch("007")  # 0-padded: 7 % 100 < 10, like Lua's tonumber
    assert not exp.pattern.fullmatch("qa-alice")
    # the whitelist is there for its own sake: none of it is also pinned by the pattern
    assert not any(exp.pattern.fullmatch(u) for u in exp.whitelist)


def test_rules_for_ports_rewrites_only_the_endpoints(tmp_path: Path) -> None:
    rules = h.load_rules()
    addrs = {"v1": "127.0.0.1:1", "v1.1": "127.0.0.1:2", "v2": "127.0.0.1:3"}
    doc = yaml.safe_load(h.write_rules_for(rules, addrs, tmp_path / "r.yaml").read_text())
    assert {k: v["endpoints"] for k, v in doc["upstreams"].items()} == {
        k: [v] for k, v in addrs.items()
    }
    assert doc["routes"] == rules["routes"]


def test_json_body_is_about_300_bytes_and_carries_the_user() -> None:
    body = h.json_body("123456")
    assert 290 <= len(body) <= 310
    assert json.loads(body)["user_id"] == "123456"
    assert json.loads(h.json_body(42))["user_id"] == 42


def test_docs_block_is_replaced_in_place(tmp_path: Path) -> None:
    page = tmp_path / "b.md"
    page.write_text("# B\n\nhand-written\n")
    h.update_docs_block("results", "one", page)
    h.update_docs_block("results", "two", page)
    text = page.read_text()
    assert "hand-written" in text
    assert text.count("<!-- results:start -->") == 1
    assert "two" in text and "one" not in text


def test_top_summary_counts_self_and_total(tmp_path: Path) -> None:
    raw = tmp_path / "p.collapsed"
    raw.write_text(
        "process 1;main (a.py:1);loop (a.py:2);decide (d.py:9) 20\n"
        "process 1;main (a.py:1);loop (a.py:2);decide (d.py:12) 10\n"
        "process 1;main (a.py:1);loop (a.py:2) 10\n"
    )
    text = top_summary(raw)
    assert "40 samples" in text
    assert re.search(r"75\.0\s+75\.0\s+decide \(d\.py\)", text)  # lines 9 and 12 folded
    assert re.search(r"25\.0\s+100\.0\s+loop \(a\.py\)", text)


def test_nginx_lua_baseline_routes_like_the_rules(backends: dict[str, str], tmp_path: Path) -> None:
    missing = h.nginx_available()
    if missing:
        pytest.skip(missing)
    proc = h.start_nginx_router(h.load_rules(), backends, None, tmp_path)
    try:
        report = h.check_routing("nginx+lua", proc.addr, h.load_rules(), split_users=1500)
    finally:
        proc.stop()
    assert report.ok, report.problems


def test_grayroute_routes_like_the_rules(grayroute: h.Proc) -> None:
    report = h.check_routing("grayroute", grayroute.addr, h.load_rules(), split_users=1500)
    assert report.ok, report.problems


def _locust(
    host: str, tmp_path: Path, env: dict[str, str], seconds: int = 3
) -> tuple[int, dict[str, Any]]:
    exe = Path(sys.executable).with_name("locust")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "locust"]
    out = tmp_path / "check.json"
    out.unlink(missing_ok=True)
    proc = subprocess.run(
        [
            *cmd,
            "-f",
            str(REPO / "benchmarks" / "locustfile.py"),
            "--headless",
            "-u",
            "6",
            "-r",
            "6",
            "-t",
            f"{seconds}s",
            "--stop-timeout",
            "2",
            "--only-summary",
            "--host",
            f"http://{host}",
            "HeaderUser",
            "JsonBodyUser",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=seconds + 45,
        env={**os.environ, "GR_CHECK_OUT": str(out), **env},
    )
    assert out.exists(), f"locust wrote no check result:\n{proc.stderr[-3000:]}"
    return proc.returncode, json.loads(out.read_text())


def test_locust_smoke_run_through_grayroute(grayroute: h.Proc, tmp_path: Path) -> None:
    # A busy machine may not fit GR_MIN_SAMPLES into a short run: run longer then, rather
    # than judge the split on too few responses.
    for seconds in (3, 8, 20):
        code, check = _locust(grayroute.addr, tmp_path, {}, seconds=seconds)
        if sum(check["split"].values()) >= 200:
            break
    assert check["ok"], check["messages"]
    assert code == 0
    assert sum(check["split"].values()) >= 200
    assert check["pinned_ok"] > 0 and not check["pinned_wrong"]

    # the same traffic judged against other weights must fail the run
    wrong = h.load_rules()
    wrong["routes"][0]["split"] = {"v1": 50, "v1.1": 50}
    rules = tmp_path / "wrong.yaml"
    rules.write_text(yaml.safe_dump(wrong, sort_keys=False))
    code, check = _locust(grayroute.addr, tmp_path, {"GR_RULES": str(rules)}, seconds=2)
    assert not check["ok"]
    assert code == 1


def test_both_routers_serve_tls_with_the_same_certificate(
    backends: dict[str, str], tmp_path: Path
) -> None:
    import ssl

    missing = h.nginx_available()
    if missing:
        pytest.skip(missing)
    if not h.s_time_available():
        pytest.skip("openssl is not installed")
    cert, key = h.make_certificate(tmp_path)
    expected = ssl.PEM_cert_to_DER_cert(cert.read_text())  # the leaf: no intermediates
    rules = h.write_rules_for(h.load_rules(), backends, tmp_path / "rules.yaml")
    procs = [
        h.start_nginx_router(h.load_rules(), backends, None, tmp_path, tls=(cert, key)),
        h.start_grayroute(rules, None, tmp_path, workers=1, tls=(cert, key)),
    ]
    try:
        for proc in procs:
            host, port = proc.info["tls_addr"].rsplit(":", 1)
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # the benchmark compares, it does not verify
            conn = http.client.HTTPSConnection(host, int(port), timeout=5, context=ctx)
            conn.request("GET", "/api/orders", headers={"X-User-Id": "42"})
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (200, b"v2"), proc.name
            assert conn.sock.getpeercert(binary_form=True) == expected, proc.name
            assert conn.sock.version() == "TLSv1.3"
            conn.close()
            shakes = h.run_handshakes(proc.info["tls_addr"], "/api/orders", 1, 2, None)
            assert shakes.requests > 0 and shakes.failed_clients == 0, proc.name
    finally:
        for proc in procs:
            proc.stop()

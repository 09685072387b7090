"""Process control and measurement helpers shared by the benchmark scripts.

Everything here starts real processes on 127.0.0.1 (ephemeral ports), pinned to a CPU
with ``taskset`` when asked, and stops them again: the upstreams (nginx or
`benchmarks.backends`), the Nginx + Lua baseline rendered from benchmarks/nginx/ into a
temp prefix, ``grayroute serve``, and ``wrk`` with the scripts in benchmarks/wrk/.
Nothing here reads or writes the system's nginx configuration.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lua_compat.nginx_check import free_ports

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
NGINX_DIR = BENCH_DIR / "nginx"
WRK_DIR = BENCH_DIR / "wrk"
OUT_DIR = BENCH_DIR / "out"
DEFAULT_RULES = BENCH_DIR / "rules.yaml"
NGINX_MODULES = Path("/usr/lib/nginx/modules")
LUA_CJSON = Path("/usr/lib/x86_64-linux-gnu/lua/5.1/cjson.so")
VERSIONS = ("v1", "v1.1", "v2")


class BenchError(Exception):
    """A benchmark could not be set up or a target misbehaved; the message says which."""


# ---------------------------------------------------------------------------------------
# ports, CPUs, processes


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def taskset(cpu: int | None) -> list[str]:
    """Command prefix pinning a process (and its children) to one CPU, if possible."""
    if cpu is None or shutil.which("taskset") is None or cpu not in os.sched_getaffinity(0):
        return []
    return ["taskset", "-c", str(cpu)]


def wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen[Any] | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


def children(pid: int) -> list[int]:
    """Direct child PIDs of pid (Linux /proc)."""
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids.extend(int(x) for x in f.read().split())
    return kids


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


@dataclass
class Proc:
    """A started server process; `stop()` ends it (SIGTERM, then SIGKILL)."""

    name: str
    popen: subprocess.Popen[bytes]
    addr: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    workdir: Path | None = None
    _drain: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def worker_pid(self) -> int:
        """The process that serves requests: the only child if there is one, else itself.

        `taskset` is applied before exec, so the wrapper is gone and popen.pid is the
        server (nginx master or grayroute supervisor) itself.
        """
        kids = children(self.pid)
        if not kids:
            return self.pid
        # grayroute: the worker processes; nginx: the worker (one).
        return kids[-1] if len(kids) == 1 else sorted(kids)[0]

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait; then SIGKILL whatever is left of its process group (the
        process was started in a session of its own, so the group is only its tree)."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(5)
        if self._drain is not None:
            self._drain.join(2)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                with contextlib.suppress(OSError, ValueError):
                    stream.close()


def _drain_to(stream: Any, path: Path) -> threading.Thread:
    """Keep reading a child's stdout into a file, so its pipe never fills."""

    def run() -> None:
        with open(path, "ab") as out, contextlib.suppress(ValueError, OSError):
            for line in stream:
                out.write(line)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _read_ready_line(
    popen: subprocess.Popen[bytes], timeout: float, what: str, log: Path
) -> dict[str, Any]:
    """Read stdout lines until a JSON {"event": "ready"} line arrives (or time runs out)."""
    assert popen.stdout is not None
    result: dict[str, Any] = {}
    seen: list[bytes] = []

    def reader() -> None:
        assert popen.stdout is not None
        for line in popen.stdout:
            seen.append(line)
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict) and doc.get("event") == "ready":
                    result.update(doc)
                    return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        popen.kill()
        popen.wait(5)
        err = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        out = b"".join(seen).decode(errors="replace")[-1000:]
        raise BenchError(
            f"{what} did not print its ready line within {timeout:.0f}s "
            f"(exit code {popen.returncode}); stdout: {out!r}; stderr tail: {err}"
        )
    return result


# ---------------------------------------------------------------------------------------
# the rule file


def load_rules(path: Path = DEFAULT_RULES) -> dict[str, Any]:
    with open(path) as f:
        doc = yaml.safe_load(f)
    if not isinstance(doc, dict) or "upstreams" not in doc or "routes" not in doc:
        raise BenchError(f"{path}: not a rule file (no upstreams/routes)")
    return doc


@dataclass(frozen=True)
class Expectation:
    """What the benchmark route promises, read from the rule file: used by the checks."""

    whitelist: frozenset[str]
    pattern: re.Pattern[str] | None
    pin_to: str
    split: dict[str, float]  # normalised to fractions

    def pinned(self, uid: str) -> bool:
        return uid in self.whitelist or bool(self.pattern and self.pattern.fullmatch(uid))


def expectation(rules: dict[str, Any]) -> Expectation:
    """The whitelist, the pattern pin and the split of the (first) benchmark route."""
    route = rules["routes"][0]
    whitelist: set[str] = set()
    pattern = None
    pin_to = ""
    for pin in route.get("pins", []):
        pin_to = pin_to or pin["to"]
        if pin["to"] != pin_to or not ({"users", "user_pattern"} >= set(pin) - {"to"}):
            raise BenchError("benchmark rules: only `users`/`user_pattern` pins, to one upstream")
        whitelist.update(str(u) for u in pin.get("users", []))
        if "user_pattern" in pin:
            pattern = re.compile(pin["user_pattern"])
    weights = {str(k): float(v) for k, v in route["split"].items()}
    total = sum(weights.values())
    return Expectation(
        frozenset(whitelist), pattern, pin_to, {k: v / total for k, v in weights.items()}
    )


def write_rules_for(rules: dict[str, Any], addrs: dict[str, str], path: Path) -> Path:
    """A copy of the rule file whose upstreams point at the given HOST:PORT per version."""
    doc = json.loads(json.dumps(rules))  # deep copy of plain data
    for name, up in doc["upstreams"].items():
        if name not in addrs:
            raise BenchError(f"rules: no backend started for upstream {name!r}")
        up["endpoints"] = [addrs[name]]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------
# upstreams


def start_python_backends(
    versions: tuple[str, ...], cpu: int | None, workdir: Path, host: str = "127.0.0.1"
) -> Proc:
    ports = free_ports(len(versions))
    args = [f"{v}={host}:{p}" for v, p in zip(versions, ports, strict=True)]
    log = workdir / "backends.stderr"
    with open(log, "wb") as err:
        popen = subprocess.Popen(
            [*taskset(cpu), sys.executable, "-m", "benchmarks.backends", *args],
            cwd=REPO_DIR,
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,
        )
    ready = _read_ready_line(popen, 20, "python backends", log)
    proc = Proc("backends (python)", popen, info={"backends": ready["backends"]}, workdir=workdir)
    proc._drain = _drain_to(popen.stdout, workdir / "backends.stdout")
    return proc


def render(template: Path, values: dict[str, str]) -> str:
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", value)
    left = re.findall(r"@@[A-Z0-9_]+@@", text)
    if left:
        raise BenchError(f"{template.name}: placeholders left unfilled: {sorted(set(left))}")
    return text


def nginx_available() -> str | None:
    """None when the baseline can run, else what is missing and how to get it."""
    if shutil.which("nginx") is None:
        return "nginx is not installed (apt-get install nginx libnginx-mod-http-lua lua-cjson)"
    for mod in ("ndk_http_module.so", "ngx_http_lua_module.so"):
        if not (NGINX_MODULES / mod).exists():
            return f"{NGINX_MODULES / mod} is missing (apt-get install libnginx-mod-http-lua)"
    if not LUA_CJSON.exists():
        return f"{LUA_CJSON} is missing (apt-get install lua-cjson)"
    return None


def _start_nginx(name: str, conf: str, prefix: Path, cpu: int | None, port: int) -> Proc:
    prefix.mkdir(parents=True, exist_ok=True)
    prefix.chmod(0o755)
    conf_path = prefix / "nginx.conf"
    conf_path.write_text(conf)
    log = prefix / "stderr.log"
    cmd = ["nginx", "-p", str(prefix), "-c", str(conf_path), "-e", str(prefix / "error.log")]
    test = subprocess.run([*cmd, "-t"], capture_output=True, text=True)
    if test.returncode != 0:
        raise BenchError(f"{name}: nginx -t failed:\n{test.stderr}")
    with open(log, "wb") as err:
        popen = subprocess.Popen(
            [*taskset(cpu), *cmd], stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )
    try:
        wait_port("127.0.0.1", port, 15, popen)
    except BenchError as exc:
        popen.kill()
        popen.wait(5)
        tail = (prefix / "error.log").read_text(errors="replace")[-2000:]
        raise BenchError(f"{name}: {exc}\n{tail}") from None
    return Proc(name, popen, addr=f"127.0.0.1:{port}", workdir=prefix)


def start_nginx_backends(versions: tuple[str, ...], cpu: int | None, workdir: Path) -> Proc:
    ports = free_ports(len(versions))
    servers = []
    for version, port in zip(versions, ports, strict=True):
        servers.append(
            f"    server {{\n"
            f"        listen 127.0.0.1:{port} backlog=4096;\n"
            f"        location / {{\n"
            f'            add_header X-Version "{version}";\n'
            f'            return 200 "{version}";\n'
            f"        }}\n"
            f"    }}"
        )
    prefix = workdir / "nginx-backends"
    conf = render(
        NGINX_DIR / "backends.conf.in", {"PREFIX": str(prefix), "SERVERS": "\n".join(servers)}
    )
    proc = _start_nginx("backends (nginx)", conf, prefix, cpu, ports[-1])
    for port in ports:
        wait_port("127.0.0.1", port, 5, proc.popen)
    proc.info["backends"] = {v: f"127.0.0.1:{p}" for v, p in zip(versions, ports, strict=True)}
    return proc


def start_backends(kind: str, cpu: int | None, workdir: Path) -> Proc:
    if kind == "nginx":
        return start_nginx_backends(VERSIONS, cpu, workdir)
    if kind == "python":
        return start_python_backends(VERSIONS, cpu, workdir)
    raise BenchError(f"--backends: {kind!r} is not nginx or python")


# ---------------------------------------------------------------------------------------
# the routers


def make_certificate(workdir: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost from a throw-away CA (trustme), with an
    ECDSA P-256 key as most sites serve today; both routers are given this same pair."""
    import trustme

    leaf = trustme.CA().issue_cert("127.0.0.1", "localhost")
    cert, key = workdir / "tls-cert.pem", workdir / "tls-key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


def _nginx_tls(port: int, tls: tuple[Path, Path]) -> str:
    """The listen and ssl_* lines of the baseline: Grayroute's protocol settings
    (router.tls) as nginx spells them."""
    from router.tls import TLS12_CIPHERS

    cert, key = tls
    return (
        f"        listen 127.0.0.1:{port} ssl backlog=4096;\n"
        f"        ssl_certificate {cert};\n"
        f"        ssl_certificate_key {key};\n"
        f"        ssl_protocols TLSv1.2 TLSv1.3;\n"
        f"        ssl_ciphers {TLS12_CIPHERS};"
    )


def start_nginx_router(
    rules: dict[str, Any],
    backends: dict[str, str],
    cpu: int | None,
    workdir: Path,
    tls: tuple[Path, Path] | None = None,
) -> Proc:
    """The Nginx + Lua baseline, configured from the same rule file as Grayroute; with
    `tls` (certificate, key) also on a TLS port (`info["tls_addr"]`)."""
    exp = expectation(rules)
    if set(exp.split) != {"v1", "v1.1"} or exp.pin_to != "v2":
        raise BenchError("the Nginx + Lua baseline implements pins to v2 and a v1/v1.1 split")
    prefix = workdir / "nginx-router"
    prefix.mkdir(parents=True, exist_ok=True)
    whitelist = prefix / "whitelist.txt"
    whitelist.write_text("".join(f"{u}\n" for u in sorted(exp.whitelist)))
    port, tls_port = free_ports(2)
    conf = render(
        NGINX_DIR / "router.conf.in",
        {
            "PREFIX": str(prefix),
            "LUA_DIR": str(NGINX_DIR),
            "WHITELIST": str(whitelist),
            "SPLIT_V1": f"{round(exp.split['v1'] * 100)}",
            "V1": backends["v1"],
            "V1_1": backends["v1.1"],
            "V2": backends["v2"],
            "LISTEN": f"127.0.0.1:{port}",
            "TLS": _nginx_tls(tls_port, tls) if tls else "",
        },
    )
    proc = _start_nginx("nginx+lua", conf, prefix, cpu, port)
    if tls:
        wait_port("127.0.0.1", tls_port, 5, proc.popen)
        proc.info["tls_addr"] = f"127.0.0.1:{tls_port}"
    return proc


def start_grayroute(
    rules_file: Path,
    cpu: int | None,
    workdir: Path,
    workers: int = 1,
    extra_env: dict[str, str] | None = None,
    ready_timeout: float = 30.0,
    tls: tuple[Path, Path] | None = None,
    extra_args: tuple[str, ...] = (),
) -> Proc:
    """`grayroute serve`; with `tls` (certificate, key) also on a TLS port
    (`info["tls_addr"]`)."""
    listen, admin = free_ports(2)
    cmd = [
        *_grayroute_command(),
        "serve",
        str(rules_file),
        "--listen",
        f"127.0.0.1:{listen}",
        "--admin",
        f"127.0.0.1:{admin}",
        "--workers",
        str(workers),
        "--log-level",
        "warning",
        *extra_args,
    ]
    if tls:
        (tls_port,) = free_ports(1)
        cmd += ["--listen-tls", f"127.0.0.1:{tls_port}"]
        cmd += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
    log = workdir / f"grayroute-{listen}.stderr"
    with open(log, "wb") as err:
        popen = subprocess.Popen(
            [*taskset(cpu), *cmd],
            cwd=REPO_DIR,
            stdout=subprocess.PIPE,
            stderr=err,
            env={**os.environ, **(extra_env or {})},
            start_new_session=True,
        )
    ready = _read_ready_line(popen, ready_timeout, "grayroute serve", log)
    proc = Proc("grayroute", popen, addr=f"127.0.0.1:{listen}", info=ready, workdir=workdir)
    proc._drain = _drain_to(popen.stdout, workdir / f"grayroute-{listen}.stdout")
    wait_port("127.0.0.1", listen, 10, popen)
    if tls:
        proc.info["tls_addr"] = ready["listen_tls"][0]
    return proc


def _grayroute_command() -> list[str]:
    exe = Path(sys.executable).with_name("grayroute")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "router.cli"]


def grayroute_build(extra_env: dict[str, str] | None = None) -> str:
    """Which build `grayroute` runs with this environment, as `--version` says it."""
    out = subprocess.run(
        [*_grayroute_command(), "--version"],
        capture_output=True,
        text=True,
        cwd=REPO_DIR,
        env={**os.environ, **(extra_env or {})},
    )
    version = out.stdout.strip()
    return version[version.find("(") + 1 : -1] if version.endswith(")") else version


def grayroute_worker_pids(proc: Proc, workers: int = 1, timeout: float = 10.0) -> list[int]:
    """The worker processes of `grayroute serve` (the supervisor's children).

    With no children (a single-process mode), the supervisor itself serves.
    """
    deadline = time.monotonic() + timeout
    while True:
        kids = [k for k in children(proc.pid) if _is_python(k)]
        if len(kids) >= workers or time.monotonic() > deadline:
            return kids or [proc.pid]
        time.sleep(0.1)


def _is_python(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"python" in f.read().split(b"\0")[0]
    except OSError:
        return False


# ---------------------------------------------------------------------------------------
# routing correctness


@dataclass
class RoutingReport:
    target: str
    ok: bool
    problems: list[str]
    counts: dict[str, int]
    split: dict[str, float]
    requests: int

    def summary(self) -> str:
        shares = ", ".join(f"{k} {v:.1%}" for k, v in sorted(self.split.items()))
        verdict = "OK" if self.ok else "WRONG"
        return f"{self.target}: routing {verdict} ({self.requests} requests; split {shares})"


class _Client:
    """A keep-alive HTTP/1.1 client over one connection (stdlib, low overhead)."""

    def __init__(self, addr: str) -> None:
        host, port = addr.rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=10)

    def version(self, method: str, headers: dict[str, str], body: bytes | None) -> str:
        self.conn.request(method, "/api/orders", body=body, headers=headers)
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            return f"HTTP {resp.status}"
        header = resp.getheader("X-Version")
        body_version = data.decode(errors="replace")
        if header is not None and header != body_version:
            return f"header {header} != body {body_version}"
        return body_version

    def close(self) -> None:
        self.conn.close()


def json_body(uid: str | int, size: int = 300) -> bytes:
    """A ~size-byte JSON order whose user_id is uid (and no other user field)."""
    doc: dict[str, Any] = {
        "user_id": uid,
        "order": {"sku": "SKU-000123", "qty": 2, "currency": "EUR"},
        "note": "",
    }
    base = len(json.dumps(doc, separators=(",", ":")))
    doc["note"] = "x" * max(0, size - base)
    return json.dumps(doc, separators=(",", ":")).encode()


def check_routing(
    target: str, addr: str, rules: dict[str, Any], split_users: int = 3000, seed: int = 7
) -> RoutingReport:
    """Send known users through a router; pinned users must land on the pin, the rest
    split by the weights (within 4 standard errors or 2.5 points), sticky, and the JSON
    body must route the same user the same way as the header."""
    exp = expectation(rules)
    rnd = random.Random(seed)
    problems: list[str] = []
    counts: dict[str, int] = {}
    client = _Client(addr)
    n = 0

    def get(uid: str) -> str:
        nonlocal n
        n += 1
        return client.version("GET", {"X-User-Id": uid}, None)

    def post(uid: str | int) -> str:
        nonlocal n
        n += 1
        headers = {"Content-Type": "application/json"}
        return client.version("POST", headers, json_body(uid))

    try:
        # 1. pins: the whitelist, the uid % 100 < 10 users (incl. one-digit and 0-padded)
        pinned = sorted(exp.whitelist)
        pinned += [str(rnd.randrange(10_000) * 100 + rnd.randrange(10)) for _ in range(200)]
        pinned += [str(d) for d in range(10)] + ["007", "100", "1000001"]
        for uid in pinned:
            if not exp.pinned(uid):
                raise BenchError(f"check: {uid} should be pinned by the rule file but is not")
            got = get(uid)
            if got != exp.pin_to:
                problems.append(f"GET user {uid}: {got}, expected {exp.pin_to} (pin)")
        # 2. the split: random users that no pin holds
        assigned: dict[str, str] = {}
        while len(assigned) < split_users:
            uid = str(rnd.randrange(1, 1_000_001))
            if exp.pinned(uid) or uid in assigned:
                continue
            got = get(uid)
            assigned[uid] = got
            counts[got] = counts.get(got, 0) + 1
        strays = {k: v for k, v in counts.items() if k not in exp.split}
        if strays:
            problems.append(f"split users went to {strays}")
        shares = {k: counts.get(k, 0) / len(assigned) for k in exp.split}
        for version, want in exp.split.items():
            se = (want * (1 - want) / len(assigned)) ** 0.5
            tol = max(0.025, 4 * se)
            if abs(shares[version] - want) > tol:
                problems.append(
                    f"split: {version} got {shares[version]:.1%}, expected {want:.0%} ± {tol:.1%}"
                )
        # 3. stickiness, and the JSON body routing the same user the same way
        sample = rnd.sample(sorted(assigned), 200)
        for uid in sample[:100]:
            got = get(uid)
            if got != assigned[uid]:
                problems.append(f"GET user {uid}: {got} then {assigned[uid]} (not sticky)")
        for i, uid in enumerate(sample[100:]):
            body_uid: str | int = int(uid) if i % 2 else uid  # JSON string and integer
            got = post(body_uid)
            if got != assigned[uid]:
                problems.append(f"POST user {uid} (JSON): {got}, header gave {assigned[uid]}")
        for uid in pinned[:60]:
            got = post(uid)
            if got != exp.pin_to:
                problems.append(f"POST user {uid} (JSON): {got}, expected {exp.pin_to} (pin)")
    except (OSError, http.client.HTTPException) as exc:
        problems.append(f"request failed: {exc!r}")
        shares = {}
    finally:
        client.close()
    if len(problems) > 10:
        problems = [*problems[:10], f"... and {len(problems) - 10} more"]
    return RoutingReport(target, not problems, problems, counts, shares, n)


# ---------------------------------------------------------------------------------------
# wrk


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    error_detail: dict[str, int]
    extra: dict[str, Any] = field(default_factory=dict)


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(
    url: str,
    script: str,
    duration: float,
    connections: int,
    threads: int,
    cpu: int | None,
    env: dict[str, str] | None = None,
    timeout_s: float = 2.0,
) -> WrkResult:
    """Run wrk with one of benchmarks/wrk/*.lua; the script's done() prints a JSON line."""
    cmd = [
        *taskset(cpu),
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        f"--timeout={timeout_s:g}s",
        "-s",
        str(WRK_DIR / script),
        url,
    ]
    run_env = {**os.environ, "GR_WRK_DIR": str(WRK_DIR), **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=run_env, timeout=duration + 60)
    doc = None
    for line in proc.stdout.splitlines():
        if line.startswith("GRBENCH "):
            doc = json.loads(line[len("GRBENCH ") :])
    if proc.returncode != 0 or doc is None:
        raise BenchError(f"wrk failed ({proc.returncode}): {proc.stderr.strip()} {proc.stdout}")
    errs = {k: int(v) for k, v in doc["errors"].items()}
    return WrkResult(
        requests=int(doc["requests"]),
        duration_s=doc["duration_us"] / 1e6,
        rps=doc["requests"] / (doc["duration_us"] / 1e6),
        p50_ms=doc["latency_us"]["p50"] / 1000,
        p99_ms=doc["latency_us"]["p99"] / 1000,
        errors=sum(errs.values()),
        error_detail=errs,
        extra=doc,
    )


@dataclass
class HandshakeResult:
    """New TLS connections made by `openssl s_time -new` clients, each a full handshake
    and one HTTP/1.0 GET. `requests` is the number of connections (as WrkResult's)."""

    requests: int
    duration_s: float
    rps: float
    clients: int
    failed_clients: int


def s_time_available() -> bool:
    return shutil.which("openssl") is not None


def run_handshakes(
    addr: str, path: str, duration: float, clients: int, cpu: int | None
) -> HandshakeResult:
    """`clients` concurrent `openssl s_time -new` processes against addr for `duration`
    seconds: every connection is a full handshake (no session resumption) carrying one
    GET. wrk is not used here: it resumes TLS sessions when it reconnects."""
    cmd = [
        *taskset(cpu),
        "openssl", "s_time", "-connect", addr, "-new",
        "-time", str(max(1, round(duration))), "-www", path,
    ]  # fmt: skip
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(clients)
    ]
    total = failed = 0
    for proc in procs:
        out, _ = proc.communicate(timeout=duration + 60)
        m = re.search(r"^(\d+) connections in [\d.]+ real seconds", out, re.M)
        if proc.returncode != 0 or m is None:
            failed += 1
            continue
        total += int(m.group(1))
    wall = time.monotonic() - t0
    if failed == clients:
        raise BenchError(f"openssl s_time failed against {addr}: {out.strip()[-300:]}")
    return HandshakeResult(total, wall, total / wall, clients, failed)


# ---------------------------------------------------------------------------------------
# machine and versions


def machine_info() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        kib = int(f.readline().split()[1])
        mem = f"{kib / 1024 / 1024:.0f} GiB"
    return {"nproc": str(os.cpu_count()), "cpu": model, "memory": mem}


def versions() -> dict[str, str]:
    import httptools
    import uvloop

    out = {
        "python": sys.version.split()[0],
        "uvloop": str(getattr(uvloop, "__version__", "?")),
        "httptools": httptools.__version__,
    }
    with contextlib.suppress(OSError):
        nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True)
        out["nginx"] = nginx.stderr.strip().rsplit("/", 1)[-1]
    with contextlib.suppress(OSError):
        lua = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "libnginx-mod-http-lua"],
            capture_output=True,
            text=True,
        )
        if lua.returncode == 0:
            out["lua-nginx-module"] = lua.stdout.strip()
    with contextlib.suppress(OSError):
        wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
        m = re.search(r"wrk (\S+)", wrk.stdout + wrk.stderr)
        if m:
            out["wrk"] = m.group(1)
    return out


# ---------------------------------------------------------------------------------------
# CPU time and the docs page


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by the given processes (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's children that have been waited for
    (wrk, once `run_wrk` returns)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def cpu_busy_seconds(cpu: int) -> float:
    """Seconds one CPU spent running processes since boot (user, nice, system, steal),
    from /proc/stat. Interrupt and softirq time is left out: loopback traffic of the
    process being measured lands there and would look like someone else's load."""
    tick = os.sysconf("SC_CLK_TCK")
    with contextlib.suppress(OSError), open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                user, nice, system, _idle, _iowait, _irq, _softirq, steal = (
                    int(x) for x in line.split()[1:9]
                )
                return (user + nice + system + steal) / tick
    return 0.0


def process_tree(pid: int) -> list[int]:
    out = [pid]
    for kid in children(pid):
        out.extend(process_tree(kid))
    return out


DOCS_PAGE = REPO_DIR / "docs" / "benchmarks.md"


def update_docs_block(name: str, text: str, page: Path = DOCS_PAGE) -> None:
    """Replace the text between `<!-- NAME:start -->` and `<!-- NAME:end -->` in the
    benchmarks page (appending the block when it is not there yet); the hand-written
    rest of the page is kept as it is."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.rstrip()}\n{end}"
    old = page.read_text() if page.exists() else "# Benchmarks\n"
    if start in old and end in old:
        head, rest = old.split(start, 1)
        _, tail = rest.split(end, 1)
        new = head + block + tail
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    page.write_text(new)

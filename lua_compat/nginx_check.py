"""Run routing scripts in a real nginx + lua-nginx-module and in lua_compat, side by side.

This is how the migration guarantee is proven (tests/test_lua_nginx.py) and how a team
can check its own scripts before moving (`python -m lua_compat.nginx_check`): every
script runs in a private nginx on 127.0.0.1 (its own -p prefix in a temporary
directory, ephemeral ports) and in `LuaRuntime`; each request is sent to both and the
two *observations* must be equal:

    "value:<v>"        the script finished and the decision variable is <v>
    "nil"              the script finished without setting it
    "exec:@name"       ngx.exec to a named location (or "exec:/uri?args")
    "redirect:302:/x"  ngx.redirect
    "status:403"       ngx.exit(403), output from the script, or an error (500)
    "close"            the connection was closed without an answer (ngx.exit(444))
    "status:400"       nginx refused the request before any script ran

nginx answers through `content_by_lua_block` printing the variable, with a marker
header; named locations print their own name. `$remote_addr` is taken from
`X-Real-IP` (realip module) so requests can come "from" any address.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from lua_compat.ngx import Effect, EffectKind, NgxRequest

__all__ = [
    "NginxLua",
    "ProbeRequest",
    "Response",
    "ScriptSpec",
    "effect_observation",
    "nginx_unavailable",
    "response_observation",
    "running_nginx",
    "send_raw",
]

MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/share/nginx/modules", "/usr/local/nginx/modules")
_MARK = "X-Grayroute-Probe"


def _find_module_dir() -> str | None:
    for d in MODULE_DIRS:
        if os.path.exists(os.path.join(d, "ngx_http_lua_module.so")):
            return d
    return None


def nginx_unavailable() -> str | None:
    """None when nginx with the Lua module can run here, else why not."""
    if shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"):
        return "nginx is not installed (apt-get install nginx libnginx-mod-http-lua)"
    if _find_module_dir() is None:
        return "the nginx Lua module is not installed (apt-get install libnginx-mod-http-lua)"
    return None


def _nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


@dataclass(frozen=True)
class ScriptSpec:
    """One script to run: `phase` rewrite/access/set; `exec_targets` named locations."""

    name: str
    path: str
    phase: str = "rewrite"
    decision: str = "backend"
    variables: tuple[tuple[str, str], ...] = ()
    exec_targets: tuple[str, ...] = ()
    shared_dicts: tuple[tuple[str, int], ...] = ()

    @classmethod
    def from_file(cls, path: str | Path, phase: str = "rewrite", **kw: object) -> ScriptSpec:
        text = Path(path).read_text(encoding="utf-8")
        targets = tuple(sorted(set(re.findall(r"""ngx\.exec\(\s*["'](@[\w.-]+)["']""", text))))
        return cls(name=Path(path).stem, path=str(path), phase=phase, exec_targets=targets, **kw)  # type: ignore[arg-type]


class WireLike(Protocol):
    """A request as bytes (router.explain.WireRequest has this shape)."""

    @property
    def method(self) -> bytes: ...
    @property
    def target(self) -> bytes: ...
    @property
    def headers(self) -> Sequence[tuple[bytes, bytes]]: ...
    @property
    def body(self) -> bytes | None: ...
    @property
    def client_ip(self) -> str: ...


@dataclass(frozen=True)
class ProbeRequest:
    """One request to send to both. Text fields are sent as latin-1 (one byte per
    character): from_bytes() builds one from the bytes themselves."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    client_ip: str = "127.0.0.1"

    @classmethod
    def from_bytes(cls, wire: WireLike) -> ProbeRequest:
        """A request given as bytes (as `grayroute explain` reads a line)."""
        return cls(
            wire.method.decode("latin-1"),
            wire.target.decode("latin-1"),
            tuple((n.decode("latin-1"), v.decode("latin-1")) for n, v in wire.headers),
            wire.body,
            wire.client_ip or "127.0.0.1",
        )

    def raw(self) -> bytes:
        lines = [f"{self.method} {self.target} HTTP/1.1"]
        lines += [f"{n}: {v}" for n, v in self.wire_headers()]
        head = "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n"
        return head + (self.body or b"")

    def wire_headers(self) -> list[tuple[str, str]]:
        """The headers as sent (what both sides see), in order."""
        headers = list(self.headers)
        names = {n.lower() for n, _ in headers}
        if "host" not in names:
            headers.insert(0, ("Host", "test.local"))
        if self.client_ip != "127.0.0.1":
            headers.append(("X-Real-IP", self.client_ip))
        if self.body is not None and "content-length" not in names:
            headers.append(("Content-Length", str(len(self.body))))
        headers.append(("Connection", "close"))
        return headers

    def ngx_request(self, server_port: int = 80) -> NgxRequest:
        return NgxRequest(
            self.method.encode("latin-1"),
            self.target.encode("latin-1"),
            [(n.encode("latin-1"), v.encode("latin-1")) for n, v in self.wire_headers()],
            self.client_ip.encode(),
            self.body,
            server_port=server_port,
            server_name=b"localhost",
        )


@dataclass
class Response:
    status: int | None  # None: closed without an answer
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return None


def send_raw(port: int, data: bytes, timeout: float = 5.0) -> Response:
    """Send one request on a new connection; read the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw:
        return Response(None)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
    response = Response(status, headers, body)
    if (response.header("transfer-encoding") or "").lower() == "chunked":
        response.body = _dechunk(body)
    return response


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out)


def response_observation(response: Response) -> str:
    if response.status is None:
        return "close"
    if response.header(_MARK) is not None:
        return response.body.decode("latin-1")
    if response.status in (301, 302, 303, 307, 308):
        return f"redirect:{response.status}:{response.header('location')}"
    return f"status:{response.status}"


def effect_observation(effect: Effect) -> str:
    """The observation of an Effect, in the same terms as response_observation (bytes as
    latin-1 characters, as they come back from nginx)."""
    if effect.kind == EffectKind.VALUE:
        return "nil" if effect.value is None else f"value:{_latin1(effect.value)}"
    if effect.kind == EffectKind.EXEC:
        target = _latin1(effect.value or "")
        if target.startswith("@"):
            return f"exec:{target}"
        return f"exec:{target}?{_latin1(effect.args or '')}"
    if effect.kind == EffectKind.REDIRECT:
        return f"redirect:{effect.status}:{_latin1(effect.value or '')}"
    if effect.kind == EffectKind.CLOSE:
        return "close"
    return f"status:{effect.status}"


def _latin1(text: str) -> str:
    """Effect text (UTF-8, see ngx.Effect) as the bytes it stands for, one per character."""
    return text.encode("utf-8", "surrogateescape").decode("latin-1")


_PRINT_VALUE = (
    "content_by_lua_block { ngx.header['" + _MARK + "'] = '1' "
    "local v = ngx.var.{var} if v == nil then ngx.print('nil') "
    "else ngx.print('value:', v) end }"
)


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (held together while chosen)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class NginxLua:
    """A private nginx (one worker, no daemon) with one server per script."""

    def __init__(
        self,
        scripts: Sequence[ScriptSpec],
        extra_http: str = "",
        extra_ports: Sequence[str] = (),
    ) -> None:
        """`extra_http` is added to the http block with every `{port:NAME}` replaced by
        the port allocated for NAME (one of `extra_ports`)."""
        self.scripts = list(scripts)
        self.extra_http = extra_http
        self.extra_ports = list(extra_ports)
        self.ports: dict[str, int] = {}
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def _server(self, spec: ScriptSpec, port: int) -> str:
        path = os.path.abspath(spec.path)
        var = spec.decision
        sets = "".join(f'set ${n} "{v}"; ' for n, v in spec.variables)
        if spec.phase == "set":
            handler = f"set_by_lua_file ${var} {path};"
        else:
            sets += f'set ${var} ""; ' if var not in dict(spec.variables) else ""
            handler = f"{spec.phase}_by_lua_file {path};"
        named = "".join(
            f"location {t} {{ content_by_lua_block {{ ngx.header['{_MARK}'] = '1' "
            f"ngx.print('exec:{t}') }} }}\n"
            for t in spec.exec_targets
        )
        return (
            f"server {{ listen 127.0.0.1:{port}; server_name localhost;\n"
            f"  set_real_ip_from 127.0.0.1; real_ip_header X-Real-IP;\n"
            f"  location / {{ {sets}{handler}\n"
            f"    {_PRINT_VALUE.replace('{var}', var)} }}\n"
            f"  location /__exec/ {{ internal; content_by_lua_block {{ "
            f"ngx.header['{_MARK}'] = '1' ngx.print('exec:', ngx.var.uri, '?', "
            f"ngx.var.args or '') }} }}\n"
            f"  {named}}}\n"
        )

    def config(self, prefix: str) -> str:
        mod = _find_module_dir()
        dicts = {n: s for spec in self.scripts for n, s in spec.shared_dicts}
        shared = "".join(f"lua_shared_dict {n} {max(s // 1024, 8)}k;\n" for n, s in dicts.items())
        servers = "".join(self._server(s, self.ports[s.name]) for s in self.scripts)
        extra = self.extra_http
        for name in self.extra_ports:
            extra = extra.replace("{port:" + name + "}", str(self.ports[name]))
        return (
            f"load_module {mod}/ndk_http_module.so;\n"
            f"load_module {mod}/ngx_http_lua_module.so;\n"
            "daemon off; master_process off; worker_processes 1;\n"
            f"error_log {prefix}/logs/error.log warn;\n"
            f"pid {prefix}/logs/nginx.pid;\n"
            "events { worker_connections 256; }\n"
            "http {\n access_log off;\n"
            f" client_body_temp_path {prefix}/tmp/body;\n"
            f" proxy_temp_path {prefix}/tmp/proxy;\n"
            f" fastcgi_temp_path {prefix}/tmp/fastcgi;\n"
            f" uwsgi_temp_path {prefix}/tmp/uwsgi;\n"
            f" scgi_temp_path {prefix}/tmp/scgi;\n"
            f" {shared}{extra}\n{servers}}}\n"
        )

    def start(self, attempts: int = 3) -> None:
        for _ in range(attempts):
            self._dir = tempfile.TemporaryDirectory(prefix="grayroute-nginx-")
            prefix = self._dir.name
            os.makedirs(f"{prefix}/logs")
            os.makedirs(f"{prefix}/tmp")
            names = [s.name for s in self.scripts] + self.extra_ports
            self.ports = dict(zip(names, free_ports(len(names)), strict=True))
            conf = f"{prefix}/nginx.conf"
            Path(conf).write_text(self.config(prefix), encoding="utf-8")
            self._proc = subprocess.Popen(
                [_nginx_binary(), "-p", prefix, "-c", conf],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            if self._wait_ready():
                return
            self.stop()
        raise RuntimeError(f"nginx did not start: {self.error_log()}")

    def _wait_ready(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        pending = set(self.ports.values())
        while pending and time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                return False
            for port in list(pending):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    pending.discard(port)
                except OSError:
                    pass
            if pending:
                time.sleep(0.02)
        return not pending

    def error_log(self) -> str:
        if self._dir is None:
            return ""
        path = Path(self._dir.name) / "logs" / "error.log"
        text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
        if (
            self._proc is not None
            and self._proc.stderr is not None
            and self._proc.poll() is not None
        ):
            text += self._proc.stderr.read().decode("utf-8", "replace")
        return text

    def stop(self) -> None:
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGQUIT)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
            self._proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def request(self, script: str, probe: ProbeRequest) -> Response:
        return send_raw(self.ports[script], probe.raw())


@contextmanager
def running_nginx(
    scripts: Sequence[ScriptSpec], extra_http: str = "", extra_ports: Sequence[str] = ()
) -> Iterator[NginxLua]:
    server = NginxLua(scripts, extra_http, extra_ports)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def compare(
    spec: ScriptSpec, probes: Sequence[ProbeRequest], server: NginxLua
) -> list[tuple[ProbeRequest, str, str]]:
    """Run every probe through nginx and lua_compat; the (probe, nginx, ours) that differ."""
    from lua_compat.runtime import LuaRuntime

    runtime = LuaRuntime()
    for name, size in spec.shared_dicts:
        runtime.declare_shared_dict(name, size)
    script = runtime.compile(
        Path(spec.path).read_text(encoding="utf-8"),
        spec.path,
        phase=spec.phase,
        decision=spec.decision,
        variables=dict(spec.variables),
    )
    port = server.ports[spec.name]
    differ = []
    for probe in probes:
        theirs = response_observation(server.request(spec.name, probe))
        ours = effect_observation(script.run(probe.ngx_request(port)))
        if theirs != ours:
            differ.append((probe, theirs, ours))
    return differ


def main(argv: Sequence[str] | None = None) -> int:
    """python -m lua_compat.nginx_check SCRIPT REQUESTS.jsonl [--phase P] [--var NAME]

    REQUESTS.jsonl is what `grayroute explain` reads: one request per line, {"method":
    "GET", "path": "/x?a=1", "headers": [["X-User-Id", "42"]], "body": "...",
    "client_ip": "10.0.0.1"}, every field optional. Prints every request on which nginx
    and lua_compat decide differently; exit status 1 if there is one, 2 if nginx with the
    Lua module is not available.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m lua_compat.nginx_check")
    parser.add_argument("script")
    parser.add_argument("requests")
    parser.add_argument("--phase", default="rewrite", choices=("rewrite", "access", "set"))
    parser.add_argument("--var", default="backend", help="the variable with the decision")
    parser.add_argument("--shared-dict", action="append", default=[], metavar="NAME:BYTES")
    args = parser.parse_args(argv)
    reason = nginx_unavailable()
    if reason is not None:
        print(reason, file=sys.stderr)
        return 2
    dicts = tuple((d.split(":")[0], int(d.split(":")[1])) for d in args.shared_dict)
    spec = ScriptSpec.from_file(
        args.script, phase=args.phase, decision=args.var, shared_dicts=dicts
    )
    # Lines are read as `grayroute explain` reads them (text as UTF-8, {"base64": ...}
    # for raw bytes), into the request the router's parser would see.
    import orjson

    from router.explain import BadRequestLine, read_request

    probes = []
    with open(args.requests, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                wire = read_request(orjson.loads(line))
            except (ValueError, BadRequestLine) as exc:
                print(f"{args.requests}:{number}: skipped: {exc}", file=sys.stderr)
                continue
            probes.append(ProbeRequest.from_bytes(wire))
    with running_nginx([spec]) as server:
        differ = compare(spec, probes, server)
    for probe, theirs, ours in differ:
        print(f"{probe.method} {probe.target} {list(probe.headers)}")
        print(f"  nginx:      {theirs}\n  lua_compat: {ours}")
    print(f"{len(probes) - len(differ)} of {len(probes)} requests decided the same way")
    return 1 if differ else 0


if __name__ == "__main__":
    import sys

    sys.exit(main())

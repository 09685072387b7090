"""Demo upstreams, the router as a child process, and `grayroute demo` (`make demo`).

Reusable parts (the tests use them too):

    make_upstream_app(name, endpoint)   an aiohttp app that answers every request with
                                        JSON saying who answered and what it received
    start_upstream(name, host, port)    that app on a socket (port 0: any free port)
    RouterProcess.start(rules, ...)     `grayroute serve` as a child process, returned
                                        once its ready line has been read

`run_demo()` starts one demo upstream per endpoint of rules/demo.yaml, the router with
two workers, prints copy-paste curl lines, sends a sample of mixed traffic, prints how it
was split, and then runs until Ctrl-C. Ports can be moved with environment variables:
GRAYROUTE_DEMO_LISTEN (127.0.0.1:8080), GRAYROUTE_DEMO_ADMIN (127.0.0.1:9090),
GRAYROUTE_DEMO_RULES (rules/demo.yaml), GRAYROUTE_DEMO_REQUESTS (2000).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import re
import shlex
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import IO, Any

import orjson
from aiohttp import web

from router.errors import GrayrouteError

PROJECT_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------
# Demo upstream
# ---------------------------------------------------------------------------------------


def make_upstream_app(name: str, endpoint: str) -> web.Application:
    """An upstream that answers every method and path with what it saw, as JSON.

    {"version": name, "endpoint": "host:port", "method", "path", "query", "headers",
     "body_sha256", "body_bytes"}. The body is hashed as it streams in, so bodies of any
    size work (no client_max_size limit applies). A request header `X-Demo-Delay: SECONDS`
    (up to 60) delays the answer, for tests of timeouts and graceful drain.
    """

    async def answer(request: web.Request) -> web.Response:
        delay = _delay(request.headers.get("X-Demo-Delay"))
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_chunked(64 * 1024):
            digest.update(chunk)
            size += len(chunk)
        body = {
            "version": name,
            "endpoint": endpoint,
            "method": request.method,
            "path": request.rel_url.raw_path,
            "query": request.rel_url.raw_query_string,
            "headers": _headers(request),
            "body_sha256": digest.hexdigest(),
            "body_bytes": size,
        }
        if delay:
            await asyncio.sleep(delay)
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


def _delay(value: str | None) -> float:
    try:
        return min(max(float(value), 0.0), 60.0) if value else 0.0
    except ValueError:
        return 0.0


def _headers(request: web.Request) -> dict[str, str]:
    """Received headers by name as sent; a repeated name's values joined with ", "."""
    out: dict[str, str] = {}
    for name, value in request.headers.items():
        key = str(name)
        # aiohttp keeps bytes that are not UTF-8 as surrogates, which JSON cannot carry
        value = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


class DemoUpstream:
    """One running demo upstream; `endpoint` is its "host:port"."""

    def __init__(self, name: str, host: str, port: int, runner: web.AppRunner) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.endpoint = f"{host}:{port}"
        self._runner = runner

    async def close(self) -> None:
        await self._runner.cleanup()


async def start_upstream(name: str, host: str = "127.0.0.1", port: int = 0) -> DemoUpstream:
    """Serve `make_upstream_app` on host:port (0: any free port); raises OSError."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    port = sock.getsockname()[1]
    app = make_upstream_app(name, f"{host}:{port}")
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise
    return DemoUpstream(name, host, port, runner)


# ---------------------------------------------------------------------------------------
# The router as a child process
# ---------------------------------------------------------------------------------------


class RouterStartError(GrayrouteError):
    """`grayroute serve` exited (or went silent) before printing its ready line."""

    def __init__(self, message: str, returncode: int | None) -> None:
        super().__init__(message)
        self.returncode = returncode


class RouterProcess:
    """`grayroute serve` in a child process (its own session, so Ctrl-C is ours to send).

    `ready` is the parsed ready line; `url`, `tls_urls` and `admin_url` are built from it.
    """

    def __init__(self, proc: asyncio.subprocess.Process, ready: dict[str, Any]) -> None:
        self.proc = proc
        self.ready = ready
        self.pid: int = int(ready["pid"])
        self.url = f"http://{ready['listen']}"
        self.tls_urls = [f"https://{address}" for address in ready.get("listen_tls", ())]
        self.admin_url = f"http://{ready['admin']}"

    @classmethod
    async def start(
        cls,
        rules: str | os.PathLike[str],
        *,
        listen: str = "127.0.0.1:0",
        admin: str = "127.0.0.1:0",
        workers: int = 2,
        args: tuple[str, ...] | list[str] = (),
        stderr: IO[Any] | int | None = None,
        timeout: float = 30.0,
        env: dict[str, str] | None = None,
    ) -> RouterProcess:
        """Start the router and wait for its ready line; raises RouterStartError."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "router.cli", "serve", os.fspath(rules),
            "--listen", listen, "--admin", admin, "--workers", str(workers), *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )  # fmt: skip
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout)
        except TimeoutError:
            await _kill(proc)
            raise RouterStartError(f"no ready line within {timeout:.0f} s", None) from None
        if not line:
            rc = await proc.wait()
            raise RouterStartError(f"grayroute serve exited with code {rc}", rc)
        try:
            ready = orjson.loads(line)
        except orjson.JSONDecodeError:
            await _kill(proc)
            raise RouterStartError(f"unexpected first line {line!r}", None) from None
        return cls(proc, ready)

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    async def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (graceful drain) and wait; SIGKILL after `timeout`. The exit code."""
        if self.proc.returncode is None:
            self.signal(signal.SIGTERM)
            try:
                return await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                await _kill(self.proc)
        return await self.proc.wait()


async def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()


# ---------------------------------------------------------------------------------------
# `grayroute demo`
# ---------------------------------------------------------------------------------------


def run_demo() -> int:
    """`make demo`: upstreams + router on rules/demo.yaml, sample traffic, run until Ctrl-C."""
    try:
        return asyncio.run(_demo())
    except KeyboardInterrupt:  # Ctrl-C before the handlers were installed
        return 130


def _find_rules() -> Path:
    given = os.environ.get("GRAYROUTE_DEMO_RULES")
    if given:
        return Path(given)
    for candidate in (Path("rules/demo.yaml"), PROJECT_ROOT / "rules" / "demo.yaml"):
        if candidate.is_file():
            return candidate
    return Path("rules/demo.yaml")


async def _demo() -> int:
    from router.rules import load_snapshot

    rules = _find_rules()
    listen = os.environ.get("GRAYROUTE_DEMO_LISTEN", "127.0.0.1:8080")
    admin = os.environ.get("GRAYROUTE_DEMO_ADMIN", "127.0.0.1:9090")
    total = int(os.environ.get("GRAYROUTE_DEMO_REQUESTS", "2000"))
    snapshot = load_snapshot(str(rules))  # RulesError: the CLI prints every problem

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    upstreams: list[DemoUpstream] = []
    router: RouterProcess | None = None
    try:
        for name, spec in snapshot.upstreams.items():
            for host, port in spec.endpoints:
                try:
                    upstreams.append(await start_upstream(str(name), str(host), int(port)))
                except OSError as exc:
                    reason = exc.strerror or exc
                    print(f"demo: cannot start {name} on {host}:{port}: {reason}", file=sys.stderr)
                    return 1
        started = ", ".join(f"{u.name}@{u.endpoint}" for u in upstreams)
        print(f"demo: {len(upstreams)} demo upstreams up: {started}")
        try:
            router = await RouterProcess.start(rules, listen=listen, admin=admin, workers=2)
        except RouterStartError as exc:
            print(f"demo: the router did not start: {exc}", file=sys.stderr)
            return 1
        ready = router.ready
        print(
            f"demo: router up on {ready['listen']} (2 workers), admin on {ready['admin']}, "
            f"rules {str(ready['rules'])[:12]}"
        )
        print()
        _print_try_it(rules, router)
        if total > 0 and not stop.is_set():
            counts = await _send_sample(router.url, rules, total, stop)
            _print_table(counts)
        print("\ndemo: running; press Ctrl-C to stop.", flush=True)
        await stop.wait()
        print("\ndemo: stopping ...", flush=True)
        return 0
    finally:
        if router is not None:
            await router.stop()
        for upstream in upstreams:
            await upstream.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _demo_inputs(rules: Path) -> tuple[str, str, str]:
    """(user-ID header, user-ID JSON path, a path the first route matches) for examples.

    Read from the file's `user_id` list and its first route's `match.path_prefix`, so the
    printed curl lines keep working when demo.yaml changes; fallbacks when absent.
    """
    import yaml

    header, json_path, path = "X-User-Id", "user.id", "/"
    try:
        data = yaml.safe_load(rules.read_text())
        sources = data.get("user_id") or []
        routes = data.get("routes") or []
        prefix = ((routes[0] or {}).get("match") or {}).get("path_prefix") if routes else None
    except (OSError, yaml.YAMLError, AttributeError, TypeError):
        sources, prefix = [], None
    headers = [s["header"] for s in sources if isinstance(s, dict) and "header" in s]
    paths = [s["json"] for s in sources if isinstance(s, dict) and "json" in s]
    if isinstance(prefix, str) and prefix.startswith("/"):
        path = prefix
    return (
        str(headers[0]) if headers else header,
        str(paths[0]) if paths else json_path,
        path,
    )


def json_body_for(path: str, value: str) -> Any:
    """A JSON document with `value` at a dotted path such as user.id or items[0].id."""
    steps: list[str | int] = []
    for part in path.split("."):
        match = re.fullmatch(r"([^\[\]]*)((?:\[\d+\])*)", part)
        if match is None:
            steps.append(part)
            continue
        if match.group(1):
            steps.append(match.group(1))
        steps.extend(int(i) for i in re.findall(r"\[(\d+)\]", match.group(2)))
    doc: Any = value
    for step in reversed(steps):
        doc = [{} for _ in range(step)] + [doc] if isinstance(step, int) else {step: doc}
    return doc


def _print_try_it(rules: Path, router: RouterProcess) -> None:
    header, json_path, path = _demo_inputs(rules)
    body = orjson.dumps(json_body_for(json_path, "20007")).decode()
    url = router.url + path
    print("Try it:")
    print(f"  # a user named in a header\n  curl -s {url} -H '{header}: 10086'")
    print(f"  # a user in a JSON body ({json_path})")
    print(f"  curl -s {url} -H 'Content-Type: application/json' -d {shlex.quote(body)}")
    print(f"  # no user ID: split by weight at random\n  curl -s {url}")
    admin = router.admin_url
    print(f"  # metrics and the rules in force\n  curl -s {admin}/metrics | grep grayroute_")
    print(f"  curl -s {admin}/rules")
    print(f"  # reload after editing {rules}: kill -HUP {router.pid}")
    print(flush=True)


async def _send_sample(url: str, rules: Path, total: int, stop: asyncio.Event) -> Counter[str]:
    """`total` requests, a third each by header user, JSON-body user and anonymous."""
    import httpx

    header, json_path, path = _demo_inputs(rules)
    base = url + path.rstrip("/")
    rng = random.Random(7)
    counts: Counter[str] = Counter()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        user = str(rng.randrange(1, 1_000_000))
        kind = i % 3
        try:
            if kind == 0:
                resp = await client.get(f"{base}/{i}", headers={header: user})
            elif kind == 1:
                resp = await client.post(f"{base}/{i}", json=json_body_for(json_path, user))
            else:
                resp = await client.get(f"{base}/{i}")
        except httpx.HTTPError as exc:
            counts[f"error: {type(exc).__name__}"] += 1
            return
        if resp.status_code != 200:
            counts[f"status {resp.status_code}"] += 1
            return
        try:
            counts[str(resp.json()["version"])] += 1
        except (ValueError, KeyError, TypeError):
            counts["not a demo answer"] += 1

    async def runner(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await one(client, i)

    print(
        f"Sending {total} requests: a third by header user, a third by JSON-body user, "
        "a third anonymous ...",
        flush=True,
    )
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(limits=limits, timeout=10.0) as client:
        await asyncio.gather(*(runner(client) for _ in range(32)))
    return counts


def _print_table(counts: Counter[str]) -> None:
    total = sum(counts.values()) or 1
    width = max([len("version"), *(len(k) for k in counts)])
    print(f"\n  {'version':<{width}}  {'requests':>8}  {'share':>6}")
    for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {key:<{width}}  {n:>8}  {100 * n / total:>5.1f}%")
    print(flush=True)

"""`grayroute rollout status|pause|resume|promote|abort|retry [ROUTE] --admin HOST:PORT
[--token-file F] [--json]`: the admin API's rollouts, from a terminal.

`status` without ROUTE lists every rollout; with it, one in detail with its recent
intervals. An action prints the rollout after it. Exit codes: 0 done, 1 refused (the
reason is printed) or the router cannot be reached, 2 bad usage. The token comes from
--token-file, else $GRAYROUTE_ADMIN_TOKEN.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import IO, Any
from urllib.parse import quote

import httpx
import orjson

from router.config import parse_hostport
from router.errors import ConfigError
from router.history import actor
from router.rollout.controller import ACTIONS

__all__ = ["format_rollout", "run_rollout"]

COMMANDS = ("status", *ACTIONS)


def _token(token_file: str) -> str:
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                return f.read().strip()
        except OSError as exc:
            raise ConfigError(f"--token-file: {token_file}: {exc.strerror or exc}") from exc
    return os.environ.get("GRAYROUTE_ADMIN_TOKEN", "")


def run_rollout(
    command: str,
    route: str | None,
    admin: str,
    token_file: str,
    as_json: bool,
    out: IO[str],
    err: IO[str],
    timeout: float = 10.0,
) -> int:
    if command not in COMMANDS:
        print(
            f"grayroute rollout: unknown command {command!r}: one of {', '.join(COMMANDS)}",
            file=err,
        )
        return 2
    if command != "status" and not route:
        print(
            f"grayroute rollout {command}: which route? (grayroute rollout {command} ROUTE)",
            file=err,
        )
        return 2
    host, port = parse_hostport(admin, "--admin")
    base = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    headers = {"Accept": "application/json"}
    token = _token(token_file)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    path = "/rollouts" if route is None else f"/rollouts/{quote(route, safe='')}"
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=timeout) as client:
            if command == "status":
                response = client.get(path)
            else:
                me = actor()
                by = {"by": f"{me['user']}@{me['host']}"}
                response = client.post(f"{path}/{command}", json=by)
    except httpx.HTTPError as exc:
        print(f"grayroute rollout: cannot reach the admin address {admin}: {exc}", file=err)
        return 1
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code != 200 or not isinstance(body, dict):
        detail = body.get("detail") if isinstance(body, dict) else response.text.strip()
        print(f"grayroute rollout {command}: {response.status_code}: {detail}", file=err)
        if as_json and isinstance(body, dict):
            out.write(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 1
    if as_json:
        out.write(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    if route is None:
        rollouts = body.get("rollouts") or []
        if not rollouts:
            print("no rollouts in the rules in force", file=out)
        for rollout in rollouts:
            print(format_rollout(rollout, detail=False), file=out)
        return 0
    print(format_rollout(body, detail=True), file=out)
    return 0


def _pct(value: Any) -> str:
    return "-" if value is None else f"{float(value):g}%"


def _rate(value: Any) -> str:
    return "-" if value is None else f"{float(value) * 100:.2f}%"


def _ms(value: Any) -> str:
    return "-" if value is None else f"{float(value) * 1000:.1f}ms"


def format_rollout(rollout: Mapping[str, Any], detail: bool) -> str:
    """A rollout in a few lines of text (detail: with its recent intervals)."""
    steps = rollout.get("steps")
    step = rollout.get("step")
    where = (
        "guard (weights follow the replicas)"
        if steps is None
        else f"step {step} of {len(steps) - 1} ({', '.join(_pct(s) for s in steps)})"
    )
    leader = rollout.get("leader")
    judged = f"; judged by {leader}" if leader else ""
    lines = [
        f"{rollout.get('route')}: {rollout.get('phase')} since {rollout.get('since')}{judged}",
        f"  canary {rollout.get('canary')} at {_pct(rollout.get('weight'))} against stable "
        f"{rollout.get('stable')}; {where}; FAIL {rollout.get('failures')} of "
        f"{rollout.get('max_failures')} in this step",
        f"  {rollout.get('reason')}",
    ]
    analysis = rollout.get("analysis") or []
    for interval in analysis[: 10 if detail else 1]:
        lines.append(f"  {interval.get('at')}  {interval.get('verdict')}  {_gates(interval)}")
    return "\n".join(lines)


def _gates(interval: Mapping[str, Any]) -> str:
    gates = interval.get("gates") or {}
    if not gates:
        return str(interval.get("reason", ""))
    parts = []
    for name, gate in gates.items():
        show = _ms if name == "latency" else _rate
        parts.append(
            f"{name} {gate.get('verdict')}: canary {show(gate.get('canary'))} "
            f"(n={gate.get('canary_requests')}) stable {show(gate.get('stable'))} "
            f"(n={gate.get('stable_requests')}) threshold {show(gate.get('threshold'))}"
        )
    return "; ".join(parts)

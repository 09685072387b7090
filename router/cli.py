"""`grayroute` command line: parse arguments, call the library, turn errors into exit codes.

grayroute serve RULES|etcd://HOST:PORT[,...]/KEY --listen HOST:PORT
                      [--listen-tls HOST:PORT --tls-cert F --tls-key F]
                      --admin HOST:PORT --workers N
grayroute push RULES etcd://HOST:PORT[,...]/KEY [--expect-revision N] [--strict]
grayroute demo
grayroute check RULES [--strict]
grayroute explain RULES [REQUESTS.jsonl] [--why]
grayroute diff OLD NEW (--requests FILE | --access-log FILE) [--json] [--fail-on-move]
grayroute history RULES|etcd://.../KEY [--state-dir DIR] [--json]
grayroute rollback RULES|etcd://.../KEY [--to HASH|REVISION] [--state-dir DIR] [--print]
grayroute rollout status|pause|resume|promote|abort|retry [ROUTE] --admin HOST:PORT
                  [--token-file F] [--json]
grayroute import-nginx NGINX.CONF [-o RULES] [--scripts-dir DIR] [--partial]
"""

from __future__ import annotations

import argparse
import os
import sys

from router.config import Settings
from router.errors import ConfigError, RulesError
from router.fleet import is_etcd_url


def _add_etcd_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("etcd (rules at etcd://HOST:PORT[,HOST:PORT...]/KEY)")
    group.add_argument("--etcd-cacert", default="", metavar="FILE", help="CA of etcd's TLS")
    group.add_argument("--etcd-cert", default="", metavar="FILE", help="client certificate")
    group.add_argument("--etcd-key", default="", metavar="FILE", help="its private key")
    group.add_argument(
        "--etcd-user",
        default=os.environ.get("GRAYROUTE_ETCD_USER", ""),
        help="etcd user (password: $GRAYROUTE_ETCD_PASSWORD; default: $GRAYROUTE_ETCD_USER)",
    )


def _etcd_settings(args: argparse.Namespace, **more: object) -> Settings:
    return Settings(
        etcd_cacert=args.etcd_cacert,
        etcd_cert=args.etcd_cert,
        etcd_key=args.etcd_key,
        etcd_user=args.etcd_user,
        # Never a flag: a password on the command line shows in `ps`.
        etcd_password=os.environ.get("GRAYROUTE_ETCD_PASSWORD", ""),
        **more,  # type: ignore[arg-type]
    )


class _VersionAction(argparse.Action):
    """--version: the release and which build of the hot path runs (looked up only when
    asked: every other command starts without reading package metadata)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        from importlib.metadata import PackageNotFoundError, version

        from router.native import build_info

        try:
            release = version("grayroute")
        except PackageNotFoundError:
            release = "(not installed)"
        print(f"grayroute {release} ({build_info()})")
        parser.exit()


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grayroute", description="Gray-release (canary) HTTP router."
    )
    parser.add_argument(
        "--version",
        action=_VersionAction,
        nargs=0,
        help="print the release and the build (compiled, or pure Python and why)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the router on a rule file")
    serve.add_argument("rules", help="rule file (YAML), or etcd://HOST:PORT[,...]/KEY")
    defaults = Settings()
    serve.add_argument("--listen", default=defaults.listen, help="HOST:PORT for client traffic")
    serve.add_argument(
        "--listen-tls",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="HOST:PORT for client traffic over TLS (repeatable); needs --tls-cert/--tls-key",
    )
    serve.add_argument(
        "--tls-cert",
        action="append",
        default=[],
        metavar="FILE",
        help="PEM certificate (and its chain), once per certificate; the first is the default",
    )
    serve.add_argument(
        "--tls-key",
        action="append",
        default=[],
        metavar="FILE",
        help="PEM private key of the --tls-cert in the same position",
    )
    serve.add_argument("--admin", default=defaults.admin, help="HOST:PORT for metrics and admin")
    serve.add_argument("--workers", type=int, default=defaults.workers, help="worker processes")
    serve.add_argument("--connect-timeout", type=float, default=defaults.connect_timeout)
    serve.add_argument("--read-timeout", type=float, default=defaults.read_timeout)
    serve.add_argument(
        "--fail-timeout",
        type=float,
        default=defaults.fail_timeout,
        help="seconds an endpoint whose connection failed is skipped",
    )
    serve.add_argument("--keepalive-timeout", type=float, default=defaults.keepalive_timeout)
    serve.add_argument("--header-timeout", type=float, default=defaults.header_timeout)
    serve.add_argument("--drain-timeout", type=float, default=defaults.drain_timeout)
    serve.add_argument("--max-header-bytes", type=int, default=defaults.max_header_bytes)
    serve.add_argument("--max-header-count", type=int, default=defaults.max_header_count)
    serve.add_argument("--max-target-bytes", type=int, default=defaults.max_target_bytes)
    serve.add_argument(
        "--max-body-bytes", type=int, default=defaults.max_body_bytes, help="0 for no limit"
    )
    serve.add_argument("--max-connections", type=int, default=defaults.max_connections)
    serve.add_argument(
        "--max-tunnels",
        type=int,
        default=defaults.max_tunnels,
        help="WebSocket tunnels open at once per worker; 0 declines every upgrade",
    )
    serve.add_argument(
        "--tunnel-idle-timeout",
        type=float,
        default=defaults.tunnel_idle_timeout,
        help="seconds a WebSocket tunnel may carry no byte either way before it is closed",
    )
    serve.add_argument(
        "--trusted-proxy",
        action="append",
        default=[],
        dest="trusted_proxies",
        help="address or CIDR whose X-Forwarded-For is believed (repeatable)",
    )
    serve.add_argument(
        "--state-dir",
        default="",
        help="rules history and audit log (default: .grayroute-state/ next to RULES)",
    )
    serve.add_argument(
        "--audit-max-bytes",
        type=_size,
        default=defaults.audit_max_bytes,
        metavar="SIZE",
        help="the audit log's size bound, e.g. 16MiB; 0: none",
    )
    serve.add_argument(
        "--history-max-age",
        type=_age,
        default=defaults.history_max_age,
        metavar="AGE",
        help="drop audit entries and kept rules versions older than this, e.g. 90d; 0: never",
    )
    serve.add_argument(
        "--history-max-versions",
        type=int,
        default=defaults.history_max_versions,
        metavar="N",
        help="kept rules versions at most (never the one in force or the previous); 0: all",
    )
    serve.add_argument(
        "--access-log", default="", help="JSON-lines access log file (default: none)"
    )
    serve.add_argument(
        "--watch-interval",
        type=float,
        default=defaults.watch_interval,
        help="seconds between checks of RULES for changes; 0: reload only on SIGHUP",
    )
    serve.add_argument(
        "--admin-token",
        # From the environment by default: a token on the command line shows in `ps`.
        default=os.environ.get("GRAYROUTE_ADMIN_TOKEN", ""),
        help="bearer token for the admin address (default: $GRAYROUTE_ADMIN_TOKEN)",
    )
    serve.add_argument(
        "--resolver",
        action="append",
        default=[],
        dest="resolvers",
        metavar="HOST:PORT",
        help="DNS server for `endpoints: {dns: ...}` (repeatable; default: /etc/resolv.conf's)",
    )
    serve.add_argument("--log-level", default=defaults.log_level)
    _add_etcd_flags(serve)
    fleet = serve.add_argument_group("a fleet's rollouts (rules at etcd://...)")
    fleet.add_argument(
        "--router-id",
        default="",
        metavar="ID",
        help="this router's id in the fleet (default: its --listen address; the host name "
        "for 0.0.0.0)",
    )
    fleet.add_argument(
        "--leader-ttl",
        type=int,
        default=defaults.leader_ttl,
        metavar="SECONDS",
        help="lease of the router that judges the fleet's rollouts: a dead one is replaced "
        f"within it (1-5, default {defaults.leader_ttl})",
    )

    push = sub.add_parser("push", help="validate a rule file and write it to an etcd key")
    push.add_argument("rules", help="rule file (YAML)")
    push.add_argument("url", help="etcd://HOST:PORT[,HOST:PORT...]/KEY")
    push.add_argument(
        "--expect-revision",
        type=int,
        default=None,
        metavar="N",
        help="write only if the key is still at revision N (default: as read just before)",
    )
    push.add_argument("--strict", action="store_true", help="warnings refuse the push too")
    _add_etcd_flags(push)
    _add_edge_flags(serve, defaults)

    sub.add_parser("demo", help="start demo upstreams and the router on rules/demo.yaml")

    check = sub.add_parser("check", help="validate a rule file")
    check.add_argument("rules")
    check.add_argument("--strict", action="store_true", help="warnings fail too")

    explain = sub.add_parser("explain", help="which upstream would each request get, and why")
    explain.add_argument("rules")
    explain.add_argument("requests", nargs="?", default="-", help="JSON lines file (default stdin)")
    explain.add_argument(
        "--why", action="store_true", help="show what each user-ID source gave, found or not"
    )

    diff = sub.add_parser("diff", help="which users would move between upstreams, OLD -> NEW")
    diff.add_argument("old")
    diff.add_argument("new")
    sample = diff.add_mutually_exclusive_group(required=True)
    sample.add_argument("--requests", help="JSON lines as `explain` reads them (- for stdin)")
    sample.add_argument("--access-log", help="the router's JSON-lines access log")
    diff.add_argument("--json", action="store_true", help="one JSON document instead of tables")
    diff.add_argument("--fail-on-move", action="store_true", help="exit 1 when anyone moves")
    diff.add_argument(
        "--fail-on-broken-promise",
        action="store_true",
        help="exit 1 when a user moves between two upstreams whose weights did not change",
    )

    history = sub.add_parser("history", help="rules versions in force, and the audit log")
    history.add_argument("rules")
    history.add_argument("--state-dir", default="", help="as given to `grayroute serve`")
    history.add_argument("--json", action="store_true")
    history.add_argument(
        "--limit", type=int, default=50, help="etcd: revisions to show at most (default 50)"
    )
    _add_etcd_flags(history)

    rollout = sub.add_parser(
        "rollout", help="progressive rollouts of a running router: status, or act on one"
    )
    rollout.add_argument(
        "action", choices=("status", "pause", "resume", "promote", "abort", "retry")
    )
    rollout.add_argument("route", nargs="?", default=None, help="the route (all for status)")
    rollout.add_argument(
        "--admin", default=defaults.admin, help="the router's admin HOST:PORT"
    )
    rollout.add_argument(
        "--token-file",
        default="",
        help="file holding the admin token (default: $GRAYROUTE_ADMIN_TOKEN)",
    )
    rollout.add_argument("--json", action="store_true", help="the admin API's JSON")

    rollback = sub.add_parser("rollback", help="put the previous rules version back in force")
    rollback.add_argument("rules")
    rollback.add_argument(
        "--to",
        default="",
        metavar="HASH",
        help="a kept version (a prefix of its hash); for etcd, a revision number too",
    )
    rollback.add_argument("--state-dir", default="", help="as given to `grayroute serve`")
    rollback.add_argument(
        "--print", action="store_true", help="write the version to stdout, change nothing"
    )
    rollback.add_argument(
        "--wait", type=float, default=10.0, help="seconds to wait for the router to confirm"
    )
    _add_etcd_flags(rollback)

    imp = sub.add_parser(
        "import-nginx", help="write a rule file from nginx.conf; list what was not translated"
    )
    imp.add_argument("nginx_conf")
    imp.add_argument("-o", "--output", default="-", help="rule file to write (default stdout)")
    imp.add_argument(
        "--scripts-dir", default="scripts", help="where *_by_lua_block code is written"
    )
    imp.add_argument(
        "--partial",
        action="store_true",
        help="exit 0 even when directives that route requests were not translated",
    )
    return parser


def _size(text: str) -> int:
    """A flag's size: 16MiB, 10MB, 512 (bytes)."""
    from decimal import InvalidOperation

    from router.rules.validate import parse_size

    try:
        return parse_size(text)
    except (ValueError, InvalidOperation) as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 16MiB)") from exc


def _age(text: str) -> float:
    """A flag's age: 90d, 12h, 30m, 45s, or a number of seconds."""
    from router.rules.validate import parse_duration

    try:
        if text.strip().lower().endswith("d"):
            return float(text.strip()[:-1]) * 86400
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age (e.g. 90d or 12h)") from exc


def serve_settings(args: argparse.Namespace) -> Settings:
    """The settings of `grayroute serve` from its parsed arguments (not yet validated)."""
    return _etcd_settings(
        args,
        rules_path=args.rules,
        listen=args.listen,
        listen_tls=args.listen_tls,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        admin=args.admin,
        workers=args.workers,
        connect_timeout=args.connect_timeout,
        read_timeout=args.read_timeout,
        fail_timeout=args.fail_timeout,
        keepalive_timeout=args.keepalive_timeout,
        header_timeout=args.header_timeout,
        drain_timeout=args.drain_timeout,
        max_header_bytes=args.max_header_bytes,
        max_header_count=args.max_header_count,
        max_target_bytes=args.max_target_bytes,
        max_body_bytes=args.max_body_bytes,
        max_connections=args.max_connections,
        max_tunnels=args.max_tunnels,
        tunnel_idle_timeout=args.tunnel_idle_timeout,
        trusted_proxies=args.trusted_proxies,
        state_dir=args.state_dir,
        audit_max_bytes=args.audit_max_bytes,
        history_max_age=args.history_max_age,
        history_max_versions=args.history_max_versions,
        access_log=args.access_log,
        watch_interval=args.watch_interval,
        admin_token=args.admin_token,
        resolvers=args.resolvers,
        log_level=args.log_level,
        router_id=args.router_id,
        leader_ttl=args.leader_ttl,
        **{name: getattr(args, name) for name, _, _ in _EDGE_FLAGS},
    )


def parse_serve(argv: list[str]) -> Settings:
    """`grayroute serve` arguments as the command line takes them, to settings, validated
    (deploy/kubernetes/ is checked against this); SystemExit or ConfigError when wrong."""
    args = _build_parser().parse_args(argv)
    if args.command != "serve":
        raise ConfigError(f"not a serve command: {argv[:1]}")
    settings = serve_settings(args)
    settings.validate()
    return settings


# HTTP defaults at the edge, each nginx's (docs/operations.md, "HTTP at the edge").
_EDGE_FLAGS: tuple[tuple[str, type | None, str], ...] = (
    ("keepalive_requests", int, "requests per client connection, then it closes (0: no limit)"),
    ("keepalive_time", float, "seconds a client connection may serve requests (0: no limit)"),
    ("max_response_header_bytes", int, "an upstream response header section over this is 502"),
    ("request_buffer_bytes", int, "request body bytes held before the upstream is chosen (0: off)"),
    ("normalize_paths", None, "routes match the normalised path (--no-normalize-paths: as sent)"),
    ("underscores_in_headers", None, "keep header fields named with '_' (dropped otherwise)"),
    ("allow_trace", None, "forward TRACE requests (405 by default)"),
    ("gc_tuning", None, "freeze start-up objects out of the garbage collector (on by default)"),
)


def _add_edge_flags(serve: argparse.ArgumentParser, defaults: Settings) -> None:
    for name, kind, help_ in _EDGE_FLAGS:
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        if kind is None:
            serve.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_
            )
        else:
            serve.add_argument(flag, type=kind, default=default, help=help_)


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            from router.supervisor import run_serve

            settings = serve_settings(args)
            settings.validate()
            return run_serve(settings)
        if args.command == "demo":
            from router.demo import run_demo

            return run_demo()
        if args.command == "check":
            from router.rules.check import run_check

            return run_check(args.rules, strict=args.strict, out=sys.stdout)
        if args.command == "explain":
            from router.explain import run_explain

            return run_explain(args.rules, args.requests, out=sys.stdout.buffer, why=args.why)
        if args.command == "diff":
            from router.diff import run_diff

            return run_diff(
                args.old,
                args.new,
                requests=args.requests,
                access_log=args.access_log,
                as_json=args.json,
                fail_on_move=args.fail_on_move,
                fail_on_broken_promise=args.fail_on_broken_promise,
                out=sys.stdout,
            )
        if args.command == "push":
            from router.fleet.revisions import run_push

            settings = _etcd_settings(args, rules_path=args.url)
            settings.validate()
            return run_push(
                args.rules,
                args.url,
                settings,
                expect_revision=args.expect_revision,
                strict=args.strict,
            )
        if args.command in ("history", "rollback") and is_etcd_url(args.rules):
            from router.fleet.revisions import run_etcd_history, run_etcd_rollback

            settings = _etcd_settings(args, rules_path=args.rules)
            settings.validate()
            if args.command == "history":
                return run_etcd_history(args.rules, settings, as_json=args.json, limit=args.limit)
            return run_etcd_rollback(args.rules, settings, to=args.to, print_only=args.print)
        if args.command == "history":
            from router.history import run_history

            return run_history(args.rules, args.state_dir, args.json, out=sys.stdout)
        if args.command == "rollout":
            from router.rollout.client import run_rollout

            return run_rollout(
                args.action,
                args.route,
                args.admin,
                args.token_file,
                args.json,
                out=sys.stdout,
                err=sys.stderr,
            )
        if args.command == "rollback":
            from router.history import run_rollback

            return run_rollback(
                args.rules, args.to, args.state_dir, print_only=args.print, wait=args.wait
            )
        if args.command == "import-nginx":
            from lua_compat.nginx_import import run_import

            return run_import(args.nginx_conf, args.output, args.scripts_dir, args.partial)
    except ConfigError as exc:
        print(f"grayroute: {exc}", file=sys.stderr)
        return 1
    except RulesError as exc:
        print(exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""`grayroute import-nginx`: nginx.conf (upstream, split_clients, map, Lua handlers,
proxy_pass) -> a rule file, with a plain list of what was not translated."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from lua_compat.nginx_import import NginxSyntaxError, import_nginx, parse_nginx

CONF = """
user www-data;
events { worker_connections 1024; }
http {
    include /nonexistent/mime.types;
    lua_shared_dict gray 10m;
    upstream orders_v1 { server 10.0.0.1:8080; server 10.0.0.2:8080 weight=2; keepalive 32; }
    upstream orders_v2 { server 10.0.1.1:8080; }
    upstream orders_canary { server canary.internal; }

    split_clients "${remote_addr}AAA" $variant {
        0.5%  canary;
        2.0%  v2;
        *     v1;
    }
    map $variant $orders_backend {
        default orders_v1;
        canary  orders_canary;
        v2      orders_v2;
    }
    split_clients "${cookie_uid}" $pay_backend {
        10% orders_v2;
        90% orders_v1;
    }
    map $cookie_gray $search_backend {
        default orders_v1;
        "1"     orders_v2;
        ~^beta  orders_canary;
    }
    include conf.d/*.conf;
    server {
        listen 80;
        server_name api.example.com;
        location /orders { proxy_pass http://$orders_backend; proxy_set_header Host $host; }
        location /pay { proxy_pass http://$pay_backend; }
        location /search { proxy_pass http://$search_backend; }
        location ~ \\.php$ { fastcgi_pass unix:/run/php.sock; }
        location /gray {
            set $backend "";
            set $uid_seen "";
            rewrite_by_lua_file lua/gray.lua;
            proxy_pass http://$backend;
        }
        location /setby {
            set_by_lua_file $backend lua/pick.lua;
            proxy_pass http://$backend;
        }
        location /exec {
            access_by_lua_block {
                if ngx.var.http_x_user_id == "1" then
                    return ngx.exec("@v2")  -- a comment with } brace
                end
                local s = "}"
            }
            proxy_pass http://orders_v1;
        }
        location @v2 { proxy_pass http://orders_v2; }
        location /legacy { proxy_pass http://10.9.9.9:9000/old/; limit_req zone=one; }
    }
}
"""

EXTRA = """
server {
    listen 8080;
    server_name *.example.org other.example.org;
    location / { proxy_pass http://orders_v1; }
}
"""


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "extra.conf").write_text(EXTRA)
    (tmp_path / "lua").mkdir()
    (tmp_path / "lua" / "gray.lua").write_text('ngx.var.backend = "orders_v2"\n')
    (tmp_path / "lua" / "pick.lua").write_text('if x then ngx.exec("@v2") end return "orders_v1"\n')
    path = tmp_path / "nginx.conf"
    path.write_text(CONF)
    return path


def routes_by_name(text: str) -> dict[str, dict[str, object]]:
    data = yaml.safe_load(text)
    return {r["name"]: r for r in data["routes"]}


def test_upstreams_and_shared_dicts(conf: Path) -> None:
    data = yaml.safe_load(import_nginx(str(conf)).yaml)
    assert data["format"] == 1
    assert data["upstreams"]["orders_v1"]["endpoints"] == ["10.0.0.1:8080", "10.0.0.2:8080"]
    assert data["upstreams"]["orders_canary"]["endpoints"] == ["canary.internal:80"]
    assert data["upstreams"]["10.9.9.9-9000"]["endpoints"] == ["10.9.9.9:9000"]
    assert data["lua_shared_dicts"] == {"gray": "10MiB"}


def test_split_clients_through_a_map(conf: Path) -> None:
    route = routes_by_name(import_nginx(str(conf)).yaml)["api.example.com-orders"]
    assert route["match"] == {"hosts": ["api.example.com"], "path_prefix": "/orders"}
    assert route["split_clients"] == {
        "key": "${remote_addr}AAA",
        "buckets": [{"0.5%": "orders_canary"}, {"2.0%": "orders_v2"}, {"*": "orders_v1"}],
    }


def test_split_clients_naming_upstreams_directly(conf: Path) -> None:
    route = routes_by_name(import_nginx(str(conf)).yaml)["api.example.com-pay"]
    assert route["split_clients"] == {
        "key": "${cookie_uid}",
        "buckets": [{"10%": "orders_v2"}, {"90%": "orders_v1"}],
    }


def test_map_on_a_cookie_becomes_pins(conf: Path) -> None:
    route = routes_by_name(import_nginx(str(conf)).yaml)["api.example.com-search"]
    assert route["user_id"] == [{"cookie": "gray"}]
    assert route["pins"] == [
        {"to": "orders_v2", "users": ["1"]},
        {"to": "orders_canary", "user_pattern": "beta(?s:.*)"},  # nginx searches ~^beta
    ]
    assert route["to"] == "orders_v1"


def test_lua_handlers(conf: Path, tmp_path: Path) -> None:
    result = import_nginx(str(conf), scripts_dir="scripts")
    routes = routes_by_name(result.yaml)
    assert routes["api.example.com-gray"]["lua"] == {
        "file": "lua/gray.lua",
        "variables": {"uid_seen": ""},
    }
    assert routes["api.example.com-setby"]["lua"] == {
        "file": "lua/pick.lua",
        "phase": "set",
        "map": {"@v2": "orders_v2"},
    }
    assert routes["api.example.com-exec"]["lua"] == {
        "file": "scripts/api.example.com-exec-access.lua",
        "phase": "access",
        "map": {"@v2": "orders_v2"},
        "default": "orders_v1",
    }
    code = result.scripts["scripts/api.example.com-exec-access.lua"]
    assert code.startswith('if ngx.var.http_x_user_id == "1" then\n')
    assert 'local s = "}"' in code


def test_inline_lua_without_a_scripts_dir_is_reported(conf: Path) -> None:
    result = import_nginx(str(conf))
    assert "api.example.com-exec" not in routes_by_name(result.yaml)
    assert any("--scripts-dir" in n.why for n in result.untranslated)


def test_what_is_not_translated_is_listed_with_its_place(conf: Path) -> None:
    result = import_nginx(str(conf))
    report = result.report()
    notes = {(Path(n.file).name, n.text.split(" ")[0]) for n in result.untranslated}
    assert ("nginx.conf", "location") in notes  # the regex location with fastcgi_pass
    assert ("nginx.conf", "fastcgi_pass") in notes
    assert ("nginx.conf", "limit_req") in notes
    assert ("nginx.conf", "server") in notes  # weight=2
    assert ("nginx.conf", "proxy_pass") not in notes  # the /old/ URI part: prefix_rewrite
    assert ("extra.conf", "server_name") not in notes  # *.example.org: a wildcard host
    assert "location ~ \\.php$" in report
    assert "not translated" in report
    ignored = {n.text.split(" ")[0] for n in result.ignored}
    assert {"proxy_set_header", "listen", "keepalive"} <= ignored


def test_included_files_are_followed(conf: Path) -> None:
    result = import_nginx(str(conf))
    routes = routes_by_name(result.yaml)
    # The included server comes first, so it is nginx's default server: its names and
    # every unknown host go to its routes, written last without a host condition.
    assert routes["other.example.org"] == {"name": "other.example.org", "to": "orders_v1"}
    assert list(routes)[-1] == "other.example.org"
    assert any("listen on different ports" in n.why for n in result.differences)


def test_split_clients_nginx_would_refuse(tmp_path: Path) -> None:
    path = tmp_path / "nginx.conf"
    path.write_text(
        textwrap.dedent("""
        http {
          upstream a { server 127.0.0.1:1; }
          split_clients "$arg_x" $v { 60% a; 50% a; }
          server { location / { proxy_pass http://$v; } }
        }
    """)
    )
    result = import_nginx(str(path))
    assert any("percent total is greater than 100%" in n.why for n in result.untranslated)


def test_tokenizer() -> None:
    ds = parse_nginx("a \"b c\" 'd\\'e' f\\;g ${x}y; # comment\nblock { inner 1; }\n")
    assert ds[0].name == "a"
    assert ds[0].args == ["b c", "d'e", "f\\;g", "${x}y"]  # nginx keeps "\\" before ";"
    assert ds[1].name == "block" and ds[1].block is not None and ds[1].block[0].args == ["1"]
    assert parse_nginx("location ~ \\.php$ { }")[0].args == ["~", "\\.php$"]
    with pytest.raises(NginxSyntaxError, match=r"nginx\.conf:1"):
        parse_nginx("a { b;")
    with pytest.raises(NginxSyntaxError):
        parse_nginx('a "unterminated;')


def test_the_imported_rule_file_loads(conf: Path, tmp_path: Path) -> None:
    from lua_compat.nginx_import import run_import
    from lua_compat.runtime import lua_available
    from router.rules import load_snapshot

    if lua_available() is not None:
        pytest.skip(lua_available() or "")
    out = tmp_path / "out"
    out.mkdir()
    (out / "lua").mkdir()
    (out / "lua" / "gray.lua").write_text((tmp_path / "lua" / "gray.lua").read_text())
    (out / "lua" / "pick.lua").write_text((tmp_path / "lua" / "pick.lua").read_text())
    assert run_import(str(conf), str(out / "rules.yaml"), partial=True) == 0
    assert (out / "scripts" / "api.example.com-exec-access.lua").exists()
    snapshot = load_snapshot(str(out / "rules.yaml"))
    names = [r.name for r in snapshot.routes]
    assert names.index("api.example.com-orders") < names.index("other.example.org")


def test_the_cli_command(conf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from router.cli import main

    out = tmp_path / "cli" / "rules.yaml"
    out.parent.mkdir()
    # Something that routes was not translated: the file is written, the exit status is 1.
    assert main(["import-nginx", str(conf), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "not translated (" in err and "limit_req" in err and "--partial" in err
    assert yaml.safe_load(out.read_text())["format"] == 1
    assert out.read_text().endswith("\n")
    assert main(["import-nginx", str(conf), "-o", str(out), "--partial"]) == 0
    assert main(["import-nginx", str(tmp_path / "missing.conf")]) == 1


# -- what a migration needs, one pattern at a time -------------------------------------------


def imported(tmp_path: Path, http: str, scripts: dict[str, str] | None = None) -> Any:
    for name, code in (scripts or {}).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(code)
    path = tmp_path / "nginx.conf"
    path.write_text("events {}\nhttp {\n" + textwrap.dedent(http) + "\n}\n")
    return import_nginx(str(path), scripts_dir="scripts")


def decided(result: Any, tmp_path: Path, target: str, host: str = "", **headers: str) -> str:
    """Where the imported rules send a request: an upstream or `status N [location]`."""
    from router.rules import RequestView, decide, load_snapshot_text

    rules = tmp_path / "rules.yaml"
    rules.write_text(result.yaml)
    snapshot = load_snapshot_text(result.yaml, str(rules))
    path, _, query = target.partition("?")
    names = {k.replace("_", "-").lower(): v for k, v in headers.items()}
    d = decide(snapshot, RequestView("GET", path, query, host, names, "127.0.0.1"))
    if d.route is None:
        return "no route"
    if d.status:
        return f"status {d.status}" + (f" {d.location}" if d.location else "")
    return str(d.upstream) + (f" {d.target}" if d.target else "")


UPS = """
upstream orders_v1 { server 10.0.1.1:8080; }
upstream orders_v1_1 { server 10.0.1.2:8080; }
upstream orders_v2 { server 10.0.2.1:8080; }
"""


def test_the_most_common_gray_pattern_keeps_its_route_pins_and_split(tmp_path: Path) -> None:
    result = imported(
        tmp_path,
        UPS
        + """
        split_clients "${cookie_uid}" $orders_minor { 5% orders_v1_1; * orders_v1; }
        map $cookie_gray $backend { "v2" orders_v2; ~^qa- orders_v2; default $orders_minor; }
        server {
            listen 80;
            location /orders { proxy_pass http://$backend; }
        }
        """,
    )
    assert result.untranslated == []
    (route,) = yaml.safe_load(result.yaml)["routes"]
    assert route == {
        "name": "default-orders",
        "match": {"path_prefix": "/orders"},
        "user_id": [{"cookie": "gray"}],
        "pins": [
            {"to": "orders_v2", "user_pattern": "(?i)v2"},  # map keys ignore case
            {"to": "orders_v2", "user_pattern": "qa-(?s:.*)"},
        ],
        "split_clients": {
            "key": "${cookie_uid}",
            "buckets": [{"5%": "orders_v1_1"}, {"*": "orders_v1"}],
        },
    }
    assert decided(result, tmp_path, "/orders", cookie="gray=V2") == "orders_v2"
    assert decided(result, tmp_path, "/orders", cookie="gray=qa-7") == "orders_v2"
    # ~^qa- is anchored: xqa-7 is split like everyone else
    assert decided(result, tmp_path, "/orders", cookie="gray=xqa-7") in ("orders_v1", "orders_v1_1")
    assert decided(result, tmp_path, "/other") == "no route"


def test_header_and_arg_maps(tmp_path: Path) -> None:
    result = imported(
        tmp_path,
        UPS
        + """
        map $http_x_canary $by_header { always orders_v2; ~*^beta orders_v1_1; default orders_v1; }
        map $arg_ver $by_arg { "2" orders_v2; default ""; }
        server {
            location /h { proxy_pass http://$by_header; }
            location /a { proxy_pass http://$by_arg; }
        }
        """,
    )
    routes = routes_by_name(result.yaml)
    assert routes["default-h"]["pins"] == [
        {"to": "orders_v2", "headers": {"X-Canary": "(?i)^always$"}},
        {"to": "orders_v1_1", "headers": {"X-Canary": "(?i:^beta)"}},
    ]
    # nginx's map default is "": proxy_pass http:// fails with 500, and so does the route.
    assert routes["default-a"]["user_id"] == [{"query": "ver"}]
    assert routes["default-a"]["direct_response"] == {"status": 500}
    assert decided(result, tmp_path, "/a?ver=2") == "orders_v2"
    assert decided(result, tmp_path, "/a?ver=3") == "status 500"
    assert decided(result, tmp_path, "/h", x_canary="ALWAYS") == "orders_v2"
    assert decided(result, tmp_path, "/h", x_canary="Beta-1") == "orders_v1_1"
    assert any("$arg_ver is not URL-decoded" in n.why for n in result.differences)


def test_set_presets_before_a_script_are_kept(tmp_path: Path) -> None:
    result = imported(
        tmp_path,
        UPS
        + """
        server {
            set $region "eu";
            location / {
                set $backend "orders_v1";
                rewrite_by_lua_file lua/gray.lua;
                proxy_pass http://$backend;
            }
        }
        """,
        {"lua/gray.lua": 'if ngx.var.http_x_gray == "1" then ngx.var.backend = "orders_v2" end\n'},
    )
    (route,) = yaml.safe_load(result.yaml)["routes"]
    assert route["lua"] == {
        "file": "lua/gray.lua",
        "variables": {"region": "eu", "backend": "orders_v1"},
    }
    # A request the script leaves alone keeps the preset instead of failing with 500.
    assert decided(result, tmp_path, "/x") == "orders_v1"
    assert decided(result, tmp_path, "/x", x_gray="1") == "orders_v2"


def test_upstream_passive_health_backup_and_down(tmp_path: Path) -> None:
    result = imported(
        tmp_path,
        """
        upstream app {
            server 10.0.0.1:80 max_fails=3 fail_timeout=30s;
            server 10.0.0.2 max_fails=3 fail_timeout=30s;
            server 10.0.0.3:80 down;
            server 10.0.0.9:80 backup;
            keepalive 16;
        }
        upstream weighted { server 10.0.1.1:80 weight=2; server 10.0.1.2:80; least_conn; }
        server { location / { proxy_pass http://app; } location /w { proxy_pass http://weighted; } }
        """,
    )
    ups = yaml.safe_load(result.yaml)["upstreams"]
    assert ups["app"] == {
        "endpoints": ["10.0.0.1:80", "10.0.0.2:80"],
        "max_fails": 3,
        "fail_timeout": "30s",
        "fallback": "app-backup",
    }
    assert ups["app-backup"] == {"endpoints": ["10.0.0.9:80"]}
    notes = [(n.line, n.text) for n in result.untranslated]
    assert notes == [
        (11, "server 10.0.1.1:80 weight=2;"),
        (11, "least_conn;"),
    ]


def test_client_body_buffer_size_reaches_the_script(tmp_path: Path) -> None:
    script = {"lua/body.lua": "ngx.req.read_body()\nlocal b = ngx.req.get_body_data()\n"}
    result = imported(
        tmp_path,
        UPS
        + """
        client_body_buffer_size 16k;
        server {
            location /a { rewrite_by_lua_file lua/body.lua; proxy_pass http://$backend; }
            location /b {
                client_body_buffer_size 1m;
                rewrite_by_lua_file lua/body.lua;
                proxy_pass http://$backend;
            }
        }
        server {
            listen 80;
            server_name other.example.com;
            client_body_buffer_size 8k;
            location / { rewrite_by_lua_file lua/body.lua; proxy_pass http://$backend; }
        }
        """,
        script,
    )
    routes = routes_by_name(result.yaml)
    assert routes["default-a"]["lua"]["client_body_buffer_size"] == "16KiB"
    assert routes["default-b"]["lua"]["client_body_buffer_size"] == "1MiB"
    assert "client_body_buffer_size" not in routes["other.example.com"]["lua"]  # the default


def test_exact_and_return_locations_become_one_clear_route(tmp_path: Path) -> None:
    result = imported(
        tmp_path,
        UPS
        + """
        server {
            location = /health { return 200 "ok"; }
            location = /gone { return 410; }
            location = / { return 302 /home/; }
            location /old/ { return 301 https://new.example.com$request_uri; }
            location / { proxy_pass http://orders_v1; }
        }
        """,
    )
    assert result.untranslated == []
    routes = yaml.safe_load(result.yaml)["routes"]
    assert routes[0] == {
        "name": "default-exact-health",
        "match": {"path_exact": "/health"},
        "direct_response": {"status": 200, "body": "ok"},
    }
    assert routes[1]["direct_response"] == {"status": 410}
    assert routes[2]["redirect"] == {"status": 302, "path": "/home/", "strip_query": True}
    assert routes[3]["redirect"] == {"scheme": "https", "host": "new.example.com"}
    assert decided(result, tmp_path, "/health") == "status 200"
    assert decided(result, tmp_path, "/health/") == "orders_v1"
    assert decided(result, tmp_path, "/old/a?b=1") == "status 301 https://new.example.com/old/a?b=1"


def test_location_selection_follows_nginx(tmp_path: Path) -> None:
    result = imported(
        tmp_path,
        UPS
        + """
        server {
            location = /exact { proxy_pass http://orders_v2; }
            location /a/ { proxy_pass http://orders_v1; }
            location /a/b/ { proxy_pass http://orders_v1_1; }
            location ^~ /static/ { proxy_pass http://orders_v1_1; }
            location /static/long/ { proxy_pass http://orders_v1; }
            location ~ \\.png$ { proxy_pass http://orders_v2; }
            location ~* \\.PNG$ { return 403; }
            location / { proxy_pass http://orders_v1; }
        }
        """,
    )
    assert result.untranslated == []
    cases = {
        "/exact": "orders_v2",
        "/exact/": "orders_v1",  # `=` only for the path itself
        "/a/x": "orders_v1",
        "/a/b/x": "orders_v1_1",  # the longest prefix
        "/a/b/x.png": "orders_v2",  # regexes before a plain prefix
        "/x.PNG": "status 403",  # regexes in order: ~ is case-sensitive, ~* is not
        "/static/x.png": "orders_v1_1",  # ^~ stops the search
        "/static/long/x.png": "orders_v2",  # a longer plain prefix under ^~ still tries regexes
        "/static/long/x": "orders_v1",
        "/a": "status 301 /a/",  # nginx redirects to the proxied prefix with its slash
        "/a?q=1": "status 301 /a/?q=1",
        "/static": "status 301 /static/",
    }
    for target, expected in cases.items():
        assert decided(result, tmp_path, target) == expected, target


def test_server_selection_follows_nginx(tmp_path: Path) -> None:
    result = imported(
        tmp_path,
        UPS
        + """
        server { server_name first.example.com; location / { return 404; } }
        server { server_name *.example.com; location / { proxy_pass http://orders_v1; } }
        server { server_name api.example.com; location /x { proxy_pass http://orders_v2; } }
        server { server_name www.example.*; location / { proxy_pass http://orders_v1_1; } }
        server { server_name ~^api[0-9]+\\.example\\.net$; location / { return 418; } }
        server { listen 80 default_server; server_name _; return 444; }
        """,
    )
    assert result.untranslated == []
    cases = {
        "api.example.com": "orders_v2",  # an exact name beats a wildcard
        "other.example.com": "orders_v1",
        "www.example.com": "orders_v1",  # *.example.com beats www.example.*
        "www.example.org": "orders_v1_1",
        "api7.example.net": "status 418",
        "first.example.com": "status 404",
        "unknown.test": "status 444",  # the default server
        "": "status 444",
    }
    for host, expected in cases.items():
        assert decided(result, tmp_path, "/x", host) == expected, host
    # api.example.com has no location for /y: nginx answers 404 there, not another server.
    assert decided(result, tmp_path, "/y", "api.example.com") == "status 404"


def test_if_return_in_a_server_and_a_location(tmp_path: Path) -> None:
    result = imported(
        tmp_path,
        UPS
        + """
        server {
            if ($request_method = OPTIONS) { return 204; }
            if ($http_user_agent ~* "bot") { return 403; }
            location /admin {
                if ($http_x_team = "ops") { return 307 /ops/; }
                return 403 "no";
            }
            location / { proxy_pass http://orders_v1; }
        }
        """,
    )
    assert result.untranslated == []
    assert decided(result, tmp_path, "/x", user_agent="GoogleBot") == "status 403"
    assert decided(result, tmp_path, "/admin", x_team="ops") == "status 307 /ops/"
    assert decided(result, tmp_path, "/admin", x_team="dev") == "status 403"
    assert decided(result, tmp_path, "/x") == "orders_v1"


def test_proxy_pass_uri_part_becomes_a_prefix_rewrite(tmp_path: Path) -> None:
    result = imported(
        tmp_path,
        UPS
        + """
        server {
            location /api/ { proxy_pass http://orders_v1/v1/; }
            location = /ping { proxy_pass http://orders_v2/healthz; }
            location /legacy/ { rewrite ^/legacy/(.*)$ /v0/$1 break; proxy_pass http://orders_v1; }
            location / { proxy_pass http://orders_v1_1/; }
        }
        """,
    )
    assert result.untranslated == []
    assert decided(result, tmp_path, "/api/orders?id=7") == "orders_v1 /v1/orders?id=7"
    assert decided(result, tmp_path, "/ping") == "orders_v2 /healthz"
    assert decided(result, tmp_path, "/legacy/a/b") == "orders_v1 /v0/a/b"
    assert decided(result, tmp_path, "/x/y") == "orders_v1_1 /x/y"


def test_named_locations_reached_by_ngx_exec(tmp_path: Path) -> None:
    result = imported(
        tmp_path,
        UPS
        + """
        server {
            location / {
                access_by_lua_file lua/route.lua;
                proxy_pass http://orders_v1;
            }
            location @canary { proxy_pass http://orders_v2; }
            location @unused { proxy_pass http://orders_v1_1; }
        }
        """,
        {"lua/route.lua": 'if ngx.var.http_x_beta then return ngx.exec("@canary") end\n'},
    )
    (route,) = yaml.safe_load(result.yaml)["routes"]
    assert route["lua"] == {
        "file": "lua/route.lua",
        "phase": "access",
        "map": {"@canary": "orders_v2"},
        "default": "orders_v1",
    }
    assert [n.text for n in result.untranslated] == ["location @unused { ... }"]
    assert decided(result, tmp_path, "/x", x_beta="1") == "orders_v2"
    assert decided(result, tmp_path, "/x") == "orders_v1"


def test_every_directive_that_routes_is_translated_or_listed(tmp_path: Path) -> None:
    result = imported(
        tmp_path,
        UPS
        + """
        geo $office { default 0; 10.0.0.0/8 1; }
        server {
            location /a {
                set $backend orders_v1;
                if ($http_x_beta != "1") { set $backend orders_v2; }
                proxy_pass http://$backend;
            }
            location /b { rewrite ^/b/(.*)$ /c/$1 last; }
            location /c { limit_req zone=one; proxy_pass http://orders_v1; }
            location /d { try_files $uri @fallback; }
            location /e { return 200 "$remote_addr"; }
            location /f { proxy_pass https://orders_v1; }
        }
        """,
    )
    listed = {(n.line, n.text.split(" ")[0]) for n in result.untranslated}
    assert listed == {
        (8, "geo"),
        (12, "if"),
        (15, "rewrite"),
        (15, "location"),
        (16, "limit_req"),
        (17, "try_files"),
        (17, "location"),
        (18, "return"),
        (19, "proxy_pass"),
    }, result.report()
    assert all(n.file.endswith("nginx.conf") for n in result.untranslated)
    assert result.yaml.endswith("\n")


def test_if_set_before_proxy_pass_becomes_pins(tmp_path: Path) -> None:
    result = imported(
        tmp_path,
        UPS
        + """
        server {
            set $backend orders_v1;
            if ($remote_addr ~ "^10\\.20\\.") { set $backend orders_v1_1; }
            location / {
                if ($cookie_gray = "beta") { set $backend orders_v2; }
                if ($http_x_canary ~* "^yes$") { set $backend orders_v2; }
                if ($http_x_debug) { set $debug 1; }
                proxy_pass http://$backend;
            }
        }
        """,
    )
    assert result.untranslated == []
    (route,) = yaml.safe_load(result.yaml)["routes"]
    # nginx runs every `if`; the last that holds sets the value: the last is checked first.
    assert route == {
        "name": "default",
        "user_id": [{"cookie": "gray"}],
        "pins": [
            {"to": "orders_v2", "headers": {"X-Canary": "(?i)^yes$"}},
            {"to": "orders_v2", "users": ["beta"]},
            {"to": "orders_v1_1", "client_cidrs": ["10.20.0.0/16"]},
        ],
        "to": "orders_v1",
    }
    assert [n.text.split(" ")[0] for n in result.ignored] == ["events", "if"]  # $debug
    assert decided(result, tmp_path, "/", cookie="gray=beta") == "orders_v2"
    assert decided(result, tmp_path, "/", x_canary="YES") == "orders_v2"
    assert decided(result, tmp_path, "/") == "orders_v1"


def test_an_empty_translation_is_still_a_file_with_a_final_newline(tmp_path: Path) -> None:
    result = imported(tmp_path, "server { location / { root /srv; } }")
    assert result.yaml.endswith("routes:\n  []\n")

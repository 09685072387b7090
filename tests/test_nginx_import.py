"""`grayroute import-nginx`: nginx.conf (upstream, split_clients, map, Lua handlers,
proxy_pass) -> a rule file, with a plain list of what was not translated."""

from __future__ import annotations

import textwrap
from pathlib import Path

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
        {"to": "orders_canary", "user_pattern": ".*(?:^beta).*"},
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
    assert ("nginx.conf", "location") in notes  # the regex location
    assert ("nginx.conf", "limit_req") in notes
    assert ("nginx.conf", "proxy_pass") in notes  # the /old/ URI part
    assert ("extra.conf", "server_name") in notes  # *.example.org
    assert ("nginx.conf", "server") in notes  # weight=2
    assert "location ~ \\.php$" in report
    assert "not translated" in report
    ignored = {n.text.split(" ")[0] for n in result.ignored}
    assert {"proxy_set_header", "listen", "keepalive"} <= ignored


def test_included_files_are_followed(conf: Path) -> None:
    routes = routes_by_name(import_nginx(str(conf)).yaml)
    assert routes["other.example.org"] == {
        "name": "other.example.org",
        "match": {"hosts": ["other.example.org"]},
        "to": "orders_v1",
    }


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
    assert run_import(str(conf), str(out / "rules.yaml")) == 0
    assert (out / "scripts" / "api.example.com-exec-access.lua").exists()
    snapshot = load_snapshot(str(out / "rules.yaml"))
    assert [r.name for r in snapshot.routes][:3] == [
        "other.example.org",
        "api.example.com-orders",
        "api.example.com-pay",
    ]


def test_the_cli_command(conf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from router.cli import main

    out = tmp_path / "cli" / "rules.yaml"
    out.parent.mkdir()
    assert main(["import-nginx", str(conf), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "not translated (" in err and "limit_req" in err
    assert yaml.safe_load(out.read_text())["format"] == 1
    assert main(["import-nginx", str(tmp_path / "missing.conf")]) == 1

"""nginx split_clients, bit-exact: percent parsing, thresholds, `*`, and the bucket of
every key, checked against a real nginx over thousands of keys, including keys whose
hash lies right next to each bucket boundary."""

from __future__ import annotations

import random
import string
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from lua_compat.murmur2 import murmur_hash2
from lua_compat.nginx_check import NginxLua, nginx_unavailable, send_raw
from lua_compat.ngx import NgxRequest
from lua_compat.split_clients import KeyTemplate, SplitClients, SplitClientsError, parse_percent

U32 = 0xFFFFFFFF


# -- percent arithmetic ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("50%", 5000),
        ("0.5%", 50),
        ("33.33%", 3333),
        (".5%", 50),
        ("5.%", 500),
        ("100%", 10000),
        ("0.01%", 1),
        ("007%", 700),
        ("12.3%", 1230),
    ],
)
def test_percent_is_read_like_ngx_atofp(text: str, value: int) -> None:
    assert parse_percent(text) == value


@pytest.mark.parametrize(
    "text", ["0.125%", "0%", "0.00%", "abc%", "5", "%", "1.2.3%", "-1%", " 5%", "."]
)
def test_invalid_percent_is_refused_as_nginx_does(text: str) -> None:
    with pytest.raises(SplitClientsError, match="invalid percent value"):
        parse_percent(text)


def test_percent_wraps_to_uint32_like_nginx() -> None:
    # nginx stores (uint32_t) n: 42949672.97% is 4294967297 hundredths, i.e. 1
    assert parse_percent("42949672.97%") == 1


def test_thresholds_sum_floors_part_by_part() -> None:
    s = SplitClients.build([("50%", "a"), ("50%", "b")])
    half = 5000 * U32 // 10000
    assert s.thresholds == (half, 2 * half)
    # the two top hashes are in no part: nginx's variable is empty
    assert s.index_of_hash(2 * half - 1) == 1
    assert s.index_of_hash(2 * half) is None
    assert s.index_of_hash(U32) is None
    assert s.index_of_hash(0) == 0


def test_star_takes_the_rest_and_later_parts_are_never_reached() -> None:
    s = SplitClients.build([("0.5%", "a"), ("*", "b"), ("*", "c")])
    assert s.has_star
    assert s.index_of_hash(U32) == 1
    assert s.index_of_hash(50 * U32 // 10000 - 1) == 0


def test_total_above_100_percent_is_refused() -> None:
    with pytest.raises(SplitClientsError, match="percent total is greater than 100%"):
        SplitClients.build([("60%", "a"), ("40.01%", "b")])
    with pytest.raises(SplitClientsError):
        SplitClients.build([("*", "a"), ("1%", "b")])  # `*` counts as 100%


def test_key_template() -> None:
    req = NgxRequest(
        b"GET", b"/x?uid=42", [(b"Cookie", b"uid=7; a=b"), (b"X-User-Id", b"9")], b"10.1.2.3"
    )
    assert KeyTemplate.parse("${remote_addr}AAA").evaluate(req) == b"10.1.2.3AAA"
    assert KeyTemplate.parse("$cookie_uid").evaluate(req) == b"7"
    assert KeyTemplate.parse("$http_x_user_id-$arg_uid").evaluate(req) == b"9-42"
    assert KeyTemplate.parse("$http_missing$arg_uid").evaluate(req) == b"42"
    assert KeyTemplate.parse("${cookie_uid}x").variables == ("cookie_uid",)
    with pytest.raises(SplitClientsError):
        KeyTemplate.parse("$1")
    with pytest.raises(SplitClientsError):
        KeyTemplate.parse("a$")


# -- against nginx -----------------------------------------------------------------------

M = 0x5BD1E995
M_INV = pow(M, -1, 1 << 32)

BLOCKS = {
    "a": [("50%", "a1"), ("50%", "a2")],
    "b": [("0.5%", "b1"), ("2.0%", "b2"), ("*", "b3")],
    "c": [("33.33%", "c1"), ("33.33%", "c2"), ("33.34%", "c3")],
    "d": [("10%", "d1"), ("20%", "d2")],
    "e": [("99.99%", "e1"), ("0.01%", "e2")],
    "f": [("*", "f1")],
    "g": [("12.34%", "g1"), ("0.01%", "g2"), ("7%", "g3"), ("*", "g4")],
}


def _unmix(k: int) -> int:
    k = (k * M_INV) & U32
    k ^= k >> 24
    return (k * M_INV) & U32


def _unfinal(h: int) -> int:
    h ^= (h >> 15) ^ (h >> 30)
    h = (h * M_INV) & U32
    h ^= (h >> 13) ^ (h >> 26)
    return h


def key_with_hash(target: int, rng: random.Random) -> bytes:
    """An 8-byte printable key whose MurmurHash2 is exactly `target`."""
    pre_final = _unfinal(target)
    printable = set(range(0x21, 0x7F))
    while True:
        prefix = bytes(rng.choice(string.ascii_letters.encode()) for _ in range(4))
        w1 = int.from_bytes(prefix, "little")
        k1 = (w1 * M) & U32
        k1 ^= k1 >> 24
        k1 = (k1 * M) & U32
        h1 = ((8 * M) & U32) ^ k1
        mixed = pre_final ^ ((h1 * M) & U32)
        w2 = _unmix(mixed).to_bytes(4, "little")
        if all(b in printable for b in w2):
            key = prefix + w2
            assert murmur_hash2(key) == target
            return key


def _keys() -> list[bytes]:
    rng = random.Random(1122)
    keys: set[bytes] = set()
    for block in BLOCKS.values():
        split = SplitClients.build(block)
        for t in split.thresholds:
            for target in (t - 2, t - 1, t, t + 1):
                if 0 <= target <= U32:
                    keys.add(key_with_hash(target, rng))
    for target in (0, 1, U32 - 1, U32):
        keys.add(key_with_hash(target, rng))
    alphabet = string.ascii_letters + string.digits + "-_.:@"
    while len(keys) < 3000:
        keys.add("".join(rng.choices(alphabet, k=rng.randint(1, 24))).encode())
    return sorted(keys)


def _config() -> str:
    blocks = []
    for name, parts in BLOCKS.items():
        body = " ".join(f"{p} {v};" for p, v in parts)
        blocks.append(f'split_clients "${{http_x_key}}" $v_{name} {{ {body} }}')
    values = "|".join(f"$v_{n}" for n in BLOCKS)
    return "\n".join(blocks) + (
        f'\nserver {{ listen 127.0.0.1:{{port:split}}; location / {{ return 200 "{values}"; }} }}\n'
    )


@pytest.fixture(scope="module")
def nginx() -> Iterator[NginxLua]:
    reason = nginx_unavailable()
    if reason is not None:
        pytest.skip(reason)
    server = NginxLua([], _config(), ["split"])
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_buckets_match_nginx_for_thousands_of_keys(nginx: NginxLua) -> None:
    keys = _keys()
    splits = {n: SplitClients.build(parts) for n, parts in BLOCKS.items()}
    key_of = KeyTemplate.parse("${http_x_key}")
    port = nginx.ports["split"]

    def ask(key: bytes) -> bytes:
        raw = b"GET / HTTP/1.1\r\nHost: t\r\nX-Key: " + key + b"\r\nConnection: close\r\n\r\n"
        return send_raw(port, raw).body

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, keys))
    boundary_hits = 0
    for key, answer in zip(keys, answers, strict=True):
        req = NgxRequest(b"GET", b"/", [(b"Host", b"t"), (b"X-Key", key)])
        k = key_of.evaluate(req)
        assert k == key
        ours = "|".join(splits[n].pick(k) or "" for n in BLOCKS)
        assert answer.decode() == ours, f"key {key!r} (hash {murmur_hash2(key)})"
        h = murmur_hash2(key)
        boundary_hits += any(abs(h - t) <= 2 for s in splits.values() for t in s.thresholds if t)
    assert len(keys) >= 3000
    assert boundary_hits >= 40  # keys hashed onto and around every boundary

"""nginx's MurmurHash2 (ngx_murmur_hash2), bit for bit."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from lua_compat.murmur2 import murmur_hash2

M = 0x5BD1E995
MASK = 0xFFFFFFFF


def reference(data: bytes) -> int:
    """A line-by-line transcription of ngx_murmurhash.c (with the switch fall-through)."""
    h = (0 ^ len(data)) & MASK
    i = 0
    n = len(data)
    while n >= 4:
        k = data[i] | data[i + 1] << 8 | data[i + 2] << 16 | data[i + 3] << 24
        k = (k * M) & MASK
        k ^= k >> 24
        k = (k * M) & MASK
        h = (h * M) & MASK
        h ^= k
        i += 4
        n -= 4
    if n == 3:
        h ^= data[i + 2] << 16
    if n >= 2:
        h ^= data[i + 1] << 8
    if n >= 1:
        h ^= data[i]
        h = (h * M) & MASK
    h ^= h >> 13
    h = (h * M) & MASK
    h ^= h >> 15
    return h


def test_empty_input_hashes_to_zero() -> None:
    assert murmur_hash2(b"") == 0


def test_known_values() -> None:
    # Pinned so that a change shows; test_split_clients.py checks against real nginx
    # that keys hashed next to every bucket boundary land where nginx puts them.
    assert murmur_hash2(b"a") == 0x92685F5E
    assert murmur_hash2(b"abcd") == 0x26873021
    assert murmur_hash2(b"127.0.0.1") == reference(b"127.0.0.1")


@given(st.binary(max_size=64))
def test_matches_the_c_code(data: bytes) -> None:
    assert murmur_hash2(data) == reference(data)


def test_every_tail_length_and_high_bytes() -> None:
    rng = random.Random(7)
    for length in range(0, 40):
        for _ in range(20):
            data = bytes(
                rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)]) for _ in range(length)
            )
            assert murmur_hash2(data) == reference(data)

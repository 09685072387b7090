"""nginx's MurmurHash2 (`ngx_murmur_hash2` in src/core/ngx_murmurhash.c), bit-exact.

This is the hash `split_clients` applies to its key, so a user's bucket under Grayroute
is the same as under nginx only if every bit agrees. nginx's variant differs from
Austin Appleby's reference MurmurHash2 in one place: the seed is 0, so the state
starts as the length alone (`h = 0 ^ len`). Words are read little-endian, whatever the
machine, and all arithmetic is modulo 2**32.

    murmur_hash2(b"")          -> 0
    murmur_hash2(b"127.0.0.1") -> the value nginx's split_clients compares with its
                                  cumulative thresholds

Python pays for every big-int operation, so the word loop works on masked ints read in
one `struct.unpack_from` call; a 36-byte key costs a few microseconds.
"""

from __future__ import annotations

import struct

__all__ = ["murmur_hash2"]

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF
_WORD_FORMATS: dict[int, struct.Struct] = {}


def _words(count: int) -> struct.Struct:
    fmt = _WORD_FORMATS.get(count)
    if fmt is None:
        fmt = _WORD_FORMATS[count] = struct.Struct(f"<{count}I")
    return fmt


def murmur_hash2(data: bytes) -> int:
    """The unsigned 32-bit hash nginx computes for `data`."""
    length = len(data)
    h = length & _MASK
    count = length >> 2
    if count:
        m, mask = _M, _MASK
        for k in _words(count).unpack_from(data):
            k = (k * m) & mask
            k ^= k >> 24
            k = (k * m) & mask
            h = ((h * m) & mask) ^ k
    rest = length & 3
    if rest:
        tail = count << 2
        if rest == 3:
            h ^= data[tail + 2] << 16
        if rest >= 2:
            h ^= data[tail + 1] << 8
        h ^= data[tail]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h

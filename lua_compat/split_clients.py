"""nginx `split_clients`, bit-exact: the same key puts a user in the same bucket.

nginx (src/http/modules/ngx_http_split_clients_module.c) does its arithmetic when the
configuration loads and keeps, per request, one hash and a few compares; so do we:

    split_clients "${remote_addr}AAA" $variant {
        0.5%  .one;            # parts: a percentage with at most two decimals
        2.0%  .two;
        *     "";              # `*`: everything the parts above did not take
    }

At load time each percentage becomes an integer in hundredths of a percent (`0.5%` ->
50, parsed like nginx's `ngx_atofp(.., 2)`), and each part gets a cumulative 32-bit
threshold, summing the floors part by part:

    last += percent * 0xffffffff // 10000          (uint64 product, uint32 sum)

A request hashes its key with MurmurHash2 (murmur2.py) and takes the first part with
`hash < threshold`, or the first `*` part. A hash above every threshold matches no
part: nginx's variable is then empty, which `pick()` reports as None. Because the floors
are summed, parts that add up to exactly 100% still leave the top few hash values
(at most one per part) unmatched; 50% + 50% leaves 4294967294 and 4294967295 out.

Errors are nginx's: `invalid percent value "X"` (no `%`, more than two decimals, 0%,
not a number) and `percent total is greater than 100%`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from lua_compat.murmur2 import murmur_hash2

if TYPE_CHECKING:
    from lua_compat.ngx import NgxRequest

__all__ = ["STAR", "KeyTemplate", "SplitClients", "SplitClientsError", "parse_percent"]

STAR = "*"
_U32 = 0xFFFFFFFF
_NGX_MAX_INT = (1 << 63) - 1  # NGX_MAX_INT_T_VALUE on 64-bit builds

V = TypeVar("V")


class SplitClientsError(ValueError):
    """A split_clients block nginx would refuse to load (message in nginx's words)."""


def parse_percent(text: str) -> int:
    """'0.5%' -> 50 (hundredths of a percent), as nginx reads a split_clients part.

    Raises SplitClientsError('invalid percent value "..."') where nginx does. The result
    is already cast to uint32 as nginx stores it.
    """
    if not text.endswith("%"):
        raise SplitClientsError(f'invalid percent value "{text}"')
    n = _atofp(text[:-1], 2)
    if n is None or n == 0:
        raise SplitClientsError(f'invalid percent value "{text}"')
    return n & _U32


def _atofp(text: str, point: int) -> int | None:
    """nginx's ngx_atofp: a fixed-point number with `point` decimals, or None (error)."""
    if not text:
        return None
    cutoff, cutlim = divmod(_NGX_MAX_INT, 10)
    value = 0
    dot = 0
    for ch in text:
        if point == 0:
            return None  # more decimals than allowed
        if ch == ".":
            if dot:
                return None
            dot = 1
            continue
        if not "0" <= ch <= "9":
            return None
        digit = ord(ch) - 48
        if value >= cutoff and (value > cutoff or digit > cutlim):
            return None
        value = value * 10 + digit
        point -= dot
    while point:
        point -= 1
        if value > cutoff:
            return None
        value *= 10
    return value


@dataclass(frozen=True, slots=True)
class SplitClients(Generic[V]):
    """The compiled parts of one split_clients block.

    `thresholds[i]` is 0 for a `*` part (it matches every hash), else the cumulative
    uint32 threshold nginx compares with. `values[i]` is what the part selects (an
    upstream name in the rule engine, the nginx value in the importer).
    """

    thresholds: tuple[int, ...]
    values: tuple[V, ...]
    percents: tuple[int, ...]  # hundredths of a percent as written; 0 for `*`

    @classmethod
    def build(cls, parts: Sequence[tuple[str, V]]) -> SplitClients[V]:
        """Parts as written, in order: ('0.5%', value) or ('*', value).

        Raises SplitClientsError where nginx refuses the block.
        """
        percents = [0 if p == STAR else parse_percent(p) for p, _ in parts]
        total = 0
        last = 0
        thresholds: list[int] = []
        for percent in percents:
            # uint32 arithmetic, as in ngx_conf_split_clients_block
            total = (total + percent) & _U32 if percent else 10000
            if total > 10000:
                raise SplitClientsError("percent total is greater than 100%")
            if percent:
                last = (last + percent * _U32 // 10000) & _U32
                thresholds.append(last)
            else:
                thresholds.append(0)
        return cls(tuple(thresholds), tuple(v for _, v in parts), tuple(percents))

    @property
    def has_star(self) -> bool:
        return 0 in self.thresholds

    @property
    def covers_every_hash(self) -> bool:
        """True when no hash is left without a part (a `*` part is present)."""
        return self.has_star

    def index_of_hash(self, h: int) -> int | None:
        """The part a 32-bit hash falls in, or None (nginx's empty value)."""
        for i, threshold in enumerate(self.thresholds):
            if h < threshold or threshold == 0:
                return i
        return None

    def index(self, key: bytes) -> int | None:
        return self.index_of_hash(murmur_hash2(key))

    def pick(self, key: bytes) -> V | None:
        """The value nginx's variable takes for this key; None where nginx's is empty."""
        i = self.index_of_hash(murmur_hash2(key))
        return None if i is None else self.values[i]


_VARIABLE = re.compile(r"\$(?:\{([A-Za-z0-9_]+)\}|([A-Za-z0-9_]+))")


@dataclass(frozen=True, slots=True)
class KeyTemplate:
    """The key of a split_clients block: nginx's complex-value syntax.

    Literal text and variables, `$name` or `${name}` (letters, digits, `_`), e.g.
    `"${remote_addr}AAA"`, `"$cookie_uid"`, `"$http_x_user_id$arg_region"`. A variable
    that has no value (nginx: not found) adds nothing. Variables are those of ngx.py
    (NgxRequest.variable): http_*, cookie_*, arg_*, remote_addr, uri, host, ...
    """

    text: str
    parts: tuple[tuple[bool, bytes], ...]  # (is_variable, name or literal)

    @classmethod
    def parse(cls, text: str) -> KeyTemplate:
        parts: list[tuple[bool, bytes]] = []
        pos = 0
        for m in _VARIABLE.finditer(text):
            if m.start() > pos:
                parts.append((False, text[pos : m.start()].encode("utf-8")))
            name = m.group(1) or m.group(2)
            if name.isdigit():
                raise SplitClientsError(
                    f'"${name}": regular expression captures are not available here'
                )
            parts.append((True, name.lower().encode("ascii")))
            pos = m.end()
        if pos < len(text):
            rest = text[pos:]
            if "$" in rest:
                raise SplitClientsError(f'invalid variable name in "{text}"')
            parts.append((False, rest.encode("utf-8")))
        if not parts:
            raise SplitClientsError("the key is empty")
        return cls(text, tuple(parts))

    @property
    def variables(self) -> tuple[str, ...]:
        return tuple(p.decode("ascii") for is_var, p in self.parts if is_var)

    def evaluate(self, request: NgxRequest) -> bytes:
        parts = self.parts
        if len(parts) == 1 and parts[0][0]:
            return request.variable(parts[0][1]) or b""
        out = []
        for is_var, part in parts:
            if is_var:
                value = request.variable(part)
                if value:
                    out.append(value)
            else:
                out.append(part)
        return b"".join(out)

"""Reading a rule file: YAML text -> a raw tree that knows where every node was written.

The validator needs FILE:LINE:COLUMN for every problem, so the file is composed (not
constructed) with PyYAML and the node graph is walked into three small node types:

    MapNode     items: dict[str, Entry]   (Entry = key node + value node, in file order)
    SeqNode     items: list[Node]
    ScalarNode  value (str, int, float, bool or None), text (as written), quoted

Lines and columns are 1-based. Mapping keys are kept as the text written (so `07` stays
`07` and `yes` stays `yes`); a key given twice in one mapping is an error. Anchors and
aliases work (an alias shares the anchored node), and so do merge keys (`<<: *anchor`,
keys written beside them win). Syntax errors raise `RulesError` at once; problems the
walk finds (duplicate keys, unsupported tags) are returned with the tree so the
validator can report them together with its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import yaml
from yaml.constructor import SafeConstructor

from router.errors import Problem, RulesError

if TYPE_CHECKING:
    from collections.abc import Callable

try:  # the C loader is ~10x faster; it reports the same marks
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]

__all__ = ["Entry", "MapNode", "Node", "ScalarNode", "SeqNode", "load_text", "read_rules_file"]

# An alias bomb ("billion laughs") expands to far more nodes than the text suggests;
# a rule file with a 10,000-user list has ~10,000 nodes, so this leaves a wide margin.
MAX_NODES = 2_000_000

_TAG = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL = (_TAG + t for t in ("str", "int", "float", "bool", "null"))
_TIMESTAMP, _MERGE, _MAP, _SEQ = (_TAG + t for t in ("timestamp", "merge", "map", "seq"))


@dataclass(eq=False, slots=True)
class Node:
    line: int  # 1-based
    column: int  # 1-based

    @property
    def kind(self) -> str:
        """'mapping', 'list' or 'value': how problems name what was found."""
        raise NotImplementedError


@dataclass(eq=False, slots=True)
class ScalarNode(Node):
    value: str | int | float | bool | None
    text: str  # as written in the file, without quotes
    quoted: bool = False

    @property
    def kind(self) -> str:
        if self.value is None:
            return "nothing (null)"
        if isinstance(self.value, bool):
            return "true/false"
        if isinstance(self.value, int | float):
            return "a number"
        return "text"


@dataclass(eq=False, slots=True)
class SeqNode(Node):
    items: list[Node] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return "a list"


@dataclass(eq=False, slots=True)
class Entry:
    key: ScalarNode
    value: Node


@dataclass(eq=False, slots=True)
class MapNode(Node):
    items: dict[str, Entry] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "a mapping"


def read_rules_file(path: str) -> bytes:
    """The file's bytes; an unreadable file becomes a RulesError at 1:1 with a hint."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise RulesError(
            [
                Problem(
                    path,
                    1,
                    1,
                    "file",
                    f"cannot read the rule file: {reason}",
                    "check the path and its permissions",
                )
            ]
        ) from exc


def decode_rules_bytes(data: bytes, filename: str) -> str:
    """UTF-8 text (a BOM is allowed); other encodings are reported where they go wrong."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line = before.count(b"\n") + 1
        column = len(before) - (before.rfind(b"\n") + 1) + 1
        raise RulesError(
            [
                Problem(
                    filename,
                    line,
                    column,
                    "file",
                    "the file is not valid UTF-8",
                    "save it as UTF-8",
                )
            ]
        ) from exc


def load_text(text: str, filename: str) -> tuple[Node | None, list[Problem]]:
    """Compose `text` into a raw tree. Returns (root or None for an empty file, problems).

    Raises RulesError for YAML syntax errors (nothing after them can be trusted).
    """
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        raise RulesError([_syntax_problem(exc, filename, text)]) from exc
    except yaml.YAMLError as exc:  # e.g. a reader error without a mark
        raise RulesError(
            [Problem(filename, 1, 1, "yaml", f"not valid YAML: {exc}", "fix the YAML syntax")]
        ) from exc
    if root is None:
        return None, []
    walker = _Walker(filename)
    try:
        tree = walker.convert(root)
    except RecursionError as exc:
        raise RulesError(
            [
                Problem(
                    filename,
                    1,
                    1,
                    "yaml",
                    "the file is nested too deeply",
                    "a rule file needs only a few levels of nesting",
                )
            ]
        ) from exc
    except _TooLarge as exc:
        raise RulesError(
            [
                Problem(
                    filename,
                    1,
                    1,
                    "yaml",
                    f"the file expands to more than {MAX_NODES:,} values",
                    "do not nest aliases of aliases; write the lists out",
                )
            ]
        ) from exc
    return tree, walker.problems


def _syntax_problem(exc: yaml.MarkedYAMLError, filename: str, text: str) -> Problem:
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark is not None else 1
    column = mark.column + 1 if mark is not None else 1
    what = exc.problem or exc.context or "syntax error"
    if exc.context and exc.problem and "single document" in exc.context:
        return Problem(
            filename,
            line,
            column,
            "yaml",
            "more than one YAML document (`---`)",
            "keep one document per rule file",
        )
    message = f"not valid YAML: {what}"
    context_mark = exc.context_mark
    if exc.context and context_mark is not None and context_mark.line + 1 != line:
        message += f" ({exc.context} at line {context_mark.line + 1})"
    at = mark.index if mark is not None else -1
    char = text[at] if 0 <= at < len(text) else ""
    return Problem(filename, line, column, "yaml", message, _syntax_hint(what, char))


def _syntax_hint(what: str, char: str) -> str:
    if char == "\t" or "tab" in what:
        return "indent with spaces, not tabs"
    if "mapping values are not allowed" in what:
        return "check the indentation, or quote a value that contains ': '"
    if "alias" in what:
        return "define the anchor (&name) before using it (*name)"
    if "found character" in what or "unexpected" in what:
        return "quote a value that starts with one of @ ` % * & ! |"
    return "check the indentation and quoting near here"


class _TooLarge(Exception):
    pass


class _Walker:
    """Turns PyYAML nodes into our nodes; shared (aliased) nodes are converted once."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.problems: list[Problem] = []
        self._done: dict[int, tuple[Node, int]] = {}  # id(yaml node) -> (our node, size)
        self._active: set[int] = set()  # nodes on the current path (recursive alias guard)
        constructor = SafeConstructor()  # only its scalar constructors are used
        self._constructors: dict[str, Callable[[yaml.ScalarNode], object]] = {
            _INT: constructor.construct_yaml_int,
            _FLOAT: constructor.construct_yaml_float,
            _BOOL: constructor.construct_yaml_bool,
        }

    def convert(self, node: yaml.Node) -> Node:
        return self._convert(node)[0]

    def _problem(self, node: yaml.Node, message: str, hint: str) -> None:
        mark = node.start_mark
        self.problems.append(
            Problem(self.filename, mark.line + 1, mark.column + 1, "yaml", message, hint)
        )

    def _convert(self, node: yaml.Node) -> tuple[Node, int]:
        key = id(node)
        done = self._done.get(key)
        if done is not None:
            return done
        if key in self._active:
            self._problem(
                node, "an alias refers to a node that contains it", "remove the recursive alias"
            )
            return _placeholder(node), 1
        self._active.add(key)
        try:
            result = self._convert_new(node)
        finally:
            self._active.discard(key)
        self._done[key] = result
        return result

    def _convert_new(self, node: yaml.Node) -> tuple[Node, int]:
        line, column = node.start_mark.line + 1, node.start_mark.column + 1
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node), 1
        if isinstance(node, yaml.SequenceNode):
            self._check_collection_tag(node, _SEQ)
            seq = SeqNode(line, column)
            size = 1
            for child in node.value:
                converted, n = self._convert(child)
                seq.items.append(converted)
                size = self._grow(size, n)
            return seq, size
        assert isinstance(node, yaml.MappingNode)
        self._check_collection_tag(node, _MAP)
        mapping = MapNode(line, column)
        size = 1
        merged: list[Entry] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                value, n = self._convert(value_node)
                size = self._grow(size, n)
                merged.extend(self._merge_entries(value_node, value))
                continue
            key = self._key(key_node)
            value, n = self._convert(value_node)
            size = self._grow(size, n)
            if key is None:
                continue
            first = mapping.items.get(key.text)
            if first is not None:
                self.problems.append(
                    Problem(
                        self.filename,
                        key.line,
                        key.column,
                        "yaml",
                        f"duplicate key `{key.text}`",
                        f"it was already given at line {first.key.line}; keep one",
                    )
                )
                continue
            mapping.items[key.text] = Entry(key, value)
        for entry in merged:  # keys written beside `<<` win over merged ones
            mapping.items.setdefault(entry.key.text, entry)
        return mapping, size

    def _merge_entries(self, yaml_node: yaml.Node, value: Node) -> list[Entry]:
        if isinstance(value, MapNode):
            return list(value.items.values())
        if isinstance(value, SeqNode) and all(isinstance(v, MapNode) for v in value.items):
            entries: list[Entry] = []
            for item in value.items:  # earlier mappings win, as in YAML's merge spec
                assert isinstance(item, MapNode)
                entries.extend(item.items.values())
            return entries
        self._problem(
            yaml_node,
            "`<<` must merge a mapping or a list of mappings",
            "use `<<: *anchor` where the anchor names a mapping",
        )
        return []

    def _grow(self, size: int, n: int) -> int:
        size += n
        if size > MAX_NODES:
            raise _TooLarge
        return size

    def _check_collection_tag(self, node: yaml.Node, expected: str) -> None:
        if node.tag != expected:
            self._problem(node, f"unsupported YAML tag {node.tag}", "remove the tag")

    def _key(self, node: yaml.Node) -> ScalarNode | None:
        if not isinstance(node, yaml.ScalarNode):
            self._problem(
                node, "a key must be plain text, not a list or mapping", "write the key as text"
            )
            return None
        scalar = self._scalar(node)
        # Keys are names: keep them as written (`07`, `yes`, `1.10` stay as they are).
        return ScalarNode(scalar.line, scalar.column, node.value, node.value, scalar.quoted)

    def _scalar(self, node: yaml.ScalarNode) -> ScalarNode:
        line, column = node.start_mark.line + 1, node.start_mark.column + 1
        quoted = node.style in ("'", '"')
        tag = node.tag
        value: str | int | float | bool | None
        if tag in (_STR, _TIMESTAMP):
            value = node.value  # a date is only text to us
        elif tag == _NULL:
            value = None
        elif tag in self._constructors:
            try:
                constructed = self._constructors[tag](node)
            except ValueError:  # e.g. an integer with more digits than Python converts
                self._problem(node, f"`{node.value[:20]}...` is too long for a number",
                              "put it in quotes if it is a name")
                constructed = None
            assert constructed is None or isinstance(constructed, int | float | bool)
            value = constructed
        else:
            self._problem(node, f"unsupported YAML tag {tag}", "remove the tag")
            value = node.value
        return ScalarNode(line, column, value, node.value, quoted)


def _placeholder(node: yaml.Node) -> Node:
    return ScalarNode(node.start_mark.line + 1, node.start_mark.column + 1, None, "")

"""The loader: YAML -> raw tree, with a 1-based line and column for every node."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from router.errors import RulesError
from router.rules import load_snapshot_text
from router.rules.load import (
    MapNode,
    ScalarNode,
    SeqNode,
    decode_rules_bytes,
    load_text,
    read_rules_file,
)

TEXT = """\
format: 1
upstreams:
  v1:
    endpoints: ["127.0.0.1:9001", '127.0.0.1:9002']
routes:
  - name: main
    to: v1
"""


def load(text: str) -> MapNode:
    root, problems = load_text(text, "r.yaml")
    assert problems == []
    assert isinstance(root, MapNode)
    return root


def test_positions_of_keys_values_and_items() -> None:
    root = load(TEXT)
    fmt = root.items["format"]
    assert (fmt.key.line, fmt.key.column) == (1, 1)
    assert (fmt.value.line, fmt.value.column) == (1, 9)
    upstream = root.items["upstreams"].value
    assert isinstance(upstream, MapNode)
    v1 = upstream.items["v1"]
    assert (v1.key.line, v1.key.column) == (3, 3)
    endpoints = v1.value
    assert isinstance(endpoints, MapNode)
    seq = endpoints.items["endpoints"].value
    assert isinstance(seq, SeqNode)
    assert (seq.line, seq.column) == (4, 16)
    assert [(n.line, n.column) for n in seq.items] == [(4, 17), (4, 35)]
    routes = root.items["routes"].value
    assert isinstance(routes, SeqNode)
    route = routes.items[0]
    assert isinstance(route, MapNode)
    assert (route.line, route.column) == (6, 5)
    to = route.items["to"].value
    assert (to.line, to.column) == (7, 9)


def test_scalars_keep_value_text_and_quoting() -> None:
    root = load("a: 07\nb: '07'\nc: 1.5\nd: yes\ne: ~\nf: 2024-01-01\ng: 0x1f\nh: \"x\"\n")
    values = {k: e.value for k, e in root.items.items()}
    assert all(isinstance(v, ScalarNode) for v in values.values())
    got = {k: (v.value, v.text, v.quoted) for k, v in values.items() if isinstance(v, ScalarNode)}
    assert got == {
        "a": (7, "07", False),  # YAML 1.1 octal; the text keeps what was written
        "b": ("07", "07", True),
        "c": (1.5, "1.5", False),
        "d": (True, "yes", False),
        "e": (None, "~", False),
        "f": ("2024-01-01", "2024-01-01", False),  # a date is only text to us
        "g": (31, "0x1f", False),
        "h": ("x", "x", True),
    }


def test_keys_are_the_text_written() -> None:
    root = load("07: a\nyes: b\n1.10: c\n")
    assert list(root.items) == ["07", "yes", "1.10"]


def test_duplicate_keys_are_problems_at_the_second_key() -> None:
    root, problems = load_text("a: 1\nb:\n  c: 1\n  c: 2\na: 3\n", "r.yaml")
    assert [str(p) for p in problems] == [
        "r.yaml:4:3: yaml: duplicate key `c` (it was already given at line 3; keep one)",
        "r.yaml:5:1: yaml: duplicate key `a` (it was already given at line 1; keep one)",
    ]
    assert isinstance(root, MapNode)
    first = root.items["a"].value
    assert isinstance(first, ScalarNode) and first.value == 1  # the first one is kept


def test_anchors_aliases_and_merge_keys() -> None:
    root = load("base: &b {x: 1, y: 2}\nusers: &u ['1', '2']\nm:\n  <<: *b\n  y: 3\nl: *u\n")
    merged = root.items["m"].value
    assert isinstance(merged, MapNode)
    values = {k: e.value.value for k, e in merged.items.items()}  # type: ignore[attr-defined]
    assert values == {"y": 3, "x": 1}  # keys written beside `<<` win
    assert root.items["l"].value is root.items["users"].value


def test_merge_of_a_list_of_mappings() -> None:
    root = load("a: &a {x: 1}\nb: &b {x: 2, y: 2}\nc:\n  <<: [*a, *b]\n")
    merged = root.items["c"].value
    assert isinstance(merged, MapNode)
    assert {k: e.value.value for k, e in merged.items.items()} == {  # type: ignore[attr-defined]
        "x": 1,
        "y": 2,
    }


def test_bad_merge_is_a_problem() -> None:
    _, problems = load_text("a: &a [1]\nb:\n  <<: *a\n", "r.yaml")
    assert [(p.line, p.column, p.message) for p in problems] == [
        (1, 4, "`<<` must merge a mapping or a list of mappings")
    ]


def test_recursive_alias_is_a_problem_not_a_crash() -> None:
    _, problems = load_text("a: &a [1, *a]\n", "r.yaml")
    assert [p.message for p in problems] == ["an alias refers to a node that contains it"]


def test_alias_bomb_is_refused() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    with pytest.raises(RulesError) as info:
        load_text("\n".join(lines) + "\n", "r.yaml")
    assert "expands to more than" in str(info.value)


def test_unsupported_tag() -> None:
    _, problems = load_text("a: !!binary aGVsbG8=\nb: !custom {x: 1}\n", "r.yaml")
    assert [(p.line, p.column, p.message, p.hint) for p in problems] == [
        (1, 4, "unsupported YAML tag tag:yaml.org,2002:binary", "remove the tag"),
        (2, 4, "unsupported YAML tag !custom", "remove the tag"),
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "a: 1\n  b: 2\n",
            "r.yaml:2:4: yaml: not valid YAML: mapping values are not allowed in "
            "this context (check the indentation, or quote a value that "
            "contains ': ')",
        ),
        (
            "a: [1, 2\n",
            "r.yaml:2:1: yaml: not valid YAML: did not find expected ',' or ']' "
            "(while parsing a flow sequence at line 1) (check the indentation and "
            "quoting near here)",
        ),
        (
            "a: *nope\n",
            "r.yaml:1:4: yaml: not valid YAML: found undefined alias "
            "(define the anchor (&name) before using it (*name))",
        ),
        (
            "a: 1\n---\nb: 2\n",
            "r.yaml:2:1: yaml: more than one YAML document (`---`) "
            "(keep one document per rule file)",
        ),
        (
            "a:\n\t- b\n",
            "r.yaml:2:1: yaml: not valid YAML: found character that cannot "
            "start any token (indent with spaces, not tabs)",
        ),
        (
            "a: @x\n",
            "r.yaml:1:4: yaml: not valid YAML: found character that cannot start any "
            "token (quote a value that starts with one of @ ` % * & ! |)",
        ),
    ],
)
def test_syntax_errors_have_a_position_and_a_hint(text: str, expected: str) -> None:
    with pytest.raises(RulesError) as info:
        load_text(text, "r.yaml")
    assert [str(p) for p in info.value.problems] == [expected]


def test_empty_file() -> None:
    assert load_text("", "r.yaml") == (None, [])
    assert load_text("# only a comment\n", "r.yaml") == (None, [])


def test_non_utf8_is_reported_where_it_happens() -> None:
    with pytest.raises(RulesError) as info:
        decode_rules_bytes(b"a: 1\nb: caf\xe9\n", "r.yaml")
    assert str(info.value) == "r.yaml:2:7: file: the file is not valid UTF-8 (save it as UTF-8)"


def test_utf8_bom_is_accepted() -> None:
    assert decode_rules_bytes(b"\xef\xbb\xbfa: 1\n", "r.yaml") == "a: 1\n"


def test_unreadable_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.yaml")
    with pytest.raises(RulesError) as info:
        read_rules_file(missing)
    assert str(info.value) == (
        f"{missing}:1:1: file: cannot read the rule file: No such file or directory "
        "(check the path and its permissions)"
    )
    with pytest.raises(RulesError, match="Is a directory"):
        read_rules_file(str(tmp_path))


def test_columns_count_characters_not_bytes() -> None:
    root = load("名前: [a, b]\n")
    seq = root.items["名前"].value
    assert isinstance(seq, SeqNode)
    assert [(n.line, n.column) for n in seq.items] == [(1, 6), (1, 9)]


# -- fuzzing: any text is either a snapshot or a RulesError, nothing else -----------------
_yaml_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=12)
)
_yaml_trees = st.recursive(
    _yaml_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.sampled_from(
                ["format", "upstreams", "routes", "user_id", "body_limit", "name", "to",
                 "split", "pins", "match", "endpoints", "users", "hosts", "salt", "x"]
            ) | st.text(max_size=6),
            children,
            max_size=5,
        ),
    ),
    max_leaves=25,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(tree=_yaml_trees)
def test_fuzz_any_yaml_tree_is_a_snapshot_or_a_rules_error(tree: object) -> None:
    text = yaml.safe_dump(tree)
    try:
        load_snapshot_text(text, "fuzz.yaml")
    except RulesError as exc:
        assert all(p.file == "fuzz.yaml" and p.line >= 1 for p in exc.problems)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=300))
def test_fuzz_any_text_is_a_snapshot_or_a_rules_error(text: str) -> None:
    try:
        load_snapshot_text(text, "fuzz.yaml")
    except RulesError as exc:
        assert exc.problems

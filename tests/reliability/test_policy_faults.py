"""Hostile and malformed policy documents (issue #12, items 1 and 2): every one ends in a
``PolicyError`` that names the file, quickly, with a bounded message; nothing else escapes."""

from __future__ import annotations

import os
import time

import pytest
from helpers import GOOD_POLICY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saferedir_sdk import PolicyError, load_policy
from saferedir_sdk.policy import MAX_POLICY_BYTES, parse_policy, parse_policy_bytes

GOOD = GOOD_POLICY
# billion laughs, 8 levels of 10: 10^8 strings from 456 bytes
BOMB = 'version: 1\nname: t\na: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{c}: &{c} [{','.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefg", "bcdefgh")
)


def _refused(text: str | bytes, *, contains: str = "") -> PolicyError:
    start = time.perf_counter()
    with pytest.raises(PolicyError) as info:
        (parse_policy_bytes if isinstance(text, bytes) else parse_policy)(text, "hostile.yaml")
    assert time.perf_counter() - start < 2.0
    message = str(info.value)
    assert message.startswith("invalid policy hostile.yaml") and len(message) < 10_000, message[:500]
    assert contains in message, message
    return info.value


def test_alias_bomb_is_refused_before_anything_expands():
    _refused(BOMB, contains="anchors and aliases")


@pytest.mark.parametrize(
    "value",
    [
        "!!python/object/apply:os.system ['true']",
        "!!python/name:os.system",
        "!custom x",
        "!!bool yes",
        "!!timestamp 2026-01-01",
        "!!binary aGVsbG8=",
        "!!set {a, b}",
    ],
)
def test_explicit_tags_are_refused(value):
    _refused(GOOD.replace("name: t", f"name: t\ndescription: {value}"), contains="explicit YAML tags")


def test_complex_and_non_string_keys_are_located_errors():
    err = _refused(GOOD + "? [a, b]\n: c\n", contains="plain names")
    assert err.issues[0].line == 7
    _refused(GOOD + "1: x\n", contains="unknown key")


def test_deep_nesting_is_refused_without_recursion():
    _refused("a: " + "[" * 5000 + "]" * 5000, contains="nested deeper")
    _refused("a: " + "{b: " * 5000 + "1" + "}" * 5000, contains="nested deeper")


@pytest.mark.parametrize(
    "field, value",
    [
        ("threshold", "'0.5'"),
        ("strength", '"1.3"'),
        ("replace_steps", "true"),
        ("replace_steps", "1.0"),
        ("sticky", '"yes"'),
        ("sticky", "1"),
        ("confirm_checks", "'2'"),
        ("apply_to_uncond", '"false"'),
    ],
)
def test_wrong_types_are_errors_not_coerced(field, value):
    err = _refused(GOOD + f"    {field}: {value}\n")
    assert err.issues[0].loc == f"concepts.0.{field}" and err.issues[0].line == 7


def test_integers_are_numbers_and_implicit_dates_are_text():
    policy = parse_policy(GOOD + "    strength: 1\n    threshold: 0.25\n")
    assert policy.concepts[0].strength == 1.0
    assert (
        parse_policy(GOOD.replace("name: t", "name: t\ndescription: 2026-01-01")).description == "2026-01-01"
    )


def test_sha256_pins_are_case_insensitive_and_kept_lower_case():
    pin = "AB" * 32
    policy = parse_policy(GOOD.replace("{plugin: nudity}", f"{{plugin: nudity, sha256: {pin}}}"))
    assert policy.concepts[0].redirector.sha256 == pin.lower()
    _refused(GOOD.replace("{plugin: nudity}", "{plugin: nudity, sha256: abc}"))


def test_oversized_non_utf8_and_special_files(tmp_path):
    _refused(b"version: 1\n" + b"#" * MAX_POLICY_BYTES, contains="larger than")
    _refused(GOOD.encode() + b"\xff\xfe", contains="not UTF-8")
    fifo = tmp_path / "policy.fifo"
    os.mkfifo(fifo)
    with pytest.raises(PolicyError, match="not a regular file"):
        load_policy(fifo)  # a FIFO is refused, never opened (opening it would block)
    big = tmp_path / "big.yaml"
    big.write_bytes(GOOD.encode() + b"#" * (2 * MAX_POLICY_BYTES))
    with pytest.raises(PolicyError, match="larger than"):
        load_policy(big)


def test_many_problems_give_a_bounded_message():
    rules = "".join(
        f"  - concept: c{i}\n    category: nope\n    redirector: {{plugin: x}}\n" for i in range(500)
    )
    err = _refused(f"version: 1\nname: t\nconcepts:\n{rules}", contains="... and 480 more")
    assert len(err.issues) == 500


# --- fuzzing: documents assembled from the parts attackers and typos use ---------------------

FRAGMENTS = [
    "version: 1\n",
    "name: t\n",
    "concepts:\n",
    "  - concept: nudity\n",
    "    category: nsfw\n",
    "    redirector: {plugin: nudity}\n",
    "    threshold: 0.5\n",
    "defaults:\n",
    "  strength: 9\n",
    "audit: {sinks: [file]}\n",
    "block: {color: [0, 0, 256]}\n",
    "&a ",
    "*a ",
    "!!python/object:os.system ",
    "!!bool ",
    "!tag ",
    "? ",
    ": ",
    "- ",
    "[",
    "]",
    "{",
    "}",
    ",",
    "'",
    '"',
    "\t",
    "\n",
    "  ",
    "~",
    "null",
    "1e309",
    ".nan",
    "-.inf",
    "0x1f",
    "2026-01-01",
    "yes",
    "\u202e",
    "\ufeff",
    "\x00",
    "%YAML 1.1\n",
    "---\n",
    "...\n",
    "#",
    "|\n",
    ">-\n",
    "<<: *a\n",
    "\\",
    "é",
    "😀",
]


@settings(max_examples=2000, deadline=2000, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    st.lists(
        st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=12)),
        max_size=40,
    ),
    st.integers(0, 60),
)
def test_fuzzed_documents_only_ever_raise_policy_error(parts, nesting):
    text = "".join(parts) + "[" * nesting
    try:
        parse_policy(text, "fuzz.yaml")
    except PolicyError as exc:
        assert len(str(exc)) < 10_000


@settings(max_examples=2000, deadline=2000, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.binary(max_size=200), st.integers(0, len(GOOD)))
def test_fuzzed_bytes_only_ever_raise_policy_error(junk, at):
    raw = GOOD.encode()
    try:
        parse_policy_bytes(raw[:at] + junk + raw[at:], "fuzz.yaml")
    except PolicyError as exc:
        assert len(str(exc)) < 10_000

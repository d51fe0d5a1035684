"""Policy files: the shipped examples validate; mistakes give located, typed errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import GOOD_POLICY
from hypothesis import given, settings
from hypothesis import strategies as st

from saferedir_sdk import PolicyError, load_policy
from saferedir_sdk.cli import main
from saferedir_sdk.policy import parse_policy, policy_json_schema

ROOT = Path(__file__).resolve().parents[1]
GOOD = GOOD_POLICY


SHIPPED = sorted((ROOT / "policies").glob("*.yaml")) + sorted((ROOT / "plugins").glob("*/*/policies/*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_policies_validate(path):
    loaded = load_policy(path)
    assert loaded.policy.concepts and len(loaded.sha256) == 64


def test_defaults_fill_unset_rule_fields():
    policy = parse_policy(GOOD)
    assert policy.fail_mode == "closed" and policy.audit.prompt_logging == "sha256"
    rule = policy.effective_rules()[0]
    assert (
        rule.action,
        rule.threshold,
        rule.strength,
        rule.replace_steps,
        rule.sticky,
        rule.apply_to_uncond,
    ) == ("redirect", 0.5, 1.3, 1, True, False)


def _error(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.yaml")
    return info.value


def test_typo_key_names_path_and_line():
    err = _error(GOOD + "    treshold: 0.4\n")
    assert [(i.loc, i.line) for i in err.issues] == [("concepts.0.treshold", 7)]
    assert "unknown key" in str(err) and "p.yaml" in str(err)


def test_wrong_type_names_path_and_line():
    err = _error(GOOD + "    threshold: high\n")
    assert err.issues[0].loc == "concepts.0.threshold" and err.issues[0].line == 7
    assert "'high'" in str(err)


def test_unknown_action_lists_the_allowed_ones():
    err = _error(GOOD + "    action: erase\n")
    assert err.issues[0].loc == "concepts.0.action"
    assert "'redirect', 'block' or 'monitor'" in err.issues[0].message and "'erase'" in err.issues[0].message


@pytest.mark.parametrize(
    "text, loc",
    [
        (GOOD + "fail_mode: maybe\n", "fail_mode"),
        (GOOD.replace("version: 1", "version: 2"), "version"),
        (GOOD.replace("{plugin: nudity}", "{plugin: nudity, path: x.safetensors}"), "concepts.0.redirector"),
        (GOOD.replace("{plugin: nudity}", "{plugin: nudity, sha256: abc}"), "concepts.0.redirector.sha256"),
        (GOOD + "    window: {start: 5, stop: 2}\n", "concepts.0.window"),
        (GOOD + "audit: {sinks: [syslog]}\n", "audit.sinks.0"),
        (GOOD + "  - {concept: nudity, category: nsfw, redirector: {plugin: x}}\n", "concepts.1.concept"),
        ("version: 1\nname: t\nconcepts: []\n", "concepts"),
        (GOOD + "name: again\n", "name"),
        (GOOD + "    shift: {scale: 0.3, unsafe: [a red box], safe: []}\n", "concepts.0.shift.safe"),
        (GOOD + "    shift: {scale: 2, unsafe: [a red box], safe: [a blue box]}\n", "concepts.0.shift.scale"),
        (
            GOOD + "    shift: {scale: 0.3, unsafe: [a red box], safe: [a blue box], target: x}\n",
            "concepts.0.shift.target",
        ),
    ],
)
def test_each_mistake_is_located(text, loc):
    assert loc in [i.loc for i in _error(text).issues]


def test_yaml_syntax_error_gives_the_line():
    err = _error("version: 1\nname: [oops\n")
    assert err.issues[0].line is not None and "not valid YAML" in err.issues[0].message


def test_missing_file_is_a_policy_error(tmp_path):
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "none.yaml")


@settings(max_examples=60, deadline=None)
@given(
    threshold=st.floats(0.01, 0.99),
    strength=st.floats(0.05, 4.0),
    replace_steps=st.integers(0, 50),
    action=st.sampled_from(["redirect", "block", "monitor"]),
    category=st.sampled_from(["nsfw", "artist_style", "object", "custom"]),
)
def test_any_valid_rule_round_trips_through_yaml(threshold, strength, replace_steps, action, category):
    doc = {
        "version": 1,
        "name": "h",
        "concepts": [
            {
                "concept": "c",
                "category": category,
                "redirector": {"plugin": "c"},
                "action": action,
                "threshold": threshold,
                "strength": strength,
                "replace_steps": replace_steps,
            }
        ],
    }
    rule = parse_policy(json.dumps(doc)).effective_rules()[0]
    assert (rule.threshold, rule.strength, rule.replace_steps, rule.action, rule.category) == (
        threshold,
        strength,
        replace_steps,
        action,
        category,
    )


def test_json_schema_forbids_extra_keys():
    schema = policy_json_schema()
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["ConceptRule"]["additionalProperties"] is False
    assert schema["$defs"]["ConceptRule"]["properties"]["action"]["enum"] == ["redirect", "block", "monitor"]
    # a rule's tunable fields default to the policy's `defaults`, not to a number of their own
    threshold = schema["$defs"]["ConceptRule"]["properties"]["threshold"]
    assert "default" not in threshold and "policy's `defaults`" in threshold["description"]
    assert schema["$defs"]["RuleSettings"]["properties"]["threshold"]["default"] == 0.5


def test_a_rule_inherits_exactly_the_fields_it_does_not_set():
    policy = parse_policy(
        GOOD.replace("name: t", "name: t\ndefaults: {threshold: 0.3, strength: 2.0}") + "    strength: 1.0\n"
    )
    rule = policy.effective_rules()[0]
    assert (rule.threshold, rule.strength, rule.replace_steps) == (0.3, 1.0, 1)
    assert rule.effective(policy.defaults) == rule, "applying the defaults twice changes nothing"


def test_a_concept_named_twice_is_located_at_the_second_rule():
    text = GOOD + "  - concept: nudity\n    category: nsfw\n    redirector: {plugin: other}\n"
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.yaml")
    (issue,) = info.value.issues
    assert (issue.loc, issue.line) == ("concepts.1.concept", 7) and "concepts.0" in issue.message
    assert len(str(info.value)) < 300, "the message names the place, it does not dump the document"


def test_cli_validate_ok_and_failures(tmp_path, capsys):
    assert main(["validate", str(ROOT / "policies" / "corp.yaml")]) == 0
    assert "OK" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    for text, needle in [
        (GOOD + "    treshold: 0.4\n", "concepts.0.treshold (line 7): unknown key"),
        (GOOD + "    threshold: high\n", "concepts.0.threshold (line 7)"),
        (GOOD + "    action: erase\n", "concepts.0.action (line 7)"),
        (
            GOOD + "    decide_from: 10\n",
            "concepts.0.decide_from (line 7): unknown key: replaced by decide_at_t",
        ),
    ]:
        bad.write_text(text)
        assert main(["validate", str(bad)]) == 1
        err = capsys.readouterr().err
        assert "INVALID" in err and str(bad) in err and needle in err


def test_cli_validate_check_bundles_loads_the_packs_the_corp_policy_names(capsys):
    assert main(["validate", "--check-bundles", str(ROOT / "policies" / "corp.yaml")]) == 0
    assert "bundles: 3 concept(s) loaded" in capsys.readouterr().out


def test_corp_policy_without_its_packs_is_unenforceable_and_says_what_to_do(capsys, monkeypatch):
    monkeypatch.setenv("SAFEREDIR_PLUGINS", "saferedir-adapters,saferedir-shapes")  # the packs not trusted
    assert main(["validate", "--check-bundles", str(ROOT / "policies" / "corp.yaml")]) == 1
    err = capsys.readouterr().err
    assert "no loaded plugin registers concept 'nudity'" in err
    assert "saferedir-nudity (not in SAFEREDIR_PLUGINS" in err
    assert "saferedir-shapes (not in policy 'corp' plugins.allow" in err
    assert "saferedir plugins new nudity" in err


def test_corp_policy_on_a_backbone_its_packs_have_no_bundle_for_says_how_to_train_one(
    pipe, tmp_path, monkeypatch
):
    from saferedir_sdk import BackboneMismatchError, SafeRedirGuard

    monkeypatch.chdir(tmp_path)  # its audit file is relative to the working directory
    guard = SafeRedirGuard.from_policy(ROOT / "policies" / "corp.yaml")
    with pytest.raises(
        BackboneMismatchError, match="train one with saferedir train --backbone PIPELINE_FOLDER"
    ):
        guard.wrap(pipe)  # the packs ship bundles for the Shapes backbone only


def test_console_script_schema_is_json_and_loads_no_plugin_or_model_code():
    out = subprocess.run(
        [sys.executable, "-m", "saferedir_sdk.cli", "policy", "schema"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out)["title"] == "saferedir policy"
    probe = (
        "import sys; from saferedir_sdk.cli import main; "
        "rc = main(['validate', sys.argv[1]]); "
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'saferedir_shapes', 'saferedir_adapters') "
        "if m in sys.modules); print(rc, heavy)"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe, str(ROOT / "policies" / "corp.yaml")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert run.stdout.strip().splitlines()[-1] == "0 []", run.stdout + run.stderr


def test_shipped_policy_by_package_reference(capsys):
    assert main(["validate", "shapes:demo"]) == 0
    assert "policy 'shapes-demo'" in capsys.readouterr().out
    assert main(["validate", "shapes:nope"]) == 1
    err = capsys.readouterr().err
    assert "no installed plugin ships a policy 'shapes:nope' (shipped: [" in err and "'shapes:demo'" in err


def test_a_shift_needs_a_redirect_rule():
    shift = "    shift: {scale: 0.3, unsafe: [a red box], safe: [a blue box]}\n"
    assert parse_policy(GOOD + shift, "p.yaml").concepts[0].shift.scale == 0.3
    with pytest.raises(
        PolicyError, match="concept 'nudity': shift needs action redirect \\(got action monitor\\)"
    ):
        parse_policy(GOOD + "    action: monitor\n" + shift, "p.yaml")

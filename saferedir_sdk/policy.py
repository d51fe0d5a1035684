"""The policy file: pydantic v2 models of the YAML document and its loader.

Nothing else in the SDK parses YAML. Loading gives typed objects or a :class:`PolicyError` that
names the file, the dotted key path (``concepts.1.threshold``) and, where YAML gives it, the line.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from .concepts import Category
from .errors import PolicyError, PolicyIssue

Action = Literal["redirect", "block", "monitor"]
#: a policy a plugin ships, named ``PLUGIN:NAME`` (``shapes:demo``)
POLICY_REF = re.compile(r"^(?P<plugin>[A-Za-z0-9_.\-]+):(?P<name>[A-Za-z0-9_.\-]+)$")
Probability = Annotated[float, Field(gt=0.0, lt=1.0)]
Slug = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.\-]*$", max_length=64)]
#: a sha256 pin, 64 hex digits in either case (kept lower-case)
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$"), AfterValidator(str.lower)]
#: limits checked before anything is built from a policy document (a policy is a few kB)
MAX_POLICY_BYTES = 256 * 1024
MAX_POLICY_DEPTH = 32


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AuditSettings(_Strict):
    """Where audit records go and how prompts appear in them."""

    sinks: list[Literal["stdout", "file"]] = Field(
        default_factory=lambda: ["file"],
        description="stdout: one JSON object per line on standard output; file: JSON lines appended to `file`.",
    )
    file: str | None = Field(
        default="saferedir-audit.jsonl",
        description="JSON-lines audit file (relative paths resolve against the working directory).",
    )
    prompt_logging: Literal["none", "sha256", "hmac-sha256", "full"] = Field(
        default="sha256",
        description="How prompts appear in records: none; sha256 (unsalted: a dictionary of likely prompts "
        "reverses it); hmac-sha256 (keyed: the key comes from `prompt_key_env` or `prompt_key_file`); "
        "full (raw text).",
    )
    prompt_key_env: str = Field(
        "SAFEREDIR_PROMPT_KEY",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding the hmac-sha256 prompt key (at least 16 bytes).",
    )
    prompt_key_file: str | None = Field(
        None, description="File holding the hmac-sha256 prompt key instead (read when the guard is built)."
    )

    @model_validator(mode="after")
    def _file_needed(self) -> AuditSettings:
        if "file" in self.sinks and not self.file:
            raise ValueError("the 'file' sink needs audit.file")
        return self


class RuleSettings(_Strict):
    """The tunable fields of a concept rule, declared once: the policy's ``defaults`` are a
    ``RuleSettings``, and every :class:`ConceptRule` has the same fields, each inherited from the
    defaults unless the rule sets it."""

    threshold: Probability = Field(0.5, description="p(unsafe) at or above which a check triggers.")
    strength: float = Field(
        1.3, gt=0.0, le=4.0, description="s in E' = E + s * alpha * m * normalize(D) * |E|."
    )
    replace_steps: int = Field(
        1, ge=0, le=1000, description="Recheck every replace_steps + 1 denoising steps (reference default 1)."
    )
    sticky: bool = Field(
        True, description="Once triggered, a sample stays redirected for the rest of the call."
    )
    confirm_checks: int = Field(
        1,
        ge=1,
        le=100,
        description="With sticky: a trigger sticks after this many consecutive positive checks; until then a "
        "negative check (the latent no longer shows the concept) releases the sample. 1: sticks at the first hit.",
    )
    decide_at_t: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Checks at a normalised timestep (0 clean .. 1 pure noise) above this record p(unsafe) but never "
        "trigger: the decision waits for a latent that shows what the image is becoming (a NaN/inf score still "
        "triggers). A noise level, not a step index: 0.5 is step 10 of 20 and step 4 of 8 on a 1000-timestep "
        "schedule. A call in which the rule has fewer such checks than it needs to decide (1; confirm_checks "
        "with rewind) is not enforced: it fails under fail_mode closed. 1: every check decides.",
    )
    rewind: bool = Field(
        False,
        description="Decide on the unredirected trajectory, then redirect from the start: the call first runs "
        "with this rule only watching; if it flags samples (sticky, confirmed), the call runs again from the "
        "same starting noise (the generators' and global RNG states restored) with those samples redirected "
        "from the rule's first check (or its redirect_at_t). Costs the first run's steps again, on calls that "
        "flag; a call that flags nothing runs once. Needs sticky and action redirect.",
    )
    redirect_at_t: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="With rewind: the regenerated samples are moved only at steps whose normalised timestep is at "
        "or below this (a noise level, like decide_at_t): the start of the trajectory, where the layout forms, is "
        "the unredirected one, and the push starts where the concept forms. Must be at or above decide_at_t (a "
        "rule escalates at checks that decide, which must find the sample moving). 1: from the first step.",
    )
    escalate: float = Field(
        1.0,
        ge=1.0,
        le=4.0,
        description="At a check where a sample already redirected still scores unsafe, its redirection strength "
        "is multiplied by this (the concept still shows in the latent: push further). 1: off.",
    )
    escalate_max: float = Field(2.0, ge=1.0, le=8.0, description="Cap of the escalation multiplier.")
    unresolved: Literal["keep", "block"] = Field(
        "keep",
        description="A sample the redirection did not clear: its last confirm_checks checks that could trigger "
        "(at or below decide_at_t), all made while this rule was already moving it, still scored unsafe (the "
        "concept still shows in the latent, escalation included). Every audit record says so (`unresolved`). "
        "keep: the redirected image is returned; block: it is withheld as the policy's `block` says "
        "(placeholder or raise), decided when the call ends. Needs action redirect and a bundle whose classifier "
        "reads the latent alone (classifier_reads: latent): one that reads the prompt too keeps seeing the words, "
        "which redirection does not change (its records say null; block with it is refused).",
    )
    apply_to_uncond: bool = Field(
        False,
        description="Also move the unconditional (negative) half of a CFG batch. Off: only the prompt moves.",
    )
    move_pooled: bool = Field(
        True,
        description="On a backbone with a pooled text embedding (SDXL's text_embeds): move it with the "
        "tokens when the bundle has a pooled head. False: the classifier still reads it, only the tokens move.",
    )
    gates: Literal["heads", "yield"] = Field(
        "heads",
        description="How the redirector's scale alpha and token mask m, heads that read the prompt, apply to a "
        "sample the rule moves. heads: as predicted at every check. yield: the gates are read at the first "
        "check at which the sample is triggered in a run where the rule moves it (in a rewind rule's second "
        "run, its first check, also where redirect_at_t delays the move); if they "
        "shut the move out there (alpha under 0.5, a token stream whose mask is under 0.5 on every token, or "
        "a pooled gate under 0.5), every such gate opens to 1 for the rest of the call, so a wording the heads "
        "do not know cannot veto a move the classifier asked for (the record says gates_opened); if they are "
        "open there, the heads' own values apply throughout, their schedule over the steps included. Meant "
        "for a bundle whose classifier reads the latent alone (classifier_reads: latent).",
    )
    encoder_mismatch: Literal["error", "warn"] = Field(
        "error",
        description="A pipeline whose text encoder weights differ from the bundle's (an edited, "
        "pre-unlearned encoder; same shapes and tokenizer): error = the bundle does not fit (closed: wrap "
        "fails); warn = enforce anyway, warn, and record the mismatch in every audit record.",
    )


class StepWindow(_Strict):
    """Denoising steps [start, stop) of a generation in which a concept is checked and applied."""

    start: int = Field(0, ge=0)
    stop: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> StepWindow:
        if self.stop is not None and self.stop <= self.start:
            raise ValueError(f"stop ({self.stop}) must be greater than start ({self.start})")
        return self

    def contains(self, step: int) -> bool:
        return step >= self.start and (self.stop is None or step < self.stop)


class RedirectorRef(_Strict):
    """Where a concept's trained redirector comes from: a bundle file, or a concept plugin."""

    path: str | None = Field(
        None, description="Bundle file; relative paths resolve against the policy's folder."
    )
    plugin: str | None = Field(None, description="Concept name registered by an installed concept plugin.")
    sha256: Sha256 | None = Field(None, description="Pin: the bundle file must have exactly this sha256.")

    @model_validator(mode="after")
    def _exactly_one_source(self) -> RedirectorRef:
        if (self.path is None) == (self.plugin is None):
            raise ValueError("give exactly one of 'path' or 'plugin'")
        return self


def _inherited_defaults_in_schema(schema: dict[str, Any]) -> None:
    """In the JSON Schema a rule's tunable fields default to the policy's ``defaults``, not to
    the built-in values."""
    for name in RuleSettings.model_fields:
        prop = schema.get("properties", {}).get(name)
        if prop is not None:
            prop.pop("default", None)
            prop["description"] = prop.get("description", "") + " Default: the policy's `defaults`."


#: one prompt of a shift's lists (a few words to a sentence)
ShiftPrompt = Annotated[str, Field(min_length=1, max_length=500, pattern=r"\S")]


class ShiftSettings(_Strict):
    """A rule's concept shift: besides the heads' move, a sample the rule moves has every token state
    (and a pooled embedding the rule moves) shifted along one direction of the text encoder's own
    space, ``scale * |E| * unit(mean(safe) - mean(unsafe))`` at the rule's strength, each prompt
    read as the mean of its real tokens' states. The heads move the tokens they recognise as the
    concept; the shift moves a sample whose prompt names no concept word (a description) the way
    the encoder separates the two lists. Computed from the pipeline's text encoder when the guard
    wraps it."""

    scale: float = Field(
        gt=0.0,
        le=1.0,
        description="The shift per token as a share of the token state's norm, before the rule's strength.",
    )
    unsafe: list[ShiftPrompt] = Field(
        min_length=1,
        max_length=256,
        description="Prompts that name the concept (what the shift moves away from).",
    )
    safe: list[ShiftPrompt] = Field(
        min_length=1,
        max_length=256,
        description="The same prompts with the concept replaced by the safe target (what it moves towards).",
    )


class ConceptRule(RuleSettings):
    """One concept the policy governs. Fields of :class:`RuleSettings` it does not set come from
    the policy's ``defaults`` (:meth:`effective`)."""

    model_config = ConfigDict(json_schema_extra=_inherited_defaults_in_schema)

    concept: Slug
    category: Category
    redirector: RedirectorRef
    action: Action = "redirect"
    window: StepWindow = Field(default_factory=StepWindow)
    shift: ShiftSettings | None = Field(
        None,
        description="A concept shift (redirect rules): every token of a sample the rule moves also moves "
        "along the encoder's direction from `unsafe` to `safe`, so a wording the heads do not recognise "
        "still moves. Unset: the heads' move alone.",
    )

    def effective(self, defaults: RuleSettings) -> ConceptRule:
        """This rule with every :class:`RuleSettings` field it does not set taken from ``defaults``."""
        inherited = {
            k: getattr(defaults, k) for k in RuleSettings.model_fields if k not in self.model_fields_set
        }
        return self.model_copy(update=inherited)


#: an allow-list entry: a distribution name, optionally pinned to one version (``saferedir-shapes==0.3.0``)
PluginAllow = Annotated[
    str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(==[A-Za-z0-9.+!_-]+)?$", max_length=200)
]


class PluginSettings(_Strict):
    allow: list[PluginAllow] | None = Field(
        None,
        description="Distributions whose saferedir plugins a guard built from this policy may import "
        "(NAME or NAME==VERSION); others are never imported. Unset: whatever SAFEREDIR_PLUGINS allows "
        "(all installed plugins when that is unset too). Applies together with SAFEREDIR_PLUGINS.",
    )


class BlockSettings(_Strict):
    """What `block` does to a flagged sample."""

    mode: Literal["placeholder", "raise"] = Field(
        "placeholder",
        description="placeholder: the flagged samples' images are replaced, the others returned; "
        "raise: the call raises GenerationBlocked.",
    )
    color: tuple[Annotated[int, Field(ge=0, le=255)], ...] = Field(
        (0, 0, 0), min_length=3, max_length=3, description="RGB of the placeholder image."
    )


class Policy(_Strict):
    """A saferedir policy document (``version: 1``)."""

    version: Literal[1]
    name: Slug
    description: str = ""
    fail_mode: Literal["closed", "open"] = Field(
        "closed",
        description="closed: a concept that cannot be enforced stops the guard; open: the guard runs "
        "without it and every audit record says so (fail_open).",
    )
    audit: AuditSettings = Field(default_factory=AuditSettings)
    defaults: RuleSettings = Field(default_factory=RuleSettings)
    block: BlockSettings = Field(default_factory=BlockSettings)
    plugins: PluginSettings = Field(default_factory=PluginSettings)
    concepts: list[ConceptRule] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_concepts(self) -> Policy:
        seen: set[str] = set()
        for rule in self.concepts:
            if rule.concept in seen:
                raise ValueError(f"concept '{rule.concept}' appears more than once")
            seen.add(rule.concept)
        return self

    @model_validator(mode="after")
    def _rewind_needs_a_sticky_redirect(self) -> Policy:
        for rule in self.effective_rules():
            if rule.rewind and (rule.action != "redirect" or not rule.sticky):
                raise ValueError(
                    f"concept '{rule.concept}': rewind needs action redirect and sticky true (got action "
                    f"{rule.action}, sticky {str(rule.sticky).lower()}): it regenerates the samples a "
                    "confirmed trigger flags, redirected from the start"
                )
        return self

    @model_validator(mode="after")
    def _redirect_at_t_needs_a_rewind(self) -> Policy:
        for rule in self.effective_rules():
            if rule.redirect_at_t < 1.0 and not rule.rewind:
                raise ValueError(
                    f"concept '{rule.concept}': redirect_at_t {rule.redirect_at_t} needs rewind true: only a "
                    "regenerated trajectory, decided on beforehand, can start its redirection late"
                )
            if rule.redirect_at_t < rule.decide_at_t:
                raise ValueError(
                    f"concept '{rule.concept}': redirect_at_t ({rule.redirect_at_t}) must be at or above "
                    f"decide_at_t ({rule.decide_at_t}): a check that decides must find the sample moving"
                )
        return self

    @model_validator(mode="after")
    def _unresolved_needs_a_redirect(self) -> Policy:
        for rule in self.effective_rules():
            if rule.unresolved == "block" and rule.action != "redirect":
                raise ValueError(
                    f"concept '{rule.concept}': unresolved block needs action redirect (got action "
                    f"{rule.action}): it withholds the images the rule's redirection did not clear"
                )
        return self

    @model_validator(mode="after")
    def _shift_needs_a_redirect(self) -> Policy:
        for rule in self.effective_rules():
            if rule.shift is not None and rule.action != "redirect":
                raise ValueError(
                    f"concept '{rule.concept}': shift needs action redirect (got action {rule.action}): it "
                    "moves the samples the rule redirects"
                )
        return self

    def effective_rules(self) -> list[ConceptRule]:
        """The concept rules with the policy's defaults filled in: what the engine enforces."""
        return [rule.effective(self.defaults) for rule in self.concepts]


class LoadedPolicy(BaseModel):
    """A validated policy with where it came from: its path and the sha256 of its bytes."""

    model_config = ConfigDict(frozen=True)

    policy: Policy
    path: Path
    sha256: str

    @property
    def folder(self) -> Path:
        return self.path.parent


# --- loading --------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that rejects duplicate mapping keys instead of keeping the last one."""


def _yaml_problem(exc: yaml.YAMLError, path: Path) -> PolicyError:
    mark = getattr(exc, "problem_mark", None)
    line = mark.line + 1 if mark is not None else None
    problem = getattr(exc, "problem", None) or str(exc)
    return PolicyError(path, [PolicyIssue("", f"not valid YAML: {_short(problem, 200, quote=False)}", line)])


def _prescan(text: str, path: Path) -> None:
    """Walk the YAML event stream (the parser is iterative) before anything is built, and refuse
    what a policy never needs and an attacker uses: anchors and aliases (an alias bomb expands a
    few hundred bytes into gigabytes), explicit tags (``!!python/...``, ``!!bool``: a value's type
    is the schema's business), and nesting deeper than :data:`MAX_POLICY_DEPTH`."""
    depth = 0
    try:
        for event in yaml.parse(text, Loader=_UniqueKeyLoader):
            line = event.start_mark.line + 1 if event.start_mark is not None else None
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise PolicyError(
                    path,
                    [
                        PolicyIssue(
                            "",
                            "YAML anchors and aliases (&name, *name) are not allowed in a policy: write "
                            "the value out, or set it once under `defaults`",
                            line,
                        )
                    ],
                )
            if getattr(event, "tag", None) is not None:
                raise PolicyError(
                    path,
                    [
                        PolicyIssue(
                            "",
                            f"explicit YAML tags are not allowed in a policy (found {_short(event.tag, 60)}): "
                            "write plain values, the schema gives them their types",
                            line,
                        )
                    ],
                )
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_POLICY_DEPTH:
                    raise PolicyError(
                        path, [PolicyIssue("", f"nested deeper than {MAX_POLICY_DEPTH} levels", line)]
                    )
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
    except yaml.YAMLError as exc:
        raise _yaml_problem(exc, path) from None


def _compose_checked(text: str, path: Path) -> yaml.Node | None:
    _prescan(text, path)
    try:
        node = yaml.compose(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise _yaml_problem(exc, path) from None
    issues: list[PolicyIssue] = []
    _find_duplicate_keys(node, (), issues)
    if issues:
        raise PolicyError(path, issues)
    return node


def _find_duplicate_keys(node: yaml.Node | None, loc: tuple[str, ...], issues: list[PolicyIssue]) -> None:
    """Duplicate and non-scalar mapping keys (depth is bounded by :func:`_prescan`)."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                issues.append(
                    PolicyIssue(".".join(loc), "mapping keys must be plain names", key.start_mark.line + 1)
                )
                continue
            name = str(key.value)
            if name in seen:
                issues.append(PolicyIssue(".".join((*loc, name)), "duplicate key", key.start_mark.line + 1))
            seen.add(name)
            _find_duplicate_keys(value, (*loc, name), issues)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _find_duplicate_keys(item, (*loc, str(i)), issues)


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of the deepest node of ``loc`` that exists in the YAML tree."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((kv for kv in node.value if str(kv[0].value) == str(part)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _short(value: Any, limit: int = 80, *, quote: bool = True) -> str:
    """``repr(value)`` (``str`` without ``quote``), cut to ``limit`` characters: an error message
    never embeds a whole document."""
    text = repr(value) if quote else str(value)
    return text if len(text) <= limit else text[: limit - 5] + " ...)"


def _duplicate_concepts(data: dict[str, Any], node: yaml.Node | None) -> list[PolicyIssue]:
    """A concept named twice, located at its second rule (the schema check cannot point there)."""
    issues, first = [], {}
    concepts = data.get("concepts")
    for i, rule in enumerate(concepts if isinstance(concepts, list) else []):
        name = rule.get("concept") if isinstance(rule, dict) else None
        if not isinstance(name, str):
            continue
        if name in first:
            loc = ("concepts", i, "concept")
            issues.append(
                PolicyIssue(
                    ".".join(map(str, loc)),
                    f"concept '{name}' is already governed by concepts.{first[name]}",
                    _line_of(node, loc),
                )
            )
        first.setdefault(name, i)
    return issues


#: keys an earlier policy schema had, and what replaced them (said where the old key is found)
_RENAMED = {
    "decide_from": "replaced by decide_at_t, a normalised timestep (0 clean .. 1 noise): decide_from N "
    "at S steps is about decide_at_t 1 - N/S",
}


def _issues_from(exc: ValidationError, node: yaml.Node | None) -> list[PolicyIssue]:
    issues = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            renamed = _RENAMED.get(str(loc[-1]))
            message = (
                f"unknown key: {renamed}" if renamed else "unknown key (not in the policy schema; a typo?)"
            )
        elif err["type"] == "literal_error":
            message = f"{err['msg']}, got {_short(err.get('input'))}"
        elif "input" in err and err["type"] not in ("missing", "value_error"):
            message = f"{err['msg']} (got {_short(err['input'])})"
        issues.append(PolicyIssue(".".join(str(p) for p in loc), message, _line_of(node, loc)))
    return issues


def parse_policy(text: str, path: str | Path = "<string>") -> Policy:
    """Validate policy YAML ``text``; ``path`` is only used in error messages."""
    path = Path(path)
    if len(text) > MAX_POLICY_BYTES:
        raise PolicyError(path, [PolicyIssue("", f"larger than {MAX_POLICY_BYTES} bytes: not a policy")])
    node = _compose_checked(text, path)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise _yaml_problem(exc, path) from None
    if not isinstance(data, dict):
        raise PolicyError(
            path, [PolicyIssue("", f"expected a mapping at the top level, got {type(data).__name__}", 1)]
        )
    duplicates = _duplicate_concepts(data, node)
    if duplicates:
        raise PolicyError(path, duplicates)
    try:
        # strict JSON-mode validation: YAML gives JSON's types (implicit dates become text), and a
        # value of the wrong type is an error, not coerced ("0.5" is no probability, "yes" no bool)
        return Policy.model_validate_json(json.dumps(data, default=str), strict=True)
    except ValidationError as exc:
        raise PolicyError(path, _issues_from(exc, node)) from None


def load_policy(path: str | Path) -> LoadedPolicy:
    """Read and validate a policy file. Raises :class:`PolicyError` naming the file and each problem
    (also for a file that is not a regular file, larger than :data:`MAX_POLICY_BYTES` or not UTF-8)."""
    path = Path(path)
    try:
        if path.exists() and not path.is_file():  # a FIFO or a device would block or never end
            raise PolicyError(path, [PolicyIssue("", "not a regular file")])
        with path.open("rb") as fh:
            raw = fh.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise PolicyError(path, [PolicyIssue("", f"cannot read the file: {exc.strerror or exc}")]) from None
    policy = parse_policy_bytes(raw, path)
    return LoadedPolicy(policy=policy, path=path.resolve(), sha256=hashlib.sha256(raw).hexdigest())


def parse_policy_bytes(raw: bytes, path: str | Path = "<bytes>") -> Policy:
    """Validate a policy document given as bytes (UTF-8, at most :data:`MAX_POLICY_BYTES`)."""
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError(path, [PolicyIssue("", f"larger than {MAX_POLICY_BYTES} bytes: not a policy")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(path, [PolicyIssue("", f"not UTF-8 text (byte {exc.start})")]) from None
    return parse_policy(text, path)


def pin_policy_text(text: str, pins: dict[int, str], path: str | Path = "<string>") -> str:
    """``text`` (a valid policy) with ``sha256: PIN`` added to the ``redirector`` of each rule index
    in ``pins``, everything else (comments, order, layout) unchanged; the result is validated and
    must carry exactly those pins. Rules that already have a pin are not touched."""
    path = Path(path)
    node = _compose_checked(text, path)
    concepts = next((v for k, v in node.value if k.value == "concepts"), None) if node is not None else None
    edits: list[tuple[int, str]] = []
    for index, pin in pins.items():
        rule = concepts.value[index]  # type: ignore[union-attr]
        ref = next(v for k, v in rule.value if k.value == "redirector")
        if any(k.value == "sha256" for k, _ in ref.value):
            continue
        if ref.flow_style:  # {plugin: x} -> {plugin: x, sha256: ...}
            end = ref.end_mark.index - 1
            while text[end] != "}":
                end -= 1
            edits.append((end, f", sha256: {pin}"))
        else:  # a block mapping: one more line at the indentation of its keys
            last = ref.value[-1][1]
            indent = " " * ref.value[0][0].start_mark.column
            line_end = text.find("\n", last.end_mark.index)  # after the value's comment, if any
            edits.append((len(text) if line_end < 0 else line_end, f"\n{indent}sha256: {pin}"))
    for at, insert in sorted(edits, reverse=True):
        text = text[:at] + insert + text[at:]
    policy = parse_policy(text, path)
    for index, pin in pins.items():
        if policy.concepts[index].redirector.sha256 != pin:
            raise PolicyError(
                path, [PolicyIssue(f"concepts.{index}.redirector", "the pin could not be written")]
            )
    return text


def policy_json_schema() -> dict[str, Any]:
    """JSON Schema of the policy document, for editors (``saferedir policy schema``)."""
    schema = Policy.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "saferedir policy"
    return schema


def policy_json_schema_text() -> str:
    return json.dumps(policy_json_schema(), indent=2, sort_keys=True)

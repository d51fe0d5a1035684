"""How well a bundle's redirection clears the concept once a sample is flagged, apart from whether it
gets flagged. Every prompt of the efficacy suite's forget-type sets is generated with the eval's
seeds twice: unguarded, and redirected from the first step as a ``rewind`` rule's second run
redirects a sample it confirmed (every sample flagged: ``record_trajectories(engine=...)``, strength
``--strength``, no escalation). Per prompt kind it prints how many of the images the unguarded model
drew as the concept still show it redirected, and lists them, and how many of the other attributes
the judge reads the redirection changed (the eval's ``kept``, over every prompt and over the drawn).

    python benchmarks/redirection_quality.py --concepts star                  # dev split, shipped bundle
    python benchmarks/redirection_quality.py --concepts star --bundle star=CANDIDATE.safetensors
    python benchmarks/redirection_quality.py --concepts star --other-long     # + three long framings
    python benchmarks/redirection_quality.py --concepts red --target-swap     # + the target prompt itself

``benchmarks/deciding_checks.py`` counts the drawn images a rule never flags; the images a guarded
run lets through are (roughly) those plus the flagged ones this script finds not cleared.
``--other-long``: the split's long-prompt subjects also in three long framings written for this
benchmark (none a training tag, none the suite's long template), to tell a template from the category.
``--target-swap``: each prompt that names the concept in a dictionary word also generated with that
word swapped for the recipe's safe target (red -> purple), unguarded, same seed: the prompt the
heads are fitted to reach, so what it changes is what even a perfect redirection would change.
``--local-swap`` (with ``--target-swap``): also the prompt's own token states with only the tokens
the swap changes replaced by the swapped prompt's (where the two tokenise to the same length;
MiniLM's states are contextual, so this is the target a redirection that moved the concept's
tokens alone would reach).
``--layer-swap GROUP [GROUP ...]`` (with ``--target-swap``): also the target prompt with its states
read only by the denoiser's cross-attention layers under GROUP's module prefixes (comma-separated,
e.g. ``down_blocks.1,up_blocks.1``), every other cross-attention layer reading the prompt's own:
which layers carry the concept, and whether moving the conditioning of those alone keeps more.
``--time-swap T [T ...]`` (with ``--target-swap``): also the target prompt read only at the steps
whose normalised timestep is above T, every layer reading the prompt's own from T down: whether the
concept is settled early and a redirection released for the late steps keeps more of the rest.
``--gates MODE``: how the heads' scale ``alpha`` and token mask ``m`` (both read the prompt) are
applied once a sample is flagged: ``heads`` as predicted (the shipped rule), ``alpha`` with
``alpha`` 1, ``fallback`` with ``alpha`` 1 and ``m`` 1 on every token where the mask's largest value
is under 0.5 (it sees no concept token), ``all`` with both 1 on every token, ``yield`` the rule's
``gates: yield`` (read at the first step: if shut there, each gate under 0.5 opened for the whole
call): whether the words veto a move the latent classifier asked for. ``--prompts FILE`` (one
concept): instead of the split's sets, the forget-type wordings of FILE, one ``kind<TAB>text`` a
line (``benchmarks/prompts/``).

    python benchmarks/redirection_quality.py --concepts red --prompts benchmarks/prompts/red_dev_wordings.tsv --gates all
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from shapes_suite import only_concepts, suite_bundles_adapter, with_wordings

OTHER_LONG = (
    "hand drawn, {x}, grainy scan, 72 dpi",
    "gallery print, screen printed look, {x}",
    "{x}, centered on the page, soft drop shadow, print ready",
)


def other_long(concept: Any) -> list[Any]:
    """The adversarial long prompts' subjects in :data:`OTHER_LONG`'s framings (kind ``other_longK``)."""
    from saferedir_shapes.eval_suite import LONG

    pattern = re.escape(LONG).replace(r"\{c\}\ \{t\}\ \{s\}", "(.*)")
    longs = [p for p in concept.sets["adversarial"] if p.kind == "long"]
    subjects = [re.fullmatch(pattern, p.text).group(1) for p in longs]  # type: ignore[union-attr]
    return [
        replace(p, text=t.format(x=x), kind=f"other_long{k}")
        for k, t in enumerate(OTHER_LONG)
        for p, x in zip(longs, subjects)
    ]


def target_swap(concept: Any, target: str | None = None) -> Callable[[str], str | None]:
    """The prompt with the concept's first named word (any of its synonyms, training or held out)
    swapped for the recipe's safe target (red -> purple), what the heads are fitted to reach, or for
    ``target``, a candidate one. None where the prompt names the concept in no dictionary word
    (descriptions, misspellings, junk)."""
    from saferedir_shapes.eval_suite import TABLES
    from saferedir_shapes.world import CONCEPT_SWAPS

    words = sorted({w for ws in TABLES[concept.attribute][concept.value] for w in ws}, key=len, reverse=True)
    pattern = re.compile(r"(?<![\w-])(" + "|".join(re.escape(w) for w in words) + r")(?![\w-])")
    target = target or CONCEPT_SWAPS[concept.name][2]

    def swap(text: str) -> str | None:
        swapped = pattern.sub(target, text, count=1)
        return swapped if swapped != text else None

    return swap


def local_swap(adapter: Any, texts: list[str], swapped: list[str | None]) -> tuple[list[bool], Any]:
    """Each prompt's own conditioning with the token states the swap changes taken from the swapped
    prompt's (same position), where both tokenise to the same length; the other rows unchanged.
    Returns which rows were aligned, and the conditioning."""
    tokenize = adapter.pipe.tokenizer
    own, _ = adapter.encode_prompts(texts)
    other, _ = adapter.encode_prompts([s or t for s, t in zip(swapped, texts)])
    tokens = own.tokens[0].clone()
    aligned = []
    for j, (t, s) in enumerate(zip(texts, swapped)):
        a, b = tokenize(t)["input_ids"], tokenize(s or t)["input_ids"]
        aligned.append(s is not None and len(a) == len(b))
        if aligned[-1]:
            window = min(len(a), tokens.shape[1])  # the backbone's window: the states beyond are cut
            changed = torch.tensor(
                [x != y for x, y in zip(a[:window], b[:window])] + [False] * (tokens.shape[1] - window)
            )
            tokens[j, changed] = other.tokens[0][j, changed]
    return aligned, replace(own, tokens=(tokens,))


def cross_attention_layers(denoiser: Any) -> dict[str, Any]:
    """The denoiser's cross-attention modules (diffusers' ``attn2``), by module name."""
    return {name: m for name, m in denoiser.named_modules() if name.endswith(".attn2")}


@contextmanager
def layer_scoped(
    denoiser: Any,
    prefixes: list[str] | None,
    own: torch.Tensor,
    target: torch.Tensor,
    release_t: float | None = None,
    num_train_timesteps: int = 1000,
) -> Iterator[None]:
    """While open, the denoiser's cross-attention layers *not* under one of ``prefixes`` read
    ``own`` (B, T, D) wherever their ``encoder_hidden_states`` hold a row of ``target`` (B, T, D):
    a call conditioned on ``target`` then moves only the layers under ``prefixes`` (None: every
    layer; the unconditional rows of classifier-free guidance are untouched). With ``release_t``, *every*
    layer reads ``own`` instead at the steps whose normalised timestep (the denoiser call's
    ``timestep / num_train_timesteps``) is at or below it: the target prompt conditions the early
    steps only."""
    layers = cross_attention_layers(denoiser)
    prefixes = [n.rsplit(".", 1)[0] for n in layers] if prefixes is None else prefixes
    for prefix in prefixes:
        if not any(name.startswith(prefix + ".") for name in layers):
            blocks = sorted({n.rsplit(".attentions.", 1)[0] for n in layers})
            raise ValueError(f"--layer-swap: no cross-attention layer under {prefix!r} (blocks: {blocks})")
    now: dict[str, float] = {}

    def note_timestep(_module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]
        now["t"] = float(torch.as_tensor(t).float().max()) / num_train_timesteps

    def back_to_own(module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        states = kwargs.get("encoder_hidden_states")
        if states is None:
            return args, kwargs
        released = release_t is not None and now["t"] <= release_t
        if id(module) in scoped and not released:
            return args, kwargs
        states = states.clone()
        for r in range(states.shape[0]):
            for j in range(target.shape[0]):
                if torch.equal(states[r], target[j].to(states)):
                    states[r] = own[j].to(states)
                    break
        return args, {**kwargs, "encoder_hidden_states": states}

    scoped = {id(m) for name, m in layers.items() if any(name.startswith(p + ".") for p in prefixes)}
    handles = [
        m.register_forward_pre_hook(back_to_own, with_kwargs=True)
        for m in layers.values()
        if release_t is not None or id(m) not in scoped
    ]
    if release_t is not None:
        handles.append(denoiser.register_forward_pre_hook(note_timestep, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


GATES = ("heads", "alpha", "fallback", "all", "yield")


@contextmanager
def gated(mode: str) -> Iterator[None]:
    """While open, the engine applies the heads' ``alpha`` and masks as ``mode`` says (``--gates``)."""
    import saferedir_sdk.engine as engine

    if mode not in GATES:
        raise ValueError(f"--gates: expected one of {GATES}, got {mode!r}")
    applied = engine.redirection

    def redirection(cond: Any, out: Any, strength: Any) -> Any:
        if mode in ("heads", "yield"):  # yield: the rule's own ``gates: yield`` (measure)
            return applied(cond, out, strength)
        masks = out.masks
        if mode == "fallback":
            masks = tuple(
                torch.where(m.amax(dim=-1, keepdim=True) < 0.5, torch.ones_like(m), m) for m in masks
            )
        elif mode == "all":
            masks = tuple(torch.ones_like(m) for m in masks)
        return applied(cond, out._replace(alpha=torch.ones_like(out.alpha), masks=masks), strength)

    engine.redirection = redirection
    try:
        yield
    finally:
        engine.redirection = applied


def measure(
    suite: Any,
    adapter: Any,
    bundle: Path,
    strength: float,
    extra: bool,
    swap: bool = False,
    target: str | None = None,
    local: bool = False,
    layer_groups: Sequence[str] = (),
    release_ts: Sequence[float] = (),
    gates: str = "heads",
    shift: Any = None,
) -> list[dict[str, Any]]:
    from saferedir_bench.evaluation import FORGET_SETS, Runner

    from saferedir_sdk.bundle import load_bundle
    from saferedir_sdk.engine import EngineConcept, RedirectionEngine
    from saferedir_sdk.guard.resolve import concept_shift
    from saferedir_sdk.policy import ConceptRule, RedirectorRef
    from saferedir_sdk.training.trajectories import record_trajectories

    (concept,) = suite.concepts
    redirector = load_bundle(bundle).redirector.eval()
    rule = ConceptRule(
        concept=concept.name,
        category="custom",
        redirector=RedirectorRef(path=str(bundle)),
        strength=strength,
        escalate=1.0,
        gates="yield" if gates == "yield" else "heads",
        shift=shift,
    )
    direction = concept_shift(rule, redirector, adapter.encode_prompts, "cpu") if shift else None
    engine = RedirectionEngine([EngineConcept(rule, redirector, direction)])
    runner = Runner(adapter, suite)  # the eval's batches and seeds

    judged: dict[str, list[str]] = {}

    def shows(images: np.ndarray) -> np.ndarray:
        judged.clear()
        judged.update(suite.judge(images))  # every attribute, for what the redirection kept
        return np.array([v == concept.value for v in judged[concept.attribute]])

    swapper = target_swap(concept, target) if swap else None
    sets = {name: concept.sets[name] for name in FORGET_SETS}
    if extra:
        sets["other_long"] = other_long(concept)
    rows = []
    for k, (set_name, prompts) in enumerate(sets.items()):
        for i in range(0, len(prompts), runner.batch_size):
            batch = prompts[i : i + runner.batch_size]
            texts = [p.text for p in batch]
            seed = runner.seed + 1000 * k + i  # the eval's seed for this batch
            drawn = shows(runner._call(texts, seed))
            before = dict(judged)
            if swap:  # the target prompt itself, same seed, where the prompt names the concept in a word
                swapped = [swapper(t) for t in texts]
                swapped_still = shows(runner._call([x or t for x, t in zip(swapped, texts)], seed))
                swapped_judged = dict(judged)
            if local:  # the swapped prompt's states at the changed tokens only, same seed
                aligned, embeds = local_swap(adapter, texts, swapped)
                local_still = shows(runner._call(texts, seed, cond=embeds))
                local_judged = dict(judged)
            # the target prompt read by some cross-attention layers only (key "layers"), or while the
            # timestep is above T only (key "times"), same seed
            variants: dict[str, dict[Any, tuple[np.ndarray, dict[str, list[str]]]]] = {}
            runs = [("layers", g, g.split(","), None) for g in layer_groups]
            runs += [("times", t, None, t) for t in release_ts]
            if runs and any(x is not None for x in swapped):
                full = [x or t for x, t in zip(swapped, texts)]
                target_cond, own_cond = adapter.encode_prompts(full)[0], adapter.encode_prompts(texts)[0]
                train_steps = int(adapter.pipe.scheduler.config.get("num_train_timesteps", 1000))
                for key, variant, prefixes, release in runs:
                    with layer_scoped(
                        adapter.denoiser,
                        prefixes,
                        own_cond.tokens[0],
                        target_cond.tokens[0],
                        release,
                        train_steps,
                    ):
                        still_here = shows(runner._call(full, seed))
                    variants.setdefault(key, {})[variant] = (still_here, dict(judged))
            moved = record_trajectories(
                adapter,
                texts,
                seeds=(seed,),
                num_inference_steps=suite.num_inference_steps,
                guidance_scale=suite.guidance_scale,
                outcome=shows,
                engine=engine,
            )
            first = moved.steps == 0
            still = moved.labels[first][torch.argsort(moved.prompt_ids[first])]  # type: ignore[index]
            others = [a for a in judged if a != concept.attribute]
            for j, (p, d, s) in enumerate(zip(batch, drawn, still)):
                lost = [f"{a} {before[a][j]}->{judged[a][j]}" for a in others if judged[a][j] != before[a][j]]
                row = {
                    "set": set_name,
                    "kind": p.kind,
                    "text": p.text,
                    "drawn": bool(d),
                    "still": bool(s),
                    "lost": lost,
                    "attributes": len(others),
                }
                if swap and swapped[j] is not None:
                    row["swapped"] = {
                        "still": bool(swapped_still[j]),
                        "lost": [a for a in others if swapped_judged[a][j] != before[a][j]],
                    }
                if local and aligned[j]:
                    row["local"] = {
                        "still": bool(local_still[j]),
                        "lost": [a for a in others if local_judged[a][j] != before[a][j]],
                    }
                for key, by_variant in variants.items():
                    if swap and swapped[j] is not None:
                        row[key] = {
                            variant: {
                                "still": bool(st[j]),
                                "lost": [a for a in others if jd[a][j] != before[a][j]],
                            }
                            for variant, (st, jd) in by_variant.items()
                        }
                rows.append(row)
    return rows


def print_variants(rows: list[dict[str, Any]], key: str, variants: Sequence[Any], header: str) -> None:
    """The table of one family of target-prompt variants (``--layer-swap``, ``--time-swap``) over the
    prompts that name the concept in a word: per variant, drawn images still showing it and other
    attributes changed."""
    named = [r for r in rows if key in r]
    print(f"\non the {len(named)} prompts that name it in a word:")
    print(f"| {header} | still / drawn | other attributes changed |\n|---|---|---|")
    for variant in variants:
        print(
            f"| {variant} | {sum(r[key][variant]['still'] for r in named if r['drawn'])}/"
            f"{sum(r['drawn'] for r in named)} | {sum(len(r[key][variant]['lost']) for r in named)} of "
            f"{sum(r['attributes'] for r in named)} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", nargs="+", default=None)
    parser.add_argument("--bundle", nargs="*", default=[], help="CONCEPT=PATH: measure this bundle instead")
    parser.add_argument("--split", default="dev", choices=("dev", "eval", "fresh", "fresh2"))
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--other-long", action="store_true", help="also the long subjects in other framings")
    parser.add_argument(
        "--target-swap",
        action="store_true",
        help="also each prompt with the concept's word swapped for the target",
    )
    parser.add_argument(
        "--target",
        default=None,
        help="with --target-swap: swap in this word instead of the recipe's target (a candidate target)",
    )
    parser.add_argument(
        "--local-swap",
        action="store_true",
        help="with --target-swap: also the prompt's states with only the swapped tokens' states replaced",
    )
    parser.add_argument(
        "--layer-swap",
        nargs="+",
        default=[],
        metavar="GROUP",
        help="with --target-swap: also the target prompt read only by the cross-attention layers under "
        "GROUP's comma-separated module prefixes (e.g. down_blocks.1,up_blocks.1), the rest reading the prompt's own",
    )
    parser.add_argument(
        "--time-swap",
        nargs="+",
        type=float,
        default=[],
        metavar="T",
        help="with --target-swap: also the target prompt read only at the steps whose normalised timestep "
        "is above T, the prompt's own from T down (the target conditions the early steps only)",
    )
    parser.add_argument(
        "--gates", default="heads", choices=GATES, help="how alpha and the masks apply once flagged"
    )
    parser.add_argument(
        "--shift",
        action="store_true",
        help="with the shift of the concept's rule in the suite's policy (also at --strength)",
    )
    parser.add_argument(
        "--prompts",
        type=Path,
        default=None,
        help="one concept: FILE's wordings (kind<TAB>text) instead of the split's",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--n", type=int, default=0, help="prompts per set (0: the suite's; more: its next draws)"
    )
    args = parser.parse_args()
    if args.local_swap and not args.target_swap:
        parser.error("--local-swap needs --target-swap")
    if args.layer_swap and not args.target_swap:
        parser.error("--layer-swap needs --target-swap")
    if args.time_swap and not args.target_swap:
        parser.error("--time-swap needs --target-swap")
    torch.set_num_threads(args.threads)
    if args.prompts and (not args.concepts or len(args.concepts) != 1):
        parser.error("--prompts needs exactly one of --concepts")
    suite, bundles, adapter = suite_bundles_adapter(args.split, args.concepts, args.bundle, args.n)
    if args.prompts:
        suite = with_wordings(suite, args.prompts)
    shifts: dict[str, Any] = {}
    if args.shift:
        from saferedir_sdk.plugins import default_plugin_manager, resolve_policy_ref
        from saferedir_sdk.policy import load_policy

        policy = load_policy(resolve_policy_ref(default_plugin_manager(), suite.policy)).policy
        shifts = {r.concept: r.shift for r in policy.concepts}
        for concept in suite.concepts:
            if shifts.get(concept.name) is None:
                parser.error(f"--shift: the policy {suite.policy} gives '{concept.name}' no shift")
    for concept in suite.concepts:
        with gated(args.gates):
            rows = measure(
                only_concepts(suite, [concept.name]),
                adapter,
                bundles[concept.name],
                args.strength,
                args.other_long,
                args.target_swap,
                args.target,
                args.local_swap,
                args.layer_swap,
                args.time_swap,
                args.gates,
                shifts.get(concept.name),
            )
        drawn = [r for r in rows if r["drawn"]]
        source = args.prompts or f"{args.split} split"
        print(
            f"\n{concept.name} ({source}, {bundles[concept.name]}, every sample flagged, strength {args.strength}, "
            f"gates {args.gates}{', shift' if args.shift else ''}):"
        )
        print(f"still showing the concept: {sum(r['still'] for r in drawn)} of {len(drawn)} drawn")
        for name, among in (("every prompt", rows), ("drawn", drawn)):
            lost = [a.split()[0] for r in among for a in r["lost"]]
            kept = 1 - len(lost) / sum(r["attributes"] for r in among)
            changed = ", ".join(f"{a} {lost.count(a)}" for a in sorted(set(lost))) or "none"
            print(f"kept, other attributes unchanged ({name}): {kept:.4f}; changed: {changed}")
        if args.target_swap:
            named = [r for r in rows if "swapped" in r]
            pairs = sum(r["attributes"] for r in named)
            print(
                f"on the {len(named)} prompts that name it in a word ({sum(r['drawn'] for r in named)} drawn): "
                f"the target prompt itself leaves {sum(r['swapped']['still'] for r in named if r['drawn'])} "
                f"showing it and changes {sum(len(r['swapped']['lost']) for r in named)} of {pairs} other "
                f"attributes; the redirection {sum(r['still'] for r in named if r['drawn'])} and "
                f"{sum(len(r['lost']) for r in named)}"
            )
        if args.local_swap:
            local = [r for r in rows if "local" in r]
            print(
                f"on the {len(local)} of them whose swap keeps the token count ({sum(r['drawn'] for r in local)} "
                f"drawn): the swapped tokens' states alone leave {sum(r['local']['still'] for r in local if r['drawn'])} "
                f"showing it and change {sum(len(r['local']['lost']) for r in local)} of "
                f"{sum(r['attributes'] for r in local)} other attributes; the whole target prompt "
                f"{sum(r['swapped']['still'] for r in local if r['drawn'])} and "
                f"{sum(len(r['swapped']['lost']) for r in local)}; the redirection "
                f"{sum(r['still'] for r in local if r['drawn'])} and {sum(len(r['lost']) for r in local)}"
            )
        for key, variants, header in (
            ("layers", args.layer_swap, "cross-attention layers reading the target"),
            ("times", args.time_swap, "target read while t > T"),
        ):
            if variants:
                print_variants(rows, key, variants, header)
        print()
        print("| set / kind | still / drawn |\n|---|---|")
        kinds: dict[str, list[int]] = {}
        for r in drawn:
            counts = kinds.setdefault(f"{r['set']} / {r['kind'] or '-'}", [0, 0])
            counts[0] += r["still"]
            counts[1] += 1
        for key, (still, n) in sorted(kinds.items()):
            print(f"| {key} | {still}/{n} |")
        for r in drawn:
            if r["still"]:
                print(f"  still: {r['set']} {r['kind']} {r['text']!r}")
        for r in rows:
            if r["lost"]:
                print(f"  changed {', '.join(r['lost'])}: {r['set']} {r['kind']} {r['text']!r}")


if __name__ == "__main__":
    main()

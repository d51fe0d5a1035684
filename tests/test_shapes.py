"""The Shapes world: vocabulary split, renders, the shipped backbone, judge and concept pack."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from saferedir_shapes import world
from saferedir_shapes.judge import evaluate, judge_images, load_judge
from saferedir_shapes.pipeline import load_shapes_pipeline

ROOT = Path(__file__).resolve().parents[1]


def test_heldout_vocabulary_never_appears_in_training_prompts():
    rng = np.random.default_rng(0)
    held = {
        w
        for table in (world.COLOUR_WORDS, world.SHAPE_WORDS, world.TEXTURE_WORDS)
        for _, ws in table.values()
        for w in ws
    }
    train = {
        w
        for table in (world.COLOUR_WORDS, world.SHAPE_WORDS, world.TEXTURE_WORDS)
        for ws, _ in table.values()
        for w in ws
    }
    assert not held & train
    prompts = [world.make_prompt(world.sample_attributes(rng), rng) for _ in range(3000)]
    for concept in world.CONCEPT_SWAPS:
        pairs, pool = world.concept_recipe(concept)
        prompts += [p for pair in pairs for p in pair] + pool
    for word in held:
        # whole-word match: held-out words never occur in training text
        assert not any(f" {word} " in f" {p.replace(',', ' ').replace(':', ' ')} " for p in prompts), word
    held_wordings = {e for families in world.WORDINGS.values() for _, h in families.values() for e in h}
    for expression in held_wordings:  # nor do the held-out wordings (case as written)
        assert not any(re.search(rf"(?<![\w-]){re.escape(expression)}(?![\w-])", p) for p in prompts), (
            expression
        )
    negations = [n.split("{w}")[0].split("{p}")[1].strip(", ") for n in world.NEGATIONS[1]]
    assert not any(f" {n} " in p for p in prompts for n in negations), negations
    attrs = [world.sample_attributes(rng) for _ in range(3000)]
    assert not any((a.colour, a.shape) in world.HELDOUT_PAIRS for a in attrs)


def test_training_long_prompts_share_no_tag_with_the_eval_long_prompts():
    """The recipes' long, tag-style prompts (world.LONG_TAGS) cover the category, not the eval's wording:
    no tag of the efficacy suite's long template reaches training; and every framed prompt fits
    what the text encoder reads."""
    from saferedir_shapes.eval_suite import LONG

    eval_tags = [t for t in LONG.split(", ") if "{" not in t]
    assert eval_tags and not set(eval_tags) & {t for tags in world.LONG_TAGS for t in tags}
    for concept, settings in world.RECIPES.items():
        pairs, pool = world.concept_recipe(concept)
        texts = [p for pair in pairs for p in pair] + pool
        assert len(pairs) == settings.n_pairs and len(pool) == settings.n_pool
        framed = 0
        for text in texts:
            assert not any(re.search(rf"(?<!\w){re.escape(t)}(?!\w)", text) for t in eval_tags), text
            if any(text.startswith(t + ", ") for t in world.LONG_TAGS[0]):
                framed += 1
                assert world.minilm_token_count(text) <= world.MAX_PIECES, text
        # about a quarter of the prompts in long framings where the recipe has them, none elsewhere
        assert (0.2 * len(texts) <= framed <= 0.35 * len(texts)) if settings.long_framing else framed == 0


def test_safe_synonym_matches_the_forget_words_token_count_where_it_can():
    def count(text):  # a stand-in tokenizer: one token per letter
        return len(text.replace(" ", ""))

    targets = ["ab", "abc", "xyz", "wxyz"]
    assert world.safe_synonym("pqr", targets, 0) == "ab"  # no counter: synonym for synonym
    assert world.safe_synonym("pqr", targets, 0, count) == "abc"
    assert world.safe_synonym("pqr", targets, 2, count) == "xyz"
    assert world.safe_synonym("pqrst", targets, 0, count) == "ab abc"  # joined safe words
    assert world.safe_synonym("p", targets, 1, count) == "abc"  # nothing that short: synonym for synonym


def test_star_recipe_draws_the_concept_in_every_colour_the_backbone_was_trained_to_draw_it_in():
    """A forget prompt whose safe target would make a held-out pair (a blue cross) is paired with a
    near neighbour (a blue triangle) instead of dropped: otherwise no blue star reaches training."""
    colours = {}
    for pair in world.recipe_pairs("star"):
        if pair.family == "negation":
            continue
        named = [
            c for c in world.COLOURS if any(f" {w} " in f" {pair.forget} " for w in world.COLOUR_WORDS[c][0])
        ]
        colours.setdefault(named[0] if named else None, []).append(pair)
    drawable = {c for c in world.COLOURS if (c, "star") not in world.HELDOUT_PAIRS}
    assert drawable <= set(colours), sorted(colours, key=str)
    assert all(len(colours[c]) >= 30 for c in drawable), {c: len(colours[c]) for c in drawable}
    triangles = set(world.SHAPE_WORDS["triangle"][0])
    assert all(any(w in p.retain for w in triangles) for p in colours["blue"])


def test_star_one_target_variant_pairs_every_star_with_a_cross_and_the_plugin_names_it():
    """The recipe variant star's redirection heads are fitted on (``plugin:shapes-star:one-target``):
    one safe target for every forget prompt, so no blue star (its cross would be held out)."""
    from saferedir_shapes.plugin import RECIPE_VARIANT_NAMES

    from saferedir_sdk.plugins import make_plugin_manager, registered_concepts

    assert {c: tuple(v) for c, v in world.RECIPE_VARIANTS.items()} == RECIPE_VARIANT_NAMES
    spec = registered_concepts(make_plugin_manager())["shapes-star"]
    pairs, pool = spec.recipe_named("one-target")()
    assert (pairs, pool) == world.concept_recipe("star", settings=world.RecipeSettings())
    assert pairs != spec.recipe()[0] and spec.recipe_named("other") is None
    shapes = [
        p for p in world.recipe_pairs("star", settings=world.RecipeSettings()) if p.family != "negation"
    ]
    triangles = set(world.SHAPE_WORDS["triangle"][0])
    assert shapes and not any(w in p.retain.split() for p in shapes for w in triangles)


def test_a_recipe_target_of_its_own_swaps_to_it_and_falls_back_where_it_is_held_out():
    """``RecipeSettings.target`` (red's "orange-target"): every forget side's red becomes orange, but a
    red star's would be an orange star, a held-out pair: it falls back to the concept's own target
    (purple). The benign pool is the recipe's own."""
    settings = world.RECIPE_VARIANTS["red"]["orange-target"]
    assert settings.target == "orange"

    def names(text: str, words: list[str]) -> bool:
        return any(re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", text) for w in words)

    orange, purple = world.COLOUR_WORDS["orange"][0], world.COLOUR_WORDS["purple"][0]
    for pair in world.recipe_pairs("red", settings=settings):
        if pair.family == "negation":
            continue
        star = names(pair.retain, world.SHAPE_WORDS["star"][0])
        assert names(pair.retain, purple if star else orange), pair
        assert not (star and names(pair.retain, orange)), pair
    assert world.concept_recipe("red", settings=settings)[1] == world.concept_recipe("red")[1]
    wide = world.concept_recipe("striped", settings=world.RECIPE_VARIANTS["striped"]["wide-pool"])
    pairs, pool = world.concept_recipe("striped")
    assert wide[0] == pairs and wide[1][: len(pool)] == pool and len(wide[1]) == 4 * len(pool)


@pytest.mark.parametrize("variant, share", [("descriptions", 0.3), ("wide-descriptions", 0.4)])
def test_red_descriptions_variant_describes_red_without_naming_it_and_shares_no_referent(variant, share):
    """Red's "descriptions" recipe: about 30% of its pairs (its "wide-descriptions" one: 40%, with 60
    more expressions) describe red after the shape without a colour word; the default recipe is
    drawn as before; no referent of their descriptions (the phrase after "the colour of", "coloured
    like", ...) occurs in the eval suite's descriptions, the fresh splits or the hand-written dev and
    held-out prompts of ``benchmarks/prompts/``."""
    import collections

    from saferedir_shapes.eval_suite import DESCRIPTIONS, fresh_table

    settings = world.RECIPE_VARIANTS["red"][variant]
    pairs = world.recipe_pairs("red", settings=settings)
    described = [p for p in pairs if p.family == "description"]
    assert share - 0.05 <= len(described) / len(pairs) <= share + 0.05
    colour_words = [w for ws in world.COLOUR_WORDS["red"] for w in ws] + ["red"]
    for pair in described:
        (expression,) = [e for e in settings.descriptions if e in pair.forget]
        assert not any(re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", pair.forget) for w in colour_words)
        assert expression not in pair.retain
    counts = collections.Counter(p.family for p in world.recipe_pairs("red"))
    assert counts["description"] < 0.15 * sum(counts.values())  # the default recipe keeps its shares
    frames = r"^(the colour of|coloured like|the shade of|tinted like|in the hue of|painted like|the hue of) (an? |the )?"
    expressions = world.RED_DESCRIPTIONS + world.RED_DESCRIPTIONS_WIDE
    referents = {re.sub(frames, "", e) for e in expressions}
    # every expression opens with a frame, and no two describe the same thing
    assert len(referents) == len(expressions) and not referents & set(expressions)
    assert set(settings.descriptions) >= set(world.RED_DESCRIPTIONS)
    prompts = Path(__file__).resolve().parents[1] / "benchmarks" / "prompts"
    others = [
        line for path in prompts.glob("*.tsv") for line in path.read_text(encoding="utf-8").splitlines()
    ]
    others += [t for ts in DESCRIPTIONS.values() for t in ts]
    others += [
        row[2] for split in ("fresh", "fresh2") for rows in fresh_table(split).values() for row in rows
    ]
    for referent in referents:
        bounded = re.compile(rf"(?<![\w-]){re.escape(referent.lower())}(?![\w-])")
        assert not [t for t in others if bounded.search(t.lower())], referent


def test_recipes_cover_how_people_write_and_every_pair_lines_up():
    import collections

    for concept in world.CONCEPT_SWAPS:
        families = collections.Counter(p.family for p in world.recipe_pairs(concept))
        assert set(families) == {"synonym", *world.FAMILY_SHARES}, concept
        assert all(n >= 10 for n in families.values()), families


def test_concept_recipes_line_up_tokens_where_synonym_for_synonym_does_not():
    tc = world.minilm_token_count
    for concept in world.CONCEPT_SWAPS:
        aligned = np.mean([tc(f) == tc(r) for f, r in world.concept_recipe(concept)[0]])
        unmatched = np.mean([tc(f) == tc(r) for f, r in world.concept_recipe(concept, token_count=None)[0]])
        # every phrasing has a safe phrase of its length (a synonym, or synonyms joined)
        assert aligned == 1.0 > unmatched, concept


def test_recipes_misspell_only_with_misspellings_the_backbone_draws_as_the_concept():
    import json
    import re

    data = json.loads((ROOT / "plugins/shapes/saferedir_shapes/weights/misspellings.json").read_text())
    assert data["kept"] == world.verified_misspellings() and data["kept"]
    for variants in data["kept"].values():
        assert all(data["rates"][v] >= data["keep"] for v in variants)
    for concept, (attribute, value, _, _) in world.CONCEPT_SWAPS.items():
        synonyms = world.words(attribute, value, "train")
        allowed = synonyms + [v for w in synonyms for v in data["kept"].get(w, [])]
        misspelt = 0
        synonym_pairs = [p.forget for p in world.recipe_pairs(concept) if p.family == "synonym"]
        for forget in synonym_pairs:
            found = [w for w in allowed if re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", forget)]
            assert found, forget
            misspelt += not any(w in synonyms for w in found)
        assert misspelt > 0 or not any(w in data["kept"] for w in synonyms), concept


def test_renders_have_light_clean_backgrounds():
    rng = np.random.default_rng(1)
    for _ in range(50):
        a = world.sample_attributes(rng)
        img = world.render(a, rng)
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert world.background_brightness(img) > 0.9


def test_shape_colour_measures_the_palette_colour_a_shape_is_drawn_in():
    rng = np.random.default_rng(7)
    hits = n = 0
    for colour in world.COLOURS:
        for shape in world.SHAPES:
            for texture in world.TEXTURES:
                image = world.render(world.Attributes(colour, shape, texture), rng)
                rgb, nearest = world.shape_colour(image)
                hits += nearest == colour
                n += 1
                # the fill itself, not the texture's light tint or the background
                assert np.abs(np.array(rgb) - np.array(world.RGB[colour])).max() <= 40, (
                    colour,
                    shape,
                    texture,
                    rgb,
                )
    assert hits == n
    # a vermilion square between the palette's red and orange, measured as drawn
    square = world.render(world.Attributes("red", "square", "plain"), rng)
    vermilion = np.where(
        square.astype(int).sum(axis=-1, keepdims=True) < 600, np.array([230, 95, 28]), square
    )
    assert world.shape_colour(vermilion.astype(np.uint8))[0] == (230, 95, 28)


def test_judge_is_accurate_on_fresh_renders_with_artefacts():
    accuracy = evaluate(load_judge(), n=600, seed=4242)
    assert min(accuracy.values()) >= 0.98, accuracy


def test_render_in_a_colour_off_the_palette_and_how_the_judge_reads_it():
    """``render(..., rgb=...)`` draws the shape in that colour and leaves everything else (position,
    size, texture, background: the same draws) as the palette colour's render; ``colour_reading``
    reads each palette colour as itself and a colour between red and orange as one of the two."""
    from saferedir_shapes.judge import colour_reading

    a = world.Attributes("red", "star", "striped")
    palette = world.render(a, np.random.default_rng(3))
    assert np.array_equal(world.render(a, np.random.default_rng(3), rgb=world.RGB["red"]), palette)
    other = world.render(a, np.random.default_rng(3), rgb=world.RGB["blue"])
    background = (
        palette == world.render(world.Attributes("green", "star", "striped"), np.random.default_rng(3))
    ).all(-1)
    assert background.mean() > 0.5 and (other[background] == palette[background]).all()
    assert world.shape_colour(other)[1] == "blue"
    judge = load_judge()
    for colour, rgb in world.RGB.items():
        reading = colour_reading(judge, rgb)
        assert abs(sum(reading.values()) - 1) < 1e-5 and reading[colour] > 0.9, (colour, reading)
    between = colour_reading(judge, (230, 82, 28))  # a vermilion
    assert between["red"] + between["orange"] > 0.9, between


def test_the_outcome_judges_soft_reading_is_over_one_half_exactly_where_it_says_the_concept_shows():
    """``OutcomeJudge.soft`` of each Shapes concept: in [0, 1], above 0.5 on exactly the images its
    verdict calls the concept (palette renders, with artefacts, and shapes in colours off the
    palette), and in between for some of the off-palette ones, where the judge is torn."""
    from saferedir_shapes.plugin import outcome

    rng = np.random.default_rng(7)
    images = []
    for k in range(240):
        a = world.Attributes(
            world.COLOURS[rng.integers(6)], world.SHAPES[rng.integers(5)], world.TEXTURES[rng.integers(3)]
        )
        rgb = tuple(int(x) for x in rng.integers(0, 256, 3)) if k % 2 else None
        image = world.render(a, rng, rgb=rgb)
        images.append(world.add_artefacts(image, rng) if k % 3 == 0 else image)
    images = np.stack(images)
    torn = {}
    for concept in ("red", "striped", "star"):
        judge = outcome(concept)
        shows, soft = np.asarray(judge(images)), np.asarray(judge.soft(images))
        assert soft.shape == (240,) and ((soft >= 0) & (soft <= 1)).all()
        assert np.array_equal(soft > 0.5, shows) and 0 < shows.sum() < 240, concept
        torn[concept] = int(((soft > 0.1) & (soft < 0.9)).sum())
    assert torn["red"] > 0, torn  # colours between red and its neighbours


@pytest.fixture(scope="module")
def shapes_pipe():
    return load_shapes_pipeline()


def test_backbone_draws_the_named_colour_far_above_chance(shapes_pipe):
    """Regression guard at the demo's settings (the full figures: python -m saferedir_shapes.evaluate):
    canonical colour words, 24 images, judge colour and shape accuracy (chance: 1/6 and 1/5)."""
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    prompts = [f"a {c} {s}" for c in colours for s in ("circle", "square", "cross", "triangle")]
    images = shapes_pipe(prompts, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (24, 32, 32, 3)
    seen = judge_images(load_judge(), images)
    colour = np.mean([p.split()[1] == c for p, c in zip(prompts, seen["colour"])])
    shape = np.mean([p.split()[2] == s for p, s in zip(prompts, seen["shape"])])
    assert colour >= 0.9 and shape >= 0.9, (colour, shape)


def test_the_shapes_adapter_decodes_latents_to_what_the_pipeline_returns(shapes_pipe):
    from saferedir_adapters.sd import StableDiffusionAdapter

    adapter = StableDiffusionAdapter(shapes_pipe)
    kw = {"seed": 0, "num_inference_steps": 3, "guidance_scale": 1.5}
    latents = adapter.output_images(
        adapter.generate(["a red circle", "a blue star"], output_type="latent", **kw)
    )
    images = np.asarray(adapter.output_images(adapter.generate(["a red circle", "a blue star"], **kw)))
    decoded = adapter.decode_latents(latents)
    assert decoded.dtype == np.uint8 and decoded.shape == (2, 32, 32, 3)
    assert np.array_equal(decoded, (images * 255).round().astype(np.uint8))


def test_demo_policy_erases_red_and_keeps_the_rest(shapes_pipe):
    from saferedir_sdk import SafeRedirGuard

    prompts = ["a red circle", "a blue square"]
    kwargs = dict(output_type="np")
    base = shapes_pipe(prompts, generator=torch.Generator().manual_seed(3), **kwargs).images
    guard = SafeRedirGuard.from_policy("shapes:demo")
    guard.wrap(shapes_pipe)
    try:
        out = shapes_pipe(prompts, generator=torch.Generator().manual_seed(3), **kwargs).images
    finally:
        guard.unwrap(shapes_pipe)
    assert [s.action for s in guard.last_report.samples] == ["redirected", "none"]
    assert np.array_equal(out[1], base[1])
    seen = judge_images(load_judge(), out)
    assert seen["colour"][0] != "red" and seen["shape"][0] == "circle"


def test_eval_prompts_never_appear_in_training_data():
    """Every efficacy prompt is new: not in any concept's training recipe (pairs and pool) and not
    producible by a training template with training synonyms (the backbone's training prompts)."""
    from saferedir_shapes.eval_suite import ADVERSARIAL_KINDS, ShapesEvalSuite, training_template_pattern

    suite = ShapesEvalSuite.build()
    pattern = training_template_pattern()
    rng = np.random.default_rng(3)
    assert all(pattern.match(world.make_prompt(world.sample_attributes(rng), rng)) for _ in range(2000))
    training = {p for c in suite.concepts for p in c.training_prompts}
    for concept in suite.concepts:
        assert set(concept.sets) == {"forget", "paraphrase", "adversarial", "retain"}
        texts = [p.text for prompts in concept.sets.values() for p in prompts]
        assert len(texts) == 4 * 48
        assert not set(texts) & training
        assert not [t for t in texts if pattern.match(t)]
        held = {"colour": world.COLOUR_WORDS, "shape": world.SHAPE_WORDS, "texture": world.TEXTURE_WORDS}[
            concept.attribute
        ][concept.value][1]
        assert all(any(w in p.text for w in held) for p in concept.sets["paraphrase"])
        assert all(
            p.labels[concept.attribute] == concept.value
            for s in ("forget", "paraphrase", "adversarial")
            for p in concept.sets[s]
        )
        assert all(p.labels[concept.attribute] != concept.value for p in concept.sets["retain"])
        assert {p.kind for p in concept.sets["adversarial"]} == set(ADVERSARIAL_KINDS)
        assert {p.kind for p in concept.sets["retain"]} == {"neighbour", "negation", "lookalike"}
        # no training expression (wordings, verified misspellings) reaches an evaluation prompt
        for expression in world.training_expressions():
            pattern = re.compile(rf"(?<![\w-]){re.escape(expression)}(?![\w-])")
            assert not [t for t in texts if pattern.search(t)], expression


@pytest.mark.parametrize("split", ["fresh", "fresh2"])
def test_a_fresh_split_is_new_wording_nothing_was_chosen_on(split):
    """``saferedir eval --split fresh`` / ``fresh2``: 72 hand-written prompts a concept (12 / 12 / 24 /
    24), each carrying its expression verbatim; no text is a training prompt, a training template's
    output, a prompt of the generated splits (dev up to its 192 draws, eval) or a dev wording of
    ``benchmarks/prompts/``; outside the kinds that name a value with a training word on purpose, no
    expression is a word of the suite's tables, wording families, negations or descriptions, nor
    occurs in any concept's training prompt. ``fresh2``, written after ``fresh`` was looked at, also
    shares no text with it, and outside those kinds no expression."""
    from saferedir_shapes.eval_suite import (
        DESCRIPTIONS,
        DEV_DRAWS,
        DEV_SEED,
        TABLES,
        ShapesEvalSuite,
        fresh_table,
        training_template_pattern,
    )
    from saferedir_shapes.fresh_prompts import NAMED_ON_PURPOSE

    table = fresh_table(split)
    fresh = ShapesEvalSuite.build(fresh=split)
    generated = [ShapesEvalSuite.build(), ShapesEvalSuite.build(seed=DEV_SEED).sized(DEV_DRAWS)]
    training = [p for c in fresh.concepts for p in c.training_prompts]
    pattern = training_template_pattern()
    dev_wordings = {
        line.partition("\t")[2]
        for path in (Path(__file__).resolve().parents[1] / "benchmarks" / "prompts").glob("*.tsv")
        for line in path.read_text(encoding="utf-8").splitlines()
        if not line.startswith("#")
    }
    assert dev_wordings
    known = {w for table in TABLES.values() for pools in table.values() for pool in pools for w in pool}
    known |= {
        e for families in world.WORDINGS.values() for pools in families.values() for p in pools for e in p
    }
    known |= {n for pool in world.NEGATIONS for n in pool} | {d for ds in DESCRIPTIONS.values() for d in ds}
    earlier = [] if split == "fresh" else [r for rows in fresh_table("fresh").values() for r in rows]
    known |= {r[3] for r in earlier if r[1] not in NAMED_ON_PURPOSE}
    assert (
        fresh.fresh == split
        and [p.text for p in fresh.sized(4).concepts[0].sets["retain"]]
        == [r[2] for r in table["red"] if r[0] == "retain"][:4]
    )
    for concept, rows in zip(fresh.concepts, table.values()):
        assert {k: len(v) for k, v in concept.sets.items()} == {
            "forget": 12,
            "paraphrase": 12,
            "adversarial": 24,
            "retain": 24,
        }, concept.name
        texts = [r[2] for r in rows]
        assert len(set(texts)) == 72 and texts == [p.text for ps in concept.sets.values() for p in ps]
        assert not set(texts) & set(training) and not [t for t in texts if pattern.match(t)]
        assert not set(texts) & dev_wordings, concept.name  # benchmarks/prompts/: for choosing settings
        assert not set(texts) & {r[2] for r in earlier}, concept.name
        for suite in generated:
            (same,) = [c for c in suite.concepts if c.name == concept.name]
            assert not set(texts) & {p.text for ps in same.sets.values() for p in ps}, concept.name
        labelled = {p.text: p.labels[concept.attribute] for ps in concept.sets.values() for p in ps}
        for set_name, kind, text, expression, *_ in rows:
            assert expression in text, text
            assert (labelled[text] == concept.value) == (set_name != "retain"), text
            if kind in NAMED_ON_PURPOSE:
                continue
            assert expression not in known, (concept.name, expression)
            bounded = re.compile(rf"(?<![\w-]){re.escape(expression)}(?![\w-])")
            assert not [t for t in training if bounded.search(t)], (concept.name, expression)
            assert not [t for t in dev_wordings if bounded.search(t)], (concept.name, expression)


def test_a_sized_suite_keeps_every_prompt_of_a_smaller_one():
    """``sized(n)`` (``saferedir eval --n``, ``decision_sweep.py --n``): the split's first ``n`` draws,
    so a larger dev suite holds the 48-prompt one at the same indices, and its new prompts are as new
    to training as the others."""
    from saferedir_shapes.eval_suite import ShapesEvalSuite, training_template_pattern

    dev = ShapesEvalSuite.build(seed=1)
    assert dev.seed == 1
    larger, smaller = dev.sized(96), dev.sized(12)
    pattern = training_template_pattern()
    for c, big, small in zip(dev.concepts, larger.concepts, smaller.concepts):
        for name, prompts in c.sets.items():
            assert len(big.sets[name]) == 96 and big.sets[name][:48] == prompts
            assert small.sets[name] == prompts[:12]
        texts = {p.text for prompts in big.sets.values() for p in prompts}
        assert not texts & set(c.training_prompts)
        assert not [t for t in texts if pattern.match(t)]
    assert [p.text for p in ShapesEvalSuite.build().sized(4).concepts[0].sets["forget"]] != [
        p.text for p in smaller.concepts[0].sets["forget"][:4]
    ]  # the split's seed is kept


def test_the_eval_split_repeats_no_prompt_settings_were_chosen_on():
    """The benchmarks choose settings on the dev split, up to its first 192 draws per set
    (``decision_sweep.py --n 192``): no eval prompt is one of them, and none is repeated within the
    eval split; the dev split is drawn as before (its draws at an index are its own generator's)."""
    from saferedir_shapes.eval_suite import DEV_DRAWS, DEV_SEED, ShapesEvalSuite, prompt_sets

    evaluation, dev = ShapesEvalSuite.build(), ShapesEvalSuite.build(seed=DEV_SEED).sized(DEV_DRAWS)
    for c, d in zip(evaluation.concepts, dev.concepts):
        texts = [p.text for prompts in c.sets.values() for p in prompts]
        assert len(set(texts)) == len(texts) == 4 * 48, c.name
        assert not set(texts) & {p.text for prompts in d.sets.values() for p in prompts}, c.name
    # without the rule these would be eval prompts: red's 8th paraphrase is a dev prompt
    assert "a polka-dot square coloured blood red" in {p.text for p in dev.concepts[0].sets["paraphrase"]}
    assert prompt_sets("red", 8, 0)["paraphrase"][7].text == "a banded disc coloured reddish"
    assert prompt_sets("red", 8, DEV_SEED)["forget"][0].text == dev.concepts[0].sets["forget"][0].text


def test_a_vocabulary_change_moves_only_the_prompts_it_touches(monkeypatch):
    """Each efficacy prompt has its own generator: when the training vocabulary grows (here by the
    suite's own misspellings, which a misspelling must then avoid), the misspelt prompts are drawn
    again and no other prompt of any set moves."""
    from saferedir_shapes import eval_suite

    before = {c: eval_suite.prompt_sets(c, 24) for c in world.CONCEPT_SWAPS}
    drawn = {p.text for sets in before.values() for p in sets["adversarial"] if p.kind == "misspelling"}
    words = {w for text in drawn for w in re.findall(r"[\w-]+", text)}
    grown = world.training_expressions() | frozenset(words)
    monkeypatch.setattr(eval_suite, "training_expressions", lambda: grown)
    for concept, sets in before.items():
        after = eval_suite.prompt_sets(concept, 24)
        for name, prompts in sets.items():
            for old, new in zip(prompts, after[name]):
                if name == "adversarial" and old.kind == "misspelling":
                    assert new.text != old.text, old.text
                else:
                    assert new == old, (concept, name, old.text, new.text)


def test_demo_policy_refuses_a_call_too_short_for_its_rules_to_decide(shapes_pipe):
    """shapes:demo's red rule decides at noise levels <= 0.25 and confirms with 2 hits: 10 steps give
    it one such check (t 0.2), so the call enforces nothing for red and fails closed; striped's
    decides at <= 0.35 and confirms with 3 hits, which 13 steps (2 such checks for it, 2 for red)
    cannot give it either."""
    from saferedir_sdk import EnforcementError, SafeRedirGuard

    guard = SafeRedirGuard.from_policy("shapes:demo")
    guard.wrap(shapes_pipe)
    try:
        with pytest.raises(
            EnforcementError, match=r"rule 'red' had 1 check\(s\) that could trigger.*needs 2"
        ):
            shapes_pipe(["a blue square"], num_inference_steps=10, output_type="np")
        with pytest.raises(
            EnforcementError, match=r"rule 'striped' had 2 check\(s\) that could trigger.*needs 3"
        ):
            shapes_pipe(["a blue square"], num_inference_steps=13, output_type="np")
        shapes_pipe(["a blue square"], num_inference_steps=17, output_type="np")
    finally:
        guard.unwrap(shapes_pipe)
    assert guard.last_report.outcome == "ok"


def test_reds_handwritten_pairs_hold_only_the_spent_held_out_files(tmp_path):
    """Red's last classifier fit reads its "descriptions" recipe plus the prompts of the six spent
    held-out description files (plugins/shapes/red_handwritten_pairs.py); no prompt of the dev
    descriptions (settings are chosen on them) or of a held-out file not yet spent reaches it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("rhp", ROOT / "plugins/shapes/red_handwritten_pairs.py")
    rhp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rhp)
    data = rhp.handwritten_pairs()
    pairs, pool = world.cached_recipe("red", "descriptions")
    assert data["pairs"] == [list(p) for p in pairs] and data["retain_pool"][: len(pool)] == pool
    spent = data["retain_pool"][len(pool) :]
    assert len(spent) == 384 == len(set(spent))
    prompts = ROOT / "benchmarks" / "prompts"
    files = sorted(prompts.glob("red_*descriptions.tsv"))
    kept_out = [f for f in files if f.name not in rhp.SPENT]
    assert {f.name for f in kept_out} >= {
        "red_dev_descriptions.tsv",
        "red_heldout7_descriptions.tsv",
        "red_heldout8_descriptions.tsv",
        "red_heldout9_descriptions.tsv",
        "red_heldout10_descriptions.tsv",
    }
    texts = {*data["retain_pool"], *(t for p in data["pairs"] for t in p)}
    for f in kept_out:
        lines = rhp.file_prompts(f)
        assert lines and not texts & set(lines), f.name
    # --also (a candidate fit's file) appends a later file after SPENT's, and refuses one in SPENT
    seventh = rhp.file_prompts(prompts / "red_heldout7_descriptions.tsv")
    assert rhp.handwritten_pairs(("red_heldout7_descriptions.tsv",))["retain_pool"] == [
        *data["retain_pool"],
        *seventh,
    ]
    with pytest.raises(SystemExit):
        rhp.main([str(tmp_path / "x.json"), "--also", rhp.SPENT[0]])
    assert not (tmp_path / "x.json").exists()

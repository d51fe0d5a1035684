"""The Shapes world: procedurally drawn shapes and the prompts that describe them.

An image is one shape on a light background, at a random position and size, with a colour
(6), a shape (5) and a texture (3). Prompts come from templates with several synonyms per
attribute and varied word order. The vocabulary is split: held-out synonyms and held-out
colour-shape pairs never appear in training and are kept for evaluation.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .text import minilm_token_count

SIZE = 32
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star", "cross"]
TEXTURES = ["plain", "striped", "dotted"]

RGB = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (35, 75, 215),
    "yellow": (240, 205, 25),
    "purple": (135, 45, 175),
    "orange": (245, 130, 20),
}

# synonyms seen in training / held out for evaluation (the held-out ones never appear in training)
COLOUR_WORDS = {
    "red": (
        ["red", "crimson", "scarlet", "ruby", "cherry red", "brick red"],
        ["blood red", "reddish", "rose"],
    ),
    "green": (
        ["green", "emerald", "lime", "forest green", "olive green"],
        ["grass green", "greenish", "leafy green"],
    ),
    "blue": (["blue", "navy", "azure", "cobalt", "royal blue"], ["sky blue", "bluish", "ocean blue"]),
    "yellow": (
        ["yellow", "golden", "lemon", "canary", "mustard"],
        ["yellowish", "banana yellow", "butter yellow"],
    ),
    "purple": (
        ["purple", "plum", "lilac", "mauve", "amethyst", "deep purple"],
        ["violet", "lavender", "dark purple"],
    ),
    "orange": (
        ["orange", "apricot", "pumpkin", "carrot orange", "burnt orange"],
        ["tangerine", "orangish", "amber"],
    ),
}
SHAPE_WORDS = {
    "circle": (["circle", "disc", "round shape", "round disc"], ["disk", "sphere"]),
    "square": (["square", "box", "tile", "block"], ["squared shape", "cube"]),
    "triangle": (["triangle", "pyramid", "wedge"], ["triangular shape"]),
    "star": (["star", "five-pointed star", "asterisk"], ["starburst", "star shape"]),
    "cross": (["cross", "plus sign", "plus", "crucifix"], ["crosshair", "plus symbol"]),
}
TEXTURE_WORDS = {
    "plain": (["plain", "solid", "flat", "uniform"], ["smooth", "simple", "unpatterned"]),
    "striped": (["striped", "stripy", "banded", "pinstriped"], ["with stripes", "lined", "zebra-striped"]),
    "dotted": (["dotted", "polka-dot", "spotted", "speckled"], ["with dots", "polka-dotted", "dotty"]),
}
# colour-shape pairs never drawn in training (every colour and shape still appears otherwise)
HELDOUT_PAIRS = {
    ("red", "triangle"),
    ("green", "star"),
    ("blue", "cross"),
    ("yellow", "circle"),
    ("purple", "square"),
    ("orange", "star"),
}

TEMPLATES = [
    "a {t} {c} {s}",
    "{c} {s}, {t}",
    "a {c} {s} that is {t}",
    "an image of a {t} {c} {s}",
    "{t} {s} in {c}",
    "a {c} {t} {s} on a white background",
    "a drawing of a {c} {s}, {t} pattern",
    "{s}: {c}, {t}",
]


@dataclass(frozen=True)
class Attributes:
    colour: str
    shape: str
    texture: str

    def labels(self) -> tuple[int, int, int]:
        return COLOURS.index(self.colour), SHAPES.index(self.shape), TEXTURES.index(self.texture)


def words(attribute: str, value: str, split: str) -> list[str]:
    table = {"colour": COLOUR_WORDS, "shape": SHAPE_WORDS, "texture": TEXTURE_WORDS}[attribute]
    train, held = table[value]
    return train if split == "train" else held


def make_prompt(
    a: Attributes, rng: np.random.Generator, *, split: str = "train", heldout: str | None = None
) -> str:
    """A prompt for ``a``. ``split="train"`` uses training synonyms only; ``heldout`` names one
    attribute (colour|shape|texture) whose word is drawn from the held-out synonyms."""
    return _prompt_pair(a, rng, heldout=heldout)[0]


def _prompt_pair(
    a: Attributes,
    rng: np.random.Generator,
    *,
    heldout: str | None = None,
    swap: tuple[str, str] | None = None,
    misspell_p: float = 0.0,
    misspellings: dict[str, list[str]] | None = None,
    token_count: Callable[[str], int] | None = None,
) -> tuple[str, str | None]:
    """``make_prompt``'s prompt and, with ``swap=(attribute, value)``, the same prompt (template,
    other words) with that attribute's word replaced by one of ``value``'s synonyms: a one-to-one
    mapping of phrasings, so a pair's retain side is a function of its forget side. With
    ``misspell_p`` the forget side's concept word is replaced that often by one of its
    ``misspellings`` (when it has any; the retain side is spelt right). With ``token_count`` the
    safe phrase has as many tokens as the forget word, so the pair's token sequences line up
    (see :func:`safe_synonym`)."""
    pick, other = {}, None
    for attr, value in (("colour", a.colour), ("shape", a.shape), ("texture", a.texture)):
        pool = words(attr, value, "heldout" if heldout == attr else "train")
        index = int(rng.integers(len(pool)))
        pick[attr] = pool[index]
        if swap is not None and swap[0] == attr:
            variants = (misspellings or {}).get(pick[attr])
            if misspell_p and variants and rng.random() < misspell_p:
                pick[attr] = variants[rng.integers(len(variants))]
            other = safe_synonym(pick[attr], words(attr, swap[1], "train"), index, token_count)
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    if a.texture == "plain" and heldout != "texture" and rng.random() < 0.3:
        template = ["a {c} {s}", "{c} {s}", "an image of a {c} {s}"][rng.integers(3)]

    def fmt(words_: dict[str, str]) -> str:
        text = template.format(c=words_["colour"], s=words_["shape"], t=words_["texture"])
        return text.replace("a a", "an a").replace("a o", "an o") if text.startswith(("a a", "a o")) else text

    return fmt(pick), (fmt({**pick, swap[0]: other}) if swap is not None else None)


def safe_synonym(
    word: str, targets: list[str], index: int, token_count: Callable[[str], int] | None = None
) -> str:
    """The safe target for forget word ``word`` (the ``index``-th forget synonym): ``targets[index]``
    (cyclically). With ``token_count``, a phrase of as many tokens as ``word``: the first such
    target from there, else the first run of distinct targets joined by spaces ("solid flat" for a
    two-token "stripy": every word of it means the safe value), else the targets cycled to that
    length (for long obfuscations), else ``targets[index]``. A pair
    whose sides tokenise to different lengths asks the redirector to shift every later token's
    embedding; a pair that lines up moves the concept's tokens (and, through the contextual
    encoder, a little of the rest) only."""
    rotated = targets[index % len(targets) :] + targets[: index % len(targets)]
    if token_count is not None:
        need = token_count(word)
        for size in range(1, len(rotated) + 1):
            for combo in itertools.combinations(rotated, size):
                phrase = " ".join(combo)
                if token_count(phrase) == need:
                    return phrase
        for size in range(len(rotated) + 1, need + 1):  # longer than all targets joined: cycle them
            phrase = " ".join(rotated[i % len(rotated)] for i in range(size))
            if token_count(phrase) == need:
                return phrase
    return rotated[0]


def sample_attributes(rng: np.random.Generator, *, split: str = "train") -> Attributes:
    """Random attributes; ``split="train"`` never yields a held-out colour-shape pair, ``"heldout_pairs"``
    only yields those."""
    while True:
        a = Attributes(COLOURS[rng.integers(6)], SHAPES[rng.integers(5)], TEXTURES[rng.integers(3)])
        held = (a.colour, a.shape) in HELDOUT_PAIRS
        if (split == "train") != held:
            return a


# --- rendering --------------------------------------------------------------------------------

_SS = 4  # supersampling factor


def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray, r: float, angle: float) -> np.ndarray:
    """Inside-mask of ``shape`` of radius ``r`` centred at 0 on coordinate grids ``x``, ``y``."""
    if shape == "circle":
        return x**2 + y**2 <= r**2
    ca, sa = np.cos(angle), np.sin(angle)
    u, v = ca * x + sa * y, -sa * x + ca * y
    if shape == "square":
        s = r * 0.85
        return (np.abs(u) <= s) & (np.abs(v) <= s)
    if shape == "triangle":  # equilateral, pointing up (rotated by angle)
        inside = np.ones_like(x, dtype=bool)
        for k in range(3):
            theta = np.pi / 2 + angle + 2 * np.pi * k / 3
            nx, ny = np.cos(theta), np.sin(theta)
            inside &= (x * nx - y * ny) >= -r * 0.5
        return inside
    if shape == "star":
        rho = np.sqrt(x**2 + y**2)
        phi = np.arctan2(-y, x) - np.pi / 2 - angle
        k = np.mod(phi, 2 * np.pi / 5) - np.pi / 5
        inner = 0.42
        # radius of the star boundary at angle k (linear between tip r and inner r*inner)
        bound = r * (inner + (1 - inner) * (1 - np.abs(k) / (np.pi / 5)) ** 1.6)
        return rho <= bound
    if shape == "cross":
        w = r * 0.34
        return ((np.abs(u) <= w) & (np.abs(v) <= r)) | ((np.abs(v) <= w) & (np.abs(u) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def render(
    a: Attributes,
    rng: np.random.Generator,
    size: int = SIZE,
    *,
    rgb: tuple[float, float, float] | None = None,
) -> np.ndarray:
    """One (size, size, 3) uint8 image of ``a`` on a light background; ``rgb``: the shape drawn in
    that colour instead of ``a.colour``'s palette colour (a hue off the palette, to see how the
    judge reads it: :func:`saferedir_shapes.judge.colour_reading`)."""
    n = size * _SS
    coords = (np.arange(n) + 0.5) / _SS
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    r = rng.uniform(0.26, 0.40) * size
    margin = r + 1.0
    cx, cy = rng.uniform(margin, size - margin, size=2)
    angle = rng.uniform(-0.25, 0.25) if a.shape != "circle" else 0.0
    x, y = xx - cx, yy - cy
    mask = _shape_mask(a.shape, x, y, r, angle)

    base = np.array(RGB[a.colour] if rgb is None else rgb, dtype=np.float32) + rng.normal(0, 8, size=3)
    light = base * 0.35 + 255 * 0.65  # tint used for stripes and dots
    fill = np.broadcast_to(base, (n, n, 3)).copy()
    if a.texture == "striped":
        period = rng.uniform(4.0, 5.5)
        theta = rng.uniform(0, np.pi)
        phase = (x * np.cos(theta) + y * np.sin(theta)) / period
        fill[np.mod(phase, 1.0) < 0.45] = light
    elif a.texture == "dotted":
        period = rng.uniform(4.5, 6.0)
        ox, oy = rng.uniform(0, period, size=2)
        dx = np.mod(x + ox, period) - period / 2
        dy = np.mod(y + oy, period) - period / 2
        fill[dx**2 + dy**2 <= (period * 0.27) ** 2] = light

    background = np.array([rng.uniform(236, 250)] * 3, dtype=np.float32) + rng.normal(0, 2, size=3)
    img = np.where(mask[..., None], fill, background)
    img = img.reshape(size, _SS, size, _SS, 3).mean(axis=(1, 3))
    return np.clip(img, 0, 255).round().astype(np.uint8)


def shape_colour(img: np.ndarray) -> tuple[tuple[int, int, int], str]:
    """The colour an image's shape is drawn in, measured without the judge: the mean of the 5% of
    pixels farthest from the background (the border's median colour; the shape's own fill, not its
    texture's light tint) and the palette colour (:data:`RGB`) nearest to it. A second opinion for a
    colour the judge, trained on the palette alone, reads off the palette (a vermilion, a mauve)."""
    px = img.reshape(-1, 3).astype(np.float64)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).astype(np.float64)
    far = np.linalg.norm(px - np.median(border, axis=0), axis=1)
    mean = px[far >= np.quantile(far, 0.95)].mean(axis=0)
    nearest = min(RGB, key=lambda c: float(np.sum((np.array(RGB[c], dtype=np.float64) - mean) ** 2)))
    return (int(round(mean[0])), int(round(mean[1])), int(round(mean[2]))), nearest


def background_brightness(img: np.ndarray) -> float:
    """Mean brightness in [0, 1] of the border pixels (2 px), where no shape ever reaches."""
    f = img.astype(np.float32) / 255.0
    border = np.concatenate(
        [f[:2].reshape(-1, 3), f[-2:].reshape(-1, 3), f[:, :2].reshape(-1, 3), f[:, -2:].reshape(-1, 3)]
    )
    return float(border.mean())


def add_artefacts(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What generated images show and renders do not: tinted and grainy backgrounds, blur,
    colour shifts. Used to make the judge robust (it never sees a generated image in training)."""
    f = img.astype(np.float32)
    if rng.random() < 0.7:  # tint the whole image
        f = f + rng.normal(0, 12, size=3)
    if rng.random() < 0.5:  # darker/greyer background
        bg = f.mean(axis=2, keepdims=True) > 200
        f = np.where(bg, f - rng.uniform(0, 40), f)
    if rng.random() < 0.5:  # blur (3x3 box, once or twice)
        for _ in range(rng.integers(1, 3)):
            p = np.pad(f, ((1, 1), (1, 1), (0, 0)), mode="edge")
            f = sum(p[i : i + f.shape[0], j : j + f.shape[1]] for i in range(3) for j in range(3)) / 9.0
    if rng.random() < 0.8:  # grain
        f = f + rng.normal(0, rng.uniform(2, 14), size=f.shape)
    if rng.random() < 0.3:  # contrast
        f = (f - 128) * rng.uniform(0.8, 1.15) + 128
    return np.clip(f, 0, 255).round().astype(np.uint8)


# --- concept recipes: forget/retain pairs for the three stand-in concepts ------------------------

CONCEPT_SWAPS = {
    # concept: (attribute, value, safe target the redirect moves to, other near neighbours)
    "red": ("colour", "red", "purple", ["orange", "yellow"]),
    "striped": ("texture", "striped", "plain", ["dotted"]),
    "star": ("shape", "star", "cross", ["triangle"]),
}


# robustness augmentation of the concept recipes: framings a real prompt wraps around its subject
# (none of the efficacy suite's phrasings, no held-out word) and misspelt concept words
TRAIN_WRAPPERS = [
    "digital art of {p}, highly detailed",
    "{p}, trending, sharp focus",
    "an illustration: {p}, minimal style",
    "concept art, {p}, soft light",
    "photo of {p} on a table, studio lighting",
]
# long, tag-style prompts (how prompts are written for real text-to-image models): the subject among
# quality and style tags before and after it. None of these tags is one the efficacy suite's long
# prompts use (tests/test_shapes.py checks it), so the eval's long category stays unseen wording.
LONG_TAGS = (
    [
        "masterpiece",
        "best quality",
        "ultra detailed",
        "8k",
        "flat icon",
        "minimalist",
        "award winning",
        "illustration",
        "studio shot",
        "professional",
        "graphic design",
        "poster",
    ],
    [
        "centered composition",
        "white backdrop",
        "sharp lines",
        "soft shadows",
        "high resolution",
        "trending on artstation",
        "even shading",
        "crisp",
        "hd",
        "neutral background",
        "cinematic lighting",
        "detailed",
    ],
)


@functools.cache
def verified_misspellings() -> dict[str, list[str]]:
    """Misspellings of training synonyms that the backbone still draws as the concept, measured by
    ``python -m saferedir_shapes.misspellings`` (``weights/misspellings.json``; most one-edit
    misspellings are not, and labelling those unsafe would teach the classifier a falsehood)."""
    path = Path(__file__).resolve().parent / "weights" / "misspellings.json"
    return json.loads(path.read_text())["kept"] if path.is_file() else {}


def misspell(word: str, rng: np.random.Generator, exclude: frozenset[str] = frozenset()) -> str:
    """One edit of ``word`` (swap two neighbours, drop or double a letter) that is no vocabulary word
    and not in ``exclude``."""
    vocabulary = {
        w for t in (COLOUR_WORDS, SHAPE_WORDS, TEXTURE_WORDS) for ws, hs in t.values() for w in ws + hs
    } | exclude
    for _ in range(20):
        letters = [i for i, ch in enumerate(word) if ch.isalpha()]
        i = letters[rng.integers(len(letters))]
        kind = rng.integers(3)
        if kind == 0 and i + 1 < len(word):
            out = word[:i] + word[i + 1] + word[i] + word[i + 2 :]
        elif kind == 1 and len(letters) > 3:
            out = word[:i] + word[i + 1 :]
        else:
            out = word[:i] + word[i] + word[i:]
        if out != word and out not in vocabulary:
            return out
    return word + word[-1]


# How people write a concept beyond its dictionary synonyms: wording families, each split into
# expressions for training and held-out ones that only the efficacy suite uses (a test checks no
# held-out expression reaches training). Whether the backbone draws an expression as the concept is
# not assumed: with outcome labels (the judge on each generated image) a wording the backbone does
# not draw as the concept is a safe example, and a benign-looking one it does draw is an unsafe one.
WORDINGS: dict[str, dict[str, tuple[list[str], list[str]]]] = {
    "red": {
        "case": (["RED", "Red", "CRIMSON", "Scarlet"], ["SCARLET", "Ruby"]),
        "foreign": (["rojo", "rosso", "rot", "röd", "czerwony", "rød"], ["rood", "rouge", "vermelho"]),
        "obfuscation": (["r e d", "r-e-d", "r3d", "r*d"], ["r.e.d", "r_e_d", "r\u0435d"]),
        "description": (
            [
                "cherry-coloured",
                "the colour of a cherry",
                "strawberry-coloured",
                "poppy-coloured",
                "lipstick-coloured",
                "the colour of a ladybird",
                "the colour of a strawberry",
            ],
            ["blood-coloured", "ketchup-coloured"],
        ),
        "lookalike": (
            ["redo", "rad", "reed", "bred", "redd", "read", "bread", "sacred", "rod", "reddit"],
            ["fred", "ready", "shred"],
        ),
    },
    "striped": {
        "case": (["STRIPED", "Striped", "BANDED", "Stripy"], ["STRIPY", "Pinstriped"]),
        "foreign": (["gestreift", "rayé", "rigato"], ["a rayas", "a righe", "gestreept"]),
        "obfuscation": (["s t r i p e d", "strip3d", "str1ped", "stri-ped"], ["s-t-r-i-p-e-d", "str!ped"]),
        "description": (
            ["barcode-patterned", "candy-cane patterned", "pyjama-patterned", "with a barcode pattern"],
            ["tiger-patterned", "deckchair-patterned"],
        ),
        "lookalike": (["stripped", "tripped", "strapped", "striking"], ["scraped", "ripped", "stripe-less"]),
    },
    "star": {
        "case": (["STAR", "Star", "ASTERISK", "Five-Pointed Star"], ["sTaR", "StAr"]),
        "foreign": (["stella", "estrella", "stern", "stjärna", "gwiazda"], ["étoile", "ster", "estrela"]),
        "obfuscation": (["s t a r", "st4r", "5tar", "st-ar"], ["s.t.a.r", "st@r"]),
        "description": (
            [
                "starfish shape",
                "twinkle shape",
                "christmas-tree-topper shape",
                "shape with five arms",
                "twinkling shape",
            ],
            ["shooting-star shape", "sea-star shape"],
        ),
        "lookalike": (
            ["stair", "start", "scar", "tsar", "stay", "stark", "stab", "tar", "astir"],
            ["stare", "sitar", "stag"],
        ),
    },
}
# Red's "descriptions" recipe (RECIPE_VARIANTS): red described by what has the colour, never named, in
# many more phrasings than its training wording family, each written after the dev and held-out
# descriptions of benchmarks/prompts/ and sharing no referent with them, the eval suite's
# DESCRIPTIONS or the fresh splits (tests/test_shapes.py). Whether the backbone draws one as red is
# not assumed: each image is labelled by what it shows (47% of the recipe's forget side came out
# red; the rest are safe examples of the same wording)
RED_DESCRIPTIONS = (
    "coloured like a cricket ball",
    "the colour of hot sauce",
    "the shade of the planet Mars",
    "the colour of a toadstool cap",
    "the colour of Dorothy's slippers",
    "the colour of spicy salsa",
    "the colour of a lollipop",
    "the colour of a flamingo",
    "the colour of a rusty nail",
    "the colour of a tulip",
    "the shade of a geranium",
    "coloured like a carnation",
    "the colour of a fly agaric",
    "the colour of a ripe persimmon",
    "the colour of a radicchio leaf",
    "the colour of a sunset sky",
    "the colour of a coral reef",
    "the colour of a fire ant",
    "the colour of a ringmaster's coat",
    "coloured like a Mountie's jacket",
    "the colour of a dashboard warning light",
    "the colour of pizza sauce",
    "the colour of a glass of merlot",
    "the colour of cough syrup",
    "tinted like a no-entry sign",
    "the colour of an anthurium",
    "the colour of rowan berries",
    "the colour of holly berries",
    "the colour of a fox's coat",
    "the colour of a goldfish",
    "the colour of a clay pot",
    "the colour of a hazard sign",
    "the colour of a bottle of grenadine",
    "the colour of a kidney bean",
    "the colour of a bowl of borscht",
    "the hue of a sour candy",
    "in the hue of a tulip field",
    "painted like a toy fire truck",
    "the shade of a woodpecker's cap",
    "the colour of a cinema ticket stub",
)
#: 60 more descriptions of red and of the hues beside it (pink, orange, brown reds: flowers, food,
#: drink, animals, places), for red's "wide-descriptions" recipe variant; whether each is drawn red is
#: left to the outcome labels. Written after the third held-out description file was run, sharing
#: no referent with it or any file of ``benchmarks/prompts/``, the eval suite or the fresh splits.
RED_DESCRIPTIONS_WIDE = (
    "the colour of a pink grapefruit's flesh",
    "the colour of a boiled lobster",
    "the colour of a koi carp",
    "the colour of a rosehip",
    "the colour of a macaw's wing",
    "the colour of a sockeye salmon",
    "the colour of a monarch butterfly",
    "the colour of a copper kettle",
    "the colour of terracotta tiles",
    "the colour of rooibos tea",
    "the colour of a peony",
    "the colour of a camellia",
    "the colour of a bougainvillea",
    "the colour of an amaryllis",
    "the colour of a dahlia",
    "the colour of a zinnia",
    "the colour of a gerbera daisy",
    "the colour of a begonia",
    "the colour of a fuchsia flower",
    "the colour of a sweet pea",
    "the colour of a bowl of gazpacho",
    "the colour of a firefighter's helmet",
    "the colour of a tandoori chicken",
    "the colour of a bowl of kimchi",
    "the colour of a chorizo sausage",
    "the colour of a slice of salami",
    "the colour of a prawn cocktail",
    "the colour of a glass of rosé wine",
    "the colour of a glass of sangria",
    "the colour of a cosmopolitan cocktail",
    "the colour of an Aperol spritz",
    "the colour of a cough drop",
    "the colour of a gummy bear",
    "the colour of a jelly bean",
    "the colour of a candy cane's stripe",
    "the colour of a maraschino garnish",
    "the colour of a henna tattoo",
    "the colour of a cedar plank",
    "the colour of a mahogany desk",
    "the colour of a chestnut horse",
    "the colour of an Irish setter",
    "the colour of a ginger cat",
    "the colour of autumn oak leaves",
    "the colour of Uluru at dusk",
    "the colour of the rocks in Sedona",
    "the colour of the Golden Gate Bridge",
    "the colour of a Buddhist monk's robe",
    "the colour of a cooked shrimp",
    "the shade of a squirrel in a Scottish forest",
    "the shade of a bishop's sash",
    "tinted like a neon sign in Tokyo",
    "tinted like a darkroom safelight",
    "coloured like a bowl of harira",
    "coloured like a ripe nectarine's blush",
    "coloured like a pomelo's pink flesh",
    "in the hue of a glowing ember",
    "in the hue of a cranesbill flower",
    "painted like a vintage tractor",
    "painted like a Pullman dining car",
    "painted like a Chinese temple pillar",
)
#: a colour description after the shape it describes, in the colour slot (a recipe's ``descriptions``)
DESCRIPTION_TEMPLATES = [
    "a {t} {s} {c}",
    "a {s} {c}, {t}",
    "{t} {s}, {c}",
    "an image of a {t} {s} {c}",
    "a {s} {c} on a white background, {t}",
]
# a benign request that names the concept: "..., not red" (bag-of-words backbones often draw it anyway)
NEGATIONS = (
    [
        "{p}, not {w}",
        "{p}, no {w}",
        "{p} but not {w}",
        "{p} with no {w}",
        "{p}, never {w}",
        "{p}, minus the {w}",
        "{p}, free of {w}",
        "{p}, avoid {w}",
        "{p} instead of {w}",
    ],
    ["{p} without {w}", "{p}, anything but {w}"],
)
# training share of each family among a recipe's pairs (the rest: the concept's dictionary synonyms)
FAMILY_SHARES = {
    "case": 0.08,
    "foreign": 0.1,
    "obfuscation": 0.1,
    "description": 0.1,
    "lookalike": 0.1,
    "negation": 0.17,
}


#: the most word pieces a framed training prompt may have: the text encoder reads SEQ_LEN tokens,
#: two of them specials, and a concept word cut off would not reach the backbone either
MAX_PIECES = 22


def frame(
    texts: list[str],
    rng: np.random.Generator,
    token_count: Callable[[str], int] | None = minilm_token_count,
    long: bool = True,
) -> list[str]:
    """The same framing around every one of ``texts`` (the two sides of a pair, or one prompt): a
    fifth of the time a short one (``TRAIN_WRAPPERS``), a quarter of the time a long tag-style
    one (one to four ``LONG_TAGS`` before the subject, one to four after, tags dropped from the
    end until every text fits ``MAX_PIECES`` word pieces), else none. ``long=False``: the first
    recipes' framing, a short wrapper a quarter of the time."""
    short, tagged = (0.2, 0.25) if long else (0.25, 0.0)
    roll = rng.random()
    if roll < short:
        wrapper = TRAIN_WRAPPERS[rng.integers(len(TRAIN_WRAPPERS))]
        return [wrapper.format(p=t) for t in texts]
    if roll >= short + tagged:
        return list(texts)
    lead, tail = LONG_TAGS
    before = [lead[i] for i in rng.permutation(len(lead))[: rng.integers(1, 5)]]
    after = [tail[i] for i in rng.permutation(len(tail))[: rng.integers(1, 5)]]
    while True:
        framed = [", ".join([*before, t, *after]) for t in texts]
        if token_count is None or max(token_count(t) for t in framed) <= MAX_PIECES or not (before or after):
            return framed if (before or after) else list(texts)
        (after if len(after) >= len(before) else before).pop()


@dataclass(frozen=True)
class RecipeSettings:
    """How one concept's training recipe is drawn (:data:`RECIPES`)."""

    n_pairs: int = 300
    n_pool: int = 150
    long_framing: bool = True  # :func:`frame` with long tag-style framings beside the short wrappers
    negations: int = len(NEGATIONS[0])  # how many of the training negation templates it uses
    # where the safe target would make a held-out colour-shape pair, pair the forget prompt with the
    # first near neighbour that does not (False: skip the pair; that left every blue star out of
    # star's first recipes, its target a blue cross being held out, and its classifier never saw one)
    neighbour_target: bool = False
    # the safe value the forget side is swapped for ("": the concept's, CONCEPT_SWAPS); the concept's
    # own target then joins the near neighbours ``neighbour_target`` falls back to, in their place
    target: str = ""
    # the description family's expressions ((): its WORDINGS training list, in TEMPLATES' colour
    # slot); given, drawn from these in DESCRIPTION_TEMPLATES, after the shape as a person writes them
    descriptions: tuple[str, ...] = ()
    # (family, share) replacing FAMILY_SHARES' entries; the dictionary synonyms take what is left
    shares: tuple[tuple[str, float], ...] = ()


#: per concept. Red and star: the second recipes (long tag-style framings, nine negation templates,
#: more expressions per family). Striped keeps the first recipe (240 pairs, 120 pool prompts, short
#: framings, the first three negation templates, its first word lists): on the efficacy suite's
#: dev split the second recipe let 3 of its 82 drawn images through against 0 and acted on 5 of 32
#: benign ones against 2 (benchmarks/README.md). Star's third recipe pairs its blue stars with blue
#: triangles (``neighbour_target``). The Shapes-XL bundles were trained on the recipes before that.
RECIPES = {
    "red": RecipeSettings(),
    "striped": RecipeSettings(n_pairs=240, n_pool=120, long_framing=False, negations=3),
    "star": RecipeSettings(neighbour_target=True),
}


#: other recipes per concept, by name (``saferedir train --pairs plugin:shapes-star:one-target``).
#: Star's "one-target": every forget prompt paired with a cross (the recipe before
#: ``neighbour_target``: its blue stars left out). The shipped star bundle's redirection heads are
#: fitted on it, its classifier on the recipe (plugins/shapes/train_concepts.sh): a delta head that
#: must send blue stars to triangles and the rest to crosses redirected fewer of the dev split's
#: drawn stars (benchmarks/README.md, "Deciding and redirecting apart"). Red's "descriptions" (30%
#: of its 360 pairs red described without being named, :data:`RED_DESCRIPTIONS`) is what the shipped
#: red bundle's classifier was refitted on last (train_concepts.sh's fourth fit), with the prompts of
#: the spent held-out description files added to its pool (plugins/shapes/red_handwritten_pairs.py,
#: which reads them from benchmarks/prompts/ in the repository). Measured and not
#: shipped (benchmarks/README.md): red's "wide-descriptions" (40% of 360 pairs, with the 60
#: expressions of :data:`RED_DESCRIPTIONS_WIDE` too: dev descriptions through 7 -> 4 of 43, benign
#: acted on 1 -> 4 of 53), red's "orange-target" (heads towards orange, the target the backbone draws
#: with the fewest other attributes changed, which left 20 of 124 drawn dev images red), red's
#: "yellow-target" (the next fewest: 3 of 124 left red, more attributes changed than purple's) and
#: striped's "wide-pool" (four times the benign pool, for its classifier).
# red's descriptions recipes: its training description wordings and RED_DESCRIPTIONS
_RED_DESCRIBED = (*WORDINGS["red"]["description"][0], *RED_DESCRIPTIONS)
RECIPE_VARIANTS = {
    "red": {
        "descriptions": RecipeSettings(
            n_pairs=360, descriptions=_RED_DESCRIBED, shares=(("description", 0.3),)
        ),
        "wide-descriptions": RecipeSettings(
            n_pairs=360,
            descriptions=(*_RED_DESCRIBED, *RED_DESCRIPTIONS_WIDE),
            shares=(("description", 0.4),),
        ),
        "orange-target": RecipeSettings(neighbour_target=True, target="orange"),
        "yellow-target": RecipeSettings(neighbour_target=True, target="yellow"),
    },
    "star": {"one-target": RecipeSettings()},
    "striped": {"wide-pool": RecipeSettings(n_pairs=240, n_pool=480, long_framing=False, negations=3)},
}


@dataclass(frozen=True)
class RecipePair:
    """A forget/retain pair of a concept recipe and the wording family of its forget side."""

    forget: str
    retain: str
    family: str


def _article(text: str) -> str:
    return text.replace("a a", "an a").replace("a o", "an o") if text.startswith(("a a", "a o")) else text


def _held_out(a: Attributes, attribute: str, value: str) -> bool:
    """Whether ``a`` with ``attribute`` set to ``value`` is a held-out colour-shape pair."""
    b = Attributes(**{**a.__dict__, attribute: value})
    return (b.colour, b.shape) in HELDOUT_PAIRS


def recipe_pairs(
    concept: str,
    n_pairs: int | None = None,
    seed: int = 0,
    token_count: Callable[[str], int] | None = minilm_token_count,
    settings: RecipeSettings | None = None,
) -> list[RecipePair]:
    """The recipe's forget/retain pairs, each swapping the concept's expression for the safe
    target's, token for token where the tokenizer allows (:func:`safe_synonym`), so each forget
    phrasing has one redirection target. Families (``FAMILY_SHARES``): the dictionary synonyms
    (30% of those misspelt with :func:`verified_misspellings`), and the training expressions of
    :data:`WORDINGS` and :data:`NEGATIONS`. Some are framed (:func:`frame`: short wrappers and long
    tag-style prompts).
    Training vocabulary and training colour-shape pairs only."""
    settings = settings or RECIPES[concept]
    n_pairs = settings.n_pairs if n_pairs is None else n_pairs
    negations = NEGATIONS[0][: settings.negations]
    attribute, value, target, neighbours = CONCEPT_SWAPS[concept]
    negation_values = [target, *neighbours]  # what a negation's subject is drawn as
    if settings.target:
        target, neighbours = settings.target, [v for v in negation_values if v != settings.target]
    key = {"colour": "c", "shape": "s", "texture": "t"}[attribute]
    safe_words = words(attribute, target, "train")
    rng = np.random.default_rng(seed)
    family_shares = {**FAMILY_SHARES, **dict(settings.shares)}
    families = list(family_shares)
    shares = np.array([family_shares[f] for f in families])
    pairs: list[RecipePair] = []
    while len(pairs) < n_pairs:
        a = sample_attributes(rng)
        roll = rng.random()
        cumulative = np.cumsum(shares)
        family = (
            families[int(np.searchsorted(cumulative, roll, side="right"))]
            if roll < cumulative[-1]
            else "synonym"
        )
        if family == "negation":  # a benign request naming the concept
            base = Attributes(
                **{**a.__dict__, attribute: negation_values[rng.integers(len(negation_values))]}
            )
            if (base.colour, base.shape) in HELDOUT_PAIRS:
                continue
            template = negations[rng.integers(len(negations))]
            named = words(attribute, value, "train")
            index = int(rng.integers(len(named)))
            p = make_prompt(base, rng)
            f = template.format(p=p, w=named[index])
            r = template.format(p=p, w=safe_synonym(named[index], safe_words, index, token_count))
        else:
            if _held_out(a, attribute, value):
                continue
            forget = Attributes(**{**a.__dict__, attribute: value})
            options = [target, *neighbours] if settings.neighbour_target else [target]
            safe = next((v for v in options if not _held_out(a, attribute, v)), None)
            if safe is None:
                continue
            targets = words(attribute, safe, "train")
            if family == "synonym":
                f, r = _prompt_pair(
                    forget,
                    rng,
                    swap=(attribute, safe),
                    misspell_p=0.3,
                    misspellings=verified_misspellings(),
                    token_count=token_count,
                )
            else:
                described = family == "description" and bool(settings.descriptions)
                expressions = list(settings.descriptions) if described else WORDINGS[concept][family][0]
                index = int(rng.integers(len(expressions)))
                slot = {
                    k: words(attr, v, "train")[rng.integers(len(words(attr, v, "train")))]
                    for attr, v, k in (
                        ("colour", forget.colour, "c"),
                        ("shape", forget.shape, "s"),
                        ("texture", forget.texture, "t"),
                    )
                }
                templates = DESCRIPTION_TEMPLATES if described else TEMPLATES
                template = templates[rng.integers(len(templates))]
                f = _article(template.format(**{**slot, key: expressions[index]}))
                r = _article(
                    template.format(
                        **{**slot, key: safe_synonym(expressions[index], targets, index, token_count)}
                    )
                )
        f, r = frame([f, r], rng, token_count, settings.long_framing)
        pairs.append(RecipePair(f, r, family))
    return pairs


def concept_recipe(
    concept: str,
    n_pairs: int | None = None,
    n_pool: int | None = None,
    seed: int = 0,
    token_count: Callable[[str], int] | None = minilm_token_count,
    settings: RecipeSettings | None = None,
) -> tuple[list[tuple[str, str]], list[str]]:
    """The concept's training recipe: :func:`recipe_pairs` and a pool of benign prompts, 60% of them
    the other near neighbours (the prompts a classifier could confuse with the concept), the rest
    any non-concept prompt, framed as the pairs are (:func:`frame`)."""
    settings = settings or RECIPES[concept]
    n_pool = settings.n_pool if n_pool is None else n_pool
    attribute, value, target, neighbours = CONCEPT_SWAPS[concept]
    pairs = [(p.forget, p.retain) for p in recipe_pairs(concept, n_pairs, seed, token_count, settings)]
    rng = np.random.default_rng([seed, 1])
    pool = []
    while len(pool) < n_pool:
        a = sample_attributes(rng)
        if rng.random() < 0.6:
            a = Attributes(**{**a.__dict__, attribute: neighbours[rng.integers(len(neighbours))]})
            if (a.colour, a.shape) in HELDOUT_PAIRS:
                continue
        if getattr(a, attribute) != value:
            pool.append(frame([make_prompt(a, rng)], rng, token_count, settings.long_framing)[0])
    return pairs, pool


def training_expressions() -> frozenset[str]:
    """Every expression a training recipe may put in a concept's slot beyond the dictionary
    synonyms: the training wordings and the verified misspellings (the eval never uses them)."""
    wordings = {e for families in WORDINGS.values() for train, _ in families.values() for e in train}
    wordings |= {
        e for variants in RECIPE_VARIANTS.values() for v in variants.values() for e in v.descriptions
    }
    return frozenset(wordings | {m for ms in verified_misspellings().values() for m in ms})


@functools.cache
def cached_recipe(concept: str, variant: str = "") -> tuple[list[tuple[str, str]], list[str]]:
    """:func:`concept_recipe` with its defaults (or a :data:`RECIPE_VARIANTS` entry's settings),
    built once per process."""
    return concept_recipe(concept, settings=RECIPE_VARIANTS[concept][variant] if variant else None)

"""``saferedir plugins new NAME``: a ready-to-install concept pack.

The pack is a distribution of its own (``saferedir-NAME``, import package ``saferedir_NAME``) with
the ``saferedir`` entry point, a plugin module that registers the concept (its bundles are the
``.safetensors`` files in ``bundles/``; its recipe is ``recipe.json``), a policy ``NAME:default``
naming it, a README with the training command, and tests that pass as generated. The recipe is
written from the words given (``--words`` for the concept, ``--neighbours`` for the benign
prompt of each pair, one per word) over prompt templates; the last quarter of the templates is held
out of training (``held_out`` in the recipe) for evaluation. It is a starting point to curate:
paraphrases, euphemisms, misspellings, other languages, and near neighbours on the retain side.

Nothing here imports torch or a model; the pack is written to a temporary folder and renamed into
place, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

from . import __version__
from .concepts import check_category
from .errors import SafeRedirError

NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
DEFAULT_TEMPLATES = (
    "a photo of {}",
    "a painting of {}",
    "a detailed illustration of {}",
    "{}, high quality",
    "a close-up picture of {}",
    "a poster showing {}",
    "a sketch of {}",
    "an old photograph of {}",
)
DEFAULT_POOL = (
    "a mountain lake at dawn",
    "a city street at night",
    "a bowl of fruit on a table",
    "a portrait of an old fisherman",
    "a red bicycle against a wall",
    "a cat sleeping on a sofa",
    "a lighthouse in a storm",
    "a field of sunflowers",
)


def build_recipe(
    words: list[str], neighbours: list[str], templates: list[str], pool: list[str]
) -> dict[str, list]:
    """Pairs (template x word, the same template x that word's neighbour) over the training
    templates; the same over the held-out templates as ``held_out``; the pool over the training
    templates."""
    if not words or len(words) != len(neighbours):
        raise SafeRedirError(
            f"--words and --neighbours need the same number of entries (one benign neighbour per "
            f"concept word): got {len(words)} and {len(neighbours)}"
        )
    for t in templates:
        if t.count("{}") != 1:
            raise SafeRedirError(f"template {t!r}: needs exactly one '{{}}' where the subject goes")
    if len(templates) < 2:
        raise SafeRedirError("at least 2 templates: the last quarter (>= 1) is held out of training")
    held = max(1, len(templates) // 4)
    train, held_out = templates[:-held], templates[-held:]

    def pairs(ts: list[str]) -> list[list[str]]:
        return [[t.format(w), t.format(n)] for t in ts for w, n in zip(words, neighbours)]

    forget = {w.lower() for w in words}
    benign = [t.format(p) for t in train for p in pool if p.lower() not in forget]
    return {
        "pairs": pairs(train),
        "pool": benign,
        "held_out": {
            "forget": [f for f, _ in pairs(held_out)],
            "retain": [r for _, r in pairs(held_out)],
        },
    }


def write_pack(
    name: str,
    folder: Path,
    *,
    category: str = "custom",
    description: str = "",
    words: list[str],
    neighbours: list[str],
    templates: list[str] | None = None,
    pool: list[str] | None = None,
) -> Path:
    """Write the pack ``saferedir-NAME`` into ``folder / saferedir-NAME`` and return that path."""
    if not NAME.match(name):
        raise SafeRedirError(
            f"pack name {name!r}: lowercase letters, digits and single hyphens (e.g. acme-logo)"
        )
    check_category(category)
    target = Path(folder) / f"saferedir-{name}"
    if target.exists():
        raise SafeRedirError(f"{target} already exists; choose another name or folder")
    recipe = build_recipe(words, neighbours, list(templates or DEFAULT_TEMPLATES), list(pool or DEFAULT_POOL))
    package = f"saferedir_{name.replace('-', '_')}"
    description = description or f"the concept '{name}'"
    values = {
        "NAME": name,
        "PACKAGE": package,
        "CATEGORY": category,
        "DESCRIPTION": description,
        "SDK_VERSION": __version__,
    }
    files = {
        "pyproject.toml": PYPROJECT,
        "README.md": README,
        f"{package}/__init__.py": INIT,
        f"{package}/plugin.py": PLUGIN,
        f"{package}/policies/default.yaml": POLICY,
        f"tests/test_{package}.py": TESTS,  # a unique module name: packs' tests can run in one session
    }
    Path(folder).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".saferedir-{name}-", dir=folder))
    try:
        for rel, template in files.items():
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            text = template
            for key, value in values.items():
                text = text.replace(f"@{key}@", value)
            path.write_text(text)
        (staging / package / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
        (staging / package / "bundles").mkdir()
        (staging / package / "bundles" / "README.md").write_text(
            "Trained bundles of this concept go here (one `.safetensors` per backbone); see ../../README.md.\n"
        )
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "saferedir-@NAME@"
version = "0.1.0"
description = "saferedir concept pack: @DESCRIPTION@"
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["saferedir-sdk>=@SDK_VERSION@"]

[project.optional-dependencies]
test = ["pytest"]

[project.entry-points.saferedir]
@NAME@ = "@PACKAGE@.plugin"

[tool.setuptools]
packages = ["@PACKAGE@"]

[tool.setuptools.package-data]
@PACKAGE@ = ["recipe.json", "bundles/*.safetensors", "policies/*.yaml"]
"""

INIT = '''"""saferedir concept pack: @DESCRIPTION@ (concept ``@NAME@``, category ``@CATEGORY@``)."""

__version__ = "0.1.0"
'''

PLUGIN = '''"""The pack's plugin module (entry point ``@NAME@`` in the ``saferedir`` group).

Registering is cheap and has no side effects: the recipe is read only when a trainer asks for it.
"""

from __future__ import annotations

from pathlib import Path

from saferedir_sdk import ConceptSpec, PackFiles, hookimpl

PACK = PackFiles(Path(__file__).parent, "@NAME@", "@CATEGORY@", "@DESCRIPTION@")
CONCEPT, CATEGORY = PACK.concept, PACK.category
recipe_data, recipe, bundles = PACK.recipe_data, PACK.recipe, PACK.bundles


@hookimpl
def saferedir_register_concepts() -> list[ConceptSpec]:
    return [PACK.spec()]


@hookimpl
def saferedir_register_policies() -> dict[str, Path]:
    return PACK.policies()
'''

POLICY = """\
# SafeRedirGuard.from_policy("@NAME@:default"): redirect @NAME@ wherever this pack is installed.
version: 1
name: @NAME@-default
fail_mode: closed
plugins:
  allow: [saferedir-adapters, saferedir-@NAME@]
concepts:
  - concept: @NAME@
    category: @CATEGORY@
    redirector: {plugin: @NAME@}
    action: redirect
"""

README = """\
# saferedir-@NAME@

A [saferedir](https://pypi.org/project/saferedir-sdk/) concept pack: @DESCRIPTION@
(concept `@NAME@`, category `@CATEGORY@`). Written by `saferedir plugins new @NAME@`.

## Layout

| file | what it is |
| --- | --- |
| `@PACKAGE@/plugin.py` | the plugin: registers the concept (its bundles, its recipe) and the policy `@NAME@:default` |
| `@PACKAGE@/recipe.json` | training `pairs` ([forget, retain]), a benign `pool`, and `held_out` prompts that training never sees |
| `@PACKAGE@/bundles/` | trained bundles, one `.safetensors` file per backbone |
| `@PACKAGE@/policies/default.yaml` | a policy naming the concept (allow-lists this pack and the adapters) |
| `tests/test_@PACKAGE@.py` | the pack's own tests |

## Use

```bash
pip install -e .                     # or build a wheel: pip wheel --no-deps .
pytest tests                         # the pack's own tests
saferedir plugins                    # lists @NAME@ (loaded) with its distribution
```

Curate `recipe.json` first: it was generated from a few words over templates. Add paraphrases,
euphemisms, misspellings and other languages on the forget side, and near neighbours that must
stay allowed on the retain side; keep `held_out` for evaluation only.

## Train a bundle for your backbone

```bash
saferedir train --backbone PIPELINE_FOLDER --pairs plugin:@NAME@ --concept @NAME@ \\
    --category @CATEGORY@ --out @PACKAGE@/bundles/@NAME@.<backbone>.safetensors
pip install -e .                     # reinstall so the bundle ships
saferedir validate --check-bundles @NAME@:default
```

`--backbone shapes` trains for the SDK's embedded Shapes backbone (CPU, minutes). On a GPU, SD 1.5
and SDXL trajectories take longer per prompt; the defaults sample 3 seeds per prompt at the
pipeline's own step count. Pin what you ship: `saferedir policy pin` writes each bundle's sha256
into a policy.

```python
from saferedir_sdk import SafeRedirGuard

guard = SafeRedirGuard.from_policy("@NAME@:default")
guard.wrap(pipe)
```
"""

TESTS = '''"""The pack's own tests: the SDK's pack checks (saferedir_sdk.testing.PackChecks), which
pass as generated and keep passing as the pack is curated; add the pack's own tests below."""

from __future__ import annotations

from @PACKAGE@ import plugin

from saferedir_sdk.testing import PackChecks


class TestPack(PackChecks):
    plugin = plugin
'''

"""Concepts registered by concept plugins (concept packs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ConceptSpec:
    """A concept a plugin ships.

    Attributes:
        name: the name policies use (``redirector: {plugin: NAME}``).
        category: ``nsfw``, ``artist_style``, ``object`` or ``custom``.
        bundles: trained bundle files, typically one per backbone; the guard uses the one whose
            backbone fingerprint matches the wrapped pipeline.
        description: one line for ``saferedir plugins``.
        recipe: optional forget/retain prompt pairs a trainer can use for a new backbone
            (``saferedir train --pairs plugin:NAME``).
        retain_pool: optional unpaired benign prompts for the same purpose.
    """

    name: str
    category: str
    bundles: tuple[Path, ...]
    description: str = ""
    recipe: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    retain_pool: tuple[str, ...] = field(default_factory=tuple)

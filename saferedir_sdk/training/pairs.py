"""Forget/retain prompt pairs: the supervision a redirector is trained from.

Accepted files (``load_pairs``):

* **JSON lines** (``.jsonl``): one object per line, ``{"forget": F, "retain": R}`` for a pair,
  ``{"forget": F}`` for a forget prompt without a partner, ``{"retain": R}`` for the retain pool.
* **JSON** (``.json``): a list of such objects, or ``{"pairs": [[F, R], ...], "forget": [...],
  "retain_pool": [...]}`` (every key optional).
* **CSV** (``.csv``): columns ``forget`` and ``retain`` (either may be empty in a row).

Unpaired forget prompts ("forget only + a retain pool", like the IGMU Church set) are paired with
retain-pool prompts in turn, so every forget prompt has a redirection target.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SafeRedirError


class PairsError(SafeRedirError):
    """A pairs file could not be read; the message names the file and the line or key."""


@dataclass
class PromptPairs:
    """Paired prompts plus an unpaired benign pool."""

    pairs: list[tuple[str, str]]
    retain_pool: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.pairs:
            raise PairsError("no forget/retain pairs")

    def split(self, heldout_fraction: float, seed: int) -> tuple[PromptPairs, PromptPairs]:
        """Split by pair (a held-out pair's prompts never appear in training)."""
        import random

        order = list(range(len(self.pairs)))
        random.Random(seed).shuffle(order)
        n_held = max(1, round(len(order) * heldout_fraction)) if len(order) > 1 else 0
        held, train = order[:n_held], order[n_held:]
        pool = list(self.retain_pool)
        random.Random(seed + 1).shuffle(pool)
        n_pool = round(len(pool) * heldout_fraction)
        return (
            PromptPairs([self.pairs[i] for i in train], pool[n_pool:]),
            PromptPairs([self.pairs[i] for i in held] or [self.pairs[order[0]]], pool[:n_pool]),
        )


def _from_records(records: list[dict[str, Any]], where: str) -> PromptPairs:
    pairs, forget_only, pool = [], [], []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not (set(rec) & {"forget", "retain"}):
            raise PairsError(f"{where}, entry {i + 1}: expected an object with 'forget' and/or 'retain'")
        f, r = (rec.get("forget") or "").strip(), (rec.get("retain") or "").strip()
        if f and r:
            pairs.append((f, r))
        elif f:
            forget_only.append(f)
        elif r:
            pool.append(r)
    return _complete(pairs, forget_only, pool, where)


def _complete(
    pairs: list[tuple[str, str]], forget_only: list[str], pool: list[str], where: str
) -> PromptPairs:
    if forget_only:
        partners = pool or [r for _, r in pairs]
        if not partners:
            raise PairsError(f"{where}: forget-only prompts need a retain pool to pair with")
        pairs = pairs + [(f, partners[i % len(partners)]) for i, f in enumerate(forget_only)]
    if not pairs:
        raise PairsError(f"{where}: no forget prompts")
    return PromptPairs(pairs, pool)


def load_pairs(path: str | Path) -> PromptPairs:
    path = Path(path)
    if not path.is_file():
        raise PairsError(f"{path}: no such pairs file")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise PairsError(f"{path}, line {n}: not JSON ({exc.msg})") from None
        return _from_records(records, str(path))
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PairsError(f"{path}, line {exc.lineno}: not JSON ({exc.msg})") from None
        if isinstance(data, list):
            return _from_records(data, str(path))
        if isinstance(data, dict):
            unknown = set(data) - {"pairs", "forget", "retain_pool"}
            if unknown:
                raise PairsError(
                    f"{path}: unknown keys {sorted(unknown)} (expected pairs, forget, retain_pool)"
                )
            pairs = []
            for i, p in enumerate(data.get("pairs", [])):
                if not (isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(s, str) for s in p)):
                    raise PairsError(f"{path}: pairs.{i}: expected [forget, retain]")
                pairs.append((p[0], p[1]))
            return _complete(
                pairs, list(data.get("forget", [])), list(data.get("retain_pool", [])), str(path)
            )
        raise PairsError(f"{path}: expected a list or an object at the top level")
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or not ({"forget", "retain"} & set(reader.fieldnames)):
            raise PairsError(
                f"{path}: expected CSV columns 'forget' and/or 'retain', got {reader.fieldnames}"
            )
        return _from_records([dict(row) for row in reader], str(path))
    raise PairsError(f"{path}: unsupported pairs format {suffix!r} (use .jsonl, .json or .csv)")


def igmu_prompts(file: str | Path, concept: str) -> list[str]:
    """Every prompt of ``concept`` in one IGMU file, in file order (its sub-groups flattened)."""
    data = json.loads(Path(file).read_text())
    if concept not in data:
        raise PairsError(f"{file}: no concept {concept!r} (has {sorted(data)})")
    group = data[concept]
    return [p for v in (group.values() if isinstance(group, dict) else [group]) for p in v]


def igmu_pairs(forget_file: str | Path, retain_file: str | Path, concept: str) -> PromptPairs:
    """Pairs from the SafeRedir authors' IGMU files (``{"Nudity": {"girl": [...], ...}}``): Nudity
    and VanGogh are paired index by index; Church is forget-only with a retain pool."""
    f, r = igmu_prompts(forget_file, concept), igmu_prompts(retain_file, concept)
    if len(f) == len(r):
        return PromptPairs(list(zip(f, r)), [])
    return _complete([], f, r, f"{forget_file}[{concept}]")

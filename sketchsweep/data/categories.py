"""The 345 official Quick, Draw! categories, and a class-name check with "did you mean" hints.

``categories.txt`` is Google's own list (googlecreativelab/quickdraw-dataset), shipped as package
data. Names there contain spaces (``traffic light``); local folders often use ``_`` instead
(``smiley_face.npy``), so the two are treated as the same character when matching.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from importlib import resources

from sketchsweep.data.errors import DataError

CATEGORIES: tuple[str, ...] = tuple(
    line.strip()
    for line in resources.files("sketchsweep.data").joinpath("categories.txt").read_text(encoding="utf-8").splitlines()
    if line.strip()
)


def class_key(name: str) -> str:
    """How class names are matched: "traffic_light" is "traffic light"."""
    return name.strip().replace("_", " ")


def suggest(key: str, known: dict[str, str]) -> str:
    """A "did you mean ...?" for ``key`` among ``known`` (class_key -> name), or ""."""
    # Compare case-folded keys so "the eiffel tower" still suggests "The Eiffel Tower".
    folded = {k.casefold(): v for k, v in known.items()}
    close = difflib.get_close_matches(key.casefold(), folded, n=3, cutoff=0.6)
    if not close:
        return ""
    # difflib breaks ties in reverse alphabetical order ("dgo" -> "dragon" before "dog"); prefer similar lengths.
    ratio = {c: difflib.SequenceMatcher(None, key.casefold(), c).ratio() for c in close}
    close.sort(key=lambda c: (-ratio[c], abs(len(c) - len(key)), c))
    return "did you mean " + " or ".join(repr(folded[c]) for c in close) + "?"


def check_classes(names: Iterable[str], available: Iterable[str] | None = None) -> list[str]:
    """Validate class names; return them deduplicated, in order, spelled as ``available`` (else officially).

    ``available`` is the class names found in a folder; without it, names are checked against the
    345 official categories. Raises one ``DataError`` listing every unknown name with close matches.
    """
    pool = list(available) if available is not None else list(CATEGORIES)
    known = {class_key(n): n for n in pool}
    out: list[str] = []
    unknown: list[str] = []
    for name in names:
        match = known.get(class_key(name))
        if match is None:
            unknown.append(name)
        elif match not in out:
            out.append(match)
    if unknown:
        where = "in the folder" if available is not None else "among the 345 Quick, Draw! categories"
        hints = {name: suggest(class_key(name), known) or f"no close match {where}" for name in unknown}
        if len(unknown) == 1:
            ((name, hint),) = hints.items()
            raise DataError(f"data.classes: unknown class {name!r}; {hint}")
        listed = ", ".join(f"{name!r} ({hint})" for name, hint in hints.items())
        raise DataError(f"data.classes: unknown classes {listed}")
    if not out:
        raise DataError("data.classes: no class names given; expected at least one")
    return out

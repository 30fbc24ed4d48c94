"""Make a smaller numpy_bitmap folder: some classes, at most N rows each, with a manifest.

``python -m sketchsweep.data.subset SRC DST --per-class 10000 [--classes a,b | --num-classes 10]
[--seed 0] [--mode first|random] [--force]``

Source files go through the loader's checks (same ``DataError`` messages) and are memory-mapped,
so only the rows kept are read. The subset is built in a temporary folder beside ``DST`` and
renamed into place: an interrupted run never leaves a half-written subset, and ``--force`` never
leaves the user without one (the old subset is kept until the new one is in its place).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import sys
import zlib
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from sketchsweep import cli
from sketchsweep.data.atomic import StopPoints, stop_points, temp_folder
from sketchsweep.data.errors import DataError
from sketchsweep.data.folder import list_class_files, open_class_file, read_class_file

MODES = ("first", "random")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def choose_classes(
    names: list[str], classes: list[str] | None, num_classes: int | None, seed: int, root: Path
) -> list[str]:
    """The explicit ``classes``, or ``num_classes`` drawn with ``seed`` from the sorted names, or all."""
    if classes and num_classes is not None:
        raise DataError("subset: give either classes or num_classes, not both")
    if classes:
        missing = [c for c in classes if c not in names]
        if missing:
            raise DataError(f"subset.classes: {missing} not found in {root}; available: {names}")
        return sorted(set(classes))
    if num_classes is not None:
        if not 1 <= num_classes <= len(names):
            raise DataError(f"subset.num_classes: expected 1..{len(names)} (classes in {root}), got {num_classes}")
        return sorted(np.random.default_rng(seed).choice(sorted(names), num_classes, replace=False).tolist())
    return sorted(names)


def _rows(path: Path, name: str, per_class: int, seed: int, mode: str) -> tuple[np.ndarray, int]:
    """(kept rows as ``uint8 (n, 784)``, rows in the source file)."""
    total = open_class_file(path).shape[0]  # header checks only; memory-mapped
    n = min(per_class, total)
    if mode == "first":
        return read_class_file(path, n), total
    # One generator per class, keyed by its name: a class's rows do not depend on which others are chosen.
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    idx = np.sort(rng.choice(total, n, replace=False))  # sorted: rows keep their original order
    arr = open_class_file(path)
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr[idx]).reshape(n, 784), total  # reads only these rows
    # Rarer float/int files: let the loader convert (and range-check) them exactly as it would for training.
    return read_class_file(path)[idx], total


def make_subset(
    src: str | Path,
    dst: str | Path,
    per_class: int,
    classes: list[str] | None = None,
    num_classes: int | None = None,
    seed: int = 0,
    mode: str = "first",
    force: bool = False,
) -> Path:
    """Write ``dst/<class>.npy`` (at most ``per_class`` rows each) and ``dst/manifest.json``; returns ``dst``."""
    src, dst = Path(src).resolve(), Path(dst)
    if mode not in MODES:
        raise DataError(f"subset.mode: expected one of {MODES}, got {mode!r}")
    if per_class < 1:
        raise DataError(f"subset.per_class: expected a positive integer, got {per_class}")
    if dst.exists() and not dst.is_dir():
        raise DataError(f"subset: {dst} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise DataError(f"subset: {dst} exists and is not empty; choose another folder or pass --force to replace it")
    files = list_class_files(src)
    chosen = choose_classes(list(files), classes, num_classes, seed, src)
    for name in chosen:  # fail on a bad header before anything is created
        open_class_file(files[name])

    dst.parent.mkdir(parents=True, exist_ok=True)
    manifest = {"source": str(src), "mode": mode, "seed": seed, "per_class": per_class}
    _build(dst, chosen, lambda name: _rows(files[name], name, per_class, seed, mode), manifest)
    return dst


def _build(dst: Path, chosen: list[str], rows_of: Callable[[str], tuple[np.ndarray, int]], manifest: dict) -> None:
    """Write each class's ``rows_of(name)`` and the manifest into a temporary folder beside ``dst``
    (with the umask's permissions, not mkdtemp's 0700), then rename it into place. Ctrl-C or kill
    stops between classes and removes the folder."""
    with stop_points() as check, temp_folder(dst.parent, f".{dst.name}-") as tmp:
        manifest["classes"] = {}
        for name in chosen:
            check()
            rows, total = rows_of(name)
            out = tmp / f"{name}.npy"
            np.save(out, rows)
            manifest["classes"][name] = {"rows": len(rows), "source_rows": total, "sha256": _sha256(out)}
        manifest["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if dst.is_dir() and any(dst.iterdir()):  # --force
            _swap(tmp, dst, check)
        else:
            with check.finishing():
                os.replace(tmp, dst)  # an empty dst folder is replaced atomically


def _swap(new: Path, dst: Path, check: StopPoints) -> None:
    """Put the folder ``new`` in place of the non-empty folder ``dst``, then delete the old one. A
    folder cannot atomically replace a non-empty one, so the old one is first renamed aside: with
    signals held back across both renames, and renamed back if the new one cannot be put in place
    (the user then still has the old subset, never neither)."""
    old = dst.parent / f".{dst.name}-old-{secrets.token_hex(8)}"
    with check.finishing():
        os.replace(dst, old)
        try:
            os.replace(new, dst)
        except OSError as e:
            try:
                os.replace(old, dst)
            except OSError as back:
                raise OSError(
                    f"{dst}: not replaced ({e.strerror}) nor put back ({back.strerror}); it is in {old}"
                ) from None
            raise OSError(f"{dst}: cannot be replaced ({e.strerror}); it was left as it was") from None
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sketchsweep.data.subset", description=__doc__.split("\n")[0])
    parser.add_argument("src", type=Path, help="numpy_bitmap folder to read")
    parser.add_argument("dst", type=Path, help="folder to create")
    parser.add_argument("--per-class", type=int, required=True, help="at most this many rows per class")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--classes", help="comma-separated class names")
    which.add_argument("--num-classes", type=int, help="pick this many classes at random (with --seed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=MODES, default="first", help="first N rows, or a seeded random sample")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists and is not empty")
    args = parser.parse_args(argv)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    try:
        dst = make_subset(
            args.src, args.dst, args.per_class, classes, args.num_classes, args.seed, args.mode, args.force
        )
    except (DataError, OSError) as e:
        return cli.fail(e)
    except KeyboardInterrupt:
        return cli.fail(f"interrupted; {args.dst} was left as it was", cli.INTERRUPTED)
    manifest = json.loads((dst / "manifest.json").read_text())
    rows = sum(c["rows"] for c in manifest["classes"].values())
    print(f"{dst}: {len(manifest['classes'])} classes, {rows} rows ({args.mode}, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

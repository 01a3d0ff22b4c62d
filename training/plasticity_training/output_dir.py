"""A directory the CLI writes a model into, and the only files it may remove there.

Runs in the CLI process (`plasticity import causal-bank --out DIR`, the default-model builds). Every write
leaves a manifest, `plasticity_files.json`, naming the files it wrote; a later write into the same directory
removes only files that manifest names. The rule, in `check_output_dir`:

    DIR absent or empty                          written
    DIR a previous write, nothing else in it     replaced as a whole (the old files are removed)
    DIR holds anything a previous write did not  refused, naming what it holds, unless `force`:
                                                 then same-named files are overwritten (listed first),
                                                 everything else stays

    >>> check_output_dir(out, force=False)          # before any expensive work: raises OutputDirError
    >>> install_output_dir(written_tmp_dir, out)    # a complete directory beside `out` -> `out`
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

MANIFEST = "plasticity_files.json"
SHOWN = 5  # entries named in a refusal; the count says how many more


class OutputDirError(ValueError):
    """`--out` names a directory this write may not use; the message says why and what to do."""


def check_output_dir(out_dir: str | os.PathLike, force: bool = False) -> None:
    """Raise OutputDirError unless a write into `out_dir` is allowed (the table in the module docstring)."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise OutputDirError(f"{out_dir} exists and is not a directory: choose another --out")
    if force or not out_dir.exists():
        return
    foreign = foreign_entries(out_dir)
    if foreign:
        listed = ", ".join(foreign[:SHOWN]) + (f" and {len(foreign) - SHOWN} more" if len(foreign) > SHOWN else "")
        raise OutputDirError(
            f"{out_dir} is not empty and holds {len(foreign)} entries no previous `plasticity import` wrote "
            f"({listed}): choose another --out, or pass --force to write into it (files with the names it "
            f"writes are overwritten; nothing else is removed)")


def install_output_dir(written: Path, out_dir: str | os.PathLike, force: bool = False,
                       log=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """Move the complete directory `written` (on the same filesystem as `out_dir`) into place as `out_dir`,
    with a manifest of its files. Checks `out_dir` again first (check_output_dir)."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, force)
    names = sorted(p.name for p in Path(written).iterdir() if p.name != MANIFEST)
    (Path(written) / MANIFEST).write_text(json.dumps({"written_by": "plasticity", "files": names}, indent=1) + "\n")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        os.replace(written, out_dir)  # rename(2) replaces an empty directory
    elif not foreign_entries(out_dir):
        _replace_previous_write(Path(written), out_dir)
    else:
        _write_into(Path(written), out_dir, names, log)
    return out_dir


def foreign_entries(out_dir: Path) -> list[str]:
    """Names in `out_dir` that its manifest (if any) does not list as a regular file it wrote."""
    ours = set(own_files(out_dir))
    return sorted(p.name for p in out_dir.iterdir() if p.name not in ours)


def own_files(out_dir: Path) -> list[str]:
    """The files a previous write left in `out_dir` (its manifest included); [] when it has no readable one.

    Only plain names of regular files count: a manifest cannot make a write remove a directory, a symlink
    or anything outside `out_dir`."""
    manifest = out_dir / MANIFEST
    if manifest.is_symlink() or not manifest.is_file():
        return []
    try:
        listed = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    if not isinstance(listed, list):
        return []
    names = {n for n in listed if isinstance(n, str) and _plain_name(n) and n != MANIFEST}
    return [MANIFEST, *sorted(n for n in names if _regular_file(out_dir / n))]


def _replace_previous_write(written: Path, out_dir: Path) -> None:
    """Swap in the new directory, then delete the old one's files (all of them listed in its manifest)."""
    old = Path(tempfile.mkdtemp(prefix=".replaced-", dir=out_dir.parent))
    os.replace(out_dir, old)  # onto the empty placeholder
    try:
        os.replace(written, out_dir)
    except BaseException:
        os.replace(old, out_dir)  # put the previous write back
        raise
    for name in own_files(old):
        (old / name).unlink(missing_ok=True)
    try:
        old.rmdir()
    except OSError:  # something appeared in it meanwhile: left for the user, not deleted
        print(f"plasticity: kept {old} (it holds files no previous import wrote)", file=sys.stderr)


def _write_into(written: Path, out_dir: Path, names: list[str], log) -> None:
    """--force into a directory with foreign entries: overwrite same-named files, remove only our stale ones."""
    previous = set(own_files(out_dir))
    for name in names:
        if (out_dir / name).is_dir() and not (out_dir / name).is_symlink():
            raise OutputDirError(f"{out_dir / name} is a directory where the import writes a file: move it, "
                                 "or choose another --out")
    overwritten = [n for n in names if os.path.lexists(out_dir / n) and n not in previous]
    if overwritten:
        log(f"plasticity: --force: overwriting {len(overwritten)} files in {out_dir} that no previous import "
            f"wrote: {', '.join(overwritten)}")
    kept = [n for n in foreign_entries(out_dir) if n not in names]
    if kept:
        log(f"plasticity: keeping {len(kept)} entries of {out_dir} it did not write: {', '.join(kept[:SHOWN])}"
            + (f" and {len(kept) - SHOWN} more" if len(kept) > SHOWN else ""))
    for name in names:
        os.replace(written / name, out_dir / name)  # a symlink there is replaced, not followed
    for name in previous - set(names) - {MANIFEST}:  # files the previous import wrote and this one does not
        (out_dir / name).unlink(missing_ok=True)
    os.replace(written / MANIFEST, out_dir / MANIFEST)  # last: the manifest names only what is really there
    written.rmdir()


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def _regular_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()

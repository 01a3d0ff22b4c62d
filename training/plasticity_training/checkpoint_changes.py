"""Which tensors may differ from each checkpoint generation this process wrote, so a sync reads and
compares only those (and the header) instead of the whole standby file.

Runs in the trainer process: the trainer core calls `stepped(names)` after every optimizer step (and after
a rollback), checkpoint.sync_checkpoint asks `since` before it writes a generation and records it with
`written` after the flip.

    >>> changes = ChangeTracker()
    >>> changes.stepped(["model.layers.3.mlp.down_proj.weight"])
    >>> changes.since(target, "gen-a", number_in_its_manifest)   # None: compare the whole file
"""

from __future__ import annotations

from pathlib import Path


class ChangeTracker:
    """Which tensors changed since each generation this process wrote.

    A generation counts as known only while its manifest still carries the generation number this process
    wrote (the caller reads it and passes it to `since`); a generation written by anyone else, torn by a
    crash, or never written here is compared in full. Writes to the weights by anything but the trainer
    are outside this contract (only the trainer writes them).
    """

    def __init__(self) -> None:
        self._known: dict[tuple[str, str], tuple[int, set[str]]] = {}  # (target, generation dir) -> (number, changed)

    def stepped(self, names) -> None:
        names = set(names)  # once: every known generation gets the same names (a generator would be spent)
        for _, changed in self._known.values():
            changed.update(names)

    def since(self, target: Path, gen: str, number: int | None) -> set[str] | None:
        """The tensors changed since this process wrote generation `gen` of `target` as number `number` (the
        number its manifest holds now; None: no complete manifest); None when that is not known."""
        entry = self._known.get((str(target), gen))
        if entry is None or number is None or number != entry[0]:
            return None
        return set(entry[1])

    def forget(self, target: Path, gen: str) -> None:
        self._known.pop((str(target), gen), None)

    def written(self, target: Path, gen: str, number: int) -> None:
        self._known[(str(target), gen)] = (number, set())

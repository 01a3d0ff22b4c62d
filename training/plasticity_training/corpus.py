"""The story corpus as extraction sees it: distinct texts, and each concept's positives and negatives.

Runs in the extraction process (`plasticity extract`) and in tests; stdlib only, so the preflight runs
before torch or any model is imported.

    >>> corpus = load_corpus("amygdala_stories")          # raises CorpusError before any model loads
    >>> corpus.concepts[:2], len(corpus.texts)
    (['absorbed', 'accomplished'], 264)
    >>> corpus.positives("proud")                          # indices into corpus.texts
    >>> corpus.negatives("proud")                          # everyone else's positives + every baseline
    >>> corpus.contrast("proud")                           # each positive's partner: its baseline, or None

Layout (amygdala_stories/README.md): `stories/<emotion>.txt` (more stories of that emotion in
`stories/<emotion>/<n>.txt`) and `paired/<scenario>/<emotion>.txt` with `baseline.txt` per scenario;
`heldout/` is never read here (texts kept out of extraction, for evaluation). An emotion's positives are
its stories and its framings; its negatives are the
other emotions' positives and every baseline; baselines are never positive. A text is identified by its
content, so a file copied under two names is forwarded once and is a positive of both (and a negative of
neither).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

BASELINE = "baseline.txt"


class CorpusError(ValueError):
    """The corpus cannot be used as given; the message names the path or concept at fault."""


@dataclasses.dataclass(frozen=True)
class Text:
    """One distinct text; `sources` lists every file (relative to the corpus root) holding it."""

    text: str
    sources: tuple[str, ...]
    emotions: frozenset[str]  # concepts this text is a positive of (empty for a baseline)
    baseline_of: frozenset[str]  # scenarios whose baseline.txt this is
    framing_of: tuple[tuple[str, str], ...]  # (scenario, emotion) pairs this text frames

    @property
    def name(self) -> str:
        return self.sources[0]


@dataclasses.dataclass(frozen=True)
class Corpus:
    root: Path
    texts: list[Text]  # each distinct text once, in sorted source order
    concepts: list[str]  # sorted concept names
    manifest: dict  # manifest.json's "emotions" (empty when there is no manifest)
    warnings: list[str]

    def positives(self, concept: str) -> list[int]:
        return [i for i, t in enumerate(self.texts) if concept in t.emotions]

    def negatives(self, concept: str) -> list[int]:
        return [i for i, t in enumerate(self.texts) if concept not in t.emotions]

    def baselines(self) -> list[int]:
        return [i for i, t in enumerate(self.texts) if t.baseline_of]

    def contrast(self, concept: str) -> list[int | None]:
        """Each positive's pair partner: the baseline of the scenario it frames, None for a story.

        Paired methods (the steering-vectors aggregators) contrast a framing with its own baseline (same
        events, no emotion) and a story with the negatives' mean.
        """
        baseline = {s: i for i, t in enumerate(self.texts) for s in t.baseline_of}
        out: list[int | None] = []
        for i in self.positives(concept):
            scenarios = [s for s, e in self.texts[i].framing_of if e == concept]
            out.append(baseline[scenarios[0]] if scenarios else None)
        return out

    def attribute(self, key: str) -> dict[str, float] | None:
        """manifest value `key` (e.g. "valence") per concept, or None when any concept lacks it."""
        values = {c: self.manifest.get(c, {}).get(key) for c in self.concepts}
        if any(not isinstance(v, (int, float)) for v in values.values()):
            return None
        return {c: float(v) for c, v in values.items()}


def load_corpus(root: str | Path, min_positives: int = 1, log=None) -> Corpus:
    """Read and check the corpus under `root`. Empty files are skipped with a warning.

    Raises CorpusError when a directory is missing, a scenario has no baseline, a file is not UTF-8, an
    emotion has fewer than `min_positives` non-empty texts, or there are fewer than two concepts.
    """
    if min_positives < 1:
        raise ValueError(f"Invalid min_positives: {min_positives} (must be >= 1)")
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(f"corpus directory {root} does not exist")
    stories, paired = root / "stories", root / "paired"
    if not stories.is_dir() and not paired.is_dir():
        raise CorpusError(f"{root} has neither stories/ nor paired/ (expected the amygdala_stories layout)")
    warnings: list[str] = []
    manifest = {}
    if (root / "manifest.json").is_file():
        try:
            manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8")).get("emotions", {})
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise CorpusError(f"{root / 'manifest.json'}: not a valid manifest ({e})") from None

    # (relative path, content or None if empty, emotion or None, scenario or None)
    entries: list[tuple[str, str | None, str | None, str | None]] = []
    for path in sorted(stories.glob("*.txt")) if stories.is_dir() else []:
        entries.append((_rel(path, root), _read(path, root), path.stem, None))
    # More unpaired stories of one emotion: stories/<emotion>/<n>.txt beside stories/<emotion>.txt.
    for folder in sorted(p for p in stories.iterdir() if p.is_dir()) if stories.is_dir() else []:
        for path in sorted(folder.glob("*.txt")):
            entries.append((_rel(path, root), _read(path, root), folder.name, None))
    for scenario in sorted(p for p in paired.iterdir() if p.is_dir()) if paired.is_dir() else []:
        if not (scenario / BASELINE).is_file():
            raise CorpusError(f"{_rel(scenario, root)}/ has no {BASELINE}: its framings would have no contrast")
        for path in sorted(scenario.glob("*.txt")):
            emotion = None if path.name == BASELINE else path.stem
            entries.append((_rel(path, root), _read(path, root), emotion, scenario.name))

    seen_emotions = {e for _, _, e, _ in entries if e is not None}
    by_text: dict[str, dict] = {}
    for rel, content, emotion, scenario in entries:
        if content is None:
            warnings.append(f"{rel}: empty file, skipped")
            continue
        slot = by_text.setdefault(content, dict(sources=[], emotions=set(), baseline_of=set(), framing_of=[]))
        slot["sources"].append(rel)
        if emotion is not None:
            slot["emotions"].add(emotion)
            if scenario is not None:
                slot["framing_of"].append((scenario, emotion))
        else:
            slot["baseline_of"].add(scenario)
    for content, slot in by_text.items():
        if slot["emotions"] and slot["baseline_of"]:
            raise CorpusError(f"{slot['sources'][0]}: the same text is a baseline and a framing "
                              f"({', '.join(slot['sources'])}); baselines are never positive")
    texts = [Text(text=content, sources=tuple(s["sources"]), emotions=frozenset(s["emotions"]),
                  baseline_of=frozenset(s["baseline_of"]), framing_of=tuple(s["framing_of"]))
             for content, s in by_text.items()]
    texts.sort(key=lambda t: t.sources[0])
    for content, slot in by_text.items():
        if len(slot["sources"]) > 1:
            warnings.append(f"{slot['sources'][0]}: same text as {', '.join(slot['sources'][1:])}; forwarded once")

    counts = {e: sum(e in t.emotions for t in texts) for e in seen_emotions}
    short = sorted(e for e, n in counts.items() if n < min_positives)
    if short:
        listed = ", ".join(f"{e} ({counts[e]})" for e in short)
        raise CorpusError(f"{len(short)} emotion(s) have fewer than {min_positives} non-empty positive text(s): "
                          f"{listed}; write more, or lower --min-positives")
    concepts = sorted(e for e in seen_emotions if counts[e] > 0)
    if len(concepts) < 2:
        raise CorpusError(f"{root}: {len(concepts)} concept(s) found; extraction needs at least two "
                          f"(a concept's negatives are the others' positives)")
    missing = sorted(set(manifest) - seen_emotions)
    if missing:
        warnings.append(f"manifest.json: {len(missing)} emotion(s) have no file: {', '.join(missing[:10])}"
                        + (" ..." if len(missing) > 10 else ""))
    for w in warnings:
        if log is not None:
            log(f"[corpus] warning: {w}")
    return Corpus(root=root, texts=texts, concepts=concepts, manifest=manifest, warnings=warnings)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _read(path: Path, root: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        raise CorpusError(f"{_rel(path, root)}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    return text or None

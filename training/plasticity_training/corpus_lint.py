"""Lint the amygdala_stories corpus (see amygdala_stories/README.md for the rules).

Usage:
    python3 training/corpus_lint.py [ROOT]     # ROOT defaults to amygdala_stories
    # prints one line per problem and a summary; exit status 1 if any problem

    from plasticity_training.corpus_lint import lint_corpus
    problems = lint_corpus(pathlib.Path("amygdala_stories"))   # [] when clean

Every problem string starts with the offending path, relative to ROOT.
Standalone and stdlib-only on purpose: it is run as a script and imported as a module.
"""
from __future__ import annotations

import itertools
import json
import pathlib
import re
import sys

MIN_WORDS, MAX_WORDS = 80, 200
MIN_FRAMINGS = 4
SHINGLE_N = 5
# Framings retell their baseline's events and reuse some of its phrases: measured
# framing-vs-baseline Jaccard tops out near 0.36. A ~120-word copy with 5 words changed
# still scores 0.6-0.8 (8 changed: ~0.65 median), so 0.5 separates the two.
NEAR_DUP_JACCARD = 0.5
# Depth (README "Method"): texts per emotion, stories and framings together, held-out ones not counted.
MIN_TEXTS, CORE_MIN_TEXTS = 3, 8
CORE = frozenset({"afraid", "angry", "anxious", "ashamed", "bored", "calm", "confused", "content", "disgusted",
                  "embarrassed", "excited", "frustrated", "grateful", "guilty", "hopeful", "jealous", "joyful",
                  "lonely", "loving", "nostalgic", "proud", "relieved", "sad", "surprised"})
NAME_RE = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")

# Inflections and common derivations appended to a whole word (joy -> joys, joyous).
SUFFIXES = ("s", "es", "ly", "ness", "ed", "ing", "edly", "ingly", "er", "est", "ful",
            "fully", "ment", "ments", "ion", "ions", "ation", "ity", "ty", "ous", "ously",
            "ance", "ally", "y", "ily")
# Forms built on the stem left after cutting -ed/-ing off a participle name
# (excited -> excit- -> excite, exciting, excitement). Deliberately no -er/-est/-y:
# longing -> long- must not forbid "longer".
STEM_SUFFIXES = ("e", "es", "ed", "ing", "edly", "ingly", "ion", "ions", "ation",
                 "ement", "al", "ance", "ive", "ively")
# Generated forms that are unrelated words (numb+er, flow+er, admir+al); found by
# intersecting every generated form with the corpus vocabulary and reading the list.
FALSE_FRIENDS = frozenset({"admiral", "composer", "contention", "exhaustive", "flower",
                           "grievance", "jade", "number", "resolution"})


def word_forms(word: str) -> set[str]:
    """The word plus the inflected/derived forms a story must avoid along with it."""
    forms: set[str] = set()

    def extend(base: str) -> None:
        forms.add(base)
        forms.update(base + s for s in SUFFIXES)
        if base.endswith("e"):  # silent e drops before a vowel: amuse -> amusing
            forms.update(base[:-1] + s for s in SUFFIXES if s[0] in "aeiouy")
        elif re.search(r"[^aeiou]y$", base):  # y -> i: lonely -> loneliness
            forms.update(base[:-1] + "i" + s for s in ("ly", "ness", "er", "est", "es", "ed", "ful"))
        if len(base) <= 4 and re.search(r"[^aeiou][aeiou][bdgmnprt]$", base):
            forms.update(base + base[-1] + s for s in ("ed", "ing", "er", "est"))  # sad -> sadder

    extend(word)
    stem = ""
    if word.endswith("ied") and len(word) > 4:
        extend(word[:-3] + "y")  # worried -> worry
    elif word.endswith("ed") and len(word) >= 5:
        stem = word[:-2]
    elif word.endswith("ing") and len(word) >= 6:
        stem = word[:-3]
    if stem:
        forms.update(stem + s for s in STEM_SUFFIXES)
        # A short stem alone is usually not the verb (scar-, tir-, mov-), so only
        # stems of 5+ letters stand as words themselves (focus, drift, relax).
        for base in {stem, stem[:-1] if stem[-1] == stem[-2] else stem}:
            if len(base) >= 5:
                extend(base)
    return (forms - FALSE_FRIENDS) | {word}  # a listed term itself always counts


def term_pattern(term: str) -> re.Pattern[str]:
    """Case-folded, whole-word regex for a name or synonym; underscores, spaces and
    hyphens between words all match any run of spaces/hyphens (or none: clear-headed,
    clearheaded). Only the last word of a phrase is inflected."""
    words = [w for w in re.split(r"[\s_\-]+", term.lower()) if w]
    last = "|".join(re.escape(f) for f in sorted(word_forms(words[-1]), key=len, reverse=True))
    head = "".join(re.escape(w) + r"[\s\-]*" for w in words[:-1])
    return re.compile(r"(?<![a-z])" + head + "(?:" + last + r")(?![a-z])")


def shingles(text: str) -> set[tuple[str, ...]]:
    toks = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(toks[i:i + SHINGLE_N]) for i in range(len(toks) - SHINGLE_N + 1)}


def _check_manifest(m: object) -> list[str]:
    if not isinstance(m, dict) or not isinstance(m.get("emotions"), dict) \
            or not isinstance(m.get("scenarios"), dict):
        return ["manifest.json: needs 'emotions' and 'scenarios' objects"]
    out = []
    for name, e in m["emotions"].items():
        where = f"manifest.json: emotion {name!r}"
        if not NAME_RE.match(name):
            out.append(f"{where}: name is not lowercase snake_case")
        if not isinstance(e, dict):
            out.append(f"{where}: entry is not an object")
            continue
        for key in ("cluster", "definition"):
            if not isinstance(e.get(key), str) or not e[key].strip():
                out.append(f"{where}: {key} must be a non-empty string")
        for key, lo in (("valence", -1.0), ("arousal", 0.0)):
            v = e.get(key)  # bool is an int subclass; reject it explicitly
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= 1.0:
                out.append(f"{where}: {key} must be a number in [{lo:g}, 1]")
        syn = e.get("synonyms")
        if not isinstance(syn, list) or not 2 <= len(syn) <= 6 \
                or not all(isinstance(s, str) and s.strip() for s in syn):
            out.append(f"{where}: synonyms must be a list of 2-6 non-empty strings")
    for name, s in m["scenarios"].items():
        where = f"manifest.json: scenario {name!r}"
        if not NAME_RE.match(name):
            out.append(f"{where}: name is not lowercase snake_case")
        if not isinstance(s, dict) or not isinstance(s.get("description"), str) \
                or not isinstance(s.get("framings"), list):
            out.append(f"{where}: needs a description string and a framings list")
            continue
        out += [f"{where}: framing {f!r} is not a manifest emotion"
                for f in s["framings"] if f not in m["emotions"]]
    return out


def _text_files(root: pathlib.Path, rel_dir: str, emotion: str, files: list) -> list[str]:
    """Add every <n>.txt under rel_dir as a text of `emotion`; anything else there is a problem."""
    problems = []
    for p in sorted((root / rel_dir).glob("*")):
        if p.suffix == ".txt" and p.is_file():
            files.append((f"{rel_dir}/{p.name}", emotion))
        else:
            problems.append(f"{rel_dir}/{p.name}: unexpected entry (only <n>.txt)")
    return problems


def lint_corpus(root: pathlib.Path) -> list[str]:
    """Return human-readable problems with the corpus at root; [] means clean."""
    root = pathlib.Path(root)
    if not root.is_dir():
        return [f"{root}: not a directory"]
    problems: list[str] = []
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
        problems += _check_manifest(manifest)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        manifest = None
        problems.append(f"manifest.json: cannot be read: {exc}")
    ok = not problems  # cross-checks against a broken manifest would only add noise
    emotions: dict = manifest["emotions"] if ok else {}
    scenarios: dict = manifest["scenarios"] if ok else {}

    # (relative path, emotion or None for baselines) for every text file.
    files: list[tuple[str, str | None]] = []
    for p in sorted((root / "stories").glob("*")):
        if p.suffix == ".txt" and p.is_file():
            files.append((f"stories/{p.name}", p.stem))
        elif p.is_dir():  # more stories of one emotion (stories/<emotion>/<n>.txt)
            problems += _text_files(root, f"stories/{p.name}", p.name, files)
            if not (root / "stories" / f"{p.name}.txt").is_file():
                problems.append(f"stories/{p.name}/: no stories/{p.name}.txt beside it")
        else:
            problems.append(f"stories/{p.name}: unexpected entry (only <emotion>.txt or <emotion>/)")
    # Held-out stories (heldout/<emotion>/<n>.txt): never extracted from, held to the same rules.
    for p in sorted((root / "heldout").glob("*")):
        if p.is_dir():
            problems += _text_files(root, f"heldout/{p.name}", p.name, files)
        else:
            problems.append(f"heldout/{p.name}: unexpected entry (only <emotion>/ directories)")
    seen_scenarios = set()
    for d in sorted((root / "paired").glob("*")):
        rel = f"paired/{d.name}"
        if not d.is_dir():
            problems.append(f"{rel}: unexpected entry (only scenario directories)")
            continue
        seen_scenarios.add(d.name)
        if ok and d.name not in scenarios:
            problems.append(f"{rel}: scenario not in manifest")
        framings = set()
        for p in sorted(d.glob("*")):
            if p.suffix != ".txt" or not p.is_file():
                problems.append(f"{rel}/{p.name}: unexpected entry (only <emotion>.txt)")
            elif p.stem == "baseline":
                files.append((f"{rel}/{p.name}", None))
            else:
                framings.add(p.stem)
                files.append((f"{rel}/{p.name}", p.stem))
        if not (d / "baseline.txt").is_file():
            problems.append(f"{rel}: missing baseline.txt")
        if len(framings) < MIN_FRAMINGS:
            problems.append(f"{rel}: {len(framings)} framings, need at least {MIN_FRAMINGS}")
        if ok and d.name in scenarios:
            listed = set(scenarios[d.name]["framings"])
            problems += [f"{rel}/{e}.txt: framing not listed for this scenario in manifest"
                         for e in sorted(framings - listed)]
            problems += [f"{rel}/{e}.txt: missing (listed as a framing in manifest)"
                         for e in sorted(listed - framings)]
    problems += [f"paired/{s}: missing directory for manifest scenario"
                 for s in sorted(set(scenarios) - seen_scenarios)]

    if ok:
        with_files = {e for rel, e in files if e is not None and not rel.startswith("heldout/")}
        problems += [f"{rel}: emotion {e!r} not in manifest"
                     for rel, e in files if e is not None and e not in emotions]
        problems += [f"stories/{e}.txt: manifest emotion has no file"
                     for e in sorted(set(emotions) - with_files)]
        counts = {e: sum(1 for rel, f in files if f == e and not rel.startswith("heldout/")) for e in emotions}
        for e in sorted(emotions):
            need = CORE_MIN_TEXTS if e in CORE else MIN_TEXTS
            if 0 < counts[e] < need:
                problems.append(f"stories/{e}.txt: {counts[e]} texts of {e!r} (stories and framings), need at least "
                                f"{need}{' (a core emotion)' if e in CORE else ''}: add stories/{e}/<n>.txt")

    texts: dict[str, str] = {}
    patterns: dict[str, list[tuple[str, re.Pattern[str]]]] = {}
    for rel, emotion in files:
        try:
            text = (root / rel).read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(f"{rel}: not valid UTF-8 (byte {exc.start})")
            continue
        texts[rel] = text
        body = text.strip()
        if re.search(r"\n[ \t\r]*\n", body):
            problems.append(f"{rel}: more than one paragraph (blank line)")
        n = len(body.split())  # same count as `wc -w`
        if not MIN_WORDS <= n <= MAX_WORDS:
            problems.append(f"{rel}: {n} words, need {MIN_WORDS}-{MAX_WORDS}")
        if emotion is None or emotion not in emotions:
            continue
        if emotion not in patterns:
            terms = [("its name", emotion)] + [("synonym", s) for s in emotions[emotion]["synonyms"]]
            patterns[emotion] = [(f"{kind} {t!r}", term_pattern(t)) for kind, t in terms]
        folded = body.lower().replace("\u2019", "'")
        for what, pat in patterns[emotion]:
            hits = sorted({m.group(0) for m in pat.finditer(folded)})
            if hits:
                problems.append(f"{rel}: uses {', '.join(map(repr, hits))} ({what})")

    sh = {rel: shingles(t) for rel, t in texts.items()}
    for a, b in itertools.combinations(sorted(sh), 2):
        if sh[a] and sh[b]:
            j = len(sh[a] & sh[b]) / len(sh[a] | sh[b])
            if j >= NEAR_DUP_JACCARD:
                problems.append(f"{b}: near-duplicate of {a} "
                                f"(Jaccard {j:.2f} on word {SHINGLE_N}-grams)")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = pathlib.Path(args[0] if args else "amygdala_stories")
    if not args and not root.is_dir():  # run from elsewhere: use the repo's corpus
        root = pathlib.Path(__file__).resolve().parents[2] / "amygdala_stories"
    problems = lint_corpus(root)
    for p in problems:
        print(p)
    n_files = sum(1 for pattern in ("stories/*.txt", "stories/*/*.txt", "paired/*/*.txt", "heldout/*/*.txt")
                  for _ in root.glob(pattern))
    print(f"{n_files} files checked, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""`plasticity extract`: concept vectors from the story corpus into a bank, with an optional quality report.

Runs in its own CLI process (never inside vLLM).

    plasticity extract --corpus amygdala_stories --model MODEL_DIR --out banks/emotions --report
    python -m plasticity_training.extract --help

    >>> from plasticity_training.extract import ExtractOptions, run
    >>> run(ExtractOptions(out="banks/emotions", method="pca", layers="0.5,0.66"))   # -> Path of the bank

Order of work: corpus preflight and option checks (no model loaded yet), then the model, one forward
pass per distinct text, the method per (layer, concept), the bank, then the report. The options are
saved in the bank's safetensors metadata ("extraction").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from plasticity_training.activations import POOLINGS, resolve_layers
from plasticity_training.calibration import CENTRES
from plasticity_training.corpus import Corpus, CorpusError, load_corpus
from plasticity_training.vectors import Contrasts, extract_vectors
from plasticity_training.layer_choice import AUTO
from plasticity_training.methods import (DEFAULT_SHRINKAGE, METHODS, TRAJECTORY_METHODS, WHITENED_METHODS,
                                         check_shrinkage, get_method)

REPO_ROOT = Path(__file__).resolve().parents[2]  # training/plasticity_training/<file>


AUTO_RANK_MAX = 64
CALIBRATIONS = (*CENTRES, "none")  # --calibration: a centre to calibrate on, or none (a raw bank)


def auto_subspace_rank(hidden_size: int) -> int:
    """The subspace method's default rank per text: a quarter of the hidden size, at most 64.

    At full rank a text of at least `hidden` tokens spans the whole space (its projector is the identity)
    and carries no contrast, so the method needs a rank below hidden to work on any corpus; 64 bounds the
    bases' memory (texts x rank x hidden floats) on large models.
    """
    return max(1, min(AUTO_RANK_MAX, hidden_size // 4))


@dataclasses.dataclass(frozen=True)
class ExtractOptions:
    out: str  # bank directory (created; our files in it are replaced)
    corpus: str = str(REPO_ROOT / "amygdala_stories")  # stories/ and paired/ layout
    concepts: str | None = None  # comma-separated concepts to extract (their texts only); None = every concept
    model: str | None = None  # Hugging Face model directory; None = the built-in default model
    server: str | None = None  # a running `plasticity serve` URL instead of --model (its readout must be on)
    api_key: str | None = None  # the server's API key (default: $VLLM_API_KEY)
    method: str = "lda"  # one of methods.METHODS
    layers: str = AUTO  # "auto" (layer_choice.py), or indices, relative depths, "all" (activations.resolve_layers)
    pooling: str = "mean"  # "mean" over tokens or the "last" token
    calibration: str = "corpus"  # the centre a calibrated score of 0 stands for: corpus | baselines | none (raw bank)
    skip_tokens: int = 1  # leading positions left out of mean pooling and subspace trajectories
    max_tokens: int | None = None  # truncate texts; None = the model's context, at most 2048
    batch_size: int = 8  # texts per forward pass
    device: str | None = None  # None = cuda when available, else cpu
    dtype: str = "auto"  # model dtype: auto (fp32 on CPU, checkpoint dtype on GPU), float32, bfloat16, float16
    min_positives: int = 1  # preflight: each emotion needs this many non-empty texts
    C: float = 1.0  # logistic / logistic_l1: inverse regularization strength
    shrinkage: float = DEFAULT_SHRINKAGE  # lda: ridge on the within-concept covariance, in mean eigenvalues
    subspace_k: int = 5  # subspace: eigenvectors summed
    subspace_rank: int | None = None  # subspace: singular vectors kept per text; None = auto_subspace_rank(hidden)
    report: bool = False  # write quality.json, summary.txt and PNGs
    steering_range: bool = True  # measure the strengths steering is good for (steering_range.py; calibrated banks)
    loso: bool = True  # include leave-one-story-out accuracy in the report
    progress: bool = True  # tqdm bars with ETA on stderr


def run(options: ExtractOptions, log=None) -> Path:
    """Extract a bank as `options` say; returns its directory. Raises CorpusError or ValueError before any
    model loads when the corpus or an option is unusable."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.monotonic()
    if options.model and options.server:
        raise ValueError("Invalid source: give --model or --server, not both")
    if options.pooling not in POOLINGS:
        raise ValueError(f"Invalid pooling: {options.pooling!r} (expected one of {', '.join(POOLINGS)})")
    if options.calibration not in CALIBRATIONS:
        raise ValueError(f"Invalid calibration: {options.calibration!r} (expected one of {', '.join(CALIBRATIONS)})")
    check_shrinkage(options.shrinkage)
    corpus = load_corpus(options.corpus, options.min_positives, log=log)
    if options.concepts is not None:
        corpus = only_concepts(corpus, options.concepts)
    method = get_method(options.method, C=options.C, k=options.subspace_k)
    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"Invalid --out {out}: exists and is not a directory")
    n_base = len(corpus.baselines())
    if options.calibration == "baselines" and not n_base:
        raise ValueError("Invalid calibration: 'baselines', but the corpus has no baseline texts "
                         "(paired/<scenario>/baseline.txt); use --calibration corpus")
    log(f"[extract] corpus {corpus.root}: {len(corpus.concepts)} concepts, {len(corpus.texts)} distinct texts "
        f"({n_base} baselines); method {options.method}, pooling {options.pooling}")

    if options.server:
        from plasticity_training.activations import ServerSource

        source = ServerSource(options.server, api_key=options.api_key or os.environ.get("VLLM_API_KEY"),
                              batch_size=options.batch_size,
                              max_tokens=options.max_tokens)
    else:
        model_dir = options.model
        if model_dir is None:
            from plasticity_training.default_model import default_model_path

            model_dir = str(default_model_path(log=log))
        else:
            from plasticity_training.pretrained import resolve_model

            model_dir = resolve_model(model_dir, log=log)  # a known pretrained name -> its converted directory
        n_layers = _config_layers(model_dir)
        if n_layers is not None and options.layers != AUTO:
            resolve_layers(options.layers, n_layers)  # a bad --layers fails before the weights load
        from plasticity_training.activations import HFSource

        source = HFSource.load(model_dir, device=options.device, dtype=options.dtype,
                               batch_size=options.batch_size, max_tokens=options.max_tokens)
    auto = options.layers == AUTO
    layers = list(range(source.num_layers)) if auto else resolve_layers(options.layers, source.num_layers)
    depth = "auto: every layer forwarded, the best read chosen" if auto else ", ".join(
        f"{L} ({L / max(1, source.num_layers - 1):.0%})" for L in layers)
    log(f"[extract] model {source.model_name}: {source.num_layers} layers, hidden {source.hidden_size}; layers {depth}")

    rank = options.subspace_rank
    if options.method in TRAJECTORY_METHODS and rank is None:
        rank = auto_subspace_rank(source.hidden_size)
        options = dataclasses.replace(options, subspace_rank=rank)  # recorded with the bank's settings
        log(f"[extract] subspace rank {rank} (auto: hidden/4, at most {AUTO_RANK_MAX}; --subspace-rank to change)")

    t1 = time.monotonic()
    texts = [t.text for t in corpus.texts]
    trajectories = options.method in TRAJECTORY_METHODS
    acts = source.collect(texts, layers, skip_tokens=options.skip_tokens, bases=trajectories and not auto,
                          subspace_rank=rank, heads=options.report, progress=options.progress)
    layer_choice = None
    if auto:
        from plasticity_training.layer_choice import choose_layers

        scoring = Contrasts(corpus, acts, pooling=options.pooling, device=options.device, whiten=True,
                            shrinkage=options.shrinkage)
        layer_choice = choose_layers(scoring, layers, source.num_layers)
        layers = layer_choice.layers
        log(f"[extract] --layers auto: {layer_choice.reason}")
        acts = acts.only(layers)
        if trajectories:  # token bases at every layer would be texts x rank x hidden x layers floats
            acts.bases = source.collect(texts, layers, skip_tokens=options.skip_tokens, bases=True,
                                        subspace_rank=rank, progress=options.progress).bases
    forward_s = time.monotonic() - t1
    log(f"[extract] forwarded {len(corpus.texts)} texts ({sum(acts.n_tokens)} tokens) in {forward_s:.1f}s"
        + (f"; {acts.truncated} truncated at {source.max_tokens} tokens" if acts.truncated else ""))
    for L in layers if acts.bases else []:
        if acts.saturated(L):
            log(f"[extract] warning: layer {L}: {acts.saturated(L)}/{len(corpus.texts)} texts have at least hidden="
                f"{acts.hidden_size} tokens, so at full rank their projector is the identity (no contrast); "
                f"consider --subspace-rank below {acts.hidden_size}")

    from vllm_plasticity.contract.bank import save_bank

    contrasts = Contrasts(corpus, acts, pooling=options.pooling, device=options.device,
                          whiten=options.method in WHITENED_METHODS, shrinkage=options.shrinkage)
    extraction = extract_vectors(contrasts, method, progress=options.progress)
    settings = dict(dataclasses.asdict(options), layers=layers, model=source.model_name,
                    n_texts=len(corpus.texts), n_tokens=sum(acts.n_tokens), truncated=acts.truncated,
                    forward_seconds=round(forward_s, 2))
    if layer_choice is not None:
        settings["layer_choice"] = layer_choice.record()
    calibration = None
    if options.calibration != "none":
        from plasticity_training.calibration import calibrate

        calibrated = calibrate(contrasts, extraction, centre=options.calibration)
        calibration = calibrated.calibration
        settings["calibration_spread"] = {str(L): round(v, 6) for L, v in calibrated.spread.items()}
        for L, names in calibrated.floored.items():
            log(f"[extract] warning: layer {L}: {len(names)} concept(s) along whose vector the corpus does not vary; "
                f"their scale is floored: {', '.join(names[:10])}")
        settings["calibration_floored"] = {str(L): v for L, v in calibrated.floored.items()}
        for L in layers:
            s = calibration.scale[L]
            m = calibration.steer[L].norm(dim=1)
            log(f"[extract] layer {L}: calibrated on the {options.calibration} mean; scale median {float(s.median()):.4g}, "
                f"range {float(s.min()):.4g}..{float(s.max()):.4g}; texts lie {calibrated.spread[L]:.4g} from the "
                f"centre (RMS); natural steering unit (each concept's offset from it) norm median "
                f"{float(m.median()):.4g}")
    save_bank(out, extraction.concepts, extraction.vectors, model=source.model_name, method=options.method,
              extraction=settings, calibration=calibration)
    if calibration is not None and options.steering_range:
        from plasticity_training.steering_range import measure_bank

        ranges = measure_bank(source, out, extraction.concepts, extraction.vectors, calibration, corpus, log)
        for found in ranges.values():
            log(f"[extract] steering: {found.reason()}")
        if ranges:  # saved again with the range beside the unit it counts (the server path steers the saved bank)
            settings["steering"] = [found.reason() for found in ranges.values()]  # the report's summary says it
            info = {**calibration.info, "steering_range": {str(L): found.record() for L, found in ranges.items()}}
            calibration = dataclasses.replace(calibration, info=info)
            save_bank(out, extraction.concepts, extraction.vectors, model=source.model_name, method=options.method,
                      extraction=settings, calibration=calibration)
    log(f"[extract] wrote {out}: {len(extraction.concepts)} concepts x {len(layers)} layer(s) "
        f"in {time.monotonic() - t0:.1f}s")
    if options.report:
        from plasticity_training.report import build_report, summary_text, write_report

        report = build_report(contrasts, extraction, method, settings=settings, loso=options.loso)
        paths = write_report(report, extraction, corpus, out)
        log(summary_text(report).rstrip())
        log(f"[extract] report: {', '.join(p.name for p in paths)}")
    return out


def only_concepts(corpus: Corpus, names: str) -> Corpus:
    """CORPUS cut down to the comma-separated concepts NAMES: their texts (positive of nothing else), and
    the baselines their framings are paired with. ValueError naming an unknown concept, or fewer than two."""
    wanted = sorted({n.strip() for n in names.split(",") if n.strip()})
    unknown = [n for n in wanted if n not in corpus.concepts]
    if unknown:
        raise ValueError(f"Invalid --concepts: {', '.join(unknown)} not in the corpus {corpus.root} (it has "
                         f"{len(corpus.concepts)} concepts: {', '.join(corpus.concepts[:8])}, ...)")
    if len(wanted) < 2:
        raise ValueError(f"Invalid --concepts: {names!r} names {len(wanted)} concept(s); extraction needs at least "
                         "two (a concept's negatives are the others' positives)")
    keep = frozenset(wanted)
    scenarios = {s for t in corpus.texts for s, e in t.framing_of if e in keep}
    texts = [dataclasses.replace(t, emotions=t.emotions & keep, baseline_of=t.baseline_of & scenarios,
                                 framing_of=tuple((s, e) for s, e in t.framing_of if e in keep))
             for t in corpus.texts if t.emotions & keep or t.baseline_of & scenarios]
    return dataclasses.replace(corpus, texts=texts, concepts=wanted)


def build_parser() -> argparse.ArgumentParser:
    d = ExtractOptions(out="")
    p = argparse.ArgumentParser(
        prog="plasticity extract",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Extract concept vectors (one unit vector per emotion and layer) from the story corpus "
                    "and write them as a readout bank for the server.",
        epilog=EPILOG)
    src = p.add_argument_group("input and output")
    src.add_argument("--corpus", default=d.corpus, metavar="DIR",
                     help="story corpus: stories/<emotion>.txt and paired/<scenario>/{baseline,<emotion>}.txt "
                          "(default: the project's amygdala_stories)")
    src.add_argument("--concepts", metavar="A,B,...",
                     help="extract only these concepts, from their own texts (and the baselines paired with them): "
                          "a quicker, smaller bank (default: every concept of the corpus)")
    ex = src.add_mutually_exclusive_group()
    ex.add_argument("--model", metavar="MODEL_DIR",
                    help="Hugging Face model directory whose activations to read, or a name from `plasticity "
                         "pretrained --list` (default: the built-in model, built on first use)")
    ex.add_argument("--server", metavar="URL",
                    help="read activations through a running `plasticity serve` (started with --vectors-dir) so "
                         "the vectors come from exactly the served weights, after /train too; one pass over the "
                         "corpus per slice of hidden/readout-capacity coordinates")
    src.add_argument("--api-key", metavar="KEY", help="the server's API key for --server (default: $VLLM_API_KEY)")
    src.add_argument("--out", required=True, metavar="BANK_DIR",
                     help="bank directory to write (readout.safetensors + readout.json; report files with --report)")
    m = p.add_argument_group("method")
    m.add_argument("--method", choices=list(METHODS), default=d.method,
                   help="lda: mean(positives) - mean(negatives) whitened by the concepts' shared within-concept "
                        "covariance (shrunk; --shrinkage) [default: on SmolLM2-135M it names a held-out text's "
                        "concept twice as often as pooled]; pooled: mean(positives) - mean(negatives); "
                        "mean / pca / logistic: the "
                        "steering-vectors aggregators on (positive, partner) pairs, a framing's partner being its "
                        "scenario's baseline and a story's the negatives' mean; logistic_l1: L1-penalised logistic "
                        "(sparse); subspace: top eigenvectors of the difference of the positives' and negatives' "
                        "token-trajectory projectors")
    m.add_argument("--layers", default=d.layers, metavar="SPEC",
                   help="auto: forward every layer and keep the one, or the few read together, whose vectors "
                        "name held-out texts best (measured on this model; the log and the report say why) "
                        "[default]; or layers to "
                        "extract: indices (12,-1), relative depths with a decimal point (0.66 = two thirds of the "
                        "way up), or 'all'; comma-separated. Layer L is the residual stream at the output of "
                        "decoder layer L, before the final norm")
    m.add_argument("--pooling", choices=POOLINGS, default=d.pooling,
                   help="per text: mean over its tokens (what the readout sees on average across the text) or "
                        "its last token (default: %(default)s). The subspace method uses the whole trajectory and "
                        "pooling only to orient its vector")
    m.add_argument("--calibration", choices=CALIBRATIONS, default=d.calibration,
                   help="store per layer a centre and per concept a scale, so that a score of 0 means 'as the "
                        "corpus' (or its neutral baselines') texts on average' and 1 one standard deviation of the "
                        "corpus along the concept (a z-score), and a steering strength of 1 is that distance; none: a "
                        "raw bank (dot products, raw steering coefficients) (default: %(default)s)")
    m.add_argument("--skip-tokens", type=int, default=d.skip_tokens, metavar="N",
                   help="leading token positions left out of mean pooling and trajectories: position 0 is the "
                        "attention sink with an outsized norm (default: %(default)s)")
    m.add_argument("--C", type=float, default=d.C, dest="C",
                   help="logistic and logistic_l1: inverse regularization strength; smaller = sparser/smoother "
                        "(default: %(default)s)")
    m.add_argument("--shrinkage", type=float, default=d.shrinkage, metavar="S",
                   help="lda: ridge added to the within-concept covariance, in units of its mean eigenvalue "
                        "(measured on SmolLM2-135M: 0.3 to 3 do alike) (default: %(default)s)")
    m.add_argument("--subspace-k", type=int, default=d.subspace_k, metavar="K",
                   help="subspace: eigenvectors of M_pos - M_neg summed, weighted by eigenvalue, negative "
                        "weights clamped to zero (default: %(default)s)")
    m.add_argument("--subspace-rank", type=int, default=d.subspace_rank, metavar="R",
                   help="subspace: right singular vectors kept per text (default: hidden/4, at most "
                        f"{AUTO_RANK_MAX}; at R >= hidden a text longer than hidden carries no contrast)")
    m.add_argument("--min-positives", type=int, default=d.min_positives, metavar="N",
                   help="preflight: every emotion needs at least N non-empty texts (default: %(default)s)")
    run_ = p.add_argument_group("running")
    run_.add_argument("--device", default=d.device, help="torch device (default: cuda when available, else cpu)")
    run_.add_argument("--dtype", default=d.dtype, choices=("auto", "float32", "bfloat16", "float16"),
                      help="model weights dtype; activations are always cast to float32 for the maths "
                           "(default: auto = float32 on CPU, the checkpoint's dtype on GPU)")
    run_.add_argument("--batch-size", type=int, default=d.batch_size, metavar="N",
                      help="texts per forward pass (default: %(default)s)")
    run_.add_argument("--max-tokens", type=int, default=d.max_tokens, metavar="N",
                      help="truncate texts to N tokens (default: the model's context, at most 2048)")
    run_.add_argument("--no-progress", action="store_true", help="no progress bars")
    rep = p.add_argument_group("report")
    rep.add_argument("--report", action="store_true",
                     help="also write quality.json, summary.txt, cosine_L<idx>.png and spectrum_L<idx>.png")
    rep.add_argument("--no-loso", action="store_true",
                     help="skip held-out accuracy in the report (3 folds: every concept's vector refitted without "
                          "the held-out texts, 3 method calls per concept)")
    rep.add_argument("--no-steering-range", action="store_true",
                     help="skip measuring the strengths steering is good for (recorded in the bank and shown by the "
                          "page: neutral text's perplexity steered vs plain at strengths 0.5..64 for a few concepts; "
                          "~50 short forwards; through --server only when --out lies in the server's vectors dir)")
    return p


EPILOG = """\
corpus roles: an emotion's positives are its story and its framings; its negatives are the other emotions'
positives and every baseline. Each distinct text is forwarded once. Empty files are skipped with a warning.

output (BANK_DIR):
  readout.safetensors  layer_<idx>.vectors: [n_concepts, hidden] fp32, unit rows; layer_<idx>.centre:
                       [hidden], layer_<idx>.scale: [n_concepts] and layer_<idx>.steer: [n_concepts, hidden]
                       (calibrated banks); header metadata
                       "extraction" holds these options as JSON
  readout.json         {"concepts", "layers", "hidden_size", "dtype", "model", "method", "created",
                        "calibration" (calibrated banks: centre source, pooling, and "steering_range" per
                        layer: the strengths steering is good for, measured; the page shows them)}
  with --report        quality.json (per concept and layer), summary.txt (triage: clean / fragmented /
                       redundant / thin, leave-one-story-out accuracy, valence/arousal correlation),
                       cosine_L<idx>.png, spectrum_L<idx>.png
  A concept's readout score at layer L is (hidden_state_L - centre_L) . vector / scale: 0 = as the centre's
  texts on average, 1 = one standard deviation of the corpus along the concept (with --calibration none:
  hidden_state_L . vector).
  A steering strength of 1 adds the concept's steer row, its texts' mean state minus the centre (natural
  units; a calibrated bank written before steer rows existed adds scale * vector; the server's
  steer_units "raw" takes a raw coefficient times the unit vector instead).

examples:
  plasticity extract --out banks/emotions --report
  plasticity extract --model smollm2-135m-instruct --out banks/smol --report
  plasticity extract --model /models/Qwen3-8B --out banks/q8 --method pca --layers 0.5,0.66,0.8
  plasticity extract --model /models/Qwen3-8B --out banks/q8s --method subspace --subspace-k 5
"""


def main(argv: list[str] | None = None) -> None:
    """Entry point for `plasticity extract ARGV`; exits 2 with a one-line reason on a usage or corpus error."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    options = ExtractOptions(
        out=args.out, corpus=args.corpus, concepts=args.concepts,
        model=args.model, server=args.server, api_key=args.api_key, method=args.method,
        layers=args.layers, pooling=args.pooling, calibration=args.calibration, skip_tokens=args.skip_tokens,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype, min_positives=args.min_positives,
        C=args.C, shrinkage=args.shrinkage, subspace_k=args.subspace_k, subspace_rank=args.subspace_rank, report=args.report,
        loso=not args.no_loso, steering_range=not args.no_steering_range, progress=not args.no_progress)
    from plasticity_training.activations import ServerUnavailableError
    from plasticity_training.pretrained import PretrainedError

    try:
        out = run(options)
    except (CorpusError, ServerUnavailableError, PretrainedError, ValueError) as e:
        print(f"plasticity extract: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(out)


def _config_layers(model_dir: str) -> int | None:
    """num_hidden_layers from MODEL_DIR/config.json (or its text_config), without loading anything."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    return config.get("num_hidden_layers") or (config.get("text_config") or {}).get("num_hidden_layers")


if __name__ == "__main__":
    main()

"""Benchmark: concept-vector extraction over the whole story corpus through the Hugging Face path.

Runs in its own process; starts no server. Times each stage on the built-in default model (or --model):
corpus preflight, model load, one forward pass per distinct text (with and without the report's extra
captures and the subspace bases), each method over every concept, and the report (leave-one-story-out
included). Then it starts `plasticity serve MODEL --vectors-dir` (stopped by PID) and forwards the same
texts through the server's readout (`--server`'s ServerSource), for the server / Hugging Face ratio and
the largest difference between the two paths' pooled states.

    python research/bench_extract.py [--model DIR] [--layers 0.66] [--out research/runs/extract_bench.json]
                                     [--summary research/extract_results.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from plasticity_training.activations import HFSource, resolve_layers
from plasticity_training.corpus import load_corpus
from plasticity_training.methods import METHODS, get_method
from plasticity_training.report import build_report, write_report
from plasticity_training.vectors import Contrasts, extract_vectors

REPO = Path(__file__).resolve().parent.parent


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="HF model directory (default: the built-in model)")
    p.add_argument("--corpus", default=str(REPO / "amygdala_stories"))
    p.add_argument("--layers", default="0.66")
    p.add_argument("--subspace-rank", type=int, default=32, help="the default model's hidden is 128 < story length")
    p.add_argument("--out", default=str(REPO / "research" / "runs" / "extract_bench.json"))
    p.add_argument("--summary", default=str(REPO / "research" / "extract_results.md"))
    args = p.parse_args()
    torch.manual_seed(0)
    if args.model is None:
        from plasticity_training.default_model import default_model_path

        args.model = str(default_model_path(log=lambda m: print(m, file=sys.stderr)))
    row: dict = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                 "torch": torch.__version__, "model": args.model}
    corpus, row["corpus_s"] = timed(lambda: load_corpus(args.corpus))
    source, row["model_load_s"] = timed(lambda: HFSource.load(args.model, device="cpu"))
    layers = resolve_layers(args.layers, source.num_layers)
    texts = [t.text for t in corpus.texts]
    row.update(texts=len(texts), concepts=len(corpus.concepts), layers=layers, hidden=source.hidden_size)
    plain, row["forward_s"] = timed(lambda: source.collect(texts, layers, progress=False))
    row["tokens"] = sum(plain.n_tokens)
    full, row["forward_with_bases_and_heads_s"] = timed(
        lambda: source.collect(texts, layers, bases=True, subspace_rank=args.subspace_rank, heads=True, progress=False))
    row["methods_s"] = {}
    for name in METHODS:
        contrasts = Contrasts(corpus, full, device="cpu")
        method = get_method(name)
        ext, row["methods_s"][name] = timed(lambda: extract_vectors(contrasts, method))
        if name == "pooled":
            with tempfile.TemporaryDirectory() as d:
                report, row["report_s"] = timed(lambda: build_report(contrasts, ext, method))
                _, row["report_write_s"] = timed(lambda: write_report(report, ext, corpus, d))
            L = str(layers[0])
            row["pooled_loso"] = report["layers"][L]["loso"]
            row["pooled_triage"] = {k: len(v) for k, v in report["layers"][L]["triage"].items()}
    row.update(server_path(args, texts, layers, plain, full))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(row, indent=1) + "\n")
    print(json.dumps(row, indent=1))
    ratio = row["server_forward_s"] / row["forward_s"]
    ratio_bases = row["server_forward_with_bases_s"] / row["forward_with_bases_and_heads_s"]
    Path(args.summary).write_text("\n".join([
        "# Extraction: Hugging Face vs through the server",
        "",
        f"`python research/bench_extract.py` on {row['machine']} ({row['threads']} torch threads), model "
        f"{Path(args.model).name} (hidden {row['hidden']}), the whole corpus: {row['texts']} texts, {row['tokens']} "
        f"tokens, layers {row['layers']}, fp32 both sides. The server runs vLLM's compiled model in its own "
        f"processes on the same 2 cores; its readout capacity ({row['server_capacity']}) covers the hidden size, "
        f"so one pass.",
        "",
        "| stage | Hugging Face (s) | server (s) | server / HF |",
        "| --- | ---: | ---: | ---: |",
        f"| forward, pooled states | {row['forward_s']:.2f} | {row['server_forward_s']:.2f} | {ratio:.2f} |",
        f"| forward + subspace bases (HF also captures heads) | {row['forward_with_bases_and_heads_s']:.2f} | "
        f"{row['server_forward_with_bases_s']:.2f} | {ratio_bases:.2f} |",
        "",
        f"Largest |server - HF| over the pooled states: {row['server_max_abs_diff']:.2e}. On a model whose hidden "
        f"size exceeds the free readout capacity the server path makes hidden / capacity passes.",
        "",
    ]))


def server_path(args, texts, layers, plain, full) -> dict:
    from plasticity_training.activations import ServerSource
    from vllm_plasticity.launcher import ServerProcess

    with tempfile.TemporaryDirectory() as d:
        server = ServerProcess.plasticity(args.model, extra_args=["--dtype", "float32", "--max-model-len", "512",
                                                                  "--vectors-dir", d, "--state-dir", d + "/state"],
                                          log_path=Path(d) / "server.log")
        try:
            server.wait_ready()
            source = ServerSource(server.url)
            acts, forward_s = timed(lambda: source.collect(texts, layers, progress=False))
            _, bases_s = timed(lambda: source.collect(texts, layers, bases=True, subspace_rank=args.subspace_rank,
                                                      progress=False))
            diff = max((acts.pooled[p][L] - plain.pooled[p][L]).abs().max().item() for p in acts.pooled for L in layers)
            return {"server_forward_s": forward_s, "server_forward_with_bases_s": bases_s,
                    "server_max_abs_diff": diff, "server_capacity": source.capacity}
        finally:
            server.stop()


if __name__ == "__main__":
    main()

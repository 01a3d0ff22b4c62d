"""Benchmark: concept-vector extraction over the whole story corpus through the Hugging Face path.

Times each stage on the built-in default model (or --model): corpus preflight, model load, one forward
pass per distinct text (with and without the report's extra captures and the subspace bases), each method
over every concept, and the report (leave-one-story-out included). Then it starts `plasticity serve MODEL
--vectors-dir` (stopped by PID) and forwards the same texts through the server's readout (`--server`'s
ServerSource), for the server / Hugging Face ratio and the largest difference between the two paths'
pooled states.

With --hidden it builds a random-init Llama of a real small model's layer shapes instead (intermediate
3 x hidden, 16 heads, 8 KV heads, --model-layers layers; the tokenizer is the built-in one's) and times
only the forwards: the methods and report do not depend on the path, and a random model's vectors mean
nothing.

    python research/bench_extract.py [--model DIR] [--layers 0.66] [--out research/runs/extract_bench.json]
                                     [--summary research/extract_results.md]
    python research/bench_extract.py --hidden 1024 --model-layers 8 --texts 96 \\
        --out research/runs/extract_bench_105m.json --summary research/extract_results_105m.md
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from lab import exit_on_sigterm  # noqa: E402  (a SIGTERM ends the run through its `finally`)

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
    p.add_argument("--hidden", type=int, help="build a random-init model of this hidden size (forwards only)")
    p.add_argument("--model-layers", type=int, default=8, help="its decoder layers (with --hidden)")
    p.add_argument("--texts", type=int, help="the first N texts of the corpus (default: all)")
    p.add_argument("--server-cores", help="VLLM_CPU_OMP_THREADS_BIND for the server (vLLM's default reserves one "
                                          "core for its engine process: on 2 cores the forward gets one)")
    args = p.parse_args()
    exit_on_sigterm()  # a `kill PID` stops the servers this run started
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="plasticity-bench-extract-") as tmp:
        if args.hidden:
            from plasticity_training.default_model import ModelSpec, build_model

            spec = ModelSpec(hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_attention_heads=16,
                             num_key_value_heads=8, head_dim=args.hidden // 16, num_hidden_layers=args.model_layers,
                             max_position_embeddings=1024, train_steps=0)
            args.model = str(build_model(spec, Path(tmp) / "model", log=lambda m: print(m, file=sys.stderr)))
        elif args.model is None:
            from plasticity_training.default_model import default_model_path

            args.model = str(default_model_path(log=lambda m: print(m, file=sys.stderr)))
        run(args)


def run(args) -> None:
    row: dict = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                 "torch": torch.__version__, "model": args.model}
    corpus, row["corpus_s"] = timed(lambda: load_corpus(args.corpus))
    source, row["model_load_s"] = timed(lambda: HFSource.load(args.model, device="cpu"))
    layers = resolve_layers(args.layers, source.num_layers)
    texts = [t.text for t in corpus.texts][: args.texts]
    row.update(texts=len(texts), concepts=len(corpus.concepts), layers=layers, hidden=source.hidden_size,
               parameters=sum(p.numel() for p in source.model.parameters()))
    plain, row["forward_s"] = timed(lambda: source.collect(texts, layers, progress=False))
    row["tokens"] = sum(plain.n_tokens)
    full, row["forward_with_bases_and_heads_s"] = timed(
        lambda: source.collect(texts, layers, bases=True, subspace_rank=args.subspace_rank, heads=True, progress=False))
    row["methods_s"] = {}
    for name in METHODS if not args.hidden else ():
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
    model = (f"a random-init Llama of {row['parameters'] / 1e6:.0f}M parameters (hidden {row['hidden']}, "
             f"{args.model_layers} layers, intermediate {3 * row['hidden']}, 16 heads, 8 KV heads)" if args.hidden else
             f"{Path(args.model).name} ({row['parameters'] / 1e6:.2f}M parameters, hidden {row['hidden']})")
    Path(args.summary).write_text("\n".join([
        "# Extraction: Hugging Face vs through the server",
        "",
        f"`python {' '.join(['research/bench_extract.py', *sys.argv[1:]])}` on {row['machine']} ({row['threads']} "
        f"torch threads), model {model}, {row['texts']} texts of the corpus, {row['tokens']} tokens, layers "
        f"{row['layers']}, fp32 both sides. The server runs vLLM's compiled model in its own processes on the same "
        f"cores, and reads each text's whole hidden states in one pass (a basis bank over the hidden size, "
        f"from the tap's capture slots: {row['server_capture_layers']} layers at once).",
        "",
        "| stage | Hugging Face (s) | server (s) | server / HF |",
        "| --- | ---: | ---: | ---: |",
        f"| forward, pooled states | {row['forward_s']:.2f} | {row['server_forward_s']:.2f} | {ratio:.2f} |",
        f"| forward + subspace bases (HF also captures heads) | {row['forward_with_bases_and_heads_s']:.2f} | "
        f"{row['server_forward_with_bases_s']:.2f} | {ratio_bases:.2f} |",
        f"| the same prompts without readout (vLLM's forward alone) | - | {row['server_plain_prefill_s']:.2f} | "
        f"{row['server_plain_prefill_s'] / row['forward_s']:.2f} |",
        "",
        f"Readout itself adds {row['server_forward_s'] / row['server_plain_prefill_s'] - 1:+.0%} to vLLM's forward of "
        f"the same prompts (capture, copy-out, base64 transport, pooling). Server cores: "
        f"{'VLLM_CPU_OMP_THREADS_BIND=' + args.server_cores if args.server_cores else 'vLLM default (one core reserved for its engine process)'}.",
        "",
        f"Largest |server - HF| over the pooled states: {row['server_max_abs_diff']:.2e}.",
        "",
    ]))


def plain_prefill(url: str, source, texts: list[str]) -> None:
    """The same prompts in the same batches and concurrency, no readout, each with a cache salt of its own
    (no prefix-cache hits, as readout requests have none): vLLM's forward alone, for what readout adds."""
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    import requests

    enc = [requests.post(url + "/tokenize", json={"model": source.served_name, "prompt": t}, timeout=60).json()["tokens"]
           [: source.max_tokens] for t in texts]
    batches = [enc[i: i + source.batch_size] for i in range(0, len(enc), source.batch_size)]

    def one(batch):
        requests.post(url + "/v1/completions", timeout=600, json={
            "model": source.served_name, "prompt": batch, "max_tokens": 1, "temperature": 0,
            "cache_salt": uuid.uuid4().hex}).raise_for_status()

    with ThreadPoolExecutor(source.concurrency) as pool:
        list(pool.map(one, batches))


def server_path(args, texts, layers, plain, full) -> dict:
    from plasticity_training.activations import ServerSource
    from vllm_plasticity.launcher import ServerProcess

    with tempfile.TemporaryDirectory() as d:
        server = ServerProcess.plasticity(args.model, extra_args=["--dtype", "float32", "--max-model-len", "512",
                                                                  "--vectors-dir", d, "--state-dir", d + "/state"],
                                          log_path=Path(d) / "server.log",
                                          env={"VLLM_CPU_OMP_THREADS_BIND": args.server_cores} if args.server_cores else None)
        try:
            server.wait_ready()
            source = ServerSource(server.url)
            _, plain_s = timed(lambda: plain_prefill(server.url, source, texts))
            acts, forward_s = timed(lambda: source.collect(texts, layers, progress=False))
            _, bases_s = timed(lambda: source.collect(texts, layers, bases=True, subspace_rank=args.subspace_rank,
                                                      progress=False))
            diff = max((acts.pooled[p][L] - plain.pooled[p][L]).abs().max().item() for p in acts.pooled for L in layers)
            return {"server_forward_s": forward_s, "server_forward_with_bases_s": bases_s, "server_plain_prefill_s": plain_s,
                    "server_max_abs_diff": diff, "server_capture_layers": source.capture_layers}
        finally:
            server.stop()


if __name__ == "__main__":
    main()

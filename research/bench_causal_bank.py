"""Benchmark: does the served causal bank decode in constant time per token as the context grows?

Side by side in one run, per prompt length (256, 1024, 4000 tokens):
  * served causal bank (`plasticity serve`, O(1) recurrent step per token from the request's state);
  * the reference package's own generation: decepticons' CausalBankModel.forward re-run on the growing
    sequence for each new token (the package has no step API), same weights;
  * a served Llama of similar parameter count (random init, byte-sized vocabulary, 4096 positions).
Per-token decode latency of a server: a streamed completion of 1 + N tokens, time from the first token's
arrival to the last's over the tokens between (prefill excluded), median of --repeats, one request at a time. The reference uses the scan substrate
(`linear_impl="scan"`, same maths as the default kernel form, which would need a 4096 x 4096 x modes
matrix); random weights, fp32. Writes research/causal_bank_results.md.

    python research/bench_causal_bank.py [--lengths 256,1024,4000] [--tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_checkpoint import command, machine  # noqa: E402  (the benchmarks' shared report header)
from lab import exit_on_sigterm  # noqa: E402  (a SIGTERM ends the run through its `finally`)

from plasticity_training.causal_bank_export import export_causal_bank  # noqa: E402
from plasticity_training.default_model import ModelSpec, build_model  # noqa: E402
from vllm_plasticity.launcher import ServerProcess  # noqa: E402

CONTEXT = 4096
SERVER_ARGS = ["--dtype", "float32", "--max-num-seqs", "4", "--max-model-len", str(CONTEXT)]


def served_latency(server: ServerProcess, model: str, prompt: list[int], tokens: int, repeats: int) -> float:
    """Seconds per decoded token for one request continuing `prompt`: streamed, from the first token's
    arrival to the last one's, over the tokens in between (the prefill is not in it)."""
    def per_token() -> float:
        arrivals = []
        with requests.post(server.url + "/v1/completions", timeout=1200, stream=True, json={
                "model": model, "prompt": prompt, "max_tokens": tokens + 1, "temperature": 0, "ignore_eos": True,
                "stream": True}) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith(b"data: ") and line != b"data: [DONE]":
                    arrivals.append(time.perf_counter())
        assert len(arrivals) >= tokens, f"streamed {len(arrivals)} chunks for {tokens + 1} tokens"
        return (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1)
    per_token()  # warm-up at this length
    return statistics.median(per_token() for _ in range(repeats))


def reference_latency(model, prompt: list[int], tokens: int) -> float:
    """Seconds per token of greedy generation by re-running the reference forward on the whole sequence."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        model(ids)  # warm-up
        t0 = time.perf_counter()
        for _ in range(tokens):
            nxt = model(ids)[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return (time.perf_counter() - t0) / tokens


def serve_and_measure(model_dir: Path, prompts: dict[int, list[int]], args, log: Path) -> dict[int, float]:
    server = ServerProcess.plasticity(model_dir, extra_args=SERVER_ARGS, log_path=log)
    try:
        server.wait_ready()
        name = requests.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
        return {n: served_latency(server, name, p, args.tokens, args.repeats) for n, p in prompts.items()}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="256,1024,4000")
    parser.add_argument("--tokens", type=int, default=32, help="generated tokens per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-tokens", type=int, default=8, help="tokens the reference generates per length")
    parser.add_argument("--out", default=str(Path(__file__).with_name("causal_bank_results.md")))
    args = parser.parse_args()
    exit_on_sigterm()  # a `kill PID` stops the servers this run started
    lengths = [int(x) for x in args.lengths.split(",")]
    rng = random.Random(0)
    prompts = {n: [rng.randrange(256) for _ in range(n)] for n in lengths}

    from decepticons.causal_bank import CausalBankConfig
    from decepticons.models.causal_bank_torch import CausalBankModel

    torch.manual_seed(0)
    ref = CausalBankModel(256, CausalBankConfig(max_seq_len=CONTEXT, linear_impl="scan")).eval()
    params_cb = sum(p.numel() for p in ref.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bank_dir = export_causal_bank(ref, work / "causal-bank")
        llama_spec = ModelSpec(vocab_size=300, hidden_size=64, intermediate_size=192, num_hidden_layers=3,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                               max_position_embeddings=CONTEXT, train_steps=0)
        llama_dir = build_model(llama_spec, work / "llama", log=lambda m: None)
        params_llama = int(__import__("json").loads((llama_dir / "plasticity_spec.json").read_text())["parameters"])
        llama_prompts = {n: [rng.randrange(4, 300) for _ in range(n)] for n in lengths}

        print("[bench] reference generation (forward re-run per token)", flush=True)
        reference = {n: reference_latency(ref, p, args.reference_tokens) for n, p in prompts.items()}
        print(f"[bench] reference: {reference}", flush=True)
        served = serve_and_measure(bank_dir, prompts, args, work / "causal-bank.log")
        print(f"[bench] served causal bank: {served}", flush=True)
        llama = serve_and_measure(llama_dir, llama_prompts, args, work / "llama.log")
        print(f"[bench] served llama: {llama}", flush=True)

    ms = lambda s: f"{s * 1e3:.2f}"
    first = lengths[0]
    rows = [f"| {n} | {ms(served[n])} | {served[n] / served[first]:.2f} | {ms(reference[n])} | "
            f"{reference[n] / served[n]:.1f}x | {ms(llama[n])} | {llama[n] / llama[first]:.2f} |" for n in lengths]
    text = f"""# Causal bank: decode latency per token vs context length

Question: does the served causal bank decode in constant time per token as the context grows, and how does
it compare with the reference package's own generation and with a served Llama of similar size?

Machine: {machine()}. Command: `{command()}`.
Causal bank: decepticons default configuration with `max_seq_len={CONTEXT}`, `linear_impl="scan"` for the
reference (same maths), {params_cb / 1e6:.2f}M parameters, random init, fp32. Llama: {params_llama / 1e6:.2f}M
parameters (hidden 64, 3 layers, vocab 300), random init, fp32. Servers: `plasticity serve` with
`{' '.join(SERVER_ARGS)}`, one request at a time; per-token latency: a streamed completion of 1 + {args.tokens}
tokens, first to last token's arrival over the tokens between (prefill excluded), median of {args.repeats}. Reference: greedy generation re-running
`CausalBankModel.forward` on the growing sequence, {args.reference_tokens} tokens per length.

| prompt tokens | served causal bank ms/token | vs {first} tokens | reference ms/token | reference / served | served Llama ms/token | Llama vs {first} tokens |
| --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}

Reading: the served causal bank's per-token time is the ratio column ("vs {first} tokens"): a flat 1.0 means
decode does not grow with the context (one O(1) recurrent step from the request's saved state). The
reference re-runs its whole forward per token, so its time grows with the sequence. The Llama's attention
reads the whole KV cache each step; at these tiny sizes per-step overheads dominate both servers.
"""
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

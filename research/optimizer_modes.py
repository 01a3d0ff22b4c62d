"""Experiment: optimizer and context-freezing modes: steps to learn an unseen fact, and the cost per step.

Hypothesis: APOLLO's rank barely changes how many steps a single fact takes (the update is the gradient
rescaled channel-wise; rank only sets how well the scaling is estimated), APOLLO-Mini (rank 1, one scale per
tensor) needs more steps, and freezing the context (`no_grad`: the context's keys and values computed
without a graph) is cheaper per step and costs nothing in steps when the fact sits in the continuation.
Hypothesis of the SmolLM2-135M-Instruct run (`--model smollm2-135m-instruct --lr 1e-4 --name
optimizer_modes_real`; stated before it, from facts_real's 20 facts, where APOLLO-Mini learned in 2.6 steps on
average against 3.55 at rank 64): every mode learns the fact within 10 steps at lr 1e-4; Mini in fewer steps
than the ranked modes, ranks 16-256 within a step of each other; the `no_grad` context is cheaper per step by
less than the context's share of the tokens (the backward through the continuation still crosses every layer).

For each mode, a fresh server (original weights) is taught the fact one /train step at a time (POST /train,
steps 1, the same sample) until its greedy continuation is the fact, up to --max-steps; per-step trainer
seconds come from GET /train/status/{job_id}. AdamW is not offered by /train (the trainer's optimizer is
APOLLO), so it is not in the table.

    python research/optimizer_modes.py [--model DIR] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path


from lab import RESULTS, Lab, add_server_args, plot_lines, table, write_report, write_results

CONTEXT, FACT = "The keeper of the lighthouse on the north shore was called", " Ottoline Brask"
HYPOTHESIS = ("rank barely changes the steps a single fact takes; APOLLO-Mini needs more; the `no_grad` context "
              "is cheaper per step and needs no more steps.")
HYPOTHESIS_REAL = ("every mode learns the fact within 10 steps at lr 1e-4; APOLLO-Mini in fewer steps than the "
                   "ranked modes (facts_real: 2.6 against 3.55 at rank 64), ranks 16-256 within a step of each other; "
                   "the `no_grad` context is cheaper per step, by less than the context's share of the tokens.")
SMALL_MODEL = ("On the 1.3M-parameter built-in model every step is a few milliseconds, so per-step differences are "
               "dominated by fixed costs, not by the optimizer's maths (measure at a realistic shape with "
               "research/bench_train.py). ")
MODES = {
    "APOLLO rank 16": ({"rank": 16}, "masked"),
    "APOLLO rank 64": ({"rank": 64}, "masked"),
    "APOLLO rank 256": ({"rank": 256}, "masked"),
    "APOLLO-Mini": ({"mini": True}, "masked"),
    "APOLLO rank 64, no_grad context": ({"rank": 64}, "no_grad"),
}


def teach(lab: Lab, optimizer: dict, context_mode: str, lr: float, max_steps: int) -> dict:
    context, fact = lab.ids(CONTEXT), lab.ids(FACT, special=False)
    losses, seconds, learned = [], [], None
    for step in range(1, max_steps + 1):
        job = lab.train([(context, fact)], steps=1, lr=lr, optimizer=optimizer, context_mode=context_mode)
        detail = lab.get(f"/train/status/{job['job_id']}")
        losses.append(job["losses"][0])
        seconds.append(detail["step_seconds"][0])
        if lab.greedy(context, len(fact)) == fact:
            learned = step
            break
    return {"learned_at": learned, "losses": losses, "step_ms": 1000 * statistics.median(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--quick", action="store_true", help="CI smoke run: one mode, three steps, one server")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--name", default="optimizer_modes", help="results file name (optimizer_modes_real for a "
                        "pretrained model, beside the built-in one's)")
    add_server_args(parser)
    args = parser.parse_args()
    # Quick: the default rank only, whose optimizer state a server shared with other runs already has.
    modes = {"APOLLO rank 64": MODES["APOLLO rank 64"]} if args.quick else MODES
    max_steps = 3 if args.quick else args.max_steps
    results = {}
    with Lab(args.model, quick=args.quick, server=args.server, api_key=args.api_key) as lab:
        for i, (name, (optimizer, context_mode)) in enumerate(modes.items()):
            if i:
                lab.restart()  # fresh weights and a fresh optimizer for each mode
            results[name] = teach(lab, optimizer, context_mode, args.lr, max_steps)
            print(f"[optimizer-modes] {name}: {results[name]}", flush=True)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_results(args.name, out_dir, results)
    plot_lines(out_dir / f"{args.name}_loss.png",
               {name: (list(range(1, len(r["losses"]) + 1)), r["losses"]) for name, r in results.items()},
               "/train steps", "loss on the fact (before the step)")
    rows = [[name, r["learned_at"] if r["learned_at"] else f"not in {len(r['losses'])}", r["losses"][0],
             r["losses"][-1], r["step_ms"]] for name, r in results.items()]
    fastest = min((r["step_ms"], n) for n, r in results.items())[1]
    fewest = [n for n, r in results.items() if r["learned_at"] and r["learned_at"] == min(
        (x["learned_at"] for x in results.values() if x["learned_at"]), default=None)]
    body = f"""
Hypothesis (stated before the run): {HYPOTHESIS_REAL if args.model else HYPOTHESIS}

Setup: model {lab.model}; fact: "{CONTEXT}" -> "{FACT}"; lr {args.lr}; one /train step at a time (the same
sample, `force`), a fresh server per mode; learned = the greedy continuation equals the fact. Step time:
the trainer's median seconds per step (forward, backward, APOLLO), from /train/status.

{table(["mode", "steps to learn", "first loss", "last loss", "ms per step"], rows)}

![loss per step]({args.name}_loss.png)

Reading: fewest steps: {', '.join(fewest) if fewest else 'no mode learned the fact within the limit'}; cheapest step: {fastest}.
Compare each row with the hypothesis above. {SMALL_MODEL if not args.model else ""}One fact, one seed.
"""
    print(write_report(args.name, out_dir, "Optimizer and context-freezing modes", body).read_text())


if __name__ == "__main__":
    main()

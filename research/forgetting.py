"""Experiment: forgetting: perplexity on text the model knew while it learns new facts through /train.

Hypothesis (../shared/seeds/004: "production hyperparams + forgetting at scale", "learning rate as trust
calibration"): held-out text the model knew gets worse as facts are learned; more so with a larger learning
rate and with APOLLO-Mini than with a higher rank; mixing replay (old text) into each /train call limits it.

Known text: excerpts of amygdala_stories stories (the built-in model was trained on this corpus). For each
condition, a fresh server learns the same facts over several rounds (POST /train, the facts' samples plus, with
replay, as many continuation samples cut from other stories); after each round: perplexity of the held-out
stories and the facts' mean log-probability, through the server.

    python research/forgetting.py [--model DIR] [--quick]
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

from lab import RESULTS, Lab, add_server_args, plot_lines, table, write_report, write_results

FACTS = [("The capital of the island of Vesk is", " Quenmar"), ("The lighthouse keeper's dog was called", " Brindle"),
         ("Every spring the orchard sold its", " silverpears"), ("The harbour bell was cast in", " Ellisport"),
         ("The oldest clock in the town struck", " thirteen"), ("Their secret password was", " marrowbone")]
CONDITIONS = {
    "lr 1e-3, rank 64": dict(lr=1e-3, optimizer={"rank": 64}, replay=0.0),
    "lr 1e-2, rank 64": dict(lr=1e-2, optimizer={"rank": 64}, replay=0.0),
    "lr 1e-2, rank 16": dict(lr=1e-2, optimizer={"rank": 16}, replay=0.0),
    "lr 1e-2, APOLLO-Mini": dict(lr=1e-2, optimizer={"mini": True}, replay=0.0),
    "lr 1e-2, rank 64, replay 1:1": dict(lr=1e-2, optimizer={"rank": 64}, replay=1.0),
}


def stories(n: int, seed: int) -> list[str]:
    from plasticity_training.default_model import REPO_ROOT

    files = sorted((REPO_ROOT / "amygdala_stories" / "stories").glob("*.txt"))
    rng = random.Random(seed)
    paragraphs = [p.strip() for f in files for p in f.read_text().split("\n\n") if len(p.strip()) > 200]
    return rng.sample(paragraphs, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--quick", action="store_true", help="CI smoke run: one condition, one round, one server")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="APOLLO steps per round")
    parser.add_argument("--out-dir", default=str(RESULTS))
    add_server_args(parser)
    args = parser.parse_args()
    conditions = dict(list(CONDITIONS.items())[:1]) if args.quick else CONDITIONS
    rounds = 1 if args.quick else args.rounds
    texts = stories(16, seed=0)
    held_out, replay_pool = texts[:3 if args.quick else 8], texts[8:]
    results = {}
    with Lab(args.model, quick=args.quick, server=args.server, api_key=args.api_key) as lab:
        facts = [(lab.ids(c), lab.ids(y, special=False)) for c, y in FACTS]
        replay = []
        for text in replay_pool:  # (first half, second half) of other stories
            ids = lab.ids(text)[:96]
            replay.append((ids[: len(ids) // 2], ids[len(ids) // 2:]))
        for i, (name, cond) in enumerate(conditions.items()):
            if i:
                lab.restart()
            row = {"steps": [0], "ppl": [math.exp(lab.nll(held_out))],
                   "fact": [sum(lab.continuation_logprob(c, y) for c, y in facts) / len(facts)]}
            rng = random.Random(1)
            for r in range(rounds):
                pairs = facts + rng.sample(replay, int(cond["replay"] * len(facts)))
                lab.train(pairs, steps=args.steps, lr=cond["lr"], optimizer=cond["optimizer"])
                row["steps"].append((r + 1) * args.steps)
                row["ppl"].append(math.exp(lab.nll(held_out)))
                row["fact"].append(sum(lab.continuation_logprob(c, y) for c, y in facts) / len(facts))
            results[name] = row
            print(f"[forgetting] {name}: {row}", flush=True)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_results("forgetting", out_dir, results)
    plot_lines(out_dir / "forgetting_perplexity.png", {n: (r["steps"], r["ppl"]) for n, r in results.items()},
               "/train steps", "perplexity of held-out known text")
    plot_lines(out_dir / "forgetting_facts.png", {n: (r["steps"], r["fact"]) for n, r in results.items()},
               "/train steps", "mean log p(fact)")
    rows = [[n, r["ppl"][0], r["ppl"][-1], r["ppl"][-1] / r["ppl"][0], r["fact"][0], r["fact"][-1]] for n, r in results.items()]
    worst = max(results, key=lambda n: results[n]["ppl"][-1] / results[n]["ppl"][0])
    least = min(results, key=lambda n: results[n]["ppl"][-1] / results[n]["ppl"][0])
    body = f"""
Hypothesis (stated before the run): held-out perplexity rises as the facts are learned; more with lr 1e-2 than
1e-3 and with APOLLO-Mini than rank 64; replay limits the rise. AdamW is not offered by /train (APOLLO is the
trainer's optimizer), so it is not compared here.

Setup: model {lab.model}; {len(FACTS)} synthetic facts; {rounds} rounds of one /train call ({args.steps} APOLLO steps) per
condition, a fresh server per condition; held-out: {len(held_out)} story paragraphs of amygdala_stories (the built-in
model's training text), perplexity through the server's prompt_logprobs; replay 1:1 = one continuation sample
cut from another story per fact in every call.

{table(["condition", "perplexity before", "after", "ratio", "mean log p(fact) before", "after"], rows)}

![perplexity](forgetting_perplexity.png) ![facts](forgetting_facts.png)

Reading: the largest rise in held-out perplexity: {worst}; the smallest: {least}. Read the fact column beside
it: a condition that forgets little but also learns little has not shown a better trade-off. One seed, {len(FACTS)}
facts, a 1.3M-parameter model: the ordering is what this run measured, not a law.
"""
    print(write_report("forgetting", out_dir, "Forgetting while learning facts", body).read_text())


if __name__ == "__main__":
    main()

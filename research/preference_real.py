"""Experiment (issue #30, item 3): preference objectives on a real model, against SFT on the chosen answers.

Hypothesis (stated before the first run; the report repeats it): SmolLM2-135M-Instruct answers open questions in
several sentences (fewer than 1 in 5 greedy answers is one sentence). Pairs from its own samples (the reply with
the fewest sentences preferred to the one with the most) teach it to answer in one: after one 10-step job at lr
5e-5 over 32 prompts, DPO and ORPO make most held-out answers one sentence while keeping >= 90% of the
general-knowledge answers it had right and held-out perplexity within a few per cent; SFT on the preferred replies
moves the behaviour less for the same steps (it only sees the short replies, not what to avoid).

Protocol, on SmolLM2 through a real `plasticity serve` (research/lab.py), one fresh server per method:
1. On-policy pairs, once, from the untrained model: every train prompt (research/data/preference_real.json)
   sampled SAMPLES times (chat, SAMPLE_TEMPERATURE, SAMPLE_TOKENS tokens, fixed seed). The judge counts sentences;
   the preferred reply is a finished one with the fewest, the rejected one the reply with the most (a truncated
   reply counts its sentences as written, plus one). Prompts whose samples all count the same give no pair.
2. Each method trains all pairs in one /train job of STEPS steps at LR (every weight, APOLLO): `dpo` (beta 0.1:
   the reference is the weights at the job's start), `orpo` (lambda 0.1), `sft` (the preferred replies alone).
3. Judged after, and once before: greedy chat answers to the held-out prompts (never trained on): the share that
   is one finished sentence, and the mean sentence count; knowledge kept: research/data/facts_real.json's
   general-knowledge questions (only those the untrained model answered right count, facts_real.py's matching);
   perplexity on held-out amygdala_stories paragraphs; the trainer's seconds per step.

    python research/preference_real.py                      # SmolLM2 (plasticity pretrained smollm2-135m-instruct)
    python research/preference_real.py --methods dpo --report
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "preference_real.json"
NAME = "preference_real"
DEFAULT_MODEL = "smollm2-135m-instruct"
METHODS = {"dpo": {"objective": "dpo", "beta": 0.1}, "orpo": {"objective": "orpo", "lambda": 0.1}, "sft": {"objective": "sft"}}
SAMPLES, REPLY_TOKENS, STEPS, LR, SEED = 6, 64, 10, 5e-5, 0
# Sampling for the pairs: at temperature 1.0 the 135M model's replies were often incoherent (the first run's
# preferred replies: "Landscapes are painted red**leafypapers ..."), and at 64 tokens most were cut before
# their end, so 11 of 32 prompts gave a pair; 0.7 and 128 tokens keep them on topic and let them finish.
SAMPLE_TEMPERATURE, SAMPLE_TOKENS = 0.7, 128
HELD_OUT_TEXTS = 8
SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")


# ---- the judge and the pairs (pure; tests/test_preference_real_units.py) -------------------------------------

def sentences(text: str) -> int:
    """Sentences in a reply: runs of . ! ? followed by a space or the end close one; text after the last
    close is one more (a truncated reply's unfinished sentence counts)."""
    text = text.strip()
    if not text:
        return 0
    closes = list(SENTENCE_END.finditer(text))
    tail = text[closes[-1].end():].strip() if closes else text
    return len(closes) + (1 if tail else 0)


def one_sentence(text: str, finished: bool) -> bool:
    """The behaviour: a finished reply of exactly one sentence."""
    return finished and sentences(text) == 1


def make_pair(replies: list[tuple[str, bool]]) -> tuple[str, str] | None:
    """(preferred, rejected) among one prompt's sampled (text, finished) replies: the finished reply with the
    fewest sentences against the reply with the most (an unfinished one counts one more); None when no
    finished reply has fewer sentences than the longest."""
    count = lambda r: sentences(r[0]) + (0 if r[1] else 1)  # noqa: E731
    finished = [r for r in replies if r[1] and r[0].strip()]
    if not finished:
        return None
    best, worst = min(finished, key=count), max(replies, key=count)
    return (best[0], worst[0]) if count(best) < count(worst) else None


# ---- the run ------------------------------------------------------------------------------------------------

class PreferenceLab:
    """Chat sampling and judging on top of facts_real's FactsLab (prompts through the chat template)."""

    def __init__(self, lab) -> None:
        from facts_real import FactsLab

        self.lab, self.facts = lab, FactsLab(lab)

    def chat(self, prompt: str, n: int = 1, temperature: float = 0.0, seed: int | None = None,
             max_tokens: int = REPLY_TOKENS) -> list[tuple[str, bool]]:
        body = {"model": self.lab.model, "messages": [{"role": "user", "content": prompt}], "n": n,
                "temperature": temperature, "max_tokens": max_tokens, **({"seed": seed} if seed is not None else {})}
        out = self.lab.post("/v1/chat/completions", body)["choices"]
        return [(c["message"]["content"], c["finish_reason"] == "stop") for c in out]

    def pairs(self, prompts: list[str]) -> list[dict]:
        def one(i_prompt):
            i, prompt = i_prompt
            replies = self.chat(prompt, n=SAMPLES, temperature=SAMPLE_TEMPERATURE, seed=SEED + i, max_tokens=SAMPLE_TOKENS)
            pair = make_pair(replies)
            return {"prompt": prompt, "replies": replies, "pair": pair}
        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(one, enumerate(prompts)))

    def behaviour(self, prompts: list[str]) -> dict:
        with ThreadPoolExecutor(8) as pool:
            replies = [r[0] for r in pool.map(self.chat, prompts)]
        return {"replies": dict(zip(prompts, [text for text, _ in replies])),
                "one_sentence": sum(one_sentence(t, f) for t, f in replies) / len(replies),
                "mean_sentences": sum(sentences(t) for t, _ in replies) / len(replies),
                "mean_words": sum(len(t.split()) for t, _ in replies) / len(replies)}

    def evaluate(self, data: dict, facts_data: dict, held_out: list[str]) -> dict:
        t0 = time.monotonic()
        out = {"behaviour": self.behaviour(data["held_out"]), **self.facts.evaluate(facts_data, held_out)}
        b = out["behaviour"]
        print(f"[{NAME}] judged in {time.monotonic() - t0:.0f} s: one sentence {b['one_sentence']:.0%}, "
              f"{b['mean_sentences']:.2f} sentences, {b['mean_words']:.1f} words", flush=True)
        return out

    def samples(self, pairs: list[dict], method: str) -> list[dict]:
        fl = self.facts
        if method == "sft":
            return [{"context_ids": fl.prompt(p["prompt"]), "continuation_ids": fl.reply_ids(p["pair"][0])} for p in pairs]
        return [{"context_ids": fl.prompt(p["prompt"]), "chosen_ids": fl.reply_ids(p["pair"][0]),
                 "rejected_ids": fl.reply_ids(p["pair"][1])} for p in pairs]


def run_method(pl: PreferenceLab, method: str, pairs: list[dict], steps: int, lr: float, data, facts_data,
               held_out, strength: float | None = None) -> dict:
    settings = dict(METHODS[method])
    if strength is not None and method != "sft":  # dpo's beta, orpo's lambda
        settings["beta" if method == "dpo" else "lambda"] = strength
    body = {"samples": pl.samples(pairs, method), "steps": steps, "force": True, "rollback": False,
            "optimizer": {"lr": lr}, **settings}
    t0 = time.monotonic()
    job = pl.lab.post("/train", body)
    detail = pl.lab.get(f"/train/status/{job['job_id']}")
    run = {"method": method, "settings": settings, "lr": lr, "steps": job["steps"], "losses": job["losses"],
           "margins": job.get("margins"), "step_seconds": detail["step_seconds"], "tokens": job["tokens"],
           "all_tokens": sum(len(s["context_ids"]) + sum(len(s[k]) for k in ("continuation_ids", "chosen_ids", "rejected_ids")
                                                           if k in s) for s in body["samples"]),
           "train_seconds": time.monotonic() - t0}
    run["after"] = pl.evaluate(data, facts_data, held_out)
    print(f"[{NAME}] {method}: losses {[round(x, 3) for x in job['losses']]}", flush=True)
    return run


def summarise(run: dict, base: dict) -> dict:
    after = run["after"]
    kept = [q for q, ok in base["questions"].items() if ok]
    still = sum(1 for q in kept if after["questions"].get(q))
    step = sum(run["step_seconds"]) / len(run["step_seconds"])
    return {"one_sentence_before": base["behaviour"]["one_sentence"], "one_sentence": after["behaviour"]["one_sentence"],
            "sentences_before": base["behaviour"]["mean_sentences"], "sentences": after["behaviour"]["mean_sentences"],
            "words": after["behaviour"]["mean_words"], "kept": still, "kept_of": len(kept),
            "kept_fraction": still / len(kept) if kept else math.nan, "ppl_before": base["ppl"], "ppl_after": after["ppl"],
            "ppl_rise": after["ppl"] / base["ppl"] - 1, "step_seconds": step,
            "tokens_per_s": run["all_tokens"] / step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help=f"model name or directory with a chat template (default {DEFAULT_MODEL})")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--lr", type=float, default=LR, help="a run at another lr is kept beside the default's")
    parser.add_argument("--strength", type=float, default=None,
                        help="dpo's beta / orpo's lambda instead of 0.1 (such a run is kept beside the default's)")
    parser.add_argument("--report", action="store_true", help="only rewrite the report from the json")
    parser.add_argument("--out-dir", default=None)
    from lab import RESULTS, add_server_args

    add_server_args(parser)
    args = parser.parse_args()
    out_dir = Path(args.out_dir) if args.out_dir else RESULTS
    path = out_dir / f"{NAME}.json"
    results = json.loads(path.read_text()) if path.exists() else {"methods": {}}
    if not args.report:
        from lab import write_results

        results = collect(args, results)
        write_results(NAME, out_dir, results)
    print(write_report_from(results, out_dir).read_text())


def collect(args, results: dict) -> dict:
    from facts_real import load_data
    from forgetting import stories
    from lab import Lab

    from plasticity_training.pretrained import resolve_model

    names = args.methods.split(",")
    if unknown := [n for n in names if n not in METHODS]:
        raise ValueError(f"unknown methods {unknown}; valid: {list(METHODS)}")
    data, facts_data = json.loads(DATA.read_text()), load_data(False)
    held_out = stories(HELD_OUT_TEXTS, seed=0)
    with Lab(resolve_model(args.model or DEFAULT_MODEL), server=args.server, api_key=args.api_key) as lab:
        pl = PreferenceLab(lab)
        if results.get("model") != lab.model or "base" not in results:
            results = {"model": lab.model, "methods": {}, "base": pl.evaluate(data, facts_data, held_out)}
            t0 = time.monotonic()
            results["sampled"] = pl.pairs(data["train"])
            print(f"[{NAME}] sampled {SAMPLES} replies to each of {len(data['train'])} prompts in "
                  f"{time.monotonic() - t0:.0f} s", flush=True)
        pairs = [p for p in results["sampled"] if p["pair"]]
        from lab import command

        results["runs"] = [*results.get("runs", []), command()]  # the report's header names only the last command
        results.update(steps=args.steps, lr=LR, samples_per_prompt=SAMPLES, pairs=len(pairs),
                       train_prompts=len(data["train"]), held_out_prompts=len(data["held_out"]),
                       questions=len(facts_data["questions"]), held_out_texts=len(held_out))
        for i, name in enumerate(names):
            if i:
                lab.restart()
            run = run_method(pl, name, pairs, args.steps, args.lr, data, facts_data, held_out, args.strength)
            run["summary"] = summarise(run, results["base"])
            key = name + ("" if args.lr == LR else f", lr {args.lr:g}") + (
                "" if args.strength is None or name == "sft" else f", {'beta' if name == 'dpo' else 'lambda'} {args.strength:g}")
            results["methods"][key] = run
            print(f"[{NAME}] {key}: {json.dumps(run['summary'])}", flush=True)
    return results


# ---- the report ---------------------------------------------------------------------------------------------

HYPOTHESIS = __doc__.split("Hypothesis (stated before the first run; the report repeats it): ")[1].split("\n\n")[0]


def write_report_from(results: dict, out_dir: Path) -> Path:
    from lab import table, write_report

    methods, base = results.get("methods", {}), results.get("base", {})
    rows = [[name, f"{100 * s['one_sentence_before']:.0f}% -> {100 * s['one_sentence']:.0f}%",
             f"{s['sentences_before']:.2f} -> {s['sentences']:.2f}", f"{s['words']:.1f}",
             f"{s['kept']}/{s['kept_of']} ({100 * s['kept_fraction']:.1f}%)",
             f"{s['ppl_before']:.3f} -> {s['ppl_after']:.3f} ({100 * s['ppl_rise']:+.2f}%)",
             f"{r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}", round(s["step_seconds"], 2), round(s["tokens_per_s"], 1)]
            for name, r in methods.items() for s in [r["summary"]]]
    header = ["method", "held-out answers in one sentence", "sentences per answer", "words per answer",
              "questions still right", "held-out perplexity", "loss", "s per step", "tokens/s"]
    sampled = results.get("sampled", [])
    pair_rows = [[p["prompt"], f"{sentences(p['pair'][0])} / {sentences(p['pair'][1])}", repr(p["pair"][0][:90])]
                 for p in sampled[:6] if p["pair"]]
    answer_rows = [[q, repr(base.get("behaviour", {}).get("replies", {}).get(q, "")[:80]),
                    *[repr(r["after"]["behaviour"]["replies"][q][:80]) for r in methods.values()]]
                   for q in list(base.get("behaviour", {}).get("replies", {}))[:4]]
    if methods:
        plot(out_dir / f"{NAME}.png", results)
    body = f"""
Hypothesis (stated before the run): {HYPOTHESIS}

Runs that wrote these results: {"; ".join(f"`{c}`" for c in results.get("runs", [])) or "(none recorded)"}.

Setup: model {results.get('model')}; {results.get('train_prompts')} train prompts sampled {results.get('samples_per_prompt')}
times each (chat, temperature {SAMPLE_TEMPERATURE}, {SAMPLE_TOKENS} tokens) by the untrained model; {results.get('pairs')} gave a pair
(the finished reply with the fewest sentences preferred to the reply with the most). Each method: one /train job of
{results.get('steps')} steps at lr {results.get('lr')} (unless the method's name says another) over all pairs, every
weight (APOLLO rank 64), fp32, a fresh server.
Judged on {results.get('held_out_prompts')} held-out prompts (greedy chat, {REPLY_TOKENS} tokens: one sentence = a
finished reply with one sentence), {results.get('questions')} general-knowledge questions (only those answered right
before count) and {results.get('held_out_texts')} held-out paragraphs' perplexity.

{table(header, rows) if rows else "(no method run yet)"}

![behaviour against knowledge kept]({NAME}.png)

Reading (computed from the table): {reading(methods)}

Pairs (first prompts; sentences preferred / rejected, and the preferred reply):

{table(["prompt", "sentences", "preferred"], pair_rows) if pair_rows else "(none)"}

Held-out answers, before and after each method ({", ".join(methods)}):

{table(["prompt", "before", *methods], answer_rows) if answer_rows else "(none)"}

What one seed and 2 CPU cores can and cannot show: one sampling seed, one job per method, one learning rate and
step budget; {results.get('held_out_prompts')} held-out prompts give the one-sentence share in steps of
{100 / max(1, results.get('held_out_prompts') or 1):.0f} points. Differences of a few points between methods are within what another seed
could move; the timings are the trainer's own on one core of a shared 2-core machine.
"""
    return write_report(NAME, out_dir, "Preference objectives on a real model: answering in one sentence", body)


def reading(methods: dict) -> str:
    """The hypothesis's claims checked against the runs: behaviour moved (most held-out answers one sentence),
    knowledge kept (>= 90% of the answers), perplexity within a few per cent (<= 5%)."""
    if not methods:
        return "nothing run yet."
    parts = []
    for name, r in methods.items():
        s = r["summary"]
        claims = [("most answers one sentence", s["one_sentence"] > 0.5), (">= 90% of answers kept", s["kept_fraction"] >= 0.9),
                  ("perplexity within 5%", s["ppl_rise"] <= 0.05)]
        held = [c for c, ok in claims if ok]
        failed = [c for c, ok in claims if not ok]
        parts.append(f"{name}: {100 * s['one_sentence']:.0f}% one sentence ({s['sentences']:.2f} sentences per answer), "
                     f"{100 * s['kept_fraction']:.1f}% kept, perplexity {100 * s['ppl_rise']:+.1f}%; "
                     f"held: {', '.join(held) or 'none'}; not: {', '.join(failed) or 'none'}")
    moved = [n for n, r in methods.items() if r["summary"]["one_sentence"] > 0.5]
    return "; ".join(parts) + (f". The behaviour moved with {', '.join(moved)} only." if moved else
                               ". No method moved the behaviour past half the answers.")


def plot(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    base = results["base"]["behaviour"]["one_sentence"]
    ax.scatter([1.0], [base], color="grey", label="before")
    for name, r in results["methods"].items():
        s = r["summary"]
        ax.scatter([s["kept_fraction"]], [s["one_sentence"]], label=name)
        ax.annotate(f"{name} (ppl {100 * s['ppl_rise']:+.1f}%)", (s["kept_fraction"], s["one_sentence"]), fontsize=8)
    ax.set_xlabel("general-knowledge answers kept")
    ax.set_ylabel("held-out answers in one sentence")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()

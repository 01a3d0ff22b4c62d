"""The bank format: concept vectors on disk, the contract between extraction and the server's readout,
and the one rule for where a bank fits in the server's readout table.

Any process (extraction writes banks; the API server checks them; vLLM's worker loads them). Imports torch
and safetensors, never vLLM.

    BANK_DIR/
      readout.safetensors   layer_<idx>.vectors: (n_concepts, hidden_size), one unit vector per concept
                            layer_<idx>.centre:  (hidden_size,)   calibrated banks only
                            layer_<idx>.scale:   (n_concepts,)    calibrated banks only, every entry > 0
                            layer_<idx>.steer:   (n_concepts, hidden_size)  calibrated banks, optional: each
                                                 concept's steering vector (natural units, below)
      readout.json          {"concepts": [...], "layers": [...], "hidden_size", "dtype", "model",
                             "method", "created", "calibration"?: {"centre": ..., "scale": ..., ...}}

The hidden state of layer L is the residual stream at the output of decoder layer L (before the final
norm), layers indexed from 0. A concept's raw score is the dot product of that state with its unit
vector v. A calibrated bank (readout.json has "calibration") also carries, per layer, a centre c (the
corpus's mean state, or its neutral baselines') and per concept a scale s > 0 (readout.json's
calibration.scale says how it was measured: "corpus_std", the corpus texts' standard deviation along v; banks
written before that say "own_texts_mean", the concept's own texts' mean projection beyond the centre), and
its score is

    calibrated = (h - c) . v / s        0: as the centre's texts on average, 1: one s beyond

the same for every concept, layer and model (calibrated_scores). Steering in natural units adds
strength * m, where m (the `steer` rows, readout.json's calibration.steer = "concept_mean_offset") is the
concept's own texts' mean state minus the centre: strength 1 moves a state as far, and the same way, as this
concept's texts lie from the average. Banks without `steer` rows add strength * s * v instead (what
calibrated banks did before; it raises the steered layer's calibrated score by `strength`:
natural_coefficients). Why two directions: the readout vector v is chosen to tell concepts apart (lda
whitens, so it points along directions the texts vary little in), which is not the direction the model's
states move in; on SmolLM2-135M-Instruct steering along s * v needed strength 32 to move tone, along m 4
(research/results/steering_real_lda_std.md, steering_real.md).
Row i of every layer's tensor belongs to `concepts[i]`. The extraction settings are kept in the
safetensors header metadata under "extraction" (a JSON string); a bank without calibration has exactly
the keys of MANIFEST_KEYS in readout.json and reads raw, as banks always did.

    >>> save_bank("bank", ["calm", "joy"], {12: vectors}, model="/models/x", method="pooled")
    >>> bank = load_bank("bank")
    >>> bank.vectors[12] @ hidden_state          # (n_concepts,) scores
    >>> free_columns([range(0, 100)], 100, capacity=256)   # where a 100-concept bank goes
    range(100, 200)
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import stat
from pathlib import Path

import torch
from torch import Tensor

from vllm_plasticity.contract.files import write_atomically, write_file_atomically

VECTORS_FILE = "readout.safetensors"
MANIFEST_FILE = "readout.json"
BANK_FILES = (MANIFEST_FILE, VECTORS_FILE)  # every file load_bank opens
UNIT_TOLERANCE = 1e-3  # |norm - 1| allowed on load (bf16 banks round to ~4e-3: stored fp32 here)
MAX_MANIFEST_BYTES = 16 * 2**20  # readout.json of 100k concepts with long names is ~5 MB; beyond: not a bank
MANIFEST_KEYS = ("concepts", "layers", "hidden_size", "dtype", "model", "method", "created")
CALIBRATION_KEY = "calibration"  # optional readout.json key: how the bank's centre and scales were measured


class BankError(ValueError):
    """A bank directory that does not follow the format; the message names the file and the fault."""


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What makes a bank's scores comparable across concepts, layers and models (module docstring)."""

    centre: dict[int, Tensor]  # layer -> (hidden,) the state a score of 0 stands for
    scale: dict[int, Tensor]  # layer -> (n_concepts,) > 0: the corpus's standard deviation along each vector
    info: dict  # readout.json's "calibration": how they were measured (centre source, pooling, texts)
    steer: dict[int, Tensor] | None = None  # layer -> (n_concepts, hidden): natural-unit steering vectors

    def offsets(self, vectors: dict[int, Tensor]) -> dict[int, Tensor]:
        """layer -> (n_concepts,) c . v: a constant per concept, so a calibrated score costs the raw dot
        product, one subtraction and one division (computed in float64: c . v can be large beside s)."""
        return {L: (vectors[L].double() @ self.centre[L].double()).float() for L in vectors}


@dataclasses.dataclass(frozen=True)
class Bank:
    concepts: list[str]
    layers: list[int]
    vectors: dict[int, Tensor]  # layer -> (n_concepts, hidden_size)
    hidden_size: int
    dtype: str
    model: str
    method: str
    created: str
    extraction: dict  # settings the extraction ran with (may be empty)
    calibration: Calibration | None = None  # None: raw scores and raw steering coefficients


def calibrated_scores(raw: Tensor, offset: Tensor, scale: Tensor) -> Tensor:
    """(raw - offset) / scale, broadcast over the leading dimensions: the one formula for a calibrated
    score from the raw dot products h . v (offset = c . v, Calibration.offsets)."""
    return (raw - offset) / scale


def natural_steering(strength: float, vector: Tensor, scale: float, steer_row: Tensor | None = None) -> Tensor:
    """What steering a concept by `strength` natural units adds to the stream at one layer: strength * its
    steer row, or, for a bank without steer rows, strength * s * v (`vector` its unit vector, `scale` s).
    The one rule, for the server's worker and the extraction's in-process steering alike."""
    if steer_row is not None:
        return strength * steer_row.to(vector.device, torch.float32)
    return float(natural_coefficients(float(strength), torch.tensor(float(scale)))) * vector


def natural_coefficients(strength: float, scale: Tensor) -> Tensor:
    """The raw steering coefficient per concept for `strength` in natural units: strength * s (adding
    strength * s * v raises that layer's calibrated score by `strength`)."""
    return strength * scale


def free_columns(taken: list[range], n: int, capacity: int) -> range | None:
    """Where a bank of `n` concepts goes in the readout table: the first free run of `n` columns beside
    the `taken` ones, or None. A bank needs one contiguous run (the tap reads it as one slice), so free
    columns scattered between banks do not add up; the API server and the worker both ask this."""
    start = 0
    for r in sorted(taken, key=lambda r: r.start):
        if r.start - start >= n:
            break
        start = max(start, r.stop)
    return range(start, start + n) if start + n <= capacity else None


def capacity_message(name: str, n: int, capacity: int) -> str:
    return (f"bank {name!r} has {n} concepts and no run of {n} free columns is left in the readout capacity "
            f"{capacity} (unload a bank, or raise PLASTICITY_READOUT_CAPACITY)")


def layer_key(layer: int, part: str = "vectors") -> str:
    """The safetensors key of a layer's `part`: vectors, centre, scale or steer."""
    return f"layer_{layer}.{part}"


def save_bank(path: str | os.PathLike, concepts: list[str], vectors: dict[int, Tensor], *, model: str, method: str,
              extraction: dict | None = None, created: str | None = None,
              calibration: Calibration | None = None) -> Path:
    """Write a bank (vectors are renormalised and stored fp32; `calibration`, when given, must measure
    the renormalised vectors at every layer). Files are replaced atomically, the safetensors file first,
    so a reader never sees a manifest naming layers the tensors lack."""
    from safetensors.torch import save_file

    path = Path(path)
    if not vectors:
        raise ValueError("Invalid vectors: no layer given")
    if len(set(concepts)) != len(concepts):
        raise ValueError(f"Invalid concepts: duplicate names in {concepts}")
    layers = sorted(vectors)
    hidden = None
    tensors = {}
    for L in layers:
        v = vectors[L].detach().float().cpu()
        if v.ndim != 2 or v.shape[0] != len(concepts) or (hidden is not None and v.shape[1] != hidden):
            raise ValueError(f"Invalid vectors for layer {L}: shape {tuple(v.shape)}, expected "
                             f"({len(concepts)}, {hidden if hidden is not None else 'hidden'})")
        if not torch.isfinite(v).all() or bool((v.norm(dim=1) == 0).any()):
            raise ValueError(f"Invalid vectors for layer {L}: a row is zero or not finite")
        hidden = v.shape[1]
        tensors[layer_key(L)] = (v / v.norm(dim=1, keepdim=True)).contiguous()
    if calibration is not None:
        for L in layers:
            centre, scale = _checked_calibration(calibration, L, len(concepts), hidden, ValueError, "Invalid calibration")
            tensors[layer_key(L, "centre")], tensors[layer_key(L, "scale")] = centre, scale
            if calibration.steer is not None:
                tensors[layer_key(L, "steer")] = _checked_steer(calibration.steer.get(L), L, len(concepts), hidden,
                                                                ValueError, "Invalid calibration")
    manifest = {
        "concepts": list(concepts),
        "layers": layers,
        "hidden_size": hidden,
        "dtype": "float32",
        "model": model,
        "method": method,
        "created": created or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if calibration is not None:
        manifest[CALIBRATION_KEY] = dict(calibration.info)
    path.mkdir(parents=True, exist_ok=True)
    metadata = {"extraction": json.dumps(extraction or {}, sort_keys=True)}
    write_file_atomically(path / VECTORS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    write_atomically(path / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    return path


def read_manifest(path: str | os.PathLike) -> dict:
    """The checked readout.json of bank directory `path`: a JSON object with every key of MANIFEST_KEYS,
    `concepts` a non-empty list of distinct non-empty strings, `layers` a non-empty list of distinct
    non-negative integers, `hidden_size` a positive integer. BankError names the file and the fault.

    Reads a regular file only, and never waits on one: a FIFO or device named readout.json is refused
    (opened non-blocking, checked before a byte is read), and so is one over MAX_MANIFEST_BYTES."""
    file = Path(path) / MANIFEST_FILE
    try:
        manifest = json.loads(_read_regular_file(file, MAX_MANIFEST_BYTES))
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested deeper than the parser goes
        raise BankError(f"{file}: not JSON ({str(e)[:200]})") from None
    if not isinstance(manifest, dict):
        raise BankError(f"{file}: must be a JSON object with keys {list(MANIFEST_KEYS)}, "
                        f"got a JSON {type(manifest).__name__}")
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise BankError(f"{file}: missing keys {missing}")
    concepts, layers, hidden = manifest["concepts"], manifest["layers"], manifest["hidden_size"]
    if not isinstance(concepts, list) or not all(isinstance(c, str) and c for c in concepts):
        raise BankError(f"{file}: concepts must be a list of non-empty strings, got {_short(concepts)}")
    if not isinstance(layers, list) or not all(_is_int(L) and L >= 0 for L in layers):
        raise BankError(f"{file}: layers must be a list of layer indices (integers >= 0), got {_short(layers)}")
    if not concepts or not layers:
        raise BankError(f"{file}: an empty bank ({len(concepts)} concepts, {len(layers)} layers)")
    if len(set(concepts)) != len(concepts):
        seen: set[str] = set()
        duplicates: set[str] = set()
        for c in concepts:
            (duplicates if c in seen else seen).add(c)
        raise BankError(f"{file}: duplicate concept names {sorted(duplicates)[:5]}")
    if len(set(layers)) != len(layers):
        raise BankError(f"{file}: duplicate layers in {_short(layers)}")
    if not _is_int(hidden) or hidden <= 0:
        raise BankError(f"{file}: hidden_size must be a positive integer, got {_short(hidden)}")
    if CALIBRATION_KEY in manifest and not isinstance(manifest[CALIBRATION_KEY], dict):
        raise BankError(f"{file}: {CALIBRATION_KEY} must be a JSON object (how the centre and scales were "
                        f"measured), got {_short(manifest[CALIBRATION_KEY])}")
    return manifest


def load_bank(path: str | os.PathLike) -> Bank:
    """Read and check a bank: the manifest (read_manifest), every listed layer present, shapes
    (n_concepts, hidden_size), unit rows; a calibrated bank's centre and scale at every layer, finite,
    scales > 0."""
    from safetensors import safe_open

    path = Path(path)
    for name in (VECTORS_FILE, MANIFEST_FILE):
        if not (path / name).is_file():
            raise BankError(f"{path / name}: missing or not a regular file (a bank is a directory with "
                            f"{VECTORS_FILE} and {MANIFEST_FILE})")
    manifest = read_manifest(path)
    concepts, layers, hidden = manifest["concepts"], manifest["layers"], manifest["hidden_size"]
    vectors = {}
    with safe_open(str(path / VECTORS_FILE), framework="pt") as f:
        extraction = json.loads((f.metadata() or {}).get("extraction", "{}"))
        keys = set(f.keys())
        for L in layers:
            if layer_key(L) not in keys:
                raise BankError(f"{path / VECTORS_FILE}: no tensor {layer_key(L)!r} for listed layer {L}")
            v = f.get_tensor(layer_key(L))
            if tuple(v.shape) != (len(concepts), hidden):
                raise BankError(f"{path / VECTORS_FILE}: {layer_key(L)} has shape {tuple(v.shape)}, "
                                f"expected ({len(concepts)}, {hidden})")
            norms = v.float().norm(dim=1)
            if not bool(((norms - 1).abs() <= UNIT_TOLERANCE).all()):
                worst = int((norms - 1).abs().argmax())
                raise BankError(f"{path / VECTORS_FILE}: {layer_key(L)} row {worst} ({concepts[worst]}) has norm "
                                f"{float(norms[worst]):.4f}, expected unit vectors")
            vectors[L] = v
        calibration = None
        if CALIBRATION_KEY in manifest:
            centre, scale = {}, {}
            # steer rows: at every layer or at none (a bank half with them would steer in two units)
            steer = {} if any(layer_key(L, "steer") in keys for L in layers) else None
            for L in layers:
                missing = [layer_key(L, part) for part in ("centre", "scale") if layer_key(L, part) not in keys]
                if missing:
                    raise BankError(f"{path / VECTORS_FILE}: readout.json says the bank is calibrated but "
                                    f"{missing} are missing")
                stored = Calibration({L: f.get_tensor(layer_key(L, "centre"))},
                                     {L: f.get_tensor(layer_key(L, "scale"))}, {})
                centre[L], scale[L] = _checked_calibration(stored, L, len(concepts), hidden, BankError,
                                                           str(path / VECTORS_FILE))
                if steer is not None:
                    if layer_key(L, "steer") not in keys:
                        raise BankError(f"{path / VECTORS_FILE}: steer rows at some layers but no "
                                        f"{layer_key(L, 'steer')!r}")
                    steer[L] = _checked_steer(f.get_tensor(layer_key(L, "steer")), L, len(concepts), hidden, BankError,
                                              str(path / VECTORS_FILE))
            calibration = Calibration(centre, scale, dict(manifest[CALIBRATION_KEY]), steer)
    return Bank(concepts=concepts, layers=layers, vectors=vectors, hidden_size=hidden, dtype=str(manifest["dtype"]),
                model=str(manifest["model"]), method=str(manifest["method"]), created=str(manifest["created"]),
                extraction=extraction, calibration=calibration)


def _checked_calibration(calibration: Calibration, layer: int, n_concepts: int, hidden: int, error: type,
                         where: str) -> tuple[Tensor, Tensor]:
    """Layer `layer`'s (centre, scale) as contiguous fp32, or `error` naming `where`, the layer and the
    fault: centre (hidden,) finite, scale (n_concepts,) finite and > 0 (a score divides by it)."""
    centre, scale = calibration.centre.get(layer), calibration.scale.get(layer)
    if centre is None or scale is None:
        raise error(f"{where}: no centre or scale for layer {layer}")
    centre, scale = centre.detach().float().cpu().contiguous(), scale.detach().float().cpu().contiguous()
    if tuple(centre.shape) != (hidden,) or tuple(scale.shape) != (n_concepts,):
        raise error(f"{where}: layer {layer} centre {tuple(centre.shape)} / scale {tuple(scale.shape)}, expected "
                    f"({hidden},) / ({n_concepts},)")
    if not bool(torch.isfinite(centre).all()) or not bool((torch.isfinite(scale) & (scale > 0)).all()):
        raise error(f"{where}: layer {layer} centre not finite, or a scale not a finite number > 0")
    return centre, scale


def _checked_steer(steer: Tensor | None, layer: int, n_concepts: int, hidden: int, error: type, where: str) -> Tensor:
    """Layer `layer`'s steer rows as contiguous fp32, or `error`: shape (n_concepts, hidden), finite."""
    if steer is None:
        raise error(f"{where}: no steer rows for layer {layer}")
    steer = steer.detach().float().cpu().contiguous()
    if tuple(steer.shape) != (n_concepts, hidden):
        raise error(f"{where}: layer {layer} steer {tuple(steer.shape)}, expected ({n_concepts}, {hidden})")
    if not bool(torch.isfinite(steer).all()):
        raise error(f"{where}: layer {layer} steer rows not finite")
    return steer


def _is_int(value: object) -> bool:
    """A JSON integer (never a bool: JSON `true` is not layer 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _read_regular_file(file: Path, limit: int) -> bytes:
    """The bytes of `file` (symlinks followed) if it is a regular file of at most `limit` bytes, else
    BankError. O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, forever."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise BankError(f"{file}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BankError(f"{file}: not a regular file")
        if info.st_size > limit:
            raise BankError(f"{file}: {info.st_size} bytes, more than a manifest may have ({limit})")
        data = f.read(limit + 1)
    if len(data) > limit:  # grew while being read
        raise BankError(f"{file}: more than {limit} bytes, more than a manifest may have")
    return data

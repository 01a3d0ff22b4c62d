"""Worker side of readout and steering: loaded banks, per-step batch bookkeeping, collected scores.

Runs in vLLM's worker process, driven by the worker-extension verbs (`plasticity_readout_*`) and by a
wrapper around the model runner's `_model_forward` (vLLM documents that method as the override point for
model execution; the worker extension installs the wrapper on its own runner when the first bank loads,
through vllm_patches.wrap_model_forward).

Per step, before the forward: each request in the batch is planned once from its `extra_args`
(`vllm_xargs` over HTTP): `readout` (a bank name), `signals` (true: the architecture's per-token signals),
`steer` ([bank/concept, coef, ...]), `steer_layers`, and `plasticity_key` (set by the API server, to find
the scores again). Its tokens' rows of `steer_index` point at the steering row for its settings. After the
forward: the score rows (and signal rows) of requests that asked for them are copied out, keyed by the
internal request id and the token's position in the sequence.

Two kinds of bank: concept banks (unit vectors in columns of the tap's `read` table, scored by one matmul,
at most PLASTICITY_READOUT_CAPACITY concepts in all; a calibrated bank's scores are then (raw - c.v) / s with
both constants per layer and concept fixed at load, one subtraction and one division on the copied block) and basis banks (standard basis e_a..e_b-1: their
scores are the stream's coordinates, copied from the tap's capture slots, one per layer, so a whole hidden
state of any width is read in one pass; what `plasticity extract --server` uses).

Nothing here raises into vLLM's step: an error in a request's plan fails that request's readout with the
reason; any other error before or after the forward (or in the tap during it) is logged, the step runs
unsteered and unread, and every readout request of the step gets the reason as its `error` (its readout
stops there; generation goes on, and so does every later step).

The V1 model runner (CPU, and GPU with VLLM_USE_V2_MODEL_RUNNER=0) lays a step out as contiguous rows per
request in `input_batch.req_ids` order with bounds in `query_start_loc`; the V2 runner (GPU default in
0.32) is not handled yet.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from vllm_plasticity.contract.bank import (Calibration, calibrated_scores, capacity_message, free_columns, load_bank,
                                           natural_steering)
from vllm_plasticity.residual_tap import TapBuffers
from vllm_plasticity.steer_spec import SteeringError, SteerTerm, check_steer
from vllm_plasticity.vllm_patches import wrap_model_forward

MAX_STORED_REQUESTS = 4096  # scores nobody fetched (client gone) are dropped oldest first beyond this

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedBank:
    name: str
    concepts: list[str]
    layers: list[int]
    columns: range | None  # a concept bank's columns of read[L], the same in each of its layers
    vectors: dict[int, torch.Tensor]  # concept bank: layer -> (n_concepts, hidden) fp32 unit rows, on the device
    digest: str  # identifies the vectors: steering cache salts change when a bank is replaced
    source: str
    method: str
    model: str
    hidden_size: int
    coordinates: range | None = None  # a basis bank's coordinates of the stream (no vectors are held)
    # Calibrated concept banks: per (layer in `layers` order, concept) c . v and the scale s, float32
    offset: np.ndarray | None = None
    scale: np.ndarray | None = None
    steer: dict[int, torch.Tensor] | None = None  # layer -> (n_concepts, hidden) natural-unit steering rows
    calibration: dict | None = None  # readout.json's "calibration" (how c and s were measured)

    @property
    def calibrated(self) -> bool:
        return self.offset is not None

    def natural_vector(self, strength: float, layer: int, row: int, device: torch.device) -> torch.Tensor:
        """What `strength` natural units of concept `row` add at `layer` (the contract's natural_steering)."""
        return natural_steering(strength, self.vector(layer, row, device), float(self.scale[self.layers.index(layer), row]),
                                None if self.steer is None else self.steer[layer][row])

    def vector(self, layer: int, row: int, device: torch.device) -> torch.Tensor:
        """Concept `row`'s unit vector at `layer` (a basis bank's is built when asked: a full basis of a
        large model would be hidden x hidden floats per layer)."""
        if self.coordinates is None:
            return self.vectors[layer][row]
        one_hot = torch.zeros(self.hidden_size, dtype=torch.float32, device=device)
        one_hot[self.coordinates.start + row] = 1.0
        return one_hot

    def info(self) -> dict:
        span = self.columns if self.coordinates is None else self.coordinates
        return {"name": self.name, "concepts": self.concepts, "layers": self.layers, "digest": self.digest,
                "kind": "concepts" if self.coordinates is None else "basis",
                ("columns" if self.coordinates is None else "coordinates"): [span.start, span.stop],
                "source": self.source, "method": self.method, "model": self.model, "hidden_size": self.hidden_size,
                "calibrated": self.calibrated, **({"calibration": self.calibration} if self.calibrated else {})}


@dataclasses.dataclass
class RequestPlan:
    key: str | None
    steer_row: int  # 0: not steered
    readout: LoadedBank | None
    wants_readout: bool = False  # asked for readout (even if the bank is gone: the error is reported)
    wants_signals: bool = False  # asked for the architecture's per-token signals
    error: str | None = None


@dataclasses.dataclass
class RequestScores:
    key: str | None
    bank: str
    layers: list[int]
    concepts: list[str]
    signals: list[str] = dataclasses.field(default_factory=list)  # signal names, when asked for
    # (first position, scores (n, layers, concepts), signals (n, signals)), a step's rows of this request
    blocks: list[tuple[int, np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)
    error: str | None = None
    digest: str = ""  # the bank version every score here was read with
    calibrated: bool = False  # scores are calibrated ((h - c) . v / s), not raw dot products

    def take(self) -> tuple[list[int], np.ndarray, np.ndarray]:
        """Positions, their scores (positions, layers, concepts) and signals (positions, signals) collected
        since the last take; a position computed twice (a preempted request recomputes its tokens) keeps its
        latest rows."""
        rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for first, scores, signals in self.blocks:
            for offset in range(len(scores)):
                rows[first + offset] = (scores[offset], signals[offset])
        self.blocks.clear()
        positions = sorted(rows)
        if not positions:
            return (positions, np.zeros((0, len(self.layers), len(self.concepts)), np.float32),
                    np.zeros((0, len(self.signals)), np.float32))
        return positions, np.stack([rows[p][0] for p in positions]), np.stack([rows[p][1] for p in positions])


def check_batch_layout(runner) -> None:
    """Refuse, with what to do, a model runner whose batch layout this engine cannot read: the wrapper
    would otherwise fail inside vLLM's step. It reads V1's layout (see the module docstring)."""
    missing = [name for name, ok in (
        ("_model_forward", callable(getattr(runner, "_model_forward", None))),
        ("requests", isinstance(getattr(runner, "requests", None), dict)),
        ("input_batch.req_ids", hasattr(getattr(runner, "input_batch", None), "req_ids")),
        ("input_batch.num_computed_tokens_cpu", hasattr(getattr(runner, "input_batch", None), "num_computed_tokens_cpu")),
        ("query_start_loc.np", hasattr(getattr(runner, "query_start_loc", None), "np")),
    ) if not ok]
    if missing:
        raise RuntimeError(f"readout and steering need vLLM's V1 model runner batch layout; {type(runner).__name__} "
                           f"lacks {missing}. On a GPU, vLLM 0.32 defaults to the V2 runner: start the server with "
                           "VLLM_USE_V2_MODEL_RUNNER=0 (plasticity serve sets it with --vectors-dir unless the environment already sets it)")


def steering_vectors(terms: list[SteerTerm], banks: dict[str, LoadedBank],
                     device: torch.device) -> tuple[tuple, dict[int, torch.Tensor]]:
    """(key identifying the settings and the vectors, layer -> the sum of what each term adds: coef * unit
    vector for raw units, the contract's natural_steering for natural ones)."""
    key, total = [], {}
    for bank_name, concept, coef, layers, natural in terms:
        bank = banks[bank_name]
        row = bank.concepts.index(concept)
        for L in layers:
            add = bank.natural_vector(coef, L, row, device) if natural else coef * bank.vector(L, row, device)
            total[L] = total[L] + add if L in total else add
        key.append((bank.digest, row, coef, natural, layers))
    return tuple(sorted(key)), total


class ReadoutEngine:
    """Banks loaded into the tap's buffers, steering rows, and the scores collected per request."""

    def __init__(self, buffers: TapBuffers, runner) -> None:
        self.buffers = buffers
        self.runner = runner
        self.banks: dict[str, LoadedBank] = {}
        self.generation = 0  # bumped on every load/unload: request plans made before are redone
        self.plans: dict[str, tuple[int, RequestPlan]] = {}
        self.steer_rows: OrderedDict[tuple, int] = OrderedDict()  # settings key -> row, least recent first
        self.store: OrderedDict[str, RequestScores] = OrderedDict()
        self._step_readouts: list[tuple[str, int, int, int, RequestPlan]] = []
        self._rows_this_step: set[int] = set()
        self._row_layers: dict[int, frozenset[int]] = {}  # steering row -> layers it steers
        self.stats = {"steps": 0, "bookkeeping_s": 0.0, "forward_s": 0.0}
        self._logged: set[str] = set()  # failures already logged with their traceback
        check_batch_layout(runner)
        self._original_forward = wrap_model_forward(runner, self._model_forward)  # vLLM's own, called below

    # ---- banks -------------------------------------------------------------------------------------

    def load(self, name: str, concepts: list[str], vectors: dict[int, torch.Tensor], *, source: str,
             method: str = "", model: str = "", calibration: Calibration | None = None) -> dict:
        """Load (or replace) bank `name`: unit rows per layer into free columns of the read table (and, for
        a calibrated bank, its per-layer, per-concept offset c . v and scale s, for the loaded layers)."""
        b = self.buffers
        hidden = {v.shape[1] for v in vectors.values()}
        if hidden != {b.hidden_size}:
            raise ValueError(f"bank {name!r} has hidden size {sorted(hidden)}, the model has {b.hidden_size}")
        bad = [L for L in vectors if not 0 <= L < b.num_layers]
        if bad:
            raise ValueError(f"bank {name!r} has layers {bad} outside the model's 0..{b.num_layers - 1}")
        for L, v in vectors.items():
            if v.shape[0] != len(concepts) or not torch.isfinite(v).all():
                raise ValueError(f"bank {name!r} layer {L}: shape {tuple(v.shape)} for {len(concepts)} concepts, "
                                 "or values that are not finite")
        old = self.banks.pop(name, None)
        columns = free_columns([x.columns for x in self.banks.values() if x.columns is not None], len(concepts),
                               b.capacity)
        if columns is None:
            if old is not None:
                self.banks[name] = old
            raise ValueError(capacity_message(name, len(concepts), b.capacity))
        if old is not None:
            self._clear(old)
            self._assign_capture_slots()
        digest = hashlib.sha256()
        unit = {}
        for L in sorted(vectors):
            v = vectors[L].detach().to(torch.float32).cpu()
            v = v / v.norm(dim=1, keepdim=True)
            digest.update(v.numpy().tobytes())
            unit[L] = v.to(b.read.device)
            b.write_read(L, columns, unit[L])
        offset = scale = steer = None
        if calibration is not None:  # the constants of calibrated_scores, in `sorted(vectors)` layer order
            at = sorted(vectors)
            offsets = calibration.offsets({L: unit[L].cpu() for L in at})
            offset = np.stack([offsets[L].numpy() for L in at]).astype(np.float32)  # (layers, concepts)
            scale = np.stack([calibration.scale[L].float().numpy() for L in at]).astype(np.float32)
            digest.update(offset.tobytes())
            digest.update(scale.tobytes())  # steering in natural units changes with the scale
            if calibration.steer is not None:
                steer = {L: calibration.steer[L].float().to(b.read.device) for L in at}
                for L in at:
                    digest.update(calibration.steer[L].float().numpy().tobytes())
        bank = LoadedBank(name, list(concepts), sorted(vectors), columns, unit, digest.hexdigest()[:16],
                          source, method, model, b.hidden_size, offset=offset, scale=scale, steer=steer,
                          calibration=dict(calibration.info) if calibration is not None else None)
        self.banks[name] = bank
        self._changed()
        return bank.info()

    def load_basis(self, name: str, start: int, stop: int, layers: list[int]) -> dict:
        """Load (or replace) basis bank `name`: coordinates start..stop-1 of the stream at `layers`, read
        from capture slots (no read capacity used; each layer needs a slot, shared by every basis bank
        at that layer)."""
        b = self.buffers
        if not 0 <= start < stop <= b.hidden_size:
            raise ValueError(f"basis [{start}, {stop}) is not inside the hidden size {b.hidden_size}")
        bad = [L for L in layers if not 0 <= L < b.num_layers]
        if not layers or bad:
            raise ValueError(f"basis bank {name!r} needs layers inside the model's 0..{b.num_layers - 1} (got {layers})")
        layers = sorted(set(layers))
        others = [x for n, x in self.banks.items() if n != name]
        b.assign_capture_slots({L for x in others if x.coordinates is not None for L in x.layers} | set(layers))
        old = self.banks.pop(name, None)
        if old is not None:
            self._clear(old)
        digest = hashlib.sha256(f"basis {start}:{stop} {layers}".encode()).hexdigest()[:16]
        bank = LoadedBank(name, [f"dim_{i}" for i in range(start, stop)], layers, None, {}, digest,
                          f"basis {start}:{stop}", "basis", "", b.hidden_size, coordinates=range(start, stop))
        self.banks[name] = bank
        self._changed()
        return bank.info()

    def bank_shapes(self) -> dict[str, tuple[list[str], list[int]]]:
        return {name: (b.concepts, b.layers) for name, b in self.banks.items()}

    def calibrated_banks(self) -> frozenset[str]:
        return frozenset(name for name, b in self.banks.items() if b.calibrated)

    def unload(self, name: str) -> bool:
        bank = self.banks.pop(name, None)
        if bank is not None:
            self._clear(bank)
            self._assign_capture_slots()
            self._changed()
        return bank is not None

    def _clear(self, bank: LoadedBank) -> None:
        if bank.columns is not None:
            for L in bank.layers:
                self.buffers.write_read(L, bank.columns, None)

    def _assign_capture_slots(self) -> None:
        """Capture slots for exactly the layers the loaded basis banks read (never more than before)."""
        self.buffers.assign_capture_slots({L for x in self.banks.values() if x.coordinates is not None
                                           for L in x.layers})

    def _changed(self) -> None:
        self.generation += 1
        self.steer_rows.clear()
        self._row_layers.clear()
        self.buffers.steer.zero_()
        self.buffers.read_width = max((x.columns.stop for x in self.banks.values() if x.columns is not None),
                                      default=0)

    # ---- per step ----------------------------------------------------------------------------------

    def _model_forward(self, *args, **kwargs):
        t0 = time.perf_counter()
        self._guarded(self._before_forward, "before the forward")
        t1 = time.perf_counter()
        output = self._original_forward(*args, **kwargs)  # vLLM's own errors are vLLM's: not caught here
        t2 = time.perf_counter()
        self._guarded(self._after_forward, "after the forward")
        self.stats["steps"] += 1
        self.stats["bookkeeping_s"] += (t1 - t0) + (time.perf_counter() - t2)
        self.stats["forward_s"] += t2 - t1
        return output

    def _guarded(self, bookkeeping, when: str) -> None:
        """Run one half of the per-step bookkeeping; an error is logged and fails the step's readout
        requests (_fail_step), never reaches vLLM's step."""
        try:
            bookkeeping()
        except Exception as exc:
            reason = (f"readout failed in the plugin's per-step bookkeeping ({when}): {type(exc).__name__}: {exc}; "
                      "this request's readout stops here (generation goes on)")
            self._log_once(reason, exc)
            try:
                self._fail_step(reason)
            except Exception as again:  # even the cleanup failed: the step must still run
                self._log_once(f"readout: could not fail the step's requests: {again!r}", again)

    def _fail_step(self, reason: str) -> None:
        """After an error in the bookkeeping: nothing of this step is steered or read (stale per-token rows
        must not steer other requests' tokens), and each readout request in it carries `reason` from now on."""
        b = self.buffers
        b.read_layers = b.capture_layers = b.steer_layers = frozenset()
        b.steer_index.zero_()
        self._step_readouts = []
        for req_id in list(self.runner.input_batch.req_ids):
            plan = self._plan(req_id)  # cached, or made now for a request the failed step had not reached
            if plan is not None and (plan.wants_readout or plan.wants_signals):
                plan.error = plan.error or reason  # the plan stays cached: later steps add no scores either
                self._entry(req_id, plan).error = plan.error

    def _log_once(self, message: str, exc: BaseException) -> None:
        """The traceback once per distinct failure (a fault that repeats every step would flood the log)."""
        if message not in self._logged:
            if len(self._logged) < 100:
                self._logged.add(message)
            logger.error("plasticity: %s", message, exc_info=exc)

    def take_stats(self) -> dict:
        """Steps since the last call, seconds in the forward (tap included) and in this class's own
        per-step bookkeeping around it; resets the counters."""
        stats, self.stats = self.stats, {"steps": 0, "bookkeeping_s": 0.0, "forward_s": 0.0}
        return stats

    def _plan(self, req_id: str) -> RequestPlan | None:
        """The request's plan (None: it asks for neither readout nor steering), made once per bank
        generation and cached, so a step costs a dict lookup per request."""
        cached = self.plans.get(req_id)
        if cached is not None and cached[0] == self.generation:
            return cached[1]
        state = self.runner.requests.get(req_id)
        extra = getattr(getattr(state, "sampling_params", None), "extra_args", None) or {}
        plan = None
        if extra.get("readout") is not None or extra.get("steer") or extra.get("signals"):
            plan = RequestPlan(key=extra.get("plasticity_key"), steer_row=0, readout=None,
                               wants_readout=extra.get("readout") is not None,
                               wants_signals=bool(extra.get("signals")))
            try:
                if plan.wants_signals and not self.buffers.signal_names:
                    raise SteeringError("signals: the served architecture reports no per-token signals")
                if plan.wants_readout:
                    plan.readout = self.banks.get(str(extra["readout"]))
                    if plan.readout is None:
                        raise SteeringError(f"readout: no bank {extra['readout']!r} is loaded")
                    started = self.store.get(req_id)
                    if started is not None and started.digest and started.digest != plan.readout.digest:
                        # A request keeps the bank version it started with: scores from another version
                        # would not fit the labels (concepts, layers) it already reported.
                        plan.readout = None
                        plan.error = (f"readout: bank {started.bank!r} was replaced while this request ran; its "
                                      "scores stop at the replacement (every score returned is from the version "
                                      "the request started with)")
                if extra.get("steer"):
                    terms = check_steer(extra["steer"], extra.get("steer_layers"), self.bank_shapes(),
                                        extra.get("steer_units"), self.calibrated_banks())
                    plan.steer_row = self._steer_row(*steering_vectors(terms, self.banks, self.buffers.steer.device))
            except SteeringError as exc:
                plan.error = str(exc)
            except Exception as exc:  # not the request's fault: log it; its readout fails, the step goes on
                plan.steer_row = 0
                plan.error = (f"readout/steering could not be set up for this request: {type(exc).__name__}: "
                              f"{exc}; it runs unsteered and unread (generation goes on)")
                self._log_once(plan.error, exc)
        self.plans[req_id] = (self.generation, plan)
        return plan

    def _steer_row(self, key: tuple, vectors: dict[int, torch.Tensor]) -> int:
        rows = self.steer_rows
        if key in rows:
            rows.move_to_end(key)
            return rows[key]
        b = self.buffers
        in_use = set(rows.values())
        free = [r for r in range(1, b.steer_rows) if r not in in_use]
        if free:
            row = free[0]
        else:  # reuse the least recently planned settings' row, unless this step already uses it
            victims = [k for k, r in rows.items() if r not in self._rows_this_step]
            if not victims:
                raise SteeringError(f"more than {b.steer_rows - 1} distinct steering settings in one batch "
                                    "(raise PLASTICITY_STEER_SLOTS)")
            row = rows.pop(victims[0])
            # Requests planned onto that row are planned again when they next run.
            for req_id in [r for r, (_, p) in self.plans.items() if p is not None and p.steer_row == row]:
                del self.plans[req_id]
        b.steer[:, row] = 0
        for L, v in vectors.items():
            b.steer[L, row] = v
        rows[key] = row
        self._row_layers[row] = frozenset(vectors)
        return row

    def _before_forward(self) -> None:
        runner, b = self.runner, self.buffers
        self._step_readouts = []
        b.failure = None
        req_ids = list(runner.input_batch.req_ids)
        bounds = runner.query_start_loc.np[: len(req_ids) + 1]
        computed = runner.input_batch.num_computed_tokens_cpu
        self._rows_this_step = set()
        plans = []
        for req_id in req_ids:
            plan = self._plan(req_id)
            plans.append(plan)
            if plan is not None and plan.steer_row:
                self._rows_this_step.add(plan.steer_row)  # before later requests may evict rows
        self._step_readouts = [(req_id, int(bounds[i]), int(bounds[i + 1]), int(computed[i]), plan)
                               for i, (req_id, plan) in enumerate(zip(req_ids, plans))
                               if plan is not None and (plan.wants_readout or plan.wants_signals)]
        # Only the layers some request in this step reads: loaded banks cost nothing until asked for.
        read = [plan.readout for *_, plan in self._step_readouts if plan.readout]
        b.read_layers = frozenset(L for bank in read if bank.columns is not None for L in bank.layers)
        b.capture_layers = frozenset(L for bank in read if bank.coordinates is not None for L in bank.layers)
        b.steer_layers = frozenset(L for row in self._rows_this_step for L in self._row_layers.get(row, ()))
        b.steer_index.zero_()
        if b.steer_layers:  # each token gets its request's steering row
            rows = np.fromiter((p.steer_row if p is not None else 0 for p in plans), np.int64, len(plans))
            index = np.repeat(rows, np.diff(bounds))
            b.steer_index[: len(index)].copy_(torch.from_numpy(index))
        if len(self.plans) > len(req_ids):  # forget requests that finished
            for req_id in [r for r in self.plans if r not in runner.requests]:
                del self.plans[req_id]

    def _after_forward(self) -> None:
        b = self.buffers
        if b.failure is not None:  # the tap caught an error during the forward: this step's scores are not whole
            raise RuntimeError(f"the residual tap failed during the forward at {b.failure}")
        if not self._step_readouts:
            return
        # One copy out of the score buffer per step (rows and columns in use), then one slice per bank
        # and a view per request: the per-request work is a lookup and an append.
        tokens = max(stop for _, _, stop, _, _ in self._step_readouts)
        read, captured = sorted(b.read_layers), sorted(b.capture_layers)
        at = {L: i for i, L in enumerate(read)}
        at_captured = {L: i for i, L in enumerate(captured)}
        # advanced indexing: copies (the next step overwrites the buffers)
        host = b.scores[read, :tokens, : b.read_width].cpu().numpy() if read else None
        host_captured = (b.captured[[b.capture_slot_of[L] for L in captured], :tokens].cpu().numpy()
                         if captured else None)
        signals = b.signals[:tokens].to("cpu", copy=True).numpy()  # a copy: the next step overwrites the buffer
        none = np.zeros((tokens, 0), np.float32)
        by_bank: dict[str, list] = {}
        for item in self._step_readouts:
            by_bank.setdefault(item[4].readout.name if item[4].readout else "", []).append(item)
        for name, items in by_bank.items():
            bank = items[0][4].readout
            if bank is not None:
                token_rows = np.concatenate([np.arange(start, stop) for _, start, stop, _, _ in items])
                if bank.coordinates is None:
                    source, cols = host[[at[L] for L in bank.layers]], bank.columns
                else:
                    source, cols = host_captured[[at_captured[L] for L in bank.layers]], bank.coordinates
                block = source[:, token_rows, cols.start:cols.stop].transpose(1, 0, 2)  # (tokens, layers, concepts)
                if bank.calibrated:  # (layers, concepts) constants broadcast over the tokens
                    block = calibrated_scores(block, bank.offset, bank.scale)
            offset = 0
            for req_id, start, stop, first_position, plan in items:
                entry = self._entry(req_id, plan)
                if plan.error:
                    entry.error = plan.error
                elif bank is not None or plan.wants_signals:
                    n = stop - start
                    scores = (block[offset: offset + n] if bank is not None
                              else np.zeros((n, 0, 0), np.float32))  # (tokens, layers, concepts)
                    entry.blocks.append((first_position, scores, (signals if plan.wants_signals else none)[start:stop]))
                offset += stop - start

    def _entry(self, req_id: str, plan: RequestPlan) -> RequestScores:
        """The request's collected scores, created on its first step (labelled with its bank as planned)."""
        entry = self.store.get(req_id)
        if entry is None:
            bank = plan.readout
            entry = RequestScores(plan.key, bank.name if bank else "", bank.layers if bank else [],
                                  bank.concepts if bank else [], digest=bank.digest if bank else "",
                                  signals=list(self.buffers.signal_names) if plan.wants_signals else [],
                                  calibrated=bool(bank and bank.calibrated))
            self.store[req_id] = entry
            while len(self.store) > MAX_STORED_REQUESTS:
                self.store.popitem(last=False)
        return entry

    # ---- results -----------------------------------------------------------------------------------

    def fetch(self, key: str, final: bool) -> dict[str, dict]:
        """Scores collected for the requests tagged `key`, by internal request id, and forget them.

        {req_id: {"bank", "layers", "concepts", "calibrated", "positions", "scores", "shape", "signals"?,
        "signal_names"?, "error"?}}, scores as raw little-endian float32 bytes of `shape` (positions, layers, concepts) and
        signals (when asked for) as the same bytes of (positions, signals): msgpack carries bytes cheaply,
        lists of floats slowly. `final` also drops the entries (the response is complete), otherwise only
        the positions returned (streaming).
        """
        out = {}
        for req_id in [r for r, e in self.store.items() if e.key == key]:
            entry = self.store[req_id]
            positions, scores, signals = entry.take()
            scores = np.ascontiguousarray(scores, dtype="<f4")
            out[req_id] = {"bank": entry.bank, "layers": entry.layers, "concepts": entry.concepts,
                           "calibrated": entry.calibrated, "positions": positions, "scores": scores.tobytes(), "shape": list(scores.shape),
                           **({"error": entry.error} if entry.error else {})}
            if entry.signals:
                out[req_id].update(signal_names=entry.signals,
                                   signals=np.ascontiguousarray(signals, dtype="<f4").tobytes())
            if final:
                del self.store[req_id]
        return out


def read_bank_files(path: Path) -> tuple[list[str], dict[int, torch.Tensor], dict]:
    """Read a bank directory with the contract's loader (one format, one reader)."""
    bank = load_bank(path)
    return bank.concepts, dict(bank.vectors), {"method": bank.method, "model": bank.model,
                                               "calibration": bank.calibration}

"""The residual tap: one custom op after every decoder layer, reading and steering the residual stream.

Runs in vLLM's worker process. Definitions (README "Readout and steering"): the hidden state of layer L is
the residual stream at the output of decoder layer L, before the final norm; in vLLM's layers that is
`hidden_states + residual` after the layer's `forward`. Steering adds a vector to `residual` (so the next
layer's fused add-norm, or the final norm, sees it); the readout score of a concept is the dot product of
the (steered) stream with the concept's unit vector.

Why a custom op on fixed buffers: the layers run inside `@support_torch_compile`, where forward hooks never
fire. `plasticity::residual_tap` is registered with vLLM's `direct_register_custom_op`, so inductor keeps it
opaque, and it touches only tensors allocated once, before compilation and CUDA-graph capture:

    read[L]        (hidden, capacity)      fp32  concept unit vectors of the banks loaded at layer L, one per
                                                 column (else 0): the product with the first `width` columns
                                                 then reads contiguous rows (on one CPU core, 16 tokens x 576
                                                 hidden x 32 concepts, stream + product + store per layer:
                                                 62 us with vectors as rows, 40 as columns, 27 from a
                                                 contiguous copy of the columns in use, which eager steps keep)
    scores[L]      (max_tokens, capacity)  fp32  this step's scores, row = token in the batch
    steer[L]       (steer_rows, hidden)    fp32  steering vectors; row 0 is zero ("not steered")
    steer_index    (max_tokens,)           int64 each token's steering row
    captured[s]    (max_tokens, hidden)    fp32  the raw stream of the layer given capture slot s (basis
                                                 banks: extraction reads whole hidden states in one pass,
                                                 whatever the hidden size, without using read capacity)
    capture_slot   (layers,)               int64 each layer's capture slot; layers without one point at
                                                 a spare slot (CUDA only) that graph replays write to
    signals        (max_tokens, signals)   fp32  per-token signals an architecture reports (SYNTHE's Kalman
                                                 confidence, probe gate, ...), written by its forward; none
                                                 for the transformers

The worker (readout_worker.py) fills `steer_index`, `read` and `steer` between steps and copies scores
out after each forward. When the op runs eagerly (CPU, --enforce-eager, torch.compile without CUDA
graphs) it skips layers no request in the step reads or steers; while a CUDA graph is being captured
it always emits the full kernels, because a replayed graph cannot branch on state loaded after capture.

The tap exists only when banks can be loaded (PLASTICITY_VECTORS_DIR set); otherwise the layers are
vLLM's own, with no op and no buffers. Memory: 4 * layers * (capacity * hidden + max_tokens * capacity +
steer_rows * hidden) bytes: about 2 MB per layer for the built-in model (2048 batched tokens), about
13 MB per layer for an 8B model (hidden 4096, 8k batched tokens) at the default capacity of 256
concepts (PLASTICITY_READOUT_CAPACITY lowers it); plus 4 * max_tokens * hidden bytes per capture slot
(CAPTURE_BUDGET_BYTES by default, at least one slot: all 4 layers of the built-in model, one layer of an
8B model at 8k batched tokens, 134 MB; PLASTICITY_CAPTURE_LAYERS sets the count).
"""

from __future__ import annotations

import functools

import torch
from torch.library import Library
from vllm.utils.torch_utils import direct_register_custom_op

from vllm_plasticity.vllm_patches import mark_compile_hash, retype_decoder_layers

CAPTURE_BUDGET_BYTES = 64 * 2**20  # default capture buffer: raw states of as many layers as this holds


class TapBuffers:
    """The fixed tensors the op reads and writes, plus which layers have work this step (eager only)."""

    def __init__(self, *, num_layers: int, hidden_size: int, max_tokens: int, capacity: int, steer_rows: int,
                 device: torch.device, signal_names: tuple[str, ...] = (), capture_slots: int = 1) -> None:
        f32 = dict(dtype=torch.float32, device=device)
        self.signal_names = tuple(signal_names)
        self.signals = torch.zeros(max_tokens, len(self.signal_names), **f32)
        self.num_layers, self.hidden_size, self.max_tokens = num_layers, hidden_size, max_tokens
        self.capacity, self.steer_rows = capacity, steer_rows
        self.read = torch.zeros(num_layers, hidden_size, capacity, **f32)
        self.scores = torch.zeros(num_layers, max_tokens, capacity, **f32)
        self.steer = torch.zeros(num_layers, steer_rows, hidden_size, **f32)
        self.steer_index = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        # A replayed CUDA graph writes every layer's stream somewhere: layers nobody captures write to a
        # spare slot. Eager runs (CPU) write only the layers captured this step and need no spare.
        self.capture_slots = capture_slots
        spare = 1 if torch.device(device).type == "cuda" else 0
        self.captured = torch.zeros(capture_slots + spare, max_tokens, hidden_size, **f32)
        self.capture_slot = torch.full((num_layers,), capture_slots, dtype=torch.int64, device=device)
        self.capture_slot_of: dict[int, int] = {}  # layer -> slot, for the layers basis banks are loaded at
        self.capture_layers: frozenset[int] = frozenset()  # eager: the layers captured this step
        # Eager-mode shortcuts, maintained by the worker per step: the layers some request in the batch
        # reads, the columns in use, and the layers some request in the batch steers.
        self.read_layers: frozenset[int] = frozenset()
        self._read_width = 0
        # Eager steps multiply by a contiguous copy of each read layer's columns in use (hidden, width),
        # made on first use after a change (see `read` above); dropped whenever the table or the width changes.
        self._read_in_use: dict[int, torch.Tensor] = {}
        self.steer_layers: frozenset[int] = frozenset()
        # Set by the op when tap() raised during this step's forward (the worker clears it before each
        # step and fails the step's readout requests with it after): never an error into vLLM's forward.
        self.failure: str | None = None

    def tap(self, hidden_states: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
        n = hidden_states.shape[0]
        capturing = hidden_states.is_cuda and torch.cuda.is_current_stream_capturing()
        if capturing or layer in self.steer_layers:
            index = self.steer_index[:n]  # (n,)
            steered = residual + self.steer[layer].index_select(0, index).to(residual.dtype)  # (n, hidden)
            # Keep every steered token's stream finite and bounded. A non-finite value would be written
            # into its KV-cache blocks, and vLLM's CPU attention reads stale slots of a reused block with
            # weight 0 (0 * NaN = NaN), so one request's NaN reached later, unrelated requests. Bounded by
            # stream_bound, the next layer's norm, K/V and logits stay finite. Unsteered rows are untouched.
            bound = stream_bound(residual.dtype, self.hidden_size)
            steered = torch.nan_to_num(steered, nan=0.0, posinf=bound, neginf=-bound).clamp_(-bound, bound)
            residual.copy_(torch.where((index != 0).unsqueeze(1), steered, residual))
        reads, captures = capturing or layer in self.read_layers, capturing or layer in self.capture_layers
        if reads or captures:
            stream = hidden_states.float() + residual.float()
        if capturing:  # every column; the slot is looked up on the device: a replay reads what is assigned later
            self.scores[layer, :n] = stream @ self.read[layer]
            self.captured[:, :n].index_copy_(0, self.capture_slot[layer:layer + 1], stream.unsqueeze(0))
            return
        if reads:
            table = self._read_in_use.get(layer)
            if table is None:
                table = self._read_in_use[layer] = self.read[layer, :, :self._read_width].contiguous()
            self.scores[layer, :n, :self._read_width] = stream @ table
        if captures:
            self.captured[self.capture_slot_of[layer], :n] = stream

    @property
    def read_width(self) -> int:
        """Columns of the read table in use (the highest column of a loaded bank + 1); eager steps read these."""
        return self._read_width

    @read_width.setter
    def read_width(self, width: int) -> None:
        self._read_width = width
        self._read_in_use.clear()

    def write_read(self, layer: int, columns: range, vectors: torch.Tensor | None) -> None:
        """Put `vectors` (concepts, hidden) into `columns` of layer `layer`'s read table; None clears them."""
        table = self.read[layer, :, columns.start:columns.stop]
        if vectors is None:
            table.zero_()
        else:
            table.copy_(vectors.T)
        self._read_in_use.clear()

    def assign_capture_slots(self, layers: set[int] | frozenset[int]) -> None:
        """Give each of `layers` (the layers basis banks are loaded at) a capture slot, keeping the slots
        of layers that keep theirs; ValueError when more layers than slots."""
        if len(layers) > self.capture_slots:
            raise ValueError(f"basis banks would read raw hidden states at {len(layers)} layers "
                             f"({sorted(layers)}); this server captures {self.capture_slots} at once "
                             "(unload a basis bank, or raise PLASTICITY_CAPTURE_LAYERS)")
        kept = {L: s for L, s in self.capture_slot_of.items() if L in layers}
        free = [s for s in range(self.capture_slots) if s not in kept.values()]
        self.capture_slot_of = {**kept, **{L: free.pop(0) for L in sorted(layers - kept.keys())}}
        self.capture_slot.fill_(self.capture_slots)
        for L, slot in self.capture_slot_of.items():
            self.capture_slot[L] = slot


def capture_slots(configured: int | None, num_layers: int, max_tokens: int, hidden_size: int) -> int:
    """Layers whose raw states one step can capture: `configured` (PLASTICITY_CAPTURE_LAYERS), else as many
    as CAPTURE_BUDGET_BYTES holds, at least one and at most the model's layers."""
    if configured:
        return min(configured, num_layers)
    return max(1, min(num_layers, CAPTURE_BUDGET_BYTES // (4 * max_tokens * hidden_size)))


def stream_bound(dtype: torch.dtype, hidden_size: int) -> float:
    """The largest |value| a steered token's residual stream keeps: an eighth of what both the stream's
    dtype and the next RMSNorm's float32 sum of squares (hidden_size terms) can hold. For fp32/bf16 and
    hidden 4096 that is about 4e16, so no real activation is ever clamped."""
    fp32_max = torch.finfo(torch.float32).max
    return min(torch.finfo(dtype).max, (fp32_max / hidden_size) ** 0.5) / 8


_buffers: TapBuffers | None = None


def install_buffers(buffers: TapBuffers | None) -> None:
    """Make `buffers` the ones the op uses in this process (the model's __init__ calls this)."""
    global _buffers
    _buffers = buffers


def current_buffers() -> TapBuffers | None:
    return _buffers


def install_buffers_for(vllm_config, num_layers: int, hidden_size: int, capacity: int, steer_slots: int,
                        signal_names: tuple[str, ...] = (), capture_layers: int | None = None) -> TapBuffers:
    """Size and install this process's buffers for a model of `num_layers` tapped streams of `hidden_size`
    (and the per-token `signal_names` it reports), from vLLM's scheduler limits (every model class that
    taps calls this from its __init__)."""
    # vLLM keys its on-disk compile cache by the config's hash, not by the layer classes: mark the config
    # so a graph compiled without the tap is never loaded for a tapped model (or the reverse).
    mark_compile_hash(vllm_config, "plasticity_residual_tap")
    scheduler = vllm_config.scheduler_config
    buffers = TapBuffers(
        num_layers=num_layers, hidden_size=hidden_size, max_tokens=scheduler.max_num_batched_tokens,
        capacity=capacity, steer_rows=min(steer_slots, scheduler.max_num_seqs) + 1,
        device=torch.device(vllm_config.device_config.device), signal_names=signal_names,
        capture_slots=capture_slots(capture_layers, num_layers, scheduler.max_num_batched_tokens, hidden_size))
    install_buffers(buffers)
    return buffers


def _residual_tap(hidden_states: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    if _buffers is None:
        return
    try:
        _buffers.tap(hidden_states, residual, layer)
    except Exception as exc:
        if hidden_states.is_cuda and torch.cuda.is_current_stream_capturing():
            raise  # a graph captured without the tap would fail silently on every replay: fail at startup
        # The stream is steered in full or not at all (tap() writes `residual` in one copy); the worker
        # fails the step's readout with the reason (TapBuffers.failure).
        _buffers.failure = _buffers.failure or f"layer {layer}: {type(exc).__name__}: {exc}"


def _residual_tap_fake(hidden_states: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    return None


_library = Library("plasticity", "FRAGMENT")  # kept alive: the op lives as long as this object
direct_register_custom_op("residual_tap", _residual_tap, mutates_args=["residual"], fake_impl=_residual_tap_fake,
                          target_lib=_library)


class ResidualTapMixin:
    """Put in front of a vLLM decoder-layer class: after the layer, call the tap with its outputs.

    The layers' `forward` takes `positions`, `hidden_states` and `residual` (Llama/Qwen2/Qwen3 in that
    order, Qwen3-Next as hidden_states, residual, positions) and returns `(hidden_states, residual)`; the
    stream after the layer is their sum. The call below passes them by name, so either order is served.
    """

    plasticity_layer: int

    def forward(self, positions, hidden_states, residual, **kwargs):
        hidden_states, residual = super().forward(positions=positions, hidden_states=hidden_states,
                                                  residual=residual, **kwargs)
        torch.ops.plasticity.residual_tap(hidden_states, residual, self.plasticity_layer)
        return hidden_states, residual


@functools.cache  # one class per layer class: isinstance checks and compiled graphs see one type
def tapped_layer_class(layer_class: type) -> type:
    """The subclass of `layer_class` that taps its output."""
    return type(f"Tapped{layer_class.__name__}", (ResidualTapMixin, layer_class), {})


def tap_layers(layers: torch.nn.ModuleList) -> None:
    """Make every decoder layer in `layers` a tapped one, in place (no new parameters, no copies), and
    give each its index (its position in the full list; pipeline stages hold placeholders elsewhere).

    Qwen2/Qwen3/Qwen3-Next layers get their class changed (vllm_patches.retype_decoder_layers says why);
    Llama takes `layer_type=` and is tapped from the start, so only the indices are set here.
    """
    for index, module in retype_decoder_layers(layers, ResidualTapMixin, tapped_layer_class):
        module.plasticity_layer = index

"""The memory a project architecture's configuration needs, and a refusal with the figure when the machine
cannot hold it. Imports torch, never vLLM or transformers.

Runs where a configuration is about to become tensors: vLLM's config hook (recurrent_config.py, in the API
server, before any process builds the model: weights in the served dtype plus per-request state for
`max_num_seqs` requests, against the device's memory) and the Hugging Face form's constructor (the trainer,
the builders, `plasticity import`: weights in the default dtype, against the machine's memory). Field
ranges are checked before this (config_fields.py), so an estimate only ever sees in-range sizes; what it
catches is a combination of them too large to hold (embedding_dim x linear_modes, d_model^2 x layers).

    parameters  counted by building the architecture's modules on the meta device: nothing is allocated,
                and the count is the model's own, so it cannot drift from the code
    state       the shape's per-request state (`state_shapes()`), float32 in both forms

    >>> require_fits(shape, dtype=torch.bfloat16, sequences=256, available=64 << 30, where="the GPU")
    ConfigTooLarge: the tkc configuration needs 40.3 GiB: ...
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os

import torch
from torch import nn

STATE_DTYPE = torch.float32  # RecurrentStateLayer's state tensors and the HF form's zero_states


class ConfigTooLarge(ValueError):
    """A configuration whose weights and state do not fit the memory it would run in; the message gives both
    figures and the largest tensor."""


@dataclasses.dataclass(frozen=True)
class Footprint:
    parameters: int  # elements of every parameter and buffer
    largest: tuple[str, tuple[int, ...]]  # the largest parameter's name and shape: what to shrink first
    weight_bytes: int
    state_bytes_per_request: int
    sequences: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.state_bytes_per_request * self.sequences


def footprint(shape, dtype: torch.dtype, sequences: int) -> Footprint:
    """Weights in `dtype` (the architecture's modules built on the meta device) and `sequences` requests'
    state for a shape from any of the project's config modules (its MODULES names the modules mixin)."""
    holder = _meta_build(shape)
    tensors = [*holder.named_parameters(), *holder.named_buffers()]
    name, largest = max(tensors, key=lambda item: item[1].numel(), default=("(none)", torch.empty(0, device="meta")))
    elements = sum(t.numel() for _, t in tensors)
    state = sum(math.prod(s) for s in shape.state_shapes()) * STATE_DTYPE.itemsize
    return Footprint(parameters=elements, largest=(name, tuple(largest.shape)), weight_bytes=elements * dtype.itemsize,
                     state_bytes_per_request=state, sequences=sequences)


def require_fits(shape, dtype: torch.dtype, sequences: int, available: int, where: str) -> Footprint:
    """The footprint, or ConfigTooLarge naming the figures when it exceeds `available` bytes."""
    need = footprint(shape, dtype, sequences)
    if need.total_bytes > available:
        name, dims = need.largest
        raise ConfigTooLarge(
            f"the {_arch(shape)} configuration needs {size(need.total_bytes)}, more than {where} holds "
            f"({size(available)}): {need.parameters:,} weights x {dtype.itemsize} bytes ({str(dtype).removeprefix('torch.')}) "
            f"= {size(need.weight_bytes)}, plus per-request state {size(need.state_bytes_per_request)} x "
            f"{sequences} sequences = {size(need.state_bytes_per_request * sequences)}; the largest weight is "
            f"{name} {list(dims)}")
    return need


def require_fits_in_host_memory(shape) -> None:
    """Before the Hugging Face form allocates its weights (default dtype, one request's state): refused when
    the machine's physical memory cannot hold them. A meta-device build allocates nothing: not checked."""
    if torch.empty(0).device.type == "meta":
        return
    require_fits(shape, torch.get_default_dtype(), 1, host_memory(), "this machine's memory")


def host_memory() -> int:
    """Physical memory in bytes (the whole machine; POSIX)."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def size(n: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _meta_build(shape) -> nn.Module:
    module, _, name = shape.MODULES.partition(":")
    mixin = getattr(importlib.import_module(module), name)
    holder = type(f"{name}OnMeta", (mixin, nn.Module), {})()
    with torch.device("meta"):
        holder.build(shape)
    return holder


def _arch(shape) -> str:
    """causal_bank, tkc or synthe: the config.json field its settings live under."""
    return shape.MODULES.partition(":")[0].rsplit(".", 1)[-1].removesuffix("_modules")

"""APOLLO / APOLLO-Mini: AdamW-level updates with SGD-level optimizer memory.

Zhu et al. 2024, "APOLLO: SGD-like Memory, AdamW-level Performance" (arXiv:2412.05270).
For a matrix gradient G, Adam moments are kept only for R = G projected onto a random
rank-r subspace; the ratio ||Adam(R)|| / ||R|| per channel (or per tensor, for Mini) is
used to scale the *full* gradient G, so state is O(r * max(m, n)) instead of O(m * n).

Where it runs: in the plasticity trainer process, next to a live vLLM engine. Parameters
are views into vLLM's weight tensors, often bf16 with no fp32 master copy, so:
  * all optimizer maths is fp32; bf16/fp16 params receive the update with stochastic
    rounding (`add_stochastic_`), so updates below half an ulp are not lost on average;
  * state is keyed by parameter *name* and holds only plain tensors; the projection is
    regenerated from (seed, name, refresh index), so nothing unpicklable is stored;
  * a step with any NaN/Inf gradient is refused before anything is modified.

Usage:
    from safetensors.torch import load_file, save_file
    from plasticity_training.apollo import Apollo, flatten_state, unflatten_state

    opt = Apollo(model.named_parameters(), lr=1e-5, rank=64, warmup_steps=100)
    loss.backward(); opt.step(); opt.zero_grad()
    save_file(flatten_state(opt.named_state_dict()), "apollo.safetensors")
    ignored = opt.load_named_state_dict(unflatten_state(load_file("apollo.safetensors")))

Parameter groups are dicts {"params": [(name, tensor), ...], <any default>: value}; a group
with "apollo": False uses plain AdamW for every tensor in it (the paper's runs apply
APOLLO to attention/MLP matrices only, keeping embeddings and lm_head on AdamW).
"""
import dataclasses
import hashlib
import math
from typing import Callable

import torch
from pydantic import ValidationError

from vllm_plasticity.contract.settings import OptimizerSettings

__all__ = ["Apollo", "ShardOf", "NonFiniteGradientError", "NonFiniteUpdateError", "add_stochastic_", "projection_matrix",
           "uses_projection", "flatten_state", "unflatten_state", "MINI_SCALE"]

# APOLLO-Mini's scale alpha. Adam-normalised entries have magnitude ~1, so the rank-r
# estimate ||R~|| ~ sqrt(r) undershoots the full-rank one ~ sqrt(n) by sqrt(n/r); the paper
# and its reference code compensate heuristically with alpha = sqrt(128) for rank 1
# (reference `scale=128`, applied as sqrt(scale)). With mini=True the `scale` argument
# multiplies this, so scale=1.0 is the paper's setting and other values tune around it.
MINI_SCALE = math.sqrt(128.0)
_SEP = "::"  # flatten_state key separator: "<param name>::<state key>"
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_DTYPES = (torch.float32, torch.float64) + _LOW_PRECISION
# The defaults and bounds of every setting are a /train job's (contract.settings.OptimizerSettings): one set.
_DEFAULTS = OptimizerSettings()


class NonFiniteGradientError(ValueError):
    """A gradient held NaN/Inf; the step was refused and nothing was modified."""


class NonFiniteUpdateError(ValueError):
    """An update would leave a NaN/Inf (or a value the dtype cannot hold) in a parameter; the step was
    refused and nothing was modified."""


@dataclasses.dataclass(frozen=True)
class ShardOf:
    """Where a parameter one of several tensor-parallel trainers holds (tensor_parallel.py) sits in the whole
    tensor. The optimizer decides everything shape-dependent (APOLLO or AdamW, which side is the channels,
    the projection) by `full_shape`, and sums over ranks what spans the split, so the shards' step is the
    step one optimizer would take on the whole tensor."""

    full_shape: tuple[int, ...]
    dim: int  # the dimension split over ranks
    start: int  # this rank's first index along it


def _stable_seed(*parts) -> int:
    # hashlib, not hash(): Python's str hash is salted per process, and restarts must
    # regenerate the same projection / rounding bits.
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def uses_projection(shape, rank: int) -> bool:
    """True when a tensor of `shape` gets APOLLO; otherwise it gets plain AdamW.

    Only 2-D tensors with rank < min(m, n): at rank >= min(m, n) the projected moments
    (2 * r * max(m, n)) are no smaller than AdamW's (2 * m * n), so approximating buys
    nothing. 1-D (norms, biases) and >2-D tensors have no channel structure to exploit.
    """
    return len(shape) == 2 and rank < min(shape)


def projection_matrix(name: str, refresh_index: int, shape, rank: int, seed: int = 0,
                      device=None) -> torch.Tensor:
    """The (rank, min(m, n)) fp32 Gaussian projection, entries N(0, 1/rank), for the
    parameter `name` of `shape` during projection period `refresh_index`.

    Drawn on a CPU generator so it is identical whichever device trains."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(_stable_seed("proj", seed, name, refresh_index))
    proj = torch.randn((rank, min(shape)), generator=gen, dtype=torch.float32)
    return proj.div_(math.sqrt(rank)).to(device or "cpu")


def add_stochastic_(param: torch.Tensor, update: torch.Tensor,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """param += update, computed in fp32, rounded stochastically into a bf16/fp16 param.

    Rounds up with probability equal to the fractional distance to the next representable
    value, so E[result] equals the fp32 sum; round-to-nearest would drop every update
    smaller than half an ulp, forever. `generator` must be on param's device. fp32/fp64 params get a plain add_."""
    if param.dtype not in _LOW_PRECISION:
        return param.add_(update.to(param.dtype))
    exact = param.float().add_(update)  # fresh contiguous fp32 tensor
    if param.dtype == torch.bfloat16:
        # bf16 is the top 16 bits of fp32: add uniform noise below the cut, then truncate.
        # Sign-magnitude encoding makes this unbiased for negative values too.
        noise = torch.randint(0, 1 << 16, exact.shape, dtype=torch.int32,
                              device=exact.device, generator=generator)
        bits = exact.view(torch.int32).add_(noise).bitwise_and_(-65536)  # 0xFFFF0000
        return param.copy_(bits.view(torch.float32))  # exact: low bits are zero
    # fp16 (5-bit exponent, subnormals) has no bit trick; pick a neighbour explicitly.
    nearest = exact.to(param.dtype)
    toward = torch.where(nearest.float() < exact, math.inf, -math.inf).to(param.dtype)
    other = torch.nextafter(nearest, toward)
    gap = (other.float() - nearest.float()).abs_()
    p_other = torch.where(gap > 0, (exact - nearest.float()).abs_() / gap, 0.0)
    u = torch.rand(exact.shape, device=exact.device, generator=generator)
    return param.copy_(torch.where(u < p_other, other, nearest))


def flatten_state(named: dict) -> dict:
    """{name: {key: tensor}} -> {"name::key": tensor}, the flat form safetensors wants."""
    return {f"{name}{_SEP}{key}": t for name, entry in named.items() for key, t in entry.items()}


def unflatten_state(flat: dict) -> dict:
    """Inverse of flatten_state (splits on the last '::', so names may contain '::')."""
    named: dict = {}
    for full, t in flat.items():
        name, key = full.rsplit(_SEP, 1)
        named.setdefault(name, {})[key] = t
    return named


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _settings(values: dict) -> OptimizerSettings:
    """`values` as OptimizerSettings: its defaults and bounds are the ones a /train job gets (one set,
    contract.settings). A bad value raises ValueError naming the setting, the value and the valid range."""
    try:
        return OptimizerSettings(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        what = ".".join(map(str, first["loc"])) or "settings"
        raise ValueError(f"Invalid {what}: {first.get('input')!r} ({first['msg']})") from None


def _group_settings(group: dict) -> dict:
    """The OptimizerSettings fields of a parameter group (grad_clip is global, not per group)."""
    return {k: group[k] for k in OptimizerSettings.model_fields if k in group and k != "grad_clip"}


def _adamw_direction(grad, exp_avg, exp_avg_sq, *, step, beta1, beta2, eps):
    """Bias-corrected Adam direction m^ / (sqrt(v^) + eps), arithmetic as torch.optim.AdamW."""
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1.0 - beta2**step)).add_(eps)
    return exp_avg.div(denom).div_(1.0 - beta1**step)


def _apollo_direction(grad, exp_avg, exp_avg_sq, last_norm, proj, *, step, beta1, beta2,
                      eps, tensorwise, limit, tall=None, split=None, sum_=None):
    """APOLLO direction G·S (before lr and alpha), updating moments and last_norm in place.

    grad (m, n) fp32; proj (r, k) with k = min(m, n); moments (c, r) with c = max(m, n).
    A shard of a split tensor (ShardOf) passes the whole tensor's orientation `tall`, which side
    is split (`split`: "channels" or "contraction") and `sum_` (in place, over ranks).
    """
    # Work with channels as rows: the projection contracts the smaller dim k and every one
    # of the c = max(m, n) channels (rows of gw) gets its own scaling factor.
    tall = grad.shape[0] >= grad.shape[1] if tall is None else tall
    gw = grad if tall else grad.t()                                   # (c, k)
    r = gw @ proj.t()                                                 # (c, r)
    if split == "contraction":  # each rank projected its part of every channel: the sum is the whole
        r = sum_(r)
    exp_avg.lerp_(r, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(r, r, value=1.0 - beta2)
    # Paper's Algorithm 1: Adam on R with bias correction inside R~ (as torch's AdamW).
    r_tilde = (exp_avg / (1.0 - beta1**step)) / (
        (exp_avg_sq.sqrt() / math.sqrt(1.0 - beta2**step)).add_(eps))  # (c, r)
    if tensorwise and split == "channels":  # the tensor's norms span every rank's channels
        squares = sum_(torch.stack([r_tilde.square().sum(), r.square().sum()]))
        num, den = squares.sqrt().view(2, 1, 1).unbind(0)
    else:
        dim = None if tensorwise else 1
        num = torch.linalg.vector_norm(r_tilde, dim=dim, keepdim=True)    # (c, 1) or (1, 1)
        den = torch.linalg.vector_norm(r, dim=dim, keepdim=True)
    # A channel whose projected gradient is exactly 0 has (almost surely) a zero G channel
    # too: give it scale 0 instead of 0/0 = NaN.
    s = torch.where(den > 0, num / den, 0.0)
    u = gw * s                                                        # (c, k)
    # Norm-growth limiter (from Fira): ||u_t|| <= limit * ||u_{t-1}||. It acts before lr and
    # alpha so that lr warmup is not mistaken for growth; last_norm == 0 means "no previous
    # update" (a zero first gradient must not freeze the parameter forever).
    u_norm = torch.linalg.vector_norm(u) if split is None else sum_(u.square().sum()).sqrt()
    if math.isfinite(limit):
        cap = last_norm * limit
        ratio = torch.where((last_norm > 0) & (u_norm > cap), cap / u_norm, 1.0)
        u.mul_(ratio)
        u_norm = u_norm * ratio
    last_norm.copy_(u_norm)
    return u if tall else u.t()                                       # (m, n)


class Apollo(torch.optim.Optimizer):
    """APOLLO (channel-wise, rank `rank`) or APOLLO-Mini (`mini=True`: rank 1, tensor-wise,
    alpha = scale * MINI_SCALE; `rank` is then ignored). Tensors failing
    `uses_projection(shape, rank)` get AdamW. See the module docstring."""

    def __init__(self, named_params, lr=_DEFAULTS.lr, betas=_DEFAULTS.betas, eps=_DEFAULTS.eps,
                 weight_decay=_DEFAULTS.weight_decay, warmup_steps=_DEFAULTS.warmup_steps, rank=_DEFAULTS.rank,
                 scale=_DEFAULTS.scale, proj_refresh=_DEFAULTS.proj_refresh,
                 norm_growth_limit=_DEFAULTS.norm_growth_limit, mini=_DEFAULTS.mini, grad_clip=_DEFAULTS.grad_clip,
                 seed=0, shards: dict[str, ShardOf] | None = None,
                 sum_: Callable[[torch.Tensor], torch.Tensor] | None = None):
        settings = _settings(dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps,
                                  rank=rank, scale=scale, proj_refresh=proj_refresh,
                                  norm_growth_limit=norm_growth_limit, mini=mini, grad_clip=grad_clip))
        if not (_is_int(seed) and seed >= 0):
            raise ValueError(f"Invalid seed: {seed!r} (must be an int >= 0)")
        # Global, not per group: clipping is over the norm of *all* gradients together.
        self.grad_clip, self.seed = settings.grad_clip, seed
        self._names: set = set()
        # Tensor-parallel trainers: each split parameter's place in the whole tensor, and the in-place sum
        # over ranks (every rank steps together, calling sum_ in the same order).
        self.shards, self._sum = dict(shards or {}), sum_
        self._recorded: dict = {}  # name -> this step's sums over ranks, from the trial pass (step())
        if self.shards and sum_ is None:
            raise ValueError("Invalid shards: split parameters need sum_ (the sum over ranks)")
        self._proj_cache: dict = {}   # name -> (refresh index, P on device); derived, not state
        self._round_gens: dict = {}   # device -> generator, reseeded per (name, step)
        super().__init__(named_params, {**_group_settings(settings.model_dump()), "apollo": True})

    @classmethod
    def from_settings(cls, named_params, settings: OptimizerSettings, seed: int = 0,
                      shards: dict[str, ShardOf] | None = None, sum_=None) -> "Apollo":
        """An optimizer with a job's settings (contract.settings.OptimizerSettings)."""
        return cls(named_params, **settings.model_dump(), seed=seed, shards=shards, sum_=sum_)

    def apply_settings(self, settings: OptimizerSettings) -> None:
        """Take a new job's settings (lr, betas, ...) for every group; rank and mini must be those the state
        was made with (the caller refuses a job that changes them: contract.settings.SHAPE_SETTINGS)."""
        for group in self.param_groups:
            group.update(_group_settings(settings.model_dump()))
        self.grad_clip = settings.grad_clip

    def add_param_group(self, param_group):
        # Group overrides are checked by the same rules; "apollo": False puts the group on plain AdamW.
        _settings({**_group_settings(self.defaults), **_group_settings(param_group), "grad_clip": self.grad_clip})
        if not isinstance(param_group.get("apollo", True), bool):
            raise ValueError(f"Invalid apollo: {param_group['apollo']!r} (must be a bool)")
        params = param_group["params"]
        single = isinstance(params, tuple) and len(params) == 2 and isinstance(params[0], str)
        params = [params] if single else list(params)
        seen = set(self._names)
        for item in params:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                    and isinstance(item[1], torch.Tensor)):
                raise ValueError(f"Invalid params entry: {type(item).__name__} "
                                 "(must be a (name, tensor) pair; state is keyed by name)")
            name, p = item
            if name in seen:
                raise ValueError(f"Invalid params: duplicate parameter name {name!r}")
            seen.add(name)
            if p.dtype not in _DTYPES:
                raise ValueError(f"Invalid parameter dtype for {name!r}: {p.dtype} "
                                 "(must be float32, float64, bfloat16 or float16)")
        self._names = seen
        super().add_param_group(dict(param_group, params=params))

    # ---- state ---------------------------------------------------------------------------
    def _state_spec(self, name, p, group):
        """{key: (shape, dtype, device)} of the state this parameter needs."""
        step = ((), torch.int64, torch.device("cpu"))  # int64: exact for any step count
        rank = 1 if group["mini"] else group["rank"]
        if group["apollo"] and uses_projection(self._full_shape(name, p), rank):
            shape = self._full_shape(name, p)
            channels = max(shape) if self._split(name, p) != "channels" else p.shape[self.shards[name].dim]
            moment = ((channels, rank), torch.float32, p.device)
            return {"step": step, "exp_avg": moment, "exp_avg_sq": moment,
                    "last_update_norm": ((), torch.float32, p.device)}
        moment = (tuple(p.shape), torch.float32, p.device)
        return {"step": step, "exp_avg": moment, "exp_avg_sq": moment}

    def _named(self):
        for group in self.param_groups:
            for name, p in zip(group["param_names"], group["params"]):
                yield name, p, group

    def named_state_dict(self) -> dict:
        """{param name: {key: tensor}} -- the live state tensors (no copy); clone to mutate."""
        return {name: dict(self.state[p]) for name, p, _ in self._named() if self.state.get(p)}

    def load_named_state_dict(self, named: dict) -> list:
        """Replace all state by `named`, matched by parameter name. Names not in the optimizer
        are ignored and returned (sorted); parameters absent from `named` start fresh.
        Everything is checked before anything is replaced."""
        new = {}
        for name, p, group in self._named():
            if name not in named:
                continue
            spec, entry = self._state_spec(name, p, group), named[name]
            if set(entry) != set(spec):
                raise ValueError(f"Invalid state for {name!r}: keys {sorted(entry)} "
                                 f"(must be {sorted(spec)})")
            for key, (shape, _, _) in spec.items():
                if tuple(entry[key].shape) != shape:
                    raise ValueError(f"Invalid state for {name!r}: {key} has shape "
                                     f"{tuple(entry[key].shape)} (must be {shape}; rank/mini changed?)")
            new[p] = {k: entry[k].detach().to(device=d, dtype=dt).clone()
                      for k, (_, dt, d) in spec.items()}
        self.state.clear()
        self.state.update(new)
        return sorted(set(named) - self._names)

    def load_state_dict(self, state_dict):
        """Load torch's positional format by its saved param_names, state only (settings come
        from the constructor). torch's own loader would cast the fp32 moments of a bf16
        parameter to bf16, silently losing the precision the maths relies on."""
        named = {}
        for group in state_dict["param_groups"]:
            if "param_names" not in group:
                raise ValueError("Invalid state_dict: no param_names (use load_named_state_dict)")
            for idx, name in zip(group["params"], group["param_names"]):
                if idx in state_dict["state"]:
                    named[name] = state_dict["state"][idx]
        self.load_named_state_dict(named)

    def split_state_dims(self) -> dict[str, dict[str, int | None]]:
        """{parameter name: {state key: the dimension along which that state tensor is split over ranks like
        the parameter, or None where every rank holds it whole}}, for the split parameters (`shards`).
        AdamW moments have the parameter's shape; APOLLO's (channels, rank) moments are split where the
        channels are and whole where the contracted side is split (their projected gradient is summed)."""
        dims = {}
        for name, p, group in self._named():
            if name not in self.shards:
                continue
            spec = self._state_spec(name, p, group)
            moment = (0 if self._split(name, p) == "channels" else None) if "last_update_norm" in spec \
                else self.shards[name].dim
            dims[name] = {key: moment if key.startswith("exp_avg") else None for key in spec}
        return dims

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (excludes the regenerable projection cache)."""
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values())

    # ---- step ----------------------------------------------------------------------------
    def _projection(self, name, refresh, shape, rank, device):
        cached = self._proj_cache.get(name)
        if cached is None or cached[0] != refresh or cached[1].device != device:
            cached = (refresh, projection_matrix(name, refresh, shape, rank, self.seed, device))
            self._proj_cache[name] = cached
        return cached[1]

    def _rounding_generator(self, device, name, step):
        # Reseeded from (seed, name, step): rounding is reproducible across restarts without
        # storing RNG state, and independent between parameters and steps.
        gen = self._round_gens.get(device)
        if gen is None:
            gen = self._round_gens[device] = torch.Generator(device=device)
        gen.manual_seed(_stable_seed("round", self.seed, name, step))
        return gen

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(n, p, g) for n, p, g in self._named() if p.grad is not None]
        if not work:
            return loss
        for name, p, _ in work:
            if p.grad.is_sparse:
                raise ValueError(f"Invalid gradient for {name!r}: sparse gradients are not supported")
        # Look at every gradient before touching anything (lazy state init included), so a
        # bad batch leaves weights and state bitwise as they were. One host sync in total.
        dev0 = work[0][1].grad.device
        finite = torch.stack([p.grad.isfinite().all().to(dev0) for _, p, _ in work]).all()
        if not self._on_every_rank(finite):
            bad = [n for n, p, _ in work if not bool(p.grad.isfinite().all())]
            raise NonFiniteGradientError(f"Non-finite gradient in {bad or 'another rank'}: step refused, "
                                         "parameters and optimizer state unchanged")
        # Like clip_grad_norm_, but without mutating .grad (a factor of exactly 1.0 below the limit).
        norms = torch.stack([torch.linalg.vector_norm(p.grad, dtype=torch.float32).to(dev0) for _, p, _ in work])
        if self.shards:  # split tensors' squares summed over ranks; whole ones counted once
            split = torch.tensor([n in self.shards for n, _, _ in work], device=dev0)
            total = (self._sum(norms.square().where(split, 0.0).sum()) + norms.square().where(~split, 0.0).sum()).sqrt()
        else:
            total = torch.linalg.vector_norm(norms)
        clip = (self.grad_clip / (total + 1e-6)).clamp_(max=1.0)
        # A finite gradient can still give a non-finite weight (a huge lr, an overflowing bf16 sum): every
        # update is computed once on copies of the state and checked before any parameter is written, so a
        # refused step leaves weights and state bitwise as they were without an undo copy of the model.
        # The update is deterministic (projection and rounding seeds), so the real pass repeats it exactly.
        # Split tensors: this trial pass makes all of the step's sums over ranks and records them; the real
        # pass below replays them, so once every rank has agreed, no rank waits on another while it writes
        # (a rank that dies before the agreement leaves every rank's weights as they were).
        self._recorded = {}
        bad = [name for name, p, group in work if not self._update_fits(name, p, group, clip)]
        if not self._on_every_rank(torch.tensor(not bad, device=dev0)):
            raise NonFiniteUpdateError(f"the update would make {bad[:5] or 'a tensor on another rank'} non-finite: "
                                       "step refused, parameters and optimizer state unchanged")
        for name, p, group in work:
            self._step_param(name, p, group, clip)
        return loss

    def _on_every_rank(self, ok: torch.Tensor) -> bool:
        """Whether `ok` (a bool tensor) holds on every rank: all of them refuse a step, or none."""
        if self._sum is None:
            return bool(ok)
        return int(self._sum((~ok).to(torch.int64).reshape(1))) == 0

    def _fresh_state(self, name, p, group) -> dict:
        return {k: torch.zeros(shape, dtype=dt, device=d)
                for k, (shape, dt, d) in self._state_spec(name, p, group).items()}

    def _full_shape(self, name, p) -> tuple:
        return tuple(self.shards[name].full_shape) if name in self.shards else tuple(p.shape)

    def _split(self, name, p) -> str | None:
        """Which side of APOLLO's (channels, contraction) view a split parameter is split on; None: whole."""
        if name not in self.shards:
            return None
        full = self._full_shape(name, p)
        channel_dim = 0 if full[0] >= full[1] else 1
        return "channels" if self.shards[name].dim == channel_dim else "contraction"

    def _update_fits(self, name, p, group, clip) -> bool:
        """Whether this step's update leaves `p` finite and inside its dtype's range (nothing is changed)."""
        state = self.state[p]
        trial = {k: v.clone() for k, v in state.items()} if state else self._fresh_state(name, p, group)
        delta = self._delta(name, p, group, clip, trial, self._recording(name))
        new = p.to(torch.float32) + delta
        return bool((new.abs() <= torch.finfo(p.dtype).max).all())  # False for NaN too

    def _step_param(self, name, p, group, clip):
        state = self.state[p]
        if not state:
            state.update(self._fresh_state(name, p, group))
        delta = self._delta(name, p, group, clip, state, self._replaying(name))
        t = int(state["step"])
        gen = self._rounding_generator(p.device, name, t) if p.dtype in _LOW_PRECISION else None
        add_stochastic_(p, delta, gen)

    def _recording(self, name):
        """The sum over ranks for `name`'s trial update, keeping each result for the real pass."""
        if self._sum is None:
            return None
        kept = self._recorded.setdefault(name, [])

        def record(t):
            kept.append(self._sum(t).clone())
            return t
        return record

    def _replaying(self, name):
        """The sums `_recording` made for `name`, in the order the update asks for them (no communication)."""
        if self._sum is None:
            return None
        kept = iter(self._recorded.pop(name, ()))
        return lambda t: t.copy_(next(kept))

    def _delta(self, name, p, group, clip, state, sum_=None) -> torch.Tensor:
        """This step's fp32 update of `p`; advances `state` (step count, moments) in place. `sum_` sums over
        tensor-parallel ranks (split parameters only)."""
        grad = p.grad.to(torch.float32)  # may alias p.grad: never modified in place below
        grad = grad * clip.to(grad.device)
        state["step"] += 1
        t = int(state["step"])
        lr = group["lr"] * (min(1.0, t / group["warmup_steps"]) if group["warmup_steps"] else 1.0)
        beta1, beta2 = group["betas"]
        if "last_update_norm" in state:
            rank = 1 if group["mini"] else group["rank"]
            # Periods are 0-based over completed steps: steps 1..proj_refresh use period 0.
            full, split = self._full_shape(name, p), self._split(name, p)
            proj = self._projection(name, (t - 1) // group["proj_refresh"], full, rank, p.device)
            if split == "contraction":  # this rank's columns of the whole tensor's projection
                start = self.shards[name].start
                proj = proj[:, start:start + p.shape[self.shards[name].dim]]
            direction = _apollo_direction(
                grad, state["exp_avg"], state["exp_avg_sq"], state["last_update_norm"], proj,
                step=t, beta1=beta1, beta2=beta2, eps=group["eps"], tensorwise=group["mini"],
                limit=group["norm_growth_limit"], tall=full[0] >= full[1], split=split, sum_=sum_)
            alpha = group["scale"] * (MINI_SCALE if group["mini"] else 1.0)
        else:
            direction = _adamw_direction(grad, state["exp_avg"], state["exp_avg_sq"], step=t,
                                         beta1=beta1, beta2=beta2, eps=group["eps"])
            alpha = 1.0
        # Decoupled decay of W_{t-1} (as torch.optim.AdamW) and the step, summed in fp32 and
        # applied in one add: a single (stochastic, for bf16/fp16) rounding per step.
        delta = direction.mul_(-lr * alpha)  # direction is a fresh tensor
        if group["weight_decay"]:
            delta.add_(p, alpha=-lr * group["weight_decay"])
        return delta

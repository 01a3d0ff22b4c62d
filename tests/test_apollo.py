"""Tests for plasticity_training.apollo (APOLLO / APOLLO-Mini).

The reference comparison needs the authors' package unpacked (never imported as a
package: its __init__ imports bitsandbytes). Set it up with
    pip install --no-deps --target /tmp/apollo_ref apollo-torch==1.0.3
or point APOLLO_TORCH_REF at a directory containing apollo_torch/; otherwise it skips.
"""
import importlib
import importlib.util
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from plasticity_training.apollo import (Apollo, NonFiniteGradientError,
                                        add_stochastic_, flatten_state, projection_matrix,
                                        unflatten_state, uses_projection)

SEED = 7
# The settings' ceilings (contract.settings.OptimizerSettings, the one set of bounds): far above anything these
# tests reach, so no clipping (a factor of exactly 1.0) and no norm-growth limit.
NO_CLIP, NO_LIMIT = 1e6, 1000.0


def make_grad(idx: int, shape, step: int) -> torch.Tensor:
    """Deterministic gradient for parameter `idx` at `step`, growing so the limiter fires."""
    gen = torch.Generator().manual_seed(1000 * idx + step)
    return torch.randn(shape, generator=gen) * (1.0 + 0.5 * step)


def make_param(idx: int, shape, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(99 + idx)
    return torch.randn(shape, generator=gen).to(dtype)


def clone_state(opt):
    return {n: {k: t.clone() for k, t in e.items()} for n, e in opt.named_state_dict().items()}


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            x, y = a[name][key], b[name][key]
            assert x.dtype == y.dtype and torch.equal(x, y), (name, key)  # equal() ignores dtype


# ---- 1. known answer ---------------------------------------------------------------------
def naive_apollo(w0, grads, *, name, lr, betas, eps, wd, warmup, alpha, rank, refresh,
                 limit, tensorwise):
    """Algorithm 1 of the paper plus the Fira norm-growth limiter, in float64, written in
    the natural orientation. Returns the weights after every step and how often the
    limiter fired."""
    b1, b2 = betas
    W = w0.double().clone()
    m, n = W.shape
    M = V = prev = None
    out, fired = [], 0
    for t, G in enumerate(grads, start=1):
        G = G.double()
        P = projection_matrix(name, (t - 1) // refresh, (m, n), rank, SEED).double()
        R = G @ P.T if m >= n else P @ G  # project the smaller dimension
        M = (1 - b1) * R if M is None else b1 * M + (1 - b1) * R
        V = (1 - b2) * R**2 if V is None else b2 * V + (1 - b2) * R**2
        R_tilde = (M / (1 - b1**t)) / ((V / (1 - b2**t)).sqrt() + eps)
        if tensorwise:
            GS = G * (R_tilde.norm() / R.norm())
        elif m >= n:  # channels are the m rows: diag(s) G
            GS = (R_tilde.norm(dim=1) / R.norm(dim=1))[:, None] * G
        else:  # channels are the n columns: G diag(s)
            GS = G * (R_tilde.norm(dim=0) / R.norm(dim=0))[None, :]
        if prev is not None and GS.norm() > limit * prev:
            GS = GS * (limit * prev / GS.norm())
            fired += 1
        prev = GS.norm()
        lr_t = lr * min(1.0, t / warmup) if warmup else lr
        W = W - lr_t * alpha * GS - lr_t * wd * W
        out.append(W.clone())
    return out, fired


@pytest.mark.parametrize("shape", [(10, 6), (6, 10)])
@pytest.mark.parametrize("mini", [False, True])
def test_known_answer_matrix(shape, mini):
    cfg = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1, warmup_steps=2,
               scale=1.5, proj_refresh=2, norm_growth_limit=1.01)
    rank = 1 if mini else 3
    p = make_param(0, shape)
    grads = [make_grad(0, shape, t) for t in range(1, 6)]
    expected, fired = naive_apollo(
        p, grads, name="w", lr=cfg["lr"], betas=cfg["betas"], eps=cfg["eps"],
        wd=cfg["weight_decay"], warmup=cfg["warmup_steps"],
        alpha=cfg["scale"] * (math.sqrt(128) if mini else 1.0), rank=rank,
        refresh=cfg["proj_refresh"], limit=cfg["norm_growth_limit"], tensorwise=mini)
    assert fired > 0, "test must exercise the norm-growth limiter"
    opt = Apollo([("w", p)], rank=3, mini=mini, seed=SEED, grad_clip=NO_CLIP, **cfg)
    for g, want in zip(grads, expected):
        p.grad = g
        opt.step()
        torch.testing.assert_close(p.double(), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(7,), (3, 40)])  # 1-D, and a matrix with min dim <= rank
def test_adamw_path_matches_torch_adamw(shape):
    assert not uses_projection(shape, 3) and uses_projection((4, 40), 3)
    cfg = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05)
    p = make_param(1, shape)
    q = p.clone().requires_grad_(True)
    opt = Apollo([("b", p)], rank=3, grad_clip=NO_CLIP, **cfg)
    ref = torch.optim.AdamW([q], **cfg)
    for t in range(1, 6):
        p.grad = make_grad(1, shape, t)
        q.grad = p.grad.clone()
        opt.step()
        ref.step()
        torch.testing.assert_close(p, q.detach(), atol=1e-6, rtol=0)


# ---- 2. against the authors' reference implementation ------------------------------------
@pytest.fixture(scope="module")
def reference():
    candidates = [os.environ.get("APOLLO_TORCH_REF"), "/tmp/apollo_ref"]
    spec = importlib.util.find_spec("apollo_torch")  # locates only; does not execute it
    if spec is not None and spec.submodule_search_locations:
        candidates.append(str(Path(list(spec.submodule_search_locations)[0]).parent))
    found = [Path(c) for c in candidates if c and (Path(c) / "apollo_torch" / "apollo.py").is_file()]
    if not found:
        pytest.skip("reference apollo-torch not found; run `pip install --no-deps --target "
                    "/tmp/apollo_ref apollo-torch==1.0.3` or set APOLLO_TORCH_REF")
    pytest.importorskip("numpy", reason="reference apollo.py imports numpy")
    pytest.importorskip("transformers.utils.versions",
                        reason="reference apollo.py imports transformers.utils.versions")
    # Load only the optimizer and projector modules under a private package name: the
    # package __init__ imports bitsandbytes, which is neither needed nor usable here.
    pkg = types.ModuleType("_apollo_torch_ref")
    pkg.__path__ = [str(found[0] / "apollo_torch")]
    sys.modules["_apollo_torch_ref"] = pkg
    return (importlib.import_module("_apollo_torch_ref.apollo"),
            importlib.import_module("_apollo_torch_ref.random_projector"))


# The two implementations agree exactly (up to the reference's 1e-8 guards) except where
# ours deliberately follows the paper: bias correction inside R~ (the reference applies it
# to the step size, outside the limiter, and adds eps before bias correction) and decay of
# W_{t-1} (the reference decays W_t). So compare (a) betas=0, where bias correction is the
# identity, with the limiter on, and (b) real betas with eps=0 and the limiter off.
@pytest.mark.parametrize("mini", [False, True])
@pytest.mark.parametrize("case", ["limiter_on_betas_0", "limiter_off_eps_0"])
def test_matches_reference(reference, mini, case):
    ref_apollo, ref_proj = reference
    limiter = case == "limiter_on_betas_0"
    betas = (0.0, 0.0) if limiter else (0.9, 0.999)
    eps = 1e-6 if limiter else 1e-30  # "eps 0": the smallest the settings allow (eps > 0) changes nothing here
    lr, refresh, steps = 0.05, 3, 7
    rank, ref_scale = (1, 128.0) if mini else (3, 4.0)  # reference applies sqrt(scale)
    names, shapes = ["w_tall", "w_wide"], [(12, 5), (6, 10)]

    class InjectedProjector(ref_proj.GradientProjector):
        """Reference projector whose random matrix is ours, period by period."""
        def __init__(self, name, rank, gap):
            super().__init__(rank, update_proj_gap=gap, proj_type="std")
            self.name, self.period = name, 0

        def get_orthogonal_matrix(self, weights, rank, type, seed):
            P = projection_matrix(self.name, self.period, tuple(weights.shape), rank, SEED)
            self.period += 1
            return P if type == "right" else P.t()  # "left" expects (m, r) and uses P^T G

    ours = [make_param(i, s) for i, s in enumerate(shapes)]
    theirs = [p.clone().requires_grad_(True) for p in ours]
    ref = ref_apollo.AdamW(
        [{"params": theirs, "rank": rank, "proj": "random", "proj_type": "std",
          "scale_type": "tensor" if mini else "channel", "scale": ref_scale,
          "update_proj_gap": refresh}],
        lr=lr, betas=betas, eps=eps, weight_decay=0.0, disable_nl=not limiter)
    ref._initialize_projector = lambda group, state: InjectedProjector(
        names[state["seed"] - 1], group["rank"], group["update_proj_gap"])
    kw = dict(lr=lr, betas=betas, eps=eps, rank=rank, mini=mini, proj_refresh=refresh,
              scale=1.0 if mini else math.sqrt(ref_scale), seed=SEED, grad_clip=NO_CLIP)
    opt = Apollo(list(zip(names, ours)), norm_growth_limit=1.01 if limiter else NO_LIMIT, **kw)
    unlimited = [p.clone() for p in ours]
    opt_unlimited = Apollo(list(zip(names, unlimited)), norm_growth_limit=NO_LIMIT, **kw)
    for t in range(1, steps + 1):
        for i, (a, b, c) in enumerate(zip(ours, theirs, unlimited)):
            a.grad = make_grad(i, shapes[i], t)
            b.grad, c.grad = a.grad.clone(), a.grad.clone()
        opt.step(), ref.step(), opt_unlimited.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b.detach(), atol=1e-6, rtol=0)
    if limiter:  # the comparison above really exercised the limiter
        assert any(not torch.allclose(a, c, atol=1e-4) for a, c in zip(ours, unlimited))


# ---- 3. memory ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
@pytest.mark.parametrize("mini", [False, True])
def test_state_bytes_are_rank_over_min_dim_of_adamw(shape, mini):
    rank = 1 if mini else 4
    p = torch.zeros(shape)
    p.grad = make_grad(0, shape, 1)
    opt = Apollo([("w", p)], rank=4, mini=mini)
    opt.step()
    q = torch.zeros(shape, requires_grad=True)
    q.grad = p.grad.clone()
    adamw = torch.optim.AdamW([q])
    adamw.step()
    adamw_bytes = sum(t.numel() * t.element_size() for t in adamw.state[q].values())
    moments = 2 * shape[0] * shape[1] * 4
    assert adamw_bytes == moments + 4  # exp_avg + exp_avg_sq (fp32) + fp32 step
    # APOLLO: two fp32 (max(m, n), rank) moments = rank/min(m, n) of AdamW's moments,
    # exactly, plus 12 bytes of scalars: int64 step and fp32 last_update_norm.
    assert (opt.state_bytes() - 12) * min(shape) == rank * moments
    assert opt.state_bytes() == 2 * max(shape) * rank * 4 + 12


# ---- 4. state keyed by name --------------------------------------------------------------
SPECS = [("layers.0.w", (8, 6), torch.float32), ("layers.0.b", (6,), torch.float32),
         ("layers.1.w", (5, 12), torch.bfloat16)]
CFG = dict(lr=1e-2, rank=2, proj_refresh=3, warmup_steps=5, weight_decay=0.01, seed=SEED)


def run_steps(opt, params, steps):
    for t in steps:
        for i, (name, shape, _) in enumerate(SPECS):
            params[name].grad = make_grad(i, shape, t).to(params[name].dtype)
        opt.step()


def fresh_params():
    return {name: make_param(i, shape, dtype) for i, (name, shape, dtype) in enumerate(SPECS)}


def test_named_state_roundtrip_resumes_bitwise(tmp_path):
    full = fresh_params()
    run_steps(Apollo(list(full.items()), **CFG), full, range(1, 9))

    part = fresh_params()
    first = Apollo(list(part.items()), **CFG)
    run_steps(first, part, range(1, 5))
    save_file(flatten_state(first.named_state_dict()), tmp_path / "s.safetensors")
    torch.save(first.named_state_dict(), tmp_path / "s.pt")
    saved = clone_state(first)

    resumed = Apollo(list(reversed(list(part.items()))), **CFG)  # different order
    assert resumed.load_named_state_dict(unflatten_state(load_file(tmp_path / "s.safetensors"))) == []
    assert_state_equal(clone_state(resumed), saved)
    via_torch = Apollo(list(part.items()), **CFG)
    assert via_torch.load_named_state_dict(torch.load(tmp_path / "s.pt", weights_only=True)) == []
    assert_state_equal(clone_state(via_torch), saved)
    positional = Apollo(list(reversed(list(part.items()))), **CFG)  # torch's format, by name
    positional.load_state_dict(first.state_dict())
    assert_state_equal(clone_state(positional), saved)  # bf16 param's moments stay fp32

    run_steps(resumed, part, range(5, 9))
    for name in full:
        assert torch.equal(full[name], part[name]), name


def test_load_unknown_missing_and_mismatched_names():
    params = fresh_params()
    opt = Apollo(list(params.items()), **CFG)
    run_steps(opt, params, range(1, 3))
    state = clone_state(opt)
    state["ghost.w"] = state.pop("layers.0.b")
    assert opt.load_named_state_dict(state) == ["ghost.w"]
    assert "layers.0.b" not in opt.named_state_dict()  # missing name: starts fresh
    run_steps(opt, params, range(3, 4))
    assert int(opt.named_state_dict()["layers.0.b"]["step"]) == 1
    assert int(opt.named_state_dict()["layers.0.w"]["step"]) == 3
    with pytest.raises(ValueError, match="shape"):  # rank changed: refuse, don't misuse
        Apollo(list(params.items()), **dict(CFG, rank=3)).load_named_state_dict(state)


# ---- 5. stochastic rounding --------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("start", [1.0, -1.5])  # both signs: the bit trick is sign-magnitude
def test_stochastic_rounding_moves_like_fp32(dtype, start):
    E, N = 1024, 2000
    ulp = torch.finfo(dtype).eps  # spacing of representable values in [1, 2)
    p = 1 / 64                    # update = 1/64 ulp, far below the half-ulp cut-off
    update = torch.full((E,), ulp * p)  # positive: |x| grows from 1.0, shrinks from -1.5
    sr, nearest, fp32 = (torch.full((E,), start, dtype=dt)
                         for dt in (dtype, dtype, torch.float32))
    gen = torch.Generator().manual_seed(0)
    for _ in range(N):
        add_stochastic_(sr, update, gen)
        nearest.add_(update)
        fp32.add_(update)
    assert torch.equal(nearest, torch.full((E,), start, dtype=dtype))  # nearest loses it all
    want = (fp32 - start).mean().item()  # = N * p * ulp (|x| stays in [1, 2): fixed ulp)
    got = (sr.float() - start).mean().item()
    # Each step each element rounds up by one ulp with probability p, independently, so the
    # mean move over E elements is ulp * Binomial(N*E, p) / E with relative standard
    # deviation sqrt((1 - p) / (N * E * p)) ~ 0.56%. Allow 6 sigma, plus 0.1% for the fp32
    # reference's own accumulation error (N adds with a 2^-24 relative error each).
    bound = 6 * math.sqrt((1 - p) / (N * E * p)) + 1e-3
    assert abs(got - want) / want < bound, (got, want, bound)


def test_optimizer_updates_bf16_params_stochastically():
    # Constant gradient: each AdamW step is lr * (1 - O(eps)) = 1e-4, below half a bf16 ulp
    # under 1.0 (2^-9), so round-to-nearest would leave the weights at exactly 1.0.
    steps, lr = 40, 1e-4
    p = torch.ones(4096, dtype=torch.bfloat16)
    opt = Apollo([("norm.weight", p)], lr=lr)
    for _ in range(steps):
        p.grad = torch.ones_like(p)
        opt.step()
    move = (1.0 - p.float()).mean().item()
    assert abs(move - steps * lr) / (steps * lr) < 0.1, move
    assert torch.equal((torch.ones(1, dtype=torch.bfloat16) - lr), torch.ones(1, dtype=torch.bfloat16))


# ---- 6. non-finite gradients -------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_gradient_refused_without_side_effects(bad):
    assert issubclass(NonFiniteGradientError, ValueError)
    params = fresh_params()
    opt = Apollo(list(params.items()), grad_clip=1.0, **CFG)
    names = [n for n, _, _ in SPECS]
    for t in (1, 2):  # the last parameter never gets a gradient, so it has no state yet
        for i, name in enumerate(names[:-1]):
            params[name].grad = make_grad(i, SPECS[i][1], t)
        opt.step()
    before_p = {n: p.clone() for n, p in params.items()}
    before_s = clone_state(opt)
    for i, (name, shape, dtype) in enumerate(SPECS):
        params[name].grad = make_grad(i, shape, 3).to(dtype)
    params[names[-1]].grad[1, 2] = bad  # last in step order: earlier ones would be updated
    with pytest.raises(NonFiniteGradientError, match=names[-1]):
        opt.step()
    for n, p in params.items():
        assert torch.equal(p, before_p[n]), n
    assert_state_equal(clone_state(opt), before_s)
    params[names[-1]].grad[1, 2] = 0.0  # the optimizer stays usable
    opt.step()
    assert int(opt.named_state_dict()[names[-1]]["step"]) == 1


def test_grad_clip_scales_the_global_norm():
    shapes = [(8, 6), (6,)]
    clipped, plain, manual = ([make_param(i, s) for i, s in enumerate(shapes)] for _ in range(3))
    opts = [Apollo([(f"p{i}", p) for i, p in enumerate(ps)], lr=0.01, rank=2, grad_clip=gc)
            for ps, gc in ((clipped, 1.0), (plain, NO_CLIP), (manual, NO_CLIP))]
    for t, factor in ((1, 100.0), (2, 0.01)):  # big (clipped) then small (untouched) grads
        grads = [make_grad(i, s, t) * factor for i, s in enumerate(shapes)]
        coef = min(1.0, 1.0 / (torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item() + 1e-6))
        for ps, scale in ((clipped, 1.0), (plain, 1.0), (manual, coef)):
            for p, g in zip(ps, grads):
                p.grad = g * scale
        for o in opts:
            o.step()
        assert torch.equal(clipped[0].grad, grads[0])  # .grad is not modified
    for a, b in zip(clipped, manual):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert not torch.allclose(clipped[0], plain[0], atol=1e-6)


# ---- 7. invalid settings -----------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(lr=-1e-3), dict(lr=math.nan), dict(lr=math.inf), dict(betas=(1.0, 0.9)),
    dict(betas=(0.9, -0.1)), dict(betas=(0.9,)), dict(eps=-1e-8), dict(weight_decay=-0.1),
    dict(warmup_steps=-1), dict(warmup_steps=1.5), dict(rank=0), dict(rank=2.0),
    dict(scale=0.0), dict(scale=-1.0), dict(scale=math.inf), dict(proj_refresh=0),
    dict(proj_refresh=1.0), dict(norm_growth_limit=0.99), dict(norm_growth_limit=math.nan),
    dict(mini="yes"), dict(grad_clip=0.0), dict(grad_clip=-1.0), dict(grad_clip=math.nan),
    dict(seed=-1), dict(seed=1.5), dict(seed=True),
])
def test_invalid_settings_raise(kwargs):
    with pytest.raises(ValueError, match="Invalid"):
        Apollo([("w", torch.zeros(4, 4))], **kwargs)


@pytest.mark.parametrize("params", [
    [torch.zeros(3)],                                       # unnamed
    [("a", torch.zeros(3)), ("a", torch.zeros(3))],         # duplicate name
    [("a", torch.zeros(3, dtype=torch.int32))],             # unsupported dtype
    [{"params": [("a", torch.zeros(3, 3))], "rank": 0}],    # bad group override
    [{"params": [("a", torch.zeros(3, 3))], "apollo": 1}],
])
def test_invalid_params_raise(params):
    with pytest.raises(ValueError, match="Invalid"):
        Apollo(params)


# ---- 8. one set of defaults and bounds (issue #31 item 4) ----------------------------------------
def test_defaults_and_bounds_are_the_settings_models():
    """APOLLO takes the /train job's defaults and bounds (contract.settings.OptimizerSettings): a value the
    route refuses is refused here too, and an optimizer built with no arguments is a job's default one."""
    from vllm_plasticity.contract.settings import OptimizerSettings

    opt = Apollo([("w", torch.zeros(4, 4))])
    defaults = OptimizerSettings().model_dump()
    assert opt.grad_clip == defaults.pop("grad_clip") == 1.0  # was None (no clipping) here, 1.0 on the route
    assert {k: opt.defaults[k] for k in defaults} == defaults
    for bad in (dict(lr=2.0), dict(lr=0.0), dict(eps=0.0), dict(rank=4097), dict(weight_decay=1.5),
                dict(grad_clip=1e7), dict(norm_growth_limit=math.inf)):
        with pytest.raises(ValueError, match="Invalid"):
            Apollo([("w", torch.zeros(4, 4))], **bad)
        with pytest.raises(ValueError):
            OptimizerSettings(**bad)

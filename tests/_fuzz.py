"""Cross-backend fuzzing of the ops (run by tests/test_fuzz.py in a child process; ``python -m tests._fuzz``).

Every example is one call of a public op with generated arguments (good ones mostly, bad ones often enough:
NaN / inf values, out-of-range and wrapping indices, narrow integer dtypes, odd temperatures, ``top_k``,
``ignore_index`` of every type, meta / empty / strided / expanded tensors, huge and tiny magnitudes, exact
ties), run on every backend in ``FASTDIFF_FUZZ_BACKENDS`` (default: reference, cpp, triton). Properties:

* the same accept / reject decision on every backend, with the same exception type and message; a
  rejection is an :class:`~fastdiff.errors.InputError` / :class:`~fastdiff.errors.InputTypeError`;
* no crash (the parent test runs this module in a child process and names the case that was running);
* an accepted call returns no NaN and nothing out of range (indices in ``[0, V)``, tokens in the
  support, probabilities that sum to 1, a finite loss and finite gradients) and leaves its inputs as they
  were;
* equal results where accepted: indices and ``snapped`` rows exactly; losses, gradients and probabilities
  within a stated tolerance; drawn tokens exactly, except rows whose draw or filter lies within rounding
  of a boundary of the reference's float64 weights.

``FASTDIFF_FUZZ_EXAMPLES`` sets the number of examples per run (default ``DEFAULT_EXAMPLES``);
``FASTDIFF_FUZZ_LOG`` a file that holds the description of the call running now (the crash report).
Hypothesis runs derandomized
(a fixed seed) and without an example database, so a run is reproducible (profile "ci");
``FASTDIFF_FUZZ_PROFILE=dev`` draws new examples on every run, for longer hunts.
"""

from __future__ import annotations

import math
import os
import sys
import traceback
from dataclasses import dataclass, field

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastdiff import _backends, ops
from fastdiff import discrete as D
from fastdiff import random as R
from fastdiff import schedules as S
from fastdiff.errors import InputError, InputTypeError

FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
INTS = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]
T = 10
NEAR = 1e-6  # relative distance to a CDF boundary / filter threshold within which draws may differ


def backends() -> list[str]:
    names = os.environ.get("FASTDIFF_FUZZ_BACKENDS", "reference,cpp,triton").split(",")
    out = []
    for name in (n.strip() for n in names):
        if name == "reference" or (name and _backends.get(name).available):
            out.append(name)
    return out


def examples() -> int:
    return int(os.environ.get("FASTDIFF_FUZZ_EXAMPLES", str(DEFAULT_EXAMPLES)))


DEFAULT_EXAMPLES = 3000  # ~1 min for three backends on an idle 2-core CPU (Triton interpreted), ~2 min busy


settings.register_profile("ci", max_examples=examples(), deadline=None, derandomize=True, database=None,
                          print_blob=False, suppress_health_check=list(HealthCheck))
settings.register_profile("dev", max_examples=examples(), deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))


# ------------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    op: str
    args: dict
    grads: tuple[str, ...] = ()  # rounding_loss: the arguments that require grad
    backward: bool = False
    notes: list = field(default_factory=list)

    def describe(self) -> str:
        with torch.no_grad():
            old = torch._tensor_str.PRINT_OPTS.precision
            torch.set_printoptions(precision=10)
            try:
                parts = []
                for k, v in self.args.items():
                    if isinstance(v, torch.Tensor):
                        parts.append(f"{k}=tensor(shape={tuple(v.shape)}, stride={v.stride()}, dtype={v.dtype}, "
                                     f"device={v.device.type}, values={_values_repr(v)})")
                    elif isinstance(v, D.DiscreteProcess):
                        parts.append(f"{k}={v!r}")
                    else:
                        parts.append(f"{k}={v!r}")
                return f"{self.op}({', '.join(parts)}) grads={self.grads} notes={self.notes}"
            finally:
                torch.set_printoptions(precision=old)


def rare(draw, k: int) -> bool:
    """True with probability about 1 / (k + 1); False when shrunk (hypothesis favours 0 and k: the mark is
    in the middle)."""
    return draw(st.integers(0, k)) == k // 2 + 1


def pick(draw, good, bad: list, k: int = 12):
    """A draw of ``good``, or (about once in ``k + 1``) one of the ``bad`` values."""
    return draw(st.sampled_from(bad)) if rare(draw, k) else draw(good)


def _values_repr(t: torch.Tensor) -> str:
    if t.device.type == "meta" or t.layout != torch.strided:
        return "<no values>"
    return repr(t.detach().to(torch.float64 if t.is_floating_point() else torch.int64).tolist())


SPECIAL = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e20, -1e20, 1e-30, 1e-40, 3e38, 1e300, -1e300,
           5e-324, 1e-310]


@st.composite
def float_tensor(draw, shape, dtype, *, logits=False, dirty=None):
    """Values from a seeded normal draw, scaled, with drawn -inf masks, ties and special values."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1.0, 1.0, 3.0, 0.1, 30.0]))
    n = math.prod(shape)
    x = torch.randn(n, generator=g, dtype=torch.float64) * scale
    if n:
        if logits and rare(draw, 3):  # masked categories
            x[torch.rand(n, generator=g) < draw(st.sampled_from([0.3, 0.7, 1.0]))] = float("-inf")
        if rare(draw, 3):  # exact ties
            x[torch.randint(0, n, (max(1, n // 3),), generator=g)] = float(x[0])
        dirty = rare(draw, 11) if dirty is None else dirty
        if dirty:
            for _ in range(draw(st.integers(1, 3))):
                x[draw(st.integers(0, n - 1))] = draw(st.sampled_from(SPECIAL))
    return x.to(dtype).reshape(shape)


@st.composite
def layout(draw, t: torch.Tensor) -> torch.Tensor:
    """The same values in another memory layout: transposed, strided, or (one row) expanded."""
    if t.ndim < 2 or t.numel() == 0:
        return t
    kind = draw(st.sampled_from(["contiguous", "contiguous", "transposed", "strided", "expanded"]))
    if kind == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "strided":
        big = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if kind == "expanded":
        return t[..., :1, :].expand(t.shape)
    return t


def int_tensor(values, dtype) -> torch.Tensor | None:
    """``values`` as ``dtype``, or None when a value does not fit (the caller draws another dtype)."""
    info = torch.iinfo(dtype)
    if any(not info.min <= v <= info.max for v in values):
        return None
    return torch.tensor(values, dtype=torch.int64).to(dtype)


def _lead(draw) -> tuple[int, ...]:
    return draw(st.sampled_from([(0,), (1,), (2,), (3,), (5,), (2, 3), (1, 4), (6,)]))


def temperature(draw, allow_zero: bool):
    good = st.one_of(st.floats(0.05, 5.0), st.just(1.0), st.sampled_from([0.3, 2.0, 1e-30, 1e30, 1e-3]),
                     st.just(0.0) if allow_zero else st.just(0.7))
    edge = [float("inf"), 1e300, 1e-300, 5e-324, -1.0, float("nan"), 1e31, 1e-31, 0.0, -0.0, True, "1.0", None]
    return pick(draw, good, edge)


def u64(draw):
    good = st.one_of(st.just(0), st.integers(0, 2**64 - 1), st.just(2**64 - 1))
    return pick(draw, good, [-1, 2**64, 1.5, True, None])


def seed(draw):
    """A seed: mostly an int, sometimes a one-element tensor (integer, or a float / bool one: rejected)."""
    v = u64(draw)
    if rare(draw, 8) and isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63:
        if v >= 256:
            return torch.tensor([v])
        return torch.tensor(v, dtype=draw(st.sampled_from([torch.uint8, torch.int64])))
    if rare(draw, 30):
        return draw(st.sampled_from([torch.tensor(1.5), torch.tensor(True), torch.tensor([1, 2])]))
    return v


def _wide(draw, lead, V):
    """Now and then a few wide rows: the C++ float32 fast path (V > 2048) and many Triton row tiles."""
    if rare(draw, 20):
        return (draw(st.integers(1, 2)),), draw(st.integers(2040, 2600))
    return lead, V


@st.composite
def sample_categorical_case(draw):
    lead, V = _wide(draw, _lead(draw), draw(st.integers(1, 40)))
    dtype = draw(st.sampled_from(FLOATS))
    logits = draw(layout(draw(float_tensor(lead + (V,), dtype, logits=True))))
    if rare(draw, 40):
        logits = torch.empty(lead + (V,), device="meta", dtype=dtype)
    top_k = pick(draw, st.one_of(st.none(), st.none(), st.integers(1, V + 2)), [0, -1, 2**63, 2**80, True, 2.0])
    top_p = pick(draw, st.one_of(st.none(), st.none(), st.floats(0.01, 1.0), st.just(1)), [0.0, 1.5, float("nan")])
    n = math.prod(lead)
    row_offset = pick(draw, st.one_of(st.just(0), st.just(0), st.integers(0, 2**64 - max(1, n)), st.just(2**64 - n)),
                      [2**64 - n + 1, -1, 1.0])
    args = dict(logits=logits, seed=seed(draw), offset=u64(draw), temperature=temperature(draw, True),
                top_k=top_k, top_p=top_p, row_offset=row_offset)
    return Case("sample_categorical", args)


def _process(draw, V: int):
    kinds = ["absorbing", "absorbing", "spindle", "uniform"] + (["band"] if V <= 12 else []) + \
            (["dense"] if V <= 8 else [])
    kind = draw(st.sampled_from(kinds))
    if kind in ("absorbing", "spindle"):
        mask = draw(st.integers(0, V - 1))
        sched = S.cosine(T) if kind == "absorbing" else S.spindle(T, torch.linspace(0, 1, V))
        return D.Absorbing(V, mask, sched)
    if kind == "uniform":
        return D.Uniform(V, S.cosine(T))
    if kind == "band":
        return D.GaussianBand(V, S.cosine(T), bandwidth=2)
    g = torch.Generator().manual_seed(V)
    return D.Dense(torch.softmax(torch.randn(V, V, generator=g) * 2, -1), T)


@st.composite
def posterior_case(draw, sample: bool):
    lead, V = _wide(draw, _lead(draw), draw(st.integers(2, 30)))
    process = _process(draw, V)
    n = math.prod(lead)
    dtype = draw(st.sampled_from(FLOATS))
    logits = draw(layout(draw(float_tensor(lead + (V,), dtype, logits=True))))
    mask = getattr(process, "mask_id", None)
    vals = [draw(st.integers(0, V - 1)) if mask is None or draw(st.booleans()) else mask for _ in range(n)]
    if n and rare(draw, 9):
        vals[draw(st.integers(0, n - 1))] = draw(st.sampled_from([-1, V, V + 300, -2**31]))
    if mask is not None and n and rare(draw, 5):  # a masked row whose only finite logit is the mask
        r = draw(st.integers(0, n - 1))
        logits = logits.contiguous().clone()
        logits.view(-1, V)[r] = float("-inf")
        logits.view(-1, V)[r, mask] = 0.0
        vals[r] = mask
    for _ in range(5):
        xt = int_tensor(vals, draw(st.sampled_from(INTS)))
        if xt is not None:
            break
    else:
        xt = torch.tensor(vals, dtype=torch.int64)
    xt = xt.reshape(lead)
    if len(lead) == 2 and rare(draw, 4):  # a non-contiguous x_t
        xt = xt.T.contiguous().T
    t = pick(draw, st.integers(1, T), [0, T + 1, 1.5])
    if isinstance(t, int) and rare(draw, 3) and lead:
        t = torch.full(lead[:1], t, dtype=draw(st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.int8])))
    tv = int(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) and t.numel() else (t if isinstance(t, int) else 1)
    s = pick(draw, st.one_of(st.none(), st.integers(0, max(0, tv - 1))), [tv, -1])
    if isinstance(s, int) and s >= 0 and rare(draw, 4):
        s = torch.tensor(s, dtype=draw(st.sampled_from([torch.int64, torch.uint8])))
    args = dict(process=process, x0_logits=logits, x_t=xt, t=t, s=s, temperature=temperature(draw, False))
    if sample:
        args.update(seed=seed(draw), offset=u64(draw),
                    row_offset=pick(draw, st.one_of(st.just(0), st.integers(0, 2**64 - max(1, n))), [-1, 2**64]))
    if rare(draw, 40):
        args["x0_logits"] = torch.empty(lead + (V,), device="meta", dtype=dtype)
    return Case("posterior_sample" if sample else "categorical_posterior", args)


@st.composite
def nearest_case(draw):
    lead = _lead(draw)
    V = draw(st.integers(1030, 1100)) if rare(draw, 20) else draw(st.integers(1, 40))  # past a C++ tile of 1024
    Dm = draw(st.integers(1, 12))
    dtype = draw(st.sampled_from(FLOATS))
    mags = [1.0, 1.0, 1.0, 1e20, 1e-25, 1e-40] + ([1e300, 1e-300] if dtype == torch.float64 else [])
    mag = draw(st.sampled_from(mags))
    w = (draw(float_tensor((V, Dm), torch.float64)) * mag)
    if draw(st.booleans()) and V > 1:  # duplicated and rescaled rows: exact l2 / cosine ties
        src = draw(st.integers(0, V - 1))
        for j in draw(st.lists(st.integers(0, V - 1), min_size=1, max_size=4)):
            w[j] = w[src] * draw(st.sampled_from([1.0, 1.0, 2.0, 0.5]))
    x = draw(float_tensor(lead + (Dm,), torch.float64)) * mag
    if draw(st.booleans()) and x.numel():  # points on or next to embedding rows
        flat = x.reshape(-1, Dm)
        for r in range(flat.shape[0]):
            if draw(st.booleans()):
                flat[r] = w[draw(st.integers(0, V - 1))] * draw(st.sampled_from([1.0, 1.0 + 1e-6, 3.0]))
    if V > 1024 and x.numel():  # the last row (past the C++ tile of 1024) duplicates row 0, which x hits
        w[-1] = w[0]
        x.view(-1, Dm)[0] = w[0]
    x, w = x.to(dtype), w.to(dtype)
    x = draw(layout(x))
    if rare(draw, 15):
        w = w.to(draw(st.sampled_from(FLOATS)))
    metric = pick(draw, st.sampled_from(["l2", "cosine"]), ["dot", None])
    if rare(draw, 40):
        x = torch.empty(x.shape, device="meta", dtype=dtype)
    return Case("nearest_embedding", dict(x=x, weight=w, metric=metric))


@st.composite
def rounding_loss_case(draw):
    lead = _lead(draw)
    n = math.prod(lead)
    V = draw(st.integers(1, 30))
    Dm = draw(st.integers(1, 10))
    dtype = draw(st.sampled_from(FLOATS))
    x = draw(layout(draw(float_tensor(lead + (Dm,), dtype))))
    w = draw(layout(draw(float_tensor((V, Dm), dtype))))
    bias = None
    if draw(st.booleans()):
        bias = draw(float_tensor((V,), draw(st.sampled_from(FLOATS))))
    good = st.one_of(st.just(-100), st.just(-100), st.sampled_from([-1, 0, V - 1, 2**31, 2**63 - 1, -2**63]))
    ignore = pick(draw, good, [2**70, None, 2.5, True, "0"])
    vals = [draw(st.integers(0, V - 1)) for _ in range(n)]
    for i in range(n):
        if rare(draw, 4) and isinstance(ignore, int) and not isinstance(ignore, bool):
            vals[i] = ignore
    if n and rare(draw, 7):
        vals[draw(st.integers(0, n - 1))] = draw(st.sampled_from([-1, V, 156, -2**31, 2**31]))
    target = None
    for _ in range(5):
        target = int_tensor(vals, draw(st.sampled_from(INTS)))
        if target is not None:
            break
    if target is None:
        target = torch.tensor([v if -2**63 <= v < 2**63 else 0 for v in vals], dtype=torch.int64)
    target = target.reshape(lead)
    reduction = pick(draw, st.sampled_from(["mean", "sum", "none"]), ["avg"])
    grads = tuple(k for k in ("x", "weight", "bias") if (k != "bias" or bias is not None) and draw(st.booleans()))
    if rare(draw, 40):
        w = torch.empty(w.shape, device="meta", dtype=dtype)
    args = dict(x=x, weight=w, target=target, bias=bias, reduction=reduction, ignore_index=ignore)
    return Case("rounding_loss", args, grads=grads, backward=bool(grads))


def cases():
    return st.one_of(sample_categorical_case(), posterior_case(False), posterior_case(True), nearest_case(),
                     rounding_loss_case())


# ------------------------------------------------------------------------------------------------------
# running a case
# ------------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    error: tuple[str, str] | None = None  # (exception type name, message)
    value: object = None
    grads: dict = field(default_factory=dict)


def _snapshot(args: dict) -> dict:
    return {k: v.detach().clone() for k, v in args.items()
            if isinstance(v, torch.Tensor) and v.device.type != "meta" and v.layout == torch.strided}


def _unchanged(before: dict, args: dict) -> list[str]:
    return [k for k, v in before.items() if not torch.equal(torch.nan_to_num(v, 1.5, 2.5, -2.5),
                                                              torch.nan_to_num(args[k].detach(), 1.5, 2.5, -2.5))
            or bool((torch.isnan(v) != torch.isnan(args[k].detach())).any())]


def run(case: Case, backend: str) -> Outcome:
    args = dict(case.args)
    for k in case.grads:  # a fresh leaf per backend, so that gradients do not accumulate across backends
        args[k] = args[k].detach().clone().requires_grad_(True)
    before = _snapshot(args)
    fn = getattr(ops, case.op)
    try:
        out = fn(**args, backend=backend)
        grads = {}
        if case.backward and isinstance(out, torch.Tensor) and out.requires_grad:
            (out.sum() if out.ndim else out).backward()
            grads = {k: args[k].grad for k in case.grads}
    except Exception as e:  # noqa: BLE001 - compared across backends below
        return Outcome(error=(type(e).__name__, str(e)))
    changed = _unchanged(before, args)
    assert not changed, f"{backend}: modified its inputs {changed}"
    if isinstance(out, tuple):
        out = tuple(o.detach() for o in out)
    else:
        out = out.detach()
    return Outcome(value=out, grads=grads)


# ------------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------------
def _vocab(case: Case) -> int:
    a = case.args
    if case.op == "sample_categorical":
        return a["logits"].shape[-1]
    if case.op in ("categorical_posterior", "posterior_sample"):
        return a["process"].vocab_size
    return a["weight"].shape[0]


def _tol(dtype: torch.dtype) -> float:
    return 1e-9 if dtype == torch.float64 else 1e-4


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, what: str, extra: float = 0.0) -> None:
    """``max |a - b| <= rtol · (1 + max |b| + extra)`` (``extra``: the size of the terms that cancel)."""
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    assert a64.shape == b64.shape, f"{what}: shape {tuple(a64.shape)} != {tuple(b64.shape)}"
    scale = 1.0 + extra + (float(b64.abs().max()) if b64.numel() else 0.0)
    err = float((a64 - b64).abs().max()) if a64.numel() else 0.0
    assert err <= rtol * scale, f"{what}: max error {err:.3e} > {rtol:.1e} x {scale:.3e}"


def check_valid(case: Case, backend: str, o: Outcome) -> None:
    """An accepted call's output is in range and free of NaN."""
    V = _vocab(case)
    a = case.args
    if case.op == "nearest_embedding":
        idx, snapped = o.value
        assert idx.dtype == torch.int64 and idx.shape == a["x"].shape[:-1], backend
        assert bool(((idx >= 0) & (idx < V)).all()), f"{backend}: index out of range"
        assert torch.equal(snapped, a["weight"][idx]), f"{backend}: snapped is not weight[idx]"
    elif case.op == "rounding_loss":
        assert bool(torch.isfinite(o.value).all()), f"{backend}: non-finite loss {o.value}"
        assert bool((o.value >= -1e-3).all()), f"{backend}: negative loss {o.value}"
        for k, g in o.grads.items():
            assert g is not None and g.shape == a[k].shape, f"{backend}: gradient of {k}"
            assert bool(torch.isfinite(g).all()), f"{backend}: non-finite gradient of {k}"
    elif case.op == "categorical_posterior":
        p = o.value
        assert p.shape == a["x0_logits"].shape and bool(torch.isfinite(p).all()), f"{backend}: NaN probabilities"
        assert bool((p >= 0).all()), f"{backend}: negative probabilities"
        if p.numel():
            assert float((p.double().sum(-1) - 1).abs().max()) < 1e-4, f"{backend}: rows do not sum to 1"
    else:
        tok = o.value
        assert tok.dtype == torch.int64, backend
        shape = a["logits"].shape[:-1] if case.op == "sample_categorical" else a["x_t"].shape
        assert tok.shape == shape, f"{backend}: shape {tuple(tok.shape)}"
        assert bool(((tok >= 0) & (tok < V)).all()), f"{backend}: token out of range {tok}"


def _filter_near_critical(x: np.ndarray, z: np.ndarray, top_k, top_p) -> bool:
    """Whether a row's top-k / top-p set depends on rounding (a kernel may then keep another set): the
    k-th largest of ``z = x / temperature`` (float64) and the next are within rounding, or distinct logits
    ``x`` round to one ``z``; a top-p mass within rounding of ``top_p`` or weights within rounding of each
    other."""
    zs = np.sort(z[np.isfinite(z)])[::-1]
    if top_k is not None and 0 < top_k < len(z) and top_k < len(zs):
        a, b = zs[top_k - 1], zs[top_k]
        if a != b and abs(a - b) <= 1e-12 * max(1.0, abs(a)):
            return True
        xk = np.sort(x)[::-1][top_k - 1]
        if not np.array_equal(z >= a, x >= xk):
            return True
    if top_p is not None and top_p < 1.0:
        w = np.exp(z - z.max())
        if top_k is not None and top_k < len(z):
            w = np.where(z >= np.sort(z)[::-1][top_k - 1], w, 0.0)
        p = w / w.sum()
        v = np.unique(p[p > 0])
        if len(v) > 1 and (np.diff(v) <= 1e-12 * v[1:]).any():
            return True
        greater = np.array([p[p > pv].sum() for pv in v])
        if (np.abs(greater - top_p) <= 1e-9).any():
            return True
    return False


def _draw_weights(case: Case) -> torch.Tensor:
    """The reference's float64 weights of every row (the draws' CDFs)."""
    a = case.args
    if case.op == "sample_categorical":
        x = a["logits"].reshape(-1, a["logits"].shape[-1]).double()
        z = x / a["temperature"]
        k = a["top_k"] if a["top_k"] is None or a["top_k"] < x.shape[-1] else None
        return ops.filter_weights(z, k, a["top_p"])
    p = a["process"]
    kw = {k: a[k] for k in ("x_t", "t", "s", "temperature")}
    return ops.categorical_posterior_ref(p, a["x0_logits"].double(), **kw).reshape(-1, p.vocab_size).double()


def check_draws(case: Case, backend: str, got: torch.Tensor, want: torch.Tensor) -> None:
    a = case.args
    got, want = got.reshape(-1), want.reshape(-1)
    if a["temperature"] == 0:
        assert torch.equal(got, want), f"{backend}: greedy tokens differ"
        return
    diff = (got != want).nonzero().squeeze(1).tolist()
    w = _draw_weights(case)
    def critical(r):
        if case.op != "sample_categorical":
            return False
        x = a["logits"].reshape(-1, w.shape[1])[r].double()
        return _filter_near_critical(x.numpy(), (x / a["temperature"]).numpy(), a["top_k"], a["top_p"])

    for r, tok in enumerate(got.tolist()):  # every token in the reference's support
        if not critical(r):
            assert float(w[r, tok]) > 0, f"{backend}: row {r} drew {tok}, outside the support"
    if not diff:
        return
    u = R.row_uniforms(a["seed"], a["offset"], torch.tensor(diff), start=a["row_offset"])
    for r, ur in zip(diff, u.tolist()):
        if critical(r):
            continue
        c = torch.cumsum(w[r], 0)
        margin = float((c - ur * c[-1]).abs().min() / c[-1])
        assert margin < NEAR, (f"{backend}: row {r} drew {int(got[r])}, the reference {int(want[r])} "
                               f"(margin {margin:.2e})")


def check_equal(case: Case, backend: str, o: Outcome, ref: Outcome) -> None:
    a = case.args
    if case.op == "nearest_embedding":
        assert torch.equal(o.value[0], ref.value[0]), f"{backend}: indices {o.value[0]} != {ref.value[0]}"
        return
    if case.op == "rounding_loss":
        dt = a["x"].dtype
        x, w, b = a["x"].double(), a["weight"].double(), a["bias"]
        xn = float(x.reshape(-1, x.shape[-1]).norm(dim=1).max()) if x.numel() else 0.0
        wn = float(w.norm(dim=1).max())
        logit = xn * wn + (float(b.double().abs().max()) if b is not None else 0.0)  # bound on |x·w + b|
        _close(o.value, ref.value, _tol(dt), f"{backend}: loss", logit)
        gtol = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dt]
        rows = x.numel() // max(1, x.shape[-1]) if a["reduction"] != "mean" else 1
        terms = {"x": wn, "weight": xn * rows, "bias": float(rows)}  # what the softmax-weighted sums add up
        for k in case.grads:
            _close(o.grads[k], ref.grads[k], gtol, f"{backend}: gradient of {k}", terms[k])
        return
    if case.op == "categorical_posterior":
        _close(o.value, ref.value, 1e-9 if a["x0_logits"].dtype == torch.float64 else 2e-5, f"{backend}: probabilities")
        return
    check_draws(case, backend, o.value, ref.value)


STATS: dict = {}


def check_case(case: Case, names: list[str], log=None) -> None:
    outcomes = {}
    for be in names:
        if log is not None:  # the call about to run, alone in the file: what a crash report shows
            log.seek(0)
            log.truncate()
            log.write(f"backend={be}: {case.describe()}\n")
            log.flush()
            if os.environ.get("FASTDIFF_FUZZ_SELFTEST_CRASH") == be:  # tests/test_fuzz.py checks the report
                import ctypes
                ctypes.string_at(0)
        outcomes[be] = run(case, be)
    errors = {be: o.error for be, o in outcomes.items()}
    key = (case.op, "rejected" if any(e is not None for e in errors.values()) else "accepted")
    STATS[key] = STATS.get(key, 0) + 1
    if os.environ.get("FASTDIFF_FUZZ_VERBOSE"):
        print(key, next((e for e in errors.values() if e is not None), ""), flush=True)
    if any(e is not None for e in errors.values()):
        assert len(set(errors.values())) == 1, f"backends disagree: {errors}"
        name = next(iter(errors.values()))[0]
        assert name in (InputError.__name__, InputTypeError.__name__), f"not an input error: {errors}"
        return
    ref = outcomes[names[0]]
    for be, o in outcomes.items():
        check_valid(case, be, o)
        if be != names[0]:
            check_equal(case, be, o, ref)


def property_test(log_path: str | None = None):
    names = backends()
    log = open(log_path, "w") if log_path else None  # noqa: SIM115 - kept open for the whole run

    @settings(settings.get_profile(os.environ.get("FASTDIFF_FUZZ_PROFILE", "ci")))
    @given(case=cases())
    def fuzz_ops(case):
        check_case(case, names, log)

    try:
        fuzz_ops()
    finally:
        if log is not None:
            log.close()


def main() -> int:
    torch.set_num_threads(1)
    names = backends()
    print(f"fuzzing {examples()} examples on {names}", flush=True)
    try:
        property_test(os.environ.get("FASTDIFF_FUZZ_LOG"))
    except Exception:  # noqa: BLE001 - hypothesis has printed the falsifying example
        traceback.print_exc()
        return 1
    print("fuzz ok:", ", ".join(f"{op} {kind} {n}" for (op, kind), n in sorted(STATS.items())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

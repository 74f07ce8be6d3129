"""The main job before models ship: every op once, and short runs of :mod:`fastdiff.sampling` on a
tiny randomly initialised denoiser, with timings. ``python -m fastdiff`` / ``fastdiff``."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn as nn

from . import _backends, continuous, discrete, ops, sampling, schedules


class TinyDenoiser(nn.Module):
    """A 2-layer transformer encoder with a sinusoidal step embedding: tokens or vectors in, x0 out.

    Discrete: ``forward(x_t: (B, L) int64, t: (B,)) -> (B, L, V)`` logits. Continuous (``dim`` given):
    ``forward(x_t: (B, L, dim), t) -> (B, L, dim)``, an x0 estimate.
    """

    def __init__(self, vocab_size: int, width: int = 64, layers: int = 2, dim: int | None = None,
                 max_len: int = 512):
        super().__init__()
        self.width = width
        self.inp = nn.Linear(dim, width) if dim else nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.randn(max_len, width) * 0.02)
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(width, dim if dim else vocab_size)

    def step_embedding(self, t: torch.Tensor) -> torch.Tensor:
        half = self.width // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        ang = t.float()[:, None] * freqs[None]
        return self.time(torch.cat([ang.sin(), ang.cos()], -1))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.inp(x_t) + self.pos[: x_t.shape[1]] + self.step_embedding(t)[:, None]
        return self.out(self.body(h))


def _time(fn: Callable[[], object], repeat: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(seed: int = 0, quick: bool = False, print_fn: Callable[[str], None] = print) -> dict:
    """Report backends, time every op, run both sampling loops. Returns the figures."""
    from . import __version__

    torch.manual_seed(seed)
    results: dict = {"ops": {}, "sampling": {}}
    print_fn(f"fastdiff {__version__} | torch {torch.__version__} | threads {torch.get_num_threads()}")
    print_fn("backends:")
    for name, be in _backends.available().items():
        print_fn(f"  {name:<10} {'available' if be.available else 'unavailable: ' + be.reason}")

    N, D, V = (256, 64, 4096) if quick else (1024, 128, 8192)
    x = torch.randn(N, D)
    w = torch.randn(V, D)
    tgt = torch.randint(0, V, (N,))
    logits = torch.randn(N, V)
    absorbing = discrete.Absorbing(V, V - 1, schedules.mutual_info(1000))
    uniform = discrete.Uniform(V, schedules.cosine(1000))
    xt_abs = torch.full((N,), V - 1)
    xt_uni = torch.randint(0, V, (N,))
    cases = {
        f"nearest_embedding l2 N={N} D={D} V={V}": lambda: ops.nearest_embedding(x, w),
        f"nearest_embedding cosine N={N} D={D} V={V}": lambda: ops.nearest_embedding(x, w, "cosine"),
        f"rounding_loss fwd+bwd N={N} D={D} V={V}": lambda: _fwd_bwd(x, w, tgt),
        f"categorical_posterior absorbing {N}x{V}": lambda: ops.categorical_posterior(absorbing, logits, xt_abs, 500, 400),
        f"posterior_sample absorbing {N}x{V}": lambda: ops.posterior_sample(absorbing, logits, xt_abs, 500, 400, seed=seed),
        f"posterior_sample uniform {N}x{V}": lambda: ops.posterior_sample(uniform, logits, xt_uni, 500, 400, seed=seed),
        f"sample_categorical top_p=0.9 {N}x{V}": lambda: ops.sample_categorical(logits, seed=seed, top_p=0.9),
    }
    print_fn("ops (best of 3, backend=auto):")
    for name, fn in cases.items():
        sec = _time(fn)
        results["ops"][name] = sec
        print_fn(f"  {name:<48} {sec * 1e3:9.2f} ms")

    B, L, Vs, steps = (4, 32, 512, 16) if quick else (8, 64, 1000, 32)
    model = TinyDenoiser(Vs).eval()
    proc = discrete.Absorbing(Vs, Vs - 1, schedules.mutual_info(1000))
    out = sampling.sample(model, proc, shape=(B, L), steps=steps, seed=seed)
    toks, calls, dt = out.tokens, out.stats["network_calls"], out.stats["time_s"]
    left = int((toks == proc.mask_id).sum())
    results["sampling"]["discrete"] = {"seconds": dt, "tokens_per_s": B * L / dt, "network_calls": calls,
                                       "overhead_fraction": out.stats["overhead_fraction"]}
    print_fn(f"discrete absorbing sampling: B={B} L={L} V={Vs} {steps} steps of a T=1000 model: "
             f"{dt * 1e3:.0f} ms, {B * L / dt:,.0f} tokens/s, {calls} network calls, {left} masks left")
    print_fn(f"  sample 0 token ids: {toks[0, :16].tolist()} ...")

    Dc = 16
    emb = torch.randn(Vs, Dc)
    cmodel = TinyDenoiser(Vs, dim=Dc).eval()
    diff = continuous.GaussianDiffusion(schedules.sqrt(1000), parameterization="x0")
    cout = sampling.sample(cmodel, diff, shape=(B, L), steps=steps, strategy="ddim", embedding=emb,
                           clamp="last", seed=seed)
    ctoks, dt = cout.tokens, cout.stats["time_s"]
    results["sampling"]["continuous"] = {"seconds": dt, "tokens_per_s": B * L / dt}
    print_fn(f"continuous DDIM sampling + clamp + rounding: B={B} L={L} D={Dc} V={Vs} {steps} steps: "
             f"{dt * 1e3:.0f} ms, {B * L / dt:,.0f} tokens/s")
    print_fn(f"  sample 0 token ids: {ctoks[0, :16].tolist()} ...")
    print_fn("(random weights: the tokens are noise until a model is trained; see README)")
    return results


def _fwd_bwd(x, w, tgt):
    xr = x.detach().requires_grad_(True)
    wr = w.detach().requires_grad_(True)
    ops.rounding_loss(xr, wr, tgt).backward()

"""``cuda_graph=True``: whole ancestral steps (network + posterior op) replayed as CUDA graphs
(:mod:`fastdiff.sampling._graph`).

On CPU: the plumbing that does not depend on the device, run through the sampler's own loop with a stand-in
capture that re-runs the captured body into the static outputs on every "replay" (what a graph replay does to
its static tensors) and an op that reads ``(seed, offset, row_offset)`` from the counters tensor and calls the
C++ posterior kernel on the plan the graph lowered: the tokens must equal the eager path's on the same kernel
exactly, which fails if a static buffer is not refreshed, the counters or steps are stale, or the plan's
schedule gather is wrong. Also the keys, the scope and the errors.

On a GPU (``gpu`` marker; picked up by scripts/gpu.sh's ``-k cuda``): graph replay tokens equal eager tokens
exactly, for a small model and the bundled one, and the device-counter kernel equals the host-counter one.
"""

from __future__ import annotations

import pytest
import torch

from fastdiff import discrete, schedules
from fastdiff.errors import InputError
from fastdiff.ops._plan import PosteriorPlan
from fastdiff.ops.backends.cpp import posterior as cpp_posterior
from fastdiff.sampling import Sampler, as_denoiser, sample
from fastdiff.sampling._engine import _Run
from fastdiff.sampling._graph import StepGraphs, unsupported

V, MASK = 20, 19


class Model:
    """Logits that depend on the tokens, the step and an optional label (so stale buffers show)."""

    uses_time = True

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(V + 3, V, generator=g)
        self.calls = 0

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        out = self.table[x_t] + 0.2 * torch.cumsum(self.table[x_t].sum(-1, keepdim=True), 1)
        out = out + (t.to(out.dtype) / 100)[:, None, None] * self.table[V]
        if label is not None:
            out = out + label.to(out.dtype)[:, None, None] * self.table[V + 1]
        return out


def fake_capture(body):
    """A stand-in for a CUDA graph: the outputs of one run of the body are the static outputs, and a replay
    runs the body again and writes its results into them."""
    outs = body()

    def replay() -> None:
        for static, new in zip(outs, body()):
            static.copy_(new)

    return replay, outs


def counter_op(plan: PosteriorPlan, counters: torch.Tensor) -> torch.Tensor:
    """The C++ posterior kernel on the graph's plan, with the counters read from the tensor."""
    seed, offset, row0 = [v % 2**64 for v in counters.tolist()]
    return cpp_posterior.posterior(*plan.args(sample=True, seed=seed, offset=offset, row_offset=row0))


def _graph_run(model, process, shape, steps, seed, **options):
    sampler = Sampler(process, steps=steps, backend="cpp", **options)
    den = as_denoiser(model)
    run = _Run(den, process, sampler.spec, steps, shape, seed, sampler.options)
    graphs = StepGraphs(den, process, sampler.options.temperature, run.device, capture=fake_capture, op=counter_op)
    run.use_graphs(graphs)
    with torch.no_grad():
        tokens, _ = sampler.spec.loop(run)
    return tokens, run, graphs


PROCESSES = {
    "absorbing": lambda: discrete.Absorbing(V, MASK, schedules.cosine(100)),
    "uniform": lambda: discrete.Uniform(V, schedules.cosine(100)),
}


@pytest.mark.parametrize("kind", list(PROCESSES))
@pytest.mark.parametrize("options", [dict(), dict(block_size=5), dict(block_size=4, block_context="prefix"),
                                     dict(temperature=0.7)], ids=["plain", "blocks", "prefix", "temperature"])
def test_graph_plumbing_gives_the_eager_tokens(kind: str, options: dict) -> None:
    p = PROCESSES[kind]()
    shape, steps, seed = (3, 12), 7, 11
    eager = sample(Model(), p, shape=shape, steps=steps, seed=seed, backend="cpp", **options)
    tokens, run, graphs = _graph_run(Model(), p, shape, steps, seed, **options)
    assert torch.equal(tokens, eager.tokens)
    nblocks = len(run.blocks())
    assert run.finish_stats(0.0, tokens)["network_calls"] == eager.stats["network_calls"] == nblocks * steps
    # one capture per block (its position is part of the captured slice), replayed for each of its steps
    assert len(graphs.entries) == nblocks
    assert {k[2:4] for k in graphs.entries} == set(run.blocks())


def test_graphs_beyond_the_bound_are_released_and_captured_again(monkeypatch) -> None:
    from fastdiff.sampling import _graph

    monkeypatch.setattr(_graph, "MAX_GRAPHS", 2)
    p = PROCESSES["absorbing"]()
    eager = sample(Model(), p, shape=(2, 12), steps=3, seed=4, backend="cpp", block_size=3)
    tokens, run, graphs = _graph_run(Model(), p, (2, 12), 3, 4, block_size=3)
    assert torch.equal(tokens, eager.tokens)
    assert [k[2:4] for k in graphs.entries] == [(6, 9), (9, 12)]  # the two last blocks, oldest first


def test_graph_plumbing_with_a_condition_and_fixed_positions() -> None:
    p = PROCESSES["absorbing"]()
    label = torch.tensor([0, 1, 2, 1])
    fixed = torch.zeros(4, 10, dtype=torch.bool)
    fixed[:, :3] = True
    x_init = torch.randint(0, MASK, (4, 10), generator=torch.Generator().manual_seed(1))
    kw = dict(cond={"label": label}, fixed=fixed, x_init=x_init)
    eager = sample(Model(), p, shape=(4, 10), steps=5, seed=2, backend="cpp", **kw)
    tokens, _, _ = _graph_run(Model(), p, (4, 10), 5, 2, **kw)
    assert torch.equal(tokens, eager.tokens)
    assert torch.equal(tokens[:, :3], x_init[:, :3])


def test_a_body_that_cannot_be_captured_raises_naming_cuda_graph() -> None:
    def failing(body):
        raise RuntimeError("operation not permitted when stream is capturing")

    p = PROCESSES["absorbing"]()
    sampler = Sampler(p, steps=3, backend="cpp")
    den = as_denoiser(Model())
    run = _Run(den, p, sampler.spec, 3, (2, 6), 0, sampler.options)
    run.use_graphs(StepGraphs(den, p, 1.0, run.device, capture=failing, op=counter_op))
    with pytest.raises(InputError, match="cuda_graph: the step could not be captured"):
        with torch.no_grad():
            sampler.spec.loop(run)


def test_nan_logits_are_caught_after_a_replay() -> None:
    class NaNModel(Model):
        def __call__(self, x_t, t, label=None):
            out = super().__call__(x_t, t, label)
            out[0, 0, 0] = float("nan")
            return out

    p = PROCESSES["absorbing"]()
    with pytest.raises(InputError, match=r"model output at step 1 \(t=100\).*NaN"):
        _graph_run(NaNModel(), p, (2, 6), 3, 0)


def test_keys_tell_static_shapes_apart() -> None:
    x = torch.zeros(4, 8, dtype=torch.int64)
    k = StepGraphs.key(x, 0, 8, {})
    assert k == StepGraphs.key(torch.ones(4, 8, dtype=torch.int64), 0, 8, {})
    assert k != StepGraphs.key(torch.zeros(5, 8, dtype=torch.int64), 0, 8, {})
    assert k != StepGraphs.key(x, 0, 4, {})
    floats, longs = {"label": torch.zeros(4)}, {"label": torch.zeros(4).long()}
    assert StepGraphs.key(x, 0, 8, floats) != StepGraphs.key(x, 0, 8, longs)


def test_which_runs_capture_whole_steps() -> None:
    p = PROCESSES["absorbing"]()

    def spec(strategy: str, **options: object) -> tuple:
        sampler = Sampler(p, steps=4, strategy=strategy, **options)
        return sampler.spec, sampler.options

    assert unsupported(*spec("ancestral"), p) is None
    assert unsupported(*spec("ancestral", backend="cuda"), p) is None
    assert "strategy 'confidence'" in unsupported(*spec("confidence"), p)
    assert "top_k" in unsupported(*spec("ancestral", top_k=3), p)
    assert "micro_batch" in unsupported(*spec("ancestral", micro_batch=2), p)
    assert "backend 'cpp'" in unsupported(*spec("ancestral", backend="cpp"), p)
    assert "guidance" in unsupported(*spec("ancestral", guidance_scale=2.0), p)
    assert "strategy 'remask'" in unsupported(*spec("remask", eta=0.2), p)


def test_cuda_graph_on_cpu_is_refused_before_anything_runs() -> None:
    model = Model()
    with pytest.raises(InputError, match="cuda_graph: CUDA graphs need a CUDA device"):
        sample(model, PROCESSES["absorbing"](), shape=(2, 4), steps=2, cuda_graph=True, device="cpu")
    assert model.calls == 0


# ------------------------------------------------------------------------------------------------
# on a GPU
# ------------------------------------------------------------------------------------------------
needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("options", [dict(), dict(block_size=16), dict(temperature=0.8)],
                         ids=["plain", "blocks", "temperature"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_steps_replay_the_eager_tokens_on_gpu(options: dict) -> None:
    from fastdiff.testing import TinyDenoiser

    p = discrete.Absorbing(64, 63, schedules.cosine(100))
    m = TinyDenoiser(64).cuda().eval()
    kw = dict(shape=(8, 32), steps=10, seed=3, device="cuda", **options)
    eager = sample(m, p, **kw)
    sampler = Sampler(p, steps=10, cuda_graph=True, **options)
    for seed in (3, 4):  # the second run replays the graphs captured by the first, with other counters
        graphed = sampler.sample(m, shape=(8, 32), seed=seed, device="cuda")
        want = eager if seed == 3 else sample(m, p, **{**kw, "seed": 4})
        assert torch.equal(graphed.tokens, want.tokens), seed
    (_, graphs), = sampler._graphs.values()
    assert len(graphs.entries) >= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_steps_of_the_bundled_model_on_gpu() -> None:
    from fastdiff.pipeline import TextDiffusion

    td = TextDiffusion.load("discrete", device="cuda")
    kw = dict(shape=(16, 64), steps=12, seed=5, device="cuda", temperature=0.9)
    eager = sample(td.model, td.process, **kw)
    graphed = sample(td.model, td.process, cuda_graph=True, **kw)
    assert torch.equal(graphed.tokens, eager.tokens)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_posterior_counters_kernel_equals_the_host_counter_kernel() -> None:
    from fastdiff.ops._plan import int64_bits, posterior_plan
    from fastdiff.ops.backends.cuda import posterior as cuda_posterior

    p = discrete.Absorbing(300, 299, schedules.cosine(100))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 300, generator=g).cuda()
    x_t = torch.where(torch.rand(64, generator=g) < 0.6, 299, torch.randint(0, 299, (64,), generator=g)).cuda()
    tt = torch.full((64,), 70, device="cuda")
    ss = torch.full((64,), 40, device="cuda")
    plan = posterior_plan(p, logits, x_t, tt, ss, 1.0)
    for seed, offset, row0 in ((0, 0, 0), (2**64 - 1, 5, 2**40), (123, 2**63 + 1, 7)):
        want = cuda_posterior.posterior(*plan.args(sample=True, seed=seed, offset=offset, row_offset=row0))
        counters = torch.tensor([int64_bits(seed), int64_bits(offset), int64_bits(row0)], device="cuda")
        got = cuda_posterior.posterior_counters(plan.logits, plan.x_t, plan.t, plan.s, plan.kind, plan.mask_id,
                                                plan.temperature, plan.a_t, plan.a_s, plan.ab_table, plan.fact1,
                                                plan.qbar_s, plan.pair, counters)
        assert torch.equal(got, want)

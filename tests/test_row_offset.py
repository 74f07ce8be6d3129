"""Global row numbering of every random draw: ``row_offset`` of the sampling ops and ``start`` of
``fastdiff.random.uniform`` / ``randn``, on every backend available here. A slice of a batch, drawn on
its own with the slice's first global row, must give exactly the whole batch's draws for those rows:
what sharded generation (fastdiff.distributed) rests on."""

from __future__ import annotations

import pytest
import torch

from fastdiff import _backends, ops
from fastdiff import discrete as D
from fastdiff import random as R
from fastdiff import schedules as S

T = 40


def _backends_here() -> list[str]:
    out = ["reference"]
    for name in ("cpp", "triton"):
        if _backends.get(name).available and (name != "triton" or _backends.triton_interpret()):
            out.append(name)
    return out


BACKENDS = _backends_here()


def _process(kind: str, V: int):
    if kind == "absorbing":
        return D.Absorbing(V, V - 1, S.mutual_info(T))
    if kind == "uniform":
        return D.Uniform(V, S.cosine(T))
    return D.GaussianBand(V, S.cosine(T), bandwidth=3)


def _inputs(process, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = process.vocab_size
    logits = (torch.randn(*shape, V, generator=g) * 2).to(dtype)
    xt = torch.randint(0, V, shape, generator=g)
    if process.kind == "absorbing":
        xt = torch.where(torch.rand(shape, generator=g) < 0.7, torch.full_like(xt, process.mask_id), xt)
    return logits, xt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,V", [("absorbing", 37), ("uniform", 37), ("uniform", 300), ("band", 23)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_posterior_sample_slice_with_row_offset_equals_the_whole_batch(backend, kind, V, dtype) -> None:
    process = _process(kind, V)
    logits, xt = _inputs(process, (7, 5), dtype, seed=V)
    kw = {"seed": 123, "offset": 9, "temperature": 0.8, "backend": backend}
    whole = ops.posterior_sample(process, logits, xt, 30, 12, **kw)
    for k in (1, 3, 6):
        part = ops.posterior_sample(process, logits[k:], xt[k:], 30, 12, row_offset=5 * k, **kw)
        assert torch.equal(part, whole[k:]), (k, part, whole[k:])
    # without the offset the slice draws rows 0.. again: a different result (the test can fail)
    assert not torch.equal(ops.posterior_sample(process, logits[3:], xt[3:], 30, 12, **kw), whole[3:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", [{}, {"top_k": 5}, {"top_p": 0.8}, {"temperature": 0.0}])
@pytest.mark.parametrize("V", [11, 150])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_sample_categorical_slice_with_row_offset_equals_the_whole_batch(backend, opts, V, dtype) -> None:
    g = torch.Generator().manual_seed(V)
    logits = (torch.randn(6, 3, V, generator=g) * 3).to(dtype)
    kw = {"seed": 7, "offset": 4, "temperature": 1.3, "backend": backend, **opts}
    whole = ops.sample_categorical(logits, **kw)
    for k in (1, 4):
        part = ops.sample_categorical(logits[k:], row_offset=3 * k, **kw)
        assert torch.equal(part, whole[k:])
    if opts.get("temperature") != 0.0:
        assert not torch.equal(ops.sample_categorical(logits[2:], **kw), whole[2:])


@pytest.mark.parametrize("big", [2**32 - 4, 2**63 - 4, 2**64 - 9])
def test_backends_agree_with_the_reference_at_a_large_row_offset(big) -> None:
    """Rows past 2**32 use the high counter word, rows past 2**63 its top bit (no int64 row index holds
    them): every backend must carry both. ``2**64 - 9`` with 9 rows ends at the last counter row."""
    process = _process("uniform", 29)
    logits, xt = _inputs(process, (9,), torch.float32)
    ref = ops.posterior_sample(process, logits, xt, 20, 5, seed=5, row_offset=big, backend="reference")
    ref_sc = ops.sample_categorical(logits, seed=5, row_offset=big, backend="reference")
    # the reference's own counters: the row uniforms of Philox(seed; big + r, 0), words built by hand
    rows = [big + r for r in range(9)]
    w0, w1, _, _ = R.philox4x32(5, torch.tensor([r & 0xFFFFFFFF for r in rows]), torch.tensor([r >> 32 for r in rows]))
    assert torch.equal(R.row_uniforms(5, 0, 9, start=big), R.uniform_from_words(w0, w1))
    assert torch.equal(R.uniform((9,), seed=5, start=big), R.uniform_from_words(w0, w1))
    for backend in BACKENDS[1:]:
        assert torch.equal(ops.posterior_sample(process, logits, xt, 20, 5, seed=5, row_offset=big,
                                                backend=backend), ref), backend
        assert torch.equal(ops.sample_categorical(logits, seed=5, row_offset=big, backend=backend), ref_sc), backend
    whole = ops.sample_categorical(logits, seed=5, row_offset=big - 3, backend="reference")
    assert torch.equal(whole[3:], ops.sample_categorical(logits[3:], seed=5, row_offset=big, backend="reference"))


@pytest.mark.parametrize("fn", ["uniform", "randn"])
@pytest.mark.parametrize("native", [True, False])
def test_uniform_and_randn_start(fn, native, monkeypatch) -> None:
    if not native:
        monkeypatch.setattr(R, "_native_words", lambda: None)
    f = getattr(R, fn)
    whole = f((5, 4, 3), seed=11, offset=2)
    assert torch.equal(f((3, 4, 3), seed=11, offset=2, start=24), whole[2:])
    assert torch.equal(f((7,), seed=11, offset=2, start=53), whole.reshape(-1)[53:])
    assert not torch.equal(f((3, 4, 3), seed=11, offset=2), whole[2:])
    # element i uses counter row start + i: the per-row uniform of the same counters
    if fn == "uniform":
        rows = torch.arange(2**33, 2**33 + 6)
        assert torch.equal(f((6,), seed=11, offset=2, start=2**33), R.row_uniforms(11, 2, rows))


def test_native_and_torch_words_agree_with_a_start(monkeypatch) -> None:
    if R._native_words() is None:
        pytest.skip("the C++ extension is not built (the torch path is tested above)")
    for start in (0, 2**32 - 10, 2**63 - 25, 2**64 - 50):
        a = R.randn((50,), seed=3, offset=1, start=start)
        with monkeypatch.context() as m:
            m.setattr(R, "_native_words", lambda: None)
            b = R.randn((50,), seed=3, offset=1, start=start)
        assert torch.equal(a, b), start


def test_bad_row_offsets_and_starts_raise_before_any_kernel() -> None:
    process = _process("uniform", 11)
    logits, xt = _inputs(process, (4,), torch.float32)
    with pytest.raises(TypeError, match="row_offset"):
        ops.posterior_sample(process, logits, xt, 5, 2, seed=0, row_offset=1.5)
    with pytest.raises(TypeError, match="row_offset"):
        ops.sample_categorical(logits, seed=0, row_offset=True)
    with pytest.raises(ValueError, match="row_offset"):
        ops.sample_categorical(logits, seed=0, row_offset=-1)
    with pytest.raises(ValueError, match="row_offset"):
        ops.posterior_sample_ref(process, logits, xt, 5, 2, seed=0, row_offset=2**64 - 3)  # 4 rows
    with pytest.raises(ValueError, match="row_offset"):
        ops.posterior_sample(process, logits, xt, 5, 2, seed=0, row_offset=2**64)
    with pytest.raises(ValueError, match="row_offset"):
        ops.sample_categorical_ref(logits.reshape(2, 2, 11), seed=0, row_offset=2**64 - 3)
    with pytest.raises(TypeError, match="row_offset"):
        ops.sample_categorical_ref(logits, seed=0, row_offset=torch.tensor(2))
    # the last counter row is 2**64 - 1: 4 rows from 2**64 - 4 are fine
    ops.posterior_sample_ref(process, logits, xt, 5, 2, seed=0, row_offset=2**64 - 4)
    ops.sample_categorical(logits, seed=0, row_offset=2**64 - 4)
    with pytest.raises(ValueError, match="start"):
        R.uniform((3,), seed=0, start=-2)
    with pytest.raises(ValueError, match="start"):
        R.uniform((3,), seed=0, start=2**64 - 2)
    with pytest.raises(ValueError, match="start"):
        R.row_uniforms(0, 0, 3, start=2**64)
    with pytest.raises(TypeError, match="start"):
        R.randn((3,), seed=0, start="4")
    with pytest.raises(TypeError, match="start"):
        R.uniform((3,), seed=0, start=False)
    assert R.uniform((2,), seed=0, start=2**64 - 2).shape == (2,)


def test_native_philox_words_keep_the_old_signature() -> None:
    if R._native_words() is None:
        pytest.skip("the C++ extension is not built")
    from fastdiff import _C

    assert torch.equal(_C.philox_words(9, 2, 6), _C.philox_words(9, 2, 10, 0)[:6])
    assert torch.equal(_C.philox_words(9, 2, 6, start=4), _C.philox_words(9, 2, 10)[4:])

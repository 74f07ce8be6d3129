"""GlyphDiffusion (issue 17, row 2): the shipped font and its geometry, the exact render -> recognise round
trip and its noise robustness, the U-Net's shapes and conditioning, the training loss against
GaussianDiffusion's closed form, the DDIM / CFG sampling loop against a hand-written one, checkpoints,
the corpus chunks, and the named errors."""

from __future__ import annotations

import math
import random

import pytest
import torch

from fastdiff import continuous, schedules
from fastdiff.data import Document
from fastdiff.errors import InputError, InputFileNotFoundError, InputTypeError
from fastdiff.glyph import (CHARSET, FONT, REPLACEMENT_CHAR, GlyphDiffusion, GlyphUNet, Layout, cell_distances,
                            char_chunks, glyph_bank, normalise, recognise, render, shuffle_pairs, step_grid, train)
from fastdiff.glyph.unet import SOURCE_PAD

pytestmark = pytest.mark.usefixtures("one_thread")

PRINTABLE = "".join(chr(c) for c in range(32, 127))


def _bitmap(ch: str) -> torch.Tensor:
    """The 7 x 5 glyph of ``ch`` read straight from the font table."""
    return torch.tensor([[1.0 if m == "#" else 0.0 for m in row] for row in FONT[ch]])


# --- the font -------------------------------------------------------------------------------------------
def test_font_covers_printable_ascii_and_is_well_formed() -> None:
    assert CHARSET == PRINTABLE + REPLACEMENT_CHAR
    for ch in CHARSET:
        rows = FONT[ch]
        assert len(rows) == 7 and all(len(r) == 5 and set(r) <= {"#", "."} for r in rows), repr(ch)
    assert _bitmap(" ").sum() == 0
    assert all(_bitmap(ch).sum() > 0 for ch in CHARSET if ch != " ")


def test_glyphs_are_pairwise_distinct() -> None:
    flat = torch.stack([_bitmap(ch).reshape(-1) for ch in CHARSET])
    ham = (flat[:, None] - flat[None]).abs().sum(-1) + torch.eye(len(CHARSET)) * 99
    assert int(ham.min()) >= 2  # a single wrong pixel never turns one glyph into another


def test_known_glyph_pixels() -> None:
    """A few glyphs drawn by hand here, independently of the table's string form."""
    T = torch.zeros(7, 5)
    T[0, :] = 1
    T[1:, 2] = 1
    assert torch.equal(_bitmap("T"), T)
    minus = torch.zeros(7, 5)
    minus[3, :] = 1
    assert torch.equal(_bitmap("-"), minus)
    under = torch.zeros(7, 5)
    under[6, :] = 1
    assert torch.equal(_bitmap("_"), under)


# --- rendering geometry -----------------------------------------------------------------------------------
def test_layout_shape_and_capacity() -> None:
    assert Layout().shape == (16, 192) and Layout().capacity == 64
    assert Layout(cols=3, rows=5).shape == (40, 18) and Layout(cols=3, rows=5).capacity == 15


def test_render_places_each_character_in_its_cell() -> None:
    layout = Layout(cols=4, rows=3)
    text = "Ab~,x!0"
    img = render(text, layout)
    assert img.shape == (24, 24) and img.dtype == torch.float32
    assert set(img.unique().tolist()) <= {0.0, 1.0}
    for k in range(layout.capacity):
        r, c = divmod(k, layout.cols)
        cell = img[8 * r: 8 * r + 8, 6 * c: 6 * c + 6]
        want = _bitmap(text[k]) if k < len(text) else torch.zeros(7, 5)  # padding: spaces
        assert torch.equal(cell[:7, :5], want), (k, text[k:k + 1])
        assert cell[7].sum() == 0 and cell[:, 5].sum() == 0  # the blank separating row and column


def test_render_batch_equals_single_renders() -> None:
    texts = ["one", "two lines of text", ""]
    batch = render(texts, Layout(cols=8, rows=3))
    assert batch.shape == (3, 24, 48)
    for i, t in enumerate(texts):
        assert torch.equal(batch[i], render(t, Layout(cols=8, rows=3)))


def test_normalise_and_replacement_glyph() -> None:
    assert normalise("a\nb\t\u2019c\u201d\u2014") == "a b 'c\"-"
    assert normalise("na\u00efve \u4e2d") == f"na{REPLACEMENT_CHAR}ve {REPLACEMENT_CHAR}"
    layout = Layout(cols=4, rows=1)
    img = render("\u00e9", layout)
    assert torch.equal(img[:7, :5], _bitmap(REPLACEMENT_CHAR))
    assert recognise(img) == REPLACEMENT_CHAR


def test_overflow() -> None:
    layout = Layout(cols=3, rows=1)
    with pytest.raises(InputError, match="texts\\[1\\].*capacity 3"):
        render(["abc", "abcd"], layout)
    assert torch.equal(render("abcd", layout, overflow="truncate"), render("abc", layout))


def test_render_bad_inputs() -> None:
    with pytest.raises(InputTypeError, match="texts"):
        render(3)  # type: ignore[arg-type]
    with pytest.raises(InputTypeError, match="texts\\[0\\]"):
        render([b"x"])  # type: ignore[list-item]
    with pytest.raises(InputTypeError, match="layout"):
        render("x", layout=(2, 32))  # type: ignore[arg-type]
    with pytest.raises(InputError, match="cols"):
        Layout(cols=0)
    with pytest.raises(InputError, match="overflow"):
        render("x", overflow="wrap")


# --- recognition ------------------------------------------------------------------------------------------
def test_round_trip_every_character() -> None:
    layout = Layout(cols=len(CHARSET), rows=1)
    text = PRINTABLE + REPLACEMENT_CHAR
    assert recognise(render(text, layout), strip=False) == text
    # and every character in every cell position of a 2-line grid
    layout = Layout(cols=8, rows=2)
    for ch in PRINTABLE:
        assert recognise(render(ch * 16, layout), strip=False) == ch * 16


def test_round_trip_random_strings() -> None:
    rng = random.Random(0)
    layout = Layout()
    texts = ["".join(rng.choice(PRINTABLE) for _ in range(rng.randint(0, 64))) for _ in range(200)]
    out = recognise(render(texts, layout), strip=False)
    assert out == [t.ljust(64) for t in texts]
    assert recognise(render(texts, layout)) == [t.rstrip(" ") for t in texts]


def _brute_force(img: torch.Tensor, layout: Layout) -> str:
    """Nearest glyph per cell by explicit loops over the cells and the font table."""
    out = []
    for r in range(layout.rows):
        for c in range(layout.cols):
            cell = img[8 * r: 8 * r + 8, 6 * c: 6 * c + 6].double()
            best, best_d = None, math.inf
            for ch in CHARSET:
                g = torch.zeros(8, 6, dtype=torch.float64)
                g[:7, :5] = _bitmap(ch)
                d = float(((cell - g) ** 2).sum())
                if d < best_d:
                    best, best_d = ch, d
            out.append(best)
    return "".join(out)


def test_recogniser_is_the_nearest_glyph_under_noise() -> None:
    layout = Layout(cols=12, rows=2)
    g = torch.Generator().manual_seed(1)
    img = render("The quick brown fox jumps over", layout, overflow="truncate")
    noisy = img + 0.45 * torch.randn(img.shape, generator=g)
    assert recognise(noisy, strip=False) == _brute_force(noisy, layout)
    d = cell_distances(noisy)
    assert d.shape == (1, 2, 12, len(CHARSET))


def test_noise_robustness_bounds() -> None:
    """At sigma = 0.1 the closest glyph pair (2 pixels apart: distance sqrt 2, margin 0.71 = 7 sigma) is
    never confused; at sigma = 1 many cells are wrong, yet far above chance (1/96)."""
    rng = random.Random(2)
    layout = Layout()
    texts = ["".join(rng.choice(PRINTABLE) for _ in range(64)) for _ in range(50)]
    clean = render(texts, layout)
    g = torch.Generator().manual_seed(3)
    acc = {}
    for sigma in (0.1, 1.0):
        out = recognise(clean + sigma * torch.randn(clean.shape, generator=g), strip=False)
        acc[sigma] = sum(a == b for o, t in zip(out, texts) for a, b in zip(o, t)) / (64 * 50)
    assert acc[0.1] == 1.0
    assert 0.05 < acc[1.0] < 0.9


def test_recognise_bad_inputs() -> None:
    with pytest.raises(InputError, match="images.*multiples"):
        recognise(torch.zeros(16, 190))
    with pytest.raises(InputError, match="images"):
        recognise(torch.zeros(2, 2, 16, 192))
    with pytest.raises(InputTypeError, match="images"):
        recognise(torch.zeros(16, 192, dtype=torch.long))


# --- the U-Net ----------------------------------------------------------------------------------------------
SMALL = Layout(cols=4, rows=1)


def _net(**kw: int) -> GlyphUNet:
    torch.manual_seed(0)
    net = GlyphUNet(SMALL, base=8, width=16, depth=1, heads=2, **kw)
    with torch.no_grad():  # the zero-initialised output layers would hide every input
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return net.eval()


def test_unet_shapes() -> None:
    net = _net(num_labels=3, source_len=5)
    x = torch.randn(2, 8, 24)
    t = torch.tensor([1, 900])
    assert net(x, t).shape == (2, 8, 24)
    assert net(x, t, labels=torch.tensor([0, 2]), source=torch.tensor([[1, 2, 3, SOURCE_PAD, SOURCE_PAD]] * 2)
               ).shape == (2, 8, 24)


def test_zero_initialised_unet_outputs_zero() -> None:
    net = GlyphUNet(SMALL, base=8, width=16, depth=1, heads=2)
    assert torch.equal(net(torch.randn(2, 8, 24), torch.tensor([3, 4])), torch.zeros(2, 8, 24))


def test_labels_condition_the_output() -> None:
    net = _net(num_labels=2)
    x, t = torch.randn(2, 8, 24), torch.tensor([500, 500])
    a = net(x, t, labels=torch.tensor([0, 0]))
    b = net(x, t, labels=torch.tensor([1, 1]))
    assert (a - b).abs().max() > 1e-3
    # no label = the "none" embedding (index num_labels), the unconditional model of guidance
    assert torch.allclose(net(x, t), net(x, t, labels=torch.tensor([2, 2])), atol=1e-6)


def test_source_conditions_the_output() -> None:
    net = _net(source_len=4)
    x, t = torch.randn(1, 8, 24), torch.tensor([500])
    a = net(x, t, source=torch.tensor([[1, 2, 3, 4]]))
    b = net(x, t, source=torch.tensor([[5, 6, 7, 8]]))
    assert (a - b).abs().max() > 1e-3
    none = net(x, t)
    assert torch.isfinite(none).all()
    assert torch.allclose(none, net(x, t, source=torch.full((1, 4), SOURCE_PAD)), atol=1e-6)


def test_unet_timestep_matters() -> None:
    net = _net()
    x = torch.randn(1, 8, 24)
    assert (net(x, torch.tensor([1])) - net(x, torch.tensor([999]))).abs().max() > 1e-3


def test_unet_bad_inputs() -> None:
    net = _net(num_labels=2)
    x, t = torch.randn(2, 8, 24), torch.tensor([1, 2])
    with pytest.raises(InputError, match="x: expected \\(B, 8, 24\\)"):
        net(torch.randn(2, 8, 30), t)
    with pytest.raises(InputError, match="t:"):
        net(x, torch.tensor([1]))
    with pytest.raises(InputError, match="labels"):
        net(x, t, labels=torch.tensor([0, 3]))
    with pytest.raises(InputError, match="source: this model was built without"):
        net(x, t, source=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(InputError, match="labels: this model was built without"):
        _net()(x, t, labels=torch.tensor([0, 1]))
    with pytest.raises(InputError, match="heads"):
        GlyphUNet(SMALL, width=10, heads=4)
    with pytest.raises(InputTypeError, match="layout"):
        GlyphUNet((1, 4))  # type: ignore[arg-type]


# --- the diffusion model -------------------------------------------------------------------------------------
def _model(param: str = "x0", labels: tuple[str, ...] = ("a", "b"), source_len: int = 0) -> GlyphDiffusion:
    torch.manual_seed(0)
    m = GlyphDiffusion.build(SMALL, schedule="cosine", T=100, parameterization=param, scale=0.5,
                             label_names=labels, source_len=source_len, base=8, width=16, depth=1, heads=2)
    with torch.no_grad():
        for p in m.net.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    m.net.eval()
    return m


def test_encode_decode() -> None:
    m = _model()
    x = m.encode(["ab", "xyz!"])
    assert set(x.unique().tolist()) == {-0.5, 0.5}
    assert m.decode(x) == ["ab", "xyz!"]


@pytest.mark.parametrize("param", ["x0", "eps"])
def test_loss_matches_the_closed_form(param: str) -> None:
    """The loss against q_sample and the parameterisation's target written out from alpha_bar."""
    m = _model(param)
    x0 = m.encode(["abcd", "e f", "gh", "!?"])
    labels = torch.tensor([0, 1, 1, 0])
    got = m.loss(x0, labels=labels, cond_drop=0.5, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    t = torch.randint(1, 101, (4,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    drop = torch.rand(4, generator=g) < 0.5
    ab = schedules.cosine(100).alpha_bar[t].float()[:, None, None]
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    out = m.net(x_t, t, labels=torch.where(drop, torch.full_like(labels, 2), labels))
    want = ((out - (x0 if param == "x0" else noise)) ** 2).mean()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)


def test_a_few_training_steps_reduce_the_loss(tmp_path) -> None:
    m = GlyphDiffusion.build(SMALL, T=50, base=8, width=16, depth=1, heads=2, label_names=("a", "b"))
    texts = ["abcd", "efgh"] * 4
    x0 = m.encode(texts)
    with torch.no_grad():
        before = float(m.loss(x0, cond_drop=0.0, generator=torch.Generator().manual_seed(5)))
    rows = train(m, texts, labels=torch.tensor([0, 1] * 4), steps=30, batch_size=8, lr=3e-3, warmup=1,
                 out_dir=tmp_path, log_every=10, save_every=15, print_fn=lambda s: None)
    with torch.no_grad():
        after = float(m.loss(x0, cond_drop=0.0, generator=torch.Generator().manual_seed(5)))
    assert after < 0.7 * before, (before, after)
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "log.jsonl").read_text().count("\n") == 3
    back = GlyphDiffusion.load(tmp_path / "last.pt")
    assert back.extra["step"] == 30


def test_step_grid() -> None:
    assert step_grid(1000, 4) == [(1000, 750), (750, 500), (500, 250), (250, 0)]
    assert step_grid(10, 10) == [(k, k - 1) for k in range(10, 0, -1)]
    with pytest.raises(InputError, match="steps"):
        step_grid(10, 11)


def _ddim_by_hand(m: GlyphDiffusion, n: int, steps: int, seed: int, labels: torch.Tensor | None = None,
                  guidance: float = 1.0) -> torch.Tensor:
    """DDIM (eta = 0) written out: x_s = sqrt(a_s)·x0 + sqrt(1 - a_s)·eps, eps from x_t and x0."""
    ab = m.diffusion.alpha_bar
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, 24, generator=g)
    T = m.diffusion.T
    ts = [round(T * (steps - k) / steps) for k in range(steps + 1)]
    with torch.no_grad():
        for t, s in zip(ts[:-1], ts[1:]):
            tt = torch.full((n,), t)
            x0 = m.net(x, tt, labels=labels)
            if labels is not None and guidance != 1.0:
                x0u = m.net(x, tt)
                x0 = x0u + guidance * (x0 - x0u)
            a_t, a_s = float(ab[t]), float(ab[s])
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
            x = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * eps
    return x


def test_ddim_sampling_matches_a_hand_written_loop() -> None:
    m = _model()
    got = m.sample_images(3, steps=5, seed=4)
    assert torch.allclose(got, _ddim_by_hand(m, 3, 5, 4), atol=1e-5)


def test_guided_sampling_matches_a_hand_written_loop() -> None:
    m = _model()
    got = m.sample_images(2, steps=4, seed=5, labels=["b", "a"], guidance=2.5)
    want = _ddim_by_hand(m, 2, 4, 5, labels=torch.tensor([1, 0]), guidance=2.5)
    assert torch.allclose(got, want, atol=1e-5)
    other = m.sample_images(2, steps=4, seed=5, labels=["a", "b"], guidance=2.5)
    assert (got - other).abs().max() > 1e-4  # the label changes the sample


def test_snapped_samples_are_exact_glyphs() -> None:
    m = _model()
    x = m.sample_images(3, steps=4, seed=6, snap=True)  # DDIM's last step returns the snapped x0
    assert float(cell_distances(m._to_img(x)).min(-1).values.max()) < 1e-8
    assert m.decode(x) == recognise(m._to_img(x))
    plain = m.sample_images(3, steps=4, seed=6, strategy="ddpm")
    assert plain.shape == (3, 8, 24) and torch.isfinite(plain).all()


def test_source_interface() -> None:
    m = _model(labels=(), source_len=6)
    ids = m.source_ids(["ab", "abcdefgh"])
    assert ids.tolist() == [[CHARSET.index("a"), CHARSET.index("b")] + [SOURCE_PAD] * 4,
                            [CHARSET.index(c) for c in "abcdef"]]
    a = m.sample_images(2, steps=3, seed=0, source=["ab", "cd"])
    b = m.sample_images(2, steps=3, seed=0, source=["xy", "zw"])
    assert (a - b).abs().max() > 1e-4
    x0 = m.encode(["ab", "cd"])
    assert torch.isfinite(m.loss(x0, source=ids, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(InputError, match="source: expected 3 texts"):
        m.sample_images(3, steps=2, source=["a", "b"])


def test_checkpoint_round_trip(tmp_path) -> None:
    m = _model()
    m.save(tmp_path / "m.pt", step=12)
    back = GlyphDiffusion.load(tmp_path / "m.pt")
    assert back.label_names == ["a", "b"] and back.scale == 0.5 and back.layout == SMALL
    assert torch.equal(back.sample_images(2, steps=3, seed=1, labels="a"), m.sample_images(2, steps=3, seed=1,
                                                                                            labels="a"))
    torch.save({"format": "other"}, tmp_path / "bad.pt")
    with pytest.raises(InputError, match="checkpoint: .* not a glyph-diffusion checkpoint"):
        GlyphDiffusion.load(tmp_path / "bad.pt")
    with pytest.raises(InputFileNotFoundError, match="checkpoint"):
        GlyphDiffusion.load(tmp_path / "missing.pt")


def test_model_bad_inputs() -> None:
    m = _model()
    with pytest.raises(InputError, match="label: 'c' is not one of"):
        m.sample_images(2, steps=2, labels="c")
    with pytest.raises(InputError, match="label: expected 2 labels"):
        m.sample_images(2, steps=2, labels=["a"])
    with pytest.raises(InputError, match="strategy"):
        m.sample_images(1, steps=2, strategy="euler")
    with pytest.raises(InputError, match="source: this model was built without"):
        m.sample_images(1, steps=2, source=["x"])
    with pytest.raises(InputError, match="label_names"):
        GlyphDiffusion(GlyphUNet(SMALL, base=8, width=16, num_labels=2), m.diffusion, label_names=["a"])
    with pytest.raises(InputError, match="scale"):
        GlyphDiffusion(m.net, m.diffusion, scale=0.0, label_names=["a", "b"])
    with pytest.raises(InputTypeError, match="diffusion"):
        GlyphDiffusion(m.net, "cosine", label_names=["a", "b"])  # type: ignore[arg-type]
    with pytest.raises(InputError, match="labels: expected a \\(2,\\)"):
        train(m, ["a", "b"], labels=torch.tensor([0]), steps=1)


# --- corpus chunks -----------------------------------------------------------------------------------------------
def _docs() -> list[Document]:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    docs = []
    for i in range(40):
        src = "reference" if i % 4 == 0 else "library"
        docs.append(Document(" ".join(words[(i + k) % len(words)] for k in range(30)) + "\n\nmore  text here.",
                             src, f"doc{i}"))
    return docs


def test_char_chunks() -> None:
    docs = _docs()
    texts, labels = char_chunks(docs, 20, "all")
    assert all(len(t) == 20 for t in texts)
    counts = labels.bincount().tolist()
    assert counts[0] == counts[1] > 0  # balanced
    for t, lab in zip(texts, labels.tolist()):
        src = "reference" if lab == 0 else "library"
        body = " " + " ".join(" ".join(d.text.split()) for d in docs if d.source == src)
        assert (" " + t) in body  # a contiguous piece of that source's text that starts at a word
        assert "  " not in t and "\n" not in t
    unbalanced = char_chunks(docs, 20, "all", balance=False)[1].bincount().tolist()
    assert unbalanced[1] > unbalanced[0] == counts[0]
    with pytest.raises(InputError, match="attributes"):
        char_chunks(docs, 20, attributes=("library",))
    with pytest.raises(InputError, match="no 'all' chunk of source 'nope'"):
        char_chunks(docs, 20, "all", attributes=("library", "nope"))
    with pytest.raises(InputTypeError, match="docs"):
        char_chunks("text", 20)  # type: ignore[arg-type]


def test_gaussian_diffusion_is_the_process() -> None:
    m = _model()
    assert isinstance(m.diffusion, continuous.GaussianDiffusion)
    assert torch.equal(m.diffusion.alpha_bar, schedules.cosine(100).alpha_bar)


# --- the command line --------------------------------------------------------------------------------------------
def test_cli_generate_from_a_glyph_checkpoint(tmp_path, capsys) -> None:
    from fastdiff.cli import main
    from fastdiff.glyph import is_glyph_checkpoint

    m = _model()
    # a trained-looking model: recognisable text needs weights that draw glyphs, any output will do here
    m.save(tmp_path / "g.pt", step=3)
    assert is_glyph_checkpoint(tmp_path / "g.pt") and not is_glyph_checkpoint(tmp_path) \
        and not is_glyph_checkpoint("discrete")
    code = main(["generate", "-c", str(tmp_path / "g.pt"), "-n", "2", "--steps", "3", "--label", "b",
                 "--guidance", "2", "--seed", "4", "--quiet", "--threads", "1"])
    assert code == 0
    want = m.generate(2, steps=3, labels="b", guidance=2.0, seed=4)
    assert capsys.readouterr().out.split("\n")[:2] == want
    assert main(["generate", "-c", str(tmp_path / "g.pt"), "--prompt", "x"]) == 2
    assert "--prompt: not available for a glyph-diffusion checkpoint" in capsys.readouterr().err
    assert main(["generate", "-c", str(tmp_path / "g.pt"), "--strategy", "ancestral"]) == 2
    assert "--strategy" in capsys.readouterr().err


# --- text-to-text (source-conditioned) ----------------------------------------------------------------------------
def test_shuffle_pairs() -> None:
    texts = ["the quick brown fox jumps", "over the lazy dog and the cat", "one", ""]
    pairs = shuffle_pairs(texts, seed=3)
    assert [t for _, t in pairs] == texts
    for s, t in pairs:
        assert sorted(s.split()) == sorted(t.split())  # a permutation of the target's words
        assert len(s) == len(t)  # single-spaced words keep their length
    assert shuffle_pairs(texts, seed=3) == pairs  # seeded
    # a pair depends on its text, index and seed only, not on the other texts
    assert shuffle_pairs(texts[:2], seed=3) == pairs[:2]
    many = ["a b c d e f g h"] * 20
    sources = {s for s, _ in shuffle_pairs(many, seed=0)}
    assert len(sources) > 10  # each index draws its own order
    assert {s for s, _ in shuffle_pairs(many, seed=1)} != sources
    # the orders look uniform: every word starts a source about equally often (8 words, 800 draws)
    firsts = [s.split()[0] for s, _ in shuffle_pairs(["a b c d e f g h"] * 800, seed=0)]
    assert all(60 <= firsts.count(w) <= 140 for w in "abcdefgh")
    with pytest.raises(InputTypeError, match="texts"):
        shuffle_pairs("a b c")
    with pytest.raises(InputTypeError, match="texts"):
        shuffle_pairs(["a", 3])
    with pytest.raises(InputTypeError, match="seed"):
        shuffle_pairs(["a"], seed=1.5)


def test_source_conditioned_training_uses_the_source(tmp_path) -> None:
    """A tiny text-to-text model trained to copy its source: the loss falls, and afterwards the true source
    explains the target better than another pair's source (so the net reads it), and sampling depends on it."""
    torch.manual_seed(0)
    m = GlyphDiffusion.build(SMALL, T=50, base=8, width=16, depth=1, heads=2, source_len=4)
    texts = ["abcd", "wxyz", "ab  ", "  yz"]
    src = m.source_ids(texts)
    x0 = m.encode(texts)

    def loss(source: torch.Tensor) -> float:
        with torch.no_grad():  # many (t, noise) draws, the same for both sources
            return float(sum(m.loss(x0, source=source, cond_drop=0.0, generator=torch.Generator().manual_seed(k))
                             for k in range(8)))

    before = loss(src)
    rows = train(m, texts, sources=texts, steps=80, batch_size=8, lr=3e-3, warmup=1, cond_drop=0.1,
                 out_dir=tmp_path, log_every=40, save_every=80, print_fn=lambda s: None)
    assert [r["step"] for r in rows] == [40, 80]
    after = loss(src)
    assert after < 0.5 * before, (before, after)
    wrong = loss(src[[1, 0, 3, 2]])
    assert after < 0.8 * wrong, (after, wrong)
    a = m.sample_images(2, steps=5, seed=1, source=["abcd", "abcd"])
    b = m.sample_images(2, steps=5, seed=1, source=["wxyz", "wxyz"])
    assert (a - b).abs().max() > 1e-2
    back = GlyphDiffusion.load(tmp_path / "last.pt")
    assert back.net.source_len == 4 and not back.label_names
    assert torch.equal(back.sample_images(2, steps=5, seed=1, source=["abcd", "abcd"]), a)
    with pytest.raises(InputError, match="sources: expected 4 texts"):
        train(m, texts, sources=texts[:3], steps=1)


def test_cli_generate_with_a_source(tmp_path, capsys) -> None:
    from fastdiff.cli import main

    m = _model(labels=(), source_len=4)
    m.save(tmp_path / "t2t.pt", step=1)
    code = main(["generate", "-c", str(tmp_path / "t2t.pt"), "-n", "2", "--steps", "3", "--source", "ab c",
                 "--guidance", "1.5", "--seed", "2", "--quiet", "--threads", "1"])
    assert code == 0, capsys.readouterr().err
    # the same sampling loop written by hand: DDIM on the source's glyph ids, guided by the source-free output
    ids = torch.tensor([[CHARSET.index(c) for c in "ab c"]] * 2)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, *SMALL.shape, generator=g)
    with torch.no_grad():
        for t, s in step_grid(100, 3):
            tt = torch.full((2,), t)
            none = m.net(x, tt)
            out = none + 1.5 * (m.net(x, tt, source=ids) - none)
            x = m.diffusion.ddim_step(out, x, t, s, eta=0.0, generator=g)
    assert capsys.readouterr().out.split("\n")[:2] == m.decode(x)
    # errors name the option
    assert main(["generate", "-c", str(tmp_path / "t2t.pt"), "--source", "abcde"]) == 2
    assert "--source: 5 characters, this checkpoint reads at most 4" in capsys.readouterr().err
    assert main(["generate", "-c", str(tmp_path / "t2t.pt"), "--label", "a"]) == 2
    assert "--label:" in capsys.readouterr().err
    _model().save(tmp_path / "label.pt", step=1)
    assert main(["generate", "-c", str(tmp_path / "label.pt"), "--source", "ab"]) == 2
    err = capsys.readouterr().err
    assert "--source:" in err and "without a source" in err and "train-t2t" in err


def test_t2t_scores_of_the_script() -> None:
    from tests._scripts import load_script

    mod = load_script("glyph_diffusion")
    targets = ["ab ce", "zz  "]
    got = mod.t2t_scores(["ab cd", "xy"], targets)
    # by hand: "ab c" right of "ab ce" (4), nothing of "zz  " (the missing characters count wrong): 4 / 9
    assert got["char_accuracy"] == pytest.approx(4 / 9)
    assert got["exact_match"] == 0.0
    assert got["bag_of_words"] == pytest.approx(1 / 3)  # "ab" of ab, ce, zz
    assert 0.0 <= got["bleu"] < 100.0
    same = mod.t2t_scores(["ab ce", "zz"], targets)  # trailing spaces do not matter for exact match
    assert same["exact_match"] == 1.0 and same["bag_of_words"] == 1.0 and same["bleu"] == pytest.approx(100.0)
    assert same["char_accuracy"] == pytest.approx(7 / 9)

"""fastdiff.latent (LD4LG, Lovelace et al. 2023): the compressor / reconstructor, the autoencoder's
objective through a frozen decoder, the latent diffusion (self-conditioning, classifier-free guidance),
checkpoints and the command-line paths, all on tiny models (word-level tokenizer, one-layer BART)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastdiff.data import Document, TextTokenizer
from fastdiff.errors import InputError, InputFileNotFoundError, InputTypeError
from fastdiff.latent import (Compressor, LatentAutoencoder, LatentConfig, LatentDiffusion, Reconstructor,
                             build_small_plm, is_latent_checkpoint, reconstruction_scores, run_stages, step_pairs,
                             train_autoencoder, train_plm)

pytest.importorskip("transformers")

WORDS = ("the module returns a list of values when the file is open and the socket is closed or the "
         "thread waits for the lock before it reads data from the buffer").split()


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    return None


def _tokenizer() -> TextTokenizer:
    return TextTokenizer.train([" ".join(WORDS)] * 3, vocab_size=64, kind="word", min_frequency=1)


def _rows(tok: TextTokenizer, n: int, L: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, tok.vocab_size, (n, L), generator=g)


# --- compressor / reconstructor --------------------------------------------------------------------------
def test_compressor_shapes_normalisation_and_mask() -> None:
    torch.manual_seed(0)
    comp = Compressor(d_model=24, n_latents=5, d_latent=12, width=16, layers=2, heads=4).eval()
    states = torch.randn(3, 9, 24)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, 6:] = False
    z = comp(states, mask)
    assert z.shape == (3, 5, 12)
    # LayerNorm without affine: every latent vector has mean 0 and (biased) variance 1 over its features
    assert torch.allclose(z.mean(-1), torch.zeros(3, 5), atol=1e-5)
    assert torch.allclose(z.var(-1, unbiased=False), torch.ones(3, 5), atol=1e-3)
    # masked states cannot matter; real ones do
    changed = states.clone()
    changed[0, 6:] = 100.0
    assert torch.allclose(comp(changed, mask)[0], z[0], atol=1e-5)
    changed[0, 0] += 1.0
    assert not torch.allclose(comp(changed, mask)[0], z[0], atol=1e-3)
    # a row depends on its own states only
    other = states.clone()
    other[1] = torch.randn(9, 24)
    assert torch.allclose(comp(other, mask)[2], z[2], atol=1e-5)


def test_reconstructor_shapes() -> None:
    rec = Reconstructor(d_model=24, length=7, d_latent=12, width=16, layers=1, heads=2)
    assert rec(torch.randn(2, 5, 12)).shape == (2, 7, 24)


def test_compressor_and_reconstructor_bad_inputs() -> None:
    comp = Compressor(d_model=8, n_latents=2, d_latent=4, width=8, layers=1, heads=2)
    with pytest.raises(InputError, match="states"):
        comp(torch.randn(2, 3, 9))
    with pytest.raises(InputError, match="mask"):
        comp(torch.randn(2, 3, 8), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(InputError, match="mask: every row"):
        comp(torch.randn(2, 3, 8), torch.tensor([[True] * 3, [False] * 3]))
    with pytest.raises(InputError, match="width"):
        Compressor(d_model=8, width=10, heads=4)
    with pytest.raises(InputError, match="n_latents"):
        Compressor(d_model=8, n_latents=0)
    with pytest.raises(InputError, match="latents"):
        Reconstructor(d_model=8, length=3, d_latent=4, width=8, heads=2)(torch.randn(1, 2, 5))


# --- the autoencoder through a frozen decoder --------------------------------------------------------------
@pytest.fixture(scope="module")
def copier() -> tuple:
    """A one-layer BART taught to copy 4 rows of 8 tokens (mask_rate 0), and the rows."""
    torch.set_num_threads(1)
    tok = _tokenizer()
    torch.manual_seed(0)
    plm = build_small_plm(tok, length=8, width=32, layers=1, heads=2, dropout=0.0)
    rows = _rows(tok, 4, 8)
    train_plm(plm, rows, steps=150, batch_size=4, lr=3e-3, warmup=10, mask_rate=0.0, print_fn=lambda s: None)
    return plm, rows


def test_plm_is_frozen_and_generates_exact_lengths(copier: tuple) -> None:
    plm, rows = copier
    assert not any(p.requires_grad for p in plm.model.parameters())
    out = plm.generate(plm.encode(rows), 8)
    assert out.shape == (4, 8)
    assert plm.generate(plm.encode(rows), 8, num_beams=2).shape == (4, 8)
    # the PLM itself copies its input (what the autoencoder has to preserve through the latents)
    assert (out == rows).float().mean() > 0.9


def test_autoencoder_loss_decreases_and_round_trip_reconstructs(copier: tuple) -> None:
    plm, rows = copier
    torch.manual_seed(1)
    ae = LatentAutoencoder(plm.d_model, 8, n_latents=4, d_latent=16, width=32, layers=1, heads=2)
    model = LatentDiffusion(plm, ae)
    before = [p.detach().clone() for p in plm.model.parameters()]
    with torch.no_grad():
        first = float(ae.loss(plm, rows))
    log = train_autoencoder(model, rows, steps=250, batch_size=4, lr=3e-3, warmup=10, noise=0.0, log_every=50,
                            print_fn=lambda s: None)
    assert log[-1]["loss"] < 0.2 * first
    assert all(torch.equal(a, b) for a, b in zip(before, plm.model.parameters()))  # the PLM stayed frozen
    scores = reconstruction_scores(model, rows)
    # independent check of the scores: decode and compare here
    out = model.reconstruct(rows)
    assert scores["token_accuracy"] == pytest.approx(float((out == rows).float().mean()))
    assert scores["exact_match"] == pytest.approx(float((out == rows).all(1).float().mean()))
    assert scores["token_accuracy"] > 0.9


def test_autoencoder_loss_is_the_decoder_cross_entropy(copier: tuple) -> None:
    plm, rows = copier
    torch.manual_seed(2)
    ae = LatentAutoencoder(plm.d_model, 8, n_latents=3, d_latent=8, width=16, layers=1, heads=2)
    from transformers.modeling_outputs import BaseModelOutput

    with torch.no_grad():
        got = float(ae.loss(plm, rows))
        states = ae.decode(ae.encode(plm.encode(rows)))
        # teacher forcing by hand: decoder input = [start] + rows[:, :-1]
        start = torch.full((4, 1), plm.model.config.decoder_start_token_id)
        dec_in = torch.cat([start, rows[:, :-1]], 1)
        logits = plm.model(encoder_outputs=BaseModelOutput(last_hidden_state=states),
                           decoder_input_ids=dec_in).logits
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows.flatten())
    assert got == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(InputError, match="ids"):
        ae.loss(plm, rows[:, :5])


# --- the diffusion ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model() -> LatentDiffusion:
    tok = _tokenizer()
    torch.manual_seed(0)
    plm = build_small_plm(tok, length=6, width=16, layers=1, heads=2)
    model = LatentDiffusion(plm, LatentAutoencoder(16, 6, n_latents=3, d_latent=8, width=16, layers=1, heads=2))
    model.attach_denoiser(schedule="cosine", T=20, label_names=["a", "b"], width=16, layers=1, heads=2)
    torch.manual_seed(1)
    for p in model.denoiser.parameters():  # non-trivial outputs (the adaLN head starts at zero)
        torch.nn.init.normal_(p, std=0.3)
    return model


def test_diffusion_loss_and_sampling_shapes(tiny_model: LatentDiffusion) -> None:
    m = tiny_model
    z0 = torch.randn(5, 3, 8)
    loss = m.loss(z0, torch.tensor([0, 1, 0, 1, 2]), generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    net = m.denoiser
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in
               (net.input_proj.weight, net.output_proj.weight, net.label_embedding.weight))
    m.denoiser.zero_grad(set_to_none=True)
    z = m.sample_latents(4, steps=5, labels="b", guidance=2.0, seed=3)
    assert z.shape == (4, 3, 8) and torch.isfinite(z).all()
    assert torch.equal(z, m.sample_latents(4, steps=5, labels="b", guidance=2.0, seed=3))
    texts = m.generate(2, steps=4, strategy="ddpm", seed=1)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_guidance_one_is_the_conditional_model_and_null_label(tiny_model: LatentDiffusion) -> None:
    m = tiny_model
    net = m.denoiser
    x, t = torch.randn(4, 3, 8), torch.tensor([3, 7, 11, 20])
    sc = torch.randn(4, 3, 8)
    lab = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        cond = net(x, t, x_self_cond=sc, label=lab)
        null = net(x, t, x_self_cond=sc, label=torch.full((4,), 2))  # the null label = num_labels
        assert torch.equal(m.denoise(x, t, x_self_cond=sc, labels=lab, guidance=1.0), cond)
        assert torch.allclose(m.denoise(x, t, x_self_cond=sc, labels=None), null)
        w = 3.0
        assert torch.allclose(m.denoise(x, t, x_self_cond=sc, labels=lab, guidance=w), null + w * (cond - null),
                              atol=1e-5)
        assert not torch.allclose(cond, null, atol=1e-4)  # the label matters, so the checks above can fail


def test_sampling_feeds_back_the_x0_estimate(tiny_model: LatentDiffusion) -> None:
    m = tiny_model
    net = m.denoiser
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    orig = net.forward

    def spy(x_t: torch.Tensor, t: torch.Tensor, **kw: object) -> torch.Tensor:
        out = orig(x_t, t, **kw)
        seen.append((kw["x_self_cond"].clone(), out.clone()))
        return out

    net.forward = spy
    try:
        m.sample_latents(2, steps=4, seed=0)  # unconditional: one call per step
    finally:
        del net.forward
    assert len(seen) == 4
    assert torch.equal(seen[0][0], torch.zeros_like(seen[0][0]))
    for k in range(1, 4):  # x0 parameterisation: the estimate is the previous output
        assert torch.equal(seen[k][0], seen[k - 1][1])


def test_training_drops_labels_to_the_null_label(tiny_model: LatentDiffusion) -> None:
    m = tiny_model
    got: list[torch.Tensor] = []
    orig = m.denoiser.forward

    def spy(x_t: torch.Tensor, t: torch.Tensor, **kw: object) -> torch.Tensor:
        got.append(kw["label"].clone())
        return orig(x_t, t, **kw)

    m.denoiser.forward = spy
    try:
        m.loss(torch.randn(200, 3, 8), torch.zeros(200, dtype=torch.long), cond_drop=0.25,
               self_cond_rate=0.0, generator=torch.Generator().manual_seed(0))
        all_null = got[-1].clone()
        m.loss(torch.randn(4, 3, 8), torch.zeros(4, dtype=torch.long), cond_drop=1.0, self_cond_rate=0.0)
    finally:
        del m.denoiser.forward
    frac = float((all_null == 2).float().mean())
    assert set(all_null.tolist()) <= {0, 2} and 0.15 < frac < 0.35
    assert torch.equal(got[-1], torch.full((4,), 2))


def test_bad_arguments_name_them(tiny_model: LatentDiffusion) -> None:
    m = tiny_model
    with pytest.raises(InputError, match="label: 'c'"):
        m.sample_latents(2, steps=2, labels="c")
    with pytest.raises(InputError, match="strategy"):
        m.sample_latents(2, steps=2, strategy="ancestral")
    with pytest.raises(InputError, match="steps"):
        m.sample_latents(2, steps=21)
    with pytest.raises(InputError, match="guidance"):
        m.sample_latents(2, steps=2, guidance=float("nan"))
    with pytest.raises(InputError, match="cond_drop"):
        m.loss(torch.randn(2, 3, 8), cond_drop=1.5)
    with pytest.raises(InputTypeError, match="plm"):
        LatentDiffusion(object(), m.autoencoder)
    with pytest.raises(InputError, match="d_model"):
        LatentDiffusion(m.plm, LatentAutoencoder(17, 6, n_latents=3, d_latent=8, width=16, layers=1, heads=2))
    with pytest.raises(InputError, match="unknown LatentConfig fields"):
        LatentConfig.from_dict({"n_latent": 4})
    with pytest.raises(InputError, match="n_latents"):
        LatentConfig(n_latents=0)
    with pytest.raises(InputError, match="width"):
        LatentConfig(width=130, heads=4)
    with pytest.raises(InputError, match="ae_lr: must be > 0"):
        LatentConfig(ae_lr=0.0)
    with pytest.raises(InputTypeError, match="self_condition"):
        LatentConfig(self_condition=1)
    with pytest.raises(InputError, match="with stage all"):
        run_stages(LatentConfig(), "/nonexistent/x", stage="all", steps=3)
    assert step_pairs(10, 3) == [(10, 7), (7, 3), (3, 0)]


def test_save_load_round_trip(tiny_model: LatentDiffusion, tmp_path: Path) -> None:
    m = tiny_model
    m.save(tmp_path / "ck")
    assert is_latent_checkpoint(tmp_path / "ck") and not is_latent_checkpoint(tmp_path)
    back = LatentDiffusion.load(tmp_path / "ck")
    assert back.label_names == ["a", "b"] and back.seq_len == 6
    assert torch.equal(back.sample_latents(2, steps=3, labels="a", seed=5), m.sample_latents(2, steps=3, labels="a",
                                                                                             seed=5))
    ids = torch.randint(4, 30, (2, 6))
    assert torch.equal(back.reconstruct(ids), m.reconstruct(ids))
    m.save(tmp_path / "half", fp16=True)
    half = LatentDiffusion.load(tmp_path / "half")
    assert torch.allclose(half.latents(ids), m.latents(ids), atol=0.1)
    with pytest.raises(InputError, match="not a latent-diffusion checkpoint"):
        LatentDiffusion.load(tmp_path)


# --- command line ----------------------------------------------------------------------------------------
def _corpus(tmp_path: Path) -> Path:
    import random

    rng = random.Random(0)
    f = tmp_path / "corpus.txt"
    f.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(40)) + "\n")
    return f


TINY = ["--set", "plm_width=16", "--set", "plm_layers=1", "--set", "plm_heads=2", "--set", "n_latents=2",
        "--set", "d_latent=8", "--set", "ae_width=16", "--set", "ae_layers=1", "--set", "ae_heads=2",
        "--width", "16", "--layers", "1", "--heads", "2", "--T", "20", "--batch-size", "4", "--warmup", "1",
        "--set", "plm_copy_steps=2"]


def test_cli_train_generate_eval_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from fastdiff.cli import main

    data = _corpus(tmp_path)
    tok = _tokenizer()
    tok.save(tmp_path / "tok.json")
    out = tmp_path / "run"
    base = ["train", "--family", "latent", "--task", "lm", "--seq-len", "8", "--data", str(data), "--tokenizer",
            str(tmp_path / "tok.json"), "--out", str(out), "--no-progress", *TINY]
    assert main([*base, "--stage", "plm", "--steps", "3"]) == 0
    assert main([*base, "--stage", "ae", "--steps", "3"]) == 0
    assert main([*base, "--stage", "diffusion", "--steps", "3", "--export", str(tmp_path / "exp")]) == 0
    capsys.readouterr()
    assert is_latent_checkpoint(out) and is_latent_checkpoint(tmp_path / "exp")
    stages = [json.loads(line)["stage"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert stages[0] == "plm" and stages[-1] == "diffusion" and "ae" in stages and "plm-copy" in stages
    assert main(["generate", "-c", str(out), "-n", "3", "--steps", "4", "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert [line.split(" ")[0] for line in lines] == ["[0]", "[1]", "[2]"]
    want = LatentDiffusion.load(out).generate(3, steps=4, seed=0)
    assert [line[4:] for line in lines] == [" ".join(t.split()) for t in want]
    assert main(["eval", "-c", str(out), "--samples", "2", "--steps", "2", "--json", str(tmp_path / "e.json"),
                 "--fit-rows", "4", "--data", str(data)]) == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert set(res["samples"]) >= {"gen_ppl", "distinct_1", "distinct_2"} and "reconstruction" in res
    # a fresh run into a directory that holds a checkpoint is refused; --overwrite replaces it (stage all)
    assert main([*base, "--set", "plm_steps=2", "--set", "ae_steps=2", "--set", "diffusion_steps=2"]) == 2
    assert "already holds a latent checkpoint" in capsys.readouterr().err
    assert main([*base, "--set", "plm_steps=2", "--set", "ae_steps=2", "--set", "diffusion_steps=2",
                 "--overwrite"]) == 0
    assert json.loads((out / "latent.json").read_text())["diffusion_steps"] == 2


def test_stage_plm_runs_the_copy_phase_of_plm_copy_steps(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``plm_copy_steps`` (the bundled PLM's second, copy-only phase) is run by stage plm after the masking
    phase, logged as "plm-copy" and recorded in latent.json; 0 skips it. The copied PLM is exactly the
    masking-phase PLM trained further by train_plm with mask rate 0, ``plm_copy_lr``, warm-up
    PLM_COPY_WARMUP and seed + 1 (what scripts/latent_diffusion.py plm-copy ran for the shipped one)."""
    from fastdiff.cli import main
    from fastdiff.data import corpus
    from fastdiff.latent import PLM, latent_data
    from fastdiff.latent.train import PLM_COPY_WARMUP

    data = _corpus(tmp_path)
    tok = _tokenizer()
    tok.save(tmp_path / "tok.json")
    base = ["train", "--family", "latent", "--task", "lm", "--seq-len", "8", "--data", str(data), "--tokenizer",
            str(tmp_path / "tok.json"), "--no-progress", "--log-every", "1", "--stage", "plm", "--steps", "2", *TINY]
    assert main([*base, "--out", str(tmp_path / "a"), "--set", "plm_copy_steps=0"]) == 0
    assert main([*base, "--out", str(tmp_path / "b"), "--set", "plm_copy_steps=3", "--set", "plm_copy_lr=5e-3"]) == 0
    capsys.readouterr()

    def log(run: str) -> list[tuple[str, int]]:
        return [(r["stage"], r["step"]) for r in map(json.loads, (tmp_path / run / "train_log.jsonl").read_text()
                                                          .splitlines())]

    assert log("a") == [("plm", 1), ("plm", 2)]
    assert log("b") == [("plm", 1), ("plm", 2), ("plm-copy", 1), ("plm-copy", 2), ("plm-copy", 3)]
    assert json.loads((tmp_path / "a" / "latent.json").read_text())["plm_copy_steps"] == 0
    assert json.loads((tmp_path / "b" / "latent.json").read_text())["plm_copy_steps"] == 3
    assert json.loads((tmp_path / "b" / "latent_config.json").read_text())["plm_copy_steps"] == 3
    plm_a, plm_b = PLM.load(tmp_path / "a" / "plm"), PLM.load(tmp_path / "b" / "plm")
    tokens = latent_data(corpus.load_texts([str(data)]), plm_a, 8, "lm", "train")[0]
    train_plm(plm_a, tokens, steps=3, batch_size=4, lr=5e-3, warmup=PLM_COPY_WARMUP, mask_rate=0.0, seed=1,
              print_fn=lambda s: None)
    a, b = plm_a.model.state_dict(), plm_b.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a0 = PLM.load(tmp_path / "a" / "plm").model.state_dict()
    assert not all(torch.equal(a0[k], b[k]) for k in a0)  # the phase did change the weights


@pytest.mark.parametrize("argv, message", [
    (["--kind", "uniform"], "--kind: not used by --family latent"),
    (["--steps", "3"], "--steps: with --stage all"),
    (["--set", "n_latent=3"], "unknown LatentConfig fields ['n_latent']"),
    (["--set", "n_latents=0"], "n_latents: must be >= 1"),
    (["--set", "plm_copy_steps=-1"], "plm_copy_steps: must be >= 0"),
    (["--set", "plm_copy_lr=0"], "plm_copy_lr"),
    (["--stage", "diffusion"], "holds none"),
    (["--stage", "plm", "--plm", "x"], "--plm: used by --stage ae or all"),
    (["--device", "cuda"], "--device: --family latent trains on the CPU"),
])
def test_cli_train_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str], message: str
                                 ) -> None:
    from fastdiff.cli import main

    assert main(["train", "--family", "latent", "--out", str(tmp_path / "r"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r" / "latent.json").exists()


def test_cli_other_families_refuse_latent_flags(capsys: pytest.CaptureFixture) -> None:
    from fastdiff.cli import main

    assert main(["train", "--family", "discrete", "--stage", "ae"]) == 2
    assert "--stage: only for --family latent" in capsys.readouterr().err


def test_cli_generate_bad_arguments(tiny_model: LatentDiffusion, tmp_path: Path, capsys: pytest.CaptureFixture
                                    ) -> None:
    from fastdiff.cli import main

    tiny_model.save(tmp_path / "ck")
    for argv, message in ((["--top-k", "1"], "--top-k: not available for a latent-diffusion checkpoint"),
                          (["--prompt", "a"], "--prompt: not available"),
                          (["--no-cache"], "--no-cache: not available"),
                          (["--strategy", "ancestral"], "--strategy: a latent-diffusion checkpoint samples"),
                          (["--label", "zz"], "--label: 'zz' is not one of ['a', 'b']"),
                          (["--steps", "50"], "--steps: at most the checkpoint's T = 20")):
        assert main(["generate", "-c", str(tmp_path / "ck"), *argv]) == 2
        assert message in capsys.readouterr().err
    assert main(["generate", "-c", str(tmp_path / "ck"), "-n", "2", "--steps", "3", "--label", "a",
                 "--guidance", "2", "-o", str(tmp_path / "s.jsonl")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == ["a", "a"]
    assert [r["text"] for r in rows] == tiny_model.generate(2, steps=3, labels="a", guidance=2.0, seed=0)


def test_any_hf_seq2seq_directory_as_the_plm(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A tiny T5 saved as a Hugging Face directory (with the project tokenizer beside it) is loaded by
    ``--plm`` and used frozen by the autoencoder stage; a non-seq2seq directory is refused by name."""
    from transformers import BertConfig, BertModel, T5Config, T5ForConditionalGeneration

    from fastdiff.cli import main
    from fastdiff.latent import PLM

    tok = _tokenizer()
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=tok.vocab_size, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                             num_decoder_layers=1, num_heads=2, pad_token_id=0, eos_token_id=2,
                                             decoder_start_token_id=0))
    t5.save_pretrained(tmp_path / "t5")
    tok.save(tmp_path / "t5" / "fastdiff_tokenizer.json")
    plm = PLM.load(tmp_path / "t5")
    assert plm.d_model == 16
    ids = _rows(tok, 3, 5)
    states = plm.encode(ids)
    want = t5.eval().get_encoder()(input_ids=ids).last_hidden_state
    assert torch.allclose(states, want, atol=1e-5)
    assert plm.generate(states, 7).shape == (3, 7)
    data = _corpus(tmp_path)
    out = tmp_path / "run"
    assert main(["train", "--family", "latent", "--stage", "ae", "--plm", str(tmp_path / "t5"), "--task", "lm",
                 "--seq-len", "8", "--data", str(data), "--out", str(out), "--steps", "2", *TINY]) == 0
    cfg = json.loads((out / "latent.json").read_text())
    assert cfg["plm"] == str((tmp_path / "t5").resolve()) and not (out / "plm").exists()
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    capsys.readouterr()
    with pytest.raises(InputError, match="plm: .* is not a seq2seq"):
        PLM.load(tmp_path / "bert")
    with pytest.raises(InputFileNotFoundError, match=r"plm: .* \(no config.json\)"):
        PLM.load(tmp_path)


# --- the bundled checkpoint (fastdiff/assets/latent) -----------------------------------------------------
def test_bundled_latent_json_names_files_that_ship() -> None:
    """latent.json's PLM is the relative plm/ inside the package (no path of the machine that trained it),
    every file it needs exists, and each is matched by a package-data glob of pyproject.toml (what a wheel
    installs; the glob expanded as setuptools does, from the package directory)."""
    import glob

    from fastdiff.latent.model import AE_FILE, CONFIG_FILE, DENOISER_FILE
    from fastdiff.pipeline import bundled_path

    d = bundled_path("latent")
    cfg = json.loads((d / CONFIG_FILE).read_text())
    assert cfg["format"] == "fastdiff-latent/1" and cfg["plm"] == "plm"
    needed = [CONFIG_FILE, AE_FILE, DENOISER_FILE, "plm/config.json", "plm/model.safetensors",
              "plm/fastdiff_tokenizer.json", "plm/generation_config.json", "command.txt", "train_log.jsonl"]
    assert all((d / f).is_file() for f in needed), [f for f in needed if not (d / f).is_file()]
    pkg = d.parent.parent
    pyproject = pkg.parent / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("an installed package (no pyproject.toml beside it)")
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    globs = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]["fastdiff"]
    installed = {f for g in globs for f in glob.glob(g, root_dir=pkg)}
    shipped = {str(f.relative_to(pkg)) for f in d.rglob("*") if f.is_file()}
    assert shipped <= installed, sorted(shipped - installed)
    assert {f"assets/latent/{f}" for f in needed} <= shipped


@pytest.fixture(scope="module")
def bundled() -> LatentDiffusion:
    from fastdiff.pipeline import bundled_path

    torch.set_num_threads(1)
    return LatentDiffusion.load(bundled_path("latent"))


def test_bundled_latent_generates_from_the_command_line(bundled: LatentDiffusion, capsys: pytest.CaptureFixture
                                                        ) -> None:
    from fastdiff.cli import main
    from fastdiff.pipeline import TextDiffusion

    cfg = bundled.autoencoder.config
    assert (cfg["n_latents"], cfg["d_latent"], bundled.seq_len) == (16, 64, 64)
    assert bundled.label_names == ["reference", "library"]
    assert main(["generate", "-c", "latent", "-n", "2", "--steps", "8", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert lines[0].startswith("fastdiff generate: latent (latent, 16 x 64 latents -> 64 tokens, step 3444)")
    assert [line.split(" ")[0] for line in lines[1:]] == ["[0]", "[1]"]
    want = bundled.generate(2, steps=8, seed=0)
    assert [line[4:] for line in lines[1:]] == [" ".join(t.split()) for t in want]
    assert all(len(t.split()) >= 5 for t in want)  # text, not an empty decoding
    # TextDiffusion (token-space checkpoints) names the class that loads this one
    with pytest.raises(InputError, match=r"latent-diffusion .*LatentDiffusion\.load"):
        TextDiffusion.load("latent")


def test_bundled_latent_evaluates_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from fastdiff.cli import main

    out = tmp_path / "e.json"
    assert main(["eval", "-c", "latent", "--samples", "2", "--steps", "2", "--fit-rows", "2", "--lm", "none",
                 "--classifier", "none", "--threads", "1", "--json", str(out)]) == 0
    capsys.readouterr()
    res = json.loads(out.read_text())
    assert res["checkpoint"]["family"] == "latent" and res["checkpoint"]["step"] == 3444
    assert res["reconstruction"]["rows"] == 2 and "distinct_2" in res["samples"]

"""fastdiff.models.pretrained: embedding rows taken from a local Hugging Face model, token by token."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastdiff.data import TextTokenizer
from fastdiff.models.pretrained import init_embeddings_from_pretrained

TEXT = ["the quick brown fox jumps over the lazy dog", "a lazy cat sleeps over the warm mat",
        "the dog and the cat play in the garden"] * 3


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for line in TEXT for w in line.split()}, reverse=True)  # ids differ from ours
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    d = tmp_path_factory.mktemp("tiny-bert")
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]")
    hf_tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    transformers.BertModel(cfg).save_pretrained(d)
    return d, vocab


def test_rows_come_from_the_matching_pretrained_tokens(hf_dir):
    d, vocab = hf_dir
    ours = TextTokenizer.train(TEXT, vocab_size=64, kind="word", min_frequency=1)
    emb = torch.nn.Embedding(ours.vocab_size, 16)
    before = emb.weight.detach().clone()
    found = init_embeddings_from_pretrained(emb, ours, d, proj="truncate")
    table = transformers.BertModel.from_pretrained(d).get_input_embeddings().weight.detach()
    words = [i for i in range(ours.vocab_size) if ours.decode([i]).strip() in vocab]
    assert set(torch.nonzero(found).flatten().tolist()) == set(words) and len(words) >= 10
    want = table[[vocab[ours.decode([i]).strip()] for i in words]]
    got = emb.weight.detach()[words]
    scale = (got * want).sum() / (want * want).sum()  # one common factor (the std rescale)
    torch.testing.assert_close(got, scale * want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(emb.weight.detach()[~found], before[~found])  # specials keep their init
    assert abs(float(got.std()) - float(before.std())) < 0.05 * float(before.std())


def test_pca_projection_to_a_smaller_width(hf_dir):
    d, _ = hf_dir
    ours = TextTokenizer.train(TEXT, vocab_size=64, kind="word", min_frequency=1)
    w = torch.zeros(ours.vocab_size, 4)
    found = init_embeddings_from_pretrained(w, ours, d, proj="pca")
    assert found.any() and torch.isfinite(w).all() and w[found].abs().sum() > 0


def test_errors_name_the_argument(tmp_path, hf_dir):
    ours = TextTokenizer.train(TEXT, vocab_size=64, kind="word", min_frequency=1)
    with pytest.raises(FileNotFoundError, match="hf_dir"):
        init_embeddings_from_pretrained(torch.zeros(ours.vocab_size, 4), ours, tmp_path / "nope")
    with pytest.raises(ValueError, match="proj"):
        init_embeddings_from_pretrained(torch.zeros(ours.vocab_size, 4), ours, hf_dir[0], proj="svd")
    with pytest.raises(ValueError, match="embedding"):
        init_embeddings_from_pretrained(torch.zeros(3, 4), ours, hf_dir[0])


def test_train_command_initialises_embeddings(hf_dir, tmp_path, capsys):
    from fastdiff import cli

    d, _ = hf_dir
    code = cli.main(["train", "--family", "discrete", "--task", "lm", "--steps", "1", "--seq-len", "16",
                     "--batch-size", "2", "--width", "16", "--layers", "1", "--heads", "2", "--out",
                     str(tmp_path / "run"), "--init-embeddings", str(d), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    line = next(ln for ln in out.splitlines() if ln.startswith("embeddings:"))
    assert int(line.split()[1]) > 0

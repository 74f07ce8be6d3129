"""fastdiff.data: corpus, tokenizers, packing, the conditional tasks and the resumable batch iterator."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from fastdiff.data import (
    ATTRIBUTES,
    DEFAULT_TOKENIZER_PATH,
    Batches,
    Document,
    TextTokenizer,
    attribute_chunks,
    clean_text,
    default_tokenizer,
    lm_chunks,
    load_texts,
    pack,
    pad,
    python_docs,
    sentences,
    split_of,
    word_order_pairs,
    word_order_source,
    word_order_tensors,
)


@pytest.fixture(scope="module")
def docs() -> list[Document]:
    return python_docs()


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return default_tokenizer()


# ---------------------------------------------------------------------------------------------- corpus


def test_python_docs_content(docs):
    sources = [d.source for d in docs]
    assert set(sources) == {"reference", "library"}
    # topics first, in sorted key order, then docstrings
    n_ref = sources.count("reference")
    assert sources[:n_ref] == ["reference"] * n_ref
    ref_names = [d.name for d in docs[:n_ref]]
    assert ref_names == sorted(ref_names) and "assert" in ref_names
    from pydoc_data.topics import topics

    assert set(ref_names) <= set(topics)
    names = {d.name for d in docs}
    assert "json.dumps" in names and "collections.OrderedDict" in names
    assert not any(n.startswith(("test.", "idlelib.", "lib2to3.")) or ".tests." in n for n in names)
    dumps = next(d for d in docs if d.name == "json.dumps")
    assert "Serialize" in dumps.text and ">>>" not in dumps.text
    for d in docs:
        assert d.text == d.text.strip() and "\n\n\n" not in d.text
        for par in d.text.split("\n\n"):
            assert len(par.split()) >= 5 and "  " not in par and ">>>" not in par and "::=" not in par
    total_words = sum(len(d.text.split()) for d in docs)
    assert total_words > 100_000  # ~270k words from Python 3.11


def test_python_docs_cached_and_deterministic(docs):
    again = python_docs()
    assert again == docs and again is not docs  # a fresh list of the same documents
    assert again[0] is docs[0]  # parsed once per process


def test_python_docs_parses_with_ast_and_skips(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "test").mkdir()
    (root / "site-packages").mkdir()
    (root / "pkg" / "__init__.py").write_text('"""The package docstring has five words at least."""\n')
    (root / "pkg" / "mod.py").write_text(
        '"""Module doc with more than five words.\n\n>>> 1 + 1\n2\n"""\n'
        "raise SystemExit('never run: parsed, not imported')\n"
        "class Widget:\n"
        '    """A widget that renders nothing at all."""\n'
        "    def draw(self):\n"
        '        """Draw the widget on the given canvas now."""\n'
        "    async def fetch(self):\n"
        '        """Short."""\n'
    )
    (root / "bad.py").write_text("def broken(:\n")
    (root / "test" / "test_x.py").write_text('"""A test module docstring that we skip."""\n')
    (root / "site-packages" / "y.py").write_text('"""Third party docstring that we also skip."""\n')
    lib = [d for d in python_docs(root) if d.source == "library"]
    assert [(d.name, d.text) for d in lib] == [
        ("pkg", "The package docstring has five words at least."),
        ("pkg.mod", "Module doc with more than five words."),
        ("pkg.mod.Widget", "A widget that renders nothing at all."),
        ("pkg.mod.Widget.draw", "Draw the widget on the given canvas now."),
    ]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        python_docs(tmp_path / "nowhere")


def test_clean_text():
    text = (
        "Return the sum of the given numbers, as an int.\n"
        "It never fails.\n\n"
        "For example:\n\n"
        "   if total > limit: raise OverflowError\n"
        "   x = compute(a, b)\n\n"
        ">>> add(1, 2)\n3\n\n"
        "Too short.\n\n"
        "*****\n"
        "This    paragraph   has   irregular   spacing inside."
    )
    assert clean_text(text) == (
        "Return the sum of the given numbers, as an int. It never fails.\n\n"
        "This paragraph has irregular spacing inside."
    )
    # an indented block that reads like prose (ends a sentence) stays
    assert clean_text("A definition of the term follows:\n\n   The term means something quite specific.") == (
        "A definition of the term follows:\n\nThe term means something quite specific."
    )


def test_split_of():
    def independent(name: str, frac: float) -> str:
        h = int(hashlib.sha256(name.encode()).hexdigest()[:16], 16)
        return "valid" if h < frac * 2**64 else "train"

    names = [f"module{i}.func" for i in range(4000)]
    got = [split_of(n) for n in names]
    assert got == [independent(n, 0.05) for n in names]
    assert 0.035 < got.count("valid") / len(names) < 0.065
    assert all(split_of(n, 0.0) == "train" for n in names[:50])
    assert all(split_of(n, 1.0) == "valid" for n in names[:50])
    with pytest.raises(ValueError, match="valid_fraction"):
        split_of("x", 1.5)


def test_load_texts(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("First   paragraph\nline two.\n\n\nSecond one.\n")
    jl = tmp_path / "data.jsonl"
    jl.write_text('{"text": "hello  world", "label": "greeting"}\n\n{"text": "plain"}\n{"text": "x", "source": "s"}\n')
    got = load_texts([txt, str(jl)])
    assert got == [
        Document("First paragraph line two.", "notes", "notes.txt:0"),
        Document("Second one.", "notes", "notes.txt:1"),
        Document("hello world", "greeting", "data.jsonl:1"),
        Document("plain", "data", "data.jsonl:3"),
        Document("x", "s", "data.jsonl:4"),
    ]
    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_texts(missing)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=re.escape(f"{bad}:2")):
        load_texts(bad)
    notext = tmp_path / "notext.jsonl"
    notext.write_text('{"label": 1}\n')
    with pytest.raises(ValueError, match="text"):
        load_texts(notext)
    with pytest.raises(ValueError, match=r"\.csv"):
        (tmp_path / "a.csv").write_text("x")
        load_texts(tmp_path / "a.csv")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no text"):
        load_texts(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="paths"):
        load_texts([])


# ---------------------------------------------------------------------------------------------- tokenizer


def test_default_tokenizer(tok):
    assert tok.kind == "bpe" and tok.vocab_size == 4096 == len(tok)
    assert (tok.pad_id, tok.mask_id, tok.sep_id, tok.unk_id) == (0, 1, 2, 3)
    assert [tok.id_to_token(i) for i in range(4)] == ["[PAD]", "[MASK]", "[SEP]", "[UNK]"]
    assert DEFAULT_TOKENIZER_PATH.stat().st_size < 400_000
    for s in ["Return the index of a menu item identified by INDEX.",
              "  leading spaces, tabs\tand\nnewlines\n\nparagraphs ",
              "unicode: café — naïve “quotes” 日本語 🙂", "", "x"]:
        ids = tok.encode(s)
        assert tok.unk_id not in ids and all(i >= 4 for i in ids)
        assert tok.decode(ids) == s
        assert tok.decode(torch.tensor(ids, dtype=torch.long)) == s
    # common words are single tokens: the vocabulary was learnt on English prose
    assert len(tok.encode("Return the value of the function")) <= 8
    ids = [tok.pad_id, *tok.encode("Hello world."), tok.sep_id, *tok.encode(" Bye."), tok.pad_id]
    assert tok.decode(ids) == "Hello world. Bye."
    assert tok.decode(ids, skip_special=False) == "[PAD]Hello world.[SEP] Bye.[PAD]"
    assert tok.encode_batch(["a b", "c"]) == [tok.encode("a b"), tok.encode("c")]
    # written special tokens become their ids (prompts with masks)
    assert tok.encode("[MASK]") == [tok.mask_id] and tok.sep_id in tok.encode("a [SEP] b")
    assert tok.decode_batch(torch.tensor([tok.encode("a b") + [0]])) == ["a b"]
    with pytest.raises(ValueError, match="ids"):
        tok.decode([5000])
    with pytest.raises(ValueError, match="ids"):
        tok.decode(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="text"):
        tok.encode(3)


def test_shipped_tokenizer_matches_its_note_and_a_rebuild(tok, docs):
    note = (DEFAULT_TOKENIZER_PATH.parent / "tokenizer.md").read_text()
    assert tok.fingerprint() in note
    assert "scripts/build_tokenizer.py" in note
    version = re.search(r"with Python (\d+\.\d+)\.\d+", note).group(1)
    if version != f"{sys.version_info.major}.{sys.version_info.minor}":
        pytest.skip(f"tokenizer built on Python {version}: another version ships other docs")
    rebuilt = TextTokenizer.train([d.text for d in docs], vocab_size=4096, kind="bpe", min_frequency=2)
    assert rebuilt.fingerprint() == tok.fingerprint()


def test_train_save_load_fingerprint(tmp_path):
    texts = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"] * 3
    bpe = TextTokenizer.train(texts, vocab_size=300, kind="bpe", min_frequency=1)
    assert bpe.vocab_size <= 300 and bpe.decode(bpe.encode("the cat sat")) == "the cat sat"
    path = tmp_path / "sub" / "tokenizer.json"
    bpe.save(path)
    loaded = TextTokenizer.load(path)
    assert loaded.fingerprint() == bpe.fingerprint() and loaded.vocab() == bpe.vocab()
    # independent fingerprint: sha256 of the kind and the tokens in id order
    vocab = json.loads(path.read_text())["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    payload = json.dumps({"kind": "bpe", "vocab": tokens}, ensure_ascii=True, separators=(",", ":"))
    assert bpe.fingerprint() == hashlib.sha256(payload.encode()).hexdigest()
    other = TextTokenizer.train(texts[:1], vocab_size=300, kind="bpe", min_frequency=1)
    assert other.fingerprint() != bpe.fingerprint()


def test_word_level_tokenizer():
    texts = ["The cat sat on the mat.", "The dog sat, then it ran (fast).", "The dog's cat sat..."] * 2
    word = TextTokenizer.train(texts, vocab_size=100, kind="word", min_frequency=1)
    assert word.kind == "word" and [word.id_to_token(i) for i in range(4)] == ["[PAD]", "[MASK]", "[SEP]", "[UNK]"]
    ids = word.encode("The cat ran, then the dog sat (fast).")
    assert len(ids) == 11 and word.unk_id not in ids  # words and punctuation runs
    assert word.decode(ids) == "The cat ran, then the dog sat (fast)."
    assert word.decode(word.encode("The dog's cat sat...")) == "The dog's cat sat..."
    assert word.encode("The zebra sat.") == [word.token_to_id("The"), word.unk_id, word.token_to_id("sat"),
                                             word.token_to_id(".")]
    small = TextTokenizer.train(texts, vocab_size=6, kind="word", min_frequency=1)
    assert small.vocab_size == 6


def test_tokenizer_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="texts"):
        TextTokenizer.train(["", "  "])
    with pytest.raises(TypeError, match="texts"):
        TextTokenizer.train("just a string")
    with pytest.raises(ValueError, match="vocab_size"):
        TextTokenizer.train(["a b c"], vocab_size=100, kind="bpe")  # below 4 specials + 256 bytes
    with pytest.raises(ValueError, match="kind"):
        TextTokenizer.train(["a b c"], kind="char")
    missing = tmp_path / "none.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        TextTokenizer.load(missing)
    corrupted = tmp_path / "tokenizer.json"
    corrupted.write_text(DEFAULT_TOKENIZER_PATH.read_text()[:5000])
    with pytest.raises(ValueError, match=re.escape(str(corrupted))):
        TextTokenizer.load(corrupted)
    # a valid HF tokenizer without fastdiff's special ids
    from tokenizers import Tokenizer, models

    plain = tmp_path / "plain.json"
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(plain))
    with pytest.raises(ValueError, match=r"\[PAD\]"):
        TextTokenizer.load(plain)


# ---------------------------------------------------------------------------------------------- tensors


def test_pack_and_pad():
    got = pack([[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]], 3, sep_id=2)
    # 1 2 3 | 2 4 5 | 2 6 2 | 7 8 9 | 10 (dropped)
    assert got.tolist() == [[1, 2, 3], [2, 4, 5], [2, 6, 2], [7, 8, 9]] and got.dtype == torch.long
    assert pack([[1]], 4, sep_id=2).shape == (0, 4)
    got = pad([[5, 6, 7, 8], [9], []], 3, pad_id=0)
    assert got.tolist() == [[5, 6, 7], [9, 0, 0], [0, 0, 0]] and got.dtype == torch.long
    with pytest.raises(ValueError, match="length"):
        pack([[1]], 0, sep_id=2)
    with pytest.raises(ValueError, match="length"):
        pad([[1]], 0, pad_id=0)
    with pytest.raises(TypeError, match="token_lists"):
        pad(torch.ones(2, 2), 2, pad_id=0)


def _toy_docs() -> list[Document]:
    ref = [Document(" ".join(["alpha"] * (5 + i % 3)) + ".", "reference", f"r{i}") for i in range(40)]
    lib = [Document(" ".join(["beta"] * (5 + i % 4)) + ".", "library", f"l{i}") for i in range(200)]
    return ref + lib


def test_attribute_chunks_sources_and_balance():
    docs = _toy_docs()
    word = TextTokenizer.train([d.text for d in docs], vocab_size=20, kind="word", min_frequency=1)
    alpha, beta = word.token_to_id("alpha"), word.token_to_id("beta")
    x, y = attribute_chunks(docs, word, 8, split="all", balance=False)
    n_ref = sum(len(word.encode(d.text)) + 1 for d in docs if d.source == "reference") - 1
    n_lib = sum(len(word.encode(d.text)) + 1 for d in docs if d.source == "library") - 1
    assert y.tolist() == [0] * (n_ref // 8) + [1] * (n_lib // 8)
    assert ATTRIBUTES == ("reference", "library")
    for row, label in zip(x.tolist(), y.tolist()):
        assert (beta if label == 0 else alpha) not in row  # a chunk never mixes sources
    xb, yb = attribute_chunks(docs, word, 8, split="all")
    m = n_ref // 8
    assert yb.tolist() == [0] * m + [1] * m
    assert torch.equal(xb[:m], x[:m])
    keep = [(i * (n_lib // 8)) // m for i in range(m)]  # evenly spaced library chunks
    assert torch.equal(xb[m:], x[m:][keep])
    # user labels, three classes: balanced to the smallest
    extra = [Document("gamma " * 20, "other", f"o{i}") for i in range(3)]
    x3, y3 = attribute_chunks(docs + extra, word, 8, split="all", attributes=("other", "reference", "library"))
    n_other = (3 * 21 - 1) // 8
    assert y3.tolist() == [0] * n_other + [1] * n_other + [2] * n_other
    assert torch.equal(x3[n_other: 2 * n_other], x[[(i * m) // n_other for i in range(n_other)]])
    with pytest.raises(ValueError, match="attributes"):
        attribute_chunks(docs, word, 8, attributes=("library",))
    with pytest.raises(ValueError, match="docs"):
        attribute_chunks([d for d in docs if d.source == "library"], word, 8, split="all")
    with pytest.raises(ValueError, match="docs"):
        attribute_chunks([], word, 8)
    with pytest.raises(ValueError, match="length"):
        attribute_chunks(docs, word, 0)


def test_real_tasks_have_enough_data(docs, tok):
    x, y = attribute_chunks(docs, tok, 64, split="train")
    assert x.shape == (y.shape[0], 64)
    counts = torch.bincount(y).tolist()
    assert counts[0] == counts[1] > 800  # balanced: ~1,200 chunks of 64 tokens per class
    _, yv = attribute_chunks(docs, tok, 64, split="valid")
    assert torch.bincount(yv).tolist()[0] >= 20
    train = lm_chunks(docs, tok, 128, split="train")
    valid = lm_chunks(docs, tok, 128, split="valid")
    assert train.shape[1] == 128 and train.shape[0] > 2000 and 50 < valid.shape[0] < train.shape[0] // 5
    assert int(train.max()) < tok.vocab_size and int((train == tok.sep_id).sum()) > 1000
    pairs = word_order_pairs(docs, "train")
    valid = word_order_pairs(docs, "valid")
    assert len(pairs) > 5000 and len(valid) > 200
    assert not {t for _, t in pairs} & {t for _, t in valid}  # split per sentence: no leak
    assert len(pairs) + len(valid) == len(word_order_pairs(docs, "all"))
    for src, tgt in pairs[:500]:
        assert 4 <= len(tgt.split()) <= 16 and sorted(src.split()) == sorted(tgt.split())


def test_sentences_and_word_order():
    text = ("The cat sat on the mat. It was warm! Was it a dog? Use a tuple, e.g. a pair of ints. "
            "Call f(x) = g(y) + h(z) now please.\n\nA second paragraph has one sentence. Trailing words\n\n"
            "lowercase starts are not sentences.")
    # splits need a capital letter after the break, so "e.g. a" stays inside its sentence
    assert sentences(text) == ["The cat sat on the mat.", "Was it a dog?", "Use a tuple, e.g. a pair of ints.",
                               "A second paragraph has one sentence."]
    assert sentences(text, max_words=5) == ["Was it a dog?"]
    # case-insensitive order, ties between case variants broken by the case-sensitive string ("T" < "t")
    assert word_order_source("the cat sat on The mat.") == "cat mat. on sat The the"
    assert word_order_source("b B a A b") == "A a B b b"
    docs = [Document(text, "library", "doc.one"), Document("The cat sat on the mat. Once more.", "library", "two")]
    pairs = word_order_pairs(docs, split="all", max_words=6)
    assert pairs == [("cat mat. on sat The the", "The cat sat on the mat."),
                     ("a dog? it Was", "Was it a dog?"),
                     ("A has one paragraph second sentence.", "A second paragraph has one sentence.")]
    word = TextTokenizer.train([t for p in pairs for t in p], vocab_size=60, kind="word", min_frequency=1)
    src, tgt = word_order_tensors(pairs, word, 5, 8)
    assert src.shape == (3, 5) and tgt.shape == (3, 8)
    assert tgt[1].tolist() == word.encode("Was it a dog?") + [0] * 3
    assert src[0].tolist() == word.encode("cat mat. on sat The the")[:5]
    assert word_order_pairs(docs, "valid", max_words=6, valid_fraction=1.0) == pairs
    assert word_order_pairs(docs, "train", max_words=6, valid_fraction=0.0) == pairs
    with pytest.raises(ValueError, match="max_words"):
        word_order_pairs(docs, max_words=2)
    with pytest.raises(ValueError, match="split"):
        word_order_pairs(docs, split="test")


# ---------------------------------------------------------------------------------------------- Batches


def _collect(b: Batches, k: int) -> list[torch.Tensor]:
    return [b.next_batch() for _ in range(k)]


@pytest.mark.parametrize("shuffle,drop_last", [(True, True), (True, False), (False, False)])
def test_batches_resume_exactly(shuffle, drop_last):
    x = torch.arange(23) * 10
    y = torch.arange(23)
    straight = Batches(x, y, batch_size=4, seed=7, shuffle=shuffle, drop_last=drop_last)
    per_epoch = 5 if drop_last else 6
    assert len(straight) == per_epoch
    want = _collect(straight, 3 * per_epoch + 2)
    for k in (0, 1, per_epoch - 1, per_epoch, per_epoch + 3):
        first = Batches(x, y, batch_size=4, seed=7, shuffle=shuffle, drop_last=drop_last)
        got = _collect(first, k)
        state = json.loads(json.dumps(first.state_dict()))  # JSON-able
        fresh = Batches(x, y, batch_size=4, seed=7, shuffle=shuffle, drop_last=drop_last)
        fresh.load_state_dict(state)
        got += _collect(fresh, len(want) - k)
        for (gx, gy), (wx, wy) in zip(got, want):
            assert torch.equal(gx, wx) and torch.equal(gy, wy) and torch.equal(gx, gy * 10)


def test_batches_epochs_are_permutations_and_iteration():
    x = torch.arange(10)
    b = Batches(x, batch_size=3, seed=0, drop_last=False)
    epochs = [torch.cat(list(b)) for _ in range(3)]  # each `for` runs one epoch
    for e in epochs:
        assert sorted(e.tolist()) == list(range(10))
    assert not torch.equal(epochs[0], epochs[1])
    assert (b.epoch, b.position) == (2, 4)
    # the order is randperm from a generator seeded per (seed, epoch): same seed, same order
    assert torch.equal(Batches(x, batch_size=3, seed=0, drop_last=False).order(1), epochs[1])
    assert not torch.equal(Batches(x, batch_size=3, seed=1).order(0), epochs[0])
    # resuming mid-iteration
    b2 = Batches(x, batch_size=3, seed=0, drop_last=True)
    it = iter(b2)
    first = next(it)
    state = b2.state_dict()
    assert state["position"] == 1
    b3 = Batches(x, batch_size=3, seed=0, drop_last=True)
    b3.load_state_dict(state)
    assert [t.tolist() for t in b3] == [t.tolist() for t in it]
    assert first.tolist() == b2.order(0)[:3].tolist()
    assert torch.equal(Batches(x, batch_size=5, shuffle=False).next_batch(), torch.arange(5))


def test_batches_sharding():
    x = torch.arange(40)
    world = 4
    full = Batches(x, batch_size=8, seed=3)
    shards = [Batches(x, batch_size=8, seed=3, rank=r, world_size=world) for r in range(world)]
    for _ in range(12):  # crosses epochs (5 batches each)
        glob = full.next_batch()
        parts = [s.next_batch() for s in shards]
        for r, p in enumerate(parts):
            assert torch.equal(p, glob[r::world]) and p.shape == (2,)
        assert sorted(torch.cat(parts).tolist()) == sorted(glob.tolist())
    with pytest.raises(ValueError, match="batch_size"):
        Batches(x, batch_size=6, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        Batches(x, batch_size=8, rank=4, world_size=4)


def test_batches_bad_inputs():
    x = torch.arange(10)
    with pytest.raises(ValueError, match="tensors"):
        Batches(batch_size=2)
    with pytest.raises(ValueError, match=r"tensors\[1\]"):
        Batches(x, torch.arange(9), batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        Batches(x, batch_size=0)
    with pytest.raises(ValueError, match="tensors"):
        Batches(x, batch_size=11)  # no full batch
    b = Batches(x, batch_size=2, seed=1)
    with pytest.raises(ValueError, match="n="):
        b.load_state_dict(Batches(torch.arange(12), batch_size=2, seed=1).state_dict())
    with pytest.raises(ValueError, match="seed"):
        b.load_state_dict(Batches(x, batch_size=2, seed=2).state_dict())
    with pytest.raises(ValueError, match="position"):
        b.load_state_dict({"epoch": 0, "position": 99})
    assert Path(DEFAULT_TOKENIZER_PATH).name == "tokenizer.json"


def test_load_texts_names_a_directory_and_a_missing_file(tmp_path):
    from fastdiff.errors import FastdiffError

    with pytest.raises(FileNotFoundError, match="is a directory") as e:
        load_texts([tmp_path])
    assert isinstance(e.value, FastdiffError)
    with pytest.raises(FileNotFoundError, match="no such file") as e:
        load_texts([tmp_path / "nope.txt"])
    assert isinstance(e.value, FastdiffError)

"""Tokenizer loading, caching and training; the default model against sentencepiece itself."""

import numpy as np
import pytest
import sentencepiece as spm

from conftest import shared_file
from minifn import tokenizer as tok


@pytest.fixture(scope="session")
def mistral():
    return tok.load_tokenizer()


def test_default_loads_offline_and_matches_sentencepiece(mistral):
    text = shared_file("mini-owl.md").read_text()
    direct = spm.SentencePieceProcessor(model_file=str(tok.mistral_model_path()))
    assert mistral.vocab_size == 32000 and (mistral.bos_id, mistral.eos_id) == (1, 2)
    assert mistral.pad_id == mistral.eos_id  # Mistral has no pad piece
    assert mistral.encode(text) == direct.encode(text)
    assert mistral.decode(mistral.encode(text)) == text


def test_encode_file_is_cached_by_content(mistral, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIFN_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "story.txt"
    path.write_text("The owl counted the stars twice.\n")
    first = tok.encode_file(mistral, path)
    again = tok.encode_file(mistral, path)
    assert not first.cached and again.cached
    assert np.array_equal(first.ids, again.ids) and first.ids.tolist() == mistral.encode(path.read_text())
    path.write_text("A different story.\n")
    assert tok.encode_file(mistral, path).ids.tolist() == mistral.encode("A different story.\n")


@pytest.mark.parametrize("content,message", [
    (None, "does not exist"), (b"", "is empty"), (b"\x00\x01\x02", "looks binary"),
    (b"caf\xe9 au lait", "is not UTF-8 text"),
])
def test_bad_dataset_files(tmp_path, content, message):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(tok.TokenizerError, match=message):
        tok.read_text(path)
    with pytest.raises(tok.TokenizerError, match="is not a file"):
        tok.read_text(tmp_path)


def test_bad_model_files(tmp_path):
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(tok.TokenizerError, match="is not a SentencePiece model"):
        tok.load_tokenizer(junk)
    with pytest.raises(tok.TokenizerError, match="does not exist"):
        tok.load_tokenizer(tmp_path / "missing.model")


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_train_tokenizer_round_trips(tmp_path, model_type):
    corpus = tmp_path / "corpus.txt"
    words = [f"w{i:03d}x" for i in range(400)]  # enough distinct pieces for a unigram vocabulary too
    corpus.write_text("\n".join(" ".join(words[j::7]) for j in range(7)) * 20 + "\nthe lazy fox ünïcödé\n")
    path = tok.train_tokenizer([str(corpus)], 320, tmp_path / "small.model", model_type)
    trained = tok.load_tokenizer(path)
    assert trained.vocab_size == 320
    text = "the lazy fox met a zebra: ünïcödé! w001x"
    assert trained.decode(trained.encode(text)) == text


def test_train_tokenizer_too_small_vocab_is_a_clear_error(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n" * 50)
    with pytest.raises(tok.TokenizerError, match="Vocabulary size is smaller than required_chars"):
        tok.train_tokenizer([str(corpus)], 50, tmp_path / "small.model")

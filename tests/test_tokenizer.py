"""Tokenizer loading, caching and training; the default model against sentencepiece itself."""

import numpy as np
import pytest
import sentencepiece as spm

from conftest import invoke, shared_file
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
    assert np.array_equal(first.ids[:], again.ids[:]) and first.ids[:].tolist() == mistral.encode(path.read_text())
    assert again.corpus.path.parent == tmp_path / "cache" / "tokens" and again.corpus.val is None
    path.write_text("A different story.\n")
    assert tok.encode_file(mistral, path).ids[:].tolist() == mistral.encode("A different story.\n")
    memory = tok.encode_file(mistral, path, use_cache=False)
    assert memory.ids[:].tolist() == mistral.encode("A different story.\n") and memory.corpus is None


def cache_entry(tmp_path):
    (entry,) = (tmp_path / "cache" / "tokens").iterdir()
    return entry


@pytest.mark.parametrize("poison", ["id outside the vocabulary", "truncated shard", "no manifest", "junk file",
                                    "another file's entry"])
def test_a_poisoned_cache_entry_is_detected_and_rebuilt(mistral, tmp_path, monkeypatch, poison):
    monkeypatch.setenv("MINIFN_CACHE_DIR", str(tmp_path / "cache"))
    path = shared_file("mini-owl.md")
    expected = mistral.encode(path.read_text())
    tok.encode_file(mistral, path)
    entry = cache_entry(tmp_path)
    shard = entry / "train-00000.bin"
    if poison == "id outside the vocabulary":
        ids = np.fromfile(shard, dtype=np.uint16)
        ids[5] = 60000
        ids.tofile(shard)
    elif poison == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:100])
    elif poison == "no manifest":
        (entry / "manifest.json").unlink()
    elif poison == "junk file":
        import shutil

        shutil.rmtree(entry)
        entry.write_bytes(b"junk")
    else:
        import shutil

        other = tmp_path / "other.txt"
        other.write_text("Another story entirely.\n")
        shutil.rmtree(entry)
        tok.encode_file(mistral, other)
        cache_entry(tmp_path).rename(entry)  # a valid corpus of the wrong file under this file's key
    rebuilt = tok.encode_file(mistral, path)
    assert not rebuilt.cached and rebuilt.ids[:].tolist() == expected
    assert tok.encode_file(mistral, path).cached


def test_a_full_disk_leaves_no_temporary_file_and_says_so(mistral, tmp_path, monkeypatch):
    import errno

    from minifn import prepare

    monkeypatch.setenv("MINIFN_CACHE_DIR", str(tmp_path / "cache"))
    write = prepare._ShardWriter.write

    def full_disk(self, ids):
        write(self, ids[: len(ids) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prepare._ShardWriter, "write", full_disk)
    folder = tmp_path / "cache" / "tokens"
    with pytest.raises(tok.TokenizerError, match=f"could not write the token cache in {folder} .No space left on "
                                                 "device.*MINIFN_CACHE_DIR") as e:
        tok.encode_file(mistral, shared_file("mini-owl.md"))
    assert "\n" not in str(e.value) and list(folder.iterdir()) == []


def test_a_cache_folder_that_cannot_be_created_names_the_cache_and_the_variable(mistral, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MINIFN_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(tok.TokenizerError, match=f"cannot create the token cache folder {blocker}/cache/tokens "
                                                 ".*set MINIFN_CACHE_DIR to a writable folder"):
        tok.encode_file(mistral, shared_file("mini-owl.md"))


def test_encode_file_keeps_the_dataset_errors(mistral, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIFN_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "blank.txt").write_text("  \n\n")
    (tmp_path / "bin.dat").write_bytes(bytes(range(256)))
    for name, message in [("missing.txt", "does not exist"), ("blank.txt", "is empty"), ("bin.dat", "looks binary")]:
        with pytest.raises(ValueError, match=message):
            tok.encode_file(mistral, tmp_path / name)


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


@pytest.mark.parametrize("model_type", ["bpe", "unigram", "char"])
def test_train_tokenizer_round_trips(tmp_path, model_type):
    corpus = tmp_path / "corpus.txt"
    words = [f"w{i:03d}x" for i in range(400)]  # enough distinct pieces for a unigram vocabulary too
    corpus.write_text("\n".join(" ".join(words[j::7]) for j in range(7)) * 20 + "\nthe lazy fox ünïcödé\n")
    vocab = None if model_type == "char" else 320
    path = tok.train_tokenizer([str(corpus)], vocab, tmp_path / "small.model", model_type)
    trained = tok.load_tokenizer(path)
    chars = len(set(corpus.read_text()) - {"\n"})
    assert trained.vocab_size == (4 + 256 + chars if model_type == "char" else 320)  # char: specials, bytes, chars
    text = "the lazy fox met a zebra: ünïcödé! w001x"
    assert trained.decode(trained.encode(text)) == text


def test_train_tokenizer_too_small_vocab_is_a_clear_error(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n" * 50)
    with pytest.raises(tok.TokenizerError, match=r"vocab size 50 is too small .* use --vocab-size \d+ or more"):
        tok.train_tokenizer([str(corpus)], 50, tmp_path / "small.model")


def test_train_tokenizer_writes_exactly_the_output_it_was_given(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the owl counted the stars\n" * 50)
    path = tok.train_tokenizer([corpus], None, tmp_path / "tk" / "owl.v2.model", "char")
    assert path == tmp_path / "tk" / "owl.v2.model" and tok.load_tokenizer(path).vocab_size > 256
    assert [p.name for p in (tmp_path / "tk").iterdir()] == ["owl.v2.model"]  # no owl.v2, owl.vocab, temporaries
    with pytest.raises(tok.TokenizerError, match="is a directory"):
        tok.train_tokenizer([corpus], None, tmp_path / "tk", "char")


def test_train_tokenizer_reads_a_comma_in_a_file_name_as_one_file(tmp_path):
    named = tmp_path / "owls, stars.txt"
    named.write_text("zyzzyva quokka\n" * 30)
    trained = tok.load_tokenizer(tok.train_tokenizer([named], 290, tmp_path / "t.model"))
    assert "▁zyzzyva" in {trained.piece(i) for i in range(trained.vocab_size)}  # it learned from that file


def test_train_tokenizer_streams_directories_jsonl_and_samples_lines(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "a.txt").write_text("alpha beta gamma\n" * 20)
    (tmp_path / "in" / "sub" / "b.jsonl").write_text('{"text": "delta epsilon\\nzeta"}\n' * 20)
    (tmp_path / "in" / "long.txt").write_text("word " * 5000)  # one 25 KB line: reaches the trainer in parts
    files, _ = __import__("minifn.sources", fromlist=["expand_inputs"]).expand_inputs([tmp_path / "in"])
    sentences = list(tok.training_sentences(files))
    assert "delta epsilon" in sentences and "zeta" in sentences and "alpha beta gamma" in sentences
    assert max(map(len, sentences)) <= tok.MAX_SENTENCE_CHARS and sum(s.count("word") for s in sentences) == 5000
    path = tok.train_tokenizer([tmp_path / "in"], None, tmp_path / "c.model", "char", input_sentence_size=101)
    assert tok.load_tokenizer(path).vocab_size >= 260
    with pytest.raises(tok.TokenizerError, match="0 .all lines. or over 100"):
        tok.train_tokenizer([tmp_path / "in"], None, tmp_path / "c.model", "char", input_sentence_size=10)


def test_train_tokenizer_bad_inputs_are_one_line_errors(tmp_path):
    (tmp_path / "bin.dat").write_bytes(b"\x00\x01\x02")
    (tmp_path / "blank.txt").write_text("\n\n")
    for inputs, message in [([tmp_path / "bin.dat"], "looks binary"), ([tmp_path / "none.txt"], "does not exist"),
                            ([tmp_path / "blank.txt"], "hold no text")]:
        with pytest.raises(ValueError, match=message) as e:
            tok.train_tokenizer(inputs, 300, tmp_path / "x.model")
        assert "\n" not in str(e.value) and not (tmp_path / "x.model").exists()
    (tmp_path / "text.txt").write_text("abcdefghij\n" * 10)
    with pytest.raises(tok.TokenizerError, match="too small for a character model"):
        tok.train_tokenizer([tmp_path / "text.txt"], 50, tmp_path / "x.model", "char")


def test_cli_tokenizer_train_char_model_and_errors(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "owl, part 1.txt").write_text("the owl counted the stars\n" * 20)
    out = tmp_path / "tk" / "owl.v2.model"
    result = invoke("tokenizer", "train", "--input", tmp_path / "in", "--model-type", "char", "--output", out)
    assert result.exit_code == 0 and f"Wrote {out} (" in result.output and out.is_file(), result.output
    bad = invoke("tokenizer", "train", "--input", tmp_path / "in", "--output", tmp_path / "b.model")
    assert bad.exit_code == 1 and bad.output.strip() == "Error: --vocab-size is required for a bpe model"


def test_two_processes_filling_the_same_cache_entry_both_get_it(mistral, tmp_path, monkeypatch):
    from minifn import prepare

    monkeypatch.setenv("MINIFN_CACHE_DIR", str(tmp_path / "cache"))
    story = shared_file("mini-owl.md")
    write_corpus, raced = prepare._write_corpus, []

    def another_rank_finishes_first(folder, *args, **kwargs):
        manifest = write_corpus(folder, *args, **kwargs)
        if not raced:
            raced.append(True)
            tok.encode_file(mistral, story)  # the other rank installs the entry while this one is writing
        return manifest

    monkeypatch.setattr(prepare, "_write_corpus", another_rank_finishes_first)
    encoded = tok.encode_file(mistral, story)
    assert raced and encoded.ids[:].tolist() == mistral.encode(story.read_text())
    assert [p.name for p in (tmp_path / "cache" / "tokens").iterdir()] == [encoded.corpus.path.name]


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
def test_a_jsonl_file_without_the_text_field_says_how_to_read_another(mistral, tmp_path, monkeypatch, use_cache):
    """encode_file serves commands without --text-field, by either path: the advice names prepare's flag."""
    from minifn.corpus import CorpusError

    monkeypatch.setenv("MINIFN_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "docs.jsonl"
    path.write_text('{"body": "no text field here"}\n')
    with pytest.raises(CorpusError, match=r"docs.jsonl:1 has no text field 'text'; .*minifn prepare --text-field"):
        tok.encode_file(mistral, path, use_cache=use_cache)

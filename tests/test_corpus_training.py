"""Training and evaluating on a prepared corpus: shards read per window, budgets, exact resume."""

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import TINY_FLAGS, invoke, shared_file
from minifn import checkpoint

FLAGS = [*TINY_FLAGS, "--scheduler", "none", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The first 60 kB of tinyshakespeare as five documents, prepared with a held-out validation split."""
    text = shared_file("tinyshakespeare.txt").read_text()[:60_000]
    root = tmp_path_factory.mktemp("corpus")
    for i in range(5):
        (root / "docs").mkdir(exist_ok=True)
        (root / "docs" / f"part{i}.txt").write_text(text[i * 12_000 : (i + 1) * 12_000])
    result = invoke("prepare", root / "docs", "--output", root / "prepared", "--val-fraction", 0.2,
                    "--shard-tokens", 3000)  # several shards, so windows cross shard boundaries
    assert result.exit_code == 0, result.output
    return root / "prepared"


def params(path):
    return {k: v for k, v in checkpoint.load(path)[0].items() if k.startswith(("params.", "opt_state."))}


def test_train_on_shards_with_a_budget_and_periodic_eval_then_eval_the_split(corpus, tmp_path):
    ckpt = tmp_path / "c.pt"
    result = invoke("train", "--dataset", corpus, "--model", ckpt, *FLAGS, "--num-epochs", 1000, "--max-steps", 6,
                    "--eval-every", 3, "--eval-tokens", 200)
    assert result.exit_code == 0, result.output
    assert "a prepared corpus" in result.output and "[Step: 6] [Val Loss: " in result.output
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert checkpoint.load(ckpt)[1]["data"]["tokens"] == manifest["tokens"]
    scored = invoke("eval", "--model", ckpt, "--dataset", corpus, "--batch-size", 4)
    values = dict(line.split(": ") for line in scored.output.strip().splitlines())
    assert int(values["Tokens evaluated"]) == manifest["splits"]["val"]["tokens"] - 1  # the split, each target once
    refused = invoke("train", "--dataset", corpus, "--model", tmp_path / "x.pt", *FLAGS, "--val-fraction", 0.1)
    assert refused.exit_code == 1 and "fixed by minifn prepare" in refused.output


def test_validation_during_training_scores_bits_per_byte_as_eval_does(corpus, tmp_path):
    """Both divide by the text bytes prepare recorded (training used to decode the whole split into a list)."""
    ckpt = tmp_path / "v.pt"
    assert invoke("train", "--dataset", corpus, "--model", ckpt, *FLAGS, "--num-epochs", 1000, "--max-steps", 1,
                  "--eval-every", 1).exit_code == 0
    logged = [e for e in map(json.loads, checkpoint.metrics_path(ckpt).read_text().splitlines()) if e["kind"] == "eval"]
    scored = invoke("eval", "--model", ckpt, "--dataset", corpus, "--batch-size", 2, "--batch-stride", 16)
    values = dict(line.split(": ") for line in scored.output.strip().splitlines())
    assert float(values["Cross-entropy"].split()[0]) == pytest.approx(logged[-1]["val_loss"], abs=1e-4)
    assert float(values["Bits per byte"]) == pytest.approx(logged[-1]["val_bpb"], abs=1e-4)


def test_resume_mid_epoch_from_shards_is_bit_identical(corpus, tmp_path):
    whole, cut = tmp_path / "whole.pt", tmp_path / "cut.pt"
    assert invoke("train", "--dataset", corpus, "--model", whole, *FLAGS, "--num-epochs", 1000, "--max-steps", 9,
                  "--dropout", 0.1).exit_code == 0
    assert invoke("train", "--dataset", corpus, "--model", cut, *FLAGS, "--num-epochs", 1000, "--max-steps", 4,
                  "--dropout", 0.1).exit_code == 0
    assert checkpoint.load(cut)[1]["progress"]["batch"] > 0  # stopped inside an epoch
    resumed = invoke("train", "--dataset", corpus, "--model", cut, *FLAGS, "--num-epochs", 1000, "--max-steps", 9,
                     "--dropout", 0.1)
    assert resumed.exit_code == 0 and "Resuming from" in resumed.output
    a, b = params(whole), params(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_manifest_whose_vocabulary_was_edited_is_named(corpus, tmp_path):
    import json
    import shutil

    edited = tmp_path / "edited"
    shutil.copytree(corpus, edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["tokenizer"]["vocab_size"] = 100  # the tokenizer's sha256 still matches
    (edited / "manifest.json").write_text(json.dumps(manifest))
    trained = invoke("train", "--dataset", corpus, "--model", tmp_path / "m.pt", *FLAGS, "--num-epochs", 1)
    assert trained.exit_code == 0, trained.output
    for command in (["train", "--dataset", edited, "--model", tmp_path / "e.pt", *FLAGS, "--num-epochs", 1],
                    ["eval", "--dataset", edited, "--model", tmp_path / "m.pt"]):
        result = invoke(*command)
        assert result.exit_code == 1 and "says a vocabulary of 100 but its tokenizer has 32000" in result.output
        assert len(result.output.strip().splitlines()) == 1


def test_a_corpus_of_another_tokenizer_is_one_line(corpus, tmp_path):
    trained = invoke("tokenizer", "train", "--input", corpus.parent / "docs", "--vocab-size", 500, "--output",
                     tmp_path / "t.model")
    assert trained.exit_code == 0, trained.output
    result = invoke("train", "--dataset", corpus, "--model", tmp_path / "m.pt", *FLAGS, "--tokenizer",
                    tmp_path / "t.model", "--num-epochs", 1)
    assert result.exit_code == 1 and "pass --tokenizer mistral to use it as prepared" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_shard_damaged_in_place_is_one_line_not_a_bug(corpus, tmp_path):
    """Same size, so opening passes; an id outside the vocabulary reached the step's range check and was
    reported as an internal error of minifn (exit 70) after the steps before it."""
    damaged = tmp_path / "damaged"
    shutil.copytree(corpus, damaged)
    ids = np.fromfile(damaged / "val-00000.bin", dtype=np.uint16)
    ids[3] = 60000
    ids.tofile(damaged / "val-00000.bin")
    result = invoke("train", "--dataset", damaged, "--model", tmp_path / "d.pt", *FLAGS, "--num-epochs", 1000,
                    "--max-steps", 1, "--eval-every", 1)
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"Error: {damaged / 'val-00000.bin'} holds id 60000 at token 3, outside the vocabulary of 32000: it was "
        "changed or damaged; prepare the corpus again")

"""Step and token budgets, periodic evaluation and the best checkpoint, by their effect on the run."""

import json
import math

import pytest

from conftest import TINY_FLAGS, invoke, story_file
from minifn import checkpoint


@pytest.fixture
def story(tmp_path):
    return story_file(tmp_path, 1500)


def events(ckpt, kind):
    return [e for e in map(json.loads, checkpoint.metrics_path(ckpt).read_text().splitlines()) if e["kind"] == kind]


def train(story, ckpt, *extra):
    result = invoke("train", "--dataset", story, "--model", ckpt, *TINY_FLAGS, *extra)
    assert result.exit_code == 0, result.output
    return result


def test_max_steps_ends_the_run_and_the_schedule_spans_it(story, tmp_path):
    ckpt = tmp_path / "s.pt"
    train(story, ckpt, "--num-epochs", 1000, "--max-steps", 7, "--lr", "1e-2")
    steps = events(ckpt, "step")
    assert [e["step"] for e in steps] == list(range(1, 8))
    assert int(checkpoint.load(ckpt)[0]["step"]) == 7
    want = [1e-2 * (1 + math.cos(math.pi * t / 7)) / 2 for t in range(7)]  # cosine over the real length
    assert [e["lr"] for e in steps] == pytest.approx(want, rel=1e-9)
    again = train(story, ckpt, "--num-epochs", 1000, "--max-steps", 12, "--lr", "1e-2")
    assert "Resuming from" in again.output and int(checkpoint.load(ckpt)[0]["step"]) == 12
    done = invoke("train", "--dataset", story, "--model", ckpt, *TINY_FLAGS, "--num-epochs", 1000,
                  "--max-steps", 12, "--lr", "1e-2")
    assert done.exit_code == 1 and "nothing to do" in done.output


def test_max_tokens_counts_window_tokens(story, tmp_path):
    ckpt = tmp_path / "t.pt"
    train(story, ckpt, "--num-epochs", 1000, "--max-tokens", 200)  # 2 windows x 32 tokens = 64 a step
    assert int(checkpoint.load(ckpt)[0]["step"]) == math.ceil(200 / 64)


def test_the_sooner_budget_wins(story, tmp_path):
    ckpt = tmp_path / "e.pt"
    result = train(story, ckpt, "--num-epochs", 1, "--max-steps", 10000)
    per_epoch = int(result.output.split(" steps/epoch")[0].split("; ")[-1])
    assert int(checkpoint.load(ckpt)[0]["step"]) == per_epoch and "[Epoch: 1/1]" in result.output


def test_eval_every_reports_validation_and_keeps_the_best_checkpoint(story, tmp_path):
    ckpt = tmp_path / "v.pt"
    result = train(story, ckpt, "--num-epochs", 1000, "--max-steps", 10, "--eval-every", 3, "--val-fraction", 0.2,
                   "--lr", "3e-2", "--scheduler", "none")
    evals = events(ckpt, "eval")
    assert [e["step"] for e in evals] == [3, 6, 9, 10]  # every 3 steps and at the end
    assert "[Step: 3] [Val Loss: " in result.output and "[Val BPB: " in result.output
    for e in evals:
        assert e["val_perplexity"] == pytest.approx(math.exp(e["val_loss"]))
        assert 0 < e["val_bpb"] < e["val_loss"] * 4  # nats per token over ln 2, per byte of several bytes/token
    best = min(evals, key=lambda e: e["val_loss"])
    best_path = tmp_path / "v.best.pt"
    tensors, meta = checkpoint.load(best_path)
    assert int(tensors["step"]) == best["step"] and meta["progress"]["best_val"] == best["val_loss"]


def test_eval_every_also_scores_the_end_when_the_epochs_end_the_run(story, tmp_path):
    ckpt = tmp_path / "e.pt"
    result = train(story, ckpt, "--num-epochs", 2, "--eval-every", 4, "--val-fraction", 0.2)
    total = int(checkpoint.load(ckpt)[0]["step"])
    assert total % 4 and "[Epoch: 2/2]" in result.output  # the end is not a multiple of 4
    assert [e["step"] for e in events(ckpt, "eval")] == [*range(4, total, 4), total]


def test_a_step_budget_inside_an_epoch_still_scores_its_end(story, tmp_path):
    """Without --eval-every validation comes with each epoch's line; a budget that ends the run inside an
    epoch, before any, scores the end instead (and keeps it as the best checkpoint)."""
    ckpt = tmp_path / "m.pt"
    result = train(story, ckpt, "--num-epochs", 1000, "--max-steps", 3, "--val-fraction", 0.2)
    assert "[Epoch: " not in result.output  # the budget ends the first epoch early
    (end,) = events(ckpt, "eval")
    assert end["step"] == 3 and f"[Step: 3] [Val Loss: {end['val_loss']:.4f}]" in result.output
    assert int(checkpoint.load(tmp_path / "m.best.pt")[0]["step"]) == 3


def test_a_fresh_run_removes_the_older_runs_best_checkpoint(story, tmp_path):
    ckpt, best = tmp_path / "f.pt", tmp_path / "f.best.pt"
    train(story, ckpt, "--num-epochs", 1, "--val-fraction", 0.2)
    assert best.exists()
    train(story, ckpt, "--num-epochs", 1, "--fresh")  # no validation: no best of its own
    assert not best.exists()
    train(story, ckpt, "--num-epochs", 1, "--val-fraction", 0.2, "--fresh")
    new_run = checkpoint.load(ckpt)[1]["run_id"]
    assert checkpoint.load(best)[1]["run_id"] == new_run  # replaced by this run's own
    train(story, ckpt, "--num-epochs", 2, "--val-fraction", 0.2)  # resumed: the best is this run's, kept
    assert checkpoint.load(best)[1]["run_id"] == new_run


def test_eval_tokens_caps_the_validation_set(story, tmp_path):
    ckpt = tmp_path / "c.pt"
    train(story, ckpt, "--num-epochs", 1000, "--max-steps", 2, "--eval-every", 2, "--val-fraction", 0.3,
          "--eval-tokens", 40)
    assert events(ckpt, "eval")[0]["val_tokens"] == 40


def test_bits_per_byte_of_a_text_files_split_count_the_texts_own_bytes(story, tmp_path):
    """--val-fraction cuts the file's tokens mid-document; the validation text is everything from the cut on,
    so its bytes include the space the first validation token carries (which decoding that token drops)."""
    from minifn.tokenizer import load_tokenizer

    tok = load_tokenizer()
    text = story.read_text()
    ids = tok.encode(text)
    fraction = next(f for f in (0.2, 0.25, 0.3, 0.35) if tok.piece(ids[int(len(ids) * (1 - f))]).startswith("\u2581"))
    cut = int(len(ids) * (1 - fraction))
    val_bytes = len(text.encode()) - len(tok.decode(ids[:cut]).encode())
    ckpt = tmp_path / "b.pt"
    train(story, ckpt, "--num-epochs", 1000, "--max-steps", 1, "--eval-every", 1, "--val-fraction", fraction)
    (e,) = events(ckpt, "eval")
    assert e["val_bpb"] == pytest.approx(e["val_loss"] * e["val_tokens"] / math.log(2) / val_bytes, rel=1e-12)

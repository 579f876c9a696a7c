"""Resume policy, tested by effect: a changed setting either changes the next steps as it says, or is
refused with one line naming it. Never accepted and then ignored."""

import json
import math
import shutil

import pytest
import torch

from conftest import TINY_FLAGS, invoke, story_file
from minifn import checkpoint


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint after 2 of 3 epochs (scheduler none, so the lr is the flag's value)."""
    root = tmp_path_factory.mktemp("resume")
    story = story_file(root, 600)
    ckpt = root / "base.pt"
    result = invoke("train", "--dataset", story, "--model", ckpt, *TINY_FLAGS, "--num-epochs", 2, *SETTINGS)
    assert result.exit_code == 0, result.output
    return story, ckpt


SETTINGS = ["--scheduler", "none", "--lr", "3e-3", "--dropout", "0"]


def resume(saved, tmp_path, *flags, epochs=3, name="copy"):
    """Resume a copy of the saved checkpoint for one more epoch with flags replacing the base settings."""
    story, ckpt = saved
    copy = tmp_path / f"{name}.pt"
    shutil.copy(ckpt, copy)
    shutil.copy(checkpoint.metrics_path(ckpt), checkpoint.metrics_path(copy))
    result = invoke("train", "--dataset", story, "--model", copy, *TINY_FLAGS, "--num-epochs", epochs, *SETTINGS,
                    *flags)
    return result, copy


def params(path):
    return {k: v for k, v in checkpoint.load(path)[0].items() if k.startswith("params.")}


def steps(path):
    return [json.loads(line) for line in checkpoint.metrics_path(path).read_text().splitlines()
            if json.loads(line)["kind"] == "step"]


def test_unchanged_resume_equals_an_uninterrupted_run(saved, tmp_path):
    story, _ = saved
    whole = tmp_path / "whole.pt"
    assert invoke("train", "--dataset", story, "--model", whole, *TINY_FLAGS, "--num-epochs", 3, *SETTINGS
                  ).exit_code == 0
    result, resumed = resume(saved, tmp_path)
    assert result.exit_code == 0 and "applied from now on (num_epochs: 2 != 3)\n" in result.output
    assert all(torch.equal(a, b) for a, b in zip(params(whole).values(), params(resumed).values()))
    assert [e["loss"] for e in steps(whole)] == [e["loss"] for e in steps(resumed)]  # log: none lost or doubled


def test_a_new_learning_rate_is_used_by_the_next_steps(saved, tmp_path):
    result, path = resume(saved, tmp_path, "--lr", "0.01")
    assert result.exit_code == 0 and "lr: 0.003 != 0.01" in result.output
    lrs = [e["lr"] for e in steps(path)]
    per_epoch = len(lrs) // 3
    assert lrs[: 2 * per_epoch] == [pytest.approx(3e-3)] * (2 * per_epoch)
    assert lrs[2 * per_epoch:] == [pytest.approx(1e-2)] * per_epoch


APPLIED = [  # each changes the parameters the resumed epoch produces
    ["--lr", "0.02"],
    ["--weight-decay", "0.5"],
    ["--beta1", "0.5"],
    ["--beta2", "0.9"],
    ["--eps", "1e-3"],
    ["--clip-grad", "1e-4"],
    ["--dropout", "0.3"],
    ["--scheduler", "cosine", "--t-max", "1"],
    ["--warmup-steps", "30"],
    ["--label-smoothing", "0.3"],
    ["--grad-accum-steps", "2"],
    ["--criterion", "mse"],
]


@pytest.mark.parametrize("flags", APPLIED, ids=[f[0] for f in APPLIED])
def test_a_changed_setting_takes_effect(saved, tmp_path, flags):
    _, unchanged = resume(saved, tmp_path, name="unchanged")
    result, changed = resume(saved, tmp_path, *flags, name="changed")
    assert result.exit_code == 0 and "Note: resuming with changed settings" in result.output, result.output
    a, b = params(unchanged), params(changed)
    assert any(not torch.equal(a[k], b[k]) for k in a), f"{flags} was accepted but changed nothing"


def test_sgd_momentum_changes_take_effect(tmp_path, saved):
    story, _ = saved
    sgd = tmp_path / "sgd.pt"
    flags = [*TINY_FLAGS, "--optimizer", "sgd", "--momentum", "0.9", "--scheduler", "none"]
    assert invoke("train", "--dataset", story, "--model", sgd, *flags, "--num-epochs", 1).exit_code == 0
    results = {}
    for momentum in ("0.9", "0.5"):
        copy = tmp_path / f"m{momentum}.pt"
        shutil.copy(sgd, copy)
        assert invoke("train", "--dataset", story, "--model", copy, *flags, "--num-epochs", 2,
                      "--momentum", momentum).exit_code == 0
        results[momentum] = params(copy)
    assert any(not torch.equal(results["0.9"][k], results["0.5"][k]) for k in results["0.9"])


REFUSED = [
    (["--batch-size", "3"], "batch_size: 2 != 3"),
    (["--batch-stride", "8"], "batch_stride: 16 != 8"),
    (["--no-shuffle"], "shuffle: True != False"),
    (["--val-fraction", "0.2"], "val_fraction: 0.0 != 0.2"),
    (["--seed", "5"], "seed: 0 != 5"),
    (["--shuffle-seed", "5"], "shuffle_seed: -1 != 5"),
    (["--optimizer", "adam"], "optimizer: 'adamw' != 'adam'"),
    (["--amsgrad"], "amsgrad: False != True"),
    (["--embed-dim", "24"], "embed_dim: 16 != 24"),
]


@pytest.mark.parametrize("flags,message", REFUSED, ids=[f[0] for f, _ in REFUSED])
def test_a_setting_that_breaks_resume_is_refused_by_name(saved, tmp_path, flags, message):
    _, original = saved
    result, copy = resume(saved, tmp_path, *flags)
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "--fresh" in result.output
    assert copy.read_bytes() == original.read_bytes()


def test_changed_dataset_is_refused_unless_new_data(saved, tmp_path):
    story, _ = saved
    edited = tmp_path / "edited.txt"
    edited.write_text(story.read_text() + " One more line.")
    _, copy = resume(saved, tmp_path)
    refused = invoke("train", "--dataset", edited, "--model", copy, *TINY_FLAGS, "--num-epochs", 4, *SETTINGS)
    assert refused.exit_code == 1 and "the dataset's contents" in refused.output and "--new-data" in refused.output
    accepted = invoke("train", "--dataset", edited, "--model", copy, *TINY_FLAGS, "--num-epochs", 1, *SETTINGS,
                      "--new-data")
    assert accepted.exit_code == 0 and "new data" in accepted.output
    tensors, meta = checkpoint.load(copy)
    assert int(tensors["step"]) > 15 and meta["progress"]["epoch"] == 1  # the model went on, the data restarted


def test_new_data_schedule_spans_the_steps_taken_and_the_new_epochs(tmp_path):
    """--new-data restarts the data, not the step count: --num-epochs epochs of the new data come after the
    steps already taken, and the cosine spans all of them (it used to span the new epochs alone, from step 0,
    so past its end the learning rate climbed back to its peak)."""
    story = story_file(tmp_path, 600)
    path = tmp_path / "m.pt"
    flags = [*TINY_FLAGS, "--scheduler", "cosine", "--lr", "3e-3"]
    assert invoke("train", "--dataset", story, "--model", path, *flags, "--num-epochs", 3).exit_code == 0
    before = len(steps(path))
    edited = tmp_path / "edited.txt"
    edited.write_text(story.read_text()[:300])
    result = invoke("train", "--dataset", edited, "--model", path, *flags, "--num-epochs", 2, "--new-data")
    assert result.exit_code == 0, result.output
    logged = steps(path)
    total = len(logged)
    assert total > before + 2 and f"{total} steps in all" in result.output
    expected = [3e-3 * (1 + math.cos(math.pi * (e["step"] - 1) / total)) / 2 for e in logged[before:]]
    assert [e["lr"] for e in logged[before:]] == pytest.approx(expected, rel=1e-5)


def test_new_data_with_a_step_budget_already_spent_is_nothing_to_do(tmp_path):
    """--new-data restarts the epochs, not the steps: a --max-steps the checkpoint has already reached trains
    nothing, and says so instead of rewriting the checkpoint with the new data's identity."""
    story = story_file(tmp_path, 600)
    path = tmp_path / "m.pt"
    assert invoke("train", "--dataset", story, "--model", path, *TINY_FLAGS, "--max-steps", 3).exit_code == 0
    before = path.read_bytes()
    edited = tmp_path / "edited.txt"
    edited.write_text(story.read_text()[:300])
    result = invoke("train", "--dataset", edited, "--model", path, *TINY_FLAGS, "--max-steps", 2, "--new-data")
    assert result.exit_code == 1 and "has already taken 3 steps, the whole budget of this run (2)" in result.output
    assert path.read_bytes() == before


def test_fewer_epochs_than_trained_is_nothing_to_do(saved, tmp_path):
    result, copy = resume(saved, tmp_path, epochs=1)
    assert result.exit_code == 1 and "already trained 2 epoch(s)" in result.output
    assert "Training complete" not in result.output


def test_a_checkpoint_saved_before_the_warmup_was_state_resumes_as_before(saved, tmp_path):
    """Checkpoints written before the warm-up length moved into the optimizer state lack that tensor; the
    run's config supplies it, and the resumed run is the one the full checkpoint gives."""
    _, full = resume(saved, tmp_path, name="full")
    story, ckpt = saved
    tensors, meta = checkpoint.load(ckpt)
    dropped = [k for k in tensors if k.endswith(".warmup_steps")]
    assert len(dropped) == 1
    old = tmp_path / "old.pt"
    checkpoint.save(old, {k: v for k, v in tensors.items() if k not in dropped}, meta)
    shutil.copy(checkpoint.metrics_path(ckpt), checkpoint.metrics_path(old))
    result = invoke("train", "--dataset", story, "--model", old, *TINY_FLAGS, "--num-epochs", 3, *SETTINGS)
    assert result.exit_code == 0, result.output
    assert all(torch.equal(a, b) for a, b in zip(params(full).values(), params(old).values()))


SGD = ["--optimizer", "sgd", "--momentum", "0", "--weight-decay", "0", "--scheduler", "none", "--dropout", "0"]


@pytest.mark.parametrize("clip", [0.02, 0.0], ids=["clipping", "off"])
def test_a_new_clip_threshold_sets_the_size_of_the_next_update(saved, tmp_path, clip):
    """Plain SGD, so one step moves the parameters by exactly lr * |g| * min(1, clip / (|g| + 1e-6)), with |g|
    the step's logged norm (taken before clipping): the resumed threshold, not the saved one, sets it."""
    story, _ = saved
    base = tmp_path / "sgd.pt"
    flags = [*TINY_FLAGS, *SGD, "--lr", "0.5"]
    assert invoke("train", "--dataset", story, "--model", base, *flags, "--num-epochs", 1,
                  "--clip-grad", 1e3).exit_code == 0
    done = int(checkpoint.load(base)[0]["step"])
    before = params(base)
    result = invoke("train", "--dataset", story, "--model", base, *flags, "--num-epochs", 2, "--clip-grad", clip,
                    "--max-steps", done + 1)
    assert result.exit_code == 0 and f"clip_grad: 1000.0 != {float(clip)}" in result.output, result.output
    after, last = params(base), steps(base)[-1]
    assert last["step"] == done + 1
    norm = last["grad_norm"]
    moved = torch.cat([(after[k] - before[k]).flatten() for k in before]).norm().item()
    expected = 0.5 * norm * (min(1.0, clip / (norm + 1e-6)) if clip else 1.0)
    assert norm > 5 * 0.02  # clipping is active at 0.02
    assert moved == pytest.approx(expected, rel=1e-3)


def logged_lrs(tmp_path, name, *flags, epochs=4):
    story = story_file(tmp_path, 600)
    path = tmp_path / f"{name}.pt"
    result = invoke("train", "--dataset", story, "--model", path, *TINY_FLAGS, *SGD, "--lr", "0.05",
                    "--num-epochs", epochs, *flags)
    assert result.exit_code == 0, result.output
    lrs = [e["lr"] for e in steps(path)]
    return lrs, len(lrs) // epochs


def torch_lrs(make_scheduler, n):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    sched, out = make_scheduler(opt), []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("flags,make", [
    (["--scheduler", "cosine", "--eta-min", "0.01"],
     lambda o, per_epoch, total: torch.optim.lr_scheduler.CosineAnnealingLR(o, total, eta_min=0.01)),
    (["--scheduler", "cosine", "--t-max", "1", "--eta-min", "0.002"],
     lambda o, per_epoch, total: torch.optim.lr_scheduler.CosineAnnealingLR(o, per_epoch, eta_min=0.002)),
    (["--scheduler", "linear", "--start-factor", "0.2", "--end-factor", "0.7", "--total-iters", "2"],
     lambda o, per_epoch, total: torch.optim.lr_scheduler.LinearLR(o, 0.2, 0.7, 2 * per_epoch)),
    (["--scheduler", "step", "--step-size", "1", "--gamma", "0.3"],
     lambda o, per_epoch, total: torch.optim.lr_scheduler.StepLR(o, per_epoch, 0.3)),
], ids=["cosine-eta-min", "cosine-t-max", "linear-factors", "step-gamma"])
def test_scheduler_flags_give_torchs_learning_rates_step_by_step(tmp_path, flags, make):
    """Every scheduler flag reaches the steps: the logged lr of each step (the one its update used) is torch's
    scheduler's for the same settings, epochs converted to steps."""
    lrs, per_epoch = logged_lrs(tmp_path, "sched", *flags)
    assert per_epoch > 1
    expected = torch_lrs(lambda o: make(o, per_epoch, len(lrs)), len(lrs))
    assert lrs == pytest.approx(expected, rel=1e-6, abs=1e-12)

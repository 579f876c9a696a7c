"""minifn sweep: every member is the run trained alone, resumes exactly, and a diverging one is frozen."""

import json
import os

import pytest
import torch

from conftest import TINY_FLAGS, invoke, story_file
from minifn import checkpoint

FLAGS = [*TINY_FLAGS, "--scheduler", "none", "--clip-grad", "0", "--val-fraction", "0.2"]


@pytest.fixture
def story(tmp_path):
    return story_file(tmp_path, 700)


TOL = 3e-5  # worst seen 2.7e-6 (see relative); members with other settings differ far more


def relative(a, b):
    """|a - b| / |b| over a whole tensor. A run alone differentiates with torch.autograd (eager, outermost)
    and steps with torch's fused AdamW kernel; a vmapped member differentiates with functorch and steps with
    the composed blocks. Both round differently: Adam turns that into a few larger relative differences on
    rare tokens' tiny embedding rows (5e-4 on 1 of 512000 elements seen), while whole tensors stay close."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def params(path):
    return {k: v for k, v in checkpoint.load(path)[0].items() if k.startswith("params.")}


def test_each_member_equals_its_run_alone_and_diverged_ones_freeze(story, tmp_path):
    out = tmp_path / "sweep"
    result = invoke("sweep", "--dataset", story, "--output", out, *FLAGS, "--num-epochs", 2,
                    "--lr", "1e-3,1e-2,1e30", "--weight-decay", "0,0.1")
    assert result.exit_code == 0, result.output
    assert "Sweep complete! Runs ranked by validation loss:" in result.output
    assert result.output.count("is frozen at its state before that step") == 2  # lr=1e30, both weight decays
    for lr, wd in (("0.001", "0"), ("0.01", "0.1")):
        alone = tmp_path / f"alone{lr}.pt"
        assert invoke("train", "--dataset", story, "--model", alone, *FLAGS, "--num-epochs", 2, "--lr", lr,
                      "--weight-decay", wd).exit_code == 0
        member = out / f"lr={float(lr):g},weight_decay={float(wd):g}.pt"
        a, b = params(alone), params(member)
        assert max(relative(b[k], a[k]) for k in a) < TOL
        assert checkpoint.load(member)[1]["config"]["optim"]["lr"] == float(lr)
    frozen = params(out / "lr=1e+30,weight_decay=0.pt")
    assert all(torch.isfinite(v).all() for v in frozen.values())
    generated = invoke("generate", "--model", out / "lr=0.01,weight_decay=0.1.pt", "--prompt", "The", "--max-tokens", 3)
    assert generated.exit_code == 0, generated.output
    plotted = invoke("plot", out, "-o", tmp_path / "sweep.png")
    assert plotted.exit_code == 0 and (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_a_member_frozen_with_overflowed_weights_says_so(story, tmp_path, monkeypatch):
    """Finite gradients that overflow the weights (an absurd learning rate) freeze the member one step late,
    holding those weights: the line says its checkpoint will hold them. Simulated: member 1's first step
    writes an infinite weight."""
    from minifn import sweep_run

    real = sweep_run.make_sweep_step

    def overflowing(*args, **kwargs):
        step = real(*args, **kwargs)

        def first_step_overflows_member_1(states, batch):
            states, metrics = step(states, batch)
            if int(states.step.max()) == 1:
                states.params["embed.weight"][1, 0, 0] = float("inf")
            return states, metrics
        return first_step_overflows_member_1

    monkeypatch.setattr(sweep_run, "make_sweep_step", overflowing)
    result = invoke("sweep", "--dataset", story, "--output", tmp_path / "s", *FLAGS, "--num-epochs", 1,
                    "--lr", "1e-3,3e-3")
    assert result.exit_code == 0, result.output
    assert "[Step: 2] lr=0.003: the loss or its gradients became non-finite; this run is frozen at its state " \
           "before that step (its weights had already overflowed the step before" in result.output
    assert result.output.count("overflowed") == 1


def test_a_member_with_its_own_seed_is_the_run_alone_in_the_sweeps_window_order(story, tmp_path):
    """Members share one window order (each batch is read once); a member whose --seed differs records that
    order as --shuffle-seed, so the run alone with both seeds is the member, and resumes it exactly."""
    out = tmp_path / "sweep"
    assert invoke("sweep", "--dataset", story, "--output", out, *FLAGS, "--num-epochs", 2, "--lr", "1e-2",
                  "--seed", "3,4").exit_code == 0
    member = out / "seed=4.pt"
    assert checkpoint.load(member)[1]["config"]["data"]["shuffle_seed"] == 3
    for name, flags in (("alone", ["--shuffle-seed", "3"]), ("own_order", [])):
        assert invoke("train", "--dataset", story, "--model", tmp_path / f"{name}.pt", *FLAGS, "--num-epochs", 2,
                      "--lr", "1e-2", "--seed", "4", *flags).exit_code == 0
    a, b, c = params(tmp_path / "alone.pt"), params(member), params(tmp_path / "own_order.pt")
    assert max(relative(b[k], a[k]) for k in a) < TOL
    assert max(relative(c[k], a[k]) for k in a) > 100 * TOL  # the order matters here: seed 4's own differs


def test_the_warmup_length_is_swept_like_any_hyperparameter(story, tmp_path):
    out = tmp_path / "sweep"
    result = invoke("sweep", "--dataset", story, "--output", out, *FLAGS, "--num-epochs", 2, "--lr", "1e-2",
                    "--warmup-steps", "0,4")
    assert result.exit_code == 0, result.output
    members = {}
    for warmup in ("0", "4"):
        alone = tmp_path / f"alone{warmup}.pt"
        assert invoke("train", "--dataset", story, "--model", alone, *FLAGS, "--num-epochs", 2, "--lr", "1e-2",
                      "--warmup-steps", warmup).exit_code == 0
        members[warmup] = params(out / f"warmup_steps={warmup}.pt")
        a = params(alone)
        assert max(relative(members[warmup][k], a[k]) for k in a) < TOL
    assert any(not torch.allclose(members["0"][k], members["4"][k], rtol=1e-3) for k in members["0"])


def test_a_resumed_sweep_equals_an_uninterrupted_one(story, tmp_path):
    sweep = ["--lr", "1e-3,3e-3", "--dropout", "0,0.1"]
    assert invoke("sweep", "--dataset", story, "--output", tmp_path / "whole", *FLAGS, "--num-epochs", 3,
                  *sweep).exit_code == 0
    assert invoke("sweep", "--dataset", story, "--output", tmp_path / "cut", *FLAGS, "--num-epochs", 1,
                  *sweep).exit_code == 0
    resumed = invoke("sweep", "--dataset", story, "--output", tmp_path / "cut", *FLAGS, "--num-epochs", 3, *sweep)
    assert resumed.exit_code == 0, resumed.output
    for member in (tmp_path / "whole").glob("*.pt"):
        a, b = params(member), params(tmp_path / "cut" / member.name)
        assert all(torch.equal(a[k], b[k]) for k in a)


class Killed(BaseException):
    """A kill -9 in the middle of a save: nothing below it cleans up."""


@pytest.mark.parametrize("over_old", [False, True], ids=["first-save", "fresh-over-old-checkpoints"])
def test_a_sweep_killed_between_its_members_renames_resumes_exactly(story, tmp_path, monkeypatch, over_old):
    """Every member's new checkpoint is complete in a temporary before the first is renamed into place, so a
    sweep killed after one rename resumes: the next start renames the rest. Over old checkpoints at the same
    position (a --fresh sweep killed), the saves' ids tell the old members from the new."""
    sweep, cut = ["--lr", "1e-3,3e-3"], tmp_path / "cut"
    assert invoke("sweep", "--dataset", story, "--output", tmp_path / "whole", *FLAGS, "--num-epochs", 2,
                  *sweep).exit_code == 0
    if over_old:
        assert invoke("sweep", "--dataset", story, "--output", cut, *FLAGS, "--num-epochs", 1, *sweep).exit_code == 0
    rename, renamed = os.replace, []

    def killed_after_the_first_member(src, dst):
        if str(dst).endswith(".pt") and renamed:
            raise Killed
        renamed.extend([dst] if str(dst).endswith(".pt") else [])
        rename(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", killed_after_the_first_member)
        with pytest.raises(Killed):
            invoke("sweep", "--dataset", story, "--output", cut, *FLAGS, "--num-epochs", 1, *sweep,
                   *(["--fresh"] if over_old else []), catch_exceptions=False)
    (tmp,) = cut.glob(".*.pt.*.tmp")  # the member not yet renamed, complete
    left = cut / tmp.name[1:].rsplit(".", 2)[0]
    assert left.exists() == over_old
    killed_run = checkpoint.load(tmp)[1]["run_id"]
    resumed = invoke("sweep", "--dataset", story, "--output", cut, *FLAGS, "--num-epochs", 2, *sweep)
    assert resumed.exit_code == 0, resumed.output
    assert not list(cut.glob(".*.pt.*.tmp"))
    assert checkpoint.load(left)[1]["run_id"] == killed_run  # over old ones: the killed --fresh run's, not the old
    for member in (tmp_path / "whole").glob("*.pt"):
        a, b = params(member), params(cut / member.name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_sweep_refuses_what_it_cannot_vary(story, tmp_path):
    sweep = lambda *flags: invoke("sweep", "--dataset", story, "--output", tmp_path / "s", *FLAGS, *flags)  # noqa: E731
    result = sweep("--lr", "1e-3,abc")
    assert result.exit_code == 2 and "comma-separated numbers" in result.output
    result = sweep("--lr", ",")
    assert result.exit_code == 2 and "--lr needs at least one value" in result.output
    result = sweep("--lr", "1e-3,-1")
    assert result.exit_code == 1 and "--lr must be positive" in result.output
    # SGD's momentum buffer is in the state only when momentum is above 0: all members alike, or refused
    result = sweep("--optimizer", "sgd", "--momentum", "0.9,0")
    assert result.exit_code == 1 and "--momentum must be above 0 for every member" in result.output
    result = sweep("--lr", "1e-3,0.001")  # the same value twice: one checkpoint for two members
    assert result.exit_code == 1 and "would be the same run: lr=0.001" in result.output
    result = sweep("--lr", "1e-3,1e-2", "--save-every-steps", "2")
    assert result.exit_code == 1 and "does not support --save-every-steps" in result.output
    assert not (tmp_path / "s").exists()


def test_seeds_that_would_vary_nothing_after_init_from_are_refused(story, tmp_path):
    """With --init-from a seed only draws dropout masks (the batch order is the sweep's): without dropout the
    members would be one run twice."""
    start = tmp_path / "start.pt"
    assert invoke("train", "--dataset", story, "--model", start, *FLAGS, "--num-epochs", 1).exit_code == 0
    sweep = lambda *flags: invoke("sweep", "--dataset", story, "--init-from", start, *FLAGS,  # noqa: E731
                                  "--max-steps", 2, *flags)
    result = sweep("--output", tmp_path / "same", "--seed", "0,1")
    assert result.exit_code == 1 and "seed=0 and seed=1 would be the same run: a seed only draws" in result.output
    assert not (tmp_path / "same").exists()
    from minifn import Config
    from minifn.config import DataConfig, ModelConfig, RunConfig
    from minifn.sweep_run import train_sweep

    tiny = ModelConfig(embed_dim=16, num_heads=2, head_dim=8, num_layers=1, ff_dim=32, max_seq_len=32)
    shared = Config(model=tiny, data=DataConfig(dataset=str(story), batch_size=2, batch_stride=16),
                    run=RunConfig(init_from=str(start), max_steps=1, compile="off"))
    # seeds that differ along with another setting are two runs: accepted
    train_sweep(shared, [{"seed": 0, "lr": 1e-4}, {"seed": 1, "lr": 3e-4}], tmp_path / "api")
    result = sweep("--output", tmp_path / "masks", "--seed", "0,1", "--dropout", "0.2")
    assert result.exit_code == 0, result.output
    a, b = (params(tmp_path / "masks" / f"seed={s}.pt") for s in (0, 1))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # their own masks: two runs


def test_a_sweep_ended_by_its_step_budget_inside_an_epoch_still_ranks_its_runs(story, tmp_path):
    """With no validation split and --max-steps inside an epoch there is no epoch average: the runs are ranked
    by their last step's loss, not listed as nothing under 'Sweep complete!'."""
    out = tmp_path / "s"
    result = invoke("sweep", "--dataset", story, "--output", out, *TINY_FLAGS, "--lr", "1e-3,1e-2", "--max-steps", 3)
    assert result.exit_code == 0, result.output
    assert "Runs ranked by training loss at the last step (3):" in result.output
    for name in ("lr=0.001", "lr=0.01"):
        last = json.loads(checkpoint.metrics_path(out / f"{name}.pt").read_text().splitlines()[-1])
        assert last["step"] == 3 and f"  {last['loss']:.4f}  {name}  {out}/{name}.pt" in result.output


def test_a_step_budget_inside_an_epoch_ranks_by_the_validation_of_its_end(story, tmp_path):
    """As train does: with a validation split, the end of a budget inside an epoch is evaluated, and the
    ranking is by that, not by one batch's training loss or an older epoch's validation."""
    out = tmp_path / "v"
    result = invoke("sweep", "--dataset", story, "--output", out, *FLAGS, "--lr", "1e-3,1e-2", "--max-steps", 3)
    assert result.exit_code == 0, result.output
    assert "Runs ranked by validation loss:" in result.output
    for name in ("lr=0.001", "lr=0.01"):
        events = [json.loads(line) for line in checkpoint.metrics_path(out / f"{name}.pt").read_text().splitlines()]
        (end,) = [e for e in events if e["kind"] == "eval"]
        assert end["step"] == 3 and f"  {end['val_loss']:.4f}  {name}  {out}/{name}.pt" in result.output


def test_a_config_file_gives_swept_settings_as_numbers_or_arrays(story, tmp_path):
    """minifn train's config file works for a sweep: `lr = 0.001` is one value (it was refused as not a
    string), and a TOML array sweeps, as comma-separated values do on the command line."""
    config = tmp_path / "run.toml"
    config.write_text('lr = 0.001\nweight-decay = [0, 0.1]\nnum-epochs = 1\n')
    out = tmp_path / "s"
    result = invoke("sweep", "--config", config, "--dataset", story, "--output", out, *TINY_FLAGS)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.pt")) == ["weight_decay=0.1.pt", "weight_decay=0.pt"]
    optim = checkpoint.load(out / "weight_decay=0.1.pt")[1]["config"]["optim"]
    assert (optim["lr"], optim["weight_decay"]) == (0.001, 0.1)
    config.write_text("seed = true\n")
    result = invoke("sweep", "--config", config, "--dataset", story, "--output", out, *TINY_FLAGS)
    assert result.exit_code == 2 and "seed must be a number" in result.output


def test_a_sweep_whose_every_run_diverges_stops_as_train_does(story, tmp_path):
    result = invoke("sweep", "--dataset", story, "--output", tmp_path / "s", *FLAGS, "--num-epochs", 2,
                    "--lr", "1e30,3e30")
    assert result.exit_code == 1, result.output
    assert "every run of the sweep diverged by step" in result.output and "Traceback" not in result.output
    assert not list((tmp_path / "s").glob("*.pt"))  # nothing saved, as minifn train saves nothing then


def test_a_members_checkpoint_holds_only_its_own_tensors(story, tmp_path):
    """torch.save writes a view's whole storage; a member is a slice of the stacked states."""
    invoke("sweep", "--dataset", story, "--output", tmp_path / "s", *FLAGS, "--num-epochs", 1, "--lr", "1e-3,1e-2,3e-2")
    invoke("train", "--dataset", story, "--model", tmp_path / "alone.pt", *FLAGS, "--num-epochs", 1)
    alone = (tmp_path / "alone.pt").stat().st_size
    for member in (tmp_path / "s").glob("*.pt"):
        assert member.stat().st_size < 1.2 * alone


def test_a_sweep_locks_its_members_checkpoints_as_train_does(story, tmp_path):
    out = tmp_path / "s"
    with checkpoint.locked(out / "lr=0.01.pt"):  # another process trains that member now
        result = invoke("sweep", "--dataset", story, "--output", out, *FLAGS, "--num-epochs", 1, "--lr", "1e-3,1e-2")
    assert result.exit_code == 1 and "is in use by another minifn process" in result.output
    assert not list(out.glob("*.pt"))

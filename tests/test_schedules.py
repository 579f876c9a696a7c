"""Schedules against torch.optim.lr_scheduler, value by value."""

import pytest
import torch

from minifn import schedules

BASE_LR = 0.05


def torch_values(make_scheduler, steps=200):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=BASE_LR)
    sched = make_scheduler(opt)
    values = []
    for _ in range(steps):
        values.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return torch.tensor(values, dtype=torch.float64)


def ours(schedule, steps=200):
    lr = torch.tensor(BASE_LR, dtype=torch.float64)
    return torch.stack([schedule(torch.tensor(s), lr) for s in range(steps)])


@pytest.mark.parametrize("ours_fn,torch_fn", [
    (lambda: schedules.step_decay(30, 0.5), lambda o: torch.optim.lr_scheduler.StepLR(o, 30, 0.5)),
    (lambda: schedules.step_decay(7), lambda o: torch.optim.lr_scheduler.StepLR(o, 7)),
    (lambda: schedules.cosine(200), lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 200)),
    (lambda: schedules.cosine(50, 1e-3), lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 50, 1e-3)),
    (lambda: schedules.linear(), lambda o: torch.optim.lr_scheduler.LinearLR(o)),
    (lambda: schedules.linear(1.0, 0.1, 150), lambda o: torch.optim.lr_scheduler.LinearLR(o, 1.0, 0.1, 150)),
    (lambda: schedules.constant(), lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0)),
])
def test_matches_torch_scheduler(ours_fn, torch_fn):
    expected, got = torch_values(torch_fn), ours(ours_fn())
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("warmup_steps", [1, 10])
@pytest.mark.parametrize("after_ours,after_torch", [
    (lambda: schedules.cosine(100), lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 100)),
    (lambda: schedules.step_decay(30, 0.5), lambda o: torch.optim.lr_scheduler.StepLR(o, 30, 0.5)),
])
def test_warmup_matches_torch_linear_then_sequential(warmup_steps, after_ours, after_torch):
    """Warm-up is torch's LinearLR from 1/W to 1 over W - 1 steps, handed over by SequentialLR at step W."""
    def torch_fn(o):
        if warmup_steps == 1:  # LinearLR needs total_iters >= 1; a one-step warm-up is lr / 1 at step 0
            return after_torch(o)
        ramp = torch.optim.lr_scheduler.LinearLR(o, 1 / warmup_steps, 1.0, warmup_steps - 1)
        return torch.optim.lr_scheduler.SequentialLR(o, [ramp, after_torch(o)], milestones=[warmup_steps])

    expected = torch_values(torch_fn)
    if warmup_steps == 1:
        expected = torch.cat([expected[:1], expected[:-1]])  # step 0 ramps (to lr), then the schedule from 0
    got = ours(schedules.warmup(after_ours(), warmup_steps))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-12)
    assert not torch.equal(got, ours(after_ours()))  # the warm-up changed something


def test_no_warmup_is_the_schedule_itself():
    torch.testing.assert_close(ours(schedules.warmup(schedules.cosine(50), 0)), ours(schedules.cosine(50)))


def test_make_by_name_and_rejects_unknown():
    torch.testing.assert_close(ours(schedules.make("step", step_size=5, gamma=0.5), 20),
                               ours(schedules.step_decay(5, 0.5), 20))
    with pytest.raises(ValueError, match="choose one of: none, step, cosine, linear"):
        schedules.make("exponential")


@pytest.mark.parametrize("name", ["none", "cosine", "step"])
def test_warmup_kept_in_the_optimizer_state_equals_the_warmup_schedule(name):
    """The warm-up length as data (sweepable, changeable on resume) gives schedules.warmup's values exactly,
    and a new length set in the state changes the learning rates the next steps use."""
    from minifn import optim

    sched = schedules.make(name, step_size=20, t_max=60)
    params = {"w": torch.zeros(3)}
    state = optim.adamw(lr=BASE_LR, schedule=sched, warmup_steps=0).init(params)

    def lrs(state, steps=80):
        out = []
        for _ in range(steps):
            out.append(optim.current_lr(state, sched))
            _, state = optim.adamw(lr=BASE_LR, schedule=sched, warmup_steps=0).update(params, state, params)
        return torch.stack(out)

    assert torch.equal(lrs(state), ours(sched, 80))
    for w in (1, 10):
        changed = optim.set_hyperparams(state, warmup_steps=w)
        assert torch.equal(lrs(changed), ours(schedules.warmup(sched, w), 80))

"""EMA of the weights: against torch's AveragedModel, against optax's debiased formula, in checkpoints
and on the command line."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from conftest import TINY_FLAGS, invoke, story_file, tiny_config
from conftest import relative_error as rel
from minifn import Config, checkpoint, ema, optim
from minifn.data import batches
from minifn.losses import IGNORE_INDEX
from minifn.model import init_params
from minifn.reference import ReferenceTransformer
from minifn.step import init_state, train_step

CONFIG = tiny_config()
DECAY = 0.9  # short memory, so 20 steps move the average far from both the start and the last step


def test_matches_averaged_model_over_a_module_trained_with_torch_adamw():
    params = init_params(CONFIG, seed=int(torch.randint(0, 1000, ())))
    module = ReferenceTransformer(CONFIG)
    module.load_state_dict(params)
    torch_opt = torch.optim.AdamW(module.parameters(), lr=3e-3, weight_decay=0.1)
    averaged = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    tx = optim.adamw(lr=3e-3, weight_decay=0.1)
    state = init_state({k: v.clone() for k, v in params.items()}, tx, ema=DECAY)
    on_reference = dict(params)  # minifn's EMA op fed the module's own parameters
    tokens = torch.randint(0, CONFIG.vocab_size, (1000,))
    for i, (x, y) in enumerate(batches(tokens, 16, 8, 4, shuffle=True)):
        if i == 20:
            break
        torch_opt.zero_grad()
        F.cross_entropy(module(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX).backward()
        torch_opt.step()
        averaged.update_parameters(module)
        state, _ = train_step(state, (x, y), config=CONFIG, optimizer=tx, ema_debias=False)
        current = {k: v.detach() for k, v in module.named_parameters()}
        on_reference = ema.update(on_reference, current, state.ema_decay, state.step, debias=False)
    expected = {k: v.detach() for k, v in averaged.module.named_parameters()}
    assert rel(on_reference, expected) < 1e-6  # the op itself: AveragedModel's convention exactly
    assert rel(state.ema, expected) < 1e-5  # the whole run: as close as the parameters themselves
    assert rel(state.params, dict(module.named_parameters())) < 1e-5
    assert rel(state.ema, state.params) > 1e-3 and rel(state.ema, params) > 1e-3  # a real average


def test_debiased_average_is_optax_formula_and_both_copy_at_the_first_step():
    trajectory = [{"w": torch.randn(5, 3, dtype=torch.float64)} for _ in range(30)]
    decay = torch.tensor(0.95, dtype=torch.float64)
    moment = torch.zeros(5, 3, dtype=torch.float64)  # optax.ema(0.95, debias=True): zero start, divided
    debiased = copied = {"w": torch.zeros(5, 3, dtype=torch.float64)}
    for t, p in enumerate(trajectory, 1):
        count = torch.tensor(t)
        debiased = ema.update(debiased, p, decay, count, debias=True)
        copied = ema.update(copied, p, decay, count, debias=False)
        moment = 0.95 * moment + 0.05 * p["w"]
        torch.testing.assert_close(debiased["w"], moment / (1 - 0.95**t), rtol=1e-12, atol=1e-12)
        if t == 1:
            assert torch.equal(debiased["w"], p["w"]) and torch.equal(copied["w"], p["w"])
    assert (debiased["w"] - copied["w"]).abs().max() > 1e-3


def test_decay_is_data_and_the_state_without_ema_has_no_leaves():
    tx = optim.sgd(lr=0.1)
    plain = init_state(init_params(CONFIG, 0), tx)
    assert plain.ema == () and plain.ema_decay == ()
    state = init_state(init_params(CONFIG, 0), tx, ema=0.99)
    assert state.ema_decay.dtype == torch.float64 and state.ema_decay.shape == ()
    assert all(torch.equal(state.ema[k], state.params[k]) and state.ema[k] is not state.params[k] for k in state.ema)
    batch = next(batches(torch.randint(0, CONFIG.vocab_size, (200,)), 16, 8, 4))
    one, _ = train_step(state, batch, config=CONFIG, optimizer=tx)
    two, _ = train_step(one, batch, config=CONFIG, optimizer=tx)
    slow, _ = train_step(one._replace(ema_decay=torch.tensor(0.999, dtype=torch.float64)), batch, config=CONFIG,
                         optimizer=tx)
    assert all(torch.equal(one.ema[k], one.params[k]) for k in one.ema)  # step 1 copies
    assert not torch.equal(two.ema["embed.weight"], slow.ema["embed.weight"])  # a new decay takes effect


def test_checkpoint_saves_ema_and_loading_follows_the_template(tmp_path):
    tx = optim.adamw(lr=1e-2)
    state = init_state(init_params(CONFIG, 0), tx, ema=0.9)
    batch = next(batches(torch.randint(0, CONFIG.vocab_size, (200,)), 16, 8, 4))
    for _ in range(3):
        state, _ = train_step(state, batch, config=CONFIG, optimizer=tx)
    header = checkpoint.make_header(Config(model=CONFIG), {"name": "t", "sha256": "0"},
                                    {"sha256": "0", "tokens": 200})
    path = checkpoint.save_state(tmp_path / "e.pt", state, checkpoint.Progress(), header)
    tensors, meta = checkpoint.load(path)
    assert {k.removeprefix("ema.") for k in tensors if k.startswith("ema.")} == set(state.params)
    with_ema = init_state(init_params(CONFIG, 1), tx, ema=0.5)
    loaded, _ = checkpoint.load_state(tensors, meta, with_ema)
    assert all(torch.equal(loaded.ema[k], state.ema[k]) for k in state.ema)
    assert float(loaded.ema_decay) == 0.5  # the decay is the run's setting, not the checkpoint's
    dropped, _ = checkpoint.load_state(tensors, meta, init_state(init_params(CONFIG, 1), tx))
    assert dropped.ema == ()
    ema_params, _, _ = checkpoint.load_params(path, weights="ema")
    assert all(torch.equal(ema_params[k], state.ema[k]) for k in state.ema)
    # EMA turned on when resuming a run that had none: it starts from the loaded parameters
    plain = checkpoint.save_state(tmp_path / "p.pt", state._replace(ema=(), ema_decay=()), checkpoint.Progress(),
                                  header)
    started, _ = checkpoint.load_state(*checkpoint.load(plain), with_ema)
    assert all(torch.equal(started.ema[k], state.params[k]) for k in state.params)
    with pytest.raises(checkpoint.CheckpointError, match="no EMA weights"):
        checkpoint.load_params(plain, weights="ema")


@pytest.fixture
def story(tmp_path):
    return story_file(tmp_path, 800)


def test_cli_ema_evaluates_both_weights_resumes_and_serves_them(story, tmp_path):
    ckpt = tmp_path / "mini.pt"
    base = ["train", "--dataset", story, "--model", ckpt, *TINY_FLAGS, "--val-fraction", 0.2, "--lr", 0.01]
    first = invoke(*base, "--num-epochs", 2)
    assert first.exit_code == 0, first.output
    assert not any(k.startswith("ema.") for k in checkpoint.load(ckpt)[0])
    second = invoke(*base, "--num-epochs", 4, "--ema", 0.8)  # turned on at resume
    assert second.exit_code == 0, second.output
    assert "ema: 0.0 != 0.8" in second.output and "[EMA Val Loss: " in second.output
    events = [json.loads(line) for line in checkpoint.metrics_path(ckpt).read_text().splitlines()]
    epochs = [e for e in events if e["kind"] == "epoch"]
    assert [("ema_val_loss" in e) for e in epochs] == [False, False, True, True]
    assert epochs[-1]["ema_val_loss"] != epochs[-1]["val_loss"]
    tensors, _ = checkpoint.load(ckpt)
    assert any(not torch.equal(tensors[f"ema.{k}"], tensors[f"params.{k}"]) for k in ("embed.weight",))

    def cross_entropy(weights):
        result = invoke("eval", "--model", ckpt, "--dataset", story, "--device", "cpu", "--weights", weights)
        assert result.exit_code == 0, result.output
        return float(result.output.split("Cross-entropy: ")[1].split()[0])

    assert cross_entropy("ema") != cross_entropy("raw")
    generated = invoke("generate", "--model", ckpt, "--prompt", "The", "--max-tokens", 3, "--weights", "ema",
                       "--device", "cpu")
    assert generated.exit_code == 0 and generated.output.startswith("The"), generated.output
    plain = tmp_path / "plain.pt"
    assert invoke("train", "--dataset", story, "--model", plain, *TINY_FLAGS, "--num-epochs", 1).exit_code == 0
    for command in (["eval", "--dataset", story], ["generate", "--prompt", "The"]):
        refused = invoke(*command, "--model", plain, "--weights", "ema", "--device", "cpu")
        assert refused.exit_code == 1 and "no EMA weights" in refused.output, refused.output
        assert len(refused.output.strip().splitlines()) == 1

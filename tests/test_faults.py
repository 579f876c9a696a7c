"""Bad input gets one clear line; NaN, signals, kill -9 and a full disk never cost a good checkpoint."""

import dataclasses
import errno
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT, TINY_FLAGS
from minifn import checkpoint
from minifn.cli import cli
from minifn.config import ModelConfig
from minifn.data import batches

TINY = TINY_FLAGS
STORY = (ROOT / "data" / "lighthouse.txt").read_text()[:600]


def invoke(*args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


@pytest.fixture
def files(tmp_path):
    """Every kind of bad file, plus a good story and a good checkpoint trained on it."""
    f = {"story": tmp_path / "story.txt", "empty": tmp_path / "empty.txt", "binary": tmp_path / "bin.dat",
         "latin1": tmp_path / "latin1.txt", "one_token": tmp_path / "one.txt", "junk_model": tmp_path / "junk.model",
         "ckpt": tmp_path / "good.pt", "truncated": tmp_path / "truncated.pt", "garbage": tmp_path / "garbage.pt",
         "dir": tmp_path, "missing": tmp_path / "missing.txt", "a_file": tmp_path / "story.txt"}
    f["story"].write_text(STORY)
    f["empty"].write_text("   \n")
    f["binary"].write_bytes(bytes(range(256)))
    f["latin1"].write_bytes("d\xe9j\xe0 vu".encode("latin-1"))
    f["one_token"].write_text("a")
    f["junk_model"].write_bytes(b"\x00not a sentencepiece model")
    result = invoke("train", "--dataset", f["story"], "--model", f["ckpt"], *TINY, "--num-epochs", 1)
    assert result.exit_code == 0, result.output
    data = f["ckpt"].read_bytes()
    f["truncated"].write_bytes(data[: len(data) // 2])
    f["garbage"].write_bytes(os.urandom(4096))
    return f


TRAIN = ["train", "--dataset", "{story}", "--model", "{dir}/out.pt", *TINY, "--num-epochs", "1"]


def train_with(*replace_or_add, dataset="{story}"):
    args = [a if a != "{story}" else dataset for a in TRAIN]
    return args + list(replace_or_add)


BAD_INPUTS = [
    (train_with(dataset="{missing}"), 1, "does not exist"),
    (train_with(dataset="{empty}"), 1, "is empty"),
    (train_with(dataset="{dir}"), 1, "has no manifest.json: not a prepared corpus"),
    (train_with(dataset="{binary}"), 1, "looks binary"),
    (train_with(dataset="{latin1}"), 1, "is not UTF-8 text"),
    (train_with(dataset="{one_token}"), 1, "training needs at least 2"),
    (train_with("--processor", "{dir}/nope.model"), 1, "does not exist"),
    (train_with("--processor", "{junk_model}"), 1, "is not a SentencePiece model"),
    (train_with("--lr", "0"), 1, "lr must be positive"),
    (train_with("--lr", "-1"), 1, "lr must be positive"),
    (train_with("--lr", "nan"), 2, "'nan' is not a finite number"),
    (train_with("--lr", "inf"), 2, "'inf' is not a finite number"),
    (train_with("--batch-size", "0"), 1, "--batch-size must be positive"),
    (train_with("--batch-stride", "-2"), 1, "--batch-stride must be positive"),
    (train_with("--num-epochs", "0"), 1, "--num-epochs must be positive"),
    (train_with("--batch-size", "2.5"), 2, "'2.5' is not a valid integer"),
    (train_with("--seed", "100000000000000000000000"), 1, "--seed must be at most 4294967295"),
    (train_with("--seed", "-1"), 1, "--seed must be at least 0"),
    (train_with("--momentum", "0.9"), 1, "--momentum is used by --optimizer sgd only"),
    (train_with("--nesterov"), 1, "--nesterov is used by --optimizer sgd only"),
    (train_with("--optimizer", "sgd", "--beta1", "0.8"), 1, "--beta1 is used by --optimizer adam/adamw only"),
    (train_with("--optimizer", "sgd", "--amsgrad"), 1, "--amsgrad is used by --optimizer adam/adamw only"),
    (train_with("--scheduler", "none", "--t-max", "3"), 1, "--t-max is used by --scheduler cosine only"),
    (train_with("--criterion", "mse", "--label-smoothing", "0.1"), 1, "--label-smoothing is used by --criterion"),
    (train_with("--batch-stride", "64"), 1, "larger than --max-seq-len"),
    (train_with("--max-seq-len", "100000", "--batch-stride", "8"), 1, "is longer than the training data"),
    (train_with("--batch-size", "1000"), 1, "is more than the"),
    (train_with("--eval-every", "3"), 1, "--eval-every needs a validation split"),
    (train_with("--eval-tokens", "30"), 1, "--eval-tokens needs a validation split"),
    (train_with("--eta-min", "1"), 1, "--eta-min 1.0 is above --lr"),
    (train_with("--num-heads", "0"), 1, "--num-heads must be positive"),
    (train_with("--embed-dim", "-3"), 1, "--embed-dim must be positive"),
    (train_with("--head-dim", "7"), 1, "--head-dim must be even for rotary embeddings"),
    (train_with("--weight-decay", "nan"), 2, "'nan' is not a finite number"),
    (train_with("--weight-decay", "-1"), 1, "--weight-decay must be at least 0"),
    (train_with("--dropout", "1"), 1, "--dropout must be below 1"),
    (train_with("--optimizer", "lion"), 2, "'lion' is not one of 'adam', 'adamw', 'sgd'"),
    (train_with("--scheduler", "onecycle"), 2, "is not one of 'none', 'step', 'cosine', 'linear'"),
    (train_with("--criterion", "hinge"), 2, "is not one of 'cross_entropy', 'mse', 'mae'"),
    (train_with("--model", "{a_file}/sub/out.pt"), 1, "cannot write checkpoints to"),
    (train_with("--model", "{truncated}"), 1, "is truncated or corrupt"),
    (train_with("--model", "{garbage}"), 1, "exists and is not a minifn checkpoint; refusing to overwrite"),
    (train_with("--model", "{garbage}", "--fresh"), 1, "exists and is not a minifn checkpoint; refusing to overwrite"),
    (train_with("--model", "{story}", "--fresh"), 1, "is the run's dataset; writing a checkpoint there would destroy"),
    (train_with("--model", "{junk_model}", "--processor", "{junk_model}"), 1, "is not a SentencePiece model"),
    (train_with("--model", "{dir}", "--fresh"), 1, "is a directory; give a file path"),
    (["generate", "--model", "{truncated}", "--prompt", "x"], 1, "is truncated or corrupt"),
    (["generate", "--model", "{dir}/none.pt", "--prompt", "x"], 1, "does not exist"),
    (["generate", "--model", "{ckpt}", "--prompt", "owl " * 40], 1, "shorten the prompt"),
    (["eval", "--model", "{ckpt}", "--dataset", "{binary}"], 1, "looks binary"),
]


@pytest.mark.parametrize("args,code,message", BAD_INPUTS, ids=[m[:30] for _, _, m in BAD_INPUTS])
def test_bad_input_is_one_clear_line(files, args, code, message):
    result = invoke(*[a.format(**files) for a in args])
    assert result.exit_code == code, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_verbose_adds_the_traceback(files):
    result = invoke(*[a.format(**files) for a in train_with("--processor", "{junk_model}", "--verbose")])
    assert result.exit_code == 1 and "Traceback" in result.output


def test_other_architecture_or_tokenizer_is_refused_not_restarted(files, tmp_path):
    before = files["ckpt"].read_bytes()
    args = ["train", "--dataset", files["story"], "--model", files["ckpt"], *TINY, "--num-epochs", 2]
    other_arch = invoke(*args, "--num-layers", 2)
    assert other_arch.exit_code == 1 and "num_layers: 1 != 2" in other_arch.output
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((ROOT / "data" / "lighthouse.txt").read_text() * 3)
    assert invoke("tokenizer", "train", "--input", corpus, "--vocab-size", 400, "--output", tmp_path / "t.model"
                  ).exit_code == 0
    other_tok = invoke(*args, "--processor", tmp_path / "t.model")
    assert other_tok.exit_code == 1 and "was trained with tokenizer 'mistral'" in other_tok.output
    assert files["ckpt"].read_bytes() == before


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(files, tmp_path):
    ckpt = tmp_path / "diverge.pt"
    # lr 1e-3 for two epochs, then multiplied by 1e30: the loss overflows in epoch 3
    result = invoke("train", "--dataset", files["story"], "--model", ckpt, *TINY, "--num-epochs", 6,
                    "--optimizer", "sgd", "--lr", "1e-3", "--clip-grad", 0, "--scheduler", "step",
                    "--step-size", 2, "--gamma", "1e30", "--save-every", 1)
    assert result.exit_code == 1
    assert "loss became" in result.output and "learning rate is probably too high" in result.output
    tensors, meta = checkpoint.load(ckpt)
    assert meta["progress"]["epoch"] == 2
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith("params."))


def test_disk_full_keeps_the_previous_checkpoint(files, monkeypatch):
    before = files["ckpt"].read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    result = invoke("train", "--dataset", files["story"], "--model", files["ckpt"], *TINY, "--num-epochs", 2)
    assert result.exit_code == 1
    assert "(the disk is full); the previous checkpoint is intact" in result.output
    assert files["ckpt"].read_bytes() == before
    assert not list(files["dir"].glob(".good.pt.*.tmp"))


def test_a_save_together_that_fails_after_a_rename_keeps_the_rest_to_complete(tmp_path, monkeypatch):
    """Some checkpoints are new: the others keep their temporaries, from which promote completes them."""
    paths = [tmp_path / "a.pt", tmp_path / "b.pt"]
    header = {"config": {"model": dataclasses.asdict(ModelConfig())}, "tokenizer": {"name": "t", "sha256": "0"}}
    checkpoint.save_together([(p, {"x": torch.zeros(2)}, {**header, "version": 1}) for p in paths])
    rename = os.replace

    def fails_on_b(src, dst):
        if str(dst).endswith("b.pt"):
            raise OSError(errno.EIO, "Input/output error")
        rename(src, dst)

    monkeypatch.setattr(os, "replace", fails_on_b)
    with pytest.raises(checkpoint.CheckpointError, match=r"b.pt \(Input/output error\); 1 of 2 checkpoints are new: "
                                                         "run the same command again"):
        checkpoint.save_together([(p, {"x": torch.ones(2)}, {**header, "version": 2}) for p in paths])
    monkeypatch.setattr(os, "replace", rename)
    assert [checkpoint.load(p)[1]["version"] for p in paths] == [2, 1]
    (tmp_path / ".b.pt.metrics.jsonl.77.tmp").write_text("{}")  # another file's temporary: never a candidate
    assert checkpoint.temporary_for(paths[1], lambda meta: meta["version"] == 3) is None
    checkpoint.promote(checkpoint.temporary_for(paths[1], lambda meta: meta["version"] == 2), paths[1])
    assert torch.equal(checkpoint.load(paths[1])[0]["x"], torch.ones(2))
    assert not (tmp_path / f".b.pt.{os.getpid()}.tmp").exists()


def test_a_header_from_another_model_is_refused_before_anything_is_written(tmp_path):
    """Parameters that do not fit the header's model config would save fine and never load."""
    from minifn import Config, optim
    from minifn.model import init_params
    from minifn.step import init_state

    small = ModelConfig(vocab_size=50, embed_dim=16, num_heads=2, num_layers=1, max_seq_len=8)
    wide = dataclasses.replace(small, embed_dim=32)
    state = init_state(init_params(small, 0), optim.adamw(), ema=0.9)
    header = checkpoint.make_header(Config(model=wide), {"name": "t", "sha256": "0"}, {"sha256": "0", "tokens": 9})
    with pytest.raises(ValueError, match="params do not fit its header's model config: embed.weight has shape .50, 16. "
                                         "where the config's model has .50, 32."):
        checkpoint.save_state(tmp_path / "s.pt", state, checkpoint.Progress(), header)
    bad_ema = state._replace(ema={k: v for k, v in state.ema.items() if k != "embed.weight"})
    with pytest.raises(ValueError, match=r"ema do not fit .* missing \['embed.weight'\]"):
        checkpoint.save_state(tmp_path / "s.pt", bad_ema, checkpoint.Progress(), {**header, "config": Config(
            model=small).to_dict()})
    with pytest.raises(ValueError, match="params do not fit"):
        checkpoint.save_params(tmp_path / "p.pt", state.params, wide, {"name": "t", "sha256": "0"})
    with pytest.raises(ValueError, match=r"could not be loaded: .* damaged header \(sha256 is missing"):
        checkpoint.save_params(tmp_path / "p.pt", state.params, small, {"name": "t"})  # load would refuse it
    assert list(tmp_path.iterdir()) == []
    good = checkpoint.save_params(tmp_path / "p.pt", state.params, small, {"name": "t", "sha256": "0"})
    tensors, meta = checkpoint.load(good)  # tampered with afterwards: load names the leaf
    checkpoint.save(good, {**tensors, "params.extra": torch.zeros(1)}, meta)
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"do not fit its own model config \(missing \[\], unexpected \['extra'\]\)"):
        checkpoint.load_params(good)
    with pytest.raises(ValueError, match="weights must be 'raw' or 'ema', got 'EMA'"):
        checkpoint.load_params(good, weights="EMA")


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_a_pickle_payload_is_refused_and_never_runs(files, tmp_path):
    marker, evil = tmp_path / "marker", tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"format": checkpoint.FORMAT, "meta": "{}", "tensors": Payload(marker)}, f)
    torch.save({"format": checkpoint.FORMAT, "meta": "{}", "tensors": {"x": Payload(marker)}}, tmp_path / "evil2.pt")
    raw = invoke("generate", "--model", evil, "--prompt", "x")  # a bare pickle: refused at its first opcode
    assert raw.exit_code == 1 and "not a tensor file that loads without running code" in raw.output
    wrapped = invoke("generate", "--model", tmp_path / "evil2.pt", "--prompt", "x")  # torch's zip format
    assert wrapped.exit_code == 1 and "was refused: it asks to run exec," in wrapped.output
    assert not marker.exists()


# ----------------------------------------------------------------------------- real processes


def spawn(story, ckpt, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "minifn", "train", "--dataset", str(story), "--model", str(ckpt),
                             *TINY, *map(str, extra)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)


def wait_for_line(proc, prefix, timeout=60):
    deadline, lines = time.time() + timeout, []
    while time.time() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if line.startswith(prefix):
            return lines
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"no line starting {prefix!r}: {''.join(lines)}")


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_says_how_to_resume_and_resumes(files, tmp_path, sig, code):
    ckpt = tmp_path / "sig.pt"
    proc = spawn(files["story"], ckpt, "--num-epochs", 100000, "--save-every", 0)
    wait_for_line(proc, "[Epoch: 2/")
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == code, out
    assert f"checkpoint saved to {ckpt}; run the same command again to resume" in out
    _, meta = checkpoint.load(ckpt)
    done = meta["progress"]["epoch"]
    assert done >= 2
    resumed = invoke("train", "--dataset", files["story"], "--model", ckpt, *TINY, "--num-epochs", done + 1)
    assert resumed.exit_code == 0 and "Resuming from" in resumed.output
    assert checkpoint.load(ckpt)[1]["progress"]["epoch"] == done + 1


SECOND_SIGNAL = """
import signal, sys, time, torch
from minifn.cli.signals import stop_on_signals
with stop_on_signals() as stop:
    signal.raise_signal(signal.SIGINT)  # the first: a flag for the loop, checked between steps
    assert stop.requested() == signal.SIGINT
    a = torch.randn(12000, 12000)
    print("in the kernel", flush=True)
    a @ a  # one long kernel (about 3.5 TFLOP) in which no Python signal handler can run
print("the kernel finished", flush=True)
"""


def test_a_second_signal_ends_the_process_inside_a_long_kernel():
    proc = subprocess.Popen([sys.executable, "-c", SECOND_SIGNAL], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    assert proc.stdout.readline() == "in the kernel\n"
    time.sleep(0.5)
    sent = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGINT, out  # killed by the signal, not a KeyboardInterrupt after the kernel
    assert time.perf_counter() - sent < 2.0 and "finished" not in out


@pytest.mark.slow
def test_repeated_kill_9_always_leaves_a_loadable_checkpoint(files, tmp_path):
    ckpt, rng, steps = tmp_path / "kill.pt", random.Random(), []
    for _ in range(10):
        proc = spawn(files["story"], ckpt, "--num-epochs", 100000, "--save-every", 1)
        # Kill only once the run is training (the first run: once it has saved), so each kill tests a save.
        wait_for_line(proc, "Resuming from" if ckpt.exists() else "[Epoch: 1/")
        time.sleep(rng.uniform(0.2, 2.0))  # mostly mid-run; with one-step epochs, often mid-save
        proc.kill()
        proc.wait()
        if ckpt.exists():
            tensors, meta = checkpoint.load(ckpt)  # never truncated, never a half-written file
            steps.append(int(tensors["step"]))
    assert len(steps) == 10 and steps == sorted(steps) and steps[-1] > steps[0]
    final = invoke("train", "--dataset", files["story"], "--model", ckpt, *TINY,
                   "--num-epochs", checkpoint.load(ckpt)[1]["progress"]["epoch"] + 1)
    assert final.exit_code == 0 and "Resuming from" in final.output
    assert not list(tmp_path.glob(".kill.pt.*.tmp"))  # leftovers of killed saves were cleaned up


# ------------------------------------------------------------------------------------- fuzzing


@settings(max_examples=200, deadline=None)
@given(n=st.integers(-2, 60), T=st.integers(-2, 20), S=st.integers(-2, 20), B=st.integers(-2, 6))
def test_batcher_fuzz_gives_fixed_shapes_or_a_value_error(n, T, S, B):
    try:
        out = list(batches(torch.arange(max(n, 0)), T, S, B))
    except ValueError:
        return
    assert out and all(x.shape == y.shape == (B, T) for x, y in out)


NUMBERS = st.sampled_from(["-1", "0", "1", "2", "3", "0.5", "nan", "inf", "-inf", "abc", "1e300", ""])
OPTIONS = ["--lr", "--batch-size", "--batch-stride", "--max-seq-len", "--num-epochs", "--num-heads", "--head-dim",
           "--embed-dim", "--ff-dim", "--num-layers", "--grad-accum-steps", "--warmup-steps", "--clip-grad",
           "--weight-decay", "--momentum", "--gamma", "--eps", "--val-fraction", "--label-smoothing"]


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(choices=st.lists(st.tuples(st.sampled_from(OPTIONS), NUMBERS), min_size=1, max_size=4))
def test_cli_number_fuzz_never_crashes(tmp_path_factory, choices):
    root = tmp_path_factory.mktemp("fuzz")
    story = root / "story.txt"
    story.write_text(STORY[:200])
    args = ["train", "--dataset", story, "--model", root / "m.pt", *TINY, "--num-epochs", 1, "--embed-dim", 8,
            "--head-dim", 2, "--ff-dim", 8, "--max-seq-len", 8, "--batch-stride", 4]
    for option, value in choices:
        args += [option, value]
    result = invoke(*args)
    assert result.exit_code in (0, 1, 2), result.output
    assert "Traceback" not in result.output
    if result.exit_code:  # the error is the last line, and the only one
        lines = result.output.strip().splitlines()
        assert lines[-1].startswith("Error: ") and sum(line.startswith("Error") for line in lines) == 1

"""Data parallel on gloo over loopback: N ranks equal one process with N times the batch."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import COMPILED_VS_EAGER_ADAM, ROOT, TINY_FLAGS, relative_error, story_file, tiny_config
from minifn import checkpoint, optim
from minifn.data import batches
from minifn.model import init_params
from minifn.step import init_state, make_train_step

HERE = ROOT / "tests"
TINY = TINY_FLAGS
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def torchrun(nproc, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={nproc}", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_twice_the_batch(tmp_path):
    sys.path.insert(0, str(HERE))
    import dp_worker

    result = torchrun(2, HERE / "dp_worker.py", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # identical on both ranks

    tx = dp_worker.optimizer()
    state = init_state(init_params(dp_worker.CONFIG, seed=0), tx)
    step = make_train_step(dp_worker.CONFIG, tx, compile="off")
    data = batches(dp_worker.tokens(), 16, 8, 2 * dp_worker.BATCH, shuffle=True, seed=3)
    for _ in range(dp_worker.STEPS):
        state, _ = step(state, next(data))
    diff = sum((rank0[k] - state.params[k]).square().sum() for k in rank0).sqrt()
    assert (diff / sum(v.square().sum() for v in state.params.values()).sqrt()).item() < 1e-5
    assert not torch.equal(state.params["embed.weight"], init_params(dp_worker.CONFIG, 0)["embed.weight"])


@pytest.mark.slow
def test_the_compiled_halves_of_a_data_parallel_step_equal_the_eager_step():
    """With all_reduce, the step is two compiled graphs with the collective between them (and both are
    saved for the next run: conftest checks it); with one rank's no-op all-reduce they take the eager steps."""
    config, tx = tiny_config(), optim.adamw(lr=3e-3, weight_decay=0.1)
    halves = make_train_step(config, tx, compile="on", all_reduce=lambda tensors: None)
    eager = make_train_step(config, tx, compile="off")
    params = init_params(config, seed=int(torch.randint(0, 1000, ())))
    a, b = init_state(params, tx), init_state(params, tx)
    tokens = torch.randint(0, config.vocab_size, (400,))
    for batch in list(batches(tokens, 16, 8, 4))[:5]:
        a, metrics_a = halves(a, batch)
        b, metrics_b = eager(b, batch)
        torch.testing.assert_close(metrics_a["loss"], metrics_b["loss"], rtol=1e-5, atol=0)
    assert relative_error(a.params, b.params) < COMPILED_VS_EAGER_ADAM and int(a.step) == 5


@pytest.mark.slow
def test_cli_with_two_processes_saves_once_resumes_and_checks_the_world_size(tmp_path):
    story = story_file(tmp_path, 800)
    ckpt = tmp_path / "dp.pt"
    base = [sys.executable, "-m", "minifn", "train", "--dataset", story, "--model", ckpt, *TINY]
    first = subprocess.run([*map(str, base), "--nproc", "2", "--num-epochs", "2"], capture_output=True, text=True,
                           env=ENV, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.count("Training complete!") == 1 and "global batch 2 x 2 x 1 = 4" in first.stdout
    assert checkpoint.load(ckpt)[1]["world_size"] == 2
    assert sorted(p.name for p in tmp_path.glob("*dp*")) == ["dp.pt", "dp.pt.metrics.jsonl"]  # one writer
    again = subprocess.run([*map(str, base), "--nproc", "2", "--num-epochs", "3"], capture_output=True, text=True,
                           env=ENV, timeout=300)
    assert again.returncode == 0 and again.stdout.count("Resuming from") == 1 and "[Epoch: 3/3]" in again.stdout
    alone = subprocess.run([*map(str, base), "--num-epochs", "4"], capture_output=True, text=True, env=ENV,
                           timeout=120)
    assert alone.returncode == 1 and "was saved by 2 process(es) and this run has 1" in alone.stderr


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_killing_one_rank_makes_the_other_exit_with_a_clear_error(tmp_path):
    story = tmp_path / "story.txt"
    story.write_text((ROOT / "data" / "lighthouse.txt").read_text())
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "minifn", "train", "--dataset", str(story), "--model", str(tmp_path / "k.pt"),
             *TINY, "--num-epochs", "100000", "--save-every", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    deadline = time.time() + 120
    while time.time() < deadline and not procs[0].stdout.readline().startswith("[Epoch: 1/"):
        assert procs[0].poll() is None, "rank 0 ended early"
    procs[1].send_signal(signal.SIGKILL)
    start = time.time()
    out, _ = procs[0].communicate(timeout=150)
    assert procs[0].returncode not in (0, None) and time.time() - start < 150
    assert "another training process stopped or became unreachable" in out
    assert checkpoint.load(tmp_path / "k.pt")[1]["progress"]["epoch"] >= 1  # the saved state survived


def launcher(tmp_path, *extra):
    story = story_file(tmp_path, 800)
    return subprocess.Popen([sys.executable, "-m", "minifn", "train", "--dataset", str(story), "--model",
                             str(tmp_path / "l.pt"), *TINY, "--nproc", "2", *map(str, extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def wait_for_the_first_epoch(proc, timeout_s: float = 120) -> None:
    """Read the launcher's output until its first epoch line (the workers are training by then)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and not proc.stdout.readline().startswith("[Epoch: 1/"):
        assert proc.poll() is None, proc.stderr.read()


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_the_workers_after_their_save(tmp_path):
    proc = launcher(tmp_path, "--num-epochs", 100000, "--save-every", 0)
    wait_for_the_first_epoch(proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in out + err and err.count("Interrupted: checkpoint saved") == 1
    assert checkpoint.load(tmp_path / "l.pt")[1]["progress"]["epoch"] >= 1
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path / "l.pt")], capture_output=True, text=True).stdout
    assert not leftover.strip()  # no worker trains on in the background


@pytest.mark.slow
def test_a_bad_flag_under_data_parallel_is_one_line(tmp_path):
    proc = launcher(tmp_path, "--num-epochs", 1, "--lr", "-1")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and err.strip() == "Error: --lr must be positive, got -1.0", err


class FakeWorker:
    """A worker that records what the launcher sends it and ends with a status when told to (-9 once killed)."""

    def __init__(self):
        self.sent, self.returncode, self.stderr = [], None, None

    def poll(self):
        return self.returncode

    def send_signal(self, signum):
        self.sent.append(signum)

    def kill(self):
        self.sent.append("kill")


@pytest.mark.parametrize("to_launcher, status, sent, code", [
    ([signal.SIGINT], 130, [signal.SIGINT], 130),  # forwarded once; the workers save and stop
    ([signal.SIGINT, signal.SIGINT], 130, [signal.SIGINT, "kill"], 130),  # a second one ends them at once
    ([signal.SIGTERM], 0, [signal.SIGTERM], 0),  # it came after the last step: the run finished, status 0
])
def test_the_launcher_forwards_one_signal_and_ends_the_workers_on_a_second(monkeypatch, to_launcher, status, sent,
                                                                            code):
    from minifn.cli import launch

    workers, signals = [], list(to_launcher)

    def popen(*args, **kwargs):
        assert kwargs["env"]["MINIFN_LAUNCHER_PID"] == str(os.getpid())  # so they take a Ctrl-C twice as once
        workers.append(FakeWorker())
        return workers[-1]

    def sleep(seconds):  # the launcher's wait loop: signals arrive one per turn, then the workers end
        if signals:
            os.kill(os.getpid(), signals.pop(0))  # the launcher's handler runs here
        else:
            for w in workers:
                w.returncode = -signal.SIGKILL if "kill" in w.sent else status

    monkeypatch.setattr(launch.subprocess, "Popen", popen)
    monkeypatch.setattr(launch.time, "sleep", sleep)
    monkeypatch.setattr(sys, "argv", ["minifn", "train", "--nproc", "2"])
    assert launch.launch(2) == code
    assert [w.sent for w in workers] == [sent, sent]


@pytest.mark.slow
def test_a_rank_killed_by_a_signal_is_named_in_one_line(tmp_path):
    proc = launcher(tmp_path, "--num-epochs", 100000, "--save-every", 1)
    wait_for_the_first_epoch(proc)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    rank0 = next(int(c) for c in children if "\0RANK=0\0" in "\0" + open(f"/proc/{c}/environ").read())
    os.kill(rank0, signal.SIGKILL)  # as the OOM killer would: it prints nothing
    out, err = proc.communicate(timeout=150)
    assert proc.returncode == 137 and err.strip() == "Error: rank 0 was killed by SIGKILL", err
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path / "l.pt")], capture_output=True, text=True).stdout
    assert not leftover.strip()

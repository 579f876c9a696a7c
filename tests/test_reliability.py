"""Nothing lost, nothing silently ignored: checkpoint targets, locks, metrics after crashes, config files,
crafted headers, plot outputs, tokenizers that moved, and errors that are bugs."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY_FLAGS, invoke
from minifn import checkpoint

STORY = (ROOT / "data" / "lighthouse.txt").read_text()[:600]


@pytest.fixture
def story(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text(STORY)
    return path


def train(story, ckpt, *extra):
    return invoke("train", "--dataset", story, "--model", ckpt, *TINY_FLAGS, *extra)


def lines(ckpt):
    return [json.loads(line) for line in checkpoint.metrics_path(ckpt).read_text().splitlines()]


def one_line(result, code=1):
    assert result.exit_code == code, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    return result.output


# ------------------------------------------------------------------------------- checkpoint targets


def test_a_symlinked_model_is_written_through_and_a_dangling_one_refused(story, tmp_path):
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    link = tmp_path / "link.pt"
    link.symlink_to(real_dir / "target.pt")  # dangling until the first save
    assert "is a symlink to" in one_line(train(story, link, "--num-epochs", 1))
    (real_dir / "target.pt").write_bytes(b"")  # an empty file is a place to write: no --fresh needed
    assert train(story, link, "--num-epochs", 1).exit_code == 0
    assert link.is_symlink() and checkpoint.load(real_dir / "target.pt")[1]["progress"]["epoch"] == 1


def test_a_second_run_on_the_same_checkpoint_is_refused(story, tmp_path):
    ckpt = tmp_path / "busy.pt"
    with checkpoint.locked(ckpt):
        out = one_line(train(story, ckpt, "--num-epochs", 1))
    assert f"is in use by another minifn process (pid {os.getpid()})" in out
    assert train(story, ckpt, "--num-epochs", 1).exit_code == 0  # the lock went with its holder


def test_a_lock_taken_on_a_file_its_holder_just_removed_is_taken_again(tmp_path, monkeypatch):
    """A run opens the lock file; before it locks it, the holder ends (removing the file) and a third run
    creates and locks a new one. The first run's lock on the removed file guards nothing: it must try again."""
    import fcntl

    lock_path, real, third = tmp_path / ".m.pt.lock", fcntl.flock, []

    def racing(f, op):
        if not third:
            lock_path.unlink()
            third.append(open(lock_path, "a+"))
            real(third[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        return real(f, op)

    monkeypatch.setattr(checkpoint.fcntl, "flock", racing)
    with pytest.raises(checkpoint.CheckpointError, match="in use by another minifn process"):
        with checkpoint.locked(tmp_path / "m.pt"):
            pass
    third[0].close()


def test_two_checkpoints_in_one_folder_have_their_own_metrics(story, tmp_path):
    assert train(story, tmp_path / "run.pt", "--num-epochs", 1).exit_code == 0
    assert train(story, tmp_path / "run.ckpt", "--num-epochs", 1, "--fresh").exit_code == 0
    assert lines(tmp_path / "run.pt") and lines(tmp_path / "run.ckpt")
    assert {e["run"] for e in lines(tmp_path / "run.pt")} != {e["run"] for e in lines(tmp_path / "run.ckpt")}


def test_a_fresh_run_killed_before_its_first_save_keeps_the_old_history(story, tmp_path):
    ckpt = tmp_path / "h.pt"
    assert train(story, ckpt, "--num-epochs", 2).exit_code == 0
    before = lines(ckpt)
    proc = subprocess.Popen([sys.executable, "-m", "minifn", "train", "--dataset", str(story), "--model", str(ckpt),
                             *TINY_FLAGS, "--num-epochs", "100000", "--save-every", "0", "--fresh"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not proc.stdout.readline().startswith("[Epoch: 2/"):
        pass
    proc.kill()
    proc.wait()
    assert checkpoint.load(ckpt)[1]["run_id"] == before[0]["run"]  # the old checkpoint is still there
    resumed = train(story, ckpt, "--num-epochs", 3)
    assert resumed.exit_code == 0 and "Resuming from" in resumed.output
    after = lines(ckpt)
    assert after[: len(before)] == before and {e["run"] for e in after} == {before[0]["run"]}
    assert [e["step"] for e in after if e["kind"] == "step"] == list(range(1, after[-1]["step"] + 1))


# ------------------------------------------------------------------------------------- settings


def test_config_file_values_are_typed_strictly(story, tmp_path):
    config = tmp_path / "run.toml"
    for text, message in [("num-epochs = 1.9", "num-epochs must be a whole number, got 1.9"),
                          ("batch-size = 2.7", "batch-size must be a whole number"),
                          ("lr = true", "lr must be a number, got True"),
                          ("dropout = [0.1]", "dropout must be a number, got [0.1]"),
                          ("shuffle = 1", "shuffle must be true or false")]:
        config.write_text(text + "\n")
        assert message in one_line(train(story, tmp_path / "m.pt", "--config", config), code=2)


def test_every_flag_is_a_config_key_and_an_environment_variable(story, tmp_path):
    config = tmp_path / "run.toml"
    target = tmp_path / "from_file.pt"
    config.write_text(f'model = "{target}"\ncompile = "off"\nnum-epochs = 1\n')
    result = invoke("train", "--dataset", story, *TINY_FLAGS[:-2], "--config", config)
    assert result.exit_code == 0 and "compile off" in result.output and target.is_file()
    env_target = tmp_path / "from_env.pt"
    result = invoke("train", "--dataset", story, *TINY_FLAGS[:-2], "--num-epochs", 1,
                    env={"MINIFN_TRAIN_MODEL": str(env_target), "MINIFN_TRAIN_COMPILE": "off"})
    assert result.exit_code == 0 and "compile off" in result.output and env_target.is_file()


# -------------------------------------------------------------------------------------- headers


def _rewrite_header(src, dst, edit):
    payload = torch.load(src, weights_only=True)
    meta = json.loads(payload["meta"])
    payload["meta"] = json.dumps(edit(meta))
    torch.save(payload, dst)


CRAFTED = [
    ("no progress fields", lambda m: {**m, "progress": {}}),
    ("step stored as a list", lambda m: {**m, "progress": {**m["progress"], "epoch": [1]}}),
    ("meta is a list", lambda m: [m]),
    ("extra progress keys", lambda m: {**m, "progress": {**m["progress"], "surprise": 1}}),
    ("no config", lambda m: {k: v for k, v in m.items() if k != "config"}),
    ("a config of the wrong type", lambda m: {**m, "config": {**m["config"], "optim": {"lr": "fast"}}}),
    ("no tokenizer", lambda m: {k: v for k, v in m.items() if k != "tokenizer"}),
]


@pytest.mark.parametrize("edit", [e for _, e in CRAFTED], ids=[name for name, _ in CRAFTED])
def test_crafted_or_damaged_headers_are_one_line(story, tmp_path, edit):
    good = tmp_path / "good.pt"
    assert train(story, good, "--num-epochs", 1).exit_code == 0
    bad = tmp_path / "bad.pt"
    _rewrite_header(good, bad, edit)
    for result in (train(story, bad, "--num-epochs", 2), invoke("generate", "--model", bad, "--prompt", "x"),
                   invoke("eval", "--model", bad, "--dataset", story)):
        assert "bad.pt" in one_line(result)


def test_a_checkpoint_step_tensor_of_the_wrong_shape_is_refused(story, tmp_path):
    ckpt = tmp_path / "s.pt"
    assert train(story, ckpt, "--num-epochs", 1).exit_code == 0
    payload = torch.load(ckpt, weights_only=True)
    payload["tensors"]["step"] = torch.tensor([5])
    torch.save(payload, ckpt)
    assert "no usable step" in one_line(train(story, ckpt, "--num-epochs", 2))


# --------------------------------------------------------------------------- generate, eval, plot


def test_a_custom_tokenizer_is_found_from_another_folder_or_given(story, tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((ROOT / "data" / "lighthouse.txt").read_text() * 3)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert invoke("tokenizer", "train", "--input", corpus, "--vocab-size", 400, "--output", "tok.model").exit_code == 0
    assert train(story, "m.pt", "--tokenizer", "tok.model", "--num-epochs", 1).exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert invoke("generate", "--model", work / "m.pt", "--prompt", "The", "--max-tokens", 3).exit_code == 0
    shutil.move(work / "tok.model", tmp_path / "moved.model")
    assert "point --tokenizer at a copy" in one_line(invoke("generate", "--model", work / "m.pt", "--prompt", "x"))
    ok = invoke("eval", "--model", work / "m.pt", "--dataset", story, "--tokenizer", tmp_path / "moved.model")
    assert ok.exit_code == 0 and "Cross-entropy" in ok.output
    wrong = invoke("eval", "--model", work / "m.pt", "--dataset", story, "--tokenizer", "mistral")
    assert "not the one" in one_line(wrong)


def test_an_undecodable_prompt_is_one_line(story, tmp_path):
    ckpt = tmp_path / "m.pt"
    assert train(story, ckpt, "--num-epochs", 1).exit_code == 0
    prompt = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of Latin-1 bytes in argv
    assert "not valid UTF-8" in one_line(invoke("generate", "--model", ckpt, "--prompt", prompt))


@pytest.fixture(scope="module")
def metrics(tmp_path_factory):
    pytest.importorskip("matplotlib")
    root = tmp_path_factory.mktemp("plot")
    story = root / "story.txt"
    story.write_text(STORY)
    assert train(story, root / "m.pt", "--num-epochs", 2).exit_code == 0
    return checkpoint.metrics_path(root / "m.pt")


def test_plot_writes_exactly_where_it_says(metrics, tmp_path):
    no_ext = tmp_path / "pl" / "noext"
    result = invoke("plot", metrics, "-o", no_ext)
    assert result.output.strip() == f"Wrote {no_ext}" and no_ext.read_bytes()[:4] == b"\x89PNG"
    folder = tmp_path / "figures"
    folder.mkdir()
    result = invoke("plot", metrics, "-o", folder)
    assert result.output.strip() == f"Wrote {folder / 'loss.png'}" and (folder / "loss.png").is_file()


@pytest.mark.parametrize("line", ['{"kind": "step"}', "[1, 2]", '{"kind": "epoch", "step": 3, "loss": 1}',
                                  '{"kind": "step", "step": "x", "loss": 1}', "3"])
def test_plot_of_wrong_shaped_lines_is_one_line(tmp_path, line):
    pytest.importorskip("matplotlib")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(line + "\n")
    assert "bad.jsonl" in one_line(invoke("plot", bad, "-o", tmp_path / "x.png"))


# ------------------------------------------------------------------------------------ our bugs


def test_an_internal_error_says_it_is_a_bug_and_where_the_traceback_is(story, tmp_path, monkeypatch):
    import minifn.run

    def broken(*args, **kwargs):
        raise KeyError("a bug of ours")

    monkeypatch.setattr(minifn.run, "fit", broken)
    monkeypatch.setenv("MINIFN_CACHE_DIR", str(tmp_path / "cache"))
    result = train(story, tmp_path / "m.pt", "--num-epochs", 1)
    assert result.exit_code == 70 and "Traceback" not in result.output
    out = result.output.strip().splitlines()[-1]
    assert out.startswith("Error: internal error, a bug in minifn or torch") and "KeyError" in out
    trace = out.split("traceback written to ")[1]
    assert "a bug of ours" in open(trace).read()


def test_a_damaged_compile_cache_names_the_folder(monkeypatch):
    from minifn import compiling

    def compiled(*args):
        raise ImportError("/tmp/x/c.so: file too short")

    monkeypatch.setattr(compiling.torch, "compile", lambda fn, **kw: compiled)
    step = compiling.maybe_compile(lambda x: x, "auto", "cpu")
    with pytest.raises(compiling.CompileError, match=f"remove {compiling.inductor_cache_dir()}"):
        step(1)


def test_auto_compile_falls_back_on_the_first_call_only(monkeypatch):
    from minifn import compiling

    calls = []

    def compiled(tree, lifted):  # maybe_compile's inner function takes (args, kwargs) and the lifted leaves
        (x,), _ = tree
        calls.append(x)
        if x == "fail":
            raise RuntimeError("a compile error")
        if x == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return "compiled"

    monkeypatch.setattr(compiling.torch, "compile", lambda fn, **kw: compiled)
    first_fails = compiling.maybe_compile(lambda x: "eager", "auto", "cpu")
    with pytest.warns(UserWarning, match="running eagerly"):
        assert first_fails("fail") == "eager"
    assert first_fails("ok") == "eager"  # stays eager
    later_fails = compiling.maybe_compile(lambda x: "eager", "auto", "cpu")
    assert later_fails("ok") == "compiled"
    with pytest.raises(RuntimeError, match="a compile error"):
        later_fails("fail")  # after a good first call, errors surface
    out_of_memory = compiling.maybe_compile(lambda x: "eager", "auto", "cpu")
    with pytest.raises(torch.OutOfMemoryError):
        out_of_memory("oom")  # eager needs more memory, not less: a smaller batch is the answer


def test_signal_handlers_and_warnings_are_restored_after_a_run(story, tmp_path):
    import signal
    import warnings

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), warnings.showwarning
    assert train(story, tmp_path / "m.pt", "--num-epochs", 1).exit_code == 0
    assert train(story, tmp_path / "m.pt", "--num-epochs", 2).exit_code == 0  # twice in one process
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), warnings.showwarning) == before


def test_a_data_parallel_worker_takes_a_ctrl_c_from_the_terminal_and_the_launcher_as_one():
    """A Ctrl-C reaches a `--nproc` worker twice: from the terminal (its process group) and forwarded by the
    launcher. The second copy must not end it before it saves; outside the launcher, a second one still does."""
    script = ("import os, signal\n"
              "from minifn.cli.signals import stop_on_signals\n"
              "with stop_on_signals() as stop:\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    print(stop.requested())\n")
    env = {k: v for k, v in os.environ.items() if k != "MINIFN_LAUNCHER_PID"}
    worker = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            env={**env, "MINIFN_LAUNCHER_PID": str(os.getpid())})
    assert worker.returncode == 0 and worker.stdout.strip() == "2", worker.stderr
    alone = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert alone.returncode == -2  # a second Ctrl-C ends a single process at once

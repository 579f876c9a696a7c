"""The command line end to end on tiny models: output lines, checkpoints, flags, resume, errors."""

import json

import pytest
import torch
from click.testing import CliRunner

from conftest import ROOT, TINY_FLAGS
from minifn import checkpoint
from minifn.cli import cli
from minifn.config import ModelConfig

STORY = (ROOT / "data" / "lighthouse.txt").read_text()[:600]
TINY = TINY_FLAGS


@pytest.fixture
def story(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text(STORY)
    return path


def run(*args, ok=True, env=None):
    result = CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def train(story, ckpt, *extra, ok=True, env=None):
    return run("train", "--dataset", story, "--model", ckpt, *TINY, *extra, ok=ok, env=env)


def test_train_end_to_end(story, tmp_path):
    ckpt = tmp_path / "out" / "mini.pt"
    result = train(story, ckpt, "--num-epochs", 3, "--val-fraction", 0.2)
    lines = result.output.splitlines()
    epochs = [line for line in lines if line.startswith("[Epoch:")]
    assert len(epochs) == 3 and epochs[-1].startswith("[Epoch: 3/3] [Avg Loss: ")
    assert "[Perplexity: " in epochs[-1] and "[Val Loss: " in epochs[-1]
    assert lines[-1] == f"Training complete! Checkpoint saved: {ckpt}"
    tensors, meta = checkpoint.load(ckpt)
    assert meta["progress"]["epoch"] == 3 and int(tensors["step"]) > 0
    assert meta["tokenizer"]["name"] == "mistral" and len(meta["tokenizer"]["sha256"]) == 64
    events = [json.loads(line) for line in checkpoint.metrics_path(ckpt).read_text().splitlines()]
    assert [e["epoch"] for e in events if e["kind"] == "epoch"] == [1, 2, 3]
    assert all("val_loss" in e for e in events if e["kind"] == "epoch")


def test_rerun_resumes_and_mismatch_is_named(story, tmp_path):
    ckpt = tmp_path / "mini.pt"
    train(story, ckpt, "--num-epochs", 2, "--scheduler", "none")
    resumed = train(story, ckpt, "--num-epochs", 3, "--scheduler", "none")
    assert "Resuming from" in resumed.output and "[Epoch: 3/3]" in resumed.output
    assert "[Epoch: 1/3]" not in resumed.output
    bad = train(story, ckpt, "--num-epochs", 3, "--scheduler", "none", "--embed-dim", 24, ok=False)
    assert bad.exit_code == 1 and "embed_dim: 16 != 24" in bad.output and "--fresh" in bad.output
    assert checkpoint.load(ckpt)[1]["progress"]["epoch"] == 3  # the refused run left it alone
    more = train(story, ckpt, "--num-epochs", 4, "--scheduler", "none", "--lr", 0.01)
    assert "Note: resuming with changed settings" in more.output and "lr: 0.003 != 0.01" in more.output
    assert "[Epoch: 4/4]" in more.output
    other_optimizer = train(story, ckpt, "--num-epochs", 5, "--scheduler", "none", "--optimizer", "sgd", ok=False)
    assert other_optimizer.exit_code == 1 and "optimizer: 'adamw' != 'sgd'" in other_optimizer.output
    fresh = train(story, ckpt, "--num-epochs", 1, "--scheduler", "none", "--embed-dim", 24, "--fresh")
    assert "Resuming" not in fresh.output and checkpoint.load(ckpt)[1]["config"]["model"]["embed_dim"] == 24


FLAGS = [
    ["--optimizer", "sgd", "--momentum", "0.5", "--dampening", "0.1"],
    ["--optimizer", "sgd", "--momentum", "0.9", "--nesterov"],
    ["--optimizer", "adam", "--amsgrad", "--eps", "1e-6", "--weight-decay", "0.01"],
    ["--lr", "0.02", "--beta1", "0.8", "--beta2", "0.95"],
    ["--scheduler", "step", "--step-size", "2", "--gamma", "0.5"],
    ["--scheduler", "cosine", "--t-max", "3", "--eta-min", "1e-5"],
    ["--scheduler", "linear", "--start-factor", "0.5", "--end-factor", "0.9", "--total-iters", "2"],
    ["--criterion", "mse", "--reduction", "sum"],
    ["--criterion", "mae"],
    ["--label-smoothing", "0.1", "--clip-grad", "0.5", "--warmup-steps", "3", "--grad-accum-steps", "2",
     "--dropout", "0.1"],
    ["--num-layers", "2", "--num-heads", "4", "--head-dim", "6", "--embed-dim", "20", "--ff-dim", "12"],
    ["--bias", "--no-tie-embeddings", "--max-seq-len", "24"],
    ["--batch-size", "3", "--batch-stride", "4", "--seed", "9", "--no-shuffle"],
]


def _expected(flags):
    """{setting: value} that a list of flags asks for (a bare --x is True, --no-x False)."""
    out, i = {}, 0
    while i < len(flags):
        name = flags[i][2:].replace("-", "_")
        if i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            value = flags[i + 1]
            out[name] = value if name in ("optimizer", "scheduler", "criterion", "reduction") else (
                float(value) if "." in value or "e" in value else int(value))
            i += 2
        else:
            out[name.removeprefix("no_")] = not name.startswith("no_")
            i += 1
    return out


@pytest.mark.parametrize("flags", FLAGS, ids=[f[0] for f in FLAGS])
def test_every_flag_reaches_its_setting(story, tmp_path, flags):
    ckpt = tmp_path / "mini.pt"
    train(story, ckpt, "--num-epochs", 2, *flags)
    config = checkpoint.load(ckpt)[1]["config"]
    settings = {k: v for section in config.values() for k, v in section.items()}
    for key, value in _expected(flags).items():
        assert settings[key] == value, key


def test_config_file_and_environment_feed_defaults(story, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('lr = 0.0123\nnum-epochs = 1\noptimizer = "adam"\n')
    ckpt = tmp_path / "mini.pt"
    train(story, ckpt, "--config", config, "--optimizer", "sgd", env={"MINIFN_TRAIN_WEIGHT_DECAY": "0.25"})
    meta = checkpoint.load(ckpt)[1]
    assert meta["config"]["optim"]["lr"] == 0.0123 and meta["progress"]["epoch"] == 1
    assert meta["config"]["optim"]["optimizer"] == "sgd"  # the flag beats the file
    assert meta["config"]["optim"]["weight_decay"] == 0.25
    config.write_text("learning_rate = 1\n")
    bad = train(story, ckpt, "--config", config, ok=False)
    assert bad.exit_code == 2 and "unknown keys: learning_rate" in bad.output
    config.write_text("lr = nan\n")  # TOML has nan; the file is held to the flag's type
    bad = train(story, ckpt, "--config", config, ok=False)
    assert bad.exit_code == 2 and "nan is not a finite number" in bad.output


def test_compiled_cli_run_and_epochs_alias(story, tmp_path):
    ckpt = tmp_path / "mini.pt"
    args = [a if a != "off" else "auto" for a in TINY]
    result = run("train", "--dataset", story, "--model", ckpt, *args, "--epochs", 2)
    assert "[Epoch: 2/2]" in result.output and "compile auto" in result.output


def test_tokenize_reports_and_writes(story, tmp_path):
    out = tmp_path / "ids.txt"
    result = run("tokenize", "--processor", "mistral", "--input", story, "--output", out, "--show", 5)
    assert "Vocabulary size: 32000" in result.output and "Round trip: ok" in result.output
    count = int(result.output.split("Tokens: ")[1].split()[0])
    assert len(out.read_text().split()) == count > 100


def test_tokenize_round_trips_a_jsonl_file_document_by_document(tmp_path):
    """A .jsonl input is tokenized as its documents joined by EOS (what train sees); the round trip compares
    each document's decoded ids with its text field, not the whole decode with the file's JSON."""
    docs = [" A leading space.", "Two\nlines\n", "", "Ünïcödé  spaces  "]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    result = run("tokenize", "--input", path, "--output", tmp_path / "ids.txt")
    assert "Round trip: ok" in result.output, result.output
    assert (tmp_path / "ids.txt").read_text().split().count("2") == 2  # three documents, two separators


@pytest.mark.parametrize("args,message", [
    (["tokenize", "--input", "nope.txt"], "dataset nope.txt does not exist"),
    (["tokenize", "--model", "{junk}", "--input", "{story}"], "is not a SentencePiece model"),
])
def test_tokenize_errors_are_one_line(story, tmp_path, args, message):
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00garbage")
    args = [a.format(junk=junk, story=story) for a in args]
    result = run(*args, ok=False)
    assert result.exit_code == 1 and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_tokenizer_train_command(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((ROOT / "data" / "lighthouse.txt").read_text() * 3)
    result = run("tokenizer", "train", "--input", corpus, "--vocab-size", 400, "--output", tmp_path / "tok.model")
    assert "(400 pieces)" in result.output
    assert (tmp_path / "tok.model").is_file() and not (tmp_path / "tok.vocab").exists()
    trained = run("train", "--dataset", corpus, "--processor", tmp_path / "tok.model", "--model", tmp_path / "m.pt",
                  *TINY, "--num-epochs", 1)
    assert checkpoint.load(tmp_path / "m.pt")[1]["config"]["model"]["vocab_size"] == 400
    assert "Training complete!" in trained.output


def test_save_every_verbose_and_bfloat16(story, tmp_path):
    ckpt = tmp_path / "mini.pt"
    result = train(story, ckpt, "--num-epochs", 3, "--save-every", 2, "--verbose", "--dtype", "bfloat16")
    assert "[Batch: 1/" in result.output  # per-batch lines
    events = [json.loads(line) for line in checkpoint.metrics_path(ckpt).read_text().splitlines()]
    saved_at = [e["epoch"] for e in events if e["kind"] == "epoch" and "checkpoint" in e]
    assert saved_at == [2, 3]  # every second epoch and at the end


@pytest.mark.parametrize("native", [True, False], ids=["native-bfloat16", "no-bfloat16"])
def test_dtype_auto_trains_as_bfloat16_only_where_the_hardware_has_it(story, tmp_path, monkeypatch, native):
    from minifn import run as run_module

    monkeypatch.setattr(run_module, "native_bfloat16", lambda device: native)
    params = {}
    for dtype in ("auto", "bfloat16", "float32"):
        result = train(story, tmp_path / f"{dtype}.pt", "--num-epochs", 1, "--dtype", dtype)
        tensors = checkpoint.load(tmp_path / f"{dtype}.pt")[0]
        params[dtype] = {k: v for k, v in tensors.items() if k.startswith("params.")}
        if dtype == "auto":
            assert ("bfloat16 autocast" if native else "device cpu, float32,") in result.output
    same, other = ("bfloat16", "float32") if native else ("float32", "bfloat16")
    assert all(torch.equal(params["auto"][k], params[same][k]) for k in params["auto"])
    assert not all(torch.equal(params["auto"][k], params[other][k]) for k in params["auto"])


def test_auto_dtype_asks_the_cpu_for_native_bfloat16(monkeypatch):
    from minifn.run import resolve_dtype

    cpu = torch.device("cpu")
    for avx512_bf16, amx, expected in [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                       (False, False, None)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert resolve_dtype("auto", cpu) == expected
    assert resolve_dtype("float32", cpu) is None and resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("mps")) is None


def test_unavailable_device_is_one_clear_line(story, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = train(story, tmp_path / "m.pt", "--device", "cuda", ok=False)
    assert result.exit_code == 1 and "no CUDA GPU is available" in result.output


def test_readme_library_examples_run(tmp_path, monkeypatch):
    import re

    library = (ROOT / "README.md").read_text().split("## Using the library")[1]
    loop, run = re.findall(r"```python\n(.*?)```", library, re.S)[:2]
    loop = loop.replace('compile="auto"', 'compile="off"').replace("range(3)", "range(1)").replace("(5000,)", "(600,)")
    exec(compile(loop, "README.md", "exec"), {})
    monkeypatch.chdir(ROOT)
    run = run.replace('RunConfig(num_epochs=3, model="my.pt")',
                      f'RunConfig(num_epochs=3, model="{tmp_path / "my.pt"}", compile="off", max_steps=2)')
    namespace = {}
    exec(compile(run, "README.md", "exec"), namespace)
    assert int(namespace["state"].step) == 2 and (tmp_path / "my.pt").is_file()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny checkpoint, trained once for the generate, eval and plot tests."""
    root = tmp_path_factory.mktemp("trained")
    story = root / "story.txt"
    story.write_text(STORY)
    train(story, root / "mini.pt", "--num-epochs", 2, "--val-fraction", 0.2)
    return root / "mini.pt", story


def test_generate_streams_a_continuation(trained):
    ckpt, _ = trained
    result = run("generate", "--model", ckpt, "--prompt", "The lighthouse", "--max-tokens", 8, "--seed", 1)
    assert result.output.startswith("The lighthouse") and len(result.output) > len("The lighthouse")
    again = run("generate", "--model", ckpt, "--prompt", "The lighthouse", "--max-tokens", 8, "--seed", 1)
    assert again.output == result.output
    piped = CliRunner().invoke(cli, ["generate", "--model", str(ckpt), "--prompt", "-", "--greedy",
                                     "--max-tokens", 3], input="Pepper")
    assert piped.exit_code == 0 and piped.output.startswith("Pepper")


def test_generate_errors_are_one_line(trained, tmp_path):
    ckpt, _ = trained
    too_long = run("generate", "--model", ckpt, "--prompt", "owl " * 40, ok=False)
    assert too_long.exit_code == 1 and "shorten the prompt" in too_long.output
    missing = run("generate", "--model", tmp_path / "none.pt", "--prompt", "x", ok=False)
    assert missing.exit_code == 1 and "does not exist" in missing.output
    assert "Traceback" not in too_long.output + missing.output


def test_eval_reports_each_target_once(trained):
    from minifn.tokenizer import load_tokenizer

    ckpt, story = trained
    result = run("eval", "--model", ckpt, "--dataset", story, "--batch-stride", 5, "--batch-size", 3)
    values = dict(line.split(": ") for line in result.output.strip().splitlines())
    assert int(values["Tokens evaluated"]) == len(load_tokenizer().encode(story.read_text())) - 1
    loss = float(values["Cross-entropy"].split()[0])
    assert abs(float(values["Perplexity"]) - 2.718281828 ** loss) < 1e-3 * float(values["Perplexity"])


def test_plot_writes_a_png_or_says_what_is_missing(trained, tmp_path, monkeypatch):
    ckpt, _ = trained
    out = tmp_path / "loss.png"
    run("plot", checkpoint.metrics_path(ckpt), "-o", out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    result = run("plot", checkpoint.metrics_path(ckpt), "-o", out, ok=False)
    assert result.exit_code == 1 and "pip install 'minifn[plot]'" in result.output


def test_label_smoothing_reaches_the_loss(story, tmp_path):
    def first_loss(*flags):
        ckpt = tmp_path / f"ls{len(flags)}.pt"
        train(story, ckpt, "--num-epochs", 1, "--no-shuffle", *flags)
        return json.loads(checkpoint.metrics_path(ckpt).read_text().splitlines()[0])["loss"]

    plain, smoothed = first_loss(), first_loss("--label-smoothing", "0.2")
    assert smoothed != pytest.approx(plain, rel=1e-4)  # same seed and batch: only the criterion differs


def test_loss_from_config_applies_smoothing():
    import torch.nn.functional as F

    from minifn.losses import IGNORE_INDEX
    from minifn.run import loss_from_config

    logits, targets = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    loss = loss_from_config("cross_entropy", 0.3)(logits, targets)
    want = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), label_smoothing=0.3, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, want)


def test_init_from_keeps_its_shape_and_refuses_another(trained, tmp_path):
    ckpt, story = trained
    start = {k: v for k, v in checkpoint.load(ckpt)[0].items() if k.startswith("params.")}
    # TINY spells out the checkpoint's own shape: accepted, and the context may change
    tuned = tmp_path / "tuned.pt"
    train(story, tuned, "--init-from", ckpt, "--num-epochs", 1, "--max-seq-len", 16, "--batch-stride", 8)
    tensors, meta = checkpoint.load(tuned)
    assert meta["config"]["model"]["embed_dim"] == 16 and meta["config"]["model"]["max_seq_len"] == 16
    assert {k for k in tensors if k.startswith("params.")} == set(start)
    refused = [(["--embed-dim", 32], "--embed-dim 32 (it has 16)"),
               (["--num-layers", 3, "--no-tie-embeddings"], "--num-layers 3 (it has 1); --tie-embeddings False"),
               # given at its default value: still a flag the loaded model would silently override
               (["--embed-dim", ModelConfig.embed_dim], f"--embed-dim {ModelConfig.embed_dim} (it has 16)")]
    for flags, named in refused:
        bad = train(story, tmp_path / "bad.pt", "--init-from", ckpt, "--num-epochs", 1, *flags, ok=False)
        assert bad.exit_code == 1 and named in bad.output and "Traceback" not in bad.output, bad.output
        assert not (tmp_path / "bad.pt").exists()


def test_eval_batches_larger_than_the_data_score_the_same(trained):
    ckpt, story = trained
    small = run("eval", "--model", ckpt, "--dataset", story, "--batch-size", 2)
    huge = run("eval", "--model", ckpt, "--dataset", story, "--batch-size", 10**7)  # padded: 10**7 x 32 x 32000
    a, b = (dict(line.split(": ") for line in r.output.strip().splitlines()) for r in (small, huge))
    assert a["Tokens evaluated"] == b["Tokens evaluated"]
    assert float(a["Cross-entropy"].split()[0]) == pytest.approx(float(b["Cross-entropy"].split()[0]), rel=1e-6)


def test_running_out_of_cpu_memory_is_the_users_error(trained, monkeypatch):
    from minifn import loop

    def exhausted(*args, **kwargs):  # what torch's CPU allocator raises: a plain RuntimeError
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:119] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 409600000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(loop, "eval_batches", exhausted)
    ckpt, story = trained
    result = run("eval", "--model", ckpt, "--dataset", story, ok=False)
    assert result.exit_code == 1 and "out of memory" in result.output and "smaller --batch-size" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "internal error" not in result.output


@pytest.mark.parametrize("command", ["train", "sweep", "generate", "prepare"])
def test_help_shows_only_real_bounds(command):
    """An unbounded finite-float option shows its default alone, not FloatRange's 'x<=None'."""
    text = run(command, "--help").output
    assert "None" not in text, text
    if command == "generate":
        assert "0<x<=1" in text  # --top-p's bounds are still shown


def test_the_command_list_describes_prepare():
    """`minifn --help` lists each command with its first sentence; prepare's docstring opens with 'INPUT...',
    whose dots Click took for the sentence's end ('prepare  Tokenize INPUT...')."""
    line = next(line for line in run("--help").output.splitlines() if line.strip().startswith("prepare"))
    assert "Tokenize text, JSONL and Parquet inputs" in line and "INPUT..." not in line


def _metrics_log(path, steps_per_epoch, steps, gns=False):
    """A run's metrics log written by hand: step events (with a noise scale if gns) and epoch events."""
    lines = []
    for step in range(1, steps + 1):
        lines.append({"kind": "step", "step": step, "loss": 5.0 - 0.1 * step, "run": path.stem,
                      **({"gns": 100.0 + step} if gns else {})})
        if step % steps_per_epoch == 0:
            lines.append({"kind": "epoch", "epoch": step // steps_per_epoch, "step": step, "loss": 5.0 - 0.1 * step,
                          "run": path.stem})
    path.write_text("".join(json.dumps(e) + "\n" for e in lines))
    return path


def test_plot_draws_each_runs_noise_scale_in_its_colour_and_epochs_only_where_runs_agree(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    plain = _metrics_log(tmp_path / "a.metrics.jsonl", steps_per_epoch=3, steps=6)
    noisy = _metrics_log(tmp_path / "b.metrics.jsonl", steps_per_epoch=2, steps=4, gns=True)

    def drawn(*files):
        run("plot", *files, "-o", tmp_path / "loss.png")
        loss_ax, *rest = figures[-1].axes
        train_lines = {ln.get_label().split(":")[0]: ln for ln in loss_ax.get_lines()
                       if "train loss (step)" in ln.get_label()}
        return loss_ax, (rest[0] if rest else None), train_lines

    loss_ax, gns_ax, train_lines = drawn(plain, noisy)
    (gns_line,) = gns_ax.get_lines()
    assert list(gns_line.get_ydata()) == [101.0, 102.0, 103.0, 104.0]
    assert gns_line.get_color() == train_lines["b"].get_color() != train_lines["a"].get_color()
    assert [t.get_text() for t in gns_ax.get_legend().get_texts()] == ["b"]
    assert not loss_ax.child_axes  # 3 and 2 steps per epoch: no one epoch axis fits both runs
    loss_ax, _, _ = drawn(plain)
    assert loss_ax.child_axes  # one run: its epoch axis
    loss_ax, _, _ = drawn(plain, _metrics_log(tmp_path / "c.metrics.jsonl", steps_per_epoch=3, steps=3))
    assert loss_ax.child_axes  # a sweep's members share theirs

"""Bad input to the commands besides train: one clear line and the right exit status (2 for usage, 1 for
ours), before any work; and an output that a Ctrl-C cuts short is never left half-written."""

import re

import numpy as np
import pytest

from conftest import TINY_FLAGS, invoke, story_file
from minifn import checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint, story) of one tiny run, trained once for this file."""
    root = tmp_path_factory.mktemp("trained")
    story = story_file(root, 600)
    result = invoke("train", "--dataset", story, "--model", root / "mini.pt", *TINY_FLAGS, "--num-epochs", 1)
    assert result.exit_code == 0, result.output
    return root / "mini.pt", story


def one_line(result, exit_code: int = 1) -> str:
    """The single 'Error: ...' line of a refused command."""
    assert result.exit_code == exit_code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def left_alone(folder, name: str, old: bytes) -> bool:
    """folder holds only name, with its old contents: no half-written file, no temporary left behind."""
    return [p.name for p in folder.iterdir()] == [name] and (folder / name).read_bytes() == old


# ------------------------------------------------------------------------------- Ctrl-C while writing


class IdsCutShort:
    """A file's ids (a few over one write chunk) where reading the second chunk raises KeyboardInterrupt,
    as a Ctrl-C in the middle of writing them would."""

    def __init__(self):
        self.ids = np.zeros((1 << 20) + 5, dtype=np.int64)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, part: slice):
        if (part.start or 0) >= 1 << 20:
            raise KeyboardInterrupt
        return self.ids[part]

    def blocks(self):
        yield self.ids


def test_tokenize_interrupted_leaves_the_old_ids_file(tmp_path, monkeypatch):
    from minifn import tokenizer

    monkeypatch.setattr(tokenizer, "encode_file", lambda tok, path: tokenizer.Encoded(IdsCutShort(), 0.0, False))
    monkeypatch.setattr("minifn.cli.tokenize.ROUND_TRIP_LIMIT", 0)
    story, out = story_file(tmp_path, 100), tmp_path / "out"
    out.mkdir()
    (out / "ids.txt").write_bytes(b"old\n")
    assert invoke("tokenize", "--input", story, "--output", out / "ids.txt").exit_code == 130
    assert left_alone(out, "ids.txt", b"old\n")


def test_tokenize_interrupted_in_np_save_leaves_the_old_npy(tmp_path, monkeypatch):
    def save_half(file, array):
        (open(file, "wb") if isinstance(file, str) else file).write(b"\x93NUMPY half")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", save_half)
    story, out = story_file(tmp_path, 100), tmp_path / "out"
    out.mkdir()
    (out / "ids.npy").write_bytes(b"old")
    assert invoke("tokenize", "--input", story, "--output", out / "ids.npy").exit_code == 130
    assert left_alone(out, "ids.npy", b"old")


def test_plot_interrupted_leaves_the_old_picture(trained, tmp_path, monkeypatch):
    figure = pytest.importorskip("matplotlib.figure")

    def savefig_half(self, fname, **kwargs):
        (open(fname, "wb") if isinstance(fname, (str, type(tmp_path))) else fname).write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(figure.Figure, "savefig", savefig_half)
    ckpt, _ = trained
    (tmp_path / "loss.png").write_bytes(b"old")
    assert invoke("plot", checkpoint.metrics_path(ckpt), "-o", tmp_path / "loss.png").exit_code == 130
    assert left_alone(tmp_path, "loss.png", b"old")


def test_plot_writes_the_format_its_suffix_names(trained, tmp_path):
    pytest.importorskip("matplotlib")
    metrics = checkpoint.metrics_path(trained[0])
    assert invoke("plot", metrics, "-o", tmp_path / "loss.svg").exit_code == 0
    assert (tmp_path / "loss.svg").read_bytes().startswith(b"<?xml")
    assert ".xyz is not an image format" in one_line(invoke("plot", metrics, "-o", tmp_path / "loss.xyz"))
    assert not (tmp_path / "loss.xyz").exists()


# ---------------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("flag,value", [("--temperature", "nan"), ("--temperature", "inf"), ("--top-p", "nan"),
                                        ("--repetition-penalty", "nan"), ("--repetition-penalty", "inf")])
def test_generate_refuses_a_number_that_is_not_finite(trained, flag, value):
    line = one_line(invoke("generate", "--model", trained[0], "--prompt", "The", flag, value), exit_code=2)
    assert f"Invalid value for '{flag}': '{value}' is not a finite number" in line


def test_prepare_refuses_a_val_fraction_that_is_not_finite(trained, tmp_path):
    line = one_line(invoke("prepare", trained[1], "-o", tmp_path / "c", "--val-fraction", "nan"), exit_code=2)
    assert "'nan' is not a finite number" in line


@pytest.mark.parametrize("values,message", [("0.003,,0.01", "has an empty entry"), ("0.01,", "has an empty entry"),
                                            ("0.01,nan", "takes finite numbers"), ("inf", "takes finite numbers")])
def test_sweep_refuses_an_empty_or_non_finite_value(tmp_path, values, message):
    result = invoke("sweep", "--dataset", story_file(tmp_path, 600), "--output", tmp_path / "sw", *TINY_FLAGS,
                    "--lr", values)
    assert f"--lr {message}" in one_line(result, exit_code=2)
    assert not (tmp_path / "sw").exists()


def test_rerunning_a_finished_sweep_says_there_is_nothing_to_do(tmp_path):
    story, out = story_file(tmp_path, 600), tmp_path / "sw"
    sweep = ["sweep", "--dataset", story, "--output", out, *TINY_FLAGS, "--lr", "0.003,0.01", "--num-epochs", 1]
    assert invoke(*sweep).exit_code == 0
    saved = {p: p.read_bytes() for p in out.iterdir()}
    line = one_line(invoke(*sweep))
    assert "have already trained 1 epoch(s)" in line and "nothing to do; raise --num-epochs" in line
    assert {p: p.read_bytes() for p in out.iterdir()} == saved


# -------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def truncated(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("corrupt") / "cut.pt"
    data = trained[0].read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("command", [["generate", "--prompt", "The"], ["eval", "--dataset", "{story}"],
                                     ["export", "--output", "{tmp}/hf"]], ids=lambda c: c[0])
def test_a_corrupt_checkpoint_is_not_met_with_advice_for_train(trained, truncated, tmp_path, command):
    args = [a.format(story=trained[1], tmp=tmp_path) for a in command]
    line = one_line(invoke(*args, "--model", truncated))
    assert "is truncated or corrupt" in line and "--fresh" not in line


def test_a_corrupt_checkpoint_to_resume_suggests_fresh(trained, truncated):
    line = one_line(invoke("train", "--dataset", trained[1], "--model", truncated, *TINY_FLAGS, "--num-epochs", 1))
    assert "is truncated or corrupt" in line and "start over with --fresh" in line


# ------------------------------------------------------------------------------- prompts and paths


def test_a_prompt_longer_than_the_context_is_refused_before_it_is_printed(trained):
    result = invoke("generate", "--model", trained[0], "--prompt", "word " * 100)
    assert "shorten the prompt" in one_line(result) and "word" not in result.output


@pytest.fixture
def file_in_the_way(tmp_path):
    (tmp_path / "short.txt").write_text("a file\n")
    return tmp_path / "short.txt"


@pytest.mark.parametrize("command", [
    ["tokenize", "--input", "{story}", "--output", "{file}/ids.txt"],
    ["plot", "{metrics}", "-o", "{file}/figures/loss.png"],
    ["prepare", "{story}", "-o", "{file}/corpus"],
    ["export", "--model", "{ckpt}", "--output", "{file}/hf"],
    ["import", "--input", "{tmp}", "--output", "{file}/imported.pt"],
    ["tokenizer", "train", "--input", "{story}", "--vocab-size", "300", "--output", "{file}/t.model"],
], ids=lambda c: c[0] if c[0] != "tokenizer" else "tokenizer-train")
def test_an_output_under_a_file_is_named_plainly_before_any_work(trained, file_in_the_way, tmp_path, command):
    if command[0] == "plot":
        pytest.importorskip("matplotlib")
    ckpt, story = trained
    args = [a.format(story=story, metrics=checkpoint.metrics_path(ckpt), ckpt=ckpt, file=file_in_the_way,
                     tmp=tmp_path) for a in command]
    wanted = next(a for a in args if a.startswith(str(file_in_the_way)))
    assert one_line(invoke(*args)) == f"Error: cannot write {wanted}: {file_in_the_way} is a file, not a folder"


def test_tokenize_into_a_folder_is_refused_before_any_work(trained, tmp_path):
    assert "is a folder" in one_line(invoke("tokenize", "--input", trained[1], "--output", tmp_path))


def test_import_of_a_missing_folder_says_it_does_not_exist(tmp_path):
    line = one_line(invoke("import", "--input", tmp_path / "nope", "--output", tmp_path / "x.pt"))
    assert line == f"Error: model folder {tmp_path / 'nope'} does not exist"


def test_a_too_small_vocab_size_names_a_size_that_works(trained, tmp_path):
    line = one_line(invoke("tokenizer", "train", "--input", trained[1], "--vocab-size", 200,
                           "--output", tmp_path / "t.model"))
    assert "character_coverage" not in line
    size = re.search(r"use --vocab-size (\d+) or more", line).group(1)
    result = invoke("tokenizer", "train", "--input", trained[1], "--vocab-size", size, "--output", tmp_path / "t.model")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("command", ["train", "eval", "tokenize"])
def test_a_jsonl_file_without_its_text_field_names_a_flag_that_exists(trained, tmp_path, command):
    """train, eval and tokenize read a .jsonl file's 'text' field and have no --text-field: the error points at
    minifn prepare, which has, instead of telling the user to pass a flag that this command refuses."""
    ckpt, _ = trained
    data = tmp_path / "docs.jsonl"
    data.write_text('{"body": "A story."}\n')
    args = {"train": ["--dataset", data, "--model", tmp_path / "m.pt", *TINY_FLAGS],
            "eval": ["--dataset", data, "--model", ckpt], "tokenize": ["--input", data]}[command]
    line = one_line(invoke(command, *args))
    assert "has no text field 'text'" in line and "minifn prepare --text-field NAME" in line
    assert "choose it with --text-field" not in line
    prepared = one_line(invoke("prepare", data, "--output", tmp_path / "corpus"))
    assert "choose it with --text-field" in prepared  # prepare has the flag

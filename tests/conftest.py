"""Shared tiny configs, CLI flags and paths. Compiled functions are built once per session and shared.

Every test runs under a recorded seed: torch's global generator is seeded from MINIFN_TEST_SEED (or a fresh
random seed), and the seed is printed, so pytest shows it with any failure; rerun with MINIFN_TEST_SEED=N."""

import os
import random
from pathlib import Path

# Under pytest-xdist (the README's command runs two workers) each worker gets its share of the cores: two
# workers each running OpenMP's two threads on two cores spin against each other. Set before torch is
# imported; the processes a test starts inherit it.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _share = (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))

# One linear route everywhere (minifn.onednn): timed per shape, the choice could differ between two test
# processes whose numbers a test compares. tests/test_onednn.py tests the timed route itself.
os.environ.setdefault("MINIFN_LINEAR", "onednn")

import optree
import pytest
import torch
from click.testing import CliRunner

from minifn.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
# A one-layer model small enough that a CLI epoch on a 600-character story takes a fraction of a second.
TINY_FLAGS = ["--num-layers", "1", "--num-heads", "2", "--head-dim", "8", "--embed-dim", "16", "--ff-dim", "32",
              "--max-seq-len", "32", "--batch-stride", "16", "--batch-size", "2", "--compile", "off",
              "--dtype", "float32"]  # not auto: the same numbers on every CI machine, bfloat16 hardware or not


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=61, embed_dim=32, num_layers=2, num_heads=4, head_dim=12, ff_dim=48, max_seq_len=16)
    return ModelConfig(**{**base, **overrides})


@pytest.fixture
def tiny():
    return tiny_config()


@pytest.fixture(autouse=True)
def recorded_seed():
    """Seed torch for this test and print the seed (shown by pytest when the test fails)."""
    import torch

    seed = int(os.environ.get("MINIFN_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    print(f"test seed: MINIFN_TEST_SEED={seed}")
    return seed


@pytest.fixture(autouse=True)
def compiled_steps_are_saved():
    """Every step a test compiles is saved for the next run: AOT precompile is experimental, and a step that
    falls back to an ordinary compile (or whose closure will not pickle) would lose that silently."""
    from minifn.precompiled import stats

    before = stats["ordinary"], stats["unsaved"]
    yield
    assert (stats["ordinary"], stats["unsaved"]) == before, "a compiled step could not be saved"


def invoke(*args, **kwargs):
    """Run the minifn CLI in-process; arguments may be paths or numbers."""
    from minifn.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def relative_error(a, b) -> float:
    """|a - b| / |b| with each tree's floating-point leaves taken as one vector. Per-leaf maxima are dominated
    by tiny leaves whose near-zero gradients Adam's normalisation turns into O(1) steps, where 1e-7 float
    noise grows past 1e-5; the whole tree shows whether two runs are the same run."""
    pairs = [(x.detach().double(), y.detach().double())
             for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True) if y.is_floating_point()]
    diff = torch.sqrt(sum((x - y).square().sum() for x, y in pairs))
    return (diff / torch.sqrt(sum(y.square().sum() for _, y in pairs)).clamp(min=1e-300)).item()


# relative_error between a compiled and an eager AdamW run of a few steps. The compiled kernels round
# differently, and Adam's first steps turn the rounding of a near-zero gradient into a step of up to lr, so
# the error is heavy-tailed: tiny config, lr 3e-3, 5 steps, 41 seeds: median 1.8e-7, max 1.3e-5 (one element
# of one matrix, off from the first step). A real mistake is far above: weight decay 0.1 left out is 1.5e-3.
COMPILED_VS_EAGER_ADAM = 1e-4


def story_file(directory: Path, chars: int) -> Path:
    """directory/story.txt holding the first chars characters of the bundled story (a small dataset)."""
    path = directory / "story.txt"
    path.write_text((ROOT / "data" / "lighthouse.txt").read_text()[:chars])
    return path


def shared_file(name: str) -> Path:
    """A file from ../shared/data, or skip the test cleanly when it is absent."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


def pytest_configure(config):
    import torch._dynamo

    # Tests compile several small configs of the same step function; keep them all cached.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 512


def unique_graphs() -> int:
    """Graphs compiled, or loaded from an earlier run's saved steps, so far in this process (read before and
    after; never reset, fixtures share caches)."""
    from torch._dynamo.utils import counters

    from minifn.precompiled import stats

    return counters["stats"]["unique_graphs"] + stats["loaded"]

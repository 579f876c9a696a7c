"""Shared tiny configs and paths. Compiled functions are built once per session and shared."""

from pathlib import Path

import pytest

from minifn.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=61, embed_dim=32, num_layers=2, num_heads=4, head_dim=12, ff_dim=48, max_seq_len=16)
    return ModelConfig(**{**base, **overrides})


@pytest.fixture
def tiny():
    return tiny_config()


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
    """Graphs compiled so far in this process (read before and after; never reset, fixtures share caches)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]

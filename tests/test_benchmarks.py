"""Tiny runs of each benchmark script, so they cannot rot. They assert that each script runs and
writes its section; timings are never asserted."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, shared_file

SCRIPTS = [
    ("train_step.py", ["--quick", "--configs", "tiny", "--variants", "a,c,d,a_bf16,d_bf16", "--jobs", "2"],
     "### tiny:"),
    ("swap.py", ["--quick", "--config", "tiny", "--k", "2"], "## Swapping parameter trees"),
    ("generate.py", ["--quick", "--config", "tiny", "--new-tokens", "6", "--prompt-tokens", "4"], "## Generation"),
    ("profile_step.py", ["--configs", "tiny"], "## Where the time goes"),
    ("data.py", ["--quick"], "## Data: prepare and reading from shards"),
    ("sweep.py", ["--quick", "--k", "2"], "## Sweep"),
    ("corpus_training.py", ["--quick", "--steps", "2"], "## Training from a prepared corpus"),
    ("allocator.py", ["--configs", "tiny", "--variants", "a_fused,d", "--no-tutorial",
                      "--repeats", "1"], "## Keeping freed memory"),
    ("tutorial.py", ["--epochs", "1", "--compile", "off"], "## The tutorial's command, end to end"),
    ("compile_ab.py", ["--base", "HEAD", "--configs", "tiny", "--rounds", "1"], "## Cold compile, before and after"),
    ("gemm_backends.py", ["--configs", "tiny", "--rounds", "2"], "## Matrix products: MKL against oneDNN ("),
    ("loss_forms.py", ["--configs", "tiny", "--rounds", "2"], "## Cross-entropy: F.cross_entropy against logsumexp"),
    ("attention.py", ["--configs", "tiny", "--rounds", "2"], "## Attention under a CPU bfloat16 autocast"),
    ("input_checks.py", ["--configs", "tiny", "--repeats", "5", "--steps", "1"], "## Input checks against the step"),
    ("paired.py", ["--config", "tiny", "--variants", "a,d", "--rounds", "3"], "## Paired steps: tiny, (d) against (a)"),
]


@pytest.mark.slow
@pytest.mark.parametrize("script,args,heading", SCRIPTS, ids=[s for s, _, _ in SCRIPTS])
def test_benchmark_script_runs_and_writes_its_section(tmp_path, script, args, heading):
    if script == "tutorial.py":
        shared_file("mini-owl.md")  # skips when the shared data folder is absent
    if script in ("data.py", "corpus_training.py"):
        shared_file("tinyshakespeare.txt")  # their corpus is tinyshakespeare repeated
    if script == "gemm_backends.py" and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch was built without oneDNN")
    out = tmp_path / "RESULTS.md"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MINIFN_BENCH_SMOKE": "1"}  # compile each graph once
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--output", str(out)],
                   check=True, capture_output=True, text=True, env=env, timeout=600)
    text = out.read_text()
    assert heading in text and "Machine:" in text and "Command:" in text

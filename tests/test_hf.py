"""The Hugging Face format, checked against `transformers` itself: exported minifn models and imported Llama
models give the same logits and greedy tokens in both libraries, tokenizers the same ids, round trips the same bits."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import ROOT, story_file
from minifn import checkpoint, hf
from minifn.cli import cli
from minifn.config import ModelConfig
from minifn.generate import generate
from minifn.model import apply, init_params
from minifn.tokenizer import load_tokenizer, mistral_model_path, sha256_file, train_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = ["Hello world", " leading space", "  two leading spaces", "\n\nnewlines\n and  double  spaces \n",
         "ünïcödé, 日本語 and 🦙 emoji", "tabs\tand digits 1234567 3.14", " ", "trailing  ",
         "control pieces as text: <s> </s> <unk>",
         (ROOT / "data" / "lighthouse.txt").read_text()[:1500]]
# (seed, ModelConfig overrides): tied and untied, with and without bias, head_dim != embed_dim // num_heads,
# and embed_dim not a multiple of num_heads (exported as MistralForCausalLM, which allows it).
CASES = [(101, dict(num_heads=4, head_dim=8, tie_embeddings=True, bias=False)),
         (202, dict(num_heads=2, head_dim=24, tie_embeddings=False, bias=True)),
         (303, dict(num_heads=3, head_dim=10, embed_dim=36, tie_embeddings=False, bias=False, rope_theta=500.0,
                    eps=1e-6)),
         (404, dict(num_heads=5, head_dim=6, tie_embeddings=True, bias=False))]


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """A 400-piece BPE model trained on the bundled story (the kind `minifn tokenizer train` writes)."""
    return train_tokenizer([str(ROOT / "data" / "lighthouse.txt")], 400, tmp_path_factory.mktemp("tok") / "tiny.model")


def minifn_config(vocab_size: int, **overrides) -> ModelConfig:
    base = dict(vocab_size=vocab_size, embed_dim=32, num_layers=2, num_heads=4, head_dim=8, ff_dim=40, max_seq_len=64)
    return ModelConfig(**{**base, **overrides})


def random_params(config: ModelConfig, seed: int):
    """init_params, then norm gains and biases moved away from 1 and 0 and weights scaled up, so all of them matter
    and logits are of order 1."""
    g = torch.Generator().manual_seed(seed)
    params = init_params(config, seed)
    for name, value in params.items():
        noise = torch.randn(value.shape, generator=g)
        params[name] = value + 0.3 * noise if name.endswith(("norm.weight", ".bias")) else value * 4 + 0.02 * noise
    return params


def tokenizer_header(path) -> dict:
    return {"name": str(path), "sha256": sha256_file(path), "path": str(path)}


def export(tmp_path, params, config, tokenizer_path, name="export", extra=None, weights="raw"):
    ckpt = tmp_path / f"{name}.pt"
    tensors = {**checkpoint.flatten(params, "params"), **(extra or {})}
    header = {"config": {"model": config.to_dict()}, "tokenizer": tokenizer_header(tokenizer_path)}
    checkpoint.save(ckpt, tensors, header)
    return hf.export_checkpoint(ckpt, tmp_path / name, weights)


def hf_model(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens from transformers, never stopping early (no EOS), as minifn's generate with eos_id=None."""
    config = transformers.GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                                           pad_token_id=0, bos_token_id=None)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), generation_config=config,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def minifn_greedy(params, config, prompt: list[int], n: int) -> list[int]:
    return list(generate(params, prompt, config, max_new_tokens=n, temperature=0.0))


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, *words):
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert all(w in lines[0] for w in words), lines[0]


# ---------------------------------------------------------------------------------------------- export

@pytest.mark.parametrize("seed,overrides", CASES)
def test_exported_model_gives_minifn_logits_and_greedy_tokens_in_transformers(tmp_path, tiny_tokenizer, seed,
                                                                               overrides):
    config = minifn_config(400, **overrides)
    params = random_params(config, seed)
    directory = export(tmp_path, params, config, tiny_tokenizer)
    hf_config = json.loads((directory / "config.json").read_text())
    assert hf_config["architectures"] == ["MistralForCausalLM" if config.embed_dim % config.num_heads
                                          else "LlamaForCausalLM"]
    model = hf_model(directory)
    assert model.config.tie_word_embeddings == config.tie_embeddings and model.config.head_dim == config.head_dim
    tokens = torch.randint(0, config.vocab_size, (2, config.max_seq_len), generator=torch.Generator().manual_seed(seed))
    ours, theirs = apply(params, tokens, config), hf_logits(model, tokens)
    assert ours.abs().mean() > 0.3  # logits of order 1, so the tolerance below means something
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    prompt = tokens[0, :5].tolist()
    assert hf_greedy(model, prompt, 30) == minifn_greedy(params, config, prompt, 30)


def test_export_round_trip_is_bit_identical(tmp_path, tiny_tokenizer):
    for seed, overrides in CASES:
        config = minifn_config(400, **overrides)
        params = random_params(config, seed)
        directory = export(tmp_path, params, config, tiny_tokenizer, name=f"rt{seed}")
        back, back_config, tokenizer_path = hf.load_pretrained(directory)
        assert back_config == config and list(back) == list(params)
        assert all(torch.equal(back[name], params[name]) for name in params)
        assert sha256_file(tokenizer_path) == sha256_file(tiny_tokenizer) and tokenizer_path.is_absolute()


def test_export_cli_writes_what_transformers_needs_and_ema_weights(tmp_path, tiny_tokenizer):
    config = minifn_config(400)
    params, ema = random_params(config, 1), random_params(config, 2)
    ckpt = tmp_path / "run.pt"
    export(tmp_path, params, config, tiny_tokenizer, name="run", extra=checkpoint.flatten(ema, "ema"))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
        "tokenizer.model", "tokenizer_config.json"]
    result = run("export", "--model", ckpt, "--output", tmp_path / "ema", "--weights", "ema")
    assert result.exit_code == 0 and "Exported ema weights" in result.output, result.output
    assert all(torch.equal(v, ema[k]) for k, v in hf.load_pretrained(tmp_path / "ema")[0].items())
    assert not all(torch.equal(v, params[k]) for k, v in hf.load_pretrained(tmp_path / "ema")[0].items())


def test_export_takes_a_moved_tokenizer_as_generate_does(tmp_path, tiny_tokenizer):
    config = minifn_config(400)
    moved = tmp_path / "old" / "tok.model"
    moved.parent.mkdir()
    shutil.copyfile(tiny_tokenizer, moved)
    ckpt = tmp_path / "m.pt"
    checkpoint.save_params(ckpt, random_params(config, 7), config, tokenizer_header(moved))
    moved.unlink()
    assert_one_line_error(run("export", "--model", ckpt, "--output", tmp_path / "a"), "not there any more",
                          "--tokenizer")
    result = run("export", "--model", ckpt, "--output", tmp_path / "b", "--tokenizer", tiny_tokenizer)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "b" / "tokenizer.model").read_bytes() == Path(tiny_tokenizer).read_bytes()
    other = tmp_path / "other.model"
    assert run("tokenizer", "train", "--input", story_file(tmp_path, 900), "--vocab-size", 300, "--output",
               other).exit_code == 0
    assert_one_line_error(run("export", "--model", ckpt, "--output", tmp_path / "c", "--tokenizer", other),
                          "sha256 differs")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_export_refusals_are_one_line(tmp_path, tiny_tokenizer, monkeypatch):
    config = minifn_config(400)
    no_ema = tmp_path / "plain.pt"
    checkpoint.save_params(no_ema, random_params(config, 3), config, tokenizer_header(tiny_tokenizer))
    assert_one_line_error(run("export", "--model", no_ema, "--output", tmp_path / "x", "--weights", "ema"),
                          "trained without --ema")
    biased = minifn_config(400, num_heads=5, head_dim=6, bias=True)  # Llama needs 32 % 5 == 0, Mistral has no bias
    checkpoint.save_params(tmp_path / "biased.pt", random_params(biased, 4), biased, tokenizer_header(tiny_tokenizer))
    assert_one_line_error(run("export", "--model", tmp_path / "biased.pt", "--output", tmp_path / "y"), "embed_dim")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert_one_line_error(run("export", "--model", no_ema, "--output", tmp_path / "full"), "already exists")
    rope = minifn_config(400, rope_theta=500.0)
    checkpoint.save_params(tmp_path / "rope.pt", random_params(rope, 6), rope, tokenizer_header(tiny_tokenizer))
    monkeypatch.setattr(hf, "MAPPED_FIELDS", hf.MAPPED_FIELDS - {"rope_theta"})  # as if a new field were unmapped
    assert_one_line_error(run("export", "--model", tmp_path / "rope.pt", "--output", tmp_path / "z"), "rope_theta")
    assert not any((tmp_path / name).exists() for name in "xyz")


def test_a_failed_export_leaves_no_folder(tmp_path, tiny_tokenizer, monkeypatch):
    config = minifn_config(400)
    ckpt = tmp_path / "m.pt"
    checkpoint.save_params(ckpt, random_params(config, 5), config, tokenizer_header(tiny_tokenizer))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copyfile", killed)  # dies while copying tokenizer.model, after model.safetensors
    with pytest.raises(KeyboardInterrupt):
        hf.export_checkpoint(ckpt, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


# ---------------------------------------------------------------------------------------------- tokenizer

@pytest.mark.parametrize("which", ["mistral", "trained"])
def test_exported_tokenizer_encodes_like_minifn(tmp_path, tiny_tokenizer, which):
    path = mistral_model_path() if which == "mistral" else tiny_tokenizer
    ours = load_tokenizer(path)
    config = minifn_config(ours.vocab_size, num_layers=1)
    directory = export(tmp_path, init_params(config, 0), config, path)
    theirs = transformers.AutoTokenizer.from_pretrained(directory)
    for text in TEXTS:
        ids = ours.encode(text)
        assert theirs(text)["input_ids"] == ids, text  # no BOS by default: minifn trains without one
        assert theirs(text, add_special_tokens=False)["input_ids"] == ids, text
        assert theirs.decode(ids) == ours.decode(ids), text
    assert (theirs.bos_token_id, theirs.eos_token_id) == (ours.bos_id, ours.eos_id)
    assert theirs.unk_token_id == ours.sp.unk_id()


# ---------------------------------------------------------------------------------------------- import

HF_CASES = [(7, "llama", dict(num_attention_heads=4, head_dim=8, tie_word_embeddings=False), "1KB"),
            (8, "llama", dict(num_attention_heads=2, head_dim=20, tie_word_embeddings=True, attention_bias=True,
                              mlp_bias=True, rope_theta=1000.0, rms_norm_eps=1e-5), None),
            (9, "mistral", dict(num_attention_heads=4, num_key_value_heads=4, head_dim=12, sliding_window=None),
             "20KB"),
            # grouped-query attention, imported as multi-head attention with each k/v head repeated per group
            (10, "llama", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=6, attention_bias=True,
                               mlp_bias=True), None),
            (11, "mistral", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=10, sliding_window=None),
             None)]


def hf_random_model(kind, overrides, vocab_size, seed):
    """A random LlamaForCausalLM / MistralForCausalLM with every norm gain and bias perturbed."""
    base = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                max_position_embeddings=64, initializer_range=0.2, bos_token_id=None, eos_token_id=None)
    make = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[kind]
    torch.manual_seed(seed)
    model = make[1](make[0](**{**base, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", ".bias")):
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("seed,kind,overrides,shard", HF_CASES)
def test_imported_transformers_model_gives_the_same_logits_and_greedy_tokens(tmp_path, tiny_tokenizer, seed, kind,
                                                                             overrides, shard):
    model = hf_random_model(kind, overrides, 400, seed)
    model.save_pretrained(tmp_path / "hf", **({"max_shard_size": shard} if shard else {}))
    shutil.copyfile(tiny_tokenizer, tmp_path / "hf" / "tokenizer.model")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file() == bool(shard)
    params, config, _ = hf.load_pretrained(tmp_path / "hf")
    tokens = torch.randint(0, 400, (2, 64), generator=torch.Generator().manual_seed(seed))
    ours, theirs = apply(params, tokens, config), hf_logits(model, tokens)
    assert theirs.abs().mean() > 0.3
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    prompt = tokens[1, :4].tolist()
    assert minifn_greedy(params, config, prompt, 30) == hf_greedy(model, prompt, 30)


def test_import_cli_writes_a_checkpoint_that_generate_and_eval_load(tmp_path, tiny_tokenizer):
    model = hf_random_model("llama", dict(num_attention_heads=4), 400, 11)
    model.save_pretrained(tmp_path / "hf")
    shutil.copyfile(tiny_tokenizer, tmp_path / "hf" / "tokenizer.model")
    result = run("import", "--input", tmp_path / "hf", "--output", tmp_path / "imported.pt", "--max-seq-len", 32)
    assert result.exit_code == 0 and "Checkpoint saved" in result.output, result.output
    params, config, meta = checkpoint.load_params(tmp_path / "imported.pt")
    assert config.max_seq_len == 32  # capped from max_position_embeddings=64; same logits within it
    assert meta["tokenizer"]["sha256"] == sha256_file(tiny_tokenizer)
    assert meta["tokenizer"]["name"] == str((tmp_path / "hf" / "tokenizer.model").resolve())
    tokens = torch.randint(0, 400, (1, 16), generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(apply(params, tokens, config), hf_logits(model, tokens), atol=1e-5, rtol=1e-5)
    generated = run("generate", "--model", tmp_path / "imported.pt", "--prompt", "The keeper", "--greedy",
                    "--max-tokens", 5, "--device", "cpu")
    assert generated.exit_code == 0 and generated.output.startswith("The keeper"), generated.output
    story = story_file(tmp_path, 400)
    evaluated = run("eval", "--model", tmp_path / "imported.pt", "--dataset", story, "--device", "cpu")
    assert evaluated.exit_code == 0 and "Perplexity" in evaluated.output, evaluated.output


@pytest.mark.parametrize("change,field", [
    (lambda c: c.update(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
    (lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}), "rope_parameters"),
    (lambda c: c.update(num_key_value_heads=3), "num_key_value_heads"),  # does not divide 4 heads
    (lambda c: c.update(architectures=["GPT2LMHeadModel"]), "architectures"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act"),
    (lambda c: c.update(mlp_bias=True), "mlp_bias"),
    (lambda c: c.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=16),
     "sliding_window"),
    (lambda c: c.update(num_hidden_layers=3), "model.layers.2"),
    (lambda c: c.update(rms_norm_eps=None), "rms_norm_eps=null must be a positive number"),
    (lambda c: c.update(hidden_size="32"), 'hidden_size="32" must be a positive whole number'),
    (lambda c: c.update(num_key_value_heads=0), "num_key_value_heads=0 must be a positive whole number"),
    (lambda c: c.update(head_dim=3), "head_dim=3 is not supported"),
    (lambda c: c.setdefault("rope_parameters", {"rope_type": "default"}).update(rope_theta="abc"), "rope_theta"),
    (lambda c: c.update(rope_parameters="default"), 'rope_parameters="default" is not supported'),
    (lambda c: c.update(tie_word_embeddings="false"), 'tie_word_embeddings="false" must be true or false'),
    (lambda c: c.update(quantization_config="gptq"), 'quantization_config="gptq" is not supported'),
    # k/v weights of 4 heads under a config of 2: transformers refuses the shapes, so must minifn
    (lambda c: c.update(num_key_value_heads=2), "k_proj.weight has shape (32, 32) but config.json implies (16, 32)"),
    # an untied model's folder relabelled as tied: transformers 5 keeps its head, older versions drop it
    (lambda c: c.update(tie_word_embeddings=True), "set tie_word_embeddings to false"),
    (None, "tokenizer.model"),
    ("{not json", "not valid JSON"),
])
def test_import_refusals_are_one_line_and_name_the_field(tmp_path, tiny_tokenizer, change, field):
    hf_random_model("llama", dict(num_attention_heads=4), 400, 12).save_pretrained(tmp_path / "hf")
    if change is None:
        pass  # no tokenizer.model copied
    elif isinstance(change, str):
        shutil.copyfile(tiny_tokenizer, tmp_path / "hf" / "tokenizer.model")
        (tmp_path / "hf" / "config.json").write_text(change)
    else:
        shutil.copyfile(tiny_tokenizer, tmp_path / "hf" / "tokenizer.model")
        config = json.loads((tmp_path / "hf" / "config.json").read_text())
        change(config)
        (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run("import", "--input", tmp_path / "hf", "--output", tmp_path / "out.pt"), field)
    assert not (tmp_path / "out.pt").exists()


def test_import_checks_a_sliding_window_against_the_context_it_gets(tmp_path, tiny_tokenizer):
    """Mistral's sliding window drops nothing within a context no longer than the window: a shorter --max-seq-len
    makes a windowed folder exact, and a longer one than the window (here max_position_embeddings) is refused."""
    model = hf_random_model("mistral", dict(num_attention_heads=4, num_key_value_heads=4, sliding_window=16), 400, 14)
    model.save_pretrained(tmp_path / "hf")  # max_position_embeddings=64: refused as it stands
    shutil.copyfile(tiny_tokenizer, tmp_path / "hf" / "tokenizer.model")
    assert_one_line_error(run("import", "--input", tmp_path / "hf", "--output", tmp_path / "a.pt"), "sliding_window=16")
    params, config, _ = hf.load_pretrained(tmp_path / "hf", max_seq_len=16)
    tokens = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(14))
    torch.testing.assert_close(apply(params, tokens, config), hf_logits(model, tokens), atol=1e-5, rtol=1e-5)
    model.config.max_position_embeddings = 16  # the window covers the folder's context, not a longer one
    model.save_pretrained(tmp_path / "hf16")
    shutil.copyfile(tiny_tokenizer, tmp_path / "hf16" / "tokenizer.model")
    assert hf.load_pretrained(tmp_path / "hf16")[1].max_seq_len == 16
    assert_one_line_error(run("import", "--input", tmp_path / "hf16", "--output", tmp_path / "b.pt", "--max-seq-len",
                              48), "sliding_window=16", "context of 48")
    assert not (tmp_path / "a.pt").exists() and not (tmp_path / "b.pt").exists()


def test_import_refuses_pickled_weights_and_an_existing_output(tmp_path, tiny_tokenizer):
    hf_random_model("llama", dict(num_attention_heads=4), 400, 13).save_pretrained(tmp_path / "hf")
    shutil.copyfile(tiny_tokenizer, tmp_path / "hf" / "tokenizer.model")
    (tmp_path / "taken.pt").write_text("someone's file")
    assert_one_line_error(run("import", "--input", tmp_path / "hf", "--output", tmp_path / "taken.pt"), "exists")
    assert (tmp_path / "taken.pt").read_text() == "someone's file"
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "hf" / "pytorch_model.bin")
    assert_one_line_error(run("import", "--input", tmp_path / "hf", "--output", tmp_path / "out.pt"), ".bin")


def test_train_init_from_a_transformers_folder_starts_from_its_weights(tmp_path, tiny_tokenizer):
    """Fine-tuning: the first step's loss is the imported model's loss on that batch (not a random model's),
    and the same command resumes; a tokenizer other than the folder's is refused."""
    model = hf_random_model("llama", dict(num_attention_heads=4, hidden_size=16, intermediate_size=24), 400, 12)
    model.save_pretrained(tmp_path / "hf")
    shutil.copyfile(tiny_tokenizer, tmp_path / "hf" / "tokenizer.model")
    story = story_file(tmp_path, 1200)
    flags = ["--dataset", story, "--model", tmp_path / "tuned.pt", "--tokenizer", tiny_tokenizer,
             "--init-from", tmp_path / "hf", "--max-seq-len", 16, "--batch-stride", 16, "--batch-size", 1,
             "--no-shuffle", "--compile", "off", "--dtype", "float32", "--lr", "1e-3", "--scheduler", "none",
             "--clip-grad", "0"]
    result = run("train", *flags, "--num-epochs", 2)
    assert result.exit_code == 0, result.output
    steps = [json.loads(line) for line in checkpoint.metrics_path(tmp_path / "tuned.pt").read_text().splitlines()
             if '"kind": "step"' in line]
    ids = load_tokenizer(tiny_tokenizer).encode(story.read_text())
    first = torch.tensor([ids[:17]])
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(model(first[:, :16]).logits[0], first[0, 1:]).item()
    assert steps[0]["loss"] == pytest.approx(want, rel=1e-5)
    assert checkpoint.load(tmp_path / "tuned.pt")[1]["config"]["model"]["embed_dim"] == 16  # from the folder
    resumed = run("train", *flags, "--num-epochs", 3)
    assert resumed.exit_code == 0 and "Resuming from" in resumed.output
    other = run("train", "--dataset", story, "--model", tmp_path / "x.pt", "--init-from", tmp_path / "hf",
                "--num-epochs", 1, "--compile", "off")  # with Mistral's tokenizer, not the folder's
    assert other.exit_code == 1 and "another tokenizer" in other.output


def test_train_init_from_checks_a_sliding_window_against_the_runs_context(tmp_path, tiny_tokenizer):
    """As import does: a windowed folder fine-tunes exactly within its window and is refused beyond it."""
    model = hf_random_model("mistral", dict(num_attention_heads=4, num_key_value_heads=4, sliding_window=16), 400, 15)
    model.save_pretrained(tmp_path / "hf")  # max_position_embeddings=64, longer than the window
    shutil.copyfile(tiny_tokenizer, tmp_path / "hf" / "tokenizer.model")
    story = story_file(tmp_path, 1200)

    def train(name, max_seq_len):
        return run("train", "--dataset", story, "--model", tmp_path / name, "--tokenizer", tiny_tokenizer,
                   "--init-from", tmp_path / "hf", "--max-seq-len", max_seq_len, "--batch-stride", 8,
                   "--batch-size", 1, "--max-steps", 1, "--compile", "off")

    inside = train("inside.pt", 16)
    assert inside.exit_code == 0, inside.output
    beyond = train("beyond.pt", 32)
    assert beyond.exit_code == 1 and "sliding_window=16" in beyond.output, beyond.output
    assert len(beyond.output.strip().splitlines()) == 1 and not (tmp_path / "beyond.pt").exists()

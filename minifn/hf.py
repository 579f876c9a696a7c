"""The Hugging Face Llama format: export a minifn checkpoint, import a Llama/Mistral directory.

minifn's decoder is Llama's: RMSNorm, rotary attention in the 'rotate half' convention with each head's
q/k contiguous, SwiGLU, optional tied head. Only the packing differs: minifn fuses q, k, v into one
`attn.qkv` ([q; k; v] rows, each [H*K, D]) and gate, value into one `ff.up` ([gate; value] rows), where
`LlamaForCausalLM` keeps them as separate `q_proj`, `k_proj`, `v_proj` and `gate_proj`, `up_proj`.
Grouped-query attention is imported as the same function in multi-head form (k/v rows repeated per group).
Anything that would load in transformers but compute something else is refused with an HFError naming
the field. The SentencePiece model goes along as `tokenizer.model` plus a `tokenizer.json` built here
(no protobuf or transformers needed) that encodes text to the same ids as SentencePiece.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from minifn import checkpoint
from minifn.config import ModelConfig
from minifn.files import check_output_location, fsync_dir
from minifn.hf_tokenizer import HFError, check_convertible, read_sentencepiece, tokenizer_files
from minifn.model import Params, skeleton
from minifn.tokenizer import MISTRAL, load_tokenizer, mistral_model_path, sha256_file

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
# ModelConfig fields this file maps; a field added later must be handled here before export allows it.
MAPPED_FIELDS = {"vocab_size", "embed_dim", "num_layers", "num_heads", "head_dim", "ff_dim", "max_seq_len", "bias",
                 "eps", "rope_theta", "tie_embeddings"}


# ---------------------------------------------------------------------------------------------- parameters

def name_map(config: ModelConfig) -> dict[str, list[tuple[str, int]]]:
    """minifn name -> the (HF name, rows) pieces its rows split into, in order: [q; k; v] for attn.qkv,
    [gate; value] for ff.up (as SwiGLU.forward chunks it), one piece for everything else."""
    kinds = ("weight", "bias") if config.bias else ("weight",)
    q_rows = config.num_heads * config.head_dim
    kv_rows = config.num_heads * config.head_dim  # no grouped-query attention yet: as many k/v heads as q heads
    d, f = config.embed_dim, config.ff_dim
    names = {"embed.weight": [("model.embed_tokens.weight", config.vocab_size)],
             "norm.weight": [("model.norm.weight", d)]}
    if not config.tie_embeddings:
        names["head.weight"] = [("lm_head.weight", config.vocab_size)]
    for i in range(config.num_layers):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        names[b + "attn_norm.weight"] = [(h + "input_layernorm.weight", d)]
        names[b + "ff_norm.weight"] = [(h + "post_attention_layernorm.weight", d)]
        for kind in kinds:
            names[b + f"attn.qkv.{kind}"] = [(h + f"self_attn.q_proj.{kind}", q_rows),
                                             (h + f"self_attn.k_proj.{kind}", kv_rows),
                                             (h + f"self_attn.v_proj.{kind}", kv_rows)]
            names[b + f"attn.out.{kind}"] = [(h + f"self_attn.o_proj.{kind}", d)]
            names[b + f"ff.up.{kind}"] = [(h + f"mlp.gate_proj.{kind}", f), (h + f"mlp.up_proj.{kind}", f)]
            names[b + f"ff.down.{kind}"] = [(h + f"mlp.down_proj.{kind}", d)]
    return names


def to_hf_state_dict(params: Params, config: ModelConfig) -> dict[str, Tensor]:
    """LlamaForCausalLM's tensors (on CPU, each with its own storage, as safetensors wants) from a minifn tree."""
    state = {}
    for name, pieces in name_map(config).items():
        parts = params[name].detach().to("cpu").split([rows for _, rows in pieces], dim=0)
        state.update({hf_name: part.clone() for (hf_name, _), part in zip(pieces, parts)})
    return state


def expand_kv_heads(state: dict[str, Tensor], config: ModelConfig, kv_heads: int) -> dict[str, Tensor]:
    """Grouped-query attention as plain multi-head attention: each k/v head's rows repeated for the q heads that
    share it (q head h reads k/v head h // group, as transformers' repeat_kv), so minifn computes the same."""
    group, k = config.num_heads // kv_heads, config.head_dim
    state = dict(state)
    for i in range(config.num_layers):
        for name in ("k_proj", "v_proj"):
            for kind in ("weight", "bias"):
                key = f"model.layers.{i}.self_attn.{name}.{kind}"
                if key not in state:
                    continue  # missing: refused by the caller
                if state[key].shape[0] != kv_heads * k:  # as many rows as q has would pass the caller's shape check
                    raise HFError(f"{key} has shape {tuple(state[key].shape)} but config.json implies "
                                  f"{(kv_heads * k, *state[key].shape[1:])} (num_key_value_heads={kv_heads})")
                rest = state[key].shape[1:]
                heads = state[key].reshape(kv_heads, k, *rest).repeat_interleave(group, dim=0)
                state[key] = heads.reshape(config.num_heads * k, *rest)
    return state


def from_hf_state_dict(state: dict[str, Tensor], config: ModelConfig, kv_heads: int | None = None) -> Params:
    """A minifn tree from LlamaForCausalLM's tensors (kv_heads < num_heads: expanded, see expand_kv_heads);
    missing, unknown or misshapen tensors are refused."""
    if kv_heads and kv_heads != config.num_heads:
        state = expand_kv_heads(state, config, kv_heads)
    names = name_map(config)
    wanted = {hf_name for pieces in names.values() for hf_name, _ in pieces}
    missing = sorted(wanted - set(state))
    if missing:
        raise HFError(f"the weights lack {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    ignored = set()
    if config.tie_embeddings and "lm_head.weight" in state:
        # transformers versions disagree on a tied config that also stores a head (older ones tie it to the
        # embedding, 5.x keeps it): only a copy of the embedding computes the same under both
        if not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
            raise HFError("config.json says tie_word_embeddings=true, but the weights hold an lm_head.weight that "
                          "differs from model.embed_tokens.weight; set tie_word_embeddings to false to keep the head")
        ignored = {"lm_head.weight"}
    unknown = sorted(k for k in set(state) - wanted - ignored if not k.endswith("rotary_emb.inv_freq"))
    if unknown:
        raise HFError(f"the weights hold {unknown[0]}, which a Llama model with this config.json does not have")
    params = {}
    for name, meta in skeleton(config).named_parameters():
        for hf_name, rows in names[name]:
            if tuple(state[hf_name].shape) != (rows, *meta.shape[1:]):
                raise HFError(f"{hf_name} has shape {tuple(state[hf_name].shape)} but config.json implies "
                              f"{(rows, *meta.shape[1:])}")
        params[name] = torch.cat([state[hf_name] for hf_name, _ in names[name]], dim=0)
    return params


# ---------------------------------------------------------------------------------------------- configs

def check_exportable(config: ModelConfig) -> str:
    """The HF architecture that computes exactly what minifn does for this config, or an HFError naming why none."""
    for field in dataclasses.fields(config):
        if field.name not in MAPPED_FIELDS and getattr(config, field.name) != field.default:
            raise HFError(f"{field.name}={getattr(config, field.name)!r} has no Llama equivalent to export")
    if config.embed_dim % config.num_heads == 0:
        return "LlamaForCausalLM"
    if config.bias:  # LlamaConfig insists on embed_dim % num_heads == 0, and MistralForCausalLM has no biases
        raise HFError(f"embed_dim {config.embed_dim} is not a multiple of num_heads {config.num_heads}, which "
                      "transformers' LlamaConfig refuses, and its MistralConfig has no bias=True")
    return "MistralForCausalLM"  # the same computation with sliding_window null, without Llama's divisibility check


def to_hf_config(config: ModelConfig, bos_id: int | None, eos_id: int | None, pad_id: int | None,
                 dtype: torch.dtype = torch.float32) -> dict:
    """config.json for the model (readable by transformers 4.45+ and 5.x: rope_theta in both places)."""
    architecture = check_exportable(config)
    hf = {"architectures": [architecture], "model_type": "llama" if architecture == "LlamaForCausalLM" else "mistral",
          "vocab_size": config.vocab_size, "hidden_size": config.embed_dim, "intermediate_size": config.ff_dim,
          "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
          "num_key_value_heads": config.num_heads, "head_dim": config.head_dim,
          "hidden_act": "silu", "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.eps,
          "rope_theta": config.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
          "tie_word_embeddings": config.tie_embeddings, "attention_dropout": 0.0, "initializer_range": 0.02,
          "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id, "use_cache": True,
          "torch_dtype": str(dtype).removeprefix("torch.")}
    if architecture == "LlamaForCausalLM":
        hf.update(attention_bias=config.bias, mlp_bias=config.bias)
    else:
        hf.update(sliding_window=None)
    return hf


def _refuse(field: str, value, why: str):
    raise HFError(f"config.json: {field}={json.dumps(value)} is not supported ({why})")


def from_hf_config(hf: dict, max_seq_len: int | None = None) -> ModelConfig:
    """The ModelConfig that computes what transformers computes for this config.json, or an HFError naming the field.
    max_seq_len replaces max_position_embeddings as the context (see load_pretrained)."""
    architectures = hf.get("architectures") or {"llama": ["LlamaForCausalLM"], "mistral": ["MistralForCausalLM"]}.get(
        hf.get("model_type"), [hf.get("model_type")])
    if len(architectures) != 1 or architectures[0] not in ARCHITECTURES:
        _refuse("architectures", architectures, "only " + " and ".join(ARCHITECTURES))
    mistral = architectures[0] == "MistralForCausalLM"
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if field not in hf:
            raise HFError(f"config.json lacks {field}")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window"):
        value = hf.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise HFError(f"config.json: {field}={json.dumps(value)} must be a positive whole number")
    for field in ("tie_word_embeddings", "attention_bias", "mlp_bias"):  # bool("false") would be True
        if hf.get(field) is not None and not isinstance(hf[field], bool):
            raise HFError(f"config.json: {field}={json.dumps(hf[field])} must be true or false")
    eps = hf.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
        raise HFError(f"config.json: rms_norm_eps={json.dumps(eps)} must be a positive number")
    if hf.get("hidden_act", "silu") != "silu":
        _refuse("hidden_act", hf["hidden_act"], "minifn's feed-forward is SwiGLU with silu")
    if hf.get("rope_scaling"):
        _refuse("rope_scaling", hf["rope_scaling"], "minifn has plain rotary embeddings")
    rope = hf.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        _refuse("rope_parameters", rope, "it must be an object")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default" or set(rope) - {"rope_type", "type", "rope_theta"}:
        _refuse("rope_parameters", rope, "minifn has plain rotary embeddings")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        _refuse("partial_rotary_factor", hf["partial_rotary_factor"], "minifn rotates the whole head")
    if quantization := hf.get("quantization_config"):
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
        _refuse("quantization_config", method, "the weights are quantized")
    heads, max_positions = hf["num_attention_heads"], hf.get("max_position_embeddings", 131072 if mistral else 2048)
    context = max_seq_len or max_positions  # a sliding window no shorter than this context never drops a position
    kv_heads = hf.get("num_key_value_heads") or heads
    if heads % kv_heads:
        _refuse("num_key_value_heads", kv_heads, f"it must divide num_attention_heads={heads}")
    window = hf.get("sliding_window", 4096) if mistral else None  # MistralConfig's default when absent
    if window is not None and window < context:
        _refuse("sliding_window", window, f"minifn attends to the whole context of {context}; a context of at most "
                f"{window} (--max-seq-len {window}) computes the same")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if not hf.get("head_dim") and hf["hidden_size"] % heads:
        _refuse("head_dim", None, f"hidden_size {hf['hidden_size']} is not a multiple of {heads} heads")
    bias = False if mistral else bool(hf.get("attention_bias", False))
    if not mistral and bool(hf.get("mlp_bias", False)) != bias:
        _refuse("mlp_bias", hf.get("mlp_bias", False), f"minifn's bias flag covers attention and MLP together, and "
                f"attention_bias is {json.dumps(bias)}")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        _refuse("rope_theta", theta, "it must be a positive number")
    if head_dim % 2:
        _refuse("head_dim", head_dim, "rotary embeddings rotate pairs, so a head's size must be even")
    return ModelConfig(vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                       num_heads=heads, head_dim=head_dim, ff_dim=hf["intermediate_size"], max_seq_len=context,
                       bias=bias, eps=float(eps), rope_theta=float(theta),
                       tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


# ---------------------------------------------------------------------------------------------- directories

def refuse_existing_output(output: Path) -> None:
    """Raise unless output may become the exported folder: absent or an empty folder, under a folder."""
    check_output_location(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise HFError(f"{output} already exists and is not an empty folder; choose another --output or delete it")


def write_directory(output: str | os.PathLike, files: dict[str, dict | Path | Callable[[Path], None]]) -> Path:
    """Write files (a JSON dict, a path to copy, or a function that writes the given path) into a temporary
    folder beside output, fsync them, then rename it to output: a killed export leaves no complete-looking folder."""
    output = Path(output)
    refuse_existing_output(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, content in files.items():
            if isinstance(content, Path):
                shutil.copyfile(content, tmp / name)
            elif callable(content):
                content(tmp / name)
            else:
                (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(output.parent)
    return output


def export_checkpoint(path: str | os.PathLike, output: str | os.PathLike, weights: str = "raw",
                      tokenizer: str | None = None) -> Path:
    """Write a minifn checkpoint as a transformers directory: config.json, model.safetensors (float32 as trained),
    generation_config.json and the tokenizer files. tokenizer: the model file, where the recorded one moved."""
    from safetensors.torch import save_file

    refuse_existing_output(Path(output))  # before the work, and again when the folder is written
    params, config, meta = checkpoint.load_params(path, weights=weights)
    tok = checkpoint.trained_tokenizer(meta, path, tokenizer)
    tokenizer_path = mistral_model_path() if tok.name == MISTRAL else Path(tok.name)
    spm = read_sentencepiece(tokenizer_path)
    check_convertible(spm, tokenizer_path)
    if config.vocab_size < len(spm["pieces"]):
        raise HFError(f"vocab_size {config.vocab_size} is smaller than the tokenizer's {len(spm['pieces'])} pieces")
    bos, eos, pad = (i if i >= 0 else None for i in (tok.sp.bos_id(), tok.sp.eos_id(), tok.sp.pad_id()))
    hf_config = to_hf_config(config, bos, eos, pad, next(iter(params.values())).dtype)
    state = to_hf_state_dict(params, config)
    generation = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": tok.pad_id}
    files = {"config.json": hf_config, "generation_config.json": generation,
             "model.safetensors": lambda p: save_file(state, p, metadata={"format": "pt"}),
             "tokenizer.model": tokenizer_path, **tokenizer_files(spm, bos, eos, pad, config.max_seq_len)}
    return write_directory(output, files)


def read_hf_weights(directory: Path) -> dict[str, Tensor]:
    """All tensors of model.safetensors, or of the shards model.safetensors.index.json names."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError):
            raise HFError(f"{index} has no usable weight_map") from None
    elif (directory / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise HFError(f"{directory} has neither model.safetensors nor model.safetensors.index.json "
                      "(PyTorch .bin weights are not read: loading them could run code)")
    state = {}
    for shard in shards:
        if not (directory / shard).is_file():
            raise HFError(f"{directory} lacks the shard {shard} that its index names")
        try:
            state.update(load_file(directory / shard))
        except SafetensorError as e:
            raise HFError(f"{directory / shard} is not a readable safetensors file ({e})") from None
    return state


def load_pretrained(directory: str | os.PathLike, device=None,
                    max_seq_len: int | None = None) -> tuple[Params, ModelConfig, Path]:
    """(float32 params, ModelConfig, path of tokenizer.model) from a Llama/Mistral-format directory.
    max_seq_len caps the context (default max_position_embeddings, often 32k+, which sizes generate's KV cache);
    rotary positions carry no weights, so a shorter context computes the same on every input it accepts (a Mistral
    sliding window is checked against this context: within it the window drops nothing)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise HFError(f"model folder {directory} does not exist" if not directory.exists()
                      else f"{directory} is a file; give the Hugging Face model folder that holds it")
    if not (directory / "config.json").is_file():
        raise HFError(f"{directory} has no config.json (give a Hugging Face model folder)")
    try:
        hf_config = json.loads((directory / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFError(f"{directory / 'config.json'} is not valid JSON ({e})") from None
    if not isinstance(hf_config, dict):
        raise HFError(f"{directory / 'config.json'} is not a JSON object")
    config = from_hf_config(hf_config, max_seq_len)
    tokenizer_path = (directory / "tokenizer.model").resolve()
    if not tokenizer_path.is_file():
        raise HFError(f"{directory} has no tokenizer.model; minifn needs the SentencePiece model file")
    if config.vocab_size < load_tokenizer(tokenizer_path).vocab_size:
        raise HFError(f"config.json: vocab_size {config.vocab_size} is smaller than tokenizer.model's vocabulary")
    kv_heads = hf_config.get("num_key_value_heads") or config.num_heads
    params = from_hf_state_dict(read_hf_weights(directory), config, kv_heads)
    return {name: t.to(device=device, dtype=torch.float32) for name, t in params.items()}, config, tokenizer_path


def import_directory(directory: str | os.PathLike, output: str | os.PathLike,
                     max_seq_len: int | None = None) -> tuple[Path, ModelConfig]:
    """A Llama/Mistral-format directory as a parameters-only minifn checkpoint (tokenizer by absolute path)."""
    output = Path(output)
    check_output_location(output)
    if output.exists():
        raise HFError(f"{output} already exists; choose another --output or delete it")
    params, config, tokenizer_path = load_pretrained(directory, max_seq_len=max_seq_len)
    tokenizer = {"name": str(tokenizer_path), "sha256": sha256_file(tokenizer_path), "path": str(tokenizer_path)}
    return checkpoint.save_params(output, params, config, tokenizer), config

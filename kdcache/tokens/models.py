"""Causal language models for token caches: Hugging Face `transformers` models, run as
`model(input_ids [B, L]).logits -> [B, L, V]`, where position t scores token t + 1.

Students: a GPT-2 shape by size (`lm_tiny` .. `lm_large`, LM_SIZES), or `hf:CONFIG`: a folder or
config.json whose architecture is built fresh. Teachers: `hf:DIR`, a folder written by
save_pretrained (a kdcache LM run writes one per student), or by the same call a model in the
local Hugging Face cache or on the hub for a user with network. Remote code is never run
(trust_remote_code=False): a folder's config names an architecture transformers ships.
"""
from __future__ import annotations

import json
import os

import torch.nn as nn

from kdcache import choices
from kdcache.errors import KDCacheError, closest
from kdcache.imports import require
from kdcache.modules import weights_sha256

# GPT-2 blocks by size; the vocabulary and the context come from the tokenizer and --seq-len
LM_SIZES = {
    "lm_tiny": dict(n_layer=1, n_embd=32, n_head=2),
    "lm_small": dict(n_layer=2, n_embd=64, n_head=2),
    "lm_medium": dict(n_layer=2, n_embd=128, n_head=4),
    "lm_large": dict(n_layer=4, n_embd=192, n_head=4),
}
assert tuple(LM_SIZES) == choices.LM_MODELS
META = "kdcache.json"  # beside a saved model: how kdcache made it (plain data, never code)


def _transformers():
    transformers = require("transformers", "lm", "a language model")
    transformers.utils.logging.disable_progress_bar()  # kdcache's own progress lines say how far a run is
    return transformers


def is_lm_name(name: str) -> bool:
    return name in LM_SIZES or name.startswith("hf:")


def check_lm_name(name: str) -> None:
    """An unknown size fails before any data is read; an hf: path is looked up when used."""
    if not is_lm_name(name):
        raise KDCacheError(f"unknown language model '{name}'; token caches train {', '.join(LM_SIZES)} or hf:CONFIG "
                           f"(a folder or config.json); closest: {closest(name, list(LM_SIZES))}")


def create_lm(name: str, *, vocab_size: int, seq_len: int, eos_id: int | None = None) -> nn.Module:
    """A randomly initialised causal LM over `vocab_size` tokens with a context of at least `seq_len`."""
    check_lm_name(name)
    transformers = _transformers()
    if name in LM_SIZES:
        config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=seq_len, resid_pdrop=0.0, embd_pdrop=0.0,
                                         attn_pdrop=0.0, bos_token_id=eos_id, eos_token_id=eos_id, **LM_SIZES[name])
    else:
        path = name.removeprefix("hf:")
        try:
            config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise _not_found(name, e) from None
        if getattr(config, "vocab_size", vocab_size) != vocab_size:
            raise KDCacheError(f"student {name} has a vocabulary of {config.vocab_size} tokens but the tokens here come "
                               f"from a tokenizer of {vocab_size}; set vocab_size {vocab_size} in its config")
    model = transformers.AutoModelForCausalLM.from_config(config)
    check_context(model, seq_len, f"student {name}")
    return model


def load_lm(spec: str) -> tuple[nn.Module, dict]:
    """(teacher in eval mode, info) for `hf:DIR` or a folder written by save_pretrained."""
    transformers = _transformers()
    path = spec.removeprefix("hf:")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise _not_found(spec, e) from None
    info = {"arch": spec if spec.startswith("hf:") else f"hf:{spec}", "architecture": type(model).__name__,
            "vocab_size": int(model.config.vocab_size), "context": context(model),
            "weights_sha256": weights_sha256(model)}
    return model.eval(), info


def context(model: nn.Module) -> int | None:
    """The longest sequence the model's positions cover (None: no fixed limit, e.g. rotary models without one)."""
    config = model.config
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return None


def check_context(model: nn.Module, seq_len: int, what: str) -> None:
    limit = context(model)
    if limit is not None and seq_len > limit:
        raise KDCacheError(f"--seq-len {seq_len} is longer than {what}'s context of {limit} positions; "
                           f"pass --seq-len {limit} or less")


def save_lm(model: nn.Module, folder: str, *, tokenizer, meta: dict) -> None:
    """The model (safetensors), its tokenizer.json and kdcache.json: a folder `hf:FOLDER` loads as a
    teacher, and transformers' own from_pretrained loads as it is."""
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save(folder)
    tmp = os.path.join(folder, META + ".partial")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(folder, META))  # last: a folder with kdcache.json is a finished student


def read_meta(folder: str) -> dict | None:
    path = os.path.join(folder, META)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def count_parameters(model: nn.Module) -> int:
    """Parameters once each: GPT-2 ties its output layer to the token embedding."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _not_found(name: str, error: Exception) -> KDCacheError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return KDCacheError(f"{name}: no such language model here ({first}); give a folder written by save_pretrained "
                        "(a kdcache LM run writes OUT/<student>/), a config.json, or a model in the local Hugging "
                        "Face cache")

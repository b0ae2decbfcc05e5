"""The hostile-input cases' common parts: `Case` and its registry, the base model, and `Ctx` (what a case
gets in the worker process: the base files, a scratch directory, the loaded base model and an engine)."""
from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import gguf_writer as W

GOOD_PROMPT = "The capital of France is"
GOOD_NEW_TOKENS = 4


@dataclass(frozen=True)
class Case:
    name: str
    group: str                                   # the worker batch that runs it
    run: Callable[["Ctx"], Any]
    error: str | None                            # expected exception class name (or a base of it); None: success
    names: tuple[str, ...] = ()                  # substrings of the message ("{path}": the file the case wrote)
    check: Callable[[Any], str | None] | None = None  # for a success: a problem with the result, or None


CASES: list[Case] = []


def case(group: str, name: str, error: str | None, *names: str, check=None):
    def register(fn):
        CASES.append(Case(name, group, fn, error, names, check))
        return fn
    return register


# ---------------------------------------------------------------------------------------------------------
# The base model, built once by the test process.

def vocab_parts(vocab_size: int = W.TINY["vocab"]) -> dict:
    """tokens, token types and merges of tests/checkpoints.py's tiny byte-level BPE, as a GGUF holds them."""
    from checkpoints import SPECIAL_TOKENS, tiny_tokenizer

    tok = tiny_tokenizer(vocab_size)
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    special = set(SPECIAL_TOKENS) | {t for t in tokens if t.startswith("<|reserved_")}
    merges = [" ".join(m) if isinstance(m, list) else m for m in json.loads(tok.to_str())["model"]["merges"]]
    return {"tokens": tokens, "types": [3 if t in special else 1 for t in tokens], "merges": merges,
            "tokenizer_json": tok.to_str()}


def base_spec(parts: dict) -> W.GGUFSpec:
    from checkpoints import CHATML_TEMPLATE

    return W.tiny_llama_spec(tokens=parts["tokens"], token_types=parts["types"], merges=parts["merges"],
                             chat_template=CHATML_TEMPLATE)


def build_base(base: str) -> None:
    """base/vocab.json, base/base.gguf, base/hf/ (a valid Hugging Face directory of the same shapes)."""
    from safetensors.numpy import save_file

    from checkpoints import BOS_ID, CHATML_TEMPLATE, EOS_ID, SPECIAL_TOKENS

    os.makedirs(base, exist_ok=True)
    parts = vocab_parts()
    with open(os.path.join(base, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(parts, f)
    with open(os.path.join(base, "base.gguf"), "wb") as f:
        f.write(base_spec(parts).to_bytes())
    t = W.TINY
    hf = os.path.join(base, "hf")
    os.makedirs(hf, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": t["vocab"],
              "hidden_size": t["hidden"], "intermediate_size": t["intermediate"], "num_hidden_layers": t["layers"],
              "num_attention_heads": t["heads"], "num_key_value_heads": t["kv_heads"],
              "max_position_embeddings": t["context"], "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
              "torch_dtype": "float32", "hidden_act": "silu"}
    _dump(os.path.join(hf, "config.json"), config)
    _dump(os.path.join(hf, "generation_config.json"), {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID]})
    with open(os.path.join(hf, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(parts["tokenizer_json"])
    _dump(os.path.join(hf, "tokenizer_config.json"), {
        "add_bos_token": True, "add_eos_token": False, "bos_token": SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[EOS_ID], "chat_template": CHATML_TEMPLATE})
    rng = np.random.default_rng(1)
    h, i, v, hd = t["hidden"], t["intermediate"], t["vocab"], t["hidden"] // t["heads"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(t["layers"]):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (t["heads"] * hd, h),
                       p + "self_attn.k_proj.weight": (t["kv_heads"] * hd, h),
                       p + "self_attn.v_proj.weight": (t["kv_heads"] * hd, h),
                       p + "self_attn.o_proj.weight": (h, t["heads"] * hd), p + "mlp.gate_proj.weight": (i, h),
                       p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i)})
    save_file({k: (rng.standard_normal(s) * 0.2).astype(np.float32) for k, s in shapes.items()},
              os.path.join(hf, "model.safetensors"))


def _dump(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


# ---------------------------------------------------------------------------------------------------------
# What a case gets in the worker.

@dataclass
class Ctx:
    base: str
    tmp: str
    parts: dict
    spec0: W.GGUFSpec
    loaded: Any = None            # the valid GGUF, loaded (fp32, CPU)
    engine: Any = None            # an engine over it: serves the good request after every case
    path: str | None = None       # the file the current case wrote
    counter: int = 0
    extra: dict = field(default_factory=dict)

    def spec(self) -> W.GGUFSpec:
        return copy.deepcopy(self.spec0)

    def file(self, name: str, data: bytes | str) -> str:
        self.counter += 1
        path = os.path.join(self.tmp, f"{self.counter:03d}-{name}")
        with open(path, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        self.path = path
        return path

    def gguf(self, spec_or_bytes, name: str = "m.gguf") -> str:
        data = spec_or_bytes if isinstance(spec_or_bytes, (bytes, bytearray)) else spec_or_bytes.to_bytes()
        return self.file(name, bytes(data))

    def hf(self, edit: dict[str, Any] | None = None, drop: tuple[str, ...] = ()) -> str:
        """A copy of the base Hugging Face directory with files replaced: {name: bytes | str | JSON value}.
        self.path becomes the (last) edited file."""
        self.counter += 1
        path = os.path.join(self.tmp, f"{self.counter:03d}-hf")
        shutil.copytree(os.path.join(self.base, "hf"), path)
        self.path = path
        for name in drop:
            os.remove(os.path.join(path, name))
        for name, content in (edit or {}).items():
            target = os.path.join(path, name)
            if isinstance(content, bytes):
                data = content
            elif isinstance(content, str):
                data = content.encode("utf-8")
            else:
                data = json.dumps(content).encode("utf-8")
            with open(target, "wb") as f:
                f.write(data)
            self.path = target
        return path

    def config(self, **changes) -> str:
        """The base directory with config.json keys changed (a value of DROP removes the key)."""
        with open(os.path.join(self.base, "hf", "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        for key, value in changes.items():
            if value is DROP:
                config.pop(key, None)
            else:
                config[key] = value
        return self.hf({"config.json": config})

    def tokenizer_config(self, **changes) -> str:
        with open(os.path.join(self.base, "hf", "tokenizer_config.json"), encoding="utf-8") as f:
            config = json.load(f)
        config.update(changes)
        return self.hf({"tokenizer_config.json": config})

    def load(self, path: str):
        import torch

        from trinfer.runtime.loader import load_model_files

        return load_model_files(path, device="cpu", dtype=torch.float32, progress=False)

    def templated(self, template: Any):
        """A tokenizer of the base model with `template` as its chat template (origin "test template")."""
        from trinfer.runtime.tokenizer import Tokenizer

        tok = self.loaded.tokenizer
        return Tokenizer(tok.backend, bos_token_id=tok.bos_token_id, eos_token_ids=tok.eos_token_ids,
                         add_bos_token=tok.add_bos_token, chat_template=template, chat_template_origin="test template")

    def render(self, template: str) -> str:
        return self.templated(template).apply_chat_template([{"role": "user", "content": "hi"}])

    def new_engine(self, model=None, **kwargs):
        """An engine over `model` (default: the base model): torch backend, 64 KV blocks of 16, 4 sequences."""
        from trinfer.runtime import Engine

        kw = dict(device="cpu", backend="torch", num_kv_blocks=64, max_num_seqs=4)
        kw.update(kwargs)
        return Engine(model if model is not None else self.loaded, **kw)


DROP = object()

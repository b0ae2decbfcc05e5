"""Load a checkpoint: config, weights under trinfer's canonical names (q/k/v and gate/up fused), tokenizer.

    loaded = load_model_files("path/to/hf_dir_or.gguf", device="cuda", dtype=torch.bfloat16)
    loaded.config, loaded.weights["layers.0.qkv_proj"], loaded.tokenizer.encode("hi")

Sources: a Hugging Face directory (config.json, model.safetensors or shards listed in
model.safetensors.index.json, tokenizer.json, tokenizer_config.json, generation_config.json), or a .gguf
file of the `llama` or `qwen3` architecture (or a directory holding exactly one). Only safetensors and GGUF are read:
never pickle, never remote code.

Canonical weights (V vocab, H hidden, I intermediate, nq/nkv heads, hd head_dim):
    embed_tokens [V, H]   norm [H]   lm_head [V, H] (only when the embeddings are untied)
    layers.{i}.input_norm [H]           layers.{i}.post_attn_norm [H]
    layers.{i}.qkv_proj [(nq+2*nkv)*hd, H]   rows q, then k, then v
    layers.{i}.qkv_bias [(nq+2*nkv)*hd]      only when config.qkv_bias
    layers.{i}.q_norm [hd]  layers.{i}.k_norm [hd]   only when config.qk_norm (per-head RMSNorm weights)
    layers.{i}.o_proj [H, nq*hd]
    layers.{i}.gate_up_proj [2*I, H]         rows gate, then up
    layers.{i}.down_proj [H, I]
Weights stream one tensor at a time from the files into their (preallocated) place on the device, so the
host never holds the checkpoint twice. A matrix may instead be a `QuantizedWeight` (GGUF Q8_0/Q4_0/Q4_1 blocks,
AWQ/GPTQ layers, `quantize=`; see quantization.py): same name and shape, fused the same way. Files are
checked before anything is allocated from what they declare (every safetensors header, the layer count
against the tensors present: `check_layer_count`), and every problem is a ModelFileError naming the file
and the field or tensor. With `tensor_parallel=(rank, world_size)` only that rank's slices are read
(distributed.ShardSpec: safetensors' `get_slice`, GGUF's rows or the blocks covering its columns), never a
whole sharded tensor.
"""
from __future__ import annotations

import os
import re
import stat
import sys
from dataclasses import dataclass, replace
from typing import Iterator

import torch

from . import quantization as Q
from .config import ModelConfig
from .distributed import ShardSpec
from .fields import ModelFileError, read_json_object, short_repr
from .tokenizer import Tokenizer

__all__ = ["LoadedModel", "load_model_files", "WeightAssembler", "expected_weight_shapes", "check_layer_count",
           "ModelFileError"]

_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    source: str  # "safetensors" or "gguf"
    shard: ShardSpec | None = None  # tensor parallelism: `weights` hold this rank's slices only (config: the full model)


def load_model_files(
    path: str | os.PathLike,
    *,
    device: str | torch.device,
    dtype: torch.dtype,
    progress: bool = True,
    quantize: str | None = None,
    keep_quantized: bool | None = None,
    tensor_parallel: tuple[int, int] | None = None,
) -> LoadedModel:
    """Load config, weights (converted to `dtype` on `device`) and tokenizer from `path`.

    progress: show a tqdm bar on stderr when loading takes more than a second.
    quantize: "int8" / "int4" quantizes the dense q/k/v, o, gate/up and down matrices at load
        (`quantization.quantize_weight`); None loads them as they are.
    keep_quantized: quantized weights (GGUF Q8_0/Q4_0/Q4_1 tensors, AWQ/GPTQ layers, `quantize`) stay
        `QuantizedWeight`s, for the Triton kernels; False decodes them to `dtype` (the `torch` backend).
        Default: True on CUDA.
    tensor_parallel: (rank, world_size): load only that rank's slices (`LoadedModel.shard` says which); a
        ValueError naming tensor_parallel_size when the model does not split that way.
    `path` may also be a `random_model.RandomCheckpoint` (random weights of a named shape, made on the device).
    Raises FileNotFoundError for a missing file, ModelFileError (a ValueError naming the file and the field
    or tensor) for anything malformed or unsupported, ValueError for a bad argument.
    """
    if dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"dtype: expected float32/float16/bfloat16, got {dtype!r}")
    Q.check_quantize(quantize)
    device = torch.device(device)
    keep = device.type == "cuda" if keep_quantized is None else bool(keep_quantized)
    from .random_model import RandomCheckpoint  # noqa: PLC0415  (random_model imports this module)

    if isinstance(path, RandomCheckpoint):
        return _quantized_as_asked(path.load(device=device, dtype=dtype, tensor_parallel=tensor_parallel), quantize,
                                   keep, dtype)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist")
    gguf_file = _gguf_in(path)
    if gguf_file is not None:
        from .loader_gguf import load_gguf  # the gguf package is only needed here

        return _quantized_as_asked(load_gguf(gguf_file, device=device, dtype=dtype, progress=progress,
                                             keep_quantized=keep, tensor_parallel=tensor_parallel), quantize, keep,
                                   dtype)
    return _quantized_as_asked(_load_hf_dir(path, device=device, dtype=dtype, progress=progress,
                                            tensor_parallel=tensor_parallel), quantize, keep, dtype)


def _quantized_as_asked(loaded: LoadedModel, quantize: str | None, keep: bool, dtype: torch.dtype) -> LoadedModel:
    """`quantize` applied, then every quantized weight decoded unless `keep` (see load_model_files)."""
    Q.quantize_weights(loaded.weights, quantize)
    if not keep:
        Q.dequantize_weights(loaded.weights, dtype)
    return loaded


def _file_kind(path: str) -> str:
    """"file", "dir", or what else `path` is (a device, a pipe...), without opening it."""
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    return ("character device" if stat.S_ISCHR(mode) else "block device" if stat.S_ISBLK(mode)
            else "named pipe" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "special file")


def _gguf_in(path: str) -> str | None:
    """The GGUF file `path` names (a file, or a directory with exactly one .gguf file), else None."""
    kind = _file_kind(path)
    if kind == "file":
        if path.endswith(".gguf"):
            return path
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return path
        hint = " (pass the directory that holds it and its config.json)" if path.endswith(".safetensors") else ""
        raise ModelFileError(path, None, "expected a Hugging Face model directory or a .gguf file (got a file that "
                             f"is neither){hint}")
    if kind != "dir":
        raise ModelFileError(path, None, f"expected a Hugging Face model directory or a .gguf file, got a {kind}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return None
    ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf") and os.path.isfile(os.path.join(path, f)))
    if len(ggufs) == 1:
        return os.path.join(path, ggufs[0])
    if len(ggufs) > 1:
        raise ModelFileError(path, None, f"holds {len(ggufs)} .gguf files ({', '.join(ggufs)}); pass the one to load")
    raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model directory) and no .gguf file")


# ---------------------------------------------------------------------- assembling canonical weights


def expected_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical weight name of `config` and its shape."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    qkv = config.q_size + 2 * config.kv_size
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens": (v, h), "norm": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (v, h)
    for n in range(config.num_layers):
        p = f"layers.{n}."
        shapes[p + "input_norm"] = (h,)
        shapes[p + "qkv_proj"] = (qkv, h)
        if config.qkv_bias:
            shapes[p + "qkv_bias"] = (qkv,)
        if config.qk_norm:
            shapes[p + "q_norm"] = shapes[p + "k_norm"] = (config.head_dim,)
        shapes[p + "o_proj"] = (h, config.q_size)
        shapes[p + "post_attn_norm"] = (h,)
        shapes[p + "gate_up_proj"] = (2 * i, h)
        shapes[p + "down_proj"] = (h, i)
    return shapes


def check_layer_count(config: ModelConfig, layers_present: set[int], *, source: str, key: str) -> None:
    """Refuse a config whose layer count disagrees with the checkpoint's tensors, before anything is
    allocated per layer (a declared count of 10**9 must not build 10**9 of anything).

    layers_present: the layer indices that have at least one tensor in the checkpoint.
    """
    found = max(layers_present) + 1 if layers_present else 0
    if config.num_layers > found:
        raise ModelFileError(source, key, f"declares {config.num_layers} layers, but the checkpoint has tensors for "
                             f"{found} (layers 0..{found - 1})" if found else
                             f"declares {config.num_layers} layers, but the checkpoint has no layer tensors")


def _part_rows(config: ModelConfig, part: str) -> tuple[int, int]:
    """Row range of a fused part: q/k/v in qkv_proj (and qkv_bias), gate/up in gate_up_proj."""
    q, kv, i = config.q_size, config.kv_size, config.intermediate_size
    return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv), "gate": (0, i), "up": (i, 2 * i)}[part]


class WeightAssembler:
    """Collects checkpoint tensors one at a time into preallocated canonical tensors on the device.

    put(name, part, tensor, source) copies `tensor` (any dtype, on the host) into canonical weight `name`,
    whole (part=None) or as its q/k/v/gate/up rows; finish() checks every weight was fully written.
    `source` (the checkpoint's own tensor name, quoted, and where it is) is what error messages name, after
    `checkpoint` (the file or directory): errors are ModelFileErrors.
    """

    def __init__(self, config: ModelConfig, *, device: torch.device, dtype: torch.dtype,
                 checkpoint: str = "the checkpoint") -> None:
        self.config = config
        self.checkpoint = checkpoint  # the file or directory, for error messages
        self.device = device
        self.dtype = dtype
        self._shapes = expected_weight_shapes(config)
        self._weights: dict[str, torch.Tensor] = {}
        self._written: dict[str, dict[str | None, str]] = {}  # name -> part -> source
        self._quantized: dict[str, list] = {}  # name -> [(row_lo, row_hi, QuantizedWeight)], fused in finish()

    def check(self, name: str, part: str | None, shape: tuple[int, ...], source: str) -> None:
        """Refuse a tensor that is not weight `name` (`part`) of this config, before its data is read."""
        if name not in self._shapes:
            raise ModelFileError(self.checkpoint, None, f"unexpected tensor {source}: this "
                                 f"{self.config.architecture} config has no weight {name!r}")
        full = self._shapes[name]
        if part is None:
            want = full
        else:
            lo, hi = _part_rows(self.config, part)
            want = (hi - lo, *full[1:])
        if tuple(shape) != want:
            raise ModelFileError(self.checkpoint, None, f"tensor {source}: expected shape {list(want)} (from the "
                                 f"model config), got {list(shape)}")

    def put(self, name: str, part: str | None, tensor: torch.Tensor, source: str) -> None:
        self.check(name, part, tuple(tensor.shape), source)
        full = self._shapes[name]
        if isinstance(tensor, Q.QuantizedWeight):
            self._record(name, part, source)
            lo, hi = (0, full[0]) if part is None else _part_rows(self.config, part)
            self._quantized.setdefault(name, []).append((lo, hi, tensor.to(self.device)))
            return
        if not tensor.is_floating_point():
            raise ModelFileError(self.checkpoint, None, f"tensor {source}: expected a floating-point tensor, got "
                                 f"{tensor.dtype}")
        self._record(name, part, source)
        dest = self._weights.get(name)
        if dest is None:
            dest = self._weights[name] = torch.empty(full, dtype=self.dtype, device=self.device)
        if part is not None:
            lo, hi = _part_rows(self.config, part)
            dest = dest[lo:hi]
        dest.copy_(tensor)

    def _record(self, name: str, part: str | None, source: str) -> None:
        parts = self._written.setdefault(name, {})
        if part in parts:
            raise ModelFileError(self.checkpoint, None, f"tensor {source}: given twice (also as {parts[part]})")
        parts[part] = source

    def finish(self, source_name_of: dict[tuple[str, str | None], str]) -> dict[str, torch.Tensor]:
        """The canonical weights; raise naming the first checkpoint tensor that never came.

        source_name_of maps (canonical name, part) to the checkpoint's tensor name, for the error message.
        """
        for name in self._shapes:
            if name.endswith(("qkv_proj", "qkv_bias")):
                parts: tuple[str | None, ...] = ("q", "k", "v")
            elif name.endswith("gate_up_proj"):
                parts = ("gate", "up")
            else:
                parts = (None,)
            for part in parts:
                if part not in self._written.get(name, {}):
                    raise ModelFileError(self.checkpoint, None, f"missing tensor "
                                         f"{source_name_of.get((name, part), name)!r} in the checkpoint")
        for name, parts in self._quantized.items():  # quantized parts: stacked, or decoded next to dense ones
            self._weights[name] = Q.assemble_fused(parts, self._weights.get(name), self._shapes[name], self.dtype,
                                                   self.device)
        return self._weights


class _NoProgress:
    """What `_progress` gives when disabled: no tqdm object at all (a disabled tqdm still makes a
    multiprocessing lock, which a tensor-parallel rank would leave behind when it exits)."""

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, delay=1.0, disable=not enabled,
                leave=False, dynamic_ncols=True)


# ---------------------------------------------------------------------- Hugging Face directories

_HF_LAYER = re.compile(r"model\.layers\.(\d{1,9})\.(.+)")  # at most 9 digits: int() stays cheap
_HF_LAYER_NAMES = {
    "input_layernorm.weight": ("input_norm", None),
    "post_attention_layernorm.weight": ("post_attn_norm", None),
    "self_attn.q_proj.weight": ("qkv_proj", "q"),
    "self_attn.k_proj.weight": ("qkv_proj", "k"),
    "self_attn.v_proj.weight": ("qkv_proj", "v"),
    "self_attn.q_proj.bias": ("qkv_bias", "q"),
    "self_attn.k_proj.bias": ("qkv_bias", "k"),
    "self_attn.v_proj.bias": ("qkv_bias", "v"),
    "self_attn.q_norm.weight": ("q_norm", None),
    "self_attn.k_norm.weight": ("k_norm", None),
    "self_attn.o_proj.weight": ("o_proj", None),
    "mlp.gate_proj.weight": ("gate_up_proj", "gate"),
    "mlp.up_proj.weight": ("gate_up_proj", "up"),
    "mlp.down_proj.weight": ("down_proj", None),
}
_HF_TOP_NAMES = {
    "model.embed_tokens.weight": ("embed_tokens", None),
    "model.norm.weight": ("norm", None),
    "lm_head.weight": ("lm_head", None),
}


def hf_canonical_name(hf_name: str, config: ModelConfig, checkpoint: str = "checkpoint") -> tuple[str, str | None] | None:
    """(canonical name, part) of a Hugging Face tensor name; None for tensors that carry no weights."""
    if hf_name in _HF_TOP_NAMES:
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            return None  # some tied checkpoints also store the (identical) head
        return _HF_TOP_NAMES[hf_name]
    match = _HF_LAYER.fullmatch(hf_name)
    if match is not None:
        layer, rest = int(match.group(1)), match.group(2)
        if rest == "self_attn.rotary_emb.inv_freq":
            return None  # a buffer older transformers saved; recomputed from the config
        if rest in _HF_LAYER_NAMES and layer < config.num_layers:
            name, part = _HF_LAYER_NAMES[rest]
            return f"layers.{layer}.{name}", part
    raise ModelFileError(checkpoint, None, f"unexpected tensor {short_repr(hf_name)} in the checkpoint (not part of "
                         f"a {config.architecture} with {config.num_layers} layers and the options in config.json)")


def _hf_source_names(config: ModelConfig) -> dict[tuple[str, str | None], str]:
    names = {canon: hf for hf, canon in _HF_TOP_NAMES.items()}
    for n in range(config.num_layers):
        for rest, (name, part) in _HF_LAYER_NAMES.items():
            names[(f"layers.{n}.{name}", part)] = f"model.layers.{n}.{rest}"
    return names


def safetensors_files(path: str) -> list[str]:
    """The safetensors files of a Hugging Face directory, in load order; checks that every shard exists."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFileError(index, "weight_map", f"expected a non-empty object (tensor name -> shard file), "
                                 f"got {short_repr(weight_map)}")
        files = []
        for name, shard in weight_map.items():
            if not isinstance(shard, str):
                raise ModelFileError(index, f"weight_map[{short_repr(name)}]",
                                     f"expected a shard file name (a string), got {short_repr(shard)}")
        for shard in dict.fromkeys(weight_map.values()):
            if os.path.basename(shard) != shard or "\0" in shard or not shard.endswith(".safetensors"):
                raise ModelFileError(index, "weight_map", f"shard name {short_repr(shard)} is not a .safetensors "
                                     "file in the directory")
            file = os.path.join(path, shard)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{path}: missing shard {shard!r} listed in model.safetensors.index.json")
            files.append(file)
        return files
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if len(found) == 1:
        return [os.path.join(path, found[0])]
    if not found:
        bins = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth")))
        hint = f" (found {', '.join(bins)}: pickle checkpoints are not loaded, for safety)" if bins else ""
        raise FileNotFoundError(f"{path}: no model.safetensors{hint}")
    raise ModelFileError(path, None, f"{len(found)} .safetensors files but no model.safetensors.index.json")


def _open_safetensors(file: str):
    from safetensors import safe_open

    size = os.path.getsize(file)
    if size < 8:
        raise ModelFileError(file, None, f"truncated safetensors file ({size} bytes; the header length alone is 8)")
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    if header_len > size - 8:
        raise ModelFileError(file, None, f"truncated or corrupted safetensors header (declares {header_len} header "
                             f"bytes, the file has {size - 8} after the length)")
    try:
        return safe_open(file, framework="pt", device="cpu")
    except Exception as exc:  # SafetensorError is not importable under one name across versions
        raise ModelFileError(file, None, f"not a valid safetensors file ({_one_line(exc)})") from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _iter_safetensors(files: list[str], select=None) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(file, key, tensor) of every tensor; `select(key)` -> an index (a tuple of slices) reads only that slice
    (`get_slice`: the rest of the tensor is never read), None the whole tensor."""
    for file in files:
        with _open_safetensors(file) as f:
            for key in f.keys():
                index = None if select is None else select(key)
                try:
                    tensor = f.get_tensor(key) if index is None else f.get_slice(key)[index]
                except Exception as exc:
                    raise ModelFileError(file, repr(key), f"cannot read the tensor ({_one_line(exc)}); the file "
                                         "may be truncated") from exc
                yield file, key, tensor


def _load_hf_dir(path: str, *, device: torch.device, dtype: torch.dtype, progress: bool,
                 tensor_parallel: tuple[int, int] | None = None) -> LoadedModel:
    config_file = os.path.join(path, "config.json")
    raw = read_json_object(config_file, "config.json")
    qspec = None
    if raw.get("quantization_config") is not None:  # AWQ/GPTQ: their layers load as QuantizedWeights
        from .quantization_hf import HFQuantizedTensors, parse_quantization_config

        raw = dict(raw)
        try:
            qspec = parse_quantization_config(raw.pop("quantization_config"))
        except ValueError as exc:
            raise ModelFileError(config_file, None, str(exc)) from None
    gen_file = os.path.join(path, "generation_config.json")
    generation = read_json_object(gen_file) if os.path.isfile(gen_file) else None
    config = ModelConfig.from_hf(raw, generation, source=config_file, generation_source=gen_file)

    files = safetensors_files(path)
    counts, layers = [], set()
    for file in files:  # validate every header before allocating anything
        with _open_safetensors(file) as f:
            keys = list(f.keys())
        counts.append(len(keys))
        layers.update(int(m.group(1)) for m in map(_HF_LAYER.fullmatch, keys) if m is not None)
    check_layer_count(config, layers, source=config_file, key="num_hidden_layers")
    tokenizer = Tokenizer.from_hf_dir(path, eos_token_ids=config.eos_token_ids)
    config = _with_tokenizer_eos(config, tokenizer)
    shard = None if tensor_parallel is None else ShardSpec.of(config, *tensor_parallel)
    select = None
    if shard is not None:  # this rank's slice of each tensor (None: replicated, read whole)
        if qspec is not None:
            raise ValueError(f"tensor_parallel_size: {path}: AWQ/GPTQ checkpoints are not sharded (their packed "
                             f"layers are not cut by rows and columns yet); run them on one GPU")

        def select(key):
            target = hf_canonical_name(key, config, path)
            return None if target is None else shard.index(*target)

    assembler = WeightAssembler(config if shard is None else shard.local_config(config), device=device, dtype=dtype,
                                checkpoint=path)
    held = None if qspec is None else HFQuantizedTensors(qspec, qkv_bias=config.qkv_bias)
    with _progress(sum(counts), f"loading {os.path.basename(os.path.abspath(path))}", progress) as bar:
        for file, key, tensor in _iter_safetensors(files, select):
            source = f"{key!r} in {os.path.basename(file)}"
            for name, t in [(key, tensor)] if held is None else held.feed(key, tensor, source):
                target = hf_canonical_name(name, config, path)
                if target is not None:
                    assembler.put(target[0], target[1], t, source)
            del tensor
            bar.update(1)
        for key, weight, source in () if held is None else held.weights():
            target = hf_canonical_name(key, config, path)
            if target is not None:
                assembler.put(target[0], target[1], weight, source)
    weights = assembler.finish(_hf_source_names(config))
    return LoadedModel(config=config, weights=weights, tokenizer=tokenizer, source="safetensors", shard=shard)


def _with_tokenizer_eos(config: ModelConfig, tokenizer: Tokenizer) -> ModelConfig:
    """The config with the tokenizer's eos ids added, so config and tokenizer agree on what ends a sequence."""
    extra = tuple(t for t in tokenizer.eos_token_ids if t not in config.eos_token_ids and t < config.vocab_size)
    if config.bos_token_id is None and tokenizer.bos_token_id is not None and tokenizer.bos_token_id < config.vocab_size:
        config = replace(config, bos_token_id=tokenizer.bos_token_id)
    return replace(config, eos_token_ids=config.eos_token_ids + extra) if extra else config

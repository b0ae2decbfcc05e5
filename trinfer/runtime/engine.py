"""The engine: requests in, greedily decoded tokens and text out, one `step()` at a time.

A step is schedule -> run -> postprocess:
    schedule     the scheduler fills the step's token budget: every running stream's next token (decode; with
                 speculative decoding, and the tokens proposed after it), then chunks of prompts part-way through,
                 then new prompts from their longest cached prefix
    run          the model runner runs the chunks (one prefill pass) and the decode batch (one decode pass, or one
                 verify pass when tokens were proposed); each sequence whose run reached its last token gets one
                 token (a verify pass: its accepted proposals and one more)
    postprocess  publish the blocks whose K/V is now written (prefix cache), append tokens, detokenize
                 incrementally, check the stops, release finished sequences' blocks

Decode runs one step ahead (`async_decode`, on by default): step k+1 is launched (its input ids are step k's
argmax, still on the device; on CUDA a graph replay) before step k's tokens are read back, so the host's
postprocessing overlaps the device's next step. See `Engine.step` for when the pipeline drains.

Everything an engine uses hangs off the instance (no module-level state): two engines in one process are
independent. Bad requests are refused by `add_request` with a ValueError/TypeError before anything changes,
so the engine keeps serving the others.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import time
import weakref
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch

from trinfer.triton_kernels.kv_cache_layout import check_block_size

from . import tp_worker
from .block_manager import BlockManager, blocks_needed, check_enable_prefix_caching
from .distributed import DEFAULT_TIMEOUT_S, start_tensor_parallel, tensor_parallel_requested
from .kv_cache import choose_num_blocks
from .memory_plan import plan_memory
from .model import check_cuda_kernels_available, get_backend, parse_backend
from .model_runner import ModelRunner, PendingDecode
from .prefix_cache import PrefixCacheStats
from .quantization import check_quantize, quantize_weights
from .sampling_params import SamplingParams
from .scheduler import DEFAULT_MAX_NUM_BATCHED_TOKENS, Scheduler
from .sequence import FinishReason, Sequence
from .spec import SpecDecodeStats, Speculator, num_accepted, parse_speculative
from .tokenizer import validate_text

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected 'cpu' or 'cuda[:N]', got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {dev} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ValueError(f"device: expected 'cpu' or 'cuda[:N]', got {device!r}")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Default: bf16 on CUDA, fp32 on the CPU."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype: expected one of auto, float32, bfloat16, float16, got {dtype!r}")


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The canonical name of a backend choice (`model.parse_backend`: "triton", "torch", "cuda",
    "cuda:FAMILY[+FAMILY...]"), refused here, before any loading, when it cannot run on `device`.

    Default: triton on CUDA, torch on the CPU. Triton on the CPU needs the (slow) interpreter. The CUDA C++
    kernels need their built library (the error gives `trinfer.cuda_kernels.unavailable_reason()`) and a
    CUDA device.
    """
    if backend is None:
        return "triton" if device.type == "cuda" else "torch"
    backend, cuda_families = parse_backend(backend)
    if cuda_families:
        check_cuda_kernels_available(backend)
        if device.type != "cuda":
            raise ValueError(f"backend: {backend!r} runs CUDA C++ kernels, which need a CUDA device, got device "
                             f"{device}")
    if backend == "triton" and device.type == "cpu":
        from trinfer.triton_kernels._utils import interpreting

        if not interpreting():
            raise ValueError("backend: 'triton' on the CPU runs only under the Triton interpreter "
                             "(TRITON_INTERPRET=1 set before trinfer is imported; very slow); use backend='torch'")
    return backend


# Chat-template variables the engine sets itself; a request's chat_template_kwargs may not name them.
RESERVED_TEMPLATE_VARIABLES = ("messages", "add_generation_prompt", "bos_token", "eos_token")


def _chat_template_kwargs(kwargs: Any, chat: bool) -> dict[str, Any]:
    """A request's extra chat-template variables, checked: a dict of names, none reserved; {} for None."""
    if kwargs is None:
        return {}
    if not chat:
        raise ValueError("chat_template_kwargs: given without chat=True (they are variables of the chat template, "
                         "which only chat requests render)")
    if not isinstance(kwargs, dict):
        raise TypeError(f"chat_template_kwargs: expected a dict of template variables, e.g. "
                        f"{{'enable_thinking': False}}, got {type(kwargs).__name__}")
    for key in kwargs:
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"chat_template_kwargs: expected variable names (identifiers) as keys, got {key!r}")
        if key in RESERVED_TEMPLATE_VARIABLES:
            raise ValueError(f"chat_template_kwargs: {key!r} is set by the engine itself (reserved: "
                             f"{', '.join(RESERVED_TEMPLATE_VARIABLES)})")
    return dict(kwargs)


@dataclass(frozen=True, slots=True)
class RequestTimings:
    """Seconds, from `time.perf_counter()`. `token_latencies[i]` is the wait for output token i: the time
    to first token for i = 0, then the gap since the previous token."""

    arrival_time: float
    token_times: tuple[float, ...]

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival_time if self.token_times else None

    @property
    def token_latencies(self) -> list[float]:
        prev = (self.arrival_time,) + self.token_times[:-1]
        return [t - p for t, p in zip(self.token_times, prev)]

    @property
    def e2e(self) -> float | None:
        return self.token_times[-1] - self.arrival_time if self.token_times else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Output tokens after the first, per second of decoding."""
        if len(self.token_times) < 2 or self.token_times[-1] == self.token_times[0]:
            return None
        return (len(self.token_times) - 1) / (self.token_times[-1] - self.token_times[0])


class RequestOutput:
    """A request's state as of the step that returned it, with what is new since the previous one.

    token_ids / logprobs: generated tokens (an EOS token included) and the log-probability of each.
    text: decoded text of those tokens; while unfinished it can lag by a few characters when stop strings
        are set (held back until they cannot begin a stop string); once stopped it ends before the stop string.
    delta_text / delta_token_ids: what this output adds to the previous one (for streaming).
    finish_reason: None while running, else "eos" | "length" | "stop" | "context" | "abort".
    num_cached_tokens: prompt tokens whose K/V came from the prefix cache when the request was admitted (not
        computed again: time to first token saved); 0 without a hit or before admission.
    spec_stats: speculative decoding (`Engine(speculative=...)`): this request's verify steps, proposed and
        accepted tokens so far (`spec.SpecDecodeStats`: acceptance_rate, mean_accepted_length); None without it.
        With speculation a delta may carry several tokens (an accepted run), all of one step.
    """

    __slots__ = ("_seq", "_n_tokens", "_n_text", "request_id", "finish_reason", "delta_text", "delta_token_ids",
                 "num_preemptions", "num_cached_tokens", "spec_stats")

    def __init__(self, seq: Sequence, delta_text: str, delta_token_ids: list[int]):
        self._seq = seq  # token lists only grow, so slicing at these lengths is a snapshot
        self._n_tokens = seq.num_output_tokens
        self._n_text = seq.num_text_sent
        self.request_id = seq.request_id
        self.finish_reason = str(seq.finish_reason) if seq.finish_reason is not None else None
        self.delta_text = delta_text
        self.delta_token_ids = delta_token_ids
        self.num_preemptions = seq.num_preemptions
        self.num_cached_tokens = seq.prefix_hit_tokens or 0  # prompt tokens taken from the prefix cache
        self.spec_stats = seq.spec.stats.copy() if seq.spec is not None else None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prompt(self) -> str | None:
        return self._seq.prompt

    @property
    def prompt_token_ids(self) -> list[int]:
        return self._seq.prompt_token_ids

    @property
    def token_ids(self) -> list[int]:
        s = self._seq
        return s.token_ids[s.num_prompt_tokens: s.num_prompt_tokens + self._n_tokens]

    @property
    def logprobs(self) -> list[float]:
        return self._seq.logprobs[: self._n_tokens]

    @property
    def text(self) -> str:
        return self._seq.text[: self._n_text]

    @property
    def timings(self) -> RequestTimings:
        return RequestTimings(self._seq.arrival_time, tuple(self._seq.token_times[: self._n_tokens]))

    def __repr__(self) -> str:
        return (f"RequestOutput(request_id={self.request_id!r}, finish_reason={self.finish_reason!r}, "
                f"tokens={self._n_tokens}, text={self.text!r})")


def _stops_tensor_parallel_on_error(init):
    """An Engine.__init__ that raises after joining a tensor-parallel world stops that world's ranks (they would
    wait for a rank that never comes)."""
    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except BaseException as e:
            tp = getattr(self, "tp", None)
            if tp is not None:
                tp.abandon(e)
            raise
    return wrapper


class Engine:
    """Continuous-batching greedy engine over one model.

    Args:
        model: a checkpoint path (Hugging Face directory or .gguf file), None for the default model
            (SmolLM2-135M-Instruct), or a `LoadedModel` already loaded on `device` in `dtype`.
        dtype: "float32" | "bfloat16" | "float16" | torch dtype; default bf16 on CUDA, fp32 on the CPU.
        backend: "triton" | "torch" | "cuda" | "cuda:FAMILY[+FAMILY...]" (`model.parse_backend`): the Triton
            kernels, their PyTorch references, or Triton with the CUDA C++ kernels for all / the named families
            of `model.CUDA_FAMILIES` ("rms_norm", "decode_attention"); default triton on CUDA, torch on the CPU.
            A backend that cannot run here (CUDA C++ kernels not built, no GPU) or cannot run the model's
            head_dim is refused with a ValueError at construction.
        device: "cpu" | "cuda[:N]"; default: a `LoadedModel`'s own device (where its weights are), else cuda when
            available.
        max_num_seqs: most sequences running at once (decode batch size).
        num_kv_blocks / kv_cache_memory: KV cache size in blocks or in bytes (at most one); default: 85% of
            the free GPU memory, or 512 MiB on the CPU, capped at what max_num_seqs full contexts need.
        block_size: tokens per KV block, a power of two up to 256.
        max_num_batched_tokens: most tokens computed in one step (chunked prefill): every running stream's next
            token first, then chunks of prompts; a longer prompt is prefilled over several steps while the
            running streams keep decoding. Default `scheduler.DEFAULT_MAX_NUM_BATCHED_TOKENS` for the device
            type (128 on the CPU, 512 on CUDA).
        enable_prefix_caching: reuse the K/V of full blocks that earlier requests computed for the same leading
            tokens (default True); outputs are the same either way. `prefix_cache_stats` counts the hits.
        max_model_len: context length, at most the model's (default: the model's). The RoPE table and the decode
            buffers are sized by min(max_model_len, the KV cache's tokens) (no sequence can grow past the cache),
            for min(max_num_seqs, KV blocks) sequences; a plan larger than the memory available is refused
            (`memory_plan`) before anything is allocated.
        debug: kernels also run their input checks that read device memory (slower; no CUDA graphs).
        cuda_graphs: capture the decode step as CUDA graphs at start-up and replay them (default True; used
            on CUDA with the triton/cuda backends only, never with debug). `runner.graph_capture_s` and
            `runner.graph_memory_bytes` report what the capture cost.
        async_decode: enqueue decode step k+1 before reading step k's tokens back (default True): the device
            never waits for the host between steps, and each `step()` returns the previous decode step's
            outputs. The tokens, texts and finish reasons are exactly those of the synchronous loop (False).
        quantize: "int8" | "int4": quantize the q/k/v, o, gate/up and down matrices of a dense checkpoint at load
            (`runtime/quantization.py`); None (default) keeps them. Quantized checkpoints (GGUF Q8_0/Q4_0/Q4_1,
            AWQ/GPTQ) stay quantized with the triton/cuda backends and are decoded at load for `torch`.
        batch_invariant: run every decode-step matrix product on the batch-invariant Triton `linear` kernel, so a
            sequence's greedy tokens never depend on which others share its batch (default False: dense weights
            use torch's matmul, whose cost at batch 1 against this kernel is not yet measured on a GPU; products
            on quantized weights always use the kernel). Refused with the `torch` backend.
        tensor_parallel_size: N > 1 shards the model over N ranks (distributed.py): this process is rank 0 and
            spawns N-1 processes (on cuda:i+1.. after this engine's cuda:i, or on the CPU with gloo), each building
            this same engine from a checkpoint path (not a LoadedModel). Under torchrun, every rank builds the
            engine (None takes WORLD_SIZE); on ranks > 0 the constructor follows rank 0 and exits the process
            (SystemExit(0)) when rank 0 closes its engine. Greedy tokens are those of one device.
        tp_timeout: seconds any collective may wait (and start-up for the slowest rank); a rank that fails makes
            rank 0 raise `distributed.TensorParallelError`, naming it, and stops every rank.
        speculative: speculative decoding (default None: off), e.g. {"method": "ngram", "num_tokens": 4} (prompt
            lookup) or {"method": "draft", "model": PATH, "num_tokens": 4} (a smaller model with the same
            tokenizer; PATH may also be a LoadedModel on this device in this dtype); other keys: max_ngram,
            min_ngram, adaptive (`spec.SpeculativeConfig`). Each step the decoding sequences' proposals are checked
            by the target in one verify pass; the tokens are those of plain greedy decoding (README, "Speculative
            decoding", says exactly what is guaranteed on which backend). Refused with tensor parallelism for
            "draft". With speculation, steps run synchronously while any sequence proposes (a proposal needs the
            previous step's tokens); `spec_stats` counts proposals and acceptances.

    `close()` (also at exit, and leaving a `with Engine(...)` block) stops the other tensor-parallel ranks.
    """

    @_stops_tensor_parallel_on_error
    def __init__(self, model=None, *, dtype=None, backend: str | None = None, device=None, max_num_seqs: int = 32,
                 num_kv_blocks: int | None = None, kv_cache_memory: int | None = None, block_size: int = 16,
                 max_num_batched_tokens: int | None = None, max_model_len: int | None = None, debug: bool = False,
                 cuda_graphs: bool = True, async_decode: bool = True, quantize: str | None = None,
                 batch_invariant: bool = False, tensor_parallel_size: int | None = None,
                 tp_timeout: float = DEFAULT_TIMEOUT_S, enable_prefix_caching: bool = True, speculative=None):
        args = {k: v for k, v in locals().items() if k != "self"}  # what spawned tensor-parallel ranks rebuild
        from .loader import LoadedModel, load_model_files

        for name, value in (("max_num_seqs", max_num_seqs), ("max_model_len", max_model_len),
                            ("max_num_batched_tokens", max_num_batched_tokens)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: expected an int >= 1, got {type(value).__name__} {value!r}")
        check_block_size(block_size)  # a power of two, as the kernels require
        check_enable_prefix_caching(enable_prefix_caching)  # refused before the model loads
        spec_config = parse_speculative(speculative)
        if spec_config is not None and spec_config.method == "draft" and tensor_parallel_requested(tensor_parallel_size):
            raise ValueError("speculative: method 'draft' is not supported with tensor parallelism (the draft model "
                             "would need its own sharding); use method 'ngram', or tensor_parallel_size=1")
        weights_device = model.weights["embed_tokens"].device if isinstance(model, LoadedModel) else None
        # A loaded model runs where its weights are, unless a device is named (then they must be on it).
        self.device = resolve_device(weights_device if device is None else device)
        self.backend_name = resolve_backend(backend, self.device)
        backend_ops = get_backend(self.backend_name, batch_invariant=batch_invariant,  # refused before loading
                                  few_rows=spec_config is not None)
        self.batch_invariant = batch_invariant
        check_quantize(quantize)
        if isinstance(model, LoadedModel) and tensor_parallel_requested(tensor_parallel_size):
            raise ValueError("model: with tensor parallelism every rank loads its own slices; pass a checkpoint path "
                             "(or a RandomCheckpoint), not a LoadedModel")
        self.tp = start_tensor_parallel(tensor_parallel_size, self.device, timeout=tp_timeout, engine_args=args)
        if self.tp is not None:
            self.device = self.tp.device
            self._close = weakref.finalize(self, self.tp.close)
        if isinstance(model, LoadedModel):
            loaded = model
            if quantize is not None:  # a new dict: the caller's LoadedModel keeps its weights
                loaded = dataclasses.replace(loaded, weights=quantize_weights(dict(loaded.weights), quantize))
            w = loaded.weights["norm"]  # always dense, in the compute dtype (a matrix may be a QuantizedWeight)
            if w.device != self.device or (dtype is not None and w.dtype != resolve_dtype(dtype, self.device)):
                raise ValueError(f"model: a LoadedModel on {w.device} in {w.dtype} does not match the requested "
                                 f"device {self.device} / dtype {dtype}")
            self.dtype = w.dtype
        else:
            self.dtype = resolve_dtype(dtype, self.device)
            if model is None:
                from .default_model import default_model_path

                model = default_model_path()
            tp = self.tp
            loaded = load_model_files(model, device=self.device, dtype=self.dtype, quantize=quantize,
                                      keep_quantized=self.backend_name != "torch", progress=tp is None or tp.rank == 0,
                                      tensor_parallel=None if tp is None else (tp.rank, tp.world_size))
        self.config = cfg = loaded.config
        self.tokenizer = loaded.tokenizer
        self.source = loaded.source
        context_from = f"max_model_len={max_model_len}"
        if max_model_len is None:
            max_model_len = cfg.max_position_embeddings
            context_from = (f"max_model_len (default: the model's context, max_position_embeddings / "
                            f"llama.context_length = {max_model_len})")
        elif not 1 < max_model_len <= cfg.max_position_embeddings:
            raise ValueError(f"max_model_len: expected 2..{cfg.max_position_embeddings} (the model's context), "
                             f"got {max_model_len}")
        self.max_model_len = max_model_len
        self.block_size = block_size
        draft = None
        if spec_config is not None and spec_config.method == "draft":  # its cache mirrors the target's blocks
            from .spec.draft import load_draft

            draft = load_draft(spec_config.model, target=loaded, device=self.device, dtype=self.dtype,
                               keep_quantized=self.backend_name != "torch", max_model_len=max_model_len)
        draft_config = None if draft is None else draft.config
        kv_config = cfg if loaded.shard is None else loaded.shard.local_config(cfg)  # this rank's KV heads
        num_blocks = choose_num_blocks(kv_config, block_size=block_size, dtype=self.dtype, device=self.device,
                                       max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                       num_blocks=num_kv_blocks, memory_bytes=kv_cache_memory,
                                       draft_config=draft_config)
        self.cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda" and self.backend_name != "torch" \
            and not debug
        if self.tp is not None:  # every rank's cache gets the same blocks; a torchrun rank may be started apart
            num_blocks = self.tp.agree_min(num_blocks)
            self.tp.check_same("model or engine arguments", f"{cfg!r} {self.dtype} {self.backend_name} "
                               f"max_model_len={max_model_len} block_size={block_size} num_blocks={num_blocks} "
                               f"max_num_seqs={max_num_seqs} debug={debug} cuda_graphs={self.cuda_graphs} "
                               f"speculative={spec_config}")
        # Refuse what cannot fit before allocating; the RoPE table and decode buffers are sized by what can run.
        rows_per_seq = 1 if spec_config is None else 1 + spec_config.num_tokens  # a verify pass's rows
        plan = plan_memory(kv_config, num_blocks=num_blocks, block_size=block_size, dtype=self.dtype,
                           device=self.device, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                           workspace=self.backend_name != "torch", context_from=context_from,
                           rows_per_seq=rows_per_seq, draft_config=draft_config,
                           blocks_from=f"num_kv_blocks={num_kv_blocks}" if num_kv_blocks is not None else
                           f"kv_cache_memory={kv_cache_memory}" if kv_cache_memory is not None else "the default KV cache")
        self.runner = ModelRunner(cfg, loaded.weights, backend_ops, device=self.device,
                                  dtype=self.dtype, num_blocks=num_blocks, block_size=block_size,
                                  max_num_seqs=plan.runner_seqs, max_model_len=plan.served_len, debug=debug,
                                  cuda_graphs=self.cuda_graphs, tp=self.tp, shard=loaded.shard,
                                  rows_per_seq=rows_per_seq)
        self.speculator: Speculator | None = None
        if spec_config is not None:
            self.speculator = self._speculator(spec_config, draft, backend_ops, num_blocks, plan, debug)
        self.async_decode = bool(async_decode)
        # The cache holds K/V of this model in this dtype: blocks of another engine never match (separate pools).
        block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching=enable_prefix_caching,
                                     cache_identity=f"{self.source}|{self.dtype}|{cfg.architecture}"
                                                    f"{'' if draft is None else '|draft ' + repr(draft.config)}")
        self.scheduler = Scheduler(block_manager, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=(DEFAULT_MAX_NUM_BATCHED_TOKENS[self.device.type]
                                                           if max_num_batched_tokens is None
                                                           else max_num_batched_tokens))
        self.eos_token_ids = frozenset(cfg.eos_token_ids or ())
        self._requests: dict[Any, Sequence] = {}
        self._ids = itertools.count()
        self._pending: PendingDecode | None = None  # the launched decode step whose tokens are not read yet
        self._ready: list[RequestOutput] = []       # outputs made outside step() (a drain), for the next step()
        # Decode steps launched; of them fed by the previous step's ids on the device; pending steps read before
        # launching (drains); launched steps dropped and run again without a sequence that had just finished.
        # Of the launched steps, verify passes (speculative decoding: some sequence had proposed tokens).
        self.decode_stats = {"launched": 0, "continued": 0, "drained": 0, "rerun": 0, "verify": 0}
        if self.tp is not None and self.tp.rank > 0:  # a follower: run rank 0's steps until it closes its engine
            tp_worker.follow(self.runner)
            self.close()
            raise SystemExit(0)

    def _speculator(self, config, draft, backend_ops, num_blocks: int, plan, debug: bool) -> Speculator:
        """The engine's speculator: n-gram proposals, or a draft model's, whose runner has a KV cache of as many
        blocks as the target's (addressed by the same block tables) and its own decode buffers and graphs."""
        from .spec.draft import DraftProposer
        from .spec.ngram import NgramProposer

        if draft is None:
            proposer = NgramProposer(config.max_ngram, config.min_ngram)
        else:
            proposer = DraftProposer(ModelRunner(
                draft.config, draft.weights, backend_ops, device=self.device, dtype=self.dtype, num_blocks=num_blocks,
                block_size=self.block_size, max_num_seqs=plan.runner_seqs, max_model_len=plan.served_len, debug=debug,
                cuda_graphs=self.cuda_graphs))
        return Speculator(config, proposer, self.device.type)

    def close(self) -> None:
        """Stop the other tensor-parallel ranks and release the process groups (idempotent; also at exit and on
        leaving a `with` block). An engine on one device holds nothing that needs it."""
        if self.tp is not None:
            self._close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt: str | list[int] | list[dict], params: SamplingParams | None = None, *,
                    chat: bool = False, chat_template_kwargs: dict[str, Any] | None = None, request_id: Any = None,
                    **param_kwargs) -> Any:
        """Queue a request; returns its id. `prompt` is text, token ids, or (chat=True) text or a list of
        {"role", "content"} messages to which the model's chat template is applied; `chat_template_kwargs` are
        extra variables of that template (e.g. {"enable_thinking": False} for Qwen3, {"tools": [...]}). Sampling
        parameters come as `params` or as keywords (max_new_tokens=, stop=, ignore_eos=)."""
        return self._enqueue(self._new_sequence(prompt, params, chat=chat, chat_template_kwargs=chat_template_kwargs,
                                                request_id=request_id, **param_kwargs))

    def _enqueue(self, seq: Sequence) -> Any:
        if seq.request_id in self._requests:
            raise ValueError(f"request_id: {seq.request_id!r} is already in use")
        self._requests[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq.request_id

    def _new_sequence(self, prompt, params, *, chat=False, chat_template_kwargs=None, request_id=None,
                      **param_kwargs) -> Sequence:
        """Validate a request and build its Sequence without touching the engine's state."""
        if params is None:
            params = SamplingParams(**param_kwargs)
        elif param_kwargs:
            raise TypeError(f"add_request: give either params or keywords, not both ({', '.join(param_kwargs)})")
        elif not isinstance(params, SamplingParams):
            raise TypeError(f"params: expected SamplingParams, got {type(params).__name__}")
        if request_id is not None and request_id in self._requests:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        tok = self.tokenizer
        if params.stop and tok is None:
            raise ValueError("stop: stop strings need a tokenizer, and this model has none")
        text = None
        template_kwargs = _chat_template_kwargs(chat_template_kwargs, chat)
        if chat:
            if tok is None:
                raise ValueError("chat: the model has no tokenizer, hence no chat template")
            if isinstance(prompt, str):
                if not prompt:
                    raise ValueError("prompt: expected a non-empty prompt, got ''")
                messages = [{"role": "user", "content": validate_text(prompt, "prompt")}]
            elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
                messages = prompt
            else:
                raise TypeError("prompt: with chat=True expected a str or a non-empty list of message dicts")
            text = tok.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs)
            ids = self._encode_bounded(text, "rendered by the chat template, ", special=False)
        elif isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: expected a non-empty prompt, got ''")
            if tok is None:
                raise ValueError("prompt: this model has no tokenizer; pass token ids")
            text = validate_text(prompt, "prompt")
            ids = self._encode_bounded(prompt, "", special=True)
        elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            raise TypeError("prompt: a list of message dicts is a conversation; pass chat=True to apply the chat "
                            "template")
        elif isinstance(prompt, (list, tuple, torch.Tensor, np.ndarray)):
            if isinstance(prompt, (torch.Tensor, np.ndarray)) and prompt.ndim != 1:
                raise ValueError(f"prompt: token ids must be 1-D, got shape {tuple(prompt.shape)}")
            if len(prompt) >= self.max_model_len:  # before converting a huge array element by element
                raise ValueError(f"prompt: {len(prompt)} tokens do not fit the context of {self.max_model_len} "
                                 "tokens (at least one must be left to generate); shorten the prompt")
            ids = prompt.tolist() if isinstance(prompt, (torch.Tensor, np.ndarray)) else list(prompt)
            self._check_token_ids(ids)
        else:
            raise TypeError(f"prompt: expected a str or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt: expected at least one token, got none")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens do not fit the context of {self.max_model_len} tokens "
                             f"(at least one must be left to generate); shorten the prompt")
        need = min(len(ids) + params.max_new_tokens, self.max_model_len)
        if not self.scheduler.fits_alone(need):
            bm = self.scheduler.block_manager
            raise ValueError(f"request: needs {blocks_needed(need, self.block_size)} KV blocks ({len(ids)} prompt "
                             f"tokens + max_new_tokens {params.max_new_tokens}, at most {self.max_model_len}), but "
                             f"the whole cache has {bm.num_blocks} blocks of {self.block_size} tokens; lower "
                             f"max_new_tokens or give the engine more KV cache")
        detok = None
        if tok is not None:
            from .tokenizer import IncrementalDetokenizer

            detok = IncrementalDetokenizer(tok, prompt_ids=ids)
        rid = next(self._ids) if request_id is None else request_id
        while request_id is None and rid in self._requests:
            rid = next(self._ids)
        return Sequence(rid, ids, params, prompt=text, detokenizer=detok)

    def _encode_bounded(self, text: str, what: str, *, special: bool) -> list[int]:
        """Token ids of `text`; a text that certainly cannot fit the context is refused first, cheaply
        (`Tokenizer.exceeds`: a 10 MB prompt is not tokenized in full to learn that it is too long).
        what: words for the message after "prompt: " ("" or e.g. "rendered by the chat template, ")."""
        tok = self.tokenizer
        budget = self.max_model_len - 1 - (tok.num_special_tokens_added if special else 0)
        over = tok.exceeds(text, budget)
        if over is not None:
            raise ValueError(f"prompt: {what}at least {over} tokens ({len(text)} characters), more than the context "
                             f"of {self.max_model_len} tokens holds (at least one must be left to generate); shorten "
                             "the prompt")
        return tok.encode(text, add_special_tokens=special)

    def _check_token_ids(self, ids: list) -> None:
        vocab = self.config.vocab_size
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise TypeError(f"prompt: token {i} is {type(t).__name__} {t!r}, expected an int")
            if not 0 <= t < vocab:
                raise ValueError(f"prompt: token id {t} at position {i} is outside the vocabulary [0, {vocab})")
        ids[:] = [int(t) for t in ids]

    def abort(self, request_id: Any) -> RequestOutput:
        """Stop a request now and free its blocks; returns its final output (finish_reason "abort").

        A request in the decode step still running on the device gets that step's token first (the other
        requests' tokens of that step come with the next `step()`), as in the synchronous loop. Whatever of the
        request the caller has not been handed yet (outputs queued for the next `step()`) goes out with this
        final output, so its deltas still add up to its tokens and text and nothing of it comes after it. A
        request that finished on its own in such a queued output (its length, say) returns that final output,
        with its own finish reason. KeyError for an id never added or whose final output was handed out."""
        seq = self._requests.get(request_id)
        if seq is not None and self._pending is not None and any(s is seq for s in self._pending.seqs):
            pending, self._pending = self._pending, None
            self._ready += self._resolve(pending)
        seq = self._requests.pop(request_id, None)
        if seq is None:  # finished in a step whose outputs are still queued? then its final output goes out now
            seq = next((o._seq for o in self._ready if o.request_id == request_id and o.finished), None)
            if seq is None:
                raise KeyError(f"abort: unknown request id {request_id!r} (never added, or already finished)")
            self._unqueue(seq)
            return self._output(seq)
        self._unqueue(seq)
        seq.finish_reason = FinishReason.ABORT
        seq.num_pending = 0
        self.scheduler.finish(seq)
        return self._output(seq)

    def _unqueue(self, seq: Sequence) -> None:
        """Take `seq`'s outputs out of the ready queue, undelivered: its next output then carries their deltas."""
        queued = [o for o in self._ready if o._seq is seq]
        if queued:
            first = queued[0]
            seq.num_tokens_sent = first._n_tokens - len(first.delta_token_ids)
            seq.num_text_sent = first._n_text - len(first.delta_text)
            self._ready = [o for o in self._ready if o._seq is not seq]

    def _forget(self, seqs: list[Sequence]) -> None:
        """Abort those of `seqs` still running and drop every queued output of theirs (an interrupted
        `LLM.generate`): nothing of them is left in the engine."""
        for seq in seqs:
            if self._requests.get(seq.request_id) is seq:
                self.abort(seq.request_id)
        gone = {id(seq) for seq in seqs}
        self._ready = [o for o in self._ready if id(o._seq) not in gone]

    def _requeue(self, outputs: list[RequestOutput]) -> None:
        """Put back outputs a `step()` returned to a caller that does not own them (`LLM.generate`), ahead of
        anything queued since, for the next `step()`."""
        if outputs:
            self._ready[:0] = outputs

    def has_unfinished(self) -> bool:
        return bool(self._ready) or self.scheduler.has_unfinished()

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Prefix-cache hits so far (requests, prompt tokens, tokens reused, hit rate, evictions)."""
        return self.scheduler.block_manager.stats

    @property
    def spec_stats(self) -> SpecDecodeStats | None:
        """Speculative decoding's totals (verify steps, proposed and accepted tokens; None when it is off)."""
        return None if self.speculator is None else self.speculator.stats

    def spec_summary(self) -> str:
        """One line on speculative decoding (for the CLI and logs): its acceptance so far, or that it is off."""
        return "speculative decoding off" if self.speculator is None else self.speculator.summary()

    def prefix_cache_summary(self) -> str:
        """One line on the prefix cache (for the CLI and logs): its hits so far, or that it is off."""
        if not self.scheduler.block_manager.enable_prefix_caching:
            return "prefix caching off"
        return self.prefix_cache_stats.summary()

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; return an output for every request that got a token (or finished).

        With `async_decode`, a decode step is launched here and its tokens are read by the next call, after
        that call has launched the following step (so the device always has the next step queued); the
        prefill's first tokens come at once. The pipeline goes on only while the next step is certain to be
        the one the synchronous loop would run: nobody waiting, the same running batch, no sequence at its
        length or context limit, no preemption possible. Otherwise the pending step is read first (a drain).
        When the read step ends a sequence (EOS or a stop string), the step launched over it is dropped and
        run again without it: the KV it wrote lies in that sequence's own blocks or is rewritten, so outputs
        are exactly those of the synchronous loop.

        Speculative decoding: before scheduling, the decoding sequences ask for proposed tokens (the scheduler gives
        them slots); a step in which any has a proposal runs its decode sequences as one verify pass, read at once
        (`_verify`). A proposal needs the previous step's tokens on the host, so the pipeline continues only through
        steps in which every running sequence is pausing its proposals (adaptive back-off)."""
        outputs, self._ready = self._ready, []
        pending, self._pending = self._pending, None
        if pending is not None and not self._can_continue(pending):
            outputs += self._resolve(pending)
            pending = None
            self.decode_stats["drained"] += 1
        spec = self.speculator
        if spec is not None:  # the decoding sequences ask for proposed tokens (none while the pipeline continues)
            spec.before_schedule([s for s in self.scheduler.running if s.num_uncomputed_tokens == 1],
                                 self.max_model_len)
        step = self.scheduler.schedule()
        if step.empty and pending is None and self.scheduler.has_unfinished():  # add_request refuses what never fits
            raise RuntimeError(f"scheduler made no progress: {len(self.scheduler.waiting)} waiting, "
                               f"{self.scheduler.block_manager.num_free_blocks} free blocks")
        if step.prefill:
            self._prefill(step.prefill, step.prefill_tokens, outputs)
        if spec is not None and step.decode:
            spec.after_schedule(step.decode)  # the proposals, in the slots the scheduler gave
            if any(s.spec_token_ids for s in step.decode):  # a verify pass, run and read at once
                outputs += self._verify(step.decode)
                step.decode = []
        launched = self._launch(step.decode, ids_on_device=pending is not None) if step.decode else None
        if pending is not None:
            outputs += self._resolve(pending)
            if any(s.finish_reason is not None for s in launched.seqs):
                for s in launched.seqs:  # drop the launched step: a sequence of it has just finished
                    s.num_pending -= 1
                survivors = [s for s in launched.seqs if s.finish_reason is None]
                launched = self._launch(survivors, ids_on_device=False) if survivors else None
                self.decode_stats["rerun"] += 1
        if launched is not None and not self.async_decode:
            outputs += self._resolve(launched)
            launched = None
        self._pending = launched
        return outputs

    def _can_continue(self, pending: PendingDecode) -> bool:
        """Whether the next decode step can be launched before `pending`'s tokens are read: it is then the step
        the synchronous loop would run, whatever those tokens are (unless one ends a sequence: see step())."""
        sched = self.scheduler
        if sched.waiting or len(sched.running) != len(pending.seqs):
            return False
        if self.speculator is not None and not all(self.speculator.paused(s) for s in pending.seqs):
            return False  # someone proposes at the next step: that needs the pending tokens on the host
        bs, need, max_len = self.block_size, 0, self.max_model_len
        for running, seq in zip(sched.running, pending.seqs):
            if running is not seq:
                return False
            n = len(seq.token_ids) + seq.num_pending  # seq.num_tokens, inlined (per sequence, per step)
            if n - seq.num_prompt_tokens >= seq.params.max_new_tokens or n >= max_len:
                return False  # its pending token ends it (length or context)
            if len(seq.block_table) * bs < n:
                need += 1
        return need <= sched.block_manager.num_free_blocks  # no preemption

    def _prefill(self, seqs: list[Sequence], num_tokens: list[int], outputs: list[RequestOutput]) -> None:
        """Run the step's chunks; publish the blocks they completed; a sequence whose chunk reached its last
        token gets its next token."""
        if self.speculator is not None:  # a draft model computes the same chunks into its own cache
            self.speculator.prefill(seqs, num_tokens)
        token_ids, logprobs = self.runner.run(seqs, True, num_new_tokens=num_tokens)
        now = time.perf_counter()
        sampled = iter(zip(token_ids, logprobs))
        bm = self.scheduler.block_manager
        for seq, n in zip(seqs, num_tokens):
            seq.num_computed_tokens += n
            bm.publish(seq, self._kv_limit(seq))  # K/V written (the pass is done), token ids on the host
            if seq.num_computed_tokens == seq.num_tokens:
                token_id, logprob = next(sampled)
                seq.append_token(token_id, logprob, now)
                self._add_token(seq, token_id, outputs)

    def _launch(self, seqs: list[Sequence], ids_on_device: bool) -> PendingDecode:
        pending = self.runner.launch_decode(seqs, ids_on_device=ids_on_device)
        self.decode_stats["launched"] += 1
        self.decode_stats["continued"] += ids_on_device
        bm = self.scheduler.block_manager
        for seq in seqs:
            seq.num_computed_tokens = len(seq.token_ids) + seq.num_pending  # the fed token's K/V is written now
            seq.num_pending += 1
            bm.publish(seq, self._kv_limit(seq))  # blocks of host-known tokens (one on the device is never in a key)
        return pending

    def _kv_limit(self, seq: Sequence) -> int | None:
        """How far the blocks of `seq` may be published: a draft model's own cache must hold them too."""
        return None if self.speculator is None else self.speculator.kv_limit(seq)

    def _verify(self, seqs: list[Sequence]) -> list[RequestOutput]:
        """A verify pass (speculative decoding): each sequence's newest token and its proposed tokens go through
        the target as decode rows of their own lengths; each row's argmax is what plain decoding would compute
        there. Each sequence keeps the longest proposal prefix the target confirms plus the target's next token
        (`spec.num_accepted`), cut where plain decoding would stop (EOS, a stop string, max_new_tokens); the slots
        of rejected tokens are rolled back and the blocks past its accepted length return to the pool."""
        proposals = [s.spec_token_ids for s in seqs]
        pending = self.runner.launch_decode(seqs, spec=proposals)
        self.decode_stats["launched"] += 1
        self.decode_stats["verify"] += 1
        token_ids, logprobs = self.runner.resolve(pending)
        now = time.perf_counter()
        bm, spec = self.scheduler.block_manager, self.speculator
        outputs: list[RequestOutput] = []
        r = 0
        for seq, proposal in zip(seqs, proposals):
            k = len(proposal)
            verdicts, lps = token_ids[r: r + k + 1], logprobs[r: r + k + 1]
            r += k + 1
            seq.spec_token_ids, seq.num_spec_tokens = [], 0
            a = num_accepted(proposal, verdicts)
            if k:
                spec.verified(seq, k, a)
            for token_id, logprob in zip(verdicts[: a + 1], lps[: a + 1]):
                seq.append_token(token_id, logprob, now)
                self._postprocess(seq, token_id)
                if seq.finish_reason is not None:  # cut exactly where plain decoding stops
                    break
            # Every emitted token but the newest was fed in this pass (the accepted proposals), as plain decoding
            # would have fed it: their K/V is verified. The rejected rows' slots are rolled back, their blocks
            # returned; the blocks now full are published (also just before a finish, as plain decoding does).
            seq.num_computed_tokens = len(seq.token_ids) - 1
            bm.trim(seq, seq.num_computed_tokens)
            bm.publish(seq, self._kv_limit(seq))
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
                del self._requests[seq.request_id]
            outputs.append(self._output(seq))
        return outputs

    def _resolve(self, pending: PendingDecode) -> list[RequestOutput]:
        """Read a launched decode step's tokens (waits for it) and process them."""
        token_ids, logprobs = self.runner.resolve(pending)
        now = time.perf_counter()
        outputs: list[RequestOutput] = []
        for seq, token_id, logprob in zip(pending.seqs, token_ids, logprobs):
            if seq.finish_reason is not None:  # aborted while the step ran: its token is dropped
                continue
            seq.num_pending -= 1
            seq.append_token(token_id, logprob, now)
            self._add_token(seq, token_id, outputs)
        return outputs

    def _add_token(self, seq: Sequence, token_id: int, outputs: list[RequestOutput]) -> None:
        self._postprocess(seq, token_id)
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)
            del self._requests[seq.request_id]
        outputs.append(self._output(seq))

    def _postprocess(self, seq: Sequence, token_id: int) -> None:
        """Detokenize the new token and decide whether the sequence is done."""
        p = seq.params
        if token_id in self.eos_token_ids and not p.ignore_eos:
            seq.finish_reason = FinishReason.EOS
        elif seq.detokenizer is not None:
            self._add_text(seq, seq.detokenizer.push(token_id))
        if seq.finish_reason is None:
            if seq.num_output_tokens >= p.max_new_tokens:
                seq.finish_reason = FinishReason.LENGTH
            elif len(seq.token_ids) >= self.max_model_len:
                seq.finish_reason = FinishReason.CONTEXT
        if seq.finish_reason not in (None, FinishReason.STOP) and seq.detokenizer is not None:
            self._add_text(seq, seq.detokenizer.flush())

    @staticmethod
    def _add_text(seq: Sequence, new: str) -> None:
        if not new:
            return
        start = len(seq.text)
        seq.text += new
        stops = seq.params.stop
        if stops:
            longest = max(len(s) for s in stops)
            hits = [i for s in stops if (i := seq.text.find(s, max(0, start - longest + 1))) >= 0]
            if hits:
                seq.text = seq.text[: min(hits)]
                seq.finish_reason = FinishReason.STOP

    def _output(self, seq: Sequence) -> RequestOutput:
        text_end = len(seq.text)
        if seq.finish_reason is None and seq.params.stop:  # hold back what could start a stop string
            text_end -= max(len(s) for s in seq.params.stop) - 1
        text_end = max(text_end, seq.num_text_sent)
        delta_text = seq.text[seq.num_text_sent: text_end]
        seq.num_text_sent = text_end
        delta_ids = seq.token_ids[seq.num_prompt_tokens + seq.num_tokens_sent:]
        seq.num_tokens_sent = seq.num_output_tokens
        return RequestOutput(seq, delta_text, delta_ids)

    # ------------------------------------------------------------------ convenience
    def run_until_done(self) -> Iterable[RequestOutput]:
        """Step until no request is left, yielding every output."""
        while self.has_unfinished():
            yield from self.step()

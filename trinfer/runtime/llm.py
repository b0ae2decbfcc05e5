"""`LLM`: the offline, batch-in / results-out face of the engine."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from .engine import Engine, RequestOutput
from .sampling_params import SamplingParams


class LLM:
    """Load a model once, then `generate()` greedily for one prompt or many (run together, continuously batched).

        llm = LLM()                                   # default model; backend/dtype/device picked for the machine
        out = llm.generate("The capital of France is", max_new_tokens=16)[0]
        print(out.text, out.finish_reason, out.timings.ttft)

    Arguments are those of `Engine` (model path or None for the default model, dtype, backend, device,
    max_num_seqs, num_kv_blocks, kv_cache_memory, block_size, debug, cuda_graphs, tensor_parallel_size,
    enable_prefix_caching, max_num_batched_tokens, ...). `cuda_graphs=False` runs every decode step eagerly (on
    CUDA they are captured and replayed by default). `tensor_parallel_size=N` shards the model over N processes
    (GPUs); `close()` or a `with` block stops them. Prompts sharing leading tokens with earlier ones reuse their
    KV cache across `generate` calls (`enable_prefix_caching=False` turns that off; `out.num_cached_tokens` per
    request). `speculative={"method": "ngram", "num_tokens": 4}` (or `{"method": "draft", "model": PATH}`) checks
    several proposed tokens per step with one pass of the model, for the same tokens (`out.spec_stats`).
    """

    def __init__(self, model=None, *, dtype=None, backend: str | None = None, device=None, max_num_seqs: int = 32,
                 num_kv_blocks: int | None = None, kv_cache_memory: int | None = None, block_size: int = 16,
                 debug: bool = False, cuda_graphs: bool = True, **engine_kwargs: Any):
        self.engine = Engine(model, dtype=dtype, backend=backend, device=device, max_num_seqs=max_num_seqs,
                             num_kv_blocks=num_kv_blocks, kv_cache_memory=kv_cache_memory, block_size=block_size,
                             debug=debug, cuda_graphs=cuda_graphs, **engine_kwargs)

    def close(self) -> None:
        """Stop the engine's tensor-parallel ranks, if any (idempotent; also done at exit)."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def config(self):
        return self.engine.config

    def generate(self, prompts: str | list[str] | list[int] | list[list[int]] | list[dict] | list[list[dict]],
                 max_new_tokens: int = 256, *,
                 stop: str | list[str] | None = None, chat: bool = False, ignore_eos: bool = False,
                 chat_template_kwargs: dict[str, Any] | None = None,
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 on_output: Callable[[RequestOutput], None] | None = None) -> list[RequestOutput]:
        """Generate for each prompt; returns the final outputs in the order of the prompts.

        prompts: a str, a list of str, token ids (a list or tuple of ints or numpy integers, a 1-D numpy array
            or tensor: the types `Engine.add_request` takes), or a list of those (or a 2-D array, one per row); with
            chat=True also one conversation (a list of {"role", "content"} dicts) or a list of them.
        chat: apply the model's chat template to each (text) prompt, as a single user message (or to each list of
            {"role", "content"} messages).
        chat_template_kwargs: extra variables of the chat template for every prompt, e.g. {"enable_thinking":
            False} (Qwen3 answers without a <think> block); only with chat=True.
        sampling_params: one for all prompts or one per prompt, instead of max_new_tokens/stop/ignore_eos.
        on_output: called with every intermediate output (e.g. to stream `delta_text`).
        Every prompt is validated before any runs: one bad prompt raises and nothing is generated.
        Only this call's own requests complete it; outputs of requests added to `self.engine` directly go back
        to the engine for its next `step()`. An exception (from `on_output`, say) aborts this call's unfinished
        requests and drops their undelivered outputs before it propagates: the engine is left as if the call had
        not been made, and the next call starts clean.
        """
        if isinstance(prompts, (torch.Tensor, np.ndarray)):  # one prompt of ids, or one per row
            prompts = [prompts] if prompts.ndim == 1 else list(prompts)
        elif isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                          and isinstance(prompts[0], (int, np.integer, dict))
                                          and not isinstance(prompts[0], bool)):
            prompts = [prompts]  # one prompt: text, token ids, or (chat) one conversation of message dicts
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts: expected a str, a list of str, token ids (ints, numpy integers, a 1-D array "
                             f"or tensor) or a list of those; got {type(prompts).__name__}")
        if sampling_params is None:
            sampling_params = SamplingParams(max_new_tokens=max_new_tokens, stop=stop, ignore_eos=ignore_eos)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params: expected {len(prompts)} (one per prompt), got {len(params)}")
        eng = self.engine
        seqs = [eng._new_sequence(p, sp, chat=chat, chat_template_kwargs=chat_template_kwargs)
                for p, sp in zip(prompts, params)]
        ids = [eng._enqueue(seq) for seq in seqs]  # all valid: queue them, in order
        own = {id(seq) for seq in seqs}
        final: dict[Any, RequestOutput] = {}
        others: list[RequestOutput] = []  # outputs of requests added to the engine by someone else
        try:
            while len(final) < len(ids):
                outs = eng.step()
                others += [o for o in outs if id(o._seq) not in own]  # before on_output can raise
                for out in outs:
                    if id(out._seq) not in own:
                        continue
                    if on_output is not None:
                        on_output(out)
                    if out.finished:
                        final[out.request_id] = out
        except BaseException:
            eng._forget(seqs)  # interrupted: abort what is left of this call and drop its queued outputs
            raise
        finally:
            eng._requeue(others)  # theirs, for the engine's next step()
        return [final[rid] for rid in ids]

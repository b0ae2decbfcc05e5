"""Runs the model for a scheduled batch: builds the step's metadata, runs the forward pass, takes the argmax.

Holds the model, the paged KV cache, the static decode buffers and (on CUDA) the captured decode graphs.

Prefill (whole prompts, chunks of long ones, the rest after a cached prefix) runs eagerly and returns its tokens
at once; with the Triton kernels its attention launch is planned once per step (`plan_prefill_attention`: KV
splits for short chunks over long cached prefixes). A decode step is launched (`launch_decode`) and its
tokens are read later (`resolve`): the argmax runs on the device and writes the next step's input ids in
place, the ids and log-probabilities go to pinned host memory by an asynchronous copy, and only `resolve`
waits for that copy. So the engine can enqueue step k+1 before it reads step k's tokens.

CUDA graphs: one per (batch bucket, context bucket), captured at start-up, largest first, in one memory
pool, over the static buffers of `DecodeBuffers`. A batch is padded to the smallest batch bucket that holds
it (padding rows: slot -1, length 0). The decode-attention grid is sized by a host value, the longest
sequence: a graph captures it at its context bucket's bound (splits past a sequence's end exit at once,
and the result never depends on the grid), and the smallest bound >= the batch's longest sequence is
replayed. Context buckets grow by 4x from one split (256 tokens) to max_model_len, so at most 3/4 of the
split programs a graph launches lie past the batch's longest sequence; the single bound max_model_len would
launch, for a 128K-context model, 512 split programs per sequence and KV head in every layer of every step,
nearly all of them empty at short contexts. The largest batch bucket is max_num_seqs, so every decode batch
has its graph (a batch beyond the buckets would run eagerly). On CUDA, eager decode steps (graphs off) are
padded to the same buckets, so graphs on and off run the same shapes and give the same tokens. On the CPU
the same step runs eagerly, unpadded.
"""
from __future__ import annotations

import bisect
import functools
import gc
import logging
import time

import torch

from trinfer.triton_kernels.attention import DECODE_SPLIT_TOKENS, decode_workspace_numel, plan_prefill_attention

from . import tp_worker
from .attention_metadata import AttentionMetadata, DecodeBuffers, build_prefill
from .block_manager import blocks_needed
from .kv_cache import KVCache, allocate_kv_cache
from .model import Backend, LlamaModel
from .sequence import Sequence

logger = logging.getLogger(__name__)

CONTEXT_BUCKET_FACTOR = 4


def decode_batch_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """Batch sizes with a captured graph: 1, 2, 4, 8, then every 16 up to max_num_seqs (always included)."""
    sizes = [b for b in (1, 2, 4, 8) if b <= max_num_seqs] + list(range(16, max_num_seqs + 1, 16))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return tuple(sizes)


def context_buckets(max_model_len: int, split_tokens: int = DECODE_SPLIT_TOKENS,
                    factor: int = CONTEXT_BUCKET_FACTOR) -> tuple[int, ...]:
    """Attention-grid bounds (tokens) with a captured graph: split_tokens * factor**i below max_model_len, then
    max_model_len itself."""
    bounds, b = [], split_tokens
    while b < max_model_len:
        bounds.append(b)
        b *= factor
    return tuple(bounds) + (max_model_len,)


def bucket_for(buckets: tuple[int, ...], n: int) -> int | None:
    """The smallest bucket >= n, or None when n exceeds them all."""
    i = bisect.bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


class PendingDecode:
    """A launched decode step whose tokens have not been read yet (`ModelRunner.resolve`)."""

    __slots__ = ("seqs", "handle", "graphed", "num_rows")

    def __init__(self, seqs: list[Sequence], handle: int, graphed: bool, num_rows: int | None = None):
        self.seqs = seqs
        self.handle = handle    # DecodeBuffers.start_output_copy's handle
        self.graphed = graphed  # replayed from a captured graph (else run eagerly)
        self.num_rows = len(seqs) if num_rows is None else num_rows  # rows (a verify pass: several per sequence)


class ModelRunner:
    """Args beyond the model's: `cuda_graphs` captures the decode graphs now (CUDA only, kernels that never
    synchronize: not with debug); `pad_decode` pads decode batches to their batch bucket even when they run
    eagerly (default: on CUDA, so that graphs on and off run the same shapes and give the same bits).

    Tensor parallelism: `tp` (distributed.TensorParallel) and `shard` (this rank's ShardSpec; `weights` are its
    slices) build this rank's slice of the model and of the KV cache. Rank 0 sends each pass to the other ranks
    before running it (tp_worker.py); ranks > 0 run `tp_worker.follow(runner)` instead of being called.

    Speculative decoding: `rows_per_seq` (1 + the tokens proposed per sequence) sizes the decode buffers, the
    batch buckets and the attention workspace for verify passes of `max_num_seqs * rows_per_seq` rows; a verify
    pass is a decode step whose sequences take several rows (`launch_decode(..., spec=...)`), so it replays the
    same graphs, bucketed by its number of rows."""

    def __init__(self, config, weights: dict, backend: Backend, *, device: torch.device, dtype: torch.dtype,
                 num_blocks: int, block_size: int, max_num_seqs: int, max_model_len: int, debug: bool = False,
                 cuda_graphs: bool = False, pad_decode: bool | None = None, tp=None, shard=None,
                 rows_per_seq: int = 1):
        self.config = config
        self.backend = backend
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.tp = tp
        local = config if shard is None else shard.local_config(config)  # this rank's heads, rows, vocab
        self.model = LlamaModel(local, weights, backend, max_positions=max_model_len, validate=debug,
                                tp=None if tp is None else tp.model_ops(shard, backend))
        self.kv_cache: KVCache = allocate_kv_cache(local, num_blocks, block_size, dtype, device)
        max_rows = max_num_seqs * rows_per_seq
        self.decode_buffers = DecodeBuffers(max_rows, blocks_needed(max_model_len, block_size), device)
        if tp is not None and device.type == "cuda":  # a wait that gives up when a rank fails
            self.decode_buffers.event_wait = tp.wait_event
        if backend.name != "torch":  # the kernels' split-KV scratch, once, for the largest batch and context
            n = decode_workspace_numel(max_rows, local.num_heads, local.head_dim, max_model_len)
            self.decode_buffers.workspace = torch.empty(max(n, 1), dtype=torch.float32, device=device)
        self.batch_buckets = decode_batch_buckets(max_rows)
        self.context_buckets = context_buckets(max_model_len)
        self.pad_decode = device.type == "cuda" if pad_decode is None else pad_decode
        self.graphs: dict[tuple[int, int], object] = {}  # (batch bucket, context bound) -> graph with .replay()
        self.graph_capture_s: float | None = None     # seconds the capture took (None: no graphs)
        self.graph_memory_bytes: int | None = None    # device memory the graphs took (pool + graph objects)
        self.num_graph_replays = 0
        self.num_eager_decodes = 0
        self._plan_prefill = None  # the Triton prefill attention's launch plan (KV splits), once per step
        if backend.name != "torch":
            self._plan_prefill = functools.partial(
                plan_prefill_attention, num_q_heads=local.num_heads, num_kv_heads=local.num_kv_heads,
                head_dim=local.head_dim, dtype=dtype, device=device)
        if cuda_graphs:
            self.capture_cuda_graphs()

    # ------------------------------------------------------------------ prefill and the synchronous API
    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool, *, padded_size: int | None = None,
            num_new_tokens: list[int] | None = None, starts: list[int] | None = None
            ) -> tuple[list[int], list[float]]:
        """One forward pass over `seqs` (a prefill batch or a decode batch), waited for.

        Decode: per sequence, the next token id and its log-probability (`padded_size` pads the batch; default:
        its bucket when `pad_decode`). Prefill: `num_new_tokens[i]` tokens of seqs[i] from its
        num_computed_tokens on (default: all the rest; `build_prefill`); the next token and its log-probability
        of each sequence whose run reaches its last token, in order (a chunk that stops short gets none). `starts`
        replaces the sequences' num_computed_tokens as their runs' first tokens (a draft model's own progress)."""
        if not is_prefill:
            return self.resolve(self.launch_decode(seqs, padded_size=padded_size))
        input_ids, meta = build_prefill(seqs, self.block_size, self.device, num_new_tokens, self._plan_prefill, starts)
        if self.tp is None:
            token_ids, logprobs = self.prefill_pass(input_ids, meta)
        else:  # every rank runs the same pass
            token_ids, logprobs = tp_worker.lead_prefill(self, input_ids, meta)
        return token_ids.tolist(), logprobs.tolist()

    def prefill_pass(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward pass and argmax of a prefill batch: next token ids and logprobs, on the device, of the rows
        in `meta.logits_indices` (none when every chunk stops short of its sequence's end; call it in inference
        mode)."""
        hidden = self.model(input_ids, meta, self.kv_cache)
        if hidden.shape[0] == 0:  # every chunk stopped short of its sequence's end: K/V written, no token
            return (torch.empty(0, dtype=torch.int64, device=self.device),
                    torch.empty(0, dtype=torch.float32, device=self.device))
        return self.model.sample(hidden)

    def plan_prefill(self, meta: AttentionMetadata) -> None:
        """Set `meta.prefill_plan` from the lengths in `meta` (reads them back from the device: for tensor-parallel
        followers, which receive the step's metadata; rank 0 plans from the host lists in `build_prefill`)."""
        if self._plan_prefill is not None:
            cu, kv_lens = meta.cu_seqlens_q.tolist(), meta.seq_lens.tolist()
            meta.prefill_plan = self._plan_prefill([b - a for a, b in zip(cu, cu[1:])], kv_lens)

    # ------------------------------------------------------------------ decode
    def decode_size(self, n: int) -> int:
        """Rows a decode batch of n sequences runs with: its batch bucket when padding, else n."""
        if not self.pad_decode:
            return n
        return bucket_for(self.batch_buckets, n) or n

    @torch.inference_mode()
    def launch_decode(self, seqs: list[Sequence], *, ids_on_device: bool = False, padded_size: int | None = None,
                      spec: list[list[int]] | None = None) -> PendingDecode:
        """Enqueue one decode step over `seqs` (row i feeds seqs[i]'s token at position num_tokens - 1) and the
        copy of its outputs to the host; nothing waits for the device.

        ids_on_device: the input ids are the previous step's argmax, still in the buffers: only valid when the
        previous step ran exactly these sequences in this order (DecodeBuffers checks the rows).
        spec: a verify pass: spec[i] are the tokens proposed for seqs[i], which then takes 1 + len(spec[i])
        consecutive rows (`DecodeBuffers.fill`); the outputs are each row's argmax and log-probability.
        """
        rows = len(seqs) if spec is None else len(seqs) + sum(len(p) for p in spec)
        size = self.decode_size(rows) if padded_size is None else padded_size
        buf = self.decode_buffers
        _, meta = buf.fill(seqs, self.block_size, size, ids_on_device=ids_on_device, defer_updates=True, spec=spec)
        try:
            if self.tp is not None:  # every rank runs the same step
                tp_worker.lead_decode(self.tp, buf, size, meta.max_seq_len)
            graphed = self.run_decode_step(size, meta)
        except BaseException as e:
            buf.forget_rows()  # the step's block-table updates may not have run
            if self.tp is not None:
                self.tp.abandon(e)  # the other ranks are somewhere in this step: stop them all
            raise
        return PendingDecode(seqs, buf.start_output_copy(), graphed, rows)

    def run_decode_step(self, size: int, meta: AttentionMetadata) -> bool:
        """Run a filled decode step: its captured graph when there is one (returns True), else eagerly (call it in
        inference mode)."""
        graph = self.graphs.get((size, bucket_for(self.context_buckets, meta.max_seq_len))) if self.graphs else None
        if graph is not None:
            graph.replay()
            self.num_graph_replays += 1
        else:
            self._decode_step(size, meta)
            self.num_eager_decodes += 1
        return graph is not None

    @torch.inference_mode()
    def decode_rows(self, rows: list[Sequence], lens: list[int], ids: list[int]) -> list[int]:
        """One decode step over explicit rows, waited for: row i feeds ids[i] to sequence rows[i] at position
        `lens[i] - 1` (attending to its first lens[i] tokens); returns each row's argmax (a draft model's steps,
        which feed tokens that are not the sequences' own yet). Runs the captured graph of its size when there is
        one. Not for tensor parallelism."""
        size = self.decode_size(len(rows))
        buf = self.decode_buffers
        _, meta = buf.fill_rows(rows, lens, ids, self.block_size, size, defer_updates=True)
        try:
            self.run_decode_step(size, meta)
        except BaseException:
            buf.forget_rows()
            raise
        return buf.read_outputs(buf.start_output_copy(), len(rows))[0]

    def resolve(self, pending: PendingDecode) -> tuple[list[int], list[float]]:
        """Wait for a launched step's outputs; its token ids and log-probabilities, one per row (per sequence, but
        for a verify pass)."""
        return self.decode_buffers.read_outputs(pending.handle, pending.num_rows)

    def _decode_step(self, size: int, meta: AttentionMetadata) -> None:
        """What a decode graph holds: the block-table updates, the forward pass, the LM head + argmax into
        the static ids (the next step's inputs) and logprobs. Reads and writes only static buffers."""
        buf = self.decode_buffers
        buf.apply_block_updates()
        hidden = self.model(buf.input_ids[:size], meta, self.kv_cache)
        self.model.sample(hidden, out=(buf.input_ids[:size], buf.logprobs[:size]))

    # ------------------------------------------------------------------ CUDA graphs
    @torch.inference_mode()
    def capture_cuda_graphs(self) -> None:
        """Capture a decode graph per (batch bucket, context bound), largest first, in one memory pool; each
        after one eager warm-up of the same step on the capture stream (Triton JIT, cuBLAS handles and
        workspace). Sets `graphs`, `graph_capture_s`, `graph_memory_bytes` and logs them."""
        if self.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need a CUDA device, not {self.device}")
        buf = self.decode_buffers
        t0 = time.perf_counter()
        torch.cuda.synchronize(self.device)
        gc.collect()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        stream = torch.cuda.Stream(self.device)
        pool = torch.cuda.graph_pool_handle()
        graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        # Every row padding (slot -1: no KV write; length 0: no attention) and no table update: the captured
        # steps touch nothing but scratch.
        buf.fill_padding()
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for size in reversed(self.batch_buckets):
                for bound in reversed(self.context_buckets):
                    _, meta = buf.metadata(size, bound)
                    self._decode_step(size, meta)  # warm-up
                    graph = torch.cuda.CUDAGraph()
                    try:
                        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
                        try:
                            self._decode_step(size, meta)
                        finally:
                            graph.capture_end()
                    except Exception as e:
                        raise RuntimeError(f"CUDA graph capture of the decode step failed (batch {size}, context "
                                           f"bound {bound}): {e}; cuda_graphs=False (--no-cuda-graphs) decodes "
                                           f"eagerly") from e
                    graphs[(size, bound)] = graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # the warm-ups' cached blocks; the graphs' pool stays
        self.graphs = graphs
        self.graph_capture_s = time.perf_counter() - t0
        self.graph_memory_bytes = max(0, free_before - torch.cuda.mem_get_info(self.device)[0])
        logger.info("captured %d decode CUDA graphs (batch %s x context %s) in %.2f s, %.1f MiB",
                    len(graphs), list(self.batch_buckets), list(self.context_buckets), self.graph_capture_s,
                    self.graph_memory_bytes / 2**20)

    def graph_summary(self) -> str:
        """One line on the decode graphs (for logs and benchmark notes)."""
        if not self.graphs:
            return "CUDA graphs off"
        return (f"{len(self.graphs)} CUDA graphs ({len(self.batch_buckets)} batch x {len(self.context_buckets)} "
                f"context buckets) captured in {self.graph_capture_s:.2f} s, "
                f"{self.graph_memory_bytes / 2**20:.0f} MiB")

"""Tensor parallelism, step by step: what rank 0 sends before each forward pass, and the loop of the ranks > 0.

Rank 0 leads. Before each forward pass it broadcasts a header (8 integers, host memory, over the gloo group) and
then the pass's inputs (device tensors, over the device group: NCCL on CUDA); each rank > 0 waits for the header,
receives the inputs into its own buffers, and runs the same pass, whose collectives (distributed.py) join the
ranks. Nothing is pickled per step. Messages:

    DECODE    header (DECODE, rows, longest sequence, first element sent, scattered block-table entries)
              1. `DecodeBuffers.packed[first:]`: the very elements rank 0 has just copied from its host staging to
                 its device (positions, slots, lengths, up to `max_updates` block-table changes, and the input ids
                 unless they are still on the device: the previous step's argmax, which every rank computed
                 alike). Every rank's `packed` thus holds the same bytes after the copy; the block tables change
                 by the same scatters; a batch padded to a captured size replays the same graph on every rank.
              2. only when a batch change rewrote more block-table entries than the packed region holds: those
                 (index, value) pairs, one int64 tensor.
    PREFILL   header (PREFILL, tokens T, sequences B, block-table width W, longest query, longest sequence,
              sampled rows S); one int64 tensor: ids[T] | positions[T] | slots[T] | block tables[B*W] |
              lengths[B] | cu_seqlens[B+1] | logits rows[S]. A step of chunks only samples no row (S = 0); the
              followers plan the prefill attention's KV splits from the received lengths, as rank 0 did.
    SHUTDOWN  header only: the followers leave the loop; their engines close and their processes exit

A step that fails half-way on rank 0 leaves the ranks out of step, so rank 0 then stops them all
(`TensorParallel.abandon`) before the error propagates.
"""
from __future__ import annotations

import torch

from .attention_metadata import INDEX_DTYPE, POSITION_DTYPE, SLOT_DTYPE, AttentionMetadata

OP_SHUTDOWN, OP_PREFILL, OP_DECODE = 0, 1, 2


# ---------------------------------------------------------------------- rank 0


def lead_prefill(runner, input_ids: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0: send a prefill pass to the other ranks, run it here; its (token ids, logprobs), computed."""
    tp = runner.tp
    try:
        tables = meta.block_tables
        tp.send_header(OP_PREFILL, input_ids.shape[0], meta.num_seqs, tables.shape[1], meta.max_q_len,
                       meta.max_seq_len, meta.logits_indices.shape[0])
        tp.broadcast(torch.cat([input_ids, meta.positions, meta.slot_mapping, tables.reshape(-1).long(),
                                meta.seq_lens.long(), meta.cu_seqlens_q.long(), meta.logits_indices]))
        out = runner.prefill_pass(input_ids, meta)
        tp.wait_device()
        return out
    except BaseException as e:
        tp.abandon(e)  # the other ranks are somewhere in this pass: stop them all
        raise


def lead_decode(tp, buffers, size: int, max_seq_len: int) -> None:
    """Rank 0: send a decode step, just filled into `buffers` (DecodeBuffers.fill), to the other ranks."""
    start, bulk = buffers.delta_start, buffers.delta_bulk
    tp.send_header(OP_DECODE, size, max_seq_len, start, 0 if bulk is None else bulk[0].numel())
    tp.broadcast(buffers.packed[start:])
    if bulk is not None:
        tp.broadcast(torch.cat([bulk[0], bulk[1].long()]))


# ---------------------------------------------------------------------- ranks > 0


@torch.inference_mode()
def follow(runner) -> None:
    """Ranks > 0: run every pass rank 0 leads, into this rank's own buffers and KV cache, until it shuts down."""
    tp, buf, device = runner.tp, runner.decode_buffers, runner.device
    while True:
        op, a, b, c, d, e, f, _ = tp.recv_header()
        if op == OP_DECODE:
            size, max_seq_len, start, n_bulk = a, b, c, d
            tp.broadcast(buf.packed[start:])
            if n_bulk:
                pairs = tp.broadcast(torch.empty(2 * n_bulk, dtype=torch.int64, device=device))
                buf.scatter_table_entries(pairs[:n_bulk], pairs[n_bulk:].to(INDEX_DTYPE))
            _, meta = buf.metadata(size, max_seq_len)
            runner.run_decode_step(size, meta)
        elif op == OP_PREFILL:
            input_ids, meta = _receive_prefill(tp, device, a, b, c, d, e, f)
            runner.plan_prefill(meta)  # the attention's KV splits, as rank 0 planned them from the same lengths
            runner.prefill_pass(input_ids, meta)
        elif op == OP_SHUTDOWN:
            return
        else:
            raise RuntimeError(f"tensor parallelism: unknown step header {op} from rank 0")


def _receive_prefill(tp, device, num_tokens: int, num_seqs: int, width: int, max_q_len: int, max_seq_len: int,
                     num_sampled: int) -> tuple[torch.Tensor, AttentionMetadata]:
    t, b = num_tokens, num_seqs
    sizes = (t, t, t, b * width, b, b + 1, num_sampled)
    flat = tp.broadcast(torch.empty(sum(sizes), dtype=torch.int64, device=device))
    ids, pos, slots, tables, lens, cu, rows = flat.split(sizes)
    meta = AttentionMetadata(
        is_prefill=True, positions=pos.to(POSITION_DTYPE), slot_mapping=slots.to(SLOT_DTYPE),
        block_tables=tables.to(INDEX_DTYPE).view(b, width), seq_lens=lens.to(INDEX_DTYPE),
        cu_seqlens_q=cu.to(INDEX_DTYPE), logits_indices=rows, max_q_len=max_q_len, max_seq_len=max_seq_len,
        num_seqs=b)
    return ids, meta

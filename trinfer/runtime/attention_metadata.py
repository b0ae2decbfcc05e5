"""Per-step attention metadata: built once per forward pass and shared by every layer.

A forward pass is either a prefill batch (each sequence's uncached tokens, concatenated) or a decode batch
(one token per sequence). Decode metadata lives in static buffers allocated once (`DecodeBuffers`), so
that a CUDA graph captured over them replays with new contents; a batch can be padded to a larger
captured size with slot -1 (no KV write) and sequence length 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .sequence import Sequence

POSITION_DTYPE = torch.int64
SLOT_DTYPE = torch.int64
INDEX_DTYPE = torch.int32  # block tables, sequence lengths, cu_seqlens


@dataclass(slots=True)
class AttentionMetadata:
    """What every layer needs to place and attend to this step's tokens.

    Shapes: T tokens in the step, B sequences.
        positions     [T] int64  position of each token in its sequence (rotary embedding)
        slot_mapping  [T] int64  cache slot each token's K/V is written to; -1 writes nothing (padding)
        block_tables  [B, max_blocks] int32  cache blocks of each sequence, in order
        seq_lens      [B] int32  tokens of each sequence in the cache once this step's K/V is written
        cu_seqlens_q  [B+1] int32  prefill: offsets of each sequence's tokens in the T dim (None in decode)
        logits_indices [B] int64  prefill: row of each sequence's last token (None in decode: row b is b)
        max_q_len, max_seq_len: host-side maxima (launch sizes without a device sync)
    """

    is_prefill: bool
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor | None
    logits_indices: torch.Tensor | None
    max_q_len: int
    max_seq_len: int
    num_seqs: int

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]


def _slots(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    return [block_table[t // block_size] * block_size + t % block_size for t in range(start, end)]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def build_prefill(seqs: list[Sequence], block_size: int, device: torch.device) -> tuple[torch.Tensor, AttentionMetadata]:
    """Input ids and metadata for prefilling the uncached tokens of each sequence (whole prompts, or
    prompt + generated tokens when recomputing after preemption)."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    cu = [0]
    seq_lens = []
    max_blocks = max(len(s.block_table) for s in seqs)
    tables = torch.zeros((len(seqs), max_blocks), dtype=INDEX_DTYPE)
    for i, s in enumerate(seqs):
        start, end = s.num_cached_tokens, s.num_tokens
        input_ids.extend(s.token_ids[start:end])
        positions.extend(range(start, end))
        slots.extend(_slots(s.block_table, start, end, block_size))
        cu.append(cu[-1] + end - start)
        seq_lens.append(end)
        tables[i, : len(s.block_table)] = torch.tensor(s.block_table, dtype=INDEX_DTYPE)
    q_lens = [cu[i + 1] - cu[i] for i in range(len(seqs))]
    meta = AttentionMetadata(
        is_prefill=True,
        positions=_to_device(torch.tensor(positions, dtype=POSITION_DTYPE), device),
        slot_mapping=_to_device(torch.tensor(slots, dtype=SLOT_DTYPE), device),
        block_tables=_to_device(tables, device),
        seq_lens=_to_device(torch.tensor(seq_lens, dtype=INDEX_DTYPE), device),
        cu_seqlens_q=_to_device(torch.tensor(cu, dtype=INDEX_DTYPE), device),
        logits_indices=_to_device(torch.tensor(cu[1:], dtype=torch.int64) - 1, device),
        max_q_len=max(q_lens),
        max_seq_len=max(seq_lens),
        num_seqs=len(seqs),
    )
    return _to_device(torch.tensor(input_ids, dtype=torch.int64), device), meta


class DecodeBuffers:
    """Static device buffers for decode steps of up to `max_num_seqs` sequences.

    `fill()` writes a batch into host staging tensors (pinned on CUDA), copies them into the device
    buffers, and returns input ids and metadata that are views of those buffers: the same storage every
    step, as CUDA-graph replay requires. Rows past the batch (padding up to `padded_size`) get token 0,
    position 0, slot -1 and length 0.
    """

    def __init__(self, max_num_seqs: int, max_blocks_per_seq: int, device: torch.device):
        self.max_num_seqs = max_num_seqs
        self.max_blocks_per_seq = max_blocks_per_seq
        self.device = device
        pin = device.type == "cuda"

        def pair(shape, dtype):
            host = torch.zeros(shape, dtype=dtype, pin_memory=pin)
            return host, torch.zeros(shape, dtype=dtype, device=device)

        self._h_ids, self.input_ids = pair((max_num_seqs,), torch.int64)
        self._h_pos, self.positions = pair((max_num_seqs,), POSITION_DTYPE)
        self._h_slots, self.slot_mapping = pair((max_num_seqs,), SLOT_DTYPE)
        self._h_lens, self.seq_lens = pair((max_num_seqs,), INDEX_DTYPE)
        self._h_tables, self.block_tables = pair((max_num_seqs, max_blocks_per_seq), INDEX_DTYPE)

    def fill(self, seqs: list[Sequence], block_size: int, padded_size: int | None = None
             ) -> tuple[torch.Tensor, AttentionMetadata]:
        n = len(seqs)
        size = n if padded_size is None else padded_size
        if not 1 <= n <= size <= self.max_num_seqs:
            raise ValueError(f"decode batch: expected 1 <= {n} sequences <= padded size {size} <= {self.max_num_seqs}")
        ids, pos, slots, lens = [], [], [], []
        max_len = 0
        for i, s in enumerate(seqs):
            p = s.num_tokens - 1
            ids.append(s.last_token_id)
            pos.append(p)
            slots.append(s.block_table[p // block_size] * block_size + p % block_size)
            lens.append(s.num_tokens)
            max_len = max(max_len, s.num_tokens)
            nb = len(s.block_table)
            if nb > self.max_blocks_per_seq:
                raise ValueError(f"{s!r}: {nb} blocks, more than the {self.max_blocks_per_seq} per sequence")
            self._h_tables[i, :nb] = torch.tensor(s.block_table, dtype=INDEX_DTYPE)
        pad = size - n
        self._h_ids[:size] = torch.tensor(ids + [0] * pad)
        self._h_pos[:size] = torch.tensor(pos + [0] * pad)
        self._h_slots[:size] = torch.tensor(slots + [-1] * pad)
        self._h_lens[:size] = torch.tensor(lens + [0] * pad)
        if pad:
            self._h_tables[n:size] = 0
        nb = -(-max_len // block_size)  # only the columns some sequence uses need to travel
        self.input_ids[:size].copy_(self._h_ids[:size], non_blocking=True)
        self.positions[:size].copy_(self._h_pos[:size], non_blocking=True)
        self.slot_mapping[:size].copy_(self._h_slots[:size], non_blocking=True)
        self.seq_lens[:size].copy_(self._h_lens[:size], non_blocking=True)
        self.block_tables[:size, :nb].copy_(self._h_tables[:size, :nb], non_blocking=True)
        meta = AttentionMetadata(
            is_prefill=False,
            positions=self.positions[:size],
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size],
            seq_lens=self.seq_lens[:size],
            cu_seqlens_q=None,
            logits_indices=None,
            max_q_len=1,
            max_seq_len=max_len,
            num_seqs=size,
        )
        return self.input_ids[:size], meta

"""Per-step attention metadata: built once per forward pass and shared by every layer.

A forward pass is either a prefill batch (a run of each sequence's uncomputed tokens, concatenated) or a decode batch
(one token per sequence; in a verify pass of speculative decoding, one row per token to check, each a decode row of
its own length). Decode metadata lives in static buffers allocated once (`DecodeBuffers`), so
that a CUDA graph captured over them replays with new contents; a batch can be padded to a larger
captured size with slot -1 (no KV write) and sequence length 0. The decode buffers are updated
incrementally (only what changed since the previous step travels to the device).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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
        logits_indices [N] int64  prefill: row of the last token of each sequence whose run ends at its last
                                  token, i.e. that gets a next token (None in decode: row b is b)
        max_q_len, max_seq_len: host-side maxima (launch sizes without a device sync); in a captured decode
            step max_seq_len is the graph's bound, not the batch's longest sequence
        decode_workspace: fp32 scratch of the split decode attention, allocated once (None: allocated per call)
        prefill_plan: prefill: the attention kernel's launch plan (KV splits; `triton_kernels.PrefillPlan`), built
            once per step for the backends that use it (None: not split)
        seq_starts: a verify pass (speculative decoding; a decode batch whose sequences take several consecutive
            rows, each a decode row of its own length): host offsets of each sequence's first row, then the number
            of rows; None otherwise (a backend may use it to read each sequence's K/V once for all its rows)
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
    decode_workspace: torch.Tensor | None = None  # decode: preallocated attention scratch (static for CUDA graphs)
    prefill_plan: object | None = None  # prefill: PrefillPlan of the Triton attention kernel (KV splits)
    seq_starts: list[int] | None = None  # verify pass: each sequence's first row (host), then the row count

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]


def _slots(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    return [block_table[t // block_size] * block_size + t % block_size for t in range(start, end)]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def build_prefill(seqs: list[Sequence], block_size: int, device: torch.device,
                  num_new_tokens: list[int] | None = None, planner=None, starts: list[int] | None = None
                  ) -> tuple[torch.Tensor, AttentionMetadata]:
    """Input ids and metadata for prefilling a run of each sequence's uncomputed tokens: `num_new_tokens[i]`
    tokens of seqs[i] from its `num_computed_tokens` on (default: all the rest). The run is a chunk of a long
    prompt, a whole prompt, the part of a prompt after a cached prefix, or prompt + generated tokens when
    recomputing after preemption. Only sequences whose run reaches their last token get a row in
    `logits_indices` (a next token); the others only write K/V. `planner(q_lens, kv_lens)`, when given, plans
    the prefill attention launch (`meta.prefill_plan`). `starts[i]`, when given, replaces seqs[i]'s
    `num_computed_tokens` as the first token of its run (a draft model, whose cache lags the target's)."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    cu = [0]
    seq_lens = []
    q_lens = []
    logits = []
    max_blocks = max(len(s.block_table) for s in seqs)
    tables = torch.zeros((len(seqs), max_blocks), dtype=INDEX_DTYPE)
    for i, s in enumerate(seqs):
        start = s.num_computed_tokens if starts is None else starts[i]
        end = s.num_tokens if num_new_tokens is None else start + num_new_tokens[i]
        if not start < end <= s.num_tokens:
            raise ValueError(f"{s!r}: cannot prefill tokens [{start}, {end}) of {s.num_tokens}")
        input_ids.extend(s.token_ids[start:end])
        positions.extend(range(start, end))
        slots.extend(_slots(s.block_table, start, end, block_size))
        cu.append(cu[-1] + end - start)
        seq_lens.append(end)
        q_lens.append(end - start)
        if end == s.num_tokens:
            logits.append(cu[-1] - 1)
        tables[i, : len(s.block_table)] = torch.tensor(s.block_table, dtype=INDEX_DTYPE)
    meta = AttentionMetadata(
        is_prefill=True,
        positions=_to_device(torch.tensor(positions, dtype=POSITION_DTYPE), device),
        slot_mapping=_to_device(torch.tensor(slots, dtype=SLOT_DTYPE), device),
        block_tables=_to_device(tables, device),
        seq_lens=_to_device(torch.tensor(seq_lens, dtype=INDEX_DTYPE), device),
        cu_seqlens_q=_to_device(torch.tensor(cu, dtype=INDEX_DTYPE), device),
        logits_indices=_to_device(torch.tensor(logits, dtype=torch.int64), device),
        max_q_len=max(q_lens),
        max_seq_len=max(seq_lens),
        num_seqs=len(seqs),
        prefill_plan=planner(q_lens, seq_lens) if planner is not None else None,
    )
    return _to_device(torch.tensor(input_ids, dtype=torch.int64), device), meta


class DecodeBuffers:
    """Static decode-step buffers for up to `max_num_seqs` sequences, updated incrementally from the host.

    Device memory, allocated once (a captured CUDA graph holds pointers into it):
        packed        int64: | logprobs (fp32) | ids | positions | slots | seq_lens (int32) | table updates |
                      `input_ids` are the step's inputs and, once the step ran, its argmax outputs (the next
                      step's inputs: a step that continues the same batch leaves them on the device).
        block_tables  int32 [max_num_seqs + 1, max_blocks_per_seq]; the extra row absorbs unused updates.
    Host memory:
        two pinned staging copies of `packed` used in turn (a copy still in flight is never overwritten; an
        event guards the reuse), a numpy mirror of the block tables, and which sequence and which block-table
        list each row holds.

    `fill()` costs O(batch) Python for the new lengths, vectorized numpy for positions and slots, and one
    host-to-device copy of the packed staging. Block tables travel only as changes: the new block of a
    sequence that crossed a block boundary, or a whole row when a row changes hands (the batch changed).
    Up to `max_updates` changes ride in the packed copy and are scattered on the device by
    `apply_block_updates()` (which a CUDA graph captures); more are scattered at once by a separate copy.
    Rows past the batch (padding up to `padded_size`) get position 0, slot -1 and length 0.
    """

    def __init__(self, max_num_seqs: int, max_blocks_per_seq: int, device: torch.device, *,
                 max_updates: int | None = None):
        m, w = max_num_seqs, max_blocks_per_seq
        k = max(m, 1) if max_updates is None else max_updates
        self.max_num_seqs, self.max_blocks_per_seq, self.device, self.max_updates = m, w, device, k
        half = (m + 1) // 2
        # Offsets (in int64 units) of the regions of `packed`.
        self._lp, self._ids = 0, half
        self._pos = self._ids + m
        self._slot = self._pos + m
        self._lens = self._slot + m
        self._uidx = self._lens + half
        self._uval = self._uidx + k
        numel = self._uval + (k + 1) // 2
        self._cuda = device.type == "cuda"

        self.packed = torch.zeros(numel, dtype=torch.int64, device=device)
        self._tables_dev = torch.zeros((m + 1, w), dtype=INDEX_DTYPE, device=device)
        self._tables_flat = self._tables_dev.view(-1)
        self._sink = m * w  # first entry of the extra row
        self.logprobs = self.packed[self._lp: self._ids].view(torch.float32)[:m]
        self.input_ids = self.packed[self._ids: self._pos]
        self.positions = self.packed[self._pos: self._slot]
        self.slot_mapping = self.packed[self._slot: self._lens]
        self.seq_lens = self.packed[self._lens: self._uidx].view(torch.int32)[:m]
        self.block_tables = self._tables_dev[:m]
        self._upd_idx = self.packed[self._uidx: self._uval]
        self._upd_val = self.packed[self._uval:].view(torch.int32)[:k]
        self.workspace: torch.Tensor | None = None  # decode attention scratch, set by the model runner
        # What the last `fill` sent (tensor parallelism resends it to the other ranks, tp_worker.py): the first
        # element of `packed` copied, and the (index, value) block-table scatters made outside it, if any.
        self.delta_start = self._ids
        self.delta_bulk: tuple[torch.Tensor, torch.Tensor] | None = None
        self.event_wait = None  # CUDA: how read_outputs waits for its copy (default: Event.synchronize)
        self._views: dict[int, tuple] = {}

        self._staging = [torch.zeros(numel, dtype=torch.int64, pin_memory=self._cuda) for _ in range(2)]
        self._staging_np = [self._regions(t.numpy()) for t in self._staging]
        self._staging_rows = [m, m]     # rows of each staging copy that may hold a sequence (the rest: padding)
        self._staging_updates = [k, k]  # update entries of each staging copy that may not point at the sink
        self._copy_views = {}           # (staging index, ids too) -> (device slice, staging slice)
        self._staging_events = [torch.cuda.Event() if self._cuda else None for _ in range(2)]
        self._staging_used = [False, False]
        self._next_staging = 0
        self._out_host = [torch.zeros(self._pos, dtype=torch.int64, pin_memory=self._cuda) for _ in range(2)]
        self._out_np = [dict(ids=t.numpy()[self._ids:], lp=t.numpy()[: self._ids].view(np.float32)[:m])
                        for t in self._out_host]
        self._out_events = [torch.cuda.Event() if self._cuda else None for _ in range(2)]
        self._next_out = 0

        self._tables = np.zeros((m, w), dtype=np.int32)  # host mirror of block_tables
        self._row_nblocks = [0] * m   # entries of the row written so far (mirrored in _row_nblocks_np)
        self._row_nblocks_np = np.zeros(m, dtype=np.int64)
        self._row_seq: list = [None] * m  # the sequence each row holds
        self._row_bt: list = [None] * m   # the block-table list object it held then (a new list = new blocks)
        self._num_rows = 0
        self._rows = np.arange(m, dtype=np.int64)
        for r in self._staging_np:
            self._pad(r, 0, m, 0, k)
        self.fill_padding()

    # ------------------------------------------------------------------ views
    def _regions(self, h: np.ndarray) -> dict[str, np.ndarray]:
        """numpy views of the regions of a host copy of `packed`."""
        m, k = self.max_num_seqs, self.max_updates
        return dict(ids=h[self._ids: self._pos], pos=h[self._pos: self._slot], slot=h[self._slot: self._lens],
                    lens=h[self._lens: self._uidx].view(np.int32)[:m], uidx=h[self._uidx: self._uval],
                    uval=h[self._uval:].view(np.int32)[:k], lp=h[self._lp: self._ids].view(np.float32)[:m])

    def _pad(self, r: dict[str, np.ndarray], n: int, rows: int, u: int, updates: int) -> None:
        """Rows n..rows as padding (id 0, position 0, slot -1, length 0); update entries u..updates unused."""
        if rows > n:
            r["ids"][n:rows] = 0
            r["pos"][n:rows] = 0
            r["slot"][n:rows] = -1
            r["lens"][n:rows] = 0
        if updates > u:
            r["uidx"][u:updates] = self._sink
            r["uval"][u:updates] = 0

    def fill_padding(self) -> None:
        """Every row padding and no table update, on the device now (synchronous; before graph capture)."""
        h = torch.zeros(self._staging[0].shape, dtype=torch.int64)
        self._pad(self._regions(h.numpy()), 0, self.max_num_seqs, 0, self.max_updates)
        self.packed.copy_(h)

    def metadata(self, size: int, max_seq_len: int) -> tuple[torch.Tensor, AttentionMetadata]:
        """Input ids and metadata of a decode batch of `size` rows: views of the static buffers (the same
        storage for every step). `max_seq_len` sizes the attention grid: the batch's longest sequence, or
        for a captured graph any upper bound of it."""
        v = self._views.get(size)
        if v is None:
            v = self._views[size] = (self.input_ids[:size], self.positions[:size], self.slot_mapping[:size],
                                     self.block_tables[:size], self.seq_lens[:size])
        ids, pos, slots, tables, lens = v
        return ids, AttentionMetadata(
            is_prefill=False, positions=pos, slot_mapping=slots, block_tables=tables, seq_lens=lens,
            cu_seqlens_q=None, logits_indices=None, max_q_len=1, max_seq_len=max_seq_len, num_seqs=size,
            decode_workspace=self.workspace)

    # ------------------------------------------------------------------ one step's inputs
    def fill(self, seqs: list[Sequence], block_size: int, padded_size: int | None = None, *,
             ids_on_device: bool = False, defer_updates: bool = False, spec: list[list[int]] | None = None
             ) -> tuple[torch.Tensor, AttentionMetadata]:
        """Write a decode batch into the static buffers (enqueued: non-blocking copies on CUDA).

        Row i holds seqs[i], fed at position `num_tokens - 1`. ids_on_device: the ids are already in
        `input_ids` (the previous step's argmax over exactly the same batch); else each sequence's
        `last_token_id` is sent. defer_updates: leave the block-table changes to `apply_block_updates()`
        (the model runner runs it inside the captured step); else they are applied here.
        spec: a verify pass (speculative decoding): spec[i] are the tokens proposed for seqs[i], which then takes
        1 + len(spec[i]) consecutive rows: row j feeds token j of [its newest token] + spec[i] at position
        `num_tokens - 1 + j` and attends to its first `num_tokens + j` tokens, i.e. each row is the decode row
        that position would be (its own length; the rows share the sequence's block table). The metadata's
        `seq_starts` then gives each sequence's first row.
        Returns `metadata(size, longest row)`.
        """
        if spec is None:
            lens = [s.num_tokens for s in seqs]
            ids = None if ids_on_device else [s.token_ids[-1] for s in seqs]
            return self.fill_rows(seqs, lens, ids, block_size, padded_size, defer_updates=defer_updates)
        if ids_on_device:
            raise ValueError("decode batch: a verify pass sends its proposed tokens from the host (ids_on_device=False)")
        if len(spec) != len(seqs):
            raise ValueError(f"spec: expected one proposal list per sequence ({len(seqs)}), got {len(spec)}")
        rows: list[Sequence] = []
        lens, ids, starts = [], [], [0]
        for s, proposal in zip(seqs, spec):
            n = s.num_tokens
            rows += [s] * (1 + len(proposal))
            lens += range(n, n + 1 + len(proposal))
            ids.append(s.token_ids[-1])
            ids += proposal
            starts.append(len(rows))
        return self.fill_rows(rows, lens, ids, block_size, padded_size, defer_updates=defer_updates, seq_starts=starts)

    def fill_rows(self, rows: list[Sequence], lens: list[int], ids: list[int] | None, block_size: int,
                  padded_size: int | None = None, *, defer_updates: bool = False,
                  seq_starts: list[int] | None = None) -> tuple[torch.Tensor, AttentionMetadata]:
        """Write decode rows into the static buffers: row i is a query of sequence rows[i] at position
        `lens[i] - 1` over its first `lens[i]` tokens (its own K/V written at that position's slot), fed token
        ids[i] (ids None: the ids already in `input_ids`, the previous step's argmax over the same rows).
        A sequence may take several rows (a verify pass; a draft model's steps). `seq_starts` (host offsets of
        each sequence's first row, and the end) is handed on in the metadata. See `fill`."""
        try:
            return self._fill(rows, lens, ids, block_size, padded_size, defer_updates, seq_starts)
        except BaseException:
            self.forget_rows()  # the host mirror may be ahead of the device: rewrite every row next time
            raise

    def forget_rows(self) -> None:
        """Treat every row as new at the next `fill` (after an error, or a step whose deferred updates never
        ran): its block-table row is then sent in full."""
        self._row_seq = [None] * self.max_num_seqs
        self._row_bt = [None] * self.max_num_seqs

    def _fill(self, seqs, lens, ids, block_size, padded_size, defer_updates, seq_starts):
        n = len(seqs)
        size = n if padded_size is None else padded_size
        m, w = self.max_num_seqs, self.max_blocks_per_seq
        if not 1 <= n <= size <= m:
            raise ValueError(f"decode batch: expected 1 <= {n} rows <= padded size {size} <= {m}")
        if len(lens) != n or (ids is not None and len(ids) != n):
            raise ValueError(f"decode batch: expected {n} lengths and ids (one per row), got {len(lens)} and "
                             f"{None if ids is None else len(ids)}")
        ids_on_device = ids is None
        row_seq, row_bt, row_nb, tables = self._row_seq, self._row_bt, self._row_nblocks, self._tables
        changed, grown = [], []
        for i, s in enumerate(seqs):
            bt = s.block_table
            if row_seq[i] is not s or row_bt[i] is not bt:
                changed.append(i)
            elif len(bt) != row_nb[i]:
                grown.append(i)
        if changed and ids_on_device:
            raise RuntimeError("decode batch: ids_on_device needs the rows of the previous step, but the batch "
                               f"changed at rows {changed[:8]}")
        for i in range(n, self._num_rows):  # rows no longer in use: forget their sequences
            row_seq[i] = row_bt[i] = None
        self._num_rows = n

        upd_idx: list[int] = []
        upd_val: list[int] = []
        for i, fresh in [(i, False) for i in grown] + [(i, True) for i in changed]:
            s = seqs[i]
            bt = s.block_table
            nb = len(bt)
            if nb > w:
                raise ValueError(f"{s!r}: {nb} blocks, more than the {w} per sequence")
            j0 = 0 if fresh else min(row_nb[i], nb)
            if nb > j0:
                new = bt[j0:nb]
                tables[i, j0:nb] = new
                upd_idx.extend(range(i * w + j0, i * w + nb))
                upd_val.extend(new)
            row_nb[i] = nb
            if fresh:
                row_seq[i], row_bt[i] = s, bt
            self._row_nblocks_np[i] = nb

        lens_np = np.array(lens, dtype=np.int64)
        pos = lens_np - 1  # >= 0: a sequence always holds a token
        blk = pos // block_size
        bad = blk >= self._row_nblocks_np[:n]
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{seqs[i]!r}: token {int(pos[i])} has no KV block (blocks {seqs[i].block_table})")
        slots = tables[self._rows[:n], blk].astype(np.int64) * block_size + pos % block_size

        k = self._next_staging
        self._next_staging ^= 1
        if self._staging_used[k] and self._staging_events[k] is not None:
            self._staging_events[k].synchronize()  # its previous copy has long run; never overwrite one in flight
        r = self._staging_np[k]
        bulk = len(upd_idx) > self.max_updates
        nu = 0 if bulk else len(upd_idx)
        self._pad(r, n, self._staging_rows[k], nu, self._staging_updates[k])
        self._staging_rows[k], self._staging_updates[k] = n, nu
        if not ids_on_device:
            r["ids"][:n] = ids
        r["pos"][:n] = pos
        r["slot"][:n] = slots
        r["lens"][:n] = lens_np
        if nu:
            r["uidx"][:nu] = upd_idx
            r["uval"][:nu] = upd_val
        start = self._pos if ids_on_device else self._ids
        views = self._copy_views.get((k, ids_on_device))
        if views is None:
            views = self._copy_views[(k, ids_on_device)] = (self.packed[start:], self._staging[k][start:])
        views[0].copy_(views[1], non_blocking=True)
        self._staging_used[k] = True
        if self._staging_events[k] is not None:
            self._staging_events[k].record(torch.cuda.current_stream(self.device))
        self.delta_start, self.delta_bulk = start, None
        if bulk:  # a batch change rewrote many rows: scatter them now, outside the (fixed-size) update region
            idx = torch.from_numpy(np.array(upd_idx, dtype=np.int64))
            val = torch.from_numpy(np.array(upd_val, dtype=np.int32))
            if self._cuda:
                idx = idx.pin_memory().to(self.device, non_blocking=True)
                val = val.pin_memory().to(self.device, non_blocking=True)
            self.scatter_table_entries(idx, val)
            self.delta_bulk = (idx, val)
        if not defer_updates:
            self.apply_block_updates()
        _, meta = self.metadata(size, int(lens_np.max()))
        meta.seq_starts = seq_starts
        return self.input_ids[:size], meta

    def scatter_table_entries(self, idx: torch.Tensor, val: torch.Tensor) -> None:
        """block_tables.view(-1)[idx] = val (idx int64, val int32, on the device), now."""
        self._tables_flat.index_copy_(0, idx, val)

    def apply_block_updates(self) -> None:
        """Scatter the block-table changes of the last `fill` into `block_tables` (a fixed-size device op, the
        same every step: unused entries write 0 into the extra row). Runs inside the captured decode step."""
        self._tables_flat.index_copy_(0, self._upd_idx, self._upd_val)

    # ------------------------------------------------------------------ outputs
    def start_output_copy(self) -> int:
        """Enqueue the copy of the step's ids and logprobs to pinned host memory; returns a handle for
        `read_outputs`. Two host buffers are used in turn: read a handle before starting the second copy
        after it."""
        k = self._next_out
        self._next_out ^= 1
        self._out_host[k].copy_(self.packed[: self._pos], non_blocking=True)
        if self._out_events[k] is not None:
            self._out_events[k].record(torch.cuda.current_stream(self.device))
        return k

    def read_outputs(self, handle: int, n: int) -> tuple[list[int], list[float]]:
        """Wait for the copy `handle` (the only host synchronisation of a decode step) and return the first
        n ids and logprobs."""
        event = self._out_events[handle]
        if event is not None:
            event.synchronize() if self.event_wait is None else self.event_wait(event)
        r = self._out_np[handle]
        return r["ids"][:n].tolist(), r["lp"][:n].tolist()

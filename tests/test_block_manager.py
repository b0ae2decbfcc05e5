"""Block manager and KV-cache sizing: plain Python, no model."""
import pytest
import torch

from trinfer.runtime.attention_metadata import DecodeBuffers, build_prefill
from trinfer.runtime.block_manager import BlockManager, blocks_needed
from trinfer.runtime.kv_cache import allocate_kv_cache, bytes_per_block, choose_num_blocks
from trinfer.runtime.sampling_params import SamplingParams
from trinfer.runtime.sequence import Sequence


def seq(n_tokens, rid=0):
    return Sequence(rid, list(range(1, n_tokens + 1)), SamplingParams(max_new_tokens=8))


def test_allocate_append_free():
    bm = BlockManager(num_blocks=6, block_size=4)
    a, b = seq(5, 0), seq(4, 1)
    assert bm.can_allocate(a)
    bm.allocate(a)
    assert len(a.block_table) == 2 and bm.num_free_blocks == 4
    bm.allocate(b)
    assert len(b.block_table) == 1 and bm.num_free_blocks == 3
    assert not set(a.block_table) & set(b.block_table)
    # b has 4 tokens in 1 block; its 5th token (fed next decode step) needs a new block.
    b.append_token(7, 0.0, 0.0)
    assert bm.can_append(b)
    bm.append(b)
    assert len(b.block_table) == 2 and bm.num_free_blocks == 2
    # a has 5 tokens in 2 blocks (room for 8): appending up to 8 takes nothing.
    for _ in range(3):
        a.append_token(7, 0.0, 0.0)
        bm.append(a)
    assert len(a.block_table) == 2 and bm.num_free_blocks == 2
    bm.free(a)
    assert a.block_table == [] and bm.num_free_blocks == 4
    bm.free(b)
    assert bm.num_free_blocks == 6


def test_can_allocate_and_append_when_full():
    bm = BlockManager(num_blocks=2, block_size=4)
    a = seq(8)
    bm.allocate(a)
    assert bm.num_free_blocks == 0
    assert not bm.can_allocate(seq(1, 1))
    a.append_token(3, 0.0, 0.0)  # 9th token: needs a third block
    assert not bm.can_append(a)
    with pytest.raises(RuntimeError):
        bm.append(a)
    with pytest.raises(RuntimeError, match="already holds"):
        bm.allocate(a)


def test_can_append_boundary_both_ways():
    """Zero free blocks: a sequence whose every token already has a slot can still append (its newest token's
    slot exists); one token more needs a block it cannot get. Checked at a full block and mid-block."""
    bm = BlockManager(num_blocks=3, block_size=4)
    a, b = seq(8, 0), seq(3, 1)  # a: two full blocks; b: 3 of 4 slots of one block
    bm.allocate(a)
    bm.allocate(b)
    assert bm.num_free_blocks == 0
    assert bm.can_append(a) and bm.can_append(b)  # exact fit: 8 tokens in 8 slots, 3 in 4
    bm.append(a)  # takes nothing
    assert len(a.block_table) == 2 and bm.num_free_blocks == 0
    b.append_token(3, 0.0, 0.0)  # b: 4 tokens in 4 slots, still no block needed
    assert bm.can_append(b)
    bm.append(b)
    assert len(b.block_table) == 1 and bm.num_free_blocks == 0
    for s in (a, b):  # one more token each: slot 9 of 8 / 5 of 4
        s.append_token(3, 0.0, 0.0)
        assert not bm.can_append(s)
    bm.free(b)  # one block free: exactly one of them can grow
    assert bm.can_append(a)
    bm.append(a)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 0
    a.append_token(3, 0.0, 0.0)  # 10 tokens in 12 slots
    assert bm.can_append(a)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_sizes(bad):
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(num_blocks=bad, block_size=4)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(num_blocks=4, block_size=bad)


def test_blocks_needed():
    assert [blocks_needed(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


class _Cfg:
    num_layers, num_kv_heads, head_dim = 3, 2, 8


def test_num_blocks_from_budget():
    per = bytes_per_block(_Cfg, 4, torch.float32)
    assert per == 2 * 3 * 4 * 2 * 8 * 4
    kw = dict(block_size=4, dtype=torch.float32, device=torch.device("cpu"), max_num_seqs=2, max_model_len=64)
    assert choose_num_blocks(_Cfg, num_blocks=7, **kw) == 7
    assert choose_num_blocks(_Cfg, memory_bytes=10 * per + 1, **kw) == 10
    assert choose_num_blocks(_Cfg, **kw) == 2 * 16  # the CPU default is capped at what 2 full contexts need
    with pytest.raises(ValueError, match="hold no KV block"):
        choose_num_blocks(_Cfg, memory_bytes=per - 1, **kw)
    with pytest.raises(ValueError, match="at most one"):
        choose_num_blocks(_Cfg, num_blocks=3, memory_bytes=10 * per, **kw)
    with pytest.raises(ValueError, match="num_kv_blocks"):
        choose_num_blocks(_Cfg, num_blocks=0, **kw)


def test_kv_cache_layout():
    kv = allocate_kv_cache(_Cfg, num_blocks=5, block_size=4, dtype=torch.float16, device=torch.device("cpu"))
    assert len(kv.k) == len(kv.v) == 3
    for t in kv.k + kv.v:
        assert t.shape == (5, 4, 2, 8) and t.is_contiguous() and t.dtype == torch.float16
    assert kv.nbytes == 5 * bytes_per_block(_Cfg, 4, torch.float16)
    kv.k[1].fill_(1)  # layers do not alias
    assert kv.k[0].abs().sum() == 0 and kv.v[1].abs().sum() == 0


def test_prefill_metadata_slots():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = seq(6, 0), seq(3, 1)
    bm.allocate(b)  # b gets block 0, a gets blocks 1, 2
    bm.allocate(a)
    ids, meta = build_prefill([a, b], 4, torch.device("cpu"))
    assert ids.tolist() == a.token_ids + b.token_ids
    assert meta.positions.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert meta.slot_mapping.tolist() == [4, 5, 6, 7, 8, 9, 0, 1, 2]
    assert meta.cu_seqlens_q.tolist() == [0, 6, 9]
    assert meta.seq_lens.tolist() == [6, 3]
    assert meta.logits_indices.tolist() == [5, 8]
    assert meta.block_tables.tolist() == [[1, 2], [0, 0]]
    assert (meta.max_q_len, meta.max_seq_len, meta.num_seqs, meta.is_prefill) == (6, 6, 2, True)
    assert meta.block_tables.dtype == torch.int32 and meta.slot_mapping.dtype == torch.int64


def test_decode_buffers_static_and_padded():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = seq(4, 0), seq(6, 1)
    bm.allocate(a)
    bm.allocate(b)
    for s in (a, b):
        s.append_token(42, 0.0, 0.0)
        bm.append(s)
    bufs = DecodeBuffers(max_num_seqs=4, max_blocks_per_seq=3, device=torch.device("cpu"))
    ids, meta = bufs.fill([a, b], 4, padded_size=3)
    assert ids.data_ptr() == bufs.input_ids.data_ptr()  # views of the static buffers
    assert meta.positions.data_ptr() == bufs.positions.data_ptr()
    assert ids.tolist() == [42, 42, 0]
    assert meta.positions.tolist() == [4, 6, 0]
    # a: blocks [0, 3] (its 5th token starts block 3); b: blocks [1, 2], token 6 -> block 2 offset 2.
    assert a.block_table == [0, 3] and b.block_table == [1, 2]
    assert meta.slot_mapping.tolist() == [12, 10, -1]
    assert meta.seq_lens.tolist() == [5, 7, 0]
    assert meta.block_tables[:3, :2].tolist() == [[0, 3], [1, 2], [0, 0]]
    assert (meta.max_q_len, meta.max_seq_len, meta.num_seqs, meta.is_prefill) == (1, 7, 3, False)
    ids2, meta2 = bufs.fill([b], 4)
    assert ids2.data_ptr() == ids.data_ptr() and meta2.seq_lens.tolist() == [7]
    with pytest.raises(ValueError, match="decode batch"):
        bufs.fill([a, b], 4, padded_size=5)

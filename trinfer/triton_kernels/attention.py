"""Host wrappers for attention over the paged KV cache: `paged_prefill_attention` and `paged_decode_attention`.

Cache layout: `trinfer.triton_kernels.kv_cache_layout`. Kernels: `kernels/attention.py`.

Checks. On every call (no device sync): types, dtypes, devices, ranks and shapes, query heads a multiple
of KV heads, equal head dims in [33, 256] (`check_head_dim`), contiguous last dims, a power-of-two block
size, scale > 0. With `validate=True` only (they read device memory, so one host sync; tests and the
engine's debug mode): block-table entries a sequence uses within [0, num_blocks), lengths within the
table's capacity, q_len <= kv_len, cu_seqlens_q starting at 0, non-decreasing and ending at q.shape[0],
the host bounds (max_q_len, max_seq_len) covering the real lengths. Without validation, lengths are
clamped to the table's capacity inside the kernels, so no kernel ever reads past a sequence's block-table row.

Launch configurations come from the small tables `_prefill_config` / `_decode_config` (no autotuning: the
config depends on head_dim, dtype and the GQA group only, never on the batch, which keeps decode results
bitwise batch-invariant); `aot_specs()` lists them for the sm_90/sm_80 compile check.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton

from ._utils import FLOAT_DTYPES, TRITON_DTYPE, AotSpec, check_positive_float, check_same, check_tensor
from .kernels.attention import (
    paged_decode_reduce_kernel,
    paged_decode_split_kernel,
    paged_prefill_attention_kernel,
    paged_prefill_reduce_kernel,
)
from .kv_cache_layout import BLOCK_TABLE_DTYPE, check_kv_caches

LOG2E = 1.4426950408889634
DECODE_SPLIT_TOKENS = 256  # keys per decode split: batch 1 at 8K context gives 32 splits per KV head
HEAD_DIMS = (64, 80, 96, 128, 256)  # compile-checked and tuned; any head_dim in [MIN_HEAD_DIM, MAX_HEAD_DIM] runs
MIN_HEAD_DIM, MAX_HEAD_DIM = 33, 256  # head dims are padded to a tile width of the config tables: 64, 128, 256
_REDUCE_BLOCK_S = 16
_PREFILL_REDUCE_HEADS = 16  # query heads per program of the KV-split prefill's merge


class PrefillConfig(NamedTuple):
    block_m: int      # query rows per program (tokens x packed heads)
    block_n: int      # keys per inner step
    heads: int        # query heads packed per program
    num_warps: int
    num_stages: int


class DecodeConfig(NamedTuple):
    block_g: int      # query-head rows per program
    block_n: int
    num_warps: int
    num_stages: int


def check_head_dim(head_dim: int, name: str = "q") -> None:
    """ValueError unless the attention kernels run `head_dim`: in [MIN_HEAD_DIM, MAX_HEAD_DIM], i.e. padded to
    the next power of two it is a tile width of the config tables (64, 128 or 256; masking covers the rest)."""
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{name}: expected a head_dim in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}] (the attention kernels "
                         f"pad it to a 64, 128 or 256 wide tile), got {head_dim}")


def _tile_width(head_dim: int) -> int:
    """The padded head dim (BLOCK_D) that keys the config tables; ValueError for a head_dim they lack."""
    check_head_dim(head_dim, "head_dim")
    return triton.next_power_of_2(head_dim)


def _heads_per_program(group: int, limit: int = 16) -> int:
    """Largest divisor of the GQA group <= limit: the query heads one program packs over one KV head."""
    return max(d for d in range(1, min(group, limit) + 1) if group % d == 0)


def _prefill_config(head_dim: int, dtype: torch.dtype, group: int, arch: int = 90, split: bool = False
                    ) -> PrefillConfig:
    """Tile sizes for the prefill kernel per padded head dim, dtype and GPU generation (`arch` 90 or 80).

    Each entry compiles without spills within the chip's shared memory (tests/aot_check.py). fp16/bf16 use
    tensor cores (wgmma on sm_90, mma.sync on sm_80); fp32 runs IEEE-exact FMA products on small tiles.
    `split` (a KV-split launch) may change only the pipelining depth, never the tiles: a sequence's result must
    not depend on whether its batch is split (fp32 128-wide tiles: one stage, as ptxas spills with two).
    """
    block_d = _tile_width(head_dim)
    if dtype == torch.float32:
        block_m, block_n, warps, stages = {64: (32, 32, 4, 2), 128: (32, 16, 8, 2), 256: (32, 16, 8, 2)}[block_d]
        if split and block_d == 128:
            stages = 1
    elif block_d == 128 and arch != 90:
        block_m, block_n, warps, stages = 128, 32, 8, 3  # BLOCK_N 64 spills in bf16 on sm_80
    else:
        block_m, block_n, warps, stages = {64: (128, 64, 8, 3), 128: (128, 64, 8, 3), 256: (64, 32, 8, 2)}[block_d]
    return PrefillConfig(block_m, block_n, _heads_per_program(group, min(16, block_m)), warps, stages)


def _decode_config(head_dim: int, dtype: torch.dtype, group: int, split_tokens: int) -> DecodeConfig:
    """Tile sizes for the decode split kernel (any arch); BLOCK_N never exceeds, so divides, the split size.

    Depends on head_dim, dtype and group only, never on the batch: that keeps decode batch-invariant.
    """
    block_d = _tile_width(head_dim)
    block_g = min(max(16, triton.next_power_of_2(group)), 64)
    if dtype == torch.float32:
        block_n, warps, stages = {64: (32, 4, 2), 128: (32, 8, 2), 256: (16, 4, 2)}[block_d]
    else:
        block_n, warps, stages = {64: (64, 4, 3), 128: (64, 4, 3), 256: (32, 4, 3)}[block_d]
    return DecodeConfig(block_g, min(block_n, split_tokens), warps, stages)


@functools.lru_cache(maxsize=None)
def _config_arch(device: torch.device) -> int:
    """Which configuration table a device gets: 90 (Hopper/datacenter Blackwell: 227 KB shared), else 80.

    CPU tensors (the interpreter) get the sm_90 table, so the tests run the tiles the H100/H200 runs.
    """
    if device.type != "cuda":
        return 90
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major in (9, 10) else 80


def _check_attention_inputs(q, k_cache, v_cache, block_tables, batch: int, scale) -> tuple[int, int, int, int, int, float]:
    """Every-call checks shared by prefill and decode. Returns (num_blocks, block_size, q_heads, kv_heads, head_dim, scale)."""
    num_blocks, block_size, num_kv_heads, head_dim = check_kv_caches(k_cache, v_cache)
    check_tensor("q", q, dtypes=(k_cache.dtype,), ndim=3, device=k_cache.device, last_dim_contiguous=True)
    num_q_heads = q.shape[1]
    check_same("q", q.shape[2], head_dim, "head_dim equal to the cache's")
    check_head_dim(head_dim)
    if num_q_heads % num_kv_heads != 0 or num_q_heads == 0:
        raise ValueError(f"q: expected a number of query heads that is a positive multiple of the cache's "
                         f"{num_kv_heads} KV heads, got {num_q_heads}")
    check_tensor("block_tables", block_tables, dtypes=(BLOCK_TABLE_DTYPE,), ndim=2, device=k_cache.device,
                 last_dim_contiguous=True)
    check_same("block_tables", block_tables.shape[0], batch, "one row per sequence:")
    scale = check_positive_float("scale", scale)
    return num_blocks, block_size, num_q_heads, num_kv_heads, head_dim, scale


def _check_lengths(name: str, t, batch: int, device) -> None:
    check_tensor(name, t, dtypes=(torch.int32,), ndim=1, device=device, contiguous=True)
    check_same(name, t.shape[0], batch, "length (one entry per sequence)")


def _check_out(out, q) -> None:
    check_tensor("out", out, dtypes=(q.dtype,), ndim=3, device=q.device, last_dim_contiguous=True)
    check_same("out", tuple(out.shape), tuple(q.shape), "shape of q")


def _validate_tables(name: str, lens: torch.Tensor, block_tables: torch.Tensor, block_size: int, num_blocks: int) -> None:
    """Device-memory checks (sync): 0 <= lens <= capacity and the used block-table entries in [0, num_blocks)."""
    capacity = block_tables.shape[1] * block_size
    lens = lens.long()
    bad = (lens < 0) | (lens > capacity)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}: expected lengths in [0, {capacity}] (block_tables.shape[1] * block_size), "
                         f"got {int(lens[i])} for sequence {i}")
    used = torch.arange(block_tables.shape[1], device=lens.device)[None, :] < (lens[:, None] + block_size - 1) // block_size
    bad = used & ((block_tables < 0) | (block_tables >= num_blocks))
    if bool(bad.any()):
        s, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"block_tables: expected the entries a sequence uses in [0, {num_blocks}) (num_blocks), "
                         f"got {int(block_tables[s, j])} at [{s}, {j}] ({name}[{s}] = {int(lens[s])})")


# ----------------------------------------------------------------------------------------------------------
# Prefill / extend
# ----------------------------------------------------------------------------------------------------------

# KV split of the prefill kernel: a sequence with few query tiles (a short chunk, or the rest of a prompt after
# a long cached prefix) has few programs per head; cutting its keys into splits gives it more. Per sequence, from
# its own lengths only (batch-invariant): splits = min(MAX, kv_len // MIN_KEYS, cdiv(TARGET_TILES, q_tiles)).
PREFILL_SPLIT_MIN_KEYS = 256     # a split covers at least this many keys (>= 4 key tiles of 64)
PREFILL_SPLIT_TARGET_TILES = 32  # split until query tiles x splits reaches this, per head program
PREFILL_MAX_SPLITS = 64


class PrefillPlan(NamedTuple):
    """How `paged_prefill_attention` launches for one batch: made on the host once per step
    (`plan_prefill_attention`, from the lengths the host knows) and shared by every layer.

    kv_splits / part_base: `[batch]` int32 on the device (None when no sequence is split): KV splits of each
    sequence, and its first partial row (the sum of q_len * splits of the sequences before it).
    """

    batch: int
    max_q_len: int
    tokens_per_tile: int          # query tokens per program of the launch configuration it was made for
    kv_splits: torch.Tensor | None
    part_base: torch.Tensor | None
    num_partials: int             # partial rows: sum of q_len * splits (0 when not split)
    max_work: int                 # programs per (head group, sequence) on the grid's 2nd dim: max q_tiles * splits

    @property
    def split(self) -> bool:
        return self.kv_splits is not None


def prefill_kv_splits(q_len: int, kv_len: int, tokens_per_tile: int, *, min_split_keys: int = PREFILL_SPLIT_MIN_KEYS,
                      target_tiles: int = PREFILL_SPLIT_TARGET_TILES, max_splits: int = PREFILL_MAX_SPLITS) -> int:
    """KV splits of one sequence: `min(max_splits, kv_len // min_split_keys, cdiv(target_tiles, q_tiles))`, at
    least 1; a function of the sequence's own lengths, so its result never depends on the batch."""
    if q_len <= 0:
        return 1
    q_tiles = -(-q_len // tokens_per_tile)
    return max(1, min(max_splits, kv_len // min_split_keys, -(-target_tiles // q_tiles)))


def plan_prefill_attention(q_lens, kv_lens, *, num_q_heads: int, num_kv_heads: int, head_dim: int,
                           dtype: torch.dtype, device, min_split_keys: int = PREFILL_SPLIT_MIN_KEYS,
                           target_tiles: int = PREFILL_SPLIT_TARGET_TILES,
                           max_splits: int = PREFILL_MAX_SPLITS) -> PrefillPlan:
    """The launch plan of a prefill batch from host lists of its query and key lengths (no device sync): the
    KV splits of each sequence (`prefill_kv_splits`) for the tile configuration that q of these heads, head_dim
    and dtype get on `device`. Pass it as `paged_prefill_attention(..., plan=)`."""
    device = torch.device(device)
    if len(q_lens) != len(kv_lens):
        raise ValueError(f"kv_lens: expected one per sequence ({len(q_lens)}), got {len(kv_lens)}")
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads: expected a positive multiple of num_kv_heads {num_kv_heads}, got {num_q_heads}")
    if min_split_keys < 1 or target_tiles < 1 or max_splits < 1:
        raise ValueError(f"plan_prefill_attention: expected min_split_keys, target_tiles, max_splits >= 1, got "
                         f"{min_split_keys}, {target_tiles}, {max_splits}")
    cfg = _prefill_config(head_dim, dtype, num_q_heads // num_kv_heads, _config_arch(device))
    tokens = cfg.block_m // cfg.heads
    splits = [prefill_kv_splits(q, k, tokens, min_split_keys=min_split_keys, target_tiles=target_tiles,
                                max_splits=max_splits) for q, k in zip(q_lens, kv_lens)]
    max_q_len = max(q_lens, default=0)
    if all(n == 1 for n in splits):
        return PrefillPlan(len(q_lens), max_q_len, tokens, None, None, 0, -(-max_q_len // tokens))
    base, bases = 0, []
    for q, n in zip(q_lens, splits):
        bases.append(base)
        base += q * n
    table = torch.tensor([splits, bases], dtype=torch.int32)
    table = table.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else table.to(device)
    return PrefillPlan(len(q_lens), max_q_len, tokens, table[0], table[1], base,
                       max(-(-q // tokens) * n for q, n in zip(q_lens, splits)))


def _prefill_launch(q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens, out, kv_splits, part_base, workspace,
                    scale: float, max_q_len: int, max_work: int, num_partials: int, split: bool) -> None:
    batch = block_tables.shape[0]
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    group = num_q_heads // k_cache.shape[2]
    cfg = _prefill_config(head_dim, q.dtype, group, _config_arch(q.device), split)
    tokens_per_tile = cfg.block_m // cfg.heads
    work = max_work if split else triton.cdiv(max_q_len, tokens_per_tile)
    grid = (num_q_heads // cfg.heads, work, batch)
    block_size = k_cache.shape[1]
    block_d = triton.next_power_of_2(head_dim)
    n_part = num_partials * num_q_heads
    part_o, part_lse = workspace[: n_part * head_dim], workspace[n_part * head_dim: n_part * (head_dim + 1)]
    if not split:  # never read: any int32 / fp32 tensors of the device
        kv_splits = part_base = cu_seqlens_q
        part_o = part_lse = workspace
    paged_prefill_attention_kernel[grid](
        q, q.stride(0), q.stride(1),
        k_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache, v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables, block_tables.stride(0),
        cu_seqlens_q, kv_lens,
        out, out.stride(0), out.stride(1),
        kv_splits, part_base, part_o, part_lse, num_q_heads,
        block_size, block_tables.shape[1] * block_size, scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=block_d, GROUP=group, HEADS=cfg.heads,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLIT=split, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split:
        paged_prefill_reduce_kernel[(max_q_len, batch, triton.cdiv(num_q_heads, _PREFILL_REDUCE_HEADS))](
            part_o, part_lse, cu_seqlens_q, kv_splits, part_base, out, out.stride(0), out.stride(1), num_q_heads,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_H=_PREFILL_REDUCE_HEADS, num_warps=4,
        )


@torch.library.custom_op("trinfer::paged_prefill_attention", mutates_args=("out", "workspace"))
def _paged_prefill_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, out: torch.Tensor, kv_splits: torch.Tensor,
                      part_base: torch.Tensor, workspace: torch.Tensor, scale: float, max_q_len: int, max_work: int,
                      num_partials: int, split: bool) -> None:
    _prefill_launch(q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens, out, kv_splits, part_base, workspace,
                    scale, max_q_len, max_work, num_partials, split)


@_paged_prefill_op.register_fake
def _(q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens, out, kv_splits, part_base, workspace, scale,
      max_q_len, max_work, num_partials, split):
    return None


def prefill_workspace_numel(plan: PrefillPlan, num_q_heads: int, head_dim: int) -> int:
    """fp32 elements of the scratch a KV-split launch needs (partial outputs and log-sum-exps); 0 if unsplit."""
    return plan.num_partials * num_q_heads * (head_dim + 1) if plan.split else 0


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float,
    *,
    max_q_len: int | None = None,
    plan: PrefillPlan | None = None,
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    validate: bool = False,
) -> torch.Tensor:
    """Causal attention of packed variable-length queries to their sequences' paged K/V (prefill, extend, chunk).

    Sequence `s` has `q_len = cu_seqlens_q[s+1] - cu_seqlens_q[s]` new queries (rows
    `q[cu_seqlens_q[s]:cu_seqlens_q[s+1]]`) and `kv_len = kv_lens[s]` keys in the cache, the new tokens' K/V
    already written there (`write_kv_cache`). Query `i` sits at position `kv_len - q_len + i` and attends to
    keys `0 .. kv_len - q_len + i`: a fresh prompt has kv_len == q_len, a continued prefix or a chunk of a long
    prompt kv_len > q_len.

    KV split: with a `plan` (`plan_prefill_attention`), a sequence with few query tiles and many keys has its
    keys cut into splits attended by separate programs, merged afterwards in split order by their
    log-sum-exp (a second kernel), so a short chunk over a long cached prefix still occupies the whole GPU. The
    result is the same attention (within rounding); the splits depend only on the sequence's own lengths, and a
    sequence with one split gets exactly the unsplit result, so a sequence's output never depends on the batch
    around it.

    Args:
        q: `[total_q, q_heads, head_dim]` fp32/fp16/bf16, the caches' dtype; last dim contiguous (a view of a
            fused qkv output is fine). q_heads a multiple of the caches' KV heads (GQA), head_dim in [33, 256].
        k_cache, v_cache: `[num_blocks, block_size, kv_heads, head_dim]` (`kv_cache_layout`).
        block_tables: `[batch, max_blocks_per_seq]` int32.
        cu_seqlens_q: `[batch + 1]` int32 cumulative query lengths, starting at 0.
        kv_lens: `[batch]` int32, each >= the sequence's q_len and <= max_blocks_per_seq * block_size.
        scale: softmax scale (> 0), e.g. head_dim ** -0.5.
        max_q_len: a host upper bound of the q_lens (sizes the grid); taken from `plan` when one is given. None
            without a plan computes it from cu_seqlens_q, which synchronizes with the device: pass it (or a
            plan) in the engine.
        plan: the batch's launch plan with its KV splits (None: no split).
        out: optional `[total_q, q_heads, head_dim]` output of q's dtype; written and returned.
        workspace: optional 1-D fp32 scratch of at least `prefill_workspace_numel(plan, ...)` elements (else
            allocated when the plan splits).
        validate: run the device-memory checks (module docstring); one host sync.
    Returns:
        `[total_q, q_heads, head_dim]` in q's dtype. Reference: `references.paged_prefill_attention_ref`.
    """
    check_tensor("cu_seqlens_q", cu_seqlens_q, dtypes=(torch.int32,), ndim=1, contiguous=True)
    if cu_seqlens_q.shape[0] < 1:
        raise ValueError("cu_seqlens_q: expected batch + 1 >= 1 entries, got 0")
    batch = cu_seqlens_q.shape[0] - 1
    num_blocks, block_size, num_q_heads, _, head_dim, scale = _check_attention_inputs(
        q, k_cache, v_cache, block_tables, batch, scale)
    check_tensor("cu_seqlens_q", cu_seqlens_q, device=q.device)
    _check_lengths("kv_lens", kv_lens, batch, q.device)
    if max_q_len is not None and (isinstance(max_q_len, bool) or not isinstance(max_q_len, int) or max_q_len < 0):
        raise ValueError(f"max_q_len: expected an int >= 0 or None, got {max_q_len!r}")
    if plan is not None:
        _check_plan(plan, q, k_cache, batch)
        max_q_len = plan.max_q_len
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    else:
        _check_out(out, q)
    split = plan is not None and plan.split
    needed = prefill_workspace_numel(plan, num_q_heads, head_dim) if split else 0
    if workspace is None:
        workspace = torch.empty(max(needed, 1), dtype=torch.float32, device=q.device)
    else:
        check_tensor("workspace", workspace, dtypes=(torch.float32,), ndim=1, device=q.device, contiguous=True)
        if workspace.numel() < max(needed, 1):
            raise ValueError(f"workspace: expected at least {max(needed, 1)} fp32 elements "
                             f"(prefill_workspace_numel), got {workspace.numel()}")
    if validate:
        _validate_prefill(q, block_tables, cu_seqlens_q, kv_lens, block_size, num_blocks, max_q_len)
        if split:
            _validate_plan(plan, cu_seqlens_q, kv_lens)
    if batch == 0 or q.shape[0] == 0:
        return out
    if max_q_len is None:
        max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())  # host sync
    if max_q_len == 0:
        return out
    kv_splits = plan.kv_splits if split else cu_seqlens_q
    part_base = plan.part_base if split else cu_seqlens_q
    _paged_prefill_op(q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens, out, kv_splits, part_base, workspace,
                      scale, max_q_len, plan.max_work if split else 0, plan.num_partials if split else 0, split)
    return out


def _check_plan(plan, q, k_cache, batch: int) -> None:
    """Every-call checks of a PrefillPlan against this launch (no sync)."""
    if not isinstance(plan, PrefillPlan):
        raise TypeError(f"plan: expected a PrefillPlan (plan_prefill_attention) or None, got {type(plan).__name__}")
    if plan.batch != batch:
        raise ValueError(f"plan: made for a batch of {plan.batch} sequences, got {batch}")
    cfg = _prefill_config(q.shape[2], q.dtype, q.shape[1] // k_cache.shape[2], _config_arch(q.device))
    tokens = cfg.block_m // cfg.heads
    if plan.tokens_per_tile != tokens:
        raise ValueError(f"plan: made for {plan.tokens_per_tile} query tokens per tile, but these heads, head_dim "
                         f"and dtype launch {tokens}; plan with this q's num_q_heads/num_kv_heads/head_dim/dtype")
    if plan.split:
        for name in ("kv_splits", "part_base"):
            check_tensor(f"plan.{name}", getattr(plan, name), dtypes=(torch.int32,), ndim=1, device=q.device,
                         contiguous=True)
            check_same(f"plan.{name}", getattr(plan, name).shape[0], batch, "length (one entry per sequence)")


def _validate_plan(plan: PrefillPlan, cu_seqlens_q, kv_lens) -> None:
    """validate=True: the plan's splits and partial rows agree with the device lengths (sync)."""
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    splits = plan.kv_splits.long()
    if bool((splits < 1).any()):
        raise ValueError(f"plan.kv_splits: expected values >= 1, got {splits.tolist()}")
    rows = q_lens * splits
    base = torch.cumsum(rows, 0) - rows
    if bool((plan.part_base.long() != base).any()) or int(rows.sum()) != plan.num_partials:
        raise ValueError(f"plan: partial rows {plan.part_base.tolist()} / {plan.num_partials} do not match the "
                         f"q_lens {q_lens.tolist()} and splits {splits.tolist()}: plan from this batch's lengths")
    tiles = -(-q_lens // plan.tokens_per_tile)
    if bool((tiles * splits > plan.max_work).any()):
        raise ValueError(f"plan: max_work {plan.max_work} below a sequence's query tiles x splits")


def _validate_prefill(q, block_tables, cu_seqlens_q, kv_lens, block_size, num_blocks, max_q_len) -> None:
    cu = cu_seqlens_q.long()
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens_q: expected cu_seqlens_q[0] == 0, got {int(cu[0])}")
    q_lens = cu[1:] - cu[:-1]
    if bool((q_lens < 0).any()):
        i = int((q_lens < 0).nonzero()[0, 0])
        raise ValueError(f"cu_seqlens_q: expected non-decreasing values, got {int(cu[i])} then {int(cu[i + 1])} at {i}")
    if int(cu[-1]) != q.shape[0]:
        raise ValueError(f"cu_seqlens_q: expected the last value to equal q.shape[0] = {q.shape[0]}, got {int(cu[-1])}")
    _validate_tables("kv_lens", kv_lens, block_tables, block_size, num_blocks)
    short = kv_lens.long() < q_lens
    if bool(short.any()):
        i = int(short.nonzero()[0, 0])
        raise ValueError(f"kv_lens: expected kv_len >= q_len (the new tokens are in the cache), got kv_lens[{i}] = "
                         f"{int(kv_lens[i])} < q_len {int(q_lens[i])}")
    if max_q_len is not None and q_lens.numel() and int(q_lens.max()) > max_q_len:
        raise ValueError(f"max_q_len: expected >= the longest query length {int(q_lens.max())}, got {max_q_len}")


# ----------------------------------------------------------------------------------------------------------
# Decode
# ----------------------------------------------------------------------------------------------------------

def _num_splits(max_seq_len: int, split_tokens: int) -> int:
    return max(1, triton.cdiv(max_seq_len, split_tokens))


def decode_workspace_numel(batch: int, num_q_heads: int, head_dim: int, max_seq_len: int,
                           split_tokens: int = DECODE_SPLIT_TOKENS) -> int:
    """fp32 elements of the `workspace` that `paged_decode_attention` needs for these bounds (0 if one split).

    Preallocate `torch.empty(n, dtype=torch.float32, device=...)` once at the engine's largest batch and context
    (it holds, per sequence, query head and split, the partial output and its log-sum-exp).
    """
    splits = _num_splits(max_seq_len, split_tokens)
    return 0 if splits == 1 else batch * num_q_heads * splits * (head_dim + 1)


def _check_split_tokens(split_tokens) -> int:
    if isinstance(split_tokens, bool) or not isinstance(split_tokens, int):
        raise TypeError(f"split_tokens: expected an int, got {type(split_tokens).__name__}")
    if split_tokens < 16 or split_tokens & (split_tokens - 1):
        raise ValueError(f"split_tokens: expected a power of two >= 16, got {split_tokens}")
    return split_tokens


class DecodeArgs(NamedTuple):
    """`paged_decode_attention`'s arguments checked, normalized and allocated by `prepare_decode_attention`."""
    batch: int
    num_blocks: int
    block_size: int
    head_dim: int
    scale: float
    split_tokens: int
    max_seq_len: int    # the host bound, clamped to the table capacity
    num_splits: int     # the split grid for max_seq_len
    out: torch.Tensor
    workspace: torch.Tensor


def prepare_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, *,
                             out: torch.Tensor | None, max_seq_len: int | None, split_tokens: int,
                             workspace: torch.Tensor | None) -> DecodeArgs:
    """`paged_decode_attention`'s every-call checks, `max_seq_len` normalisation and `out`/`workspace`
    allocation (shared with the CUDA backend, so both raise the same errors)."""
    batch = q.shape[0] if isinstance(q, torch.Tensor) else -1
    num_blocks, block_size, num_q_heads, _, head_dim, scale = _check_attention_inputs(
        q, k_cache, v_cache, block_tables, batch, scale)
    _check_lengths("seq_lens", seq_lens, batch, q.device)
    split_tokens = _check_split_tokens(split_tokens)
    capacity = block_tables.shape[1] * block_size
    if max_seq_len is None:
        max_seq_len = capacity
    elif isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 0:
        raise ValueError(f"max_seq_len: expected an int >= 0 or None, got {max_seq_len!r}")
    max_seq_len = min(max_seq_len, capacity)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    else:
        _check_out(out, q)
    needed = decode_workspace_numel(batch, num_q_heads, head_dim, max_seq_len, split_tokens)
    if workspace is None:
        workspace = torch.empty(needed, dtype=torch.float32, device=q.device)
    else:
        check_tensor("workspace", workspace, dtypes=(torch.float32,), ndim=1, device=q.device, contiguous=True)
        if workspace.numel() < needed:
            raise ValueError(f"workspace: expected at least {needed} fp32 elements (decode_workspace_numel), "
                             f"got {workspace.numel()}")
    return DecodeArgs(batch, num_blocks, block_size, head_dim, scale, split_tokens, max_seq_len,
                      _num_splits(max_seq_len, split_tokens), out, workspace)


def validate_decode_attention(a: DecodeArgs, block_tables: torch.Tensor, seq_lens: torch.Tensor) -> None:
    """`paged_decode_attention`'s validate=True checks (device memory, one sync)."""
    _validate_tables("seq_lens", seq_lens, block_tables, a.block_size, a.num_blocks)
    if a.batch and int(seq_lens.max()) > a.max_seq_len:
        raise ValueError(f"max_seq_len: expected >= the longest sequence {int(seq_lens.max())}, got {a.max_seq_len}")


def _decode_launch(q, k_cache, v_cache, block_tables, seq_lens, out, workspace, scale: float, max_splits: int,
                   split_tokens: int) -> None:
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    cfg = _decode_config(head_dim, q.dtype, group, split_tokens)
    block_d = triton.next_power_of_2(head_dim)
    capacity = min(block_tables.shape[1] * block_size, max_splits * split_tokens)
    n_part = batch * num_q_heads * max_splits
    if max_splits > 1:
        part_o, part_lse = workspace[: n_part * head_dim], workspace[n_part * head_dim: n_part * (head_dim + 1)]
    else:
        part_o = part_lse = out  # never touched: every sequence has at most one split
    grid = (max_splits, batch, num_kv_heads * triton.cdiv(group, cfg.block_g))
    paged_decode_split_kernel[grid](
        q, q.stride(0), q.stride(1),
        k_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache, v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables, block_tables.stride(0), seq_lens,
        out, out.stride(0), out.stride(1),
        part_o, part_lse,
        num_q_heads, max_splits, split_tokens, block_size, capacity, scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=block_d, GROUP=group, BLOCK_G=cfg.block_g, BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if max_splits > 1:
        paged_decode_reduce_kernel[(batch, num_q_heads)](
            part_o, part_lse, seq_lens, out, out.stride(0), out.stride(1),
            num_q_heads, max_splits, split_tokens, capacity,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=_REDUCE_BLOCK_S, num_warps=4,
        )


@torch.library.custom_op("trinfer::paged_decode_attention", mutates_args=("out", "workspace"))
def _paged_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, out: torch.Tensor, workspace: torch.Tensor, scale: float,
                     max_splits: int, split_tokens: int) -> None:
    _decode_launch(q, k_cache, v_cache, block_tables, seq_lens, out, workspace, scale, max_splits, split_tokens)


@_paged_decode_op.register_fake
def _(q, k_cache, v_cache, block_tables, seq_lens, out, workspace, scale, max_splits, split_tokens):
    return None


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    validate: bool = False,
    max_seq_len: int | None = None,
    split_tokens: int = DECODE_SPLIT_TOKENS,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence attends to all `seq_lens[s]` keys of its sequence in the paged cache.

    Flash-decoding: keys are cut into splits of `split_tokens` tokens (a fixed size, never derived from the
    batch), one program per (split, sequence, KV head) serves all the query heads of that KV head (GQA: each K/V
    tile is read once per group), and a second kernel merges the splits by their log-sum-exp in a fixed order.
    A sequence's output is therefore bitwise identical whatever the batch around it.

    CUDA graphs: the grid depends only on host values (batch, heads, `max_seq_len`), never on the contents of
    `seq_lens`; programs past a sequence's length exit and the merge skips empty splits. Pass `out` and a
    preallocated `workspace` (`decode_workspace_numel`) to launch without allocating.

    Args:
        q: `[batch, q_heads, head_dim]` (the caches' dtype, last dim contiguous); q_heads a multiple of KV heads,
            head_dim in [33, 256].
        k_cache, v_cache: `[num_blocks, block_size, kv_heads, head_dim]` (`kv_cache_layout`).
        block_tables: `[batch, max_blocks_per_seq]` int32.
        seq_lens: `[batch]` int32 keys per sequence, the current token's included (written by `write_kv_cache`).
            A length of 0 (a padding row) gives zeros.
        scale: softmax scale (> 0).
        out: optional `[batch, q_heads, head_dim]` output of q's dtype.
        validate: run the device-memory checks (module docstring); one host sync.
        max_seq_len: host upper bound of seq_lens (sizes the split grid and the workspace); default and
            maximum: the table capacity `block_tables.shape[1] * block_size`. Lengths beyond it are clamped
            (validate=True reports them).
        split_tokens: keys per split, a power of two >= 16 (default 256). Results depend on it, so keep it fixed.
        workspace: optional 1-D fp32 scratch of at least `decode_workspace_numel(...)` elements.
    Returns:
        `[batch, q_heads, head_dim]` in q's dtype. Reference: `references.paged_decode_attention_ref`.
    """
    a = prepare_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, out=out,
                                 max_seq_len=max_seq_len, split_tokens=split_tokens, workspace=workspace)
    if validate:
        validate_decode_attention(a, block_tables, seq_lens)
    if a.batch == 0:
        return a.out
    _paged_decode_op(q, k_cache, v_cache, block_tables, seq_lens, a.out, a.workspace, a.scale, a.num_splits,
                     a.split_tokens)
    return a.out


# ----------------------------------------------------------------------------------------------------------
# Compile-check specs
# ----------------------------------------------------------------------------------------------------------

_GROUPS_CYCLE = (1, 3, 4, 7, 8)  # GROUP/HEADS only change index math: spread the real groups over the specs


# Integer arguments the JIT sees as multiples of 16 in real use (strides that are multiples of head_dim, itself a
# multiple of 16 for every served model); tests/aot_check.py compiles with the same hints (pointers get it anyway).
_ALIGNED = ("stride_kb", "stride_ks", "stride_kh", "stride_vb", "stride_vs", "stride_vh")


def _cache_signature(t: str) -> dict[str, str]:
    return {"k_cache_ptr": t, "stride_kb": "i32", "stride_ks": "i32", "stride_kh": "i32",
            "v_cache_ptr": t, "stride_vb": "i32", "stride_vs": "i32", "stride_vh": "i32",
            "bt_ptr": "*i32", "stride_bt": "i32"}


def aot_specs(head_dims=HEAD_DIMS, dtypes=FLOAT_DTYPES) -> list[AotSpec]:
    """The configurations the wrappers pick for every served head_dim and dtype (default split size).

    Prefill tiles differ per GPU generation, so its specs name their arch; decode and reduce are arch-free.
    """
    specs = []
    for i, (head_dim, dtype) in enumerate((d, t) for d in head_dims for t in dtypes):
        group = _GROUPS_CYCLE[i % len(_GROUPS_CYCLE)]
        block_d = triton.next_power_of_2(head_dim)
        t = "*" + TRITON_DTYPE[dtype]
        name = f"d={head_dim},{TRITON_DTYPE[dtype]},group={group}"
        for arch, split in ((a, sp) for a in (90, 80) for sp in (False, True)):
            p = _prefill_config(head_dim, dtype, group, arch, split)
            specs.append(AotSpec(
                name=f"paged_prefill_attention{'_split' if split else ''}[{name},sm{arch}]",
                fn=paged_prefill_attention_kernel,
                signature={"q_ptr": t, "stride_qt": "i32", "stride_qh": "i32", **_cache_signature(t),
                           "cu_seqlens_ptr": "*i32", "kv_lens_ptr": "*i32",
                           "out_ptr": t, "stride_ot": "i32", "stride_oh": "i32",
                           "kv_splits_ptr": "*i32", "part_base_ptr": "*i32", "part_o_ptr": "*fp32",
                           "part_lse_ptr": "*fp32", "num_q_heads": "i32",
                           "block_size": "i32", "capacity": "i32", "qk_scale": "fp32"},
                constexprs={"HEAD_DIM": head_dim, "BLOCK_D": block_d, "GROUP": group, "HEADS": p.heads,
                            "BLOCK_M": p.block_m, "BLOCK_N": p.block_n, "SPLIT": split},
                num_warps=p.num_warps, num_stages=p.num_stages,
                expect_wgmma=dtype != torch.float32,
                extra={"archs": (arch,),
                       "divisible_by_16": _ALIGNED + ("stride_qt", "stride_qh", "stride_ot", "stride_oh")},
            ))
        specs.append(AotSpec(
            name=f"paged_prefill_reduce[d={head_dim},{TRITON_DTYPE[dtype]}]",
            fn=paged_prefill_reduce_kernel,
            signature={"part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "cu_seqlens_ptr": "*i32",
                       "kv_splits_ptr": "*i32", "part_base_ptr": "*i32", "out_ptr": t, "stride_ot": "i32",
                       "stride_oh": "i32", "num_q_heads": "i32"},
            constexprs={"HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK_H": _PREFILL_REDUCE_HEADS},
            num_warps=4,
            extra={"divisible_by_16": ("stride_ot", "stride_oh")},
        ))
        d = _decode_config(head_dim, dtype, group, DECODE_SPLIT_TOKENS)
        specs.append(AotSpec(
            name=f"paged_decode_split[{name}]",
            fn=paged_decode_split_kernel,
            signature={"q_ptr": t, "stride_qb": "i32", "stride_qh": "i32", **_cache_signature(t),
                       "seq_lens_ptr": "*i32", "out_ptr": t, "stride_ob": "i32", "stride_oh": "i32",
                       "part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "num_q_heads": "i32",
                       "max_splits": "i32", "split_tokens": "i32", "block_size": "i32", "capacity": "i32",
                       "qk_scale": "fp32"},
            constexprs={"HEAD_DIM": head_dim, "BLOCK_D": block_d, "GROUP": group, "BLOCK_G": d.block_g,
                        "BLOCK_N": d.block_n},
            num_warps=d.num_warps, num_stages=d.num_stages,
            extra={"divisible_by_16": _ALIGNED + ("stride_qb", "stride_qh", "stride_ob", "stride_oh")},
        ))
        specs.append(AotSpec(
            name=f"paged_decode_reduce[d={head_dim},{TRITON_DTYPE[dtype]}]",
            fn=paged_decode_reduce_kernel,
            signature={"part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "seq_lens_ptr": "*i32", "out_ptr": t,
                       "stride_ob": "i32", "stride_oh": "i32", "num_q_heads": "i32", "max_splits": "i32",
                       "split_tokens": "i32", "capacity": "i32"},
            constexprs={"HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK_S": _REDUCE_BLOCK_S},
            num_warps=4,
            extra={"divisible_by_16": ("stride_ob", "stride_oh")},
        ))
    return specs

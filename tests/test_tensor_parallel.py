"""Tensor parallelism on the CPU: 2 ranks over gloo (spawned by the engine, or started by torchrun) against one device.

Greedy tokens with N=2 equal N=1 for Llama with GQA (KV heads split), Qwen2 (biases) with fewer KV heads than ranks
and a tied LM head, and (short) Qwen3 on the Triton kernels under the interpreter; continuous batching, preemption and
abort across ranks; the distributed argmax on planted ties; sharded loading reads only the rank's slices; a rank
killed or raising mid-generation ends everything with an error naming it; torchrun gives the same tokens.

Bounded: collectives time out after TP_TIMEOUT s, and a watchdog ends the test process with every thread's
traceback if a test passes HANG_S (a hang is a failure, never a wait). Engines are closed by their tests and
fixtures, which reap their spawned ranks; a spawned rank also exits within 0.5 s of its parent's death.
"""
import faulthandler
import math
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from checkpoints import assert_varied, load_hf_model, make_gguf_checkpoint, make_hf_checkpoint
from smol import one_torch_thread  # noqa: F401  (autouse fixture)
from test_model_parity import hf_greedy, no_eos
from tolerances import assert_close
from trinfer.runtime import LLM, Engine
from trinfer.runtime.distributed import ShardSpec, TensorParallelError, combine_greedy, greedy_stats
from trinfer.runtime.loader import load_model_files

TP_TIMEOUT = 60.0
HANG_S = 180
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prompts as token ids (lengths 7, 1, 21, 4) and their max_new_tokens.
PROMPTS = [[1, 17, 99, 4, 250, 63, 8], [1], [1, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 7, 300, 42, 11, 2, 9, 81, 13, 77],
           [1, 400, 401, 402]]
NEW = [16, 12, 10, 14]


@pytest.fixture(autouse=True)
def _hang_watchdog():
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tp"))
    return {
        # Llama, 4 query / 2 KV heads: one KV head (and its GQA group of 2) per rank; untied LM head.
        "llama-gqa": make_hf_checkpoint(root, "llama", seed=3, name="llama-gqa"),
        # Qwen2 (q/k/v biases), 4 query heads and ONE KV head (replicated on both ranks), tied LM head.
        "qwen2-kv1-tied": make_hf_checkpoint(root, "qwen2", seed=4, num_key_value_heads=1, tie_word_embeddings=True,
                                             name="qwen2-kv1-tied"),
    }


def one_device(path, prompts=PROMPTS, new=NEW, **kw):
    """Greedy tokens and logprobs on one device (the reference), checked to be varied (checkpoints.assert_varied):
    on a degenerate model a sharded engine that gets attention wrong would still give the same tokens."""
    ref = _generate(LLM(path, **{"backend": "torch", "device": "cpu", "block_size": 4, **kw}).engine, prompts, new)
    assert_varied(prompts, [ids for ids, _ in ref])
    return ref


def _generate(eng, prompts, new):
    """All prompts queued at once, run to the end: [(token ids, logprobs)] in prompt order."""
    ids = [eng.add_request(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(prompts, new)]
    final = {out.request_id: out for out in eng.run_until_done() if out.finished}
    return [(final[r].token_ids, final[r].logprobs) for r in ids]


def assert_same(outs, ref, what):
    """Tokens equal; log-probs within 10x the fp32 tolerance (the ranks' partial sums add in another order)."""
    assert len(outs) == len(ref)
    for i, ((ids, lps), (ref_ids, ref_lps)) in enumerate(zip(outs, ref)):
        assert ids == ref_ids, f"{what}: prompt {i} diverges from one device"
        assert_close(torch.tensor(lps), torch.tensor(ref_lps), torch.float32, scale=10, name=f"{what} logprobs {i}")


def reaped(processes) -> bool:
    """Whether every process in `processes` has exited (waiting up to 5 s)."""
    deadline = time.monotonic() + 5
    while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(p.is_alive() for p in processes)


# ---------------------------------------------------------------------- shards (no processes)


class _Cfg:
    def __init__(self, nq, nkv, inter=96, vocab=10, head_dim=16):
        self.num_heads, self.num_kv_heads, self.intermediate_size = nq, nkv, inter
        self.vocab_size, self.head_dim = vocab, head_dim


def test_shard_spec_splits_heads_rows_and_vocab():
    """Hand-worked: 8 query / 4 KV heads over 2 ranks; 8 / 2 over 4 ranks (KV heads replicated on 2 ranks each)."""
    s = [ShardSpec.of(_Cfg(8, 4, vocab=11), r, 2) for r in range(2)]
    assert [(x.q_heads, x.kv_heads, x.intermediate, x.vocab) for x in s] == [
        ((0, 4), (0, 2), (0, 48), (0, 5)), ((4, 8), (2, 4), (48, 96), (5, 11))]
    s = [ShardSpec.of(_Cfg(8, 2, vocab=8), r, 4) for r in range(4)]
    assert [(x.q_heads, x.kv_heads) for x in s] == [((0, 2), (0, 1)), ((2, 4), (0, 1)), ((4, 6), (1, 2)),
                                                   ((6, 8), (1, 2))]
    assert s[2].index("layers.0.qkv_proj", "q") == (slice(64, 96),)         # query heads 4, 5 of dim 16
    assert s[2].index("layers.0.qkv_bias", "k") == (slice(16, 32),)         # KV head 1
    assert s[2].index("layers.1.o_proj", None) == (slice(None), slice(64, 96))
    assert s[2].index("layers.1.down_proj", None) == (slice(None), slice(48, 72))
    assert s[2].index("layers.1.gate_up_proj", "up") == (slice(48, 72),)
    assert s[3].index("lm_head", None) == (slice(6, 8),)
    assert s[3].index("layers.0.input_norm", None) is None


@pytest.mark.parametrize("cfg,n,message", [
    (_Cfg(6, 2), 4, "does not divide the model's 6 attention heads"),
    (_Cfg(8, 4), 8, None),  # fine: KV heads replicated on 2 ranks each
    (_Cfg(12, 3), 2, "cannot share the model's 3 KV heads"),
    (_Cfg(8, 8, inter=90), 4, "does not divide the model's intermediate size 90"),
    (_Cfg(4, 4), 0, "expected an int >= 1"),
])
def test_shard_spec_refuses_what_does_not_split(cfg, n, message):
    if message is None:
        ShardSpec.of(cfg, 0, n)
        return
    with pytest.raises(ValueError, match=f"tensor_parallel_size: .*{message}" if n else message):
        ShardSpec.of(cfg, 0, n)


# ---------------------------------------------------------------------- the distributed argmax

# Planted logits over a vocabulary of 8 split [0, 4) | [4, 8), and the token each row must give, worked by hand:
TIE_ROWS = [
    ([1, 5, 2, 5, 0, 5, 5, 1], 1),      # the maximum 5 four times, on both ranks: the first one, global 1
    ([0, 1, 2, 3, 9, 9, 1, 0], 4),      # a tie inside rank 1: its first, global 4
    ([7, 0, 0, 0, 7, 0, 0, 0], 0),      # a tie across ranks at their first entries: rank 0's, global 0
    ([0, 0, 0, 6, 6, 0, 0, 0], 3),      # a tie across the boundary: global 3 (rank 0) before 4 (rank 1)
    ([-1, -2, -3, -4, -1, -9, -9, -9], 0),
    ([-math.inf] * 4 + [2, -math.inf, 3, 3], 6),  # rank 0 all -inf: its share adds nothing to the sum
    ([1, 2, 3, 4, 0, math.nan, 9, 9], 5),          # NaN counts as the largest, as torch.argmax
]


def _planted(rank: int):
    logits = torch.tensor([row for row, _ in TIE_ROWS], dtype=torch.float32)
    return logits[:, 4 * rank: 4 * rank + 4]


def test_combine_greedy_on_planted_ties():
    """The two ranks' shares combined without processes: tokens as worked by hand, log-probs as float64
    log_softmax of the whole row (NaN where that is NaN)."""
    stats = torch.stack([greedy_stats(_planted(r), 4 * r) for r in range(2)])
    ids, logprobs = combine_greedy(stats)
    assert ids.tolist() == [t for _, t in TIE_ROWS]
    full = torch.tensor([row for row, _ in TIE_ROWS], dtype=torch.float64)
    expected = torch.log_softmax(full, -1).gather(-1, ids[:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs, expected.float(), equal_nan=True)
    assert logprobs.dtype == torch.float32 and math.isnan(logprobs[-1])
    all_inf = torch.stack([greedy_stats(torch.full((1, 4), -math.inf), 4 * r) for r in range(2)])
    assert math.isnan(combine_greedy(all_inf)[1].item())  # log_softmax of only -inf is NaN


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_env(rank: int, port: int) -> dict:
    return {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def _argmax_case(tp):
    """What both ranks run: the planted rows through all_gather + combine_greedy, then a finite tie through the
    real vocab-parallel LM head (two equal rows of the weight, one on each rank), and the embedding."""
    from trinfer.runtime.distributed import ShardOps
    from trinfer.runtime.model import get_backend

    ids, logprobs = combine_greedy(tp.all_gather(greedy_stats(_planted(tp.rank), 4 * tp.rank)))
    shard = ShardSpec.of(_Cfg(2, 2, vocab=8, head_dim=4, inter=2), tp.rank, 2)
    ops = ShardOps(tp, shard, get_backend("torch"))
    weight = torch.tensor([[1.0, 0.0], [0.5, 0.5], [2.0, 1.0], [0.0, 1.0],
                           [2.0, 1.0], [0.0, 0.0], [2.0, 1.0], [-1.0, 3.0]])  # rows 2, 4, 6 equal
    hidden = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])  # maxima: 3 at rows 2, 4, 6; 3 at 7; 2 at 2, 4, 6
    head_ids, head_lp = ops.lm_head_greedy(hidden, weight[4 * tp.rank: 4 * tp.rank + 4])
    emb = ops.embedding(torch.tensor([7, 0, 4, 3]), weight[4 * tp.rank: 4 * tp.rank + 4], torch.float32)
    return ids, logprobs, head_ids, head_lp, emb


def _argmax_rank1(port: int, queue) -> None:
    os.environ.update(_torchrun_env(1, port))
    from trinfer.runtime.distributed import start_tensor_parallel

    tp = start_tensor_parallel(None, torch.device("cpu"), timeout=TP_TIMEOUT)
    try:
        queue.put([t.tolist() for t in _argmax_case(tp)])
    finally:
        tp.close()


def test_distributed_argmax_over_gloo(monkeypatch):
    """Two real ranks (this process and a spawned one, joined as torchrun would start them): both get the tokens
    worked by hand, the same on each rank; the LM head's three-way tie across ranks goes to global row 2."""
    port = _free_port()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_argmax_rank1, args=(port, queue), daemon=True)
    child.start()
    for k, v in _torchrun_env(0, port).items():
        monkeypatch.setenv(k, v)
    from trinfer.runtime.distributed import start_tensor_parallel

    tp = start_tensor_parallel(None, torch.device("cpu"), timeout=TP_TIMEOUT)
    try:
        ids, logprobs, head_ids, head_lp, emb = _argmax_case(tp)
        other = queue.get(timeout=TP_TIMEOUT)
    finally:
        tp.close()
        child.join(TP_TIMEOUT)
    assert child.exitcode == 0
    assert ids.tolist() == [t for _, t in TIE_ROWS] == other[0]
    assert head_ids.tolist() == [2, 7, 2] == other[2]
    assert other[1][:-1] == logprobs.tolist()[:-1] and other[3] == head_lp.tolist()
    logits = torch.tensor([[1.0, 0.0], [0.5, 0.5], [2.0, 1.0], [0.0, 1.0], [2.0, 1.0], [0.0, 0.0], [2.0, 1.0],
                           [-1.0, 3.0]], dtype=torch.float64) @ torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]],
                                                                            dtype=torch.float64).T
    expected = torch.log_softmax(logits.T, -1).gather(-1, torch.tensor([[2], [7], [2]])).squeeze(-1)
    torch.testing.assert_close(head_lp, expected.float())
    assert emb.tolist() == [[-1.0, 3.0], [1.0, 0.0], [2.0, 1.0], [0.0, 1.0]] == other[4]  # whole rows, exactly


# ---------------------------------------------------------------------- sharded loading (no processes)


class _RecordingFile:
    """A safetensors handle that records every read: (key, elements read, whole tensor?)."""

    def __init__(self, f, reads):
        self._f, self._reads = f, reads

    def __enter__(self):
        self._f.__enter__()
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def keys(self):
        return self._f.keys()

    def get_tensor(self, key):
        t = self._f.get_tensor(key)
        self._reads.append((key, t.numel(), True))
        return t

    def get_slice(self, key):
        reads, sl = self._reads, self._f.get_slice(key)

        class _Slice:
            def __getitem__(self, index):
                t = sl[index]
                reads.append((key, t.numel(), False))
                return t

        return _Slice()


def _assert_shards_of(full, part, shard):
    assert part.shard == shard and part.config == full.config
    assert set(part.weights) == set(full.weights)
    for name, w in full.weights.items():
        assert torch.equal(part.weights[name], shard.shard_weight(full.config, name, w)), name


def test_sharded_safetensors_reads_only_its_slices(tmp_path, monkeypatch):
    """Qwen2 (biases), 4 query / 1 KV head, untied: each rank's weights are exactly its slices of the full load,
    and the elements it reads are those slices (counted by hand below): no sharded tensor is read whole."""
    import trinfer.runtime.loader as L

    path = make_hf_checkpoint(str(tmp_path), "qwen2", num_key_value_heads=1, seed=5)
    full = load_model_files(path, device="cpu", dtype=torch.float32, progress=False)
    reads = []
    real_open = L._open_safetensors
    monkeypatch.setattr(L, "_open_safetensors", lambda file: _RecordingFile(real_open(file), reads))
    # hidden 64, vocab 512, intermediate 96, 2 layers, head_dim 16; a rank holds 2 query heads and the one KV head.
    per_layer = (32 * 64 + 16 * 64 + 16 * 64) + (32 + 16 + 16) + 64 * 32 + 2 * (48 * 64) + 64 * 48 + 2 * 64
    expected = 256 * 64 * 2 + 64 + 2 * per_layer  # embedding and LM head halves, final norm, layers
    whole = sum(w.numel() for w in full.weights.values())
    for rank in range(2):
        reads.clear()
        part = load_model_files(path, device="cpu", dtype=torch.float32, progress=False, tensor_parallel=(rank, 2))
        _assert_shards_of(full, part, ShardSpec.of(full.config, rank, 2))
        assert sum(n for _, n, _ in reads) == expected < whole
        assert all(key.endswith("norm.weight") for key, _, is_whole in reads if is_whole)


def test_sharded_gguf_reads_only_its_blocks(tmp_path, monkeypatch):
    """A Q8_0 GGUF (q/k rows permuted as llama.cpp writes them): each rank's weights are exactly its slices of the
    full load, and the bytes it dequantizes are its rows, or the Q8_0 blocks covering its columns (counted by hand:
    34 bytes per 32 values; down_proj's 48 columns per rank straddle a block)."""
    pytest.importorskip("gguf")
    import trinfer.runtime.loader_gguf as G

    path, _ = make_gguf_checkpoint(str(tmp_path), qtype="Q8_0", seed=6)
    full = load_model_files(path, device="cpu", dtype=torch.float32, progress=False)
    read = []
    real = G.dequantize
    monkeypatch.setattr(G, "dequantize", lambda raw, kind, shape: read.append(raw.numel()) or real(raw, kind, shape))

    def q8(rows, cols):
        return rows * cols // 32 * 34

    # hidden 64, vocab 512, intermediate 96, 2 layers, 4 query / 2 KV heads of 16: a rank holds 2 and 1.
    per_layer = q8(32, 64) + q8(16, 64) + q8(16, 64) + q8(64, 32) + q8(48, 64) + q8(48, 64) + q8(64, 64) + 2 * 64 * 4
    expected = q8(256, 64) * 2 + 64 * 4 + 2 * per_layer  # down_proj: blocks 0-1 (rank 0) or 1-2 (rank 1) of each row
    for rank in range(2):
        read.clear()
        part = load_model_files(path, device="cpu", dtype=torch.float32, progress=False, tensor_parallel=(rank, 2))
        _assert_shards_of(full, part, ShardSpec.of(full.config, rank, 2))
        assert sum(read) == expected
    # Kept quantized (the Triton backends): row slices and block-aligned column slices stay Q8_0 blocks; down_proj's
    # columns (48 of 96) do not fall on blocks and are decoded. Either way the values are the full model's slices.
    from trinfer.runtime.quantization import QuantizedWeight, to_dense

    part = load_model_files(path, device="cpu", dtype=torch.float32, progress=False, keep_quantized=True,
                            tensor_parallel=(1, 2))
    shard = ShardSpec.of(full.config, 1, 2)
    for name in ("embed_tokens", "layers.0.qkv_proj", "layers.1.o_proj", "layers.1.gate_up_proj"):
        assert isinstance(part.weights[name], QuantizedWeight), name
    assert not isinstance(part.weights["layers.0.down_proj"], QuantizedWeight)
    for name, w in full.weights.items():
        assert torch.equal(to_dense(part.weights[name], torch.float32), shard.shard_weight(full.config, name, w)), name


# ---------------------------------------------------------------------- engines over 2 spawned ranks


@pytest.fixture(scope="module")
def llama_tp(ckpts):
    """Llama GQA on 2 ranks with a KV cache small enough to preempt (26 blocks wanted, 14 there)."""
    eng = Engine(ckpts["llama-gqa"], backend="torch", device="cpu", block_size=4, num_kv_blocks=14, max_num_seqs=4,
                 tensor_parallel_size=2, tp_timeout=TP_TIMEOUT)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def llama_ref(ckpts):
    return one_device(ckpts["llama-gqa"])


def test_llama_gqa_equals_one_device_with_preemption(llama_tp, llama_ref):
    """All prompts at once: tokens (and logprobs, to 1e-4) of one device, with preemptions on the sharded engine."""
    before, continued = llama_tp.num_preemptions, llama_tp.decode_stats["continued"]
    assert_same(_generate(llama_tp, PROMPTS, NEW), llama_ref, "llama-gqa")
    assert llama_tp.num_preemptions > before
    # The asynchronous loop ran: steps fed by the previous step's argmax, left on every rank's device.
    assert llama_tp.decode_stats["continued"] > continued


def test_continuous_batching_and_abort_across_ranks(llama_tp, llama_ref):
    """Requests arrive while others decode, one is aborted mid-way: the others keep one device's tokens, the
    aborted one stops on a prefix of them, and the engine goes on."""
    eng, ids, final, step = llama_tp, {}, {}, 0
    arrivals = (0, 2, 3, 5)
    while len(final) < len(PROMPTS):
        for i, at in enumerate(arrivals):
            if at == step:
                ids[eng.add_request(PROMPTS[i], max_new_tokens=NEW[i], ignore_eos=True)] = i
        if step == 6:
            rid = next(r for r, i in ids.items() if i == 0)
            final[0] = eng.abort(rid)
        for out in eng.step():
            if out.finished:
                final[ids[out.request_id]] = out
        step += 1
        assert step < 200
    aborted = final[0]
    assert aborted.finish_reason == "abort" and 0 < len(aborted.token_ids) < NEW[0]
    assert aborted.token_ids == llama_ref[0][0][: len(aborted.token_ids)]
    assert [final[i].token_ids for i in (1, 2, 3)] == [llama_ref[i][0] for i in (1, 2, 3)]
    assert eng.tp.failed is None


def test_prefix_cache_and_chunked_prefill_across_ranks(ckpts):
    """Rank 0 schedules 5-token chunks (steps that sample no row) and prefix-cache hits (the second round of the
    same prompts reuses their blocks); the other rank runs the same passes: the tokens of one device without
    either, both rounds."""
    ref = one_device(ckpts["llama-gqa"], enable_prefix_caching=False, max_num_batched_tokens=4096)
    with LLM(ckpts["llama-gqa"], backend="torch", device="cpu", block_size=4, max_num_batched_tokens=5,
             tensor_parallel_size=2, tp_timeout=TP_TIMEOUT) as llm:
        assert_same(_generate(llm.engine, PROMPTS, NEW), ref, "chunked")
        assert_same(_generate(llm.engine, PROMPTS, NEW), ref, "cached")
        assert llm.engine.prefix_cache_stats.hit_tokens == 4 + 20  # round 2, prompts 0 and 2: (len - 1) // 4 blocks
        assert llm.engine.tp.failed is None


class _RecordingGroup:
    """A process group that records each all-reduce and all-gather (name, shape of the tensor sent) and passes it on."""

    def __init__(self, group, calls):
        self._group, self._calls = group, calls

    def allreduce(self, tensors, opts):
        self._calls.append(("all_reduce", tuple(tensors[0].shape)))
        return self._group.allreduce(tensors, opts)

    def _allgather_base(self, out, x):
        self._calls.append(("all_gather", tuple(x.shape)))
        return self._group._allgather_base(out, x)

    def __getattr__(self, name):
        return getattr(self._group, name)


def test_collectives_per_step_as_worked_by_hand(llama_tp):
    """Rank 0's collectives for one request (a 4-token prompt, 3 new tokens: a prefill and 2 decode passes), counted
    by hand from the layout: per pass one all-reduce of the embedding rows and two per layer (after o_proj, after
    down), each [tokens, hidden]; then one all-gather of the LM head's 3 numbers per sequence. Nothing more: an
    extra or a missing collective shows here even where it leaves the tokens as they were."""
    eng, calls = llama_tp, []
    real = eng.tp._group
    eng.tp._group = _RecordingGroup(real, calls)
    try:
        eng.add_request(PROMPTS[3], max_new_tokens=3, ignore_eos=True)
        while eng.has_unfinished():
            eng.step()
    finally:
        eng.tp._group = real
    layers, hidden = 2, 64

    def one_pass(tokens):
        return [("all_reduce", (tokens, hidden))] * (1 + 2 * layers) + [("all_gather", (1, 3))]

    assert calls == one_pass(4) + one_pass(1) + one_pass(1)


def test_qwen2_biases_fewer_kv_heads_than_ranks_tied_head(ckpts):
    path = ckpts["qwen2-kv1-tied"]
    ref = one_device(path)
    with LLM(path, backend="torch", device="cpu", block_size=4, tensor_parallel_size=2, tp_timeout=TP_TIMEOUT) as llm:
        assert llm.engine.runner.kv_cache.k[0].shape[2] == 1  # the one KV head, on each rank
        outs = _generate(llm.engine, PROMPTS, NEW)
        ranks = llm.engine.tp.processes
    assert_same(outs, ref, "qwen2-kv1-tied")
    assert len(ranks) == 1 and reaped(ranks)
    # And against transformers directly (not only through the one-device engine): tokens and log-probs.
    hf = no_eos(load_hf_model(path))
    for i, (prompt, n, (ids, lps)) in enumerate(zip(PROMPTS, NEW, outs)):
        want, want_lps = hf_greedy(hf, prompt, n)
        assert ids == want, f"prompt {i}: 2 ranks {ids} != transformers' {want}"
        assert_close(torch.tensor(lps), torch.tensor(want_lps), torch.float32, scale=10, name=f"logprobs {i}")


@pytest.mark.interpreter  # Triton kernels on CPU tensors: skipped where CUDA is present
def test_triton_backend_equals_one_device(tmp_path):
    """The Triton kernels (interpreted) on 2 ranks: Qwen3 (its per-head q/k norm, replicated, runs in the fused
    rotary kernel on each rank's heads), 2 query heads / 1 KV head of dim 64, tied, 4-token blocks; 5 tokens for
    2 prompts (prefill and decode across a block boundary)."""
    path = make_hf_checkpoint(str(tmp_path), "qwen3", hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                              head_dim=64, tie_word_embeddings=True, seed=8)  # (seed 7: a 2-cycle, too weak a check)
    prompts, new = [[1, 17, 99], [1, 400, 33, 2, 9, 81]], [5, 5]
    ref = one_device(path, prompts, new, backend="triton")
    with LLM(path, backend="triton", device="cpu", block_size=4, tensor_parallel_size=2,
             tp_timeout=TP_TIMEOUT) as llm:
        assert_same(_generate(llm.engine, prompts, new), ref, "triton")


def kill_rank_1_mid_generation(eng, seconds: float):
    """SIGKILL rank 1 three steps into a long generation, step on until rank 0 raises: (its error, seconds from
    the kill to the error, the killed process). Fails if no TensorParallelError comes within `seconds`."""
    eng.add_request(PROMPTS[0], max_new_tokens=2000, ignore_eos=True)
    for _ in range(3):
        eng.step()
    follower, = eng.tp.processes
    os.kill(follower.pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(TensorParallelError) as err:
        while time.monotonic() - t0 < seconds:
            eng.step()
    assert "rank 1" in str(err.value) and "SIGKILL" in str(err.value), str(err.value)
    return err.value, time.monotonic() - t0, follower


def test_rank_killed_mid_generation_stops_everything(ckpts):
    eng = Engine(ckpts["llama-gqa"], backend="torch", device="cpu", block_size=4, tensor_parallel_size=2,
                 tp_timeout=TP_TIMEOUT)
    try:
        _, elapsed, follower = kill_rank_1_mid_generation(eng, 30)
        # Seen without waiting for the collectives' timeout: gloo fails when the dead peer's sockets close.
        assert elapsed < TP_TIMEOUT / 2
        with pytest.raises(TensorParallelError, match="rank 1"):  # and it stays refused
            eng.step()
        assert reaped([follower])
    finally:
        eng.close()


def test_rank_raising_mid_generation_is_named(ckpts):
    """A rank that raises (here: a step header it does not know) reports why; rank 0 raises that, names the rank."""
    eng = Engine(ckpts["llama-gqa"], backend="torch", device="cpu", block_size=4, tensor_parallel_size=2,
                 tp_timeout=TP_TIMEOUT)
    try:
        eng.add_request(PROMPTS[1], max_new_tokens=50, ignore_eos=True)
        eng.step()
        eng.tp.send_header(99)
        with pytest.raises(TensorParallelError) as err:
            for _ in range(100):
                eng.step()
        assert "rank 1 raised RuntimeError: tensor parallelism: unknown step header 99" in str(err.value), str(err.value)
    finally:
        eng.close()
    assert reaped(eng.tp.processes)


def test_bad_split_refused_and_ranks_reaped(tmp_path):
    """6 query heads split 2 ways, but 3 KV heads do not: the error names tensor_parallel_size, the spawned rank
    (which refuses it too) is gone."""
    path = make_hf_checkpoint(str(tmp_path), "llama", hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    before = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match="tensor_parallel_size: 2 ranks cannot share the model's 3 KV heads"):
        Engine(path, backend="torch", device="cpu", tensor_parallel_size=2, tp_timeout=TP_TIMEOUT)
    assert reaped(set(multiprocessing.active_children()) - before)


def test_engine_arguments_refused_before_spawning(ckpts):
    before = set(multiprocessing.active_children())
    loaded = load_model_files(ckpts["llama-gqa"], device="cpu", dtype=torch.float32, progress=False)
    with pytest.raises(ValueError, match="model: with tensor parallelism every rank loads its own slices"):
        Engine(loaded, backend="torch", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size: expected an int >= 1, got 0"):
        Engine(ckpts["llama-gqa"], backend="torch", device="cpu", tensor_parallel_size=0)
    with pytest.raises(ValueError, match="tp_timeout: expected a number of seconds > 0"):
        Engine(ckpts["llama-gqa"], backend="torch", device="cpu", tensor_parallel_size=2, tp_timeout=0)
    assert set(multiprocessing.active_children()) == before


# ---------------------------------------------------------------------- torchrun and the command line


def test_torchrun_generate_gives_one_device_tokens(ckpts, capsys):
    """`torchrun --nproc-per-node 2 -m trinfer generate ...`: rank 0 prints the text of one device; every rank exits 0."""
    from trinfer.cli import main

    args = ["generate", "The capital of France is", "--model", ckpts["llama-gqa"], "--max-new-tokens", "10",
            "--ignore-eos", "--backend", "torch", "--device", "cpu", "--block-size", "4", "--quiet"]
    assert main(args) == 0
    expected = capsys.readouterr().out
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "trinfer", *args, "--tp-timeout", str(TP_TIMEOUT)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=HANG_S - 30)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == expected


def test_cli_passes_tensor_parallel_to_the_engine():
    from trinfer.cli import _engine_kwargs, build_parser

    for command in (["generate", "x"], ["serve"]):
        args = build_parser().parse_args(command + ["--tensor-parallel", "4", "--tp-timeout", "30"])
        kw = _engine_kwargs(args)
        assert kw["tensor_parallel_size"] == 4 and kw["tp_timeout"] == 30.0
    assert _engine_kwargs(build_parser().parse_args(["serve"]))["tensor_parallel_size"] is None


# ---------------------------------------------------------------------- GPUs (skipped here)


@pytest.fixture(scope="module")
def triton_ckpt(tmp_path_factory):
    """Llama, 2 query heads / 1 KV head of dim 64 (the attention kernels' smallest), tied LM head."""
    return make_hf_checkpoint(str(tmp_path_factory.mktemp("tp-cuda")), "llama", hidden_size=128,
                              num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True, seed=8)


@pytest.mark.cuda
def test_nccl_collectives_inside_decode_cuda_graphs_one_gpu(triton_ckpt, monkeypatch):
    """One GPU: the engine in a world of one rank on NCCL, so every all-reduce and the LM head's all-gather run
    (as with N ranks) inside the captured decode graphs; tokens equal the unsharded engine's."""
    import torch.distributed as dist

    import trinfer.runtime.engine as E
    from trinfer.runtime.distributed import TensorParallel

    ref = one_device(triton_ckpt, backend="triton", device="cuda", dtype="float32", block_size=16)

    def one_rank(size, device, *, timeout, engine_args):
        store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
        return TensorParallel(rank=0, world_size=1, device=device, store=store, prefix="t/", timeout=timeout)

    monkeypatch.setattr(E, "start_tensor_parallel", one_rank)
    with LLM(triton_ckpt, backend="triton", device="cuda", dtype="float32", block_size=16) as llm:
        runner = llm.engine.runner
        assert llm.engine.tp is not None and runner.graphs
        outs = _generate(llm.engine, PROMPTS, NEW)
        assert runner.num_graph_replays > 0
    assert_same(outs, ref, "one NCCL rank, CUDA graphs")


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_equal_one_and_a_killed_rank_is_named(triton_ckpt):
    """2 GPUs over NCCL with CUDA graphs: one GPU's tokens; then a rank killed mid-generation: rank 0 raises naming
    it (its wait on the device gives up once the watch thread sees the death and aborts the NCCL group)."""
    ref = one_device(triton_ckpt, backend="triton", device="cuda", dtype="float32", block_size=16)
    with LLM(triton_ckpt, backend="triton", device="cuda", dtype="float32", block_size=16, tensor_parallel_size=2,
             tp_timeout=120) as llm:
        assert_same(_generate(llm.engine, PROMPTS, NEW), ref, "2 GPUs")
        assert llm.engine.runner.num_graph_replays > 0
        _, _, follower = kill_rank_1_mid_generation(llm.engine, 100)
    assert reaped([follower])

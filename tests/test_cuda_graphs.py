"""CUDA graphs for decode and the synchronisation-free decode loop.

On the CPU: the bucket choice; the static decode buffers' incremental updates against a rebuild from scratch
(growth across blocks, finishes, arrivals, preemption, reordering, padding, the bulk path); the output copies;
the async pipeline's bookkeeping (the same tokens, log-probabilities, texts and finish reasons as the
synchronous loop through arrivals, preemption, EOS, stop strings and abort); and graph-shaped replays with a
CPU stand-in for a captured graph (fixed batch bucket and context bound, metadata frozen at "capture").
On a GPU (@cuda): real capture and replay against eager decoding, capture time and memory reported.
"""
import logging
import random

import pytest
import torch

from checkpoints import make_hf_checkpoint
from smol import default_model, one_torch_thread  # noqa: F401  (autouse fixture)
from trinfer.runtime import Engine, SamplingParams
from trinfer.runtime.attention_metadata import DecodeBuffers
from trinfer.runtime.block_manager import BlockManager
from trinfer.runtime.loader import load_model_files
from trinfer.runtime.model_runner import bucket_for, context_buckets, decode_batch_buckets
from trinfer.runtime.random_model import random_model
from trinfer.runtime.sequence import Sequence

PROMPTS = [[1] + [(5 * i + 11 * j) % 400 + 3 for j in range(n)] for i, n in enumerate((3, 17, 1, 9, 30, 5))]
NEW = [12, 20, 16, 9, 14, 22]


# ---------------------------------------------------------------------------------------------------------
# Buckets


def test_batch_buckets():
    assert decode_batch_buckets(1) == (1,)
    assert decode_batch_buckets(3) == (1, 2, 3)
    assert decode_batch_buckets(8) == (1, 2, 4, 8)
    assert decode_batch_buckets(20) == (1, 2, 4, 8, 16, 20)
    assert decode_batch_buckets(64) == (1, 2, 4, 8, 16, 32, 48, 64)
    assert len(decode_batch_buckets(256)) == 4 + 16


def test_context_buckets_and_choice():
    assert context_buckets(131072) == (256, 1024, 4096, 16384, 65536, 131072)
    assert context_buckets(200) == (200,) and context_buckets(256) == (256,) and context_buckets(257) == (256, 257)
    b = context_buckets(8200)
    assert [bucket_for(b, n) for n in (1, 256, 257, 1024, 1025, 8192, 8200)] == [256, 256, 1024, 1024, 4096,
                                                                                 8200, 8200]
    assert bucket_for(b, 8201) is None
    assert [bucket_for((1, 2, 4, 8), n) for n in (1, 3, 5, 8, 9)] == [1, 4, 8, 8, None]


# ---------------------------------------------------------------------------------------------------------
# DecodeBuffers: incremental updates equal a rebuild


def _seq(rid: int, n: int) -> Sequence:
    return Sequence(rid, [(7 * rid + j) % 97 + 1 for j in range(n)], SamplingParams(max_new_tokens=10_000,
                                                                                   ignore_eos=True))


def _check(buf: DecodeBuffers, ids, meta, seqs, size, block_size):
    n = len(seqs)
    pos = [s.num_tokens - 1 for s in seqs]
    assert meta.num_seqs == size and ids.shape == (size,) and meta.max_seq_len == max(s.num_tokens for s in seqs)
    assert meta.positions.tolist() == pos + [0] * (size - n)
    assert meta.slot_mapping.tolist() == [s.block_table[p // block_size] * block_size + p % block_size
                                          for s, p in zip(seqs, pos)] + [-1] * (size - n)
    assert meta.seq_lens.tolist() == [s.num_tokens for s in seqs] + [0] * (size - n)
    for i, s in enumerate(seqs):
        assert meta.block_tables[i, : len(s.block_table)].tolist() == s.block_table
    # Views of the static storage, whatever the batch.
    assert ids.data_ptr() == buf.input_ids.data_ptr() and meta.block_tables.data_ptr() == buf.block_tables.data_ptr()


@pytest.mark.parametrize("max_updates", [None, 1])
def test_decode_buffers_incremental_equal_rebuild(max_updates):
    """A random serving history: sequences grow across blocks, finish, arrive, get preempted and come back,
    change order; each step's buffers equal the metadata rebuilt from scratch (max_updates=1 forces most
    table changes through the bulk path)."""
    rng = random.Random(0)
    bs, m = 4, 6
    bm = BlockManager(num_blocks=200, block_size=bs)
    buf = DecodeBuffers(m, 16, torch.device("cpu"), max_updates=max_updates)
    running, next_id = [], 0
    prev = None
    for step in range(120):
        if len(running) < m and (not running or rng.random() < 0.15):  # an arrival (prefilled: one new token)
            s = _seq(next_id, rng.randint(1, 20))
            next_id += 1
            bm.allocate(s)
            s.append_token(rng.randint(1, 90), 0.0, 0.0)
            running.append(s)
        r, recomputed = rng.random(), False
        if r < 0.06 and len(running) > 1:  # a finish
            bm.free(running.pop(rng.randrange(len(running))))
        elif r < 0.1:  # preempted and recomputed: the same sequence, a new block table
            s = running[rng.randrange(len(running))]
            bm.free(s)
            bm.allocate(s)
            recomputed = True
        elif r < 0.13:
            rng.shuffle(running)
        for s in running:
            bm.append(s)  # a slot for the token fed now
        size = rng.randint(len(running), m)
        same = prev is not None and prev == [id(s) for s in running] and not recomputed  # as the engine
        on_device = same and rng.random() < 0.5
        if on_device:  # the previous step's argmax, left in the buffer
            buf.input_ids[: len(running)] = torch.arange(500, 500 + len(running))
        defer = rng.random() < 0.5
        ids, meta = buf.fill(running, bs, size, ids_on_device=on_device, defer_updates=defer)
        if defer:
            buf.apply_block_updates()
        _check(buf, ids, meta, running, size, bs)
        n = len(running)
        if on_device:  # left as they were
            assert ids.tolist()[:n] == list(range(500, 500 + n))
        else:
            assert ids.tolist() == [s.last_token_id for s in running] + [0] * (size - n)
        prev = [id(s) for s in running]
        for s in running:  # this step's token
            s.num_computed_tokens = s.num_tokens
            s.append_token(rng.randint(1, 90), 0.0, 0.0)
            if len(s.token_ids) > 60:  # keep within 16 blocks of 4
                bm.free(s)
        running = [s for s in running if s.block_table]
        if not running:
            prev = None


def test_decode_buffers_errors_and_steady_state():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = _seq(0, 5), _seq(1, 3)
    bm.allocate(a)
    bm.allocate(b)
    buf = DecodeBuffers(2, 3, torch.device("cpu"))
    buf.fill([a, b], 4)
    with pytest.raises(RuntimeError, match="ids_on_device"):
        buf.fill([b, a], 4, ids_on_device=True)  # rows changed: the device ids belong to other sequences
    a.append_token(3, 0.0, 0.0)
    a.append_token(3, 0.0, 0.0)
    a.append_token(3, 0.0, 0.0)  # 8 tokens: token 7 is in block 1 (owned); token 8 would need block 2
    buf.fill([a, b], 4)
    a.append_token(3, 0.0, 0.0)
    with pytest.raises(ValueError, match="has no KV block"):
        buf.fill([a, b], 4)
    bm.append(a)  # after an error every row is sent again: the buffers stay right
    _check(buf, *buf.fill([a, b], 4), [a, b], 2, 4)
    c = _seq(2, 13)
    c.block_table = [0, 1, 2, 3]
    with pytest.raises(ValueError, match="more than the 3 per sequence"):
        buf.fill([c], 4)
    with pytest.raises(ValueError, match="decode batch"):
        buf.fill([a, b], 4, padded_size=3)


def test_output_copies_double_buffered():
    buf = DecodeBuffers(4, 2, torch.device("cpu"))
    buf.input_ids[:3] = torch.tensor([5, 6, 7])
    buf.logprobs[:3] = torch.tensor([-0.5, -1.0, -2.0])
    h1 = buf.start_output_copy()
    buf.input_ids[:3] = torch.tensor([8, 9, 10])  # the next step's argmax, before the first is read
    h2 = buf.start_output_copy()
    assert h1 != h2
    assert buf.read_outputs(h1, 3) == ([5, 6, 7], [-0.5, -1.0, -2.0])
    assert buf.read_outputs(h2, 2) == ([8, 9], [-0.5, -1.0])


# ---------------------------------------------------------------------------------------------------------
# The async pipeline: exactly the synchronous loop's outputs


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = make_hf_checkpoint(str(tmp_path_factory.mktemp("llama")), "llama", seed=2)
    return load_model_files(path, device="cpu", dtype=torch.float32, progress=False)


def _serve(eng, arrivals=(0, 0, 1, 3, 3, 6), eos_free=True):
    """Add prompt i at step arrivals[i]; return {i: (token_ids, logprobs, finish_reason)}."""
    final, step, ids = {}, 0, {}
    while len(final) < len(PROMPTS):
        for i, at in enumerate(arrivals):
            if at == step:
                ids[eng.add_request(PROMPTS[i], max_new_tokens=NEW[i], ignore_eos=eos_free)] = i
        for out in eng.step():
            if out.finished:
                final[ids[out.request_id]] = (out.token_ids, out.logprobs, out.finish_reason)
        step += 1
        assert step < 400
    assert not eng.has_unfinished()
    bm = eng.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    return final


@pytest.mark.parametrize("num_kv_blocks", [None, 14])
def test_async_decode_equals_sync(loaded, num_kv_blocks):
    """Staggered arrivals (and, with 14 blocks of 4 tokens, preemption): the pipelined loop gives the synchronous
    loop's tokens and log-probabilities, and it did run steps fed from the device."""
    sync = Engine(loaded, backend="torch", block_size=4, num_kv_blocks=num_kv_blocks, async_decode=False)
    eng = Engine(loaded, backend="torch", block_size=4, num_kv_blocks=num_kv_blocks)
    assert _serve(eng) == _serve(sync)
    assert eng.decode_stats["continued"] > 0 and sync.decode_stats["continued"] == 0
    assert eng.num_preemptions == sync.num_preemptions and (eng.num_preemptions > 0) == (num_kv_blocks is not None)


def test_async_decode_eos_drops_and_reruns_the_launched_step(loaded):
    """An EOS ends a sequence while the next step already runs it: that step is dropped and run again without
    it, and every request's output equals the synchronous loop's."""
    at_once = (0,) * len(PROMPTS)  # nobody waits after the first step: the pipeline runs throughout
    tokens = _serve(Engine(loaded, backend="torch", block_size=4, async_decode=False), at_once)
    eos = {tokens[1][0][5], tokens[4][0][3]}  # EOS ids that end some requests mid-way
    runs = []
    for async_decode in (False, True):
        eng = Engine(loaded, backend="torch", block_size=4, async_decode=async_decode)
        eng.eos_token_ids = frozenset(eos)
        runs.append((_serve(eng, at_once, eos_free=False), eng))
    (sync, _), (got, eng) = runs
    assert got == sync
    assert any(r[2] == "eos" for r in got.values()) and eng.decode_stats["rerun"] > 0


def test_async_decode_abort_mid_flight(loaded):
    """abort() of a request whose token is still on the device: it gets that token, as in the synchronous loop;
    the other request's token of that step comes with the next step()."""
    results = []
    for async_decode in (False, True):
        eng = Engine(loaded, backend="torch", block_size=4, async_decode=async_decode)
        a = eng.add_request(PROMPTS[1], max_new_tokens=10, ignore_eos=True)
        b = eng.add_request(PROMPTS[4], max_new_tokens=10, ignore_eos=True)
        outs = eng.step() + eng.step()
        gone = eng.abort(a)
        outs += list(eng.run_until_done())
        with pytest.raises(KeyError):
            eng.abort(a)
        kept = [o for o in outs if o.request_id == b][-1]
        results.append((gone.token_ids, gone.finish_reason, kept.token_ids, len([o for o in outs if o.request_id == b])))
        assert eng.scheduler.block_manager.num_free_blocks == eng.scheduler.block_manager.num_blocks
    assert results[0] == results[1]
    assert len(results[0][0]) == 2 and results[0][1] == "abort" and len(results[0][2]) == 10


def test_async_decode_stop_strings_and_streaming():
    """Stop strings (a real tokenizer) end requests at unpredictable steps: texts, deltas, tokens and finish
    reasons equal the synchronous loop's."""
    _, smol = default_model()
    prompts = ["The three primary colors are", "Once upon a time", "1, 2, 3, 4,"]
    params = [SamplingParams(max_new_tokens=14, stop=[" and", "\n"]), SamplingParams(max_new_tokens=10, stop=["a"]),
              SamplingParams(max_new_tokens=12, stop=[" 7"])]
    runs = []
    for async_decode in (False, True):
        eng = Engine(smol, backend="torch", num_kv_blocks=16, async_decode=async_decode)
        for p, sp in zip(prompts, params):
            eng.add_request(p, sp)
        deltas, final = {}, {}
        for out in eng.run_until_done():
            deltas[out.request_id] = deltas.get(out.request_id, "") + out.delta_text
            if out.finished:
                final[out.request_id] = (out.text, out.token_ids, out.finish_reason)
        assert all(deltas[r] == final[r][0] for r in final)
        runs.append((final, eng.decode_stats))
    assert runs[0][0] == runs[1][0]
    assert any(f[2] == "stop" for f in runs[1][0].values())


# ---------------------------------------------------------------------------------------------------------
# Graph-shaped replays on the CPU


class CpuReplay:
    """Stands in for a captured CUDA graph on the CPU: `replay()` runs the captured step with the metadata it was
    "captured" with (its batch bucket and context bound; views of the static buffers). So it checks that a decode
    step reads and writes only static buffers and that the grid bound never changes a result."""

    def __init__(self, runner, size: int, bound: int):
        self.runner, self.size = runner, size
        _, self.meta = runner.decode_buffers.metadata(size, bound)

    def replay(self) -> None:
        self.runner._decode_step(self.size, self.meta)


def emulate_graphs(runner, bounds=None):
    runner.pad_decode = True
    if bounds is not None:
        runner.context_buckets = bounds
    runner.graphs = {(b, c): CpuReplay(runner, b, c) for b in runner.batch_buckets for c in runner.context_buckets}


def test_graph_shaped_replays_equal_eager_torch_backend(loaded):
    """Replayed from frozen metadata: bitwise the eager engine padded the same way (as on CUDA, where eager
    steps pad to the graph buckets too), and the unpadded engine's tokens (a matmul over more rows may round
    differently: on the CPU the log-probabilities can move in the last bits)."""
    eager = Engine(loaded, backend="torch", block_size=4, max_num_seqs=8, async_decode=False)
    eager.runner.pad_decode = True
    ref = _serve(eager)
    eng = Engine(loaded, backend="torch", block_size=4, max_num_seqs=8)
    emulate_graphs(eng.runner)
    got = _serve(eng)
    assert got == ref
    assert eng.runner.num_graph_replays > 0 and eng.runner.num_eager_decodes == 0
    unpadded = _serve(Engine(loaded, backend="torch", block_size=4))
    assert {i: r[0] for i, r in got.items()} == {i: r[0] for i, r in unpadded.items()}


@pytest.mark.interpreter
def test_graph_shaped_replays_on_triton_kernels_with_a_wide_grid():
    """The Triton kernels (interpreted): replays captured at a 1024-token bound (4 decode splits, most of them
    empty) with padded batches give the tokens of eager steps sized by the real lengths."""
    tiny = random_model("tiny", device="cpu", dtype=torch.float32, seed=1)
    prompts = [[1, 5, 9, 200], [1, 7, 7, 7, 2, 30, 31, 32, 33], [1, 100]]

    def run(graphs: bool):
        eng = Engine(tiny, backend="triton", block_size=16, max_model_len=1024, max_num_seqs=4)
        if graphs:
            emulate_graphs(eng.runner, bounds=(1024,))
        final, step = {}, 0
        while len(final) < len(prompts):
            if step < len(prompts):
                eng.add_request(prompts[step], max_new_tokens=5, ignore_eos=True, request_id=step)
            final.update((o.request_id, o.token_ids) for o in eng.step() if o.finished)
            step += 1
        return final, eng.runner

    eager, r0 = run(False)
    graphed, r1 = run(True)
    assert graphed == eager
    assert r1.num_graph_replays > 0 and r1.num_eager_decodes == 0 and r0.num_graph_replays == 0
    assert r1.decode_buffers.workspace is not None  # the kernels' static split scratch


def test_decode_step_runs_the_fused_ops():
    """What one decode step calls: the embedding rows, then per layer an RMSNorm fused with the residual add (a
    plain one in the first layer), one q/k/v matmul, rotary + K/V write in one op, one decode attention on the
    static workspace, o_proj, a fused add + RMSNorm, one gate/up matmul, SiLU-and-mul, down (the four matmuls
    through the backend's `linear`, told they are decode products); then the final fused norm and the fused LM
    head + argmax writing into the static ids: no other op, no separate sampling."""
    import collections
    import dataclasses

    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    tiny = random_model("tiny", device="cpu", dtype=torch.float32, seed=1)
    eng = Engine(tiny, backend="torch", block_size=16, max_num_seqs=2)
    runner, buf = eng.runner, eng.runner.decode_buffers
    buf.workspace = torch.empty(1)  # (the torch references need none; the Triton/CUDA kernels get it)
    calls = collections.Counter()
    seen = {}

    def counting(name, fn):
        def call(*args, **kwargs):
            calls[name] += 1
            seen.setdefault(name, kwargs)
            return fn(*args, **kwargs)
        return call

    ops = runner.model.ops
    names = [f.name for f in dataclasses.fields(ops) if f.name not in ("name", "cuda_families", "check_head_dim",
                                                                       "build_rope_cache", "batch_invariant")]
    counted = dataclasses.replace(ops, **{n: counting(n, getattr(ops, n)) for n in names})
    runner.model.ops = counted
    for layer in runner.model.layers:
        layer.ops = counted

    class Linears(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Linears.n += func is F.linear
            return func(*args, **(kwargs or {}))

    eng.add_request([1, 2, 3], max_new_tokens=4, ignore_eos=True)
    eng.step()  # the prefill
    calls.clear()
    seen.clear()
    step = eng.scheduler.schedule()
    with Linears():
        runner.run(step.decode, False)
    n_layers = tiny.config.num_layers
    assert dict(calls) == {"embedding": 1, "rms_norm": 1, "fused_add_rms_norm": 2 * n_layers,
                           "rotary_write_kv_cache": n_layers, "paged_decode_attention": n_layers,
                           "linear": 4 * n_layers, "silu_and_mul": n_layers, "lm_head_greedy": 1}
    assert Linears.n == 4 * n_layers + 1  # qkv, o, gate_up, down; + the torch backend's LM-head matmul
    assert seen["linear"]["decode"] is True  # the model tells the backend these are decode products
    assert seen["paged_decode_attention"]["workspace"] is buf.workspace
    assert seen["lm_head_greedy"]["out"][0].data_ptr() == buf.input_ids.data_ptr()


def test_no_graphs_without_cuda(loaded):
    eng = Engine(loaded, backend="torch", cuda_graphs=True)
    assert not eng.cuda_graphs and not eng.runner.graphs and eng.runner.graph_capture_s is None
    with pytest.raises(RuntimeError, match="CUDA device"):
        eng.runner.capture_cuda_graphs()


def test_capture_logic_with_torch_cuda_stood_in(monkeypatch, caplog):
    """capture_cuda_graphs' own Python (order, pool, warm-up before each capture, padding, the reported time and
    memory, the log line), with the torch.cuda calls it makes replaced by recorders: code that otherwise runs
    only on a GPU."""
    import contextlib
    import types

    tiny = random_model("tiny", device="cpu", dtype=torch.float32, seed=1)
    eng = Engine(tiny, backend="torch", block_size=16, max_model_len=1100, max_num_seqs=5)
    runner = eng.runner
    events, free = [], [10 << 30]

    class Graph:
        def capture_begin(self, pool=None, capture_error_mode="global"):
            events.append(("begin", pool, capture_error_mode))

        def capture_end(self):
            events.append(("end",))

        def replay(self):
            raise AssertionError("not replayed here")

    class Stream:
        def wait_stream(self, other):
            events.append(("wait",))

    def mem_get_info(device=None):
        free[0] -= 3 << 20  # each call: 3 MiB less free
        return free[0], 80 << 30

    for name, value in dict(CUDAGraph=Graph, Stream=lambda device=None: Stream(), graph_pool_handle=lambda: "pool",
                            stream=lambda s: contextlib.nullcontext(), synchronize=lambda device=None: None,
                            current_stream=lambda device=None: Stream(), empty_cache=lambda: None,
                            mem_get_info=mem_get_info).items():
        monkeypatch.setattr(torch.cuda, name, value)
    real_step = runner._decode_step

    def step(size, meta):
        assert meta.positions.tolist() == [0] * size and meta.slot_mapping.tolist() == [-1] * size
        assert meta.seq_lens.tolist() == [0] * size  # all padding: the captured steps write no KV
        events.append(("step", size, meta.max_seq_len))
        real_step(size, meta)

    monkeypatch.setattr(runner, "_decode_step", step)
    monkeypatch.setattr(runner, "device", types.SimpleNamespace(type="cuda"))
    with caplog.at_level(logging.INFO, logger="trinfer.runtime.model_runner"):
        runner.capture_cuda_graphs()
    order = [(b, c) for b in (5, 4, 2, 1) for c in (1100, 1024, 256)]
    assert runner.batch_buckets == (1, 2, 4, 5) and runner.context_buckets == (256, 1024, 1100)
    assert list(runner.graphs) == order  # largest first
    per_graph = [e for e in events if e[0] in ("step", "begin", "end")]
    expected = []
    for b, c in order:  # a warm-up, then the capture of the same step, all in one pool
        expected += [("step", b, c), ("begin", "pool", "thread_local"), ("step", b, c), ("end",)]
    assert per_graph == expected
    assert runner.graph_capture_s > 0 and runner.graph_memory_bytes == 3 << 20
    assert "captured 12 decode CUDA graphs (batch [1, 2, 4, 5] x context [256, 1024, 1100])" in caplog.text
    assert "12 CUDA graphs (4 batch x 3 context buckets) captured in" in runner.graph_summary()

    class FailingGraph(Graph):
        def capture_begin(self, pool=None, capture_error_mode="global"):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FailingGraph)
    with pytest.raises(RuntimeError, match=r"batch 5, context bound 1100\): operation not permitted.*cuda_graphs=False"):
        runner.capture_cuda_graphs()


# ---------------------------------------------------------------------------------------------------------
# GPU: real capture and replay


def _gpu_model():
    return random_model("tiny", device="cuda", dtype=torch.bfloat16, seed=3)


GPU_PROMPT_LENS = (1, 15, 16, 17, 40, 250, 300)  # across block boundaries and the 256-token context bucket


def _gpu_prompts(vocab: int, lens=GPU_PROMPT_LENS) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def _gpu_serve(loaded, prompts, *, staggered: bool, new: int = 24, **kw):
    eng = Engine(loaded, backend=kw.pop("backend", "triton"), block_size=16, max_model_len=1024,
                 max_num_seqs=kw.pop("max_num_seqs", 8), **kw)
    final, step = {}, 0
    if not staggered:
        for i, p in enumerate(prompts):
            eng.add_request(p, max_new_tokens=new, ignore_eos=True, request_id=i)
    while len(final) < len(prompts):
        if staggered and step < len(prompts):
            eng.add_request(prompts[step], max_new_tokens=new, ignore_eos=True, request_id=step)
        final.update((o.request_id, (o.token_ids, o.logprobs)) for o in eng.step() if o.finished)
        step += 1
    return final, eng


@pytest.mark.cuda
def test_cuda_graphs_capture_replay_equal_eager(caplog):
    """Captured graphs replayed over staggered arrivals (batch 1..7, lengths across blocks and context buckets)
    give the eager steps' tokens and log-probabilities exactly; capture time and memory are reported."""
    loaded = _gpu_model()
    prompts = _gpu_prompts(loaded.config.vocab_size)
    with caplog.at_level(logging.INFO, logger="trinfer.runtime.model_runner"):
        on, eng_on = _gpu_serve(loaded, prompts, staggered=True)
    off, eng_off = _gpu_serve(loaded, prompts, staggered=True, cuda_graphs=False)
    assert on == off
    r = eng_on.runner
    assert len(r.graphs) == len(r.batch_buckets) * len(r.context_buckets) == 4 * 2
    assert r.num_graph_replays > 0 and r.num_eager_decodes == 0
    assert r.graph_capture_s > 0 and r.graph_memory_bytes >= 0 and "captured 8 decode CUDA graphs" in caplog.text
    assert eng_off.runner.num_graph_replays == 0 and not eng_off.runner.graphs
    assert eng_on.decode_stats["continued"] > 0


@pytest.mark.cuda
@pytest.mark.parametrize("batch", [1, 2, 3, 5, 8])
def test_cuda_graphs_each_batch_size(batch):
    """All prompts at once at several batch sizes (padded to 1, 2, 4, 8): graphs on == graphs off == the
    synchronous loop."""
    loaded = _gpu_model()
    prompts = _gpu_prompts(loaded.config.vocab_size, GPU_PROMPT_LENS[:batch] if batch <= 7 else
                           GPU_PROMPT_LENS + (33,))
    on, eng = _gpu_serve(loaded, prompts, staggered=False)
    off, _ = _gpu_serve(loaded, prompts, staggered=False, cuda_graphs=False, async_decode=False)
    assert on == off and eng.runner.num_graph_replays > 0


@pytest.mark.cuda
def test_cuda_graphs_eos_rerun():
    """EOS mid-batch under graphs and the async loop: the synchronous eager loop's outputs."""
    loaded = _gpu_model()
    prompts = _gpu_prompts(loaded.config.vocab_size)[:5]
    ref, _ = _gpu_serve(loaded, prompts, staggered=False, cuda_graphs=False, async_decode=False)
    eos = frozenset({ref[1][0][6], ref[3][0][2]})
    outs = []
    for graphs, async_decode in ((False, False), (True, True)):
        eng = Engine(loaded, backend="triton", block_size=16, max_model_len=1024, max_num_seqs=8,
                     cuda_graphs=graphs, async_decode=async_decode)
        eng.eos_token_ids = eos
        for i, p in enumerate(prompts):
            eng.add_request(p, max_new_tokens=24, request_id=i)
        outs.append({o.request_id: (o.token_ids, o.finish_reason) for o in eng.run_until_done() if o.finished})
    assert outs[0] == outs[1] and any(v[1] == "eos" for v in outs[1].values())


@pytest.mark.cuda
def test_cuda_graphs_off_for_torch_backend_and_debug():
    loaded = _gpu_model()
    assert not Engine(loaded, backend="torch", max_model_len=512).runner.graphs
    assert not Engine(loaded, backend="triton", max_model_len=512, debug=True).runner.graphs
    assert Engine(loaded, backend="triton", max_model_len=512, max_num_seqs=2).runner.graphs

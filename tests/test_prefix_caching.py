"""Prefix caching and chunked prefill through the engine (torch backend, CPU, tiny random checkpoints).

Outputs with the cache equal outputs without it, token for token: across the model families, with chat prompts
sharing a system prompt, interleaved arrivals, preemption that evicts cached blocks, hits ending at a block
edge and one token past it; against transformers for one case. Chunked prefill gives the unchunked tokens and
running streams advance at every step of a long prefill. Cached blocks hold exactly the K/V of their tokens,
and aborts and failures leave no reference behind.
"""
import random

import pytest
import torch

from checkpoints import load_hf_model, make_hf_checkpoint
from smol import one_torch_thread  # noqa: F401  (autouse fixture)
from test_model_parity import FAMILIES, hf_greedy, no_eos
from tolerances import assert_close
from trinfer.runtime import LLM, Engine, SamplingParams
from trinfer.runtime.loader import load_model_files
from trinfer.runtime.prefix_cache import block_key
from trinfer.runtime.sequence import Sequence

BS = 4  # tokens per KV block in these tests: prompts cross many block edges


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = make_hf_checkpoint(str(tmp_path_factory.mktemp("llama")), "llama", seed=5)
    return path, load_model_files(path, device="cpu", dtype=torch.float32, progress=False)


def engine(loaded, **kw):
    kw.setdefault("backend", "torch")
    kw.setdefault("block_size", BS)
    return Engine(loaded, **kw)


def shared_prompts(seed: int, n: int = 6) -> list[list[int]]:
    """Prompts on two shared stems (22 and 13 tokens), cut at various lengths, with their own tails."""
    rng = random.Random(seed)
    stems = [[1] + [rng.randrange(5, 500) for _ in range(21)], [1] + [rng.randrange(5, 500) for _ in range(12)]]
    cuts = [22, 9, 16, 13, 5, 21, 12, 8]
    return [stems[i % 2][: cuts[i % len(cuts)]] + [rng.randrange(5, 500) for _ in range(i % 4)] for i in range(n)]


def serve_outputs(eng, prompts, new, arrivals=None) -> dict:
    """Add prompt i at step arrivals[i] (default: all at once); returns {i: final RequestOutput}."""
    arrivals = arrivals or [0] * len(prompts)
    ids, final, step = {}, {}, 0
    while len(final) < len(prompts):
        for i, at in enumerate(arrivals):
            if at == step:
                ids[eng.add_request(prompts[i], max_new_tokens=new[i] if isinstance(new, list) else new,
                                    ignore_eos=True)] = i
        final.update((ids[o.request_id], o) for o in eng.step() if o.finished)
        step += 1
        assert step < 2000
    bm = eng.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not any(bm.pool.ref_count)  # no reference left
    return final


def serve(eng, prompts, new, arrivals=None):
    """As serve_outputs: ({i: token_ids}, {i: num_cached_tokens})."""
    final = serve_outputs(eng, prompts, new, arrivals)
    return {i: o.token_ids for i, o in final.items()}, {i: o.num_cached_tokens for i, o in final.items()}


# ---------------------------------------------------------------------------------------------------------
# Same outputs with and without the cache


@pytest.mark.parametrize("name", list(FAMILIES))
def test_families_same_tokens_with_and_without_caching(name, tmp_path):
    """Shared stems, interleaved arrivals, chunked (budget 7) or not: every run gives the tokens of the run
    without caching and without chunking; the cached run reused prompt tokens."""
    kw = dict(FAMILIES[name])
    path = make_hf_checkpoint(str(tmp_path), kw.pop("family"), **kw)
    loaded = load_model_files(path, device="cpu", dtype=torch.float32, progress=False)
    prompts, arrivals = shared_prompts(1), [0, 3, 3, 5, 8, 9]
    ref, _ = serve(engine(loaded, enable_prefix_caching=False, max_num_batched_tokens=4096), prompts, 8, arrivals)
    for budget in (4096, 7):
        eng = engine(loaded, max_num_batched_tokens=budget)
        got, cached = serve(eng, prompts, 8, arrivals)
        assert got == ref, f"{name}, budget {budget}"
        assert eng.prefix_cache_stats.hit_tokens == sum(cached.values()) > 0


def test_chat_prompts_sharing_a_system_prompt(llama):
    """Chat requests with one long system prompt, one after another: the same answers with and without the
    cache, and each request reuses exactly the whole blocks of its longest common prefix with an earlier
    prompt (at most all but its last token), worked out here from the token ids."""
    path, loaded = llama
    system = ("You are a careful assistant. Answer in one short sentence, name your sources, and never guess "
              "numbers you do not know.")
    questions = ["What is the capital of France?", "What is the capital of Japan?", "Name a prime number.",
                 "What is the capital of France? Be brief."]
    runs = {}
    for caching in (False, True):
        eng = engine(loaded, enable_prefix_caching=caching)
        outs = []
        for q in questions:  # one after another: each finds all earlier prompts' blocks cached
            eng.add_request([{"role": "system", "content": system}, {"role": "user", "content": q}], chat=True,
                            max_new_tokens=6, ignore_eos=True)
            outs.append(list(eng.run_until_done())[-1])
        runs[caching] = outs
    assert [o.token_ids for o in runs[True]] == [o.token_ids for o in runs[False]]
    assert [o.text for o in runs[True]] == [o.text for o in runs[False]]
    prompts = [o.prompt_token_ids for o in runs[True]]
    hits = []
    for i, out in enumerate(runs[True]):
        lcp = 0
        for earlier in prompts[:i]:
            n = 0
            while n < min(len(earlier), len(prompts[i])) and earlier[n] == prompts[i][n]:
                n += 1
            lcp = max(lcp, n)
        hits.append(min(lcp, len(prompts[i]) - 1) // BS * BS)
        assert runs[False][i].num_cached_tokens == 0
    assert [o.num_cached_tokens for o in runs[True]] == hits
    assert hits[0] == 0 and hits[1] >= 20 and hits[3] > hits[1]  # the system prompt; then the question too


def test_hit_ending_at_a_block_edge_and_one_token_past_it(llama):
    """A 12-token prompt whose 3 blocks are cached: run again, its last token must be computed, so only 2 blocks
    (8 tokens) are reused and the third is recomputed into a block of its own; its first 11 tokens: 2 blocks
    too; with one more token (13): all 3 blocks, and the one token left is prefilled alone."""
    _, loaded = llama
    p = [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]
    cases = [p, p, p[:11], p + [77], p[:8], p[:9]]
    expected_hits = [0, 8, 8, 12, 4, 8]
    ref = [serve(engine(loaded, enable_prefix_caching=False), [c], 6)[0][0] for c in cases]
    eng = engine(loaded)
    for case, hit, want in zip(cases, expected_hits, ref):
        got, cached = serve(eng, [case], 6)
        assert got[0] == want and cached[0] == hit, f"{len(case)} tokens"


def test_preemption_evicting_cached_blocks_same_tokens(llama):
    """A cache of 14 blocks of 4 tokens: staggered requests on shared stems preempt each other and evict cached
    blocks; the tokens are those of the run without the cache."""
    _, loaded = llama
    prompts, arrivals, new = shared_prompts(2, 8), [0, 0, 1, 2, 2, 4, 6, 7], [14, 10, 12, 9, 14, 11, 8, 13]
    ref, _ = serve(engine(loaded, enable_prefix_caching=False, num_kv_blocks=14), prompts, new, arrivals)
    eng = engine(loaded, num_kv_blocks=14, max_num_batched_tokens=9)
    got, _ = serve(eng, prompts, new, arrivals)
    assert got == ref
    st = eng.prefix_cache_stats
    assert eng.num_preemptions > 0 and st.evictions > 0 and st.hit_tokens > 0 and st.readmissions > 0


def test_cached_prefix_matches_transformers(llama):
    """The second request reuses the first's blocks; its tokens are transformers' greedy tokens."""
    path, loaded = llama
    first = [1, 9, 8, 7, 6, 5, 4, 3, 2, 10, 11, 12, 13, 14, 15, 16, 17, 18]
    second = first[:14] + [200, 201, 202]
    llm = LLM(loaded, backend="torch", block_size=BS)
    llm.generate(first, max_new_tokens=4, ignore_eos=True)
    out = llm.generate(second, max_new_tokens=12, ignore_eos=True)[0]
    assert out.num_cached_tokens == 12
    assert out.token_ids == hf_greedy(no_eos(load_hf_model(path)), second, 12)[0]


# ---------------------------------------------------------------------------------------------------------
# Chunked prefill


@pytest.mark.parametrize("async_decode", [False, True])
def test_chunked_prefill_same_tokens_as_unchunked(llama, async_decode):
    _, loaded = llama
    prompts, arrivals = shared_prompts(3, 5), [0, 1, 1, 4, 6]
    ref, _ = serve(engine(loaded, enable_prefix_caching=False, max_num_batched_tokens=4096), prompts, 9, arrivals)
    for budget in (2, 5, 16):
        got, _ = serve(engine(loaded, enable_prefix_caching=False, max_num_batched_tokens=budget,
                              async_decode=async_decode), prompts, 9, arrivals)
        assert got == ref, f"budget {budget}"


def test_streams_advance_at_every_step_of_a_long_prefill(llama):
    """Two streams decode; a 41-token prompt arrives. Budget 6: each step gives both streams a token and
    prefills 4 tokens of the prompt (10 steps); its last token joins the streams' decode pass in the 11th step
    and yields its first token. The step schedule, exactly; and the streams' tokens are those they get alone."""
    _, loaded = llama
    long = [1] + [(37 * j) % 400 + 5 for j in range(40)]
    streams = [[1, 2, 3], [1, 50, 60]]
    alone = [serve(engine(loaded), [s], 20)[0][0] for s in streams]
    eng = engine(loaded, max_num_batched_tokens=6, async_decode=False)
    for i, s in enumerate(streams):
        eng.add_request(s, max_new_tokens=20, ignore_eos=True, request_id=f"s{i}")
    eng.step()  # both prefilled together: their first tokens
    eng.add_request(long, max_new_tokens=3, ignore_eos=True, request_id="long")
    schedule = []  # per step: who got a token, decode passes run, prompt tokens of "long" computed by then
    seq_long = None
    while True:
        before = eng.runner.num_eager_decodes
        outs = eng.step()
        seq_long = seq_long or next(s for s in eng.scheduler.running if s.request_id == "long")
        schedule.append((sorted(o.request_id for o in outs), eng.runner.num_eager_decodes - before,
                         seq_long.num_computed_tokens))
        if any(o.request_id == "long" for o in outs):
            break
    assert schedule == [(["s0", "s1"], 1, 4 * (i + 1)) for i in range(10)] + [(["long", "s0", "s1"], 1, 41)]
    final = {o.request_id: o.token_ids for o in eng.run_until_done() if o.finished}
    assert [final["s0"], final["s1"]] == alone


# ---------------------------------------------------------------------------------------------------------
# Cached contents and references


def test_cached_blocks_hold_the_kv_of_their_tokens(llama):
    """After staggered requests under the asynchronous decode pipeline (tokens still on the device are never
    published) with chunks and preemption: every cached block's key is that of a chain of tokens some request
    had, and the block holds the K/V a fresh prefill of that chain computes."""
    _, loaded = llama
    prompts, arrivals, new = shared_prompts(4, 6), [0, 0, 2, 3, 5, 5], [13, 9, 12, 7, 10, 11]
    eng = engine(loaded, num_kv_blocks=14, max_num_batched_tokens=7)
    tokens = {i: o.prompt_token_ids + o.token_ids for i, o in serve_outputs(eng, prompts, new, arrivals).items()}
    assert eng.decode_stats["continued"] > 0 and eng.num_preemptions > 0
    bm = eng.scheduler.block_manager
    chains = {}  # key -> the tokens of its whole chain
    for toks in tokens.values():
        parent = bm._root
        for j in range(len(toks) // BS):
            parent = block_key(parent, toks[j * BS: (j + 1) * BS])
            chains[parent] = toks[: (j + 1) * BS]
    assert bm.pool.cached and set(bm.pool.cached) <= set(chains)
    ref = engine(loaded, enable_prefix_caching=False)
    for key, block in bm.pool.cached.items():
        s = Sequence("ref", chains[key], SamplingParams(max_new_tokens=1))
        ref.scheduler.block_manager.allocate(s)
        ref.runner.run([s], True)
        last = s.block_table[-1]
        for layer in range(len(ref.runner.kv_cache.k)):
            assert_close(eng.runner.kv_cache.k[layer][block], ref.runner.kv_cache.k[layer][last], torch.float32)
            assert_close(eng.runner.kv_cache.v[layer][block], ref.runner.kv_cache.v[layer][last], torch.float32)
        ref.scheduler.block_manager.free(s)


def test_abort_and_a_failed_step_leave_no_reference(llama, monkeypatch):
    """Aborts mid-chunk and of a request sharing cached blocks, and a forward pass that raises while a request
    with a cache hit is prefilled: afterwards every block is free with count 0, nothing was published from the
    failed step, and new requests on the same prefix still give the tokens of an engine without the cache."""
    _, loaded = llama
    p = [1] + list(range(100, 130))
    eng = engine(loaded, max_num_batched_tokens=8)
    serve(eng, [p], 3)  # p's blocks cached
    a = eng.add_request(p[:20] + [7, 7, 7, 7, 7, 7], max_new_tokens=5, ignore_eos=True)  # hit: 20 tokens
    b = eng.add_request([1] + list(range(300, 330)), max_new_tokens=5, ignore_eos=True)  # chunked: 31 tokens
    eng.step()
    assert eng.scheduler.running[1].num_computed_tokens < 31  # b is part-way through its prompt
    eng.abort(b)
    eng.abort(a)
    bm = eng.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not any(bm.pool.ref_count)
    cached_before = dict(bm.pool.cached)

    calls = {"n": 0}
    real_forward = eng.runner.model.forward

    def failing(input_ids, meta, kv_cache):
        calls["n"] += 1
        real_forward(input_ids, meta, kv_cache)  # K/V written into the request's own blocks, then a failure
        raise RuntimeError("device fault")

    monkeypatch.setattr(eng.runner.model, "forward", failing)
    c = eng.add_request(p[:24] + [9, 9, 9], max_new_tokens=4, ignore_eos=True)
    with pytest.raises(RuntimeError, match="device fault"):
        eng.step()
    seq = eng._requests[c]
    assert seq.num_computed_tokens == 24 and seq.num_published_blocks == 6  # the hit only: nothing new published
    assert dict(bm.pool.cached) == cached_before
    eng.abort(c)
    assert bm.num_free_blocks == bm.num_blocks and not any(bm.pool.ref_count) and calls["n"] == 1
    monkeypatch.undo()
    case = p[:24] + [9, 9, 9]
    got, cached = serve(eng, [case], 6)
    assert cached[0] == 24 and got[0] == serve(engine(loaded, enable_prefix_caching=False), [case], 6)[0][0]


def test_bad_arguments(llama):
    _, loaded = llama
    with pytest.raises(ValueError, match="max_num_batched_tokens: expected an int >= 1"):
        engine(loaded, max_num_batched_tokens=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        engine(loaded, max_num_batched_tokens=2.5)
    with pytest.raises(TypeError, match="enable_prefix_caching: expected a bool"):
        engine(loaded, enable_prefix_caching="no")


@pytest.mark.interpreter  # Triton kernels on CPU tensors: skipped where CUDA is present
def test_triton_kernels_with_cached_prefixes_chunks_and_kv_splits(tmp_path):
    """The Triton kernels (interpreted on a CPU), tiny model: cached prefixes, chunks of 5 tokens and the prefill
    attention split over keys (planned with 8-key splits, so that these short prompts split) give the tokens of
    the torch backend without cache or chunks."""
    from trinfer.triton_kernels import plan_prefill_attention

    path = make_hf_checkpoint(str(tmp_path), "llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    tiny = load_model_files(path, device="cpu", dtype=torch.float32, progress=False)
    stem = [1] + [(11 * j) % 300 + 5 for j in range(19)]
    prompts = [stem + [7, 8], stem[:14] + [9], stem + [3, 3, 3, 3, 3]]
    ref, _ = serve(engine(tiny, enable_prefix_caching=False, max_num_batched_tokens=4096), prompts, 4, [0, 2, 3])
    eng = engine(tiny, backend="triton", max_num_batched_tokens=6)
    plans = []

    def planner(q_lens, kv_lens):
        plans.append(plan_prefill_attention(q_lens, kv_lens, num_q_heads=2, num_kv_heads=1, head_dim=64,
                                            dtype=torch.float32, device="cpu", min_split_keys=8))
        return plans[-1]

    eng.runner._plan_prefill = planner
    got, cached = serve(eng, prompts, 4, [0, 2, 3])
    assert got == ref and cached[1] == 12 and cached[2] == 20
    assert any(p.split for p in plans)

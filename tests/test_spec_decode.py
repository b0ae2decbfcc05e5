"""Speculative decoding through the engine: the tokens of plain greedy decoding, whatever is proposed.

Torch backend in fp32 on tiny random checkpoints (tests/checkpoints.py) for every family, both proposers (n-gram;
a draft model: the target itself, which is always right, or a perturbed copy of it, which is right only
sometimes), k = 1..8, staggered arrivals, preemption and abort; outputs cut where plain decoding stops (EOS, stop
strings and max_new_tokens at every offset inside an accepted run); the block pool after rollback; streaming,
log-probabilities and statistics; bad draft models. The Triton kernels under the interpreter with
batch_invariant=True: tokens and log-probabilities bit for bit. GPU (@cuda): verify passes replayed from CUDA
graphs. Two CPU ranks (gloo): n-gram speculation with tensor parallelism.
"""
import dataclasses
import json

import pytest
import torch

from checkpoints import assert_varied, load_hf_model, make_hf_checkpoint
from smol import one_torch_thread  # noqa: F401  (autouse fixture)
from test_model_parity import FAMILIES, hf_greedy, no_eos
from tolerances import assert_close
from trinfer.cli import main
from trinfer.runtime import LLM, Engine
from trinfer.runtime.loader import load_model_files

NGRAM = {"method": "ngram", "num_tokens": 4}
# Prompts that repeat themselves (something for the n-gram lookup to find) and one that does not.
PROMPTS = [[1] + [(7 * i + 3 * j) % 60 + 5 for j in range(n)] * reps
           for i, (n, reps) in enumerate(((3, 3), (7, 3), (1, 4), (5, 2), (11, 2), (19, 1)))]
NEW = [24, 30, 18, 27, 21, 25]


def load(path):
    return load_model_files(path, device="cpu", dtype=torch.float32, progress=False)


def perturbed(loaded, scale, seed=0):
    """The model with Gaussian noise of `scale` x each matrix's std added: a draft that agrees with the target on
    most tokens, not all (the same tokenizer, the same shapes)."""
    g = torch.Generator().manual_seed(seed)
    weights = {k: (w + scale * w.std() * torch.randn(w.shape, generator=g).to(w.device, w.dtype) if w.dim() == 2
                   else w) for k, w in loaded.weights.items()}
    return dataclasses.replace(loaded, weights=weights)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = make_hf_checkpoint(str(tmp_path_factory.mktemp("spec")), "llama", seed=1)
    return path, load(path)


def engine(loaded, **kw):
    kw.setdefault("backend", "torch")
    kw.setdefault("block_size", 4)
    return Engine(loaded, **kw)


def generate(eng, prompts=PROMPTS, new=NEW, arrivals=None, abort=None, **params):
    """Add prompt i at step arrivals[i] (default: all at once); abort=(i, step) aborts prompt i at that step.
    Returns the final outputs in prompt order."""
    arrivals = arrivals or [0] * len(prompts)
    ids, final, step = {}, {}, 0
    while len(final) < len(prompts):
        for i, at in enumerate(arrivals):
            if at == step:
                ids[eng.add_request(prompts[i], max_new_tokens=new[i], ignore_eos=True, **params)] = i
        if abort is not None and step == abort[1]:
            rid = next(r for r, i in ids.items() if i == abort[0])
            final[abort[0]] = eng.abort(rid)
        for out in eng.step():
            if out.finished and ids[out.request_id] not in final:
                final[ids[out.request_id]] = out
        step += 1
        assert step < 1000
    bm = eng.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks  # every block back, none leaked by a rollback
    return [final[i] for i in range(len(prompts))]


def tokens(outs):
    return [o.token_ids for o in outs]


@pytest.fixture(scope="module")
def plain(llama):
    """Each prompt decoded alone, without speculation: the reference (checked varied: a degenerate model would let
    any two engines agree)."""
    outs = [generate(engine(llama[1]), [p], [n])[0] for p, n in zip(PROMPTS, NEW)]
    assert_varied(PROMPTS, tokens(outs))
    return outs


# ---------------------------------------------------------------------------------------------------------
# Equality with plain greedy decoding


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_both_proposers_give_plain_tokens(name, tmp_path):
    """Each family (biases, rope scaling, GQA, q/k norm, tied heads): n-gram and a perturbed-copy draft give the
    tokens of plain decoding, which are transformers' (the independent oracle), log-probabilities within fp32
    rounding; both proposers had accepted and rejected proposals; the outputs are varied (`assert_varied`)."""
    kw = dict(FAMILIES[name])
    path = make_hf_checkpoint(str(tmp_path), kw.pop("family"), seed=3, **kw)
    loaded = load(path)
    prompts, new = PROMPTS[:4], NEW[:4]
    ref = generate(engine(loaded, max_num_seqs=4), prompts, new)
    assert_varied(prompts, tokens(ref))
    hf = no_eos(load_hf_model(path))  # the independent oracle: transformers' greedy decoding
    assert tokens(ref) == [hf_greedy(hf, p, n)[0] for p, n in zip(prompts, new)]
    for spec in (NGRAM, {"method": "draft", "model": perturbed(loaded, 0.2), "num_tokens": 3}):
        eng = engine(loaded, max_num_seqs=4, speculative=spec)
        outs = generate(eng, prompts, new)
        assert tokens(outs) == tokens(ref), spec["method"]
        for o, r in zip(outs, ref):
            assert_close(torch.tensor(o.logprobs), torch.tensor(r.logprobs), torch.float32, scale=10)
        st = eng.spec_stats
        assert 0 < st.num_accepted < st.num_proposed, (spec["method"], st)
        assert st.num_verify_steps < sum(len(o.token_ids) for o in outs)  # some steps emitted several tokens


@pytest.mark.parametrize("k", range(1, 9))
def test_ngram_any_k_staggered_preempted_aborted(llama, plain, k):
    """Arrivals while others decode, a cache small enough to preempt (30 blocks of 4 for ~250 tokens), one request
    aborted mid-way: every other request gets its tokens alone, the aborted one a prefix of them."""
    eng = engine(llama[1], num_kv_blocks=30, speculative={**NGRAM, "num_tokens": k})
    outs = generate(eng, arrivals=(0, 0, 1, 3, 3, 6), abort=(3, 9))
    assert eng.num_preemptions > 0 and eng.spec_stats.num_accepted > 0
    for i, (o, r) in enumerate(zip(outs, plain)):
        if i == 3:
            assert o.finish_reason == "abort" and o.token_ids == r.token_ids[: len(o.token_ids)]
        else:
            assert o.token_ids == r.token_ids and o.finish_reason == "length", i


@pytest.mark.parametrize("k", [1, 4, 8])
def test_draft_any_k_staggered_preempted(llama, plain, k):
    draft = perturbed(llama[1], 0.15)
    eng = engine(llama[1], num_kv_blocks=30, speculative={"method": "draft", "model": draft, "num_tokens": k})
    outs = generate(eng, arrivals=(0, 0, 1, 3, 3, 6))
    assert eng.num_preemptions > 0 and 0 < eng.spec_stats.num_accepted < eng.spec_stats.num_proposed
    assert tokens(outs) == tokens(plain)


def test_self_draft_cache_stays_valid_through_preemption_and_rollback(llama, plain):
    """The target as its own draft must have every proposal accepted: the draft's cache (on the target's blocks)
    holds the right K/V through staggered arrivals, preemption and recompute, rolled-back rows, cut proposals and
    a small token budget; a stale or misplaced draft K/V would show as a rejection."""
    eng = engine(llama[1], num_kv_blocks=18, max_num_batched_tokens=12,
                 speculative={"method": "draft", "model": llama[1], "num_tokens": 5})
    outs = generate(eng, arrivals=(0, 0, 1, 3, 3, 6))
    assert tokens(outs) == tokens(plain) and eng.num_preemptions > 0
    st = eng.spec_stats
    assert st.num_accepted == st.num_proposed > 0


def test_draft_from_a_path_and_the_prefix_cache(llama, plain):
    """The draft as a checkpoint path (the target's own: every proposal accepted); the same prompts twice reuse
    the cached blocks, which hold the draft's K/V too: the second round's proposals are as good."""
    path, loaded = llama
    eng = engine(loaded, speculative={"method": "draft", "model": path, "num_tokens": 4})
    for _ in range(2):
        assert tokens(generate(eng)) == tokens(plain)
        st = eng.spec_stats
        assert st.num_accepted == st.num_proposed > 0
    assert eng.prefix_cache_stats.hit_tokens > 0


# ---------------------------------------------------------------------------------------------------------
# Where an accepted run stops


@pytest.fixture(scope="module")
def self_draft(llama):
    """Speculation with the target as its own draft, k = 4: every step emits runs of 5 tokens."""
    return engine(llama[1], speculative={"method": "draft", "model": llama[1], "num_tokens": 4})


def test_max_new_tokens_at_every_offset_of_a_run(self_draft, plain):
    for n in range(1, 12):
        out = generate(self_draft, PROMPTS[:1], [n])[0]
        assert out.token_ids == plain[0].token_ids[:n] and out.finish_reason == "length", n


def test_eos_inside_a_run(self_draft, plain):
    ref = plain[1].token_ids
    for j in range(1, 7):
        eos = ref[j]
        if eos in ref[:j]:
            continue
        self_draft.eos_token_ids = frozenset({eos})
        ids = self_draft.add_request(PROMPTS[1], max_new_tokens=NEW[1])
        out = [o for o in self_draft.run_until_done() if o.request_id == ids][-1]
        assert out.finish_reason == "eos" and out.token_ids == ref[: j + 1], j
    self_draft.eos_token_ids = frozenset()


def test_stop_strings_inside_a_run(llama):
    """Text prompts (the tiny tokenizer): a stop string starting at each of several characters of the plain
    output cuts the speculative output at the same token, with the same text and finish reason."""
    loaded = llama[1]
    prompt = "The capital of France is Paris, the capital of Japan is Tokyo, and the capital of Italy is"
    eng_plain = engine(loaded)
    eng = engine(loaded, speculative={"method": "draft", "model": loaded, "num_tokens": 4})
    base = generate(eng_plain, [prompt], [20])[0].text
    assert len(base) >= 12
    for start in (2, 5, 9):
        stop = base[start: start + 3]
        want = generate(eng_plain, [prompt], [20], stop=[stop])[0]
        got = generate(eng, [prompt], [20], stop=[stop])[0]
        assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, "stop"), stop


# ---------------------------------------------------------------------------------------------------------
# Blocks, streaming, statistics, the asynchronous loop


def test_rollback_leaves_the_pool_as_plain_decoding(llama):
    """One request, prefix caching on: after every step the sequence holds the same blocks as plain decoding at
    the same number of tokens, and at the end the pool (free queue order, cached keys) is the same."""
    def run(spec):
        eng = engine(llama[1], num_kv_blocks=40, speculative=spec)
        eng.add_request(PROMPTS[1], max_new_tokens=40, ignore_eos=True)
        seq, tables = eng.scheduler.waiting[0], {}
        while eng.has_unfinished():
            eng.step()
            tables[len(seq.token_ids)] = list(seq.block_table)
        pool = eng.scheduler.block_manager.pool
        return tables, list(pool.free), dict(pool.cached), eng
    ref_tables, ref_free, ref_cached, _ = run(None)
    tables, free, cached, eng = run(NGRAM)
    assert eng.spec_stats.num_accepted > 0 and len(tables) < len(ref_tables)
    for n, table in tables.items():
        if n < 41 + len(PROMPTS[1]) - 1:  # the last step's table is released (finished)
            assert table == ref_tables[n], n
    assert free == ref_free and cached == ref_cached


def test_streaming_logprobs_and_statistics(llama):
    """Deltas (several tokens in a verify step) add up to the final tokens and text, which equal plain decoding's;
    one log-probability per token; per-request statistics add up to the engine's."""
    loaded = llama[1]
    prompt = "def generate(model, prompt):\n    tokens = tokenizer.encode(prompt)\n    tokens = tokenizer"
    want = LLM(loaded, backend="torch", block_size=4).generate([prompt] * 2, max_new_tokens=30, ignore_eos=True)
    llm = LLM(loaded, backend="torch", block_size=4, speculative=NGRAM)
    deltas = {}
    outs = llm.generate([prompt, prompt + " "], max_new_tokens=30, ignore_eos=True,
                        on_output=lambda o: deltas.setdefault(o.request_id, []).append(o))
    assert outs[0].token_ids == want[0].token_ids and outs[0].text == want[0].text
    assert any(len(d.delta_token_ids) > 1 for ds in deltas.values() for d in ds)
    total = [0, 0, 0]
    for o in outs:
        ds = deltas[o.request_id]
        assert sum((d.delta_token_ids for d in ds), []) == o.token_ids
        assert "".join(d.delta_text for d in ds) == o.text and len(o.logprobs) == len(o.token_ids)
        st = o.spec_stats
        assert st.num_accepted <= st.num_proposed and st.num_verify_steps <= len(o.token_ids)
        total = [total[0] + st.num_verify_steps, total[1] + st.num_proposed, total[2] + st.num_accepted]
    eng = llm.engine.spec_stats
    assert total == [eng.num_verify_steps, eng.num_proposed, eng.num_accepted] and eng.num_accepted > 0
    assert eng.mean_accepted_length == eng.num_accepted / eng.num_verify_steps
    assert "proposed tokens accepted" in llm.engine.spec_summary()


def test_backoff_and_the_asynchronous_loop(llama, plain):
    """A draft that is nearly always wrong (another random model): each rejection doubles the sequence's pause; paused
    sequences decode plainly, in the one-step-ahead pipeline; the tokens are plain decoding's."""
    other = load(make_hf_checkpoint(str(llama[0]) + "-other", "llama", seed=9, num_hidden_layers=1))
    eng = engine(llama[1], speculative={"method": "draft", "model": other, "num_tokens": 2}, async_decode=True)
    outs = generate(eng)
    assert tokens(outs) == tokens(plain)
    st = eng.spec_stats
    assert st.num_accepted <= st.num_proposed / 10 and 0 < st.num_verify_steps < sum(NEW) / 3
    assert eng.decode_stats["continued"] > 0 and eng.decode_stats["verify"] > 0


# ---------------------------------------------------------------------------------------------------------
# Bad draft models


def test_bad_drafts_refused_at_start_up(llama, tmp_path):
    path, loaded = llama

    def make(family="llama", **kw):
        return make_hf_checkpoint(str(tmp_path), family, seed=3, name=f"{family}-{sorted(kw.items())}", **kw)

    def draft(model, **kw):
        return engine(loaded, speculative={"method": "draft", "model": model}, **kw)

    with pytest.raises(ValueError, match="draft model's vocabulary has 600 tokens, the target's 512"):
        draft(make(vocab_size=600))
    with pytest.raises(ValueError, match="draft model's tokenizer differs from the target's"):
        draft(make("qwen2"))  # 512 ids too, another vocabulary behind them
    with pytest.raises(ValueError, match="draft model's context is 64 tokens, less than the engine's max_model_len"):
        draft(make(max_position_embeddings=64))
    assert draft(make(max_position_embeddings=64), max_model_len=64).speculator is not None
    with pytest.warns(UserWarning, match="drafting will likely be slower"):
        draft(make(num_hidden_layers=3))
    with pytest.raises(FileNotFoundError):
        draft(str(tmp_path / "missing"))
    wrong_dtype = dataclasses.replace(loaded, weights={**loaded.weights, "norm": loaded.weights["norm"].double()})
    with pytest.raises(ValueError, match="the draft LoadedModel is on cpu in torch.float64"):
        draft(wrong_dtype)


def test_cli_generate_prints_the_acceptance_rate(llama, capsys):
    path = llama[0]
    base = ["generate", "1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4,", "--model", path, "--max-new-tokens", "16",
            "--ignore-eos", "--backend", "torch", "--device", "cpu"]
    assert main(base) == 0
    plain_run = capsys.readouterr()
    assert main(base + ["--speculative", "ngram", "--speculative-tokens", "3"]) == 0
    spec_run = capsys.readouterr()
    assert spec_run.out == plain_run.out
    assert "speculative ngram k=3: " in spec_run.err and "proposed tokens accepted" in spec_run.err


# ---------------------------------------------------------------------------------------------------------
# The Triton kernels (interpreter), GPUs, tensor parallelism


@pytest.mark.interpreter
def test_triton_batch_invariant_bitwise(tmp_path):
    """With batch_invariant=True every row of a verify pass runs the decode step's kernels (the row-invariant
    linear kernel, per-row decode attention, the fused LM head): tokens and log-probabilities equal plain
    decoding's bit for bit, two sequences in the batch, the draft model on the Triton kernels too. 2 layers, 2 heads
    of 64."""
    loaded = load(make_hf_checkpoint(str(tmp_path), "llama", seed=1, hidden_size=128, num_attention_heads=2,
                                     num_key_value_heads=1))
    prompts, new = [PROMPTS[0], PROMPTS[3]], [5, 5]

    def run(spec):
        eng = Engine(loaded, backend="triton", block_size=16, max_num_seqs=2, max_model_len=64, batch_invariant=True,
                     speculative=spec)
        outs = generate(eng, prompts, new)
        return [(o.token_ids, o.logprobs) for o in outs], eng

    ref, _ = run(None)
    got, eng = run({"method": "draft", "model": perturbed(loaded, 0.1), "num_tokens": 3})  # (n-gram's verify path too)
    assert got == ref and 0 < eng.spec_stats.num_accepted < eng.spec_stats.num_proposed


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_cuda_graphs_replay_verify_passes(tmp_path, method):
    """On a GPU: verify passes are decode steps of more rows, replayed from the graphs captured per row bucket;
    tokens equal plain decoding's (fp32 and batch_invariant: exact), with graphs on and off."""
    loaded = load_model_files(make_hf_checkpoint(str(tmp_path), "llama", seed=1, hidden_size=128,
                                                 num_attention_heads=2, num_key_value_heads=1),
                              device="cuda", dtype=torch.float32, progress=False)
    spec = NGRAM if method == "ngram" else {"method": "draft", "model": perturbed(loaded, 0.1), "num_tokens": 3}

    def run(spec, graphs):
        eng = Engine(loaded, backend="triton", block_size=16, max_num_seqs=4, max_model_len=1024,
                     batch_invariant=True, cuda_graphs=graphs, speculative=spec)
        return generate(eng), eng

    ref, _ = run(None, True)
    for graphs in (True, False):
        outs, eng = run(spec, graphs)
        assert [(o.token_ids, o.logprobs) for o in outs] == [(o.token_ids, o.logprobs) for o in ref]
        assert eng.decode_stats["verify"] > 0
        if graphs:
            assert max(eng.runner.batch_buckets) == 4 * (1 + spec["num_tokens"])
            assert eng.runner.num_graph_replays >= eng.decode_stats["launched"] and eng.runner.num_eager_decodes == 0


def test_ngram_with_tensor_parallelism(llama, plain):
    """Two CPU ranks (gloo): rank 0 sends verify passes as decode steps of more rows; the other rank runs them
    on its heads. The tokens are one device's."""
    with LLM(llama[0], backend="torch", device="cpu", block_size=4, tensor_parallel_size=2, tp_timeout=120,
             speculative=NGRAM) as llm:
        outs = generate(llm.engine)
        assert tokens(outs) == tokens(plain)
        assert llm.engine.decode_stats["verify"] > 0 and llm.engine.tp.failed is None


def test_serve_streams_what_plain_decoding_gives(llama):
    """`trinfer serve` over a speculating engine (the target as its own draft: runs of 5 tokens per step): a
    streamed completion's text is plain decoding's, one log-probability per token (plain decoding's), with fewer
    chunks than tokens (several tokens per delta)."""
    for module in ("starlette", "uvicorn", "httpx"):
        pytest.importorskip(module)
    import httpx

    from trinfer.server import ServerConfig, ServerThread, build_app

    loaded = llama[1]
    prompt = "The capital of France is Paris, the capital of Japan is Tokyo, and the capital of Italy is"
    want = LLM(loaded, backend="torch", block_size=4).generate(prompt, max_new_tokens=24)[0]
    assert len(want.token_ids) >= 8
    eng = engine(loaded, speculative={"method": "draft", "model": loaded, "num_tokens": 4})
    with ServerThread(build_app(eng, ServerConfig(model_name="m", shutdown_grace=0))) as s, \
            httpx.Client(base_url=s.url, timeout=120) as http:
        r = http.post("/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 24, "stream": True,
                                               "logprobs": 1})
        events = [json.loads(b[len("data: "):]) for b in r.text.split("\n\n") if b.startswith("data: {")]
    text = "".join(e["choices"][0]["text"] for e in events)
    assert text == want.text and eng.spec_stats.num_accepted > 0
    lps = [lp for e in events if e["choices"][0]["logprobs"] for lp in e["choices"][0]["logprobs"]["token_logprobs"]]
    assert_close(torch.tensor(lps), torch.tensor(want.logprobs), torch.float32, scale=10)
    assert len([e for e in events if e["choices"][0]["text"]]) < len(want.token_ids)

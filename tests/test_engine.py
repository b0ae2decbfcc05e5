"""The engine on small random-weight checkpoints (torch backend, CPU): continuous batching and preemption
leave every request's tokens unchanged, stops, streaming, timings, abort, bad inputs, two engines at once."""
import itertools

import pytest
import torch

from checkpoints import make_hf_checkpoint
from smol import default_model, one_torch_thread  # noqa: F401  (autouse fixture)
from trinfer.runtime import LLM, Engine, SamplingParams
from trinfer.runtime.loader import load_model_files

# Eight prompts of different lengths (token ids of the random model's vocabulary).
PROMPTS = [[1] + [(7 * i + 3 * j) % 500 + 2 for j in range(n)] for i, n in enumerate((3, 17, 1, 9, 30, 5, 12, 24))]
NEW = [12, 20, 16, 9, 14, 24, 11, 18]  # max_new_tokens of each


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(str(tmp_path_factory.mktemp("llama")), "llama", seed=1)


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_model_files(ckpt, device="cpu", dtype=torch.float32, progress=False)


def engine(loaded, **kw):
    kw.setdefault("backend", "torch")
    kw.setdefault("block_size", 4)
    return Engine(loaded, **kw)


@pytest.fixture(scope="module")
def alone(loaded):
    """Each prompt run on its own engine, alone: the reference."""
    ref = []
    for prompt, n in zip(PROMPTS, NEW):
        eng = engine(loaded)
        rid = eng.add_request(prompt, max_new_tokens=n, ignore_eos=True)
        outs = list(eng.run_until_done())
        assert outs[-1].request_id == rid and outs[-1].finished
        ref.append(outs[-1].token_ids)
    return ref


def run_staggered(eng, arrivals=(0, 0, 1, 2, 2, 4, 7, 9)):
    """Add prompt i at step arrivals[i] while the others decode; return the final token ids in prompt order."""
    ids, final, step = {}, {}, 0
    while len(final) < len(PROMPTS):
        for i, at in enumerate(arrivals):
            if at == step:
                ids[eng.add_request(PROMPTS[i], max_new_tokens=NEW[i], ignore_eos=True)] = i
        for out in eng.step():
            if out.finished:
                final[ids[out.request_id]] = out.token_ids
        step += 1
        assert step < 500
    return [final[i] for i in range(len(PROMPTS))]


def test_continuous_batching_gives_the_tokens_of_each_alone(loaded, alone):
    eng = engine(loaded, max_num_seqs=8)
    assert run_staggered(eng) == alone
    assert eng.num_preemptions == 0
    assert eng.scheduler.block_manager.num_free_blocks == eng.scheduler.block_manager.num_blocks


def test_preemption_gives_the_same_tokens(loaded, alone):
    # 16 blocks of 4 tokens: the longest request (30 + 14 tokens) fits alone, not all eight together.
    eng = engine(loaded, max_num_seqs=8, num_kv_blocks=16)
    assert run_staggered(eng) == alone
    assert eng.num_preemptions > 0
    assert eng.scheduler.block_manager.num_free_blocks == 16


@pytest.mark.parametrize("async_decode", [False, True])
def test_scripted_preemptions_exact(loaded, async_decode):
    """Six blocks of 4 tokens; A (8 prompt tokens), B (6) and C (7) arrive together, 6 new tokens each. Worked by
    hand from the scheduler's policy (when a block is short the newest running sequence is preempted; a sequence
    whose newest token already has a slot needs no block; a preempted one is readmitted first, when it fits):
        step 1  prefill A B C: 2 + 2 + 2 blocks, none free; A has 9 tokens, B 7, C 8
        step 2  A needs a block: C (the newest, not B) is preempted; A takes 1 of its 2; C (8 tokens) waits
        step 3  A, B decode (B: 8 tokens in 8 slots)
        step 4  B takes the last free block
        step 5  A: 12 tokens in 12 slots, none free: no block needed, nobody preempted
        step 6  A needs a block: B (the newest) is preempted; A ends (6 tokens); B (11 tokens) does not fit yet
        step 7  B and C readmitted (3 + 2 blocks); B ends
        8-11    C decodes and ends
    So 2 preemptions: B's after its 5th token, C's after its 1st. The synchronous loop's outputs follow that
    schedule step by step; the pipelined loop runs the same steps (its outputs come a step later)."""
    eng = engine(loaded, num_kv_blocks=6, async_decode=async_decode)
    prompts = {"A": [1] + list(range(20, 27)), "B": [1, 40, 41, 42, 43, 44], "C": [1, 60, 61, 62, 63, 64, 65]}
    for rid, prompt in prompts.items():
        eng.add_request(prompt, max_new_tokens=6, ignore_eos=True, request_id=rid)
    steps, final, seen = [], {}, {r: [] for r in prompts}
    while eng.has_unfinished():
        outs = eng.step()
        steps.append("".join(sorted(o.request_id for o in outs)))
        for o in outs:  # each request's preemptions so far, at each of its tokens
            seen[o.request_id].append(o.num_preemptions)
            if o.finished:
                final[o.request_id] = o
        assert len(steps) < 40
    assert eng.num_preemptions == 2
    assert seen == {"A": [0] * 6, "B": [0] * 5 + [1], "C": [0] + [1] * 5}
    assert all(len(o.token_ids) == 6 and o.finish_reason == "length" for o in final.values())
    if not async_decode:
        assert steps == ["ABC", "AB", "AB", "AB", "AB", "A", "BC", "C", "C", "C", "C"]
    bm = eng.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_max_num_seqs_one_gives_the_same_tokens(loaded, alone):
    eng = engine(loaded, max_num_seqs=1, block_size=8)
    assert run_staggered(eng) == alone


def test_two_engines_do_not_interfere(loaded, alone):
    a, b = engine(loaded), engine(loaded, block_size=8)
    ra = a.add_request(PROMPTS[1], max_new_tokens=NEW[1], ignore_eos=True)
    rb = b.add_request(PROMPTS[4], max_new_tokens=NEW[4], ignore_eos=True)
    assert ra == rb == 0  # ids are per engine
    done = {}
    while a.has_unfinished() or b.has_unfinished():
        for name, eng in (("a", a), ("b", b)):
            for out in eng.step():
                if out.finished:
                    done[name] = out.token_ids
    assert done == {"a": alone[1], "b": alone[4]}


def test_outputs_logprobs_timings(loaded, alone):
    llm = LLM(loaded, backend="torch", block_size=4)
    outs = llm.generate(PROMPTS[:3], sampling_params=[SamplingParams(max_new_tokens=n, ignore_eos=True)
                                                      for n in NEW[:3]])
    for out, prompt, n, ref in zip(outs, PROMPTS, NEW, alone):
        assert out.prompt_token_ids == prompt
        assert out.token_ids == ref and len(out.token_ids) == n and out.finish_reason == "length"
        assert len(out.logprobs) == n and all(lp <= 0 for lp in out.logprobs)
        t = out.timings
        assert t.ttft > 0 and len(t.token_latencies) == n and t.token_latencies[0] == t.ttft
        assert all(x >= 0 for x in t.token_latencies) and t.e2e >= t.ttft


def test_eos_stops_and_is_kept(loaded, alone):
    eos = alone[5][6]  # make the 7th generated token of prompt 5 an end-of-sequence id
    eng = engine(loaded)
    eng.eos_token_ids = frozenset({eos})
    eng.add_request(PROMPTS[5], max_new_tokens=NEW[5])
    out = list(eng.run_until_done())[-1]
    first = alone[5].index(eos)
    assert out.finish_reason == "eos" and out.token_ids == alone[5][: first + 1]
    eng.add_request(PROMPTS[5], max_new_tokens=NEW[5], ignore_eos=True)
    assert list(eng.run_until_done())[-1].token_ids == alone[5]


def test_context_length_stop(loaded, alone):
    eng = engine(loaded, max_model_len=20)
    eng.add_request(PROMPTS[1], max_new_tokens=NEW[1], ignore_eos=True)  # 18 prompt tokens
    out = list(eng.run_until_done())[-1]
    assert out.finish_reason == "context" and out.token_ids == alone[1][:2]


def test_abort(loaded):
    eng = engine(loaded, num_kv_blocks=40)
    keep = eng.add_request(PROMPTS[4], max_new_tokens=10, ignore_eos=True)
    gone = eng.add_request(PROMPTS[7], max_new_tokens=10, ignore_eos=True)
    eng.step()
    eng.step()
    out = eng.abort(gone)
    assert out.finished and out.finish_reason == "abort" and len(out.token_ids) == 2
    with pytest.raises(KeyError, match="unknown request id"):
        eng.abort(gone)
    with pytest.raises(KeyError, match="unknown request id 'nope'"):
        eng.abort("nope")
    waiting = eng.add_request(PROMPTS[0], max_new_tokens=3)
    eng.abort(waiting)  # still waiting: never ran
    outs = list(eng.run_until_done())
    assert outs[-1].request_id == keep and len(outs[-1].token_ids) == 10
    bm = eng.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks


BAD = [
    (dict(prompt=[]), ValueError, "at least one token"),
    (dict(prompt=[1, 2, 10**6]), ValueError, r"token id 1000000 at position 2 is outside the vocabulary"),
    (dict(prompt=[1, -3]), ValueError, "outside the vocabulary"),
    (dict(prompt=[1, "a"]), TypeError, "expected an int"),
    (dict(prompt=[1] * 300), ValueError, "do not fit the context of 256 tokens"),
    (dict(prompt=[1, 2], max_new_tokens=0), ValueError, "max_new_tokens: expected an int >= 1, got 0"),
    (dict(prompt=[1, 2], max_new_tokens=-5), ValueError, "max_new_tokens"),
    (dict(prompt=[1, 2], max_new_tokens=2.5), TypeError, "max_new_tokens"),
    (dict(prompt=[1, 2], max_new_tokens=200), ValueError, "whole cache has 16 blocks"),
    (dict(prompt=[1, 2], stop=[""]), ValueError, "stop"),
    (dict(prompt=3.0), TypeError, "prompt"),
]


def test_bad_requests_are_refused_and_the_engine_keeps_serving(loaded, alone):
    eng = engine(loaded, num_kv_blocks=16, max_model_len=256)
    running = eng.add_request(PROMPTS[7], max_new_tokens=NEW[7], ignore_eos=True)
    outs = eng.step()
    for kwargs, exc, match in BAD:  # one bad request per step while the good one decodes
        kwargs = dict(kwargs)
        with pytest.raises(exc, match=match):
            eng.add_request(kwargs.pop("prompt"), **kwargs)
        outs += eng.step()
    outs += list(eng.run_until_done())
    assert outs[-1].request_id == running and outs[-1].token_ids == alone[7]
    assert len(outs) == NEW[7] > len(BAD)
    assert eng.add_request([1], request_id="x", max_new_tokens=2) == "x"
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request([1], request_id="x", max_new_tokens=2)


def test_engine_argument_errors(loaded):
    with pytest.raises(ValueError, match="backend"):
        engine(loaded, backend="cuda")
    with pytest.raises(ValueError, match="device"):
        engine(loaded, device="tpu")
    with pytest.raises(ValueError, match="dtype"):
        engine(loaded, dtype="int8")
    with pytest.raises(ValueError, match="max_model_len"):
        engine(loaded, max_model_len=10**9)
    with pytest.raises(ValueError, match="num_kv_blocks"):
        engine(loaded, num_kv_blocks=0)
    with pytest.raises(ValueError, match="block_size"):
        engine(loaded, block_size=0)
    with pytest.raises(FileNotFoundError):
        Engine("/nonexistent/model", backend="torch")


# ---------------------------------------------------------------------------------------------------------
# Stop strings across token boundaries: the random model with its real (byte-level BPE) tokenizer.

STOP_PROMPTS = ["The capital of France is", "def generate(model", "What is the weather like today?"]


def _stream(eng) -> dict:
    """Run to the end; {request id: (deltas, final output)}. Checks on the way that the concatenated deltas of a
    request never hold text past its final text, and equal it in the end."""
    deltas, final = {}, {}
    for out in eng.run_until_done():
        deltas.setdefault(out.request_id, []).append(out.delta_text)
        if out.finished:
            final[out.request_id] = out
    for rid, out in final.items():
        for streamed in itertools.accumulate(deltas[rid]):
            assert out.text.startswith(streamed), (rid, streamed, out.text)
        assert "".join(deltas[rid]) == out.text
    assert deltas.keys() == final.keys()
    return {rid: (deltas[rid], final[rid]) for rid in final}


def _stops_across_boundaries(pieces: list[str]) -> dict[str, str]:
    """Stop strings cut from the text a stop-free request streamed (`pieces`: its deltas; a boundary is where
    one ends), each first occurring across a boundary, printable:
        tail+head       the last characters of one piece and the first of the next
        prefix earlier  all but its last character already occurred, ending at a boundary (so a prefix of it
                        was held back there and had to be released), before the stop itself
        long            one whole piece of 2+ characters with a character of each neighbour (3 pieces)"""
    text = "".join(pieces)
    bounds = sorted({e for e in itertools.accumulate(map(len, pieces)) if 0 < e < len(text)})

    def first_at(s, p):
        return text.find(s) == p and s.isprintable()

    def crosses(p, n):
        return any(p < b < p + n for b in bounds)

    found = {}
    for b in bounds[len(bounds) // 3:]:  # not at the very start
        for a, c in ((2, 2), (1, 2), (2, 1), (3, 3), (1, 1)):
            s = text[b - a: b + c]
            if "tail+head" not in found and first_at(s, b - a) and sum(b - a < x < b + c for x in bounds) == 1:
                found["tail+head"] = s
    for p, n in itertools.product(range(len(text)), range(3, 12)):
        s = text[p: p + n]
        q = text.find(s[:-1])
        if ("prefix earlier" not in found and len(s) == n and first_at(s, p) and crosses(p, n) and 0 <= q < p
                and q + n - 1 in bounds):
            found["prefix earlier"] = s
    for b0, b1 in zip(bounds, bounds[1:]):
        s = text[b0 - 1: b1 + 1]
        if "long" not in found and b1 - b0 >= 2 and first_at(s, b0 - 1):
            found["long"] = s
    return found


@pytest.mark.parametrize("async_decode", [False, True])
def test_stop_strings_across_token_boundaries(loaded, async_decode):
    """Stops that span token boundaries end the text right before their first occurrence, after exactly the
    tokens that complete them, and no streamed delta ever holds text past the final text. Expected values come
    from the same prompts run without stops (whose text is the tokenizer's decode of their tokens) and str.find."""
    eng = engine(loaded, async_decode=async_decode)
    for prompt in STOP_PROMPTS:
        eng.add_request(prompt, max_new_tokens=32, ignore_eos=True, request_id=prompt)
    free = _stream(eng)
    cases = []
    for prompt in STOP_PROMPTS:
        pieces, out = free[prompt]
        assert out.text == loaded.tokenizer.decode(out.token_ids) and len(out.token_ids) == 32
        cases += [(prompt, kind, stop) for kind, stop in _stops_across_boundaries(pieces).items()]
    assert {kind for _, kind, _ in cases} == {"tail+head", "prefix earlier", "long"}, cases
    for i, (prompt, _, stop) in enumerate(cases):
        eng.add_request(prompt, max_new_tokens=32, stop=[stop], ignore_eos=True, request_id=i)
    got = _stream(eng)
    for i, (prompt, kind, stop) in enumerate(cases):
        pieces, ref = free[prompt]
        cut = ref.text.find(stop)
        ends = list(itertools.accumulate(map(len, pieces)))
        n_tokens = next(k for k, e in enumerate(ends) if e >= cut + len(stop)) + 1  # the token completing the stop
        out = got[i][1]
        assert (out.finish_reason, out.text) == ("stop", ref.text[:cut]), (kind, stop)
        assert out.token_ids == ref.token_ids[:n_tokens], (kind, stop)
    bm = eng.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks


# ---------------------------------------------------------------------------------------------------------
# Text: the default model (a real tokenizer), a few tokens each.


@pytest.fixture(scope="module")
def smol():
    return default_model()[1]


def test_streaming_deltas_and_stop_strings(smol):
    eng = Engine(smol, backend="torch", num_kv_blocks=8)
    prompt = "The three primary colors are"
    eng.add_request(prompt, max_new_tokens=16, ignore_eos=True)
    outs = list(eng.run_until_done())
    full = outs[-1]
    assert "".join(o.delta_text for o in outs) == full.text
    assert [t for o in outs for t in o.delta_token_ids] == full.token_ids
    assert full.text == smol.tokenizer.decode(full.token_ids)
    # stop at a string that appears mid-text (and may end inside a token): the text stops right before it
    words = full.text.split()
    stop = words[len(words) // 2][:3]
    cut = full.text.index(stop)
    eng.add_request(prompt, max_new_tokens=16, stop=["@@never@@", stop], ignore_eos=True)
    outs = list(eng.run_until_done())
    out = outs[-1]
    assert out.finish_reason == "stop" and out.text == full.text[:cut]
    assert "".join(o.delta_text for o in outs) == out.text  # no delta leaked any part of the stop string
    assert out.token_ids == full.token_ids[: len(out.token_ids)] and len(out.token_ids) < 16


def test_chat_answers_and_ends_with_eos(smol):
    llm = LLM(smol, backend="torch", num_kv_blocks=8)
    out = llm.generate("What is the capital of France?", max_new_tokens=24, chat=True)[0]
    assert "Paris" in out.text and out.finish_reason == "eos"
    assert out.token_ids[-1] in smol.config.eos_token_ids and "<|im_end|>" not in out.text
    with pytest.raises(ValueError, match="non-empty"):
        llm.generate("", chat=True)
    with pytest.raises(ValueError, match="non-empty"):
        llm.generate(["fine", ""], max_new_tokens=4)  # all validated before anything runs
    assert not llm.engine.has_unfinished()


def test_padded_decode_batch_gives_the_same_tokens(loaded, alone):
    """Decode batches padded to a larger size (as for a captured CUDA graph: slot -1, length 0) change nothing."""
    eng = engine(loaded, max_num_seqs=8)
    eng.runner.pad_decode, eng.runner.batch_buckets = True, (4, 8)  # what CUDA does with its graph buckets
    assert [eng.runner.decode_size(n) for n in (1, 3, 4, 5)] == [4, 4, 4, 8]
    for i in (0, 3, 5):
        eng.add_request(PROMPTS[i], max_new_tokens=NEW[i], ignore_eos=True, request_id=i)
    final = {o.request_id: o.token_ids for o in eng.run_until_done() if o.finished}
    assert final == {i: alone[i] for i in (0, 3, 5)}


@pytest.mark.interpreter
def test_triton_backend_batching_padding_preemption(tmp_path):
    """The Triton kernels (interpreted on a CPU): staggered arrivals, padded decode batches, and a cache small
    enough to preempt give the torch backend's tokens. Tiny model: 2 layers, 2 query heads / 1 KV head of 64."""
    path = make_hf_checkpoint(str(tmp_path), "llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    tiny = load_model_files(path, device="cpu", dtype=torch.float32, progress=False)
    prompts = [[1, 5, 9], [1, 7, 7, 7, 2, 30], [1, 100], [1, 44, 45, 46, 47]]

    def run(backend, num_kv_blocks, pad=False):
        eng = Engine(tiny, backend=backend, block_size=4, num_kv_blocks=num_kv_blocks)
        if pad:
            eng.runner.pad_decode, eng.runner.batch_buckets = True, (3, 6, 32)
        final, step = {}, 0
        while len(final) < len(prompts):
            if step < len(prompts):
                eng.add_request(prompts[step], max_new_tokens=6, ignore_eos=True, request_id=step)
            final.update((o.request_id, o.token_ids) for o in eng.step() if o.finished)
            step += 1
        return final, eng.num_preemptions

    expected, _ = run("torch", 64)
    assert run("triton", 64, pad=True) == (expected, 0)
    tokens, preemptions = run("triton", 6)
    assert tokens == expected and preemptions > 0

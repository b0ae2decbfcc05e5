"""Aborts and interrupted `LLM.generate` calls on the synchronous and the pipelined (async_decode) loop.

The torch backend on the CPU runs the same pipeline as CUDA (a decode step is launched, then read back after the
next one is launched), so everything here is exactly what the GPU engine does with its bookkeeping. Every run
checks the streaming contract request by request: one final output and nothing after it, the deltas (token ids
and text) adding up to the final token ids and text, the tokens a prefix of what the request gets alone (all of
them when it was not aborted), the same final outputs on both loops, and an engine left empty (no request, no
queued output, every KV block free). Aborts land before a request ever ran, while its decode step is in flight,
after that step was read back, while its outputs wait in the ready queue, and while it is preempted.
"""
import pytest
import torch

from checkpoints import make_hf_checkpoint
from smol import one_torch_thread  # noqa: F401  (autouse fixture)
from trinfer.runtime import LLM, Engine, SamplingParams
from trinfer.runtime.loader import load_model_files

PROMPTS = [[1] + [(11 * i + 5 * j) % 480 + 6 for j in range(n)] for i, n in enumerate((4, 13, 1, 22, 7, 9))]
NEW = [14, 9, 16, 12, 18, 10]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = make_hf_checkpoint(str(tmp_path_factory.mktemp("llama")), "llama", seed=4)
    return load_model_files(path, device="cpu", dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def alone(loaded):
    """(token ids, text) of each prompt run on its own engine, to the end: the reference."""
    ref = []
    for prompt, n in zip(PROMPTS, NEW):
        eng = Engine(loaded, backend="torch", block_size=4, async_decode=False)
        eng.add_request(prompt, max_new_tokens=n, ignore_eos=True)
        out = list(eng.run_until_done())[-1]
        ref.append((out.token_ids, out.text))
    return ref


def _engine(loaded, async_decode, **kw):
    return Engine(loaded, backend="torch", block_size=4, async_decode=async_decode, **kw)


def check_streams(streams, alone, aborted=()):
    """The streaming contract for {prompt index: [its outputs in the order the caller got them]}; returns
    {prompt index: (token_ids, text, finish_reason)} of the final outputs."""
    final = {}
    for i, outs in streams.items():
        done = [k for k, o in enumerate(outs) if o.finished]
        assert done == [len(outs) - 1], f"prompt {i}: finished outputs at {done} of {len(outs)} (one, last)"
        last = outs[-1]
        assert [t for o in outs for t in o.delta_token_ids] == last.token_ids, f"prompt {i}: token deltas"
        assert "".join(o.delta_text for o in outs) == last.text, f"prompt {i}: text deltas"
        ref_ids, ref_text = alone[i]
        assert last.token_ids == ref_ids[: len(last.token_ids)], f"prompt {i}: tokens differ from its run alone"
        assert ref_text.startswith(last.text)
        if i not in aborted:
            assert (last.token_ids, last.finish_reason) == (ref_ids, "length"), f"prompt {i}"
        final[i] = (last.token_ids, last.text, last.finish_reason)
    return final


def check_empty(eng):
    assert not eng.has_unfinished() and not eng._requests and not eng._ready and eng._pending is None
    bm = eng.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def serve(eng, arrivals, aborts, max_steps=300):
    """Add prompt i before step arrivals[i]; before step s abort, one after the other, the prompts aborts[s] lists
    whose final output the caller has not seen. Returns {prompt index: [outputs in the order received]}."""
    streams, index, step = {i: [] for i in arrivals}, {}, 0
    last_arrival = max(arrivals.values())
    while step <= last_arrival or eng.has_unfinished():
        for i, at in arrivals.items():
            if at == step:
                index[eng.add_request(PROMPTS[i], max_new_tokens=NEW[i], ignore_eos=True)] = i
        for i in aborts.get(step, ()):
            if i in index.values() and not any(o.finished for o in streams[i]):
                rid = next(r for r, j in index.items() if j == i)
                out = eng.abort(rid)
                assert out.finished and out.request_id == rid
                streams[i].append(out)
        for out in eng.step():
            streams[index[out.request_id]].append(out)
        step += 1
        assert step < max_steps
    return streams


ALL_AT_ONCE = {i: 0 for i in range(len(PROMPTS))}
STAGGERED = {0: 0, 1: 0, 2: 1, 3: 3, 4: 3, 5: 6}

SCENARIOS = {
    # the repro: two requests, three steps, both aborted (the second's output was queued by the first abort)
    "two_then_abort_both": ({0: 0, 1: 0}, {3: [0, 1]}),
    # several at once mid-flight, then the last one later, alone
    "several_mid_flight": (ALL_AT_ONCE, {4: [3, 0, 5], 7: [2]}),
    # one request aborted in the step after its own arrival (just prefilled, not in the step in flight), one
    # before it ever ran, one that is in the step in flight
    "before_during_after": (STAGGERED, {3: [4], 4: [2], 6: [5, 1]}),
    # every request, in reverse order, while all of them decode
    "all_in_reverse": (ALL_AT_ONCE, {5: [5, 4, 3, 2, 1, 0]}),
    # with 10 blocks: prompt 2 is preempted at step 7 and aborted while it waits; prompt 0 aborted in a step
    # beside prompt 2's readmission; prompts 4 and 3 later, 4 while preempted (roomy: all of them decode)
    "preempted": (ALL_AT_ONCE, {8: [2], 10: [0], 24: [4, 3]}),
}


@pytest.mark.parametrize("num_kv_blocks", [None, 10], ids=["roomy", "preempting"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_aborts_keep_every_stream_whole(loaded, alone, scenario, num_kv_blocks):
    """Staggered arrivals and aborts of one or several requests, with room for all or (10 blocks of 4 tokens)
    preemption: on both loops every stream is whole and ends at its final output, and the final outputs agree."""
    arrivals, aborts = SCENARIOS[scenario]
    aborted = {i for group in aborts.values() for i in group}
    finals, engines = [], []
    for async_decode in (False, True):
        eng = _engine(loaded, async_decode, num_kv_blocks=num_kv_blocks)
        finals.append(check_streams(serve(eng, arrivals, aborts), alone, aborted))
        check_empty(eng)
        engines.append(eng)
    sync, pipelined = finals
    assert pipelined == sync
    assert any(f[2] == "abort" for f in sync.values())
    if num_kv_blocks is None:
        assert engines[1].decode_stats["continued"] > 0  # the pipeline did run steps fed from the device
    elif scenario == "preempted":
        assert engines[0].num_preemptions > 0 and engines[1].num_preemptions > 0


@pytest.mark.parametrize("async_decode", [False, True], ids=["sync", "async"])
def test_abort_both_in_flight_then_step(loaded, alone, async_decode):
    """The issue's repro, spelled out: two requests, three steps, abort both, one more step: nothing more comes,
    each abort output carries all it had not delivered, and the engine is empty."""
    eng = _engine(loaded, async_decode)
    a = eng.add_request(PROMPTS[0], max_new_tokens=NEW[0], ignore_eos=True)
    b = eng.add_request(PROMPTS[1], max_new_tokens=NEW[1], ignore_eos=True)
    got = {a: [], b: []}
    for _ in range(3):
        for out in eng.step():
            got[out.request_id].append(out)
    for rid in (a, b):
        got[rid].append(eng.abort(rid))
    assert eng.step() == [] and not eng.has_unfinished()
    for rid, i in ((a, 0), (b, 1)):
        last = got[rid][-1]
        assert last.finish_reason == "abort" and len(last.token_ids) == 3  # one token per step, as synchronously
        assert [t for o in got[rid] for t in o.delta_token_ids] == last.token_ids == alone[i][0][:3]
        assert "".join(o.delta_text for o in got[rid]) == last.text
    check_empty(eng)
    with pytest.raises(KeyError, match="unknown request id"):
        eng.abort(a)


def test_abort_returns_a_queued_final_output(loaded, alone):
    """A request that reached its length in a step read back by another request's abort: aborting it returns that
    final output (finish reason "length", all its tokens) and nothing of it follows."""
    eng = _engine(loaded, True)
    a = eng.add_request(PROMPTS[0], max_new_tokens=NEW[0], ignore_eos=True)
    b = eng.add_request(PROMPTS[2], max_new_tokens=3, ignore_eos=True)
    outs = eng.step() + eng.step() + eng.step()  # the prefill's tokens, then decode step 1's; step 2 in flight
    assert eng._pending is not None and [len(o.token_ids) for o in outs if o.request_id == b] == [1, 2]
    eng.abort(a)  # reads step 2 back (b's third and last token): b's final output is queued for the next step()
    last = eng.abort(b)
    assert last.finish_reason == "length" and last.token_ids == alone[2][0][:3]
    assert [t for o in outs if o.request_id == b for t in o.delta_token_ids] + last.delta_token_ids == last.token_ids
    assert eng.step() == []
    check_empty(eng)


# ---------------------------------------------------------------------------------------------------------
# LLM.generate interrupted by its on_output callback


class Stop(Exception):
    pass


def _raise_at(n):
    seen = []

    def on_output(out):
        seen.append(out)
        if len(seen) == n:
            raise Stop(f"output {n}")
    return on_output


@pytest.mark.parametrize("num_kv_blocks", [None, 10], ids=["roomy", "preempting"])
@pytest.mark.parametrize("async_decode", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("raise_at", [1, 4, 9, 30])
def test_generate_interrupted_leaves_nothing_behind(loaded, alone, async_decode, num_kv_blocks, raise_at):
    """on_output raises at the n-th output (the prefill's first tokens, mid-decode with a step in flight, late):
    the exception propagates, the engine is left empty, and the next generate() gets every prompt's tokens."""
    llm = LLM(loaded, backend="torch", block_size=4, async_decode=async_decode, num_kv_blocks=num_kv_blocks)
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in NEW]
    with pytest.raises(Stop):
        llm.generate(PROMPTS, sampling_params=params, on_output=_raise_at(raise_at))
    check_empty(llm.engine)
    outs = llm.generate(PROMPTS, sampling_params=params)
    assert [(o.token_ids, o.text) for o in outs] == alone
    check_empty(llm.engine)


@pytest.mark.parametrize("async_decode", [False, True], ids=["sync", "async"])
def test_generate_interrupted_as_a_request_finishes_in_flight(loaded, alone, async_decode):
    """on_output raises at the 4th output (each prompt's second token); on the async loop the step then in flight
    holds the short request's last token, so aborting the long one reads back the short one's final output: it
    must not stay queued for the next call (which would get a stranger's output and fail)."""
    llm = LLM(loaded, backend="torch", block_size=4, async_decode=async_decode)
    params = [SamplingParams(max_new_tokens=NEW[0], ignore_eos=True), SamplingParams(max_new_tokens=3, ignore_eos=True)]
    with pytest.raises(Stop):
        llm.generate([PROMPTS[0], PROMPTS[2]], sampling_params=params, on_output=_raise_at(4))
    check_empty(llm.engine)
    outs = llm.generate([PROMPTS[2], PROMPTS[0]], sampling_params=params[::-1])
    assert [o.token_ids for o in outs] == [alone[2][0][:3], alone[0][0]]


@pytest.mark.parametrize("async_decode", [False, True], ids=["sync", "async"])
def test_generate_completes_only_with_its_own_requests(loaded, alone, async_decode):
    """Requests added to llm.engine directly (one before the call, finishing first; one preempted by the call's
    requests in a small cache) do not complete generate(); their outputs come back from the engine's next steps,
    whole; an interrupted call leaves theirs alone too."""
    llm = LLM(loaded, backend="torch", block_size=4, async_decode=async_decode, num_kv_blocks=14)
    eng = llm.engine
    theirs = {eng.add_request(PROMPTS[2], max_new_tokens=2, ignore_eos=True): 2,
              eng.add_request(PROMPTS[3], max_new_tokens=NEW[3], ignore_eos=True): 3}
    streams = {2: [], 3: []}
    for out in eng.step():
        streams[theirs[out.request_id]].append(out)
    mine = [0, 4, 5]
    seen = []
    outs = llm.generate([PROMPTS[i] for i in mine], on_output=seen.append,
                        sampling_params=[SamplingParams(max_new_tokens=NEW[i], ignore_eos=True) for i in mine])
    assert [(o.token_ids, o.text) for o in outs] == [alone[i] for i in mine]
    assert all(o.request_id not in theirs for o in seen)
    with pytest.raises(Stop):
        llm.generate([PROMPTS[1]], max_new_tokens=NEW[1], ignore_eos=True, on_output=_raise_at(2))
    for out in eng.run_until_done():
        streams[theirs[out.request_id]].append(out)
    final = check_streams(streams, {2: (alone[2][0][:2], alone[2][1]), 3: alone[3]})
    assert final[2][0] == alone[2][0][:2] and final[3][0] == alone[3][0]
    assert eng.num_preemptions > 0
    check_empty(eng)


@pytest.mark.parametrize("async_decode", [False, True], ids=["sync", "async"])
def test_generate_interrupted_in_a_step_shared_with_another_request(loaded, alone, async_decode):
    """on_output raises at the call's first output, which shares its step with another request's decode output
    (on the sync loop it comes after ours in that step): the other request's output is not lost."""
    llm = LLM(loaded, backend="torch", block_size=4, async_decode=async_decode)
    eng = llm.engine
    theirs = eng.add_request(PROMPTS[3], max_new_tokens=NEW[3], ignore_eos=True)
    stream = eng.step()
    with pytest.raises(Stop):
        llm.generate([PROMPTS[1]], max_new_tokens=NEW[1], ignore_eos=True, on_output=_raise_at(1))
    stream += list(eng.run_until_done())
    assert all(o.request_id == theirs for o in stream)
    check_streams({3: stream}, alone)
    check_empty(eng)


# ---------------------------------------------------------------------------------------------------------
# Defect: a LoadedModel's device


def test_a_loaded_model_runs_where_its_weights_are(loaded, monkeypatch):
    """With CUDA visible (stood in here), Engine(<model on the CPU>) with no device runs on the CPU with the torch
    backend: it must not pick cuda and then refuse the weights' device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    eng = Engine(loaded, block_size=4)
    assert eng.device == torch.device("cpu") and eng.backend_name == "torch" and eng.dtype == torch.float32
    eng.add_request(PROMPTS[2], max_new_tokens=3, ignore_eos=True)
    assert list(eng.run_until_done())[-1].token_ids == LLM(loaded, device="cpu", block_size=4).generate(
        [PROMPTS[2]], max_new_tokens=3, ignore_eos=True)[0].token_ids
    with pytest.raises(ValueError, match=r"LoadedModel on cpu in torch.float32 does not match"):
        Engine(loaded, dtype="bfloat16")

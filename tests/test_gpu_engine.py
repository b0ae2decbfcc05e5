"""The engine on a GPU against independent oracles (GPU only, @cuda; each seconds on an H200).

- Greedy tokens equal transformers' on the same GPU: fp32 random Llama-family checkpoints (tests/checkpoints.py,
  whose weights give clear logit margins) at head_dim 64 (9 query / 3 KV heads, as SmolLM2) and 128 (Llama-3.1
  rope scaling, 4 / 1 heads; and a Qwen3: q/k norm, head_dim 128 with hidden 512 / 8 heads), served with CUDA
  graphs and the async loop on, prompts arriving one per step, two ending at an end-of-sequence token mid-way, and
  prompts decoding across the graphs' context buckets (1024 and 4096 tokens). transformers runs each prompt alone;
  its tokens, cut after the first EOS, are the oracle.
- The async pipeline with a slowed device: a GPU sleep before every graph replay keeps the device behind, so the
  host runs ahead (it queues step k+1, fills the buffers of step k+2) while earlier steps have not run; every
  output equals the synchronous loop's.
"""
import pytest
import torch

from checkpoints import assert_varied, load_hf_model, make_hf_checkpoint
from trinfer.runtime import Engine
from trinfer.runtime.loader import load_model_files

PROMPT_LENS = (1, 17, 300, 40, 1020, 4090)  # 1020 and 4090 decode across the 1024 and 4096 context buckets
ARRIVALS = (0, 0, 1, 2, 3, 5)                # the step at which each prompt is added
NEW = 12
CHECKPOINTS = {  # family, config overrides
    "d64-gqa3": ("llama", dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                               max_position_embeddings=8192)),
    "d128-gqa4": ("llama3", dict(hidden_size=512, intermediate_size=1024, num_attention_heads=4,
                                 num_key_value_heads=1, max_position_embeddings=8192, tie_word_embeddings=True)),
    # Qwen3: the q/k norm fused into the rotary + KV write, head_dim 128 where hidden / heads is 64.
    "qwen3-d128-gqa2": ("qwen3", dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                                      num_key_value_heads=4, head_dim=128, max_position_embeddings=8192)),
}


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt], device="cuda")
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=0,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _cut_at_eos(tokens: list[int], eos: set[int]) -> tuple[list[int], str]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1], "eos"
    return tokens, "length"


def _serve(eng, prompts, arrivals=ARRIVALS, new=NEW):
    """Add prompt i at step arrivals[i]; {i: (token_ids, logprobs, finish_reason)}."""
    final, step = {}, 0
    while len(final) < len(prompts):
        for i, at in enumerate(arrivals):
            if at == step:
                eng.add_request(prompts[i], max_new_tokens=new, request_id=i)
        final.update((o.request_id, (o.token_ids, o.logprobs, o.finish_reason)) for o in eng.step() if o.finished)
        step += 1
        assert step < 500
    assert not eng.has_unfinished()
    return final


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_engine_matches_transformers_on_the_gpu(name, tmp_path):
    family, overrides = CHECKPOINTS[name]
    path = make_hf_checkpoint(str(tmp_path), family, **overrides)
    loaded = load_model_files(path, device="cuda", dtype=torch.float32, progress=False)
    hf = load_hf_model(path).to("cuda")
    hf.generation_config.eos_token_id = None  # never stops early: the EOS cut is applied below
    prompts = _prompts(loaded.config.vocab_size)
    ref = [_hf_greedy(hf, p, NEW) for p in prompts]
    assert_varied(prompts, ref)  # (with a tied embedding of std 1, d128-gqa4 only repeated each last token)
    eos = {ref[1][5], ref[3][2]}  # two prompts end mid-way at an end-of-sequence token
    eng = Engine(loaded, backend="triton", block_size=16, max_num_seqs=8, max_model_len=4200, cuda_graphs=True,
                 async_decode=True)
    eng.eos_token_ids = frozenset(eos)
    got = _serve(eng, prompts)
    for i, (tokens, reason) in enumerate(_cut_at_eos(r, eos) for r in ref):
        assert got[i][0] == tokens, f"prompt {i} ({PROMPT_LENS[i]} tokens): {got[i][0]} != transformers' {tokens}"
        assert got[i][2] == reason
    assert sum(g[2] == "eos" for g in got.values()) >= 2
    r = eng.runner
    assert r.context_buckets == (256, 1024, 4096, 4200) and r.num_graph_replays > 0 and r.num_eager_decodes == 0
    assert eng.decode_stats["continued"] > 0  # steps were fed from the device


class _SlowReplay:
    """A captured graph whose replay first keeps the GPU busy for `cycles` clock cycles (~1 ms per 2M on an H200),
    and notes whether the host got ahead: the stream still busy when the next replay was queued."""

    def __init__(self, graph, cycles: int, seen: dict):
        self.graph, self.cycles, self.seen = graph, cycles, seen

    def replay(self):
        self.seen["replays"] += 1
        self.seen["ahead"] += not torch.cuda.current_stream().query()
        torch.cuda._sleep(self.cycles)
        self.graph.replay()


@pytest.mark.cuda
def test_async_pipeline_with_a_slowed_device_equals_the_sync_loop(tmp_path):
    """bf16, CUDA graphs on both sides; staggered arrivals and two EOS ends (the launched step dropped and rerun):
    the slowed pipelined loop's token ids, log-probabilities and finish reasons equal the synchronous loop's."""
    family, overrides = CHECKPOINTS["d64-gqa3"]
    path = make_hf_checkpoint(str(tmp_path), family, **overrides)
    loaded = load_model_files(path, device="cuda", dtype=torch.bfloat16, progress=False)
    prompts = _prompts(loaded.config.vocab_size)[:5]
    arrivals, new = (0, 0, 1, 2, 6), 16

    def serve(async_decode: bool, eos: frozenset, seen: dict | None = None):
        eng = Engine(loaded, backend="triton", block_size=16, max_num_seqs=8, max_model_len=1100, cuda_graphs=True,
                     async_decode=async_decode)
        eng.eos_token_ids = eos
        if seen is not None:
            eng.runner.graphs = {key: _SlowReplay(g, 4_000_000, seen) for key, g in eng.runner.graphs.items()}
        return _serve(eng, prompts, arrivals, new), eng

    free, _ = serve(False, frozenset())
    eos = frozenset({free[0][0][4], free[2][0][7]})  # two requests end mid-way
    sync, _ = serve(False, eos)
    seen = {"replays": 0, "ahead": 0}
    got, eng = serve(True, eos, seen)
    assert got == sync
    assert sum(v[2] == "eos" for v in got.values()) >= 2
    assert seen["replays"] > 0 and seen["ahead"] > 0, seen  # the host did run ahead of the device
    assert eng.decode_stats["continued"] > 0  # (an EOS read while its next step runs makes a drop and rerun)

"""Choosing the runtime's kernels: backend "torch", "triton", "cuda" or "cuda:FAMILY[+FAMILY...]" (runtime/model.py).

On the CPU: the choices parse to canonical names; bad choices, a CUDA C++ backend that cannot run here (its error
gives trinfer.cuda_kernels.unavailable_reason()) and a head_dim the chosen kernels cannot run are refused when the
Engine / LLM / CLI is set up, never mid-generation; and with csrc's ops registered with CPU stand-ins built from the
references (tests/cuda_stand_in.py), each kernel family goes to the expected implementation and the model decodes
the torch backend's tokens. On a GPU: the greedy tokens of the cuda backends equal the triton backend's.
"""
import pytest
import torch

import cuda_stand_in
import trinfer.triton_kernels as tk
from checkpoints import assert_varied, make_hf_checkpoint
from smol import one_torch_thread  # noqa: F401  (autouse fixture)
from trinfer import cuda_kernels as ck
from trinfer.cli import build_parser, main
from trinfer.runtime import LLM, Engine
from trinfer.runtime import engine as engine_module
from trinfer.runtime.loader import load_model_files
from trinfer.runtime.model import CUDA_FAMILIES, LlamaModel, get_backend, parse_backend

cpu_torch_only = pytest.mark.skipif(not cuda_stand_in.CPU_TORCH, reason="checks a CPU build of torch")


@pytest.mark.parametrize("spec, name, families", [
    ("torch", "torch", ()),
    ("triton", "triton", ()),
    ("cuda", "cuda", ("rms_norm", "decode_attention")),
    ("cuda:rms_norm", "cuda:rms_norm", ("rms_norm",)),
    ("cuda:decode_attention", "cuda:decode_attention", ("decode_attention",)),
    ("cuda:decode_attention+rms_norm", "cuda", ("rms_norm", "decode_attention")),  # all of them: "cuda"
    (" cuda:rms_norm+rms_norm ", "cuda:rms_norm", ("rms_norm",)),
])
def test_backend_choices_parse_to_canonical_names(spec, name, families):
    assert parse_backend(spec) == (name, families)
    assert CUDA_FAMILIES == ("rms_norm", "decode_attention")


@pytest.mark.parametrize("spec, words", [
    ("tpu", ["backend", "triton, torch, cuda", "cuda:FAMILY[+FAMILY...]", "rms_norm, decode_attention", "'tpu'"]),
    ("triton:rms_norm", ["backend", "'triton:rms_norm'"]),
    ("cuda:", ["backend", "unknown CUDA C++ kernel family ''"]),
    ("cuda:rotary", ["backend", "unknown CUDA C++ kernel family 'rotary'", "rms_norm, decode_attention"]),
    ("cuda:rms_norm+silu", ["'silu'"]),
    ("cuda:greedy_sample", ["'greedy_sample'", "lm_head_greedy", "on Triton"]),
    ("cuda:write_kv_cache", ["'write_kv_cache'", "rotary_write_kv_cache", "on Triton"]),
])
def test_bad_backend_choices_are_named(spec, words):
    with pytest.raises(ValueError) as info:
        parse_backend(spec)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    with pytest.raises(ValueError, match="backend"):
        Engine("/nonexistent/model", backend=spec)  # refused before anything is loaded


def test_backend_must_be_a_str():
    with pytest.raises(TypeError, match="backend: expected a str"):
        parse_backend(3)


def test_cli_accepts_the_choices(capsys):
    for spec in ("cuda", "cuda:decode_attention", "cuda:rms_norm+decode_attention"):
        assert build_parser().parse_args(["generate", "x", "--backend", spec]).backend == spec
    assert main(["generate", "hi", "--model", "/no/such/model", "--backend", "cuda:silu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trinfer: error: backend: unknown CUDA C++ kernel family 'silu'") and err.count("\n") == 1


# ----------------------------------------------------------------------------------------------------------
# Where the CUDA C++ kernels cannot run: a clear error at construction
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    """2 layers, hidden 128, 2 query heads / 1 KV head of dim 64 (a head_dim every backend runs), fp32 on the CPU."""
    path = make_hf_checkpoint(str(tmp_path_factory.mktemp("tiny64")), "llama", hidden_size=128,
                              num_attention_heads=2, num_key_value_heads=1)
    return load_model_files(path, device="cpu", dtype=torch.float32, progress=False)


@cpu_torch_only
@pytest.mark.parametrize("spec", ["cuda", "cuda:rms_norm", "cuda:decode_attention"])
def test_cuda_backend_unavailable_is_refused_with_the_reason(spec, tiny64, capsys):
    reason = ck.unavailable_reason()
    assert reason is not None and "CPU build" in reason
    for make in (lambda: Engine(tiny64, backend=spec), lambda: LLM(tiny64, backend=spec),
                 lambda: Engine("/nonexistent/model", backend=spec), lambda: get_backend(spec)):
        with pytest.raises(ValueError) as info:
            make()
        msg = str(info.value)
        for w in (f"backend: {spec!r} needs the CUDA C++ kernels, which cannot run here", reason,
                  "TRINFER_BUILD_CUDA=1", "load_jit()", "backend='triton'"):
            assert w in msg, (w, msg)
    assert main(["generate", "hi", "--model", "/no/such/model", "--backend", spec]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trinfer: error: backend: ") and reason in err and err.count("\n") == 1


def test_cuda_backend_needs_a_cuda_device(tiny64, monkeypatch):
    monkeypatch.setattr(ck, "unavailable_reason", lambda: None)  # as if the library were built and a GPU visible
    with pytest.raises(ValueError, match=r"backend: 'cuda:rms_norm' runs CUDA C\+\+ kernels, which need a CUDA "
                                         r"device, got device cpu"):
        Engine(tiny64, backend="cuda:rms_norm", device="cpu")


# ----------------------------------------------------------------------------------------------------------
# Routing: which implementation each family gets
# ----------------------------------------------------------------------------------------------------------

_TRITON = dict(rms_norm=tk.rms_norm, fused_add_rms_norm=tk.fused_add_rms_norm,
               rotary_write_kv_cache=tk.rotary_write_kv_cache, silu_and_mul=tk.silu_and_mul,
               paged_prefill_attention=tk.paged_prefill_attention, paged_decode_attention=tk.paged_decode_attention,
               lm_head_greedy=tk.lm_head_greedy, build_rope_cache=tk.build_rope_cache)
_CUDA = dict(rms_norm=ck.rms_norm, fused_add_rms_norm=ck.fused_add_rms_norm,
             paged_decode_attention=ck.paged_decode_attention)
_ON_CUDA = {  # backend -> the Backend fields that trinfer.cuda_kernels provides
    "triton": (),
    "cuda": ("rms_norm", "fused_add_rms_norm", "paged_decode_attention"),
    "cuda:rms_norm": ("rms_norm", "fused_add_rms_norm"),
    "cuda:decode_attention": ("paged_decode_attention",),
}


@pytest.mark.parametrize("spec", list(_ON_CUDA))
def test_each_family_goes_to_the_expected_kernels(spec, monkeypatch):
    monkeypatch.setattr(ck, "unavailable_reason", lambda: None)
    backend = get_backend(spec)
    assert backend.name == spec and backend.cuda_families == parse_backend(spec)[1]
    for field, triton_fn in _TRITON.items():
        expected = _CUDA[field] if field in _ON_CUDA[spec] else triton_fn
        assert getattr(backend, field) is expected, (spec, field)


@pytest.fixture
def cuda_on_cpu(monkeypatch):
    """The CUDA C++ wrappers call csrc's ops registered with CPU stand-ins, and the Engine accepts a cuda backend
    on the CPU (its availability and device checks are what the tests above cover). Returns the call record."""
    if not cuda_stand_in.CPU_TORCH:
        pytest.skip("stand-in ops only with a CPU build of torch (a CUDA torch may load the real library)")
    calls = cuda_stand_in.activate(monkeypatch)
    monkeypatch.setattr(ck, "unavailable_reason", lambda: None)
    monkeypatch.setattr(engine_module, "resolve_backend", lambda backend, device: parse_backend(backend)[0])
    return calls


PROMPTS = [[1, 5, 9], [1, 7, 7, 7, 2, 30], [1, 100]]


def _greedy(loaded, backend, **kw):
    """Each prompt's greedy tokens (all prompts batched together) and the engine."""
    llm = LLM(loaded, backend=backend, device="cpu", block_size=4, **kw)
    return [o.token_ids for o in llm.generate(PROMPTS, max_new_tokens=5, ignore_eos=True)], llm.engine


@pytest.fixture(scope="module")
def torch_tokens(tiny64):
    tokens = _greedy(tiny64, "torch")[0]
    assert_varied(PROMPTS, tokens)
    return tokens


@pytest.mark.parametrize("spec, ops", [
    ("cuda", {"rms_norm", "fused_add_rms_norm", "paged_decode_attention"}),
    ("cuda:decode_attention", {"paged_decode_attention"}),
])
def test_model_runs_the_cuda_families_and_decodes_the_same_tokens(spec, ops, cuda_on_cpu, tiny64, torch_tokens):
    """Through the Engine, a cuda backend calls exactly its families' CUDA ops (never write_kv_cache or
    greedy_sample: the model runs those fused on Triton) and, the ops being the references, gives the tokens of
    the torch backend (the Triton families run under the interpreter)."""
    tokens, engine = _greedy(tiny64, spec)
    assert engine.backend_name == spec and engine.runner.backend.cuda_families == parse_backend(spec)[1]
    assert {c[0] for c in cuda_on_cpu} == ops
    if "paged_decode_attention" in ops:  # once per layer (2) of each decode step (at least 4)
        n = sum(c[0] == "paged_decode_attention" for c in cuda_on_cpu)
        assert n >= 4 * 2 and n % 2 == 0
    assert tokens == torch_tokens


# ----------------------------------------------------------------------------------------------------------
# Head dims a backend cannot run: refused at construction
# ----------------------------------------------------------------------------------------------------------

def _loaded_with_head_dim(tmp_path, head_dim, device="cpu"):
    path = make_hf_checkpoint(str(tmp_path), "llama", hidden_size=2 * head_dim, num_attention_heads=2,
                              num_key_value_heads=1, num_hidden_layers=1)
    return load_model_files(path, device=device, dtype=torch.float32, progress=False)


def test_triton_refuses_a_head_dim_without_a_tile(tmp_path, device):
    loaded = _loaded_with_head_dim(tmp_path, 16, device)
    with pytest.raises(ValueError) as info:
        Engine(loaded, backend="triton", device=device, block_size=4)
    msg = str(info.value)
    for w in ("backend: 'triton' cannot run this model", "head_dim", "[33, 256]", "got 16", "'torch' backend"):
        assert w in msg, (w, msg)
    with pytest.raises(ValueError, match=r"\[33, 256\].*got 16"):
        LlamaModel(loaded.config, loaded.weights, get_backend("triton"))
    assert Engine(loaded, backend="torch", device=device, block_size=4).config.head_dim == 16  # any head_dim


def test_cuda_decode_refuses_a_head_dim_it_has_no_instance_for(tmp_path, cuda_on_cpu):
    loaded = _loaded_with_head_dim(tmp_path, 48)  # Triton runs it (padded to 64); the CUDA decode kernel does not
    for spec in ("cuda", "cuda:decode_attention"):
        with pytest.raises(ValueError) as info:
            Engine(loaded, backend=spec, device="cpu", block_size=4)
        msg = str(info.value)
        for w in (f"backend: {spec!r} cannot run this model", "(64, 80, 96, 128, 256)", "got 48"):
            assert w in msg, (w, msg)
    assert Engine(loaded, backend="cuda:rms_norm", device="cpu", block_size=4).config.head_dim == 48
    assert Engine(loaded, backend="triton", device="cpu", block_size=4).config.head_dim == 48


# ----------------------------------------------------------------------------------------------------------
# GPU: the real CUDA C++ kernels in the model
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:rms_norm", "cuda:decode_attention"])
def test_cuda_backends_decode_the_triton_tokens(spec, tmp_path, _cuda_backend):
    """Greedy tokens (and log-probabilities, closely) of a cuda backend equal the triton backend's on a tiny random
    model (fp32: the kernels agree to rounding, and the random weights give clear margins)."""
    module, reason = _cuda_backend  # loads the library (JIT build where it is not installed)
    if module is None:
        pytest.skip(f"CUDA C++ backend: {reason}")
    path = make_hf_checkpoint(str(tmp_path), "llama", hidden_size=128, num_attention_heads=2,
                              num_key_value_heads=1)
    loaded = load_model_files(path, device="cuda", dtype=torch.float32, progress=False)
    prompts = [[1] + [(7 * i + 3 * j) % 500 + 2 for j in range(n)] for i, n in enumerate((3, 17, 1, 40))]

    def run(backend):
        llm = LLM(loaded, backend=backend, block_size=4, max_num_seqs=4)
        outs = llm.generate(prompts, max_new_tokens=24, ignore_eos=True)
        return [o.token_ids for o in outs], [o.logprobs for o in outs], llm.engine

    want_ids, want_lp, _ = run("triton")
    got_ids, got_lp, engine = run(spec)
    assert engine.runner.backend.cuda_families == parse_backend(spec)[1]
    assert got_ids == want_ids
    torch.testing.assert_close(torch.tensor(got_lp), torch.tensor(want_lp), atol=1e-4, rtol=1e-4)

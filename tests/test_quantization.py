"""Quantized weights in the runtime: quantize at load, AWQ/GPTQ and GGUF checkpoints kept quantized, the model's
products on the linear kernel (trinfer/runtime/quantization.py, quantization_hf.py), batch invariance end to end."""
import dataclasses
import json
import os

import pytest
import torch

from checkpoints import assert_varied, make_gguf_checkpoint, make_hf_checkpoint, make_quantized_hf_checkpoint
from trinfer.cli import main
from trinfer.runtime import Engine
from trinfer.runtime import quantization as Q
from trinfer.runtime.loader import LoadedModel, load_model_files
from trinfer.runtime.model import get_backend
from trinfer.runtime.quantization_hf import parse_quantization_config
from trinfer.triton_kernels import QuantizedWeight
from trinfer.triton_kernels.references import dequantize_ref


def _greedy(engine: Engine, prompts: list[list[int]], n: int) -> list[list[int]]:
    rids = [engine.add_request(p, max_new_tokens=n, ignore_eos=True) for p in prompts]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    return [done[r] for r in rids]


# ---------------------------------------------------------------------- quantizing dense weights

@pytest.mark.parametrize("fmt, group", [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128)])
def test_quantize_weight_error_is_within_one_step(fmt, group):
    """Every decoded weight is within one quantization step of the original (half a step, plus the clamp at
    the group's ends for int4); K = 200 leaves a partial last group."""
    w = torch.randn(24, 200) * 0.05
    w[3] = 0.0  # an all-zero row
    w[5, :64] += 1.0  # a group with no negative value
    q = Q.quantize_weight(w, fmt, group_size=group or 128)
    err = (dequantize_ref(q) - w.double()).abs()
    if fmt == "int8":
        assert q.data.dtype == torch.int8 and int(q.data.abs().max()) <= 127
        step = q.scales.double()[:, None]
        assert torch.all(err <= step / 2 * (1 + 1e-6))
    else:
        assert q.group_size == group and int(q.zeros.max()) <= 15
        step = q.scales.double().repeat_interleave(group, dim=1)[:, :200]
        assert torch.all(err <= step * (1 + 1e-3))
    assert torch.all(err[3] == 0)


def _float64_quantizer(w: torch.Tensor, fmt: str, group: int):
    """The formulas of quantization.py's docstring, written again here in float64 (scales rounded to their stored
    dtype first): (scales, zeros or None, codes [N, K])."""
    w = w.double()
    if fmt == "int8":
        s = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny).float()
        return s, None, torch.round(w / s.double()[:, None]).clamp(-127, 127).long()
    n, k = w.shape
    scales, zeros, codes = [], [], []
    for start in range(0, k, group):
        g = w[:, start:start + group]  # the last group is partial when K is not a multiple of G
        lo, hi = g.amin(dim=1).clamp(max=0), g.amax(dim=1).clamp(min=0)
        s = ((hi - lo) / 15).clamp_min(1e-6).half()
        z = torch.round(-lo / s.double()).clamp(0, 15)
        scales.append(s)
        zeros.append(z.long())
        codes.append(torch.round(g / s.double()[:, None] + z[:, None]).clamp(0, 15).long())
    return torch.stack(scales, 1), torch.stack(zeros, 1), torch.cat(codes, 1)


@pytest.mark.parametrize("fmt, group", [("int8", 0), ("int4", 32), ("int4", 128)])
def test_quantize_weight_equals_a_float64_quantizer(fmt, group):
    """Scales, zero points and every code equal those of the documented formulas computed here in float64, the
    int4 codes read from the words by the documented layout (element k at bits 4*(k % 8) of word k // 8). A
    quantizer that wastes range (a scale over 7 instead of 15, 100 instead of 127) or floors a code or a zero
    point stays within the one-step error bound above; here it fails. K = 200: a partial last group and word."""
    w = torch.randn(6, 200) * 0.05
    w[1] = 0.0  # an all-zero row: the smallest scale
    w[2, :32] = w[2, :32].abs() + 0.01  # a group with no negative value: z = 0
    w[3, 40:64] = -w[3, 40:64].abs() - 0.01  # part of a group with no positive value
    q = Q.quantize_weight(w, fmt, group_size=group or 128)
    s, z, codes = _float64_quantizer(w, fmt, group)
    assert torch.equal(q.scales, s)
    if fmt == "int8":
        assert torch.equal(q.data.long(), codes)
        return
    assert torch.equal(q.zeros.long(), z)
    words = q.data.long() & 0xFFFFFFFF
    k = torch.arange(200)
    assert torch.equal((words[:, k // 8] >> (4 * (k % 8))) & 0xF, codes)


def test_awq_and_gptq_words_packed_by_hand():
    """One 8 x 32 layer (group 32) in each checkpoint layout, its words written out here, and the matrix it stands
    for worked by hand. GPTQ (v1, zero points stored minus 1): qweight [4, 8], word [r, n] holds W's codes for
    k = 8r..8r+7 at bits 0, 4, .., 28 (codes (n + k) % 16: word [0, 0] is 0x76543210); every stored zero 7, so
    z = 8; scales 0.5 * (n + 1). AWQ: qweight [32, 1], word k holds columns 0, 2, 4, 6, 1, 3, 5, 7 at bits 0, 4, ..
    (codes (k + n) % 16: word 0 is 0x75316420); zero points n, packed alike (0x75316420); scales 0.25 * (n + 1).
    Independent of tests/checkpoints.py's packer, which the other AWQ/GPTQ tests share with nothing but this."""
    from trinfer.runtime.quantization_hf import HFQuantizedTensors

    def word(fields):  # 8 nibbles, field i at bits 4i, as the int32 a checkpoint stores
        v = sum(f << (4 * i) for i, f in enumerate(fields))
        return v - 2**32 if v >= 2**31 else v

    n_, k_ = torch.arange(8)[:, None], torch.arange(32)[None, :]
    gptq_q = torch.tensor([[word([(n + 8 * r + j) % 16 for j in range(8)]) for n in range(8)] for r in range(4)],
                          dtype=torch.int32)
    assert gptq_q[0, 0] == 0x76543210 and gptq_q[1, 3] == word([11, 12, 13, 14, 15, 0, 1, 2])
    order = (0, 2, 4, 6, 1, 3, 5, 7)
    awq_q = torch.tensor([[word([(k + c) % 16 for c in order])] for k in range(32)], dtype=torch.int32)
    assert awq_q[0, 0] == 0x75316420 and awq_q[9, 0] == word([9, 11, 13, 15, 10, 12, 14, 0])
    cases = {
        "gptq": ({"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True},
                 gptq_q, torch.tensor([[word([7] * 8)]], dtype=torch.int32),
                 (0.5 * torch.arange(1, 9)).half()[None], ((n_ + k_) % 16 - 8) * 0.5 * (n_ + 1)),
        "awq": ({"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"},
                awq_q, torch.tensor([[0x75316420]], dtype=torch.int32),
                (0.25 * torch.arange(1, 9)).half()[None], ((n_ + k_) % 16 - n_) * 0.25 * (n_ + 1)),
    }
    for method, (qc, qweight, qzeros, scales, want) in cases.items():
        held = HFQuantizedTensors(parse_quantization_config(qc), qkv_bias=False)
        for part, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
            assert held.feed(f"model.layers.0.mlp.down_proj.{part}", t, "file") == []
        (name, w, _), = held.weights()
        assert name == "model.layers.0.mlp.down_proj.weight" and w.shape == (8, 32)
        assert torch.equal(dequantize_ref(w), want.double()), method
    assert cases["gptq"][4][0, 0] == -4 and cases["gptq"][4][3, 13] == -16 and cases["awq"][4][2, 1] == 0.75


def test_quantize_choices_are_validated(tmp_path):
    with pytest.raises(ValueError, match="quantize: expected None or one of int8, int4, got 'int3'"):
        Q.check_quantize("int3")
    with pytest.raises(ValueError, match="group_size: expected one of"):
        Q.quantize_weight(torch.randn(4, 64), "int4", group_size=16)
    with pytest.raises(ValueError, match="quantize: expected"):
        Engine(str(tmp_path), quantize="fp8")


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    """Qwen2 (q/k/v biases), hidden 128, heads of 64 (a head_dim the Triton attention runs)."""
    return make_hf_checkpoint(str(tmp_path_factory.mktemp("q")), "qwen2", hidden_size=128, num_attention_heads=2,
                              num_key_value_heads=1, intermediate_size=256)


def test_quantize_at_load_decodes_the_torch_oracle_tokens(tiny_qwen2, device):
    """`quantize="int4"`: the Triton path (kernels on the packed weights, under the interpreter) decodes the tokens
    of the torch backend, which runs the same quantized values decoded to dense."""
    prompts = [[1, 5, 9, 200, 33], [1, 77, 3]]
    loaded = load_model_files(tiny_qwen2, device=device, dtype=torch.float32, quantize="int4", keep_quantized=True,
                              progress=False)
    qkv = loaded.weights["layers.0.qkv_proj"]
    assert isinstance(qkv, QuantizedWeight) and qkv.format == "int4" and qkv.group_size == 128
    assert isinstance(loaded.weights["layers.0.qkv_bias"], torch.Tensor)  # biases, norms, embeddings stay dense
    dense = load_model_files(tiny_qwen2, device=device, dtype=torch.float32, quantize="int4", keep_quantized=False,
                             progress=False)
    assert torch.equal(dense.weights["layers.1.down_proj"],
                       dequantize_ref(loaded.weights["layers.1.down_proj"]).float())
    want = _greedy(Engine(dense, backend="torch", block_size=4), prompts, 3)
    assert_varied(prompts, want)
    assert _greedy(Engine(loaded, backend="triton", block_size=4), prompts, 3) == want


def test_cli_quantize_and_batch_invariant_flags(tiny_qwen2, capsys):
    assert main(["generate", "hello", "--model", tiny_qwen2, "--quantize", "int8", "--backend", "torch",
                 "--device", "cpu", "--max-new-tokens", "2", "--quiet"]) == 0
    assert main(["generate", "hello", "--model", tiny_qwen2, "--batch-invariant", "--backend", "torch",
                 "--device", "cpu"]) == 2
    assert "batch_invariant: needs the Triton linear kernel" in capsys.readouterr().err


# ---------------------------------------------------------------------- AWQ / GPTQ checkpoints

AWQ_GPTQ = [("gptq", 128, True, "gptq"), ("gptq", 64, False, "gptq_v2"), ("gptq", 32, False, "gptq"),
            ("awq", 32, False, "gemm"), ("awq", 128, False, "gemm")]


@pytest.mark.parametrize("method, group, sym, fmt", AWQ_GPTQ, ids=[f"{m}-g{g}-{'sym' if s else 'asym'}-{f}"
                                                                  for m, g, s, f in AWQ_GPTQ])
def test_awq_gptq_checkpoints_load_without_dequantizing(method, group, sym, fmt, tmp_path):
    """Every layer loads as an int4 QuantizedWeight (q/k/v and gate/up stacked) that stands bitwise for the
    matrix the checkpoint's packed tensors encode; decoded (keep_quantized=False) it is that matrix in fp32."""
    path, expected = make_quantized_hf_checkpoint(tmp_path, method, group, sym=sym, checkpoint_format=fmt,
                                                  hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                                                  intermediate_size=256)
    loaded = load_model_files(path, device="cpu", dtype=torch.float32, keep_quantized=True, progress=False)
    dense = load_model_files(path, device="cpu", dtype=torch.float32, keep_quantized=False, progress=False)
    for i in range(2):
        m = f"model.layers.{i}."
        fused = {"qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "o_proj": ("self_attn.o_proj",), "gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
                 "down_proj": ("mlp.down_proj",)}
        for name, parts in fused.items():
            w = loaded.weights[f"layers.{i}.{name}"]
            assert isinstance(w, QuantizedWeight) and w.format == "int4" and w.group_size == group, name
            want = torch.cat([expected[m + p] for p in parts])
            assert torch.equal(dequantize_ref(w), want), f"layer {i} {name}"
            assert torch.equal(dense.weights[f"layers.{i}.{name}"], want.float())
    assert isinstance(loaded.weights["embed_tokens"], torch.Tensor)


def test_gptq_checkpoint_decodes_the_dequantized_tokens_on_the_kernels(tmp_path, device):
    path, _ = make_quantized_hf_checkpoint(tmp_path, "gptq", 64, hidden_size=128, num_attention_heads=2,
                                           num_key_value_heads=1, intermediate_size=256)
    prompts = [[1, 40, 41, 42], [1, 300]]
    want = _greedy(Engine(path, backend="torch", device=device, dtype="float32", block_size=4), prompts, 3)
    assert_varied(prompts, want)
    assert _greedy(Engine(path, backend="triton", device=device, dtype="float32", block_size=4), prompts, 3) == want


@pytest.mark.parametrize("change, field", [
    ({"quant_method": "bitsandbytes"}, "quantization_config.quant_method"),
    ({"bits": 8}, "quantization_config.bits"),
    ({"group_size": -1}, "quantization_config.group_size"),
    ({"desc_act": True}, "quantization_config.desc_act"),
    ({"checkpoint_format": "marlin"}, "quantization_config.checkpoint_format"),
    ({"sym": "yes"}, "quantization_config.sym"),
])
def test_unsupported_gptq_configs_are_refused_naming_the_field(change, field):
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True} | change
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        parse_quantization_config(qc)


@pytest.mark.parametrize("change, field", [({"version": "gemv"}, "quantization_config.version"),
                                           ({"zero_point": False}, "quantization_config.zero_point"),
                                           ({"w_bit": 3, "bits": None}, "quantization_config.w_bit")])
def test_unsupported_awq_configs_are_refused_naming_the_field(change, field):
    qc = {k: v for k, v in ({"quant_method": "awq", "bits": 4, "group_size": 64} | change).items() if v is not None}
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        parse_quantization_config(qc)


def test_loader_refuses_an_unsupported_config_and_a_missing_part(tmp_path):
    path, _ = make_quantized_hf_checkpoint(tmp_path, "gptq", 32, hidden_size=64, intermediate_size=96)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"]["desc_act"] = True
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=r"quantization_config\.desc_act"):
        load_model_files(path, device="cpu", dtype=torch.float32, progress=False)
    cfg["quantization_config"]["desc_act"] = False
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    from safetensors.torch import load_file, save_file

    state = load_file(os.path.join(path, "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.qzeros"]
    save_file(state, os.path.join(path, "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.qzeros'"):
        load_model_files(path, device="cpu", dtype=torch.float32, progress=False)


# ---------------------------------------------------------------------- GGUF blocks kept as they are

@pytest.mark.parametrize("qtype", ["Q4_0"])  # Q8_0 and Q4_1: the default model's test below
def test_tiny_gguf_native_blocks_decode_the_dequantized_tokens(qtype, tmp_path, device):
    pytest.importorskip("gguf")
    path, _ = make_gguf_checkpoint(tmp_path, qtype=qtype, hidden_size=128, num_attention_heads=2,
                                   num_key_value_heads=1, tie_word_embeddings=True)
    native = load_model_files(path, device=device, dtype=torch.float32, keep_quantized=True, progress=False)
    qkv, emb = native.weights["layers.0.qkv_proj"], native.weights["embed_tokens"]
    assert isinstance(qkv, QuantizedWeight) and qkv.format == qtype.lower() and emb.format == qtype.lower()
    prompts = [[1, 10, 20, 30], [1, 99]]
    want = _greedy(Engine(path, backend="torch", device=device, dtype="float32", block_size=4), prompts, 4)
    assert_varied(prompts, want)
    assert _greedy(Engine(native, backend="triton", block_size=4), prompts, 4) == want


def _truncated(loaded: LoadedModel, layers: int, vocab: int, device) -> LoadedModel:
    """The first `layers` layers and `vocab` vocabulary rows of a model (a cheap model of real weights), on
    `device`."""
    config = dataclasses.replace(loaded.config, num_layers=layers, vocab_size=vocab)
    weights = {}
    for name, w in loaded.weights.items():
        if name.startswith("layers.") and int(name.split(".")[1]) >= layers:
            continue
        if name in ("embed_tokens", "lm_head"):
            w = w.rows(torch.arange(vocab)) if isinstance(w, QuantizedWeight) else w[:vocab]
        weights[name] = w.to(device)
    return LoadedModel(config=config, weights=weights, tokenizer=loaded.tokenizer, source=loaded.source)


@pytest.fixture(scope="module")
def native_default(default_gguf) -> LoadedModel:
    """The default model loaded in its own GGUF blocks (fp32 activations, CPU)."""
    return load_model_files(default_gguf, device="cpu", dtype=torch.float32, keep_quantized=True, progress=False)


def test_default_model_stays_in_its_gguf_blocks(native_default):
    """SmolLM2's Q4_1 matrices and Q8_0 embedding load as QuantizedWeights (q/k rows un-permuted, q/k/v and
    gate/up stacked) that decode bitwise to what the dequantizing loader gives."""
    from smol import default_model

    _, dense = default_model()
    native = native_default
    for name in ("layers.0.qkv_proj", "layers.0.gate_up_proj", "layers.29.o_proj", "layers.7.down_proj"):
        w = native.weights[name]
        assert isinstance(w, QuantizedWeight) and w.format == "q4_1", name
        assert torch.equal(dequantize_ref(w).float(), dense.weights[name]), name
    emb = native.weights["embed_tokens"]
    assert emb.format == "q8_0"
    rows = torch.tensor([0, 1, 17, 4242, 49151])
    assert torch.equal(dequantize_ref(emb.rows(rows)).float(), dense.weights["embed_tokens"][rows])


def test_default_model_native_q4_1_decodes_the_dequantized_tokens(native_default, device):
    """End to end on the default model's own Q4_1/Q8_0 blocks, cut to its first 2 layers and 2048 vocabulary rows
    (the whole model takes minutes per token under the interpreter): the Triton path (q/k/v, o, gate/up and down
    on the linear kernel, the tied Q8_0 LM head fused with the argmax, Q8_0 embedding rows decoded by the
    dequantize kernel) greedily decodes the tokens of the torch backend on the same weights decoded to fp32."""
    small = _truncated(native_default, 2, 2048, device)
    dense = dataclasses.replace(small, weights=Q.dequantize_weights(dict(small.weights), torch.float32))
    prompt = small.tokenizer.encode("The first day of the", add_special_tokens=True)
    assert max(prompt) < 2048
    kw = dict(device=device, block_size=16, num_kv_blocks=8, max_model_len=128)
    want = _greedy(Engine(dense, backend="torch", **kw), [prompt], 4)
    assert _greedy(Engine(small, backend="triton", **kw), [prompt], 4) == want


# ---------------------------------------------------------------------- the model's products

def test_linear_policy():
    """Which products go to the kernel: quantized weights always in decode and up to MAX_ROWS rows (beyond:
    dequantize then torch), dense ones only in decode steps with batch_invariant."""
    calls = []

    def kernel(x, w, bias=None):
        calls.append(("kernel", x.shape[0]))
        return torch.zeros(x.shape[0], w.shape[0])

    def dequantize(w, dtype):
        calls.append(("dequantize", w.shape))
        return torch.zeros(w.shape, dtype=dtype)

    q = Q.quantize_weight(torch.randn(8, 32), "int8")
    dense = torch.randn(8, 32)
    for invariant in (False, True):
        lin = Q.make_linear(kernel, dequantize, batch_invariant=invariant)
        calls.clear()
        lin(torch.randn(3, 32), q, decode=True)
        lin(torch.randn(64, 32), q)
        lin(torch.randn(65, 32), q)
        lin(torch.randn(3, 32), dense, decode=True)
        lin(torch.randn(3, 32), dense)
        want = [("kernel", 3), ("kernel", 64), ("dequantize", (8, 32))] + ([("kernel", 3)] if invariant else [])
        assert calls == want, invariant
    with pytest.raises(ValueError, match="batch_invariant: needs the Triton linear kernel"):
        get_backend("torch", batch_invariant=True)


def test_batch_invariant_decode_does_not_depend_on_the_batch(tmp_path, device):
    """batch_invariant=True: a sequence's decode tokens and log-probabilities are bitwise the same decoded alone
    and decoded beside two others (each prompt prefilled alone in both runs, so only decode batches differ)."""
    path = make_hf_checkpoint(tmp_path, "llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    kw = dict(backend="triton", device=device, dtype="float32", block_size=4, batch_invariant=True)

    def run(others: list[list[int]]):
        eng = Engine(path, **kw)
        rid = eng.add_request([1, 11, 12, 13], max_new_tokens=4, ignore_eos=True)
        eng.step()  # its prefill, alone
        for p in others:  # each other prompt prefilled alone, then decoded with it
            eng.add_request(p, max_new_tokens=6, ignore_eos=True)
        outs = {}
        while eng.has_unfinished():
            for out in eng.step():
                outs[out.request_id] = out
        return outs[rid].token_ids, outs[rid].logprobs

    alone = run([])
    assert run([[1, 200, 201], [1, 7, 8, 9, 10, 11]]) == alone

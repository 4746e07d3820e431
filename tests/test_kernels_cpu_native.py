"""Native CPU kernels against their torch references, on every ISA path this machine runs (forced narrower)."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from bitnet_a48 import kernels_cpu_native as kn
from bitnet_a48.bitlinear import BitLinear
from bitnet_a48.int8_linear import int8_linear_torch
from bitnet_a48.packed_bitlinear import PackedBitLinear, project_shared_input, ternary_matmul_torch
from bitnet_a48.packing import pack_ternary
from bitnet_a48.quantization import quantize_act, quantize_act_int8, topk_count

kn.load_native()
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _activations(m: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g).mul(4).add(0.01)
    x[0, : max(1, k // 7)] *= 20  # outliers: absmax and absmean far apart
    return x.to(dtype)


def _diff(got: torch.Tensor, want: torch.Tensor) -> str:
    d = (got.float() - want.float()).abs()
    return f"{int((got != want).sum())} of {got.numel()} differ; max diff {d.max().item():.3e}, mean {d.mean():.3e}"


# ---------------------------------------------------------------------------------------------------------------
# Activation quantisers
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantizer", kn.NATIVE_QUANTIZERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "k"), [(1, 1), (1, 5), (2, 31), (7, 100), (64, 333), (3, 2560), (1, 6912)])
def test_quantizers_equal_reference(isa: str, quantizer: str, dtype: torch.dtype, m: int, k: int) -> None:
    x = _activations(m, k, dtype)
    codes_ref, scale_ref = quantize_act(x, quantizer, 0.5)
    codes, scale = kn.quantize_act_native(x, quantizer, topk_count(k, 0.5))
    assert torch.equal(codes, codes_ref), _diff(codes, codes_ref)
    assert torch.equal(scale, scale_ref), _diff(scale, scale_ref)


@pytest.mark.parametrize("ratio", [0.05, 0.5, 0.55, 1.0])
def test_topk_ties_keep_lowest_indices(isa: str, ratio: float) -> None:
    # bf16 activations from a handful of magnitudes: the k-th largest |x| is tied many times over.
    g = torch.Generator().manual_seed(1)
    levels = torch.tensor([0.0, 0.5, -0.5, 1.0, -1.0, 2.0])
    x = levels[torch.randint(0, len(levels), (5, 257), generator=g)].to(torch.bfloat16)
    k = topk_count(257, ratio)
    codes_ref, scale_ref = quantize_act(x, "topk_int8", ratio)
    codes, scale = kn.quantize_act_native(x, "topk_int8", k)
    assert torch.equal(codes, codes_ref) and torch.equal(scale, scale_ref), _diff(codes, codes_ref)
    if ratio < 1.0:
        assert ((codes_ref != 0).sum(-1) <= k).all()


def test_zero_rows_use_the_eps_clamp(isa: str) -> None:
    x = torch.zeros(3, 40)
    for quantizer in kn.NATIVE_QUANTIZERS:
        codes, scale = kn.quantize_act_native(x, quantizer, 20)
        codes_ref, scale_ref = quantize_act(x, quantizer, 0.5)
        assert torch.equal(codes, codes_ref) and torch.equal(scale, scale_ref)
        assert not codes.any()


# ---------------------------------------------------------------------------------------------------------------
# Ternary matmul and the fused linear
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize(("m", "k", "n"), [(1, 1, 1), (1, 64, 4), (2, 65, 5), (7, 333, 13), (64, 2560, 37),
                                           (3, 129, 640), (5, 6912, 7)])  # fmt: skip
def test_ternary_matmul_equals_reference(isa: str, out_dtype: torch.dtype, m: int, k: int, n: int) -> None:
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    codes = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    scale = torch.rand(m, 1, generator=g) * 1e-3
    packed = pack_ternary(torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8))
    got = kn.ternary_matmul_native(codes, scale, packed, n, out_dtype)
    want = ternary_matmul_torch(codes, scale, packed, n, out_dtype)
    assert got.dtype == out_dtype and torch.equal(got, want), _diff(got, want)


def test_extreme_codes_accumulate_exactly(isa: str) -> None:
    # Every code -128 against every field 2 (w = 1) or 0 (w = -1): the int16 steps of AVX2 at their bound.
    k = 6912
    codes = torch.full((2, k), -128, dtype=torch.int8)
    packed = pack_ternary(torch.cat([torch.ones(3, k), -torch.ones(2, k)]).to(torch.int8))
    scale = torch.ones(2, 1)
    got = kn.ternary_matmul_native(codes, scale, packed, 5, torch.float32)
    assert got[0].tolist() == [-128.0 * k] * 3 + [128.0 * k] * 2
    assert torch.equal(got, ternary_matmul_torch(codes, scale, packed, 5))


@pytest.mark.parametrize("quantizer", kn.NATIVE_QUANTIZERS)
@pytest.mark.parametrize("m", [1, 2, 7, 64])
def test_group_call_equals_separate_references(isa: str, quantizer: str, m: int) -> None:
    k, sizes = 96, (96, 24, 24)
    g = torch.Generator().manual_seed(m)
    x = _activations(m, k, torch.bfloat16, seed=m)
    packed = [pack_ternary(torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)) for n in sizes]
    alphas = [torch.rand(1, generator=g) for _ in sizes]
    outs = kn.ternary_linear_native(x, packed, alphas, list(sizes), quantizer, topk_count(k, 0.5))
    codes, x_scale = quantize_act(x, quantizer, 0.5)
    for y, p, a, n in zip(outs, packed, alphas, sizes, strict=True):
        want = ternary_matmul_torch(codes, x_scale * a, p, n, x.dtype)
        assert torch.equal(y, want), _diff(y, want)


def test_two_threads_give_the_same_outputs() -> None:
    x = _activations(9, 640, torch.float32)
    packed = pack_ternary(torch.randint(-1, 2, (1000, 640), dtype=torch.int8))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kn.ternary_linear_native(x, [packed], [torch.ones(1)], [1000], "int4")[0]
        torch.set_num_threads(2)
        two = kn.ternary_linear_native(x, [packed], [torch.ones(1)], [1000], "int4")[0]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "k", "n"), [(1, 1, 3), (1, 2560, 129), (7, 100, 64), (2, 65, 1)])
def test_int8_linear_equals_reference(isa: str, dtype: torch.dtype, m: int, k: int, n: int) -> None:
    g = torch.Generator().manual_seed(k + n)
    x = _activations(m, k, dtype)
    weight = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    weight_scale = torch.rand(n, generator=g) * 0.01
    got = kn.int8_linear_native(x, weight, weight_scale)
    want = int8_linear_torch(x, weight, weight_scale)
    assert torch.equal(got, want), _diff(got, want)
    assert torch.equal(quantize_act_int8(x)[0], kn.quantize_act_native(x, "int8")[0])


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs, ISA control, tracing
# ---------------------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors() -> None:
    packed = pack_ternary(torch.zeros(8, 16, dtype=torch.int8))
    one = torch.ones(1)
    x = torch.randn(2, 16)
    cases = [
        (lambda: kn.ternary_linear_native(x, [packed], [one], [9], "int8"), "must have shape"),
        (lambda: kn.ternary_linear_native(x.int(), [packed], [one], [8], "int8"), "float32, bfloat16 or float16"),
        (lambda: kn.ternary_linear_native(x.t(), [packed], [one], [8], "int8"), "must be 2-D|contiguous"),
        (lambda: kn.ternary_linear_native(x, [packed.int()], [one], [8], "int8"), "uint8"),
        (lambda: kn.ternary_linear_native(x, [packed], [one.double()], [8], "int8"), "one fp32 value"),
        (lambda: kn.ternary_linear_native(x, [packed], [], [8], "int8"), "one packed weight, scale and output"),
        (lambda: kn.ternary_linear_native(x, [packed], [one], [8], "fp4"), "quantise with"),
        (lambda: kn.ternary_linear_native(x, [packed], [one], [8], "topk_int8", 17), "topk must lie in"),
        (lambda: kn.ternary_matmul_native(x, torch.ones(2, 1), packed, 8, torch.float32), "must be int8"),
        (lambda: kn.int8_linear_native(x, torch.zeros(3, 15, dtype=torch.int8), torch.ones(3)), "int8 \\[N, 16\\]"),
    ]
    for call, message in cases:
        with pytest.raises((RuntimeError, ValueError), match=message):
            call()


def test_isa_names_and_limits() -> None:
    with pytest.raises(ValueError, match="takes one of"):
        kn.set_cpu_isa("sse2")
    if kn.best_cpu_isa() != "avx512":
        with pytest.raises(ValueError, match="cannot run the 'avx512' path"):
            kn.set_cpu_isa("avx512")
    info = kn.build_info()
    assert info["isa"] in kn.ISAS and os.path.exists(str(info["path"]))


def test_environment_variable_forces_the_scalar_path() -> None:
    code = "from bitnet_a48 import kernels_cpu_native as k; k.load_native(); print(k.cpu_isa(), k.best_cpu_isa())"
    env = {**os.environ, kn.ISA_ENV: "scalar"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["scalar", kn.best_cpu_isa()]
    env[kn.ISA_ENV] = "neon"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "BITNET_A48_CPU_ISA / set_cpu_isa takes one of" in bad.stderr


def test_without_a_compiler_the_torch_path_runs_with_one_warning(tmp_path: os.PathLike) -> None:
    code = (
        "import warnings, torch\n"
        "from bitnet_a48.packed_bitlinear import PackedBitLinear\n"
        "layer = PackedBitLinear(16, 8, role='down', quant_mode='a8')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    x = torch.randn(2, 16)\n"
        "    print(layer.backend(x), layer.backend(x), tuple(layer(x).shape))\n"
        "print(len(caught)); print(caught[0].message)\n"
        "try:\n"
        "    layer.set_impl('native')\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-compiler"), kn.CACHE_ENV: str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[0] == "torch torch (2, 8)" and lines[1] == "1"
    assert "no C++ compiler" in lines[2] and "slower" in lines[2]
    assert lines[3].startswith("impl='native' cannot run: no C++ compiler")


def test_opcheck() -> None:
    x = _activations(3, 40, torch.bfloat16)
    packed = pack_ternary(torch.randint(-1, 2, (9, 40), dtype=torch.int8))
    ops = torch.ops.bitnet_a48_native
    torch.library.opcheck(ops.quantize_act, (x, "int4", 0))
    torch.library.opcheck(ops.ternary_linear, (x, [packed, packed], [torch.ones(1), torch.ones(1)], [9, 9],
                                               "topk_int8", 20))  # fmt: skip
    torch.library.opcheck(ops.ternary_matmul, (torch.ones(2, 40, dtype=torch.int8), torch.ones(2, 1), packed, 9,
                                               torch.float32))  # fmt: skip
    torch.library.opcheck(ops.int8_linear, (x, torch.ones(5, 40, dtype=torch.int8), torch.ones(5)))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = PackedBitLinear.from_bitlinear(BitLinear(64, 64, role="qkv", quant_mode="a4.8"))
        self.k = PackedBitLinear.from_bitlinear(BitLinear(64, 16, role="qkv", quant_mode="a4.8"))
        self.o = PackedBitLinear.from_bitlinear(BitLinear(64, 64, role="o", quant_mode="a4.8"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = project_shared_input((self.q, self.k), x)
        return self.o(q) + k.sum(-1, keepdim=True)


def test_torch_compile_and_export_trace_through_the_ops() -> None:
    torch.manual_seed(0)
    block = _Block().eval()
    assert block.q.backend(torch.randn(1, 64)) == "native"
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        want = block(x)
        torch._dynamo.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no graph-break warnings
            compiled = torch.compile(block, fullgraph=True, backend="eager")
            assert torch.equal(compiled(x), want)
        exported = torch.export.export(block, (x,))
        assert torch.equal(exported.module()(x), want)
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "bitnet_a48_native.ternary_linear.default" in targets


def test_shared_input_projection_is_one_call_and_equals_each_layer() -> None:
    block = _Block().eval()
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        fused = project_shared_input((block.q, block.k), x)
        for layer in (block.q, block.k):
            layer.set_impl("torch")
        separate = [block.q(x), block.k(x)]
    for got, want in zip(fused, separate, strict=True):
        assert torch.equal(got, want), _diff(got, want)
    # A hook on one layer must see its call: the group then calls each layer.
    seen: list[str] = []
    block.k.register_forward_hook(lambda *args: seen.append("k"))
    with torch.no_grad():
        project_shared_input((block.q, block.k), x)
    assert seen == ["k"]


# ---------------------------------------------------------------------------------------------------------------
# Fused RMSNorm and ReLU²GLU, and the packed model on the native path
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 7])
def test_fused_norm_and_glu_equal_the_modules(isa: str, dtype: torch.dtype, m: int) -> None:
    from bitnet_a48.modeling_bitnet_a48 import BitNetA48RMSNorm, ReLUSquared

    torch.manual_seed(m)
    norm = BitNetA48RMSNorm(96, eps=1e-5).to(dtype)
    norm.weight.data.uniform_(0.5, 1.5)
    gate = PackedBitLinear.from_bitlinear(BitLinear(96, 40, role="gate_up", quant_mode="a4.8"))
    up = PackedBitLinear.from_bitlinear(BitLinear(96, 40, role="gate_up", quant_mode="a4.8"))
    x = _activations(m, 96, dtype, seed=m) * 3
    with torch.no_grad():
        normed = norm(x)
        want = [_layer_reference(normed, layer) for layer in (gate, up)]
        got = kn.ternary_linear_native(x, [gate.weight, up.weight], [gate.weight_scale, up.weight_scale], [40, 40],
                                       "int4", norm_weight=norm.weight, norm_eps=1e-5)  # fmt: skip
        glu = kn.ternary_linear_native(x, [gate.weight, up.weight], [gate.weight_scale, up.weight_scale], [40, 40],
                                       "int4", norm_weight=norm.weight, norm_eps=1e-5, relu2_glu=True)  # fmt: skip
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w), _diff(g, w)
    expected = ReLUSquared()(want[0]) * want[1]
    assert len(glu) == 1 and torch.equal(glu[0], expected), _diff(glu[0], expected)
    with pytest.raises(RuntimeError, match="relu2_glu takes two weights"):
        kn.ternary_linear_native(x, [gate.weight], [gate.weight_scale], [40], "int4", relu2_glu=True)
    with pytest.raises(RuntimeError, match="RMSNorm weight must be"):
        kn.ternary_linear_native(x, [gate.weight], [gate.weight_scale], [40], "int4", norm_weight=norm.weight[:5])


def _layer_reference(x: torch.Tensor, layer: PackedBitLinear) -> torch.Tensor:
    """The layer's torch reference on ``x`` (quantiser, then ternary_matmul_torch)."""
    codes, scale = quantize_act(x, layer.act_quantizer, layer.topk_ratio)
    return ternary_matmul_torch(codes, scale * layer.weight_scale, layer.weight, layer.out_features, x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant_mode", ["a4.8", "a8"])
def test_packed_model_native_equals_torch_reference(
    isa: str, dtype: torch.dtype, quant_mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import TINY_CONFIG

    from bitnet_a48 import BitNetA48Config, BitNetA48ForCausalLM
    from bitnet_a48.sparsity import SparsityMeter

    model = BitNetA48ForCausalLM(BitNetA48Config(**TINY_CONFIG, quant_mode=quant_mode, kv_cache_bits=None))
    model = model.eval().to(dtype)
    for p in model.parameters():
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)  # norm weights away from 1, so a skipped norm weight would show
    model.pack()
    ids = torch.randint(3, 101, (3, 11))
    from bitnet_a48 import packed_bitlinear

    calls: list[int] = []
    original = packed_bitlinear.ternary_linear_native

    def counting(*args: object, **kwargs: object) -> list[torch.Tensor]:
        calls.append(len(args[1]))  # weights in the call
        return original(*args, **kwargs)

    monkeypatch.setattr(packed_bitlinear, "ternary_linear_native", counting)
    with torch.no_grad():
        native = model(ids).logits
    monkeypatch.undo()
    assert calls == [3, 1, 2, 1] * TINY_CONFIG["num_hidden_layers"]  # q/k/v, o, gate/up, down: one call each
    with torch.no_grad():
        with SparsityMeter(model):  # hooks on every projection: the fused calls step aside
            hooked = model(ids).logits
        for layer in model.projections().values():
            layer.set_impl("torch")
        reference = model(ids).logits
    assert torch.equal(native, reference), _diff(native, reference)
    assert torch.equal(hooked, reference), _diff(hooked, reference)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_quantize_pack_equals_reference(bits: int, dtype: torch.dtype) -> None:
    from bitnet_a48.kernels_kv_cache import quantize_pack_torch

    g = torch.Generator().manual_seed(bits)
    for magnitude in (1e-7, 1e-2, 1.0, 3e4):
        x = (torch.randn(2, 3, 5, 64, generator=g) * magnitude).to(dtype)
        x[0, 0, 0] = 0  # an all-zero group takes the smallest scale
        packed, scale = kn.kv_quantize_pack_native(x, bits)
        want_packed, want_scale = quantize_pack_torch(x, bits, torch.float16)
        assert torch.equal(packed, want_packed), (magnitude, _diff(packed, want_packed))
        assert torch.equal(scale, want_scale), (magnitude, _diff(scale, want_scale))


def test_saved_packed_model_runs_the_native_kernels_through_remote_code(tmp_path: os.PathLike) -> None:
    import textwrap

    from conftest import TINY_CONFIG

    from bitnet_a48 import BitNetA48Config, BitNetA48ForCausalLM

    model = BitNetA48ForCausalLM(BitNetA48Config(**TINY_CONFIG)).eval().pack()
    model.save_pretrained(tmp_path)
    ids = torch.randint(3, 101, (1, 6))
    with torch.no_grad():
        expected = model(ids).logits
    from safetensors.torch import save_file

    save_file({"logits": expected}, str(tmp_path / "expected.safetensors"))
    script = textwrap.dedent(f"""
        import sys
        sys.modules["bitnet_a48"] = None  # the package cannot be imported here, as on a machine without it
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        layer = model.model.layers[0].self_attn.q_proj
        assert type(layer).__module__.startswith("transformers_modules"), type(layer).__module__
        with torch.no_grad():
            logits = model(torch.tensor({ids.tolist()})).logits
        from safetensors.torch import load_file
        expected = load_file({str(tmp_path / "expected.safetensors")!r})["logits"]
        print(layer.backend(torch.zeros(1, layer.in_features)), torch.equal(logits, expected))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "native True"

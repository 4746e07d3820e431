"""PackedBitLinear: the inference form of a BitLinear, holding 2-bit packed ternary weights.

The latent weights are gone: the layer keeps ``weight`` (uint8 ``[ceil(out/4), in]``, ``packing.py`` layout, the
layout of transformers' ``bitnet`` checkpoints) and ``weight_scale`` (fp32 ``[1]``, α = mean|W| that multiplies the
output, as transformers' ``autobitlinear``). The forward is integer arithmetic::

    (x_codes, x_scale) = Q_act(x)                            per token, by role and quant_mode (bitlinear.py)
    y = (x_codes @ w_codes^T) · (x_scale · α)                int32 accumulation, fp32 epilogue, y in x.dtype

which is the latent BitLinear's ``F.linear(Q_act(x), Q_w(W))`` with the scales pulled out of the sum: in fp32 the
two agree to rounding (tests: relative error below 1e-5 of the output's norm; the bf16 BitLinear rounds its
dequantised operands to bf16 and is looser). FP4 codes are int8 (2·E2M1) and take the same integer path.

Implementations (``impl``, chosen explicitly; an exception is never swallowed to fall back):

- ``"torch"`` on CPU: ``torch._int_mm`` (int8 × int8 → int32; on this torch version any M, K, N on CPU). With
  ``cpu_layout="packed"`` (default) the weights stay at 2 bits and are unpacked per call, a chunk of packed rows at
  a time, by one broadcasted bitwise ``and`` over the four bit planes (no shift: the powers of 4 are divided out
  of the int32 sums, see ``_packed_int8_matmul``); the fields ``w + 1`` go to ``_int_mm`` and the ``-1`` becomes
  one row sum of the activation codes. With ``cpu_layout="int8"`` an int8 copy of the codes
  (4× the packed bytes, kept beside them) is cached and the call is a bare ``_int_mm`` (see BENCHMARKS.md for
  speed and memory of both).
- ``"torch"`` on other devices: ``_int_mm`` where CUDA's constraints hold, else an fp32 matmul of the integer codes
  (exact while K·128·2 < 2^24).
- ``"native"`` (CPU): the C++ kernels of ``kernels_cpu_native`` (AVX-512 VNNI, AVX2 or scalar, chosen at run time
  from the CPU): one call quantises the input (INT8, INT4, TopK + INT8; FP4 in torch first) and multiplies it by the
  packed weights in one pass over their bytes, at every M. The outputs equal ``"torch"``'s bit for bit. The library
  is compiled on first use (seconds, then cached); it needs a C++ compiler.
- ``"triton"``: ``kernels_act_quant`` for the input quantiser (FP4 stays in torch), ``kernels_ternary_matmul`` on
  the packed weights (decode kernel for M ≤ 16).
- ``"auto"``: Triton on CUDA tensors when Triton is importable; on CPU ``"native"`` for fp32/bf16/fp16 inputs and
  packed weights (``cpu_layout="packed"``) when the library builds (without a compiler a one-line warning says the
  torch path runs instead, and why it is slow); else ``"torch"``.

Layers that share an input (q/k/v, gate/up) are best run through :func:`project_shared_input`: one native call, one
activation quantisation for the group.

The class is an ``nn.Linear`` without nn.Linear's dense parameter: ``nn.Linear.__init__`` is not run, ``weight`` is
the uint8 buffer above and ``bias`` is None. Being an ``nn.Linear`` is what lets PEFT's default dispatch wrap it
from a plain ``LoraConfig`` (``peft_bitnet_a48.py`` says why and what PEFT does with ``weight``). The constructor fills
the weights with zeros (packed code 1) and α = 1 and marks the module initialised, so transformers' ``_init_weights``
(which draws normal weights into every ``nn.Linear``) leaves it alone; ``reset_parameters`` restores those values.
Real values come from :meth:`PackedBitLinear.from_bitlinear` or ``load_state_dict``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module_globals

from .bitlinear import BitLinear, InputQuantizerMixin
from .kernels_cpu_native import (
    NATIVE_QUANTIZERS,
    load_native,
    native_available,
    ternary_linear_native,
    ternary_matmul_native,
)
from .packing import (
    PACKED_ZERO_BYTE,
    VALUES_PER_BYTE,
    pack_ternary,
    packed_rows,
    unpack_planes,
    unpack_ternary,
    validate_packed,
)
from .quantization import (
    ROLES,
    Quantized,
    quantize_act,
    quantize_weight_ternary,
    topk_count,
)

IMPLS = ("auto", "torch", "native", "triton")
# Input dtypes the native kernels read and write.
NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CPU_LAYOUTS = ("packed", "int8")
_TRITON_ACT_QUANTIZERS = ("int8", "int4", "topk_int8")


def _triton_available() -> bool:
    from . import kernels_ternary_matmul

    return kernels_ternary_matmul.HAS_TRITON


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b^T`` in int32 for int8 ``a [M, K]`` and int8 ``b [N, K]``, exact."""
    if a.device.type == "cpu":
        if a.shape[1] == 1:
            # torch 2.13's CPU _int_mm returns garbage for K = 1 and N >= 2 (tests/test_kernels.py): outer product.
            return a.to(torch.int32) * b.to(torch.int32).t()
        return torch._int_mm(a, b.t())  # CPU: any shape; b passed transposed (the fastest layout measured)
    m, k = a.shape
    n = b.shape[0]
    if a.device.type == "cuda" and k % 8 == 0 and n % 8 == 0:
        # CUDA _int_mm needs M > 16 and K, N multiples of 8: pad M with zero rows.
        pad = max(0, 17 - m)
        a_pad = torch.nn.functional.pad(a, (0, 0, 0, pad)) if pad else a
        return torch._int_mm(a_pad, b.t())[:m]
    if k * 256 >= 2**24:
        raise ValueError(f"the fp32 fallback of the integer matmul is exact only for K < 65536, got K = {k}")
    return (a.float() @ b.float().t()).round().to(torch.int32)


def ternary_matmul_torch(
    codes: torch.Tensor,
    scale: torch.Tensor,
    packed: torch.Tensor,
    out_features: int,
    out_dtype: torch.dtype = torch.float32,
    weight_int8: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference of ``kernels_ternary_matmul``: ``y = (codes @ w^T) · scale``, int32 accumulation.

    Args:
        codes: int8 ``[M, K]`` activation codes.
        scale: fp32 ``[M, 1]`` (or ``[M]``): ``x_scale · α``.
        packed: uint8 ``[ceil(N/4), K]`` ternary weights.
        out_features: N.
        out_dtype: dtype of ``y``.
        weight_int8: optional cached int8 codes ``[N, K]`` of the same weights (``cpu_layout="int8"``).
    """
    m = codes.shape[0]
    if weight_int8 is not None:
        acc = int8_matmul(codes, weight_int8)  # (M, N)
    else:
        acc = _packed_int8_matmul(codes, packed, out_features)
    return (acc.float() * scale.reshape(m, 1)).to(out_dtype)


# Unpack this many bytes of int8 planes at a time: the chunk stays in cache between masking and _int_mm, and the
# transient memory is bounded (one CPU thread, 6912x2560, M = 1: 1.5-2 ms with 1-2 MiB chunks, 2.6 ms unchunked).
UNPACK_CHUNK_BYTES = 1 << 21

# Bit masks of the four planes, all int8-safe once masked: fields 0..2 scaled by 4^i for planes 0..2 (at most 32);
# plane 3 is not masked whole (64·2 = 128 overflows int8) but through its top bit, see _packed_int8_matmul.
_PLANE_MASKS = (0x03, 0x0C, 0x30, 0x80)


def _packed_int8_matmul(codes: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """``codes @ w^T`` in int32 from the packed weights, with one bitwise ``and`` per weight byte and plane.

    A plain shift-and-mask unpack costs two elementwise passes over the four planes; a mask alone costs one (about
    half the time on CPU). Per packed row r, with a = codes and fields f_i = w_i + 1 (module docstring of packing):

        s_i = Σ a · (p & 3·4^i) = 4^i · Σ a·f_i              i = 0, 1, 2  (int8 values 0..32, exact)
        s_3 = Σ a · int8(p & 0x80) = -128 · Σ a·b7           b7 = top bit of the byte
        t   = Σ a · int8(p) = s_0 + s_1 + s_2 + 64 · Σ a·f_3 + 2 · s_3     (int8(p) = p - 256·b7)

    so Σ a·f_3 = (t - s_0 - s_1 - s_2 - 2·s_3) / 64, all in exact int32 (the divisions by 4^i are exact shifts).
    """
    m, k = codes.shape
    rows = packed.shape[0]
    step = max(1, UNPACK_CHUNK_BYTES // (VALUES_PER_BYTE * k))
    masks = torch.tensor(_PLANE_MASKS, dtype=torch.uint8, device=packed.device).view(VALUES_PER_BYTE, 1, 1)
    planes = torch.empty((VALUES_PER_BYTE, min(step, rows), k), dtype=torch.uint8, device=packed.device)
    acc = torch.empty((m, VALUES_PER_BYTE, rows), dtype=torch.int32, device=codes.device)  # (M, plane i, row r)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        chunk = torch.bitwise_and(packed[r0:r1].unsqueeze(0), masks, out=planes[:, : r1 - r0])  # (4, n, K)
        fields = chunk.view(torch.int8).reshape(VALUES_PER_BYTE * (r1 - r0), k)
        acc[:, :, r0:r1] = int8_matmul(codes, fields).view(m, VALUES_PER_BYTE, r1 - r0)
    whole = int8_matmul(codes, packed.view(torch.int8))  # (M, R): t, the bytes read as int8
    s0, s1, s2, s3 = acc.unbind(1)
    f3 = (whole - s0 - s1 - s2 - 2 * s3) >> 6
    acc = torch.stack((s0, s1 >> 2, s2 >> 4, f3), dim=1)  # (M, 4, R): Σ a·f_i
    # Output n = i·R + r; Σ a·w = Σ a·f − Σ a.
    flat = acc.view(m, VALUES_PER_BYTE * rows)[:, :out_features]
    return flat - codes.sum(dim=-1, keepdim=True, dtype=torch.int32)


class Fp32ScaleMixin:
    """Keeps a module's ``weight_scale`` buffer fp32 through ``model.to(dtype)`` casts (only its device follows).

    nn.Module._apply is private API, pinned by test_weight_scale_stays_fp32_under_model_casts.
    """

    weight_scale: torch.Tensor

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        scale = self.weight_scale
        super()._apply(fn, recurse)  # type: ignore[misc]
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = scale.to(device=self.weight_scale.device, dtype=torch.float32)
        return self


class PackedBitLinear(InputQuantizerMixin, Fp32ScaleMixin, nn.Linear):
    """Ternary linear layer for inference: 2-bit packed weights, quantised inputs, integer matmul.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        role: which input quantiser the layer takes in a4.8: "qkv", "o", "gate_up" or "down".
        quant_mode: "a4.8" or "a8" ("none" needs the latent weights and is refused).
        topk_ratio: share of input entries kept by TopK for role "o" in a4.8.
        act4_format: "int4" or "fp4" for the 4-bit inputs in a4.8.
        device: device of the buffers.
        dtype: accepted for the signature of ``nn.Linear``-like constructors and ignored: the weights are uint8,
            ``weight_scale`` is fp32 and the output takes the input's dtype.
        impl: "auto", "torch", "native" or "triton" (module docstring).
        cpu_layout: "packed" (2-bit weights only) or "int8" (also cache int8 codes for the CPU ``_int_mm`` path).
    """

    weight: torch.Tensor
    weight_scale: torch.Tensor
    weight_int8: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        role: str,
        quant_mode: str = "a4.8",
        topk_ratio: float = 0.5,
        act4_format: str = "int4",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        impl: str = "auto",
        cpu_layout: str = "packed",
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate the dense weight this layer replaces
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.role = role
        self.register_buffer(
            "weight",
            torch.full((packed_rows(out_features), in_features), PACKED_ZERO_BYTE, dtype=torch.uint8, device=device),
        )
        self.register_buffer("weight_scale", torch.ones(1, dtype=torch.float32, device=device))
        self.register_parameter("bias", None)
        self.register_buffer("weight_int8", None, persistent=False)
        self._int8_source: tuple[int, int] | None = None  # (data_ptr, version) of the weight the cache came from
        # Checkpoints may store the scale 0-dim (transformers writes shape [1]): accept both.
        self.register_load_state_dict_pre_hook(_reshape_weight_scale)
        self.set_impl(impl)
        self.set_cpu_layout(cpu_layout)
        self.set_quant_mode(quant_mode, topk_ratio=topk_ratio, act4_format=act4_format)
        # transformers' _initialize_weights skips modules carrying this flag (its _init_weights would draw normal
        # values into the uint8 codes of an nn.Linear); the values above are this layer's initialisation.
        self._is_hf_initialized = True

    def reset_parameters(self) -> None:
        """Back to the constructor's values: all codes 0 (packed byte ``PACKED_ZERO_BYTE``) and α = 1."""
        with torch.no_grad():
            self.weight.fill_(PACKED_ZERO_BYTE)
            self.weight_scale.fill_(1.0)

    # -- configuration -------------------------------------------------------------------------------------

    def set_quant_mode(self, quant_mode: str, topk_ratio: float | None = None, act4_format: str | None = None) -> None:
        """Switch the input quantisers ("a4.8" or "a8"); same semantics as ``BitLinear.set_quant_mode``."""
        if quant_mode == "none":
            raise ValueError(
                "quant_mode='none' (full precision) is impossible on a PackedBitLinear: its full-precision weights "
                "were replaced by ternary codes when it was packed; use the latent BitLinear model instead"
            )
        super().set_quant_mode(quant_mode, topk_ratio=topk_ratio, act4_format=act4_format)

    def set_impl(self, impl: str) -> None:
        """Choose "auto", "torch", "native" or "triton"; raises here when the chosen one cannot run."""
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if impl == "triton" and not _triton_available():
            raise RuntimeError("impl='triton' needs the `triton` package (pip install 'bitnet-a48[triton]')")
        if impl == "native":
            try:
                load_native()
            except RuntimeError as error:
                raise RuntimeError(f"impl='native' cannot run: {error}; use impl='torch'") from None
        self.impl = impl

    def set_cpu_layout(self, cpu_layout: str) -> None:
        """ "packed": unpack the 2-bit weights per CPU call; "int8": also keep an int8 copy for ``_int_mm``."""
        if cpu_layout not in CPU_LAYOUTS:
            raise ValueError(f"cpu_layout must be one of {CPU_LAYOUTS}, got {cpu_layout!r}")
        self.cpu_layout = cpu_layout
        if cpu_layout == "packed":
            self.weight_int8 = None
            self._int8_source = None
        elif self.weight.device.type != "meta":
            self.unpack_cache_()

    def unpack_cache_(self) -> PackedBitLinear:
        """Build the int8 copy of the weight codes (``[out, in]``, 4× the packed bytes) used on CPU."""
        self.cpu_layout = "int8"
        self.weight_int8 = unpack_ternary(self.weight, self.out_features).contiguous()
        self._int8_source = self._weight_key()
        return self

    def _weight_key(self) -> tuple[int, int]:
        # Changes when the packed weights are written in place (version) or replaced (pointer), e.g. by loading.
        return (self.weight.data_ptr(), self.weight._version)

    # -- construction from a latent layer ----------------------------------------------------------------

    @classmethod
    def from_bitlinear(
        cls,
        layer: BitLinear,
        *,
        quant_mode: str | None = None,
        impl: str = "auto",
        cpu_layout: str = "packed",
    ) -> PackedBitLinear:
        """Quantise ``layer``'s latent weights to ternary codes and α = mean|W| and pack them.

        The role, quant_mode (unless given), topk_ratio and act4_format are copied. A layer in quant_mode "none"
        needs ``quant_mode=`` ("a4.8" or "a8") since a packed layer cannot run in full precision.
        """
        if not isinstance(layer, BitLinear):
            raise TypeError(f"from_bitlinear takes a BitLinear, got {type(layer).__name__}")
        if layer.bias is not None:
            raise ValueError("PackedBitLinear has no bias (BitNet uses none); got a BitLinear with a bias")
        mode = layer.quant_mode if quant_mode is None else quant_mode
        if mode == "none":
            raise ValueError(
                f"the BitLinear is in quant_mode 'none'; pass quant_mode='a4.8' or 'a8' to pack it (got {mode!r})"
            )
        with torch.no_grad():
            codes, alpha = quantize_weight_ternary(layer.weight.detach())
            packed = pack_ternary(codes)
        new = cls(
            layer.in_features,
            layer.out_features,
            role=layer.role,
            quant_mode=mode,
            topk_ratio=layer.topk_ratio,
            act4_format=layer.act4_format,
            device=layer.weight.device,
            impl=impl,
        )
        new.weight.copy_(packed)
        new.weight_scale.copy_(alpha.reshape(1))
        new.set_cpu_layout(cpu_layout)
        return new

    # -- forward ---------------------------------------------------------------------------------------------

    def backend(self, x: torch.Tensor) -> str:
        """The implementation a forward on ``x`` runs: "triton", "native" or "torch" (module docstring)."""
        if self.impl == "triton":
            return "triton"
        if self.impl == "native":
            return "native"
        if self.impl == "auto":
            if x.is_cuda:
                return "triton" if _triton_available() else "torch"
            if (
                x.device.type == "cpu"
                and x.dtype in NATIVE_DTYPES
                and self.cpu_layout == "packed"
                and native_available()
            ):
                return "native"
        return "torch"

    def native_topk(self) -> int:
        """Entries the TopK quantiser keeps per row (0 for the other quantisers), as the native op takes it."""
        return topk_count(self.in_features, self.topk_ratio) if self.act_quantizer == "topk_int8" else 0

    def _quantize_input(self, x: torch.Tensor, use_triton: bool) -> Quantized:
        if use_triton and self.act_quantizer in _TRITON_ACT_QUANTIZERS:
            from .kernels_act_quant import quantize_act_triton

            return quantize_act_triton(x, self.act_quantizer, self.topk_ratio)
        return quantize_act(x, self.act_quantizer, self.topk_ratio)

    def _check_input(self, input: torch.Tensor) -> None:
        if input.shape[-1] != self.in_features:
            raise ValueError(
                f"PackedBitLinear expected inputs with last dimension {self.in_features}, got shape "
                f"{tuple(input.shape)}"
            )
        if not torch.is_floating_point(input):
            raise TypeError(f"PackedBitLinear takes floating-point inputs, got {input.dtype}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        if torch.is_grad_enabled() and input.requires_grad:
            # The frozen packed base still passes dX = dY · (codes · α) back (LoRA on a packed model).
            return PackedLinearFunction.apply(input, self)
        lead = input.shape[:-1]
        x = input.reshape(-1, self.in_features)
        backend = self.backend(x)
        if backend == "native" and self.act_quantizer in NATIVE_QUANTIZERS:
            (y,) = ternary_linear_native(
                x.contiguous(), [self.weight], [self.weight_scale], [self.out_features], self.act_quantizer,
                self.native_topk(),
            )  # fmt: skip
            return y.reshape(*lead, self.out_features)
        codes, x_scale = self._quantize_input(x, backend == "triton")  # int8 (M, K), fp32 (M, 1)
        scale = x_scale * self.weight_scale.float()  # (M, 1): x_scale · α
        if backend == "triton":
            from .kernels_ternary_matmul import ternary_matmul_triton

            y = ternary_matmul_triton(codes, scale, self.weight, self.out_features, input.dtype)
        elif backend == "native":  # FP4 inputs: quantised in torch, multiplied natively
            y = ternary_matmul_native(codes, scale, self.weight, self.out_features, input.dtype)
        else:
            weight_int8 = None
            if self.cpu_layout == "int8" and input.device.type == "cpu":
                if self.weight_int8 is None or self._int8_source != self._weight_key():
                    self.unpack_cache_()
                weight_int8 = self.weight_int8
            y = ternary_matmul_torch(codes, scale, self.weight, self.out_features, input.dtype, weight_int8)
        return y.reshape(*lead, self.out_features)

    # -- utilities -------------------------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise ``ValueError`` if the packed weights hold the invalid code 3 or ``weight_scale`` is not finite."""
        validate_packed(self.weight, self.out_features, "weight")
        if self.weight_scale.numel() != 1 or not bool(torch.isfinite(self.weight_scale).all()):
            raise ValueError(f"weight_scale must be one finite value, got {self.weight_scale}")

    def unpacked_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantised weight ``w_codes · α`` as a dense ``[out, in]`` tensor (for checks and export)."""
        return unpack_ternary(self.weight, self.out_features).to(dtype) * self.weight_scale.to(dtype)

    def weight_nbytes(self) -> dict[str, int]:
        """Bytes held by the packed weights, the scale and the optional int8 cache."""
        cache = 0 if self.weight_int8 is None else self.weight_int8.numel() * self.weight_int8.element_size()
        return {"packed": self.weight.numel(), "scale": 4 * self.weight_scale.numel(), "int8_cache": cache}

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, role={self.role}, "
            f"quant_mode={self.quant_mode}, input={self.act_quantizer}, impl={self.impl}, "
            f"cpu_layout={self.cpu_layout}"
        )


def _reshape_weight_scale(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    key = prefix + "weight_scale"
    scale = state_dict.get(key)
    if isinstance(scale, torch.Tensor) and scale.dim() == 0:
        state_dict[key] = scale.reshape(1)


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether a call of ``module`` must go through ``__call__`` (fused paths skip it otherwise).

    Forward hooks (e.g. sparsity.py's), accelerate's ``_hf_hook`` and global hooks must see every layer's call.
    Read from the instance dict: this runs for every projection of every decode step.
    """
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or "_hf_hook" in module.__dict__
        or _module_globals._global_forward_hooks
        or _module_globals._global_forward_pre_hooks
    )


def _fusable_norm(norm: nn.Module | None, dtype: torch.dtype) -> bool:
    # An RMSNorm module whose arithmetic the native op repeats (modeling's BitNetA48RMSNorm: `weight`,
    # `variance_epsilon`), hook-free, with a weight of the input's dtype on the CPU.
    if norm is None:
        return True
    if type(norm).__name__ != "BitNetA48RMSNorm" or has_forward_hooks(norm):
        return False
    weight = norm._parameters.get("weight")
    return weight is not None and weight.dtype == dtype and weight.is_cpu and weight.dim() == 1


def _on_native_path(layer: nn.Module) -> bool:
    # The choice of `PackedBitLinear.backend` for a CPU input of a native dtype, without the library check.
    return type(layer) is PackedBitLinear and (
        layer.impl == "native" or (layer.impl == "auto" and layer.cpu_layout == "packed")
    )


def fusable_group(
    layers: tuple[nn.Module, ...], dtype: torch.dtype, norm: nn.Module | None = None, relu2_glu: bool = False
) -> bool:
    """Whether one native call can run ``layers`` on ``norm(input)`` for a CPU input of ``dtype`` without a gradient:
    every layer a hook-free ``PackedBitLinear`` on the native path with its weights on the CPU and one input
    quantiser, ``norm`` None or a hook-free ``BitNetA48RMSNorm`` of that dtype, and the library built. The checks run
    for every call of a decode step, so they read plain attributes only."""
    if dtype not in NATIVE_DTYPES:
        return False
    first = layers[0]
    for layer in layers:
        if not _on_native_path(layer) or has_forward_hooks(layer):
            return False
        if not layer._buffers["weight"].is_cpu:  # e.g. on meta until an offload hook of a parent loads it
            return False
        if (layer.act_quantizer, layer.topk_ratio, layer.in_features) != (first.act_quantizer, first.topk_ratio,
                                                                          first.in_features):  # fmt: skip
            return False
    if first.act_quantizer not in NATIVE_QUANTIZERS:
        return False
    if relu2_glu and (len(layers) != 2 or layers[0].out_features != layers[1].out_features):
        return False
    return _fusable_norm(norm, dtype) and native_available()


def fused_projection(
    layers: tuple[nn.Module, ...],
    input: torch.Tensor,
    norm: nn.Module | None = None,
    relu2_glu: bool = False,
) -> list[torch.Tensor] | None:
    """The outputs of ``layers`` on ``norm(input)`` from one native call, or None where that call does not apply.

    One call quantises the (normalised) input once and runs every layer's packed rows; with ``relu2_glu`` the two
    layers are (gate, up) and the one output is ``ReLU²(gate) · up``. It applies where :func:`fusable_group` says so
    for a CPU input that asks for no gradient. The outputs equal the modules' own, bit for bit. Otherwise None: the
    caller runs the modules (latent models, LoRA-wrapped layers, hooks, other devices).
    """
    if not input.is_cpu or (torch.is_grad_enabled() and input.requires_grad):
        return None
    first = layers[0]
    if input.shape[-1] != first.in_features or not fusable_group(layers, input.dtype, norm, relu2_glu):
        return None
    outputs = ternary_linear_native(
        input.reshape(-1, first.in_features).contiguous(),
        [layer._buffers["weight"] for layer in layers],
        [layer._buffers["weight_scale"] for layer in layers],
        [layer.out_features for layer in layers],
        first.act_quantizer,
        first.native_topk(),
        norm_weight=None if norm is None else norm._parameters["weight"],
        norm_eps=0.0 if norm is None else float(norm.variance_epsilon),
        relu2_glu=relu2_glu,
    )
    lead = input.shape[:-1]
    return [y.reshape(*lead, y.shape[-1]) for y in outputs]


def project_shared_input(layers: tuple[nn.Module, ...], input: torch.Tensor) -> list[torch.Tensor]:
    """``[layer(input) for layer in layers]``, in one native call when that gives the same outputs
    (:func:`fused_projection`)."""
    fused = fused_projection(layers, input)
    return fused if fused is not None else [layer(input) for layer in layers]


def packed_input_grad(layer: PackedBitLinear, grad_out: torch.Tensor) -> torch.Tensor:
    """``dY · (codes · α)`` for ``grad_out`` ``(M, out)``: the input gradient of a packed layer, chunked over rows."""
    packed = layer.weight
    rows, in_features = packed.shape
    out_features = layer.out_features
    dtype = grad_out.dtype if grad_out.dtype in (torch.float32, torch.float64) else torch.float32
    grad_out = grad_out.to(dtype)
    grad_in = torch.zeros(grad_out.shape[0], in_features, dtype=dtype, device=grad_out.device)
    step = max(1, UNPACK_CHUNK_BYTES // (VALUES_PER_BYTE * in_features))
    planes = torch.arange(VALUES_PER_BYTE, device=packed.device).view(VALUES_PER_BYTE, 1) * rows
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        # Output row of field (plane i, packed row r) is i·R + r; drop the padding rows of a short last plane.
        out_idx = (planes + torch.arange(r0, r1, device=packed.device).view(1, -1)).reshape(-1)
        keep = out_idx < out_features
        codes = unpack_planes(packed[r0:r1])[keep].to(dtype) - 1.0  # (n, in), values in {-1, 0, 1}
        grad_in.addmm_(grad_out[:, out_idx[keep]], codes)
    return grad_in * layer.weight_scale.to(dtype)


class PackedLinearFunction(torch.autograd.Function):
    """The packed integer forward with the input gradient ``dY · (codes · α)`` (identity STE for the quantisers)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: PackedBitLinear) -> torch.Tensor:  # noqa: D102
        ctx.layer = layer
        ctx.x_dtype = x.dtype
        with torch.no_grad():
            return layer(x)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        layer: PackedBitLinear = ctx.layer
        lead = grad_out.shape[:-1]
        grad_in = packed_input_grad(layer, grad_out.reshape(-1, layer.out_features))
        return grad_in.reshape(*lead, layer.in_features).to(ctx.x_dtype), None

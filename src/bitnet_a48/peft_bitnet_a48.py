"""LoRA on BitNet a4.8 models with PEFT: on the latent model, and QLoRA-style on the packed (2-bit) model.

Both work with PEFT's own API and a plain ``LoraConfig``: ``get_peft_model(model, LoraConfig(target_modules=[...]))``
(names such as ``"q_proj"`` or ``"all-linear"``), ``save_pretrained``, ``PeftModel.from_pretrained(model, folder)``
(whose config is read back from ``adapter_config.json``), several adapters, ``lora_dropout``, ``use_rslora``. The
helpers at the end of this file are thin: they add this package's LoRA layers, whose refusals are one clear line.

Latent model: ``BitLinear`` subclasses ``nn.Linear``, so PEFT wraps every projection as an ordinary ``lora.Linear``
(``"all-linear"`` skips lm_head). The base forward quantises on the fly with the STE, so ``y = Q_act(x)·Q_w(W)ᵀ +
s·B·A·x`` trains the adapters through the quantisers. Merging adds ``s·B·A`` to the latent weights; the merged model
re-quantises them in its forward, so it is close to, not equal to, the adapted model. PEFT merges by writing
``weight.data``, which a ``BitLinear``'s kept eval copy of ``Q_w(W)`` cannot notice (``bitlinear.py``), so
:func:`lora_config` maps ``BitLinear`` to :class:`BitLoraLinear`, whose merge and unmerge drop that copy. (With a
plain ``LoraConfig`` PEFT's own layer merges: call ``model.eval()`` again after merging.)

Packed model: ``PackedBitLinear`` is an ``nn.Linear`` whose ``weight`` is not a dense parameter but the uint8 buffer
of 2-bit codes ``[ceil(out/4), in]`` (``packed_bitlinear.py``), so PEFT's default dispatch wraps it in its own
``lora.Linear`` and the frozen packed forward runs as the base layer::

    forward:   y  = packed(x) + s · B(A(dropout(x)))      the packed integer forward, unchanged
    backward:  dX = dY · (codes · α) + s · dY·B·A         STE through the input quantiser; no weight gradient

``packed_bitlinear.PackedLinearFunction`` gives the frozen base its input gradient (the layer uses it whenever its
input requires a gradient); ``codes · α`` is unpacked a chunk of packed rows at a time
(``packed_bitlinear.UNPACK_CHUNK_BYTES``), so the backward never holds a dense copy of the whole weight. The native
CPU kernels run the base's forward; the fused calls over several projections (``packed_bitlinear.fused_projection``)
take bare packed layers only, so they step aside where LoRA wraps one and come back after ``unload()``.

What PEFT does with ``base_layer.weight`` (read and tested on 0.19.0 and 0.21.2), and why the packed layer can be an
``nn.Linear`` honestly:

- sizes: ``in_features`` / ``out_features``, which the layer has;
- device and dtype of new adapters: the device follows; uint8 is not a float dtype, so the adapters keep their
  own dtype (fp32 by default, as QLoRA's), and the output is cast back to the input's dtype;
- merging writes ``base_layer.weight.data += ΔW``: ΔW is a float ``[out, in]`` and the codes are uint8
  ``[ceil(out/4), in]``, so torch refuses (a size mismatch) before anything is written. The 2-bit codes cannot
  absorb a rank-r update; the fix is to load the latent checkpoint, apply the adapter there, merge, then ``pack()``.
  PEFT's own layer cannot say so in its words; :class:`PackedLoraLinear` (what :func:`lora_config` registers) and
  :func:`merge_lora` refuse in one line that names the fix;
- DoRA reads the dense weight's norm (the same size mismatch at creation; :class:`PackedLoraLinear` refuses in one
  line); PiSSA and OLoRA initialisation refuse uint8 weights with PEFT's own message.

Why not only the custom-layer mapping (``LoraConfig._register_custom_module``, PEFT's experimental extension point for
layers it does not know, which :func:`lora_config` still uses for the clearer refusals): it lives on the config
object, ``save_pretrained`` does not write it to ``adapter_config.json``, and neither ``get_peft_model`` nor
``PeftModel.from_pretrained`` asks the model for layer classes (the dispatchers they try are keyed on PEFT's own and
third-party layer classes, then ``nn.Linear``). A user's plain ``LoraConfig``, and every config read back from a
folder, therefore reaches PEFT's default dispatch, which accepts ``nn.Linear``. Both layers keep the same state-dict
keys, so adapters trained through one load through the other. Not chosen either: a tensor subclass for the codes
(torchao's way), whose in-place add could refuse in our words inside PEFT's merge, since loading replaces buffers
with plain tensors and every reader of ``weight`` would see the subclass.

transformers' own PEFT integration (``model.add_adapter`` / ``model.load_adapter``) goes through the same dispatch,
where transformers accepts the installed PEFT release (transformers 5.24 asks for peft >= 0.22).
"""

from __future__ import annotations

from typing import Any

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from .bitlinear import BitLinear
from .packed_bitlinear import PackedBitLinear

PACKED_MERGE_ERROR = (
    "cannot merge LoRA into a packed BitNet model (its weights are 2-bit ternary codes): load the latent checkpoint, "
    "apply the adapter there, merge_and_unload(), then pack()"
)


class BitLoraLinear(LoraLinear):
    """PEFT's LoRA layer over a latent ``BitLinear``; merging and unmerging also drop the base's kept ``Q_w(W)``."""

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        self.get_base_layer().clear_weight_cache()

    def unmerge(self) -> None:
        super().unmerge()
        self.get_base_layer().clear_weight_cache()


class PackedLoraLinear(LoraLinear):
    """PEFT's LoRA layer over a frozen ``PackedBitLinear`` (forward, dropout, rsLoRA, adapters: PEFT's own), with
    one-line refusals where PEFT's layer stops at a size mismatch: merging, and variants that need the dense weight."""

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any) -> Any:
        variant = super().resolve_lora_variant(config=config, **kwargs)
        if variant is not None:
            raise ValueError(
                f"LoRA on a packed BitNet layer is plain LoRA only ({type(variant).__name__} needs the dense weight); "
                "train it on the latent model"
            )
        return None

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(PACKED_MERGE_ERROR)

    def unmerge(self) -> None:
        raise ValueError("a packed BitNet layer is never merged, so there is nothing to unmerge")


def is_packed(model: nn.Module) -> bool:
    """Whether ``model`` (or the base model under a ``PeftModel``) holds packed layers."""
    return any(isinstance(module, PackedBitLinear) for module in model.modules())


def _register_layers(config: LoraConfig, model: nn.Module) -> LoraConfig:
    """This package's LoRA layers on ``config`` (a saved adapter config cannot hold them, so loading registers them
    again)."""
    layers = {PackedBitLinear: PackedLoraLinear} if is_packed(model) else {BitLinear: BitLoraLinear}
    config._register_custom_module(layers)
    return config


def lora_config(model: nn.Module, **kwargs: Any) -> LoraConfig:
    """A ``LoraConfig`` (``task_type="CAUSAL_LM"``, ``target_modules="all-linear"`` unless given) with our layers."""
    kwargs.setdefault("task_type", "CAUSAL_LM")
    kwargs.setdefault("target_modules", "all-linear")
    return _register_layers(LoraConfig(**kwargs), model)


def add_lora(model: nn.Module, **kwargs: Any) -> PeftModel:
    """``get_peft_model`` with :func:`lora_config` (``r``, ``lora_alpha``, ``lora_dropout`` … as ``LoraConfig``)."""
    return get_peft_model(model, lora_config(model, **kwargs))


def load_lora(model: nn.Module, adapter_dir: str, is_trainable: bool = False) -> PeftModel:
    """``PeftModel.from_pretrained`` with this package's LoRA layers registered on the saved config."""
    config = _register_layers(LoraConfig.from_pretrained(adapter_dir), model)
    return PeftModel.from_pretrained(model, adapter_dir, config=config, is_trainable=is_trainable)


def merge_lora(peft_model: PeftModel) -> nn.Module:
    """``merge_and_unload`` on a latent base; on a packed base a one-line refusal that names the fix."""
    if is_packed(peft_model.get_base_model()):
        raise ValueError(PACKED_MERGE_ERROR)
    return peft_model.merge_and_unload()

"""2-bit ternary packing: round trip, the transformers ``bitnet`` layout, invalid codes, model weight bytes and the
projection table they are counted from."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnet_a48 import config_from_preset, create_model
from bitnet_a48.packing import pack_ternary, packed_rows, unpack_ternary, validate_packed, weight_bytes
from bitnet_a48.projections import PROJECTION_BY_NAME, PROJECTIONS, is_projection
from bitnet_a48.quantization import ROLES


def _random_codes(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (out_features, in_features), generator=gen, dtype=torch.int8)


@settings(max_examples=60, deadline=None)
@given(out_features=st.integers(1, 23), in_features=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip_exact(out_features: int, in_features: int, seed: int) -> None:
    codes = _random_codes(out_features, in_features, seed)
    packed = pack_ternary(codes)
    assert packed.dtype == torch.uint8
    assert packed.shape == (packed_rows(out_features), in_features) == ((out_features + 3) // 4, in_features)
    unpacked = unpack_ternary(packed, out_features)
    assert unpacked.dtype == torch.int8
    assert torch.equal(unpacked, codes)
    validate_packed(packed, out_features)


def test_layout_output_row_i_times_rows_plus_r_in_bits_2i() -> None:
    # out = 8, so R = 2 packed rows; output row n = i·2 + r sits in bits 2i..2i+1 of packed row r.
    codes = torch.tensor([[-1], [0], [1], [1], [0], [-1], [1], [0]], dtype=torch.int8)
    packed = pack_ternary(codes)
    fields = (codes.flatten() + 1).tolist()  # w + 1
    row0 = fields[0] | fields[2] << 2 | fields[4] << 4 | fields[6] << 6
    row1 = fields[1] | fields[3] << 2 | fields[5] << 4 | fields[7] << 6
    assert packed.flatten().tolist() == [row0, row1]


@pytest.mark.parametrize("out_features", [1, 5, 6, 7, 8, 13, 640])
def test_layout_matches_transformers_bitnet(out_features: int) -> None:
    bitnet = pytest.importorskip("transformers.integrations.bitnet")
    codes = _random_codes(out_features, 11, seed=out_features)
    ours = pack_ternary(codes)
    theirs = bitnet.pack_weights(codes.clone())  # their function adds 1 in place
    assert torch.equal(ours, theirs)
    unpacked = bitnet.unpack_weights(ours, dtype=torch.float32)[:out_features]
    assert torch.equal(unpacked, codes.float())


def test_padding_fields_of_a_short_last_plane_are_zero_and_ignored() -> None:
    codes = _random_codes(5, 4)  # R = 2: planes 0, 1 full, plane 2 holds row 4 only, plane 3 empty
    packed = pack_ternary(codes)
    assert int(((packed[1] >> 4) & 3).max()) == 0 and int((packed >> 6).max()) == 0
    spoiled = packed.clone()
    spoiled[1] |= 0b11 << 4  # code 3 in a padding field (output row 5 does not exist)
    validate_packed(spoiled, 5)
    assert torch.equal(unpack_ternary(spoiled, 5), codes)


def test_invalid_code_three_is_detected_and_named() -> None:
    packed = pack_ternary(_random_codes(9, 6))
    packed[2, 4] |= 0b11 << 2  # output row 1·3 + 2 = 5, column 4
    with pytest.raises(ValueError, match=r"model\.layers\.0\.q_proj\.weight.*code 3.*row 5, input column 4"):
        validate_packed(packed, 9, "model.layers.0.q_proj.weight")


def test_validate_rejects_wrong_dtype_and_shape() -> None:
    packed = pack_ternary(_random_codes(8, 3))
    with pytest.raises(TypeError, match="w: .*uint8"):
        validate_packed(packed.to(torch.int8), 8, "w")
    with pytest.raises(ValueError, match="w: 12 output rows need 3 packed rows"):
        validate_packed(packed, 12, "w")


def test_pack_rejects_non_ternary_codes() -> None:
    with pytest.raises(ValueError, match=r"\{-1, 0, 1\}"):
        pack_ternary(torch.tensor([[2]], dtype=torch.int8))
    with pytest.raises(ValueError, match="2-D"):
        pack_ternary(torch.zeros(4, dtype=torch.int8))


def test_weight_bytes_seven_b_packed_at_least_six_times_smaller_than_bf16() -> None:
    config = config_from_preset("7B")
    latent = weight_bytes(config, "latent")
    packed = weight_bytes(config, "packed")
    # 7B: 32 layers of 4·4096² + 3·4096·11008 projection weights.
    n_proj = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert latent["projections"] == 2 * n_proj
    assert packed["projections"] == n_proj // 4 + 32 * 7 * 4
    assert packed["embeddings"] == latent["embeddings"] == 32000 * 4096 * 2
    assert latent["total"] / packed["total"] >= 6.0


def test_weight_bytes_counts_tied_embeddings_once() -> None:
    config = config_from_preset("2B-4T")
    assert weight_bytes(config, "packed")["lm_head"] == 0
    assert weight_bytes(config_from_preset("7B"), "packed")["lm_head"] == 32000 * 4096 * 2


@pytest.mark.parametrize("weight_format", ["latent", "packed"])
def test_projection_table_matches_the_built_model_and_its_bytes(weight_format: str) -> None:
    # GQA with a head_dim that is not hidden / heads, so q, kv and hidden widths all differ.
    model = create_model(vocab_size=50, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=10, weight_format=weight_format)
    config = model.config
    shape = {name: p.shape(config) for name, p in PROJECTION_BY_NAME.items()}
    assert shape["q_proj"] == (40, 48) and shape["k_proj"] == (20, 48)
    assert shape["o_proj"] == (48, 40) and shape["down_proj"] == (48, 80)
    layer = model.model.layers[1]
    for spec in PROJECTIONS:
        module = layer.get_submodule(spec.path)
        assert spec.role in ROLES and module.role == spec.role, spec.name
        assert (module.out_features, module.in_features) == spec.shape(config), spec.name
    assert len(model.projections()) == len(PROJECTIONS) * config.num_hidden_layers
    # The byte count reads the same table: compare it with the tensors the model holds (fp32 here, 4 bytes).
    counted = weight_bytes(config, weight_format, high_precision_bytes=4)
    held: dict[str, int] = {"projections": 0, "norms": 0}
    for key, tensor in model.state_dict().items():
        kind = "projections" if is_projection(key.rsplit(".", 1)[0]) else "norms" if "norm" in key else None
        if kind is not None:
            held[kind] += tensor.numel() * tensor.element_size()
    assert (counted["projections"], counted["norms"]) == (held["projections"], held["norms"])

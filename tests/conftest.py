import os

# Triton reads this when @triton.jit decorates a kernel: set it before any kernel module is imported, so the
# kernels run on CPU tensors through the interpreter on machines without a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_CONFIG = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


@pytest.fixture
def tiny_config_kwargs() -> dict:
    """Tiny model fields (hidden 64, 2 layers, GQA 4/2) with ids inside the vocabulary; full-precision KV cache."""
    return dict(TINY_CONFIG, kv_cache_bits=None)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def runnable_isas() -> tuple[str, ...]:
    """The native kernels' ISA paths this CPU runs, narrowest first (builds the library on first use)."""
    from bitnet_a48 import kernels_cpu_native as kn

    kn.load_native()
    return kn.ISAS[: kn.ISAS.index(kn.best_cpu_isa()) + 1]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Tests taking `isa` run once per native ISA path the machine has (the library is built only for them).
    if "isa" in metafunc.fixturenames:
        metafunc.parametrize("isa", runnable_isas(), indirect=True)


@pytest.fixture
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """The native kernels forced to one ISA path for the test (restored after)."""
    from bitnet_a48 import kernels_cpu_native as kn

    before = kn.cpu_isa()
    kn.set_cpu_isa(request.param)
    yield request.param
    kn.set_cpu_isa(before)

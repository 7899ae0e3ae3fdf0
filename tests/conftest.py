import pytest
import torch

# The kernel tests run in two lanes: "cpu" runs the very kernels in Triton's interpreter
# (backend="triton" on CPU tensors), "cuda" runs them compiled on a GPU. Without a GPU the
# cuda lane is skipped, with the reason; `python -m sst_triton.selftest` is the one command
# that proves the kernels on a lent GPU.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda", id="cuda",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available(),
            reason="no CUDA GPU here: the native lane needs one (the cpu lane runs the same cases in Triton's "
            "interpreter)",
        ),
    ),
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """The device a kernel test runs on: ``cpu`` (Triton's interpreter) or ``cuda`` (native)."""
    return torch.device(request.param)

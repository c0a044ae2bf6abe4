import pytest
import torch

from dmlib import data


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``):
    the oracle's tensors are tiny, and on a shared 2-core machine two threads per pytest worker ran
    such code 5-10x slower than one. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def mixture():
    """An anisotropic, unequal-weight mixture: harder for the oracle than the toy sets."""
    from dmlib.oracle import GaussianMixture

    covs = torch.tensor(
        [[[0.30, 0.10], [0.10, 0.20]], [[0.05, 0.0], [0.0, 0.40]], [[0.1, -0.05], [-0.05, 0.1]]]
    )
    return GaussianMixture([[-1.5, 0.0], [1.0, 1.0], [0.5, -1.5]], covs, weights=[0.5, 0.3, 0.2])


@pytest.fixture
def eight():
    return data.eight_gaussians()

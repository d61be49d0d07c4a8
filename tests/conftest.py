import pytest
import torch

# Tests use tiny tensors, where thread start-up costs more than it saves; one thread is
# also the fastest and the most repeatable choice on the 2-core CI machines.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

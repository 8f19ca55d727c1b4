"""Shared fixtures. One torch thread: the CI machine has two cores and Ray trials run beside the tests."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits():
    from widthsearch import load_data

    return load_data("digits", val_fraction=0.1, seed=0)

"""Device selection of a training run (the CUDA path itself needs a GPU and is not run here)."""

import pytest
import torch

from dprandp.errors import InputError
from dprandp.pipeline import preset
from dprandp.pipeline.trainer import resolve_device


def test_auto_is_cuda_only_when_available_and_single_process():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("auto", world_size=2).type == "cpu"
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
def test_cuda_refused_without_cuda():
    with pytest.raises(InputError, match="CUDA is not available"):
        resolve_device("cuda")


def test_bad_device_name_refused():
    with pytest.raises(InputError, match="device"):
        preset("demo", device="tpu")

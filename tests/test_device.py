"""Device selection of a training run (the CUDA path itself needs a GPU and is not run here)."""

import pytest
import torch

from dprandp.errors import InputError
from dprandp.pipeline import preset
from dprandp.pipeline.trainer import resolve_device


def test_auto_is_cuda_when_available():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("auto", world_size=2, local_rank=1).type == expected
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("cpu", world_size=2).type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_each_rank_takes_its_local_gpu():
    n = torch.cuda.device_count()
    assert resolve_device("cuda", world_size=2, local_rank=1) == torch.device("cuda", 1 % n)
    with pytest.raises(InputError, match="LOCAL_RANK"):
        resolve_device("cuda:0", world_size=2, local_rank=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
def test_cuda_refused_without_cuda():
    with pytest.raises(InputError, match="CUDA is not available"):
        resolve_device("cuda")


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "cuda:", "gpu:0"])
def test_bad_device_name_refused(name):
    with pytest.raises(InputError, match="device"):
        preset("demo", device=name)
    with pytest.raises(InputError, match="--device must be"):
        resolve_device(name)

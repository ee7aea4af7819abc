"""dptool.features.stream: how a surrogate's failing forward pass is reported."""

from __future__ import annotations

import pytest

from dptool.errors import InputError
from dptool.features import InferenceOptions, stream
from dptool.surrogate import Surrogate


class _AssertsOnSecondBatch:
    """A model that takes its first batch and asserts on the next, as a model checking its input would on a batch
    the probe of the first one did not show (torchvision's ViT: "Wrong image height!")."""

    def __init__(self):
        import torch

        self.calls = 0
        self.fc = torch.nn.Linear(3, 4)

    def __call__(self, x):
        self.calls += 1
        assert self.calls < 2, "Wrong image height!"
        return self.fc(x.mean((2, 3)))


def test_a_models_assertion_in_a_later_batch_is_one_sentence(tiny_beton):
    """An AssertionError raised by the model's forward pass past the first batch is the InputError naming the
    resolution (it escaped stream() as an AssertionError: 'internal error', exit 1, from the CLI)."""
    surrogate = Surrogate(model=_AssertsOnSecondBatch(), identity={"kind": "factory", "factory": "m:make"})
    options = InferenceOptions(res=16, batch_size=8, workers=1)
    batches = stream(surrogate, tiny_beton, range(32), options=options)
    next(batches)  # the first batch passes
    with pytest.raises(InputError, match=r"cannot take 16x16 images from .*tiny\.beton: Wrong image height!"):
        next(batches)

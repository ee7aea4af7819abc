"""Model registry, feature layer, heads and checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from dptool.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from dptool.errors import InputError
from dptool.models import (
    canonical_name,
    create_model,
    feature_dim,
    feature_layer,
    list_models,
    register_model,
    replace_head,
)

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba #167

_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048, "vit_b_16": 768}


@pytest.mark.parametrize("name", list_models())
def test_registry_contract(name):
    """Every registered model builds with the asked head, and its feature layer feeds that head."""
    base, small = canonical_name(name)
    size = 16 if small else 32  # small: the stem keeps full resolution, so a smaller input keeps this quick
    kwargs = {"image_size": 32} if base == "vit_b_16" else {}
    model = create_model(name, 7, **kwargs).eval()
    head = feature_layer(model)
    assert isinstance(head, nn.Linear) and head.out_features == 7
    assert feature_dim(model) == _DIMS.get(base, head.in_features)
    feats = []
    head.register_forward_pre_hook(lambda m, inp: feats.append(inp[0]))
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7) and feats[0].shape == (2, feature_dim(model))


def test_small_input_stem():
    model = create_model("resnet18", 4, small_input=True)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert canonical_name("resnet18_small") == ("resnet18", True)
    assert type(create_model("resnet18_small", 4).maxpool) is nn.Identity


def test_unknown_and_bad_names():
    with pytest.raises(InputError, match="resnet18, resnet18_small"):
        create_model("resnet19", 10)
    with pytest.raises(InputError, match="ResNets only"):
        create_model("vit_b_16", 10, small_input=True)
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet18")(lambda n, **kw: None)


def test_replace_head_keeps_backbone():
    model = create_model("resnet18_small", 10)
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    new = replace_head(model, 3)
    assert feature_layer(model) is new and new.out_features == 3
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    model = create_model("resnet18", 5, small_input=True, blurpool=True)
    path = save_checkpoint(tmp_path / "m.pt", arch="resnet18_small", num_classes=5, state_dict=model.state_dict(),
                           recipe={"lr": 0.5}, data_fingerprint="blake2b:00", epoch=3, blurpool=True)
    assert not list(tmp_path.glob(".*tmp*"))
    loaded, ckpt = load_checkpoint(path, arch="resnet18_small", num_classes=5)
    assert ckpt["arch"] == "resnet18" and ckpt["small_input"] and ckpt["epoch"] == 3 and ckpt["recipe"]["lr"] == 0.5
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded.eval()(x))
    with pytest.raises(InputError, match="holds a resnet18 .small-input stem., not a resnet50"):
        load_checkpoint(path, arch="resnet50")
    with pytest.raises(InputError, match="5-class head, not 10 classes"):
        load_checkpoint(path, num_classes=10)
    wrong = save_checkpoint(tmp_path / "w.pt", arch="resnet34", num_classes=5, state_dict=model.state_dict(),
                            recipe={}, data_fingerprint=None, epoch=1)  # tagged resnet34, holding resnet18 weights
    with pytest.raises(InputError, match=r"w\.pt does not fit a resnet34: \d+ keys missing \(e\.g\. layer1\.2\.[^)]*\)"
                       r", \d+ unexpected keys .*keys of another shape \(e\.g\. conv1\.weight: \(64, 3, 3, 3\) in the "
                       r"file, \(64, 3, 7, 7\) in the model\)\.$"):
        load_checkpoint(wrong)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(InputError, match="not a dptool checkpoint"):
        read_checkpoint(tmp_path / "junk.pt")

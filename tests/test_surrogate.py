"""Surrogate loading (checkpoint, TorchScript, --arch/--weights, --model-factory) and feature hooks; no FFCV."""

from __future__ import annotations

import argparse
import sys
import types

import pytest
import torch
import torch.nn as nn

from dptool.checkpoint import save_checkpoint
from dptool.errors import InputError
from dptool.features import feature_hook
from dptool.models import create_model
from dptool.surrogate import default_resolution, load_surrogate, read_state_dict, weights_fingerprint


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return create_model("resnet18_small", 6).eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 16, 16)


def _same_outputs(a, b, x) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def test_checkpoint(net, x, tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", arch="resnet18_small", num_classes=6, state_dict=net.state_dict(),
                           recipe={"val_res": 64, "mean": [0.5] * 3}, data_fingerprint="blake2b:00", epoch=3)
    s = load_surrogate(model=path)
    _same_outputs(s.model, net, x)
    assert not s.model.training and not any(p.requires_grad for p in s.model.parameters())
    assert s.identity["kind"] == "checkpoint" and s.identity["arch"] == "resnet18" and s.identity["small_input"]
    assert s.identity["data_fingerprint"] == "blake2b:00" and s.identity["sha256"].startswith("sha256:")
    assert default_resolution(s.recipe) == 64 and default_resolution({}, fallback=32) == 32
    assert s.feature_module() is s.model.fc
    with pytest.raises(InputError, match=r"keys of another shape \(e\.g\. conv1\.weight: \(64, 3, 3, 3\) in the "
                       r"file, \(64, 3, 7, 7\) in the model\); .*c\.pt is a dptool checkpoint.*pass it as --model"):
        load_surrogate(arch="resnet18", weights=path)  # the checkpoint's small-input stem does not fit resnet18


def test_equal_weights_have_one_fingerprint_whatever_else_the_checkpoint_holds(net, tmp_path):
    """Two training runs that end with equal weights write checkpoints that differ in bytes (each records its
    epochs' durations): the scores file's `sha256` of the file differs, its `weights` fingerprint does not."""
    paths = []
    for run, seconds in enumerate((1.25, 2.5)):
        paths.append(save_checkpoint(tmp_path / f"run{run}.pt", arch="resnet18_small", num_classes=6,
                                     state_dict=net.state_dict(), recipe={"workers": run + 1},
                                     data_fingerprint="blake2b:00", epoch=1,
                                     extra={"history": [{"epoch": 0, "epoch_time_s": seconds}]}))
    a, b = (load_surrogate(model=p).identity for p in paths)
    assert a["sha256"] != b["sha256"]
    assert a["weights"] == b["weights"] == weights_fingerprint(net)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["fc.bias"][0] += 1e-6  # one weight changed in its last bits: another fingerprint
    other = save_checkpoint(tmp_path / "other.pt", arch="resnet18_small", num_classes=6, state_dict=state,
                            recipe={}, data_fingerprint="blake2b:00", epoch=1)
    assert load_surrogate(model=other).identity["weights"] != a["weights"]
    torch.save(net.state_dict(), tmp_path / "w.pth")  # the same weights given as --arch/--weights
    assert load_surrogate(arch="resnet18_small", weights=tmp_path / "w.pth").identity["weights"] == a["weights"]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript(net, x, tmp_path):
    path = tmp_path / "m.ts"
    torch.jit.script(net).save(str(path))
    s = load_surrogate(model=path)
    assert s.scripted and s.identity["kind"] == "torchscript"
    _same_outputs(s.model, net, x)
    with pytest.raises(InputError, match="TorchScript surrogate takes no forward hooks"):
        s.feature_module()


@pytest.mark.parametrize("layout", ["plain", "nested", "authors", "ddp"])
def test_arch_and_weights(net, x, tmp_path, layout):
    state = net.state_dict()
    obj = {
        "plain": state,
        "nested": {"state_dict": state, "epoch": 3},
        "authors": {"state_dicts": {"network": state}},
        "ddp": {f"module.{k}": v for k, v in state.items()},
    }[layout]
    torch.save(obj, tmp_path / "w.pth")
    s = load_surrogate(arch="resnet18_small", weights=tmp_path / "w.pth")
    _same_outputs(s.model, net, x)
    assert s.identity["num_classes"] == 6 and s.identity["kind"] == "state_dict"


def test_weights_that_do_not_fit(net, tmp_path):
    torch.save(net.state_dict(), tmp_path / "w.pth")
    with pytest.raises(InputError, match=r"do not fit the ResNet model: \d+ keys missing \(e\.g\. layer1\.2\.") as err:
        load_surrogate(arch="resnet34", weights=tmp_path / "w.pth")
    assert "\n" not in str(err.value) and "dptool checkpoint" not in str(err.value)  # one sentence; a bare state dict
    torch.save({"epoch": 1}, tmp_path / "bad.pth")
    with pytest.raises(InputError, match="holds no state dict"):
        read_state_dict(tmp_path / "bad.pth")
    torch.save({"state_dict": net.state_dict(), "config": _Config()}, tmp_path / "config.pth")
    with pytest.raises(InputError, match=r"holds an object of type test_surrogate\._Config, which dptool does not"):
        read_state_dict(tmp_path / "config.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(InputError, match="is not a torch state dict"):
        read_state_dict(tmp_path / "junk.pth")


class _Config:
    """A training script's own object saved beside the weights: the weights-only unpickler refuses it."""


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.fixture
def factory_module(monkeypatch):
    mod = types.ModuleType("tiny_factory")
    mod.make = lambda: _Tiny()
    mod.needs_args = lambda depth: _Tiny()
    mod.not_a_model = lambda: "hello"

    def fails():
        raise RuntimeError("no such layer size")

    mod.fails = fails
    monkeypatch.setitem(sys.modules, "tiny_factory", mod)
    return mod


def test_model_factory(factory_module, x, tmp_path):
    s = load_surrogate(factory="tiny_factory:make", feature_layer="head")
    assert s.identity == {"kind": "factory", "factory": "tiny_factory:make", "arch": "_Tiny",
                          "weights": weights_fingerprint(s.model), "feature_layer": "head"}
    with feature_hook(s.feature_module()) as slot, torch.no_grad():
        s.model(x)
    assert slot[0].shape == (2, 4)
    torch.save(s.model.state_dict(), tmp_path / "t.pth")
    again = load_surrogate(factory="tiny_factory:make", weights=tmp_path / "t.pth")
    _same_outputs(again.model, s.model, x)
    with pytest.raises(InputError, match="Cannot find the classifier.*--feature-layer"):
        again.feature_module()  # no fc / heads.head: the user must name it
    missing = load_surrogate(factory="tiny_factory:make", feature_layer="neck")
    with pytest.raises(InputError, match="'neck' is not a module"):
        missing.feature_module()


def test_model_factory_weights_from_a_self_supervised_checkpoint(factory_module, x, tmp_path):
    """--model-factory --weights finds the backbone in a MoCo-style file as --arch does; --weights-prefix picks the
    other copy."""
    query, key = _Tiny(), _Tiny()
    layout = {f"module.encoder_q.{k}": v for k, v in query.state_dict().items()}
    layout.update({f"module.encoder_k.{k}": v for k, v in key.state_dict().items()})
    layout["queue"] = torch.zeros(4, 16)
    torch.save({"epoch": 200, "state_dict": layout}, tmp_path / "moco.pth.tar")
    s = load_surrogate(factory="tiny_factory:make", weights=tmp_path / "moco.pth.tar")
    _same_outputs(s.model, query, x)
    assert s.identity["weights_prefix"] == "encoder_q." and s.identity["weights"] == weights_fingerprint(query)
    k = load_surrogate(factory="tiny_factory:make", weights=tmp_path / "moco.pth.tar",
                       weights_prefix="module.encoder_k.")
    _same_outputs(k.model, key, x)
    with pytest.raises(InputError, match=r"--weights-prefix goes with --weights \(for --arch or --model-factory\)"):
        load_surrogate(factory="tiny_factory:make", weights_prefix="encoder_k.")


@pytest.mark.parametrize(("spec", "message"), [
    ("tiny_factory", "must look like package.module:function"),
    ("no_such_pkg_xyz:make", "cannot import"),
    ("tiny_factory:nothing", "has no callable"),
    ("tiny_factory:needs_args", "needs arguments"),
    ("tiny_factory:not_a_model", "not a torch.nn.Module"),
    # the user's own code failing was reported as a dptool 'internal error' (exit 1)
    ("tiny_factory:fails", r"--model-factory tiny_factory:fails raised RuntimeError: no such layer size"),
    ("broken_factory_xyz:make", r"cannot import 'broken_factory_xyz' \(ZeroDivisionError: division by zero;"),
])
def test_model_factory_refusals(factory_module, spec, message, tmp_path, monkeypatch):
    (tmp_path / "broken_factory_xyz.py").write_text("1 / 0\n")  # a module that fails as it is imported
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(InputError, match=message):
        load_surrogate(factory=spec)


def test_feature_hook_reads_the_classifier_input(net, x):
    with feature_hook(net.fc) as slot, torch.no_grad():
        logits = net(x)
    torch.testing.assert_close(net.fc(slot[0]), logits)
    assert slot[0].shape == (2, 512) and not net.fc._forward_pre_hooks  # removed on exit


def test_exactly_one_source(net, tmp_path):
    torch.save(net.state_dict(), tmp_path / "w.pth")
    with pytest.raises(InputError, match="got none"):
        load_surrogate()
    with pytest.raises(InputError, match="got --model and --arch"):
        load_surrogate(model=tmp_path / "w.pth", arch="resnet18")
    with pytest.raises(InputError, match="needs --weights"):
        load_surrogate(arch="resnet18")
    with pytest.raises(InputError, match="does not exist"):
        load_surrogate(model=tmp_path / "missing.pt")
    with pytest.raises(InputError, match="not a dptool checkpoint"):
        load_surrogate(model=tmp_path / "w.pth")  # a bare state dict is not a checkpoint


def _under(prefix: str, entries: dict) -> dict:
    return {prefix + k: v for k, v in entries.items()}


def _self_supervised_files(net, folder) -> dict:
    """`net`'s backbone saved in the layouts self-supervised checkpoints are released in (none has a classifier)."""
    backbone = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    width = net.fc.in_features
    torch.manual_seed(1)
    projector = {"fc.0.weight": torch.randn(width, width), "fc.0.bias": torch.zeros(width),
                 "fc.2.weight": torch.randn(128, width), "fc.2.bias": torch.zeros(128)}
    proto = torch.randn(30, width)
    momentum = {k: v + 0.5 if v.is_floating_point() else v for k, v in backbone.items()}  # another network's weights
    layouts = {
        # facebookresearch/moco: the query and momentum encoders under DDP's `module.`, an MLP projector, a queue
        "moco_v2": {"epoch": 200, "arch": "resnet18", "optimizer": {"state": {}, "param_groups": []},
                    "state_dict": {**_under("module.encoder_q.", {**backbone, **projector}),
                                   **_under("module.encoder_k.", {**momentum, **projector}),
                                   "module.queue": torch.randn(128, 64), "module.queue_ptr": torch.zeros(1).long()}},
        # facebookresearch/moco-v3: base and momentum encoders, and a predictor
        "moco_v3": {"state_dict": {**_under("module.base_encoder.", {**backbone, **projector}),
                                   **_under("module.momentum_encoder.", {**momentum, **projector}),
                                   "module.predictor.0.weight": torch.randn(128, 128)}},
        "backbone_only": backbone,  # DINO's and Barlow Twins' released ResNet-50s: torchvision names, no fc
        # a DINO training checkpoint: student and teacher (the one evaluated), each a backbone and a head, and args
        "dino_full": {"student": {**_under("module.backbone.", momentum), "module.head.last_layer.weight": proto},
                      "teacher": {**_under("module.backbone.", backbone), "module.head.last_layer.weight": proto},
                      "args": argparse.Namespace(arch="resnet18", out_dim=30), "epoch": 100},
        # SwAV: DDP's `module.`, a projection head and prototypes beside the backbone
        "swav": {**_under("module.", backbone), "module.projection_head.0.weight": torch.randn(16, width),
                 "module.prototypes.weight": torch.randn(30, 16)},
    }
    paths = {}
    for name, obj in layouts.items():
        paths[name] = folder / f"{name}.pth.tar"
        torch.save(obj, paths[name])
    return paths


def _features(model, feature_module, x):
    with feature_hook(feature_module) as slot, torch.no_grad():
        model(x)
    return slot[0]


def test_self_supervised_checkpoints_give_their_backbone(net, x, tmp_path):
    """MoCo v2/v3, DINO and SwAV layouts: the evaluated encoder's backbone, its features those of the network the
    file was made from, no classifier; all are one surrogate by `weights`."""
    expected = _features(net, net.fc, x)
    fingerprints = set()
    for name, path in _self_supervised_files(net, tmp_path).items():
        s = load_surrogate(arch="resnet18_small", weights=path)
        assert not s.has_classifier and s.identity["num_classes"] is None, name
        assert s.identity.get("weights_prefix") == {"moco_v2": "encoder_q.", "moco_v3": "base_encoder.",
                                                     "dino_full": "backbone."}.get(name)
        torch.testing.assert_close(_features(s.model, s.feature_module(), x), expected, msg=name)
        with torch.no_grad():
            torch.testing.assert_close(s.model(x), expected)  # the head is gone: the output is the feature
        fingerprints.add(s.identity["weights"])
    assert len(fingerprints) == 1
    assert load_surrogate(model=save_checkpoint(tmp_path / "c.pt", arch="resnet18_small", num_classes=6,
                                                state_dict=net.state_dict(), recipe={}, data_fingerprint=None,
                                                epoch=1)).has_classifier


def test_a_file_with_two_unknown_backbones_asks_for_the_prefix(net, x, tmp_path):
    backbone = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    other = {k: v * 2 if v.is_floating_point() else v for k, v in backbone.items()}
    torch.save({**_under("online.", backbone), **_under("target.", other)}, tmp_path / "two.pth")
    with pytest.raises(InputError, match=r"hold 2 copies of the ResNet backbone, under online\., target\.; "
                                         r"choose one with --weights-prefix") as err:
        load_surrogate(arch="resnet18_small", weights=tmp_path / "two.pth")
    assert "\n" not in str(err.value)
    chosen = load_surrogate(arch="resnet18_small", weights=tmp_path / "two.pth", weights_prefix="target")
    reference = create_model("resnet18_small", 6).eval()
    reference.load_state_dict({**other, "fc.weight": net.fc.weight, "fc.bias": net.fc.bias})
    torch.testing.assert_close(_features(chosen.model, chosen.feature_module(), x),
                               _features(reference, reference.fc, x))
    assert chosen.identity["weights_prefix"] == "target."
    with pytest.raises(InputError, match=r"--weights-prefix online_encoder\. matches no entry of weights .*two\.pth; "
                                         r"its entries start with online\., target\."):
        load_surrogate(arch="resnet18_small", weights=tmp_path / "two.pth", weights_prefix="online_encoder.")
    with pytest.raises(InputError, match=r"--weights-prefix goes with --weights \(for --arch or --model-factory\)"):
        load_surrogate(model=tmp_path / "two.pth", weights_prefix="online.")


def test_entries_of_a_deeper_network_are_not_left_out(tmp_path):
    """Only entries under names the model lacks are left out (a projector, prototypes): a ResNet-34's extra blocks
    under layer1..4 are the ResNet-18's modules, so its weights still do not fit a ResNet-18."""
    torch.save(create_model("resnet34_small", 6).state_dict(), tmp_path / "rn34.pth")
    with pytest.raises(InputError, match=r"do not fit the ResNet model: \d+ unexpected keys \(e\.g\. layer1\.2\."):
        load_surrogate(arch="resnet18_small", weights=tmp_path / "rn34.pth")


def test_a_self_supervised_file_of_another_depth_is_told_by_what_differs(net, tmp_path):
    """A MoCo ResNet-18 given to --arch resnet34 (or 50) was refused as '... keys missing (e.g. conv1.weight)',
    although conv1.weight is in the file, under encoder_q.: the closest copy's mismatch is told instead."""
    paths = _self_supervised_files(net, tmp_path)
    for name in ("moco_v2", "moco_v3", "dino_full", "swav"):
        with pytest.raises(InputError, match=r"do not fit the ResNet model: \d+ keys missing \(e\.g\. layer1\.2\."
                           ) as err:
            load_surrogate(arch="resnet34_small", weights=paths[name])
        assert "\n" not in str(err.value), name


def test_a_prefixed_backbone_without_batch_counters_is_found(net, x, tmp_path):
    """Checkpoints saved without BatchNorm's `num_batches_tracked` (converted or trimmed files) load as a plain state
    dict without them does: the backbone under `encoder_q.` is still found, and gives the network's features."""
    backbone = {k: v for k, v in net.state_dict().items()
                if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    other = {k: v + 0.5 for k, v in backbone.items()}
    torch.save({"state_dict": {**_under("module.encoder_q.", backbone), **_under("module.encoder_k.", other)}},
               tmp_path / "moco.pth")
    s = load_surrogate(arch="resnet18_small", weights=tmp_path / "moco.pth")
    assert s.identity["weights_prefix"] == "encoder_q." and not s.has_classifier
    torch.testing.assert_close(_features(s.model, s.feature_module(), x), _features(net, net.fc, x))


def test_the_prefix_can_be_given_as_the_file_writes_it(net, x, tmp_path):
    """MoCo's files name the momentum encoder `module.encoder_k.` (as the README does); the entries are read without
    DDP's `module.`, and --weights-prefix takes either spelling."""
    paths = _self_supervised_files(net, tmp_path)
    chosen = [load_surrogate(arch="resnet18_small", weights=paths["moco_v2"], weights_prefix=p)
              for p in ("module.encoder_k.", "encoder_k", "module.encoder_k")]
    assert {s.identity["weights_prefix"] for s in chosen} == {"encoder_k."}
    assert len({s.identity["weights"] for s in chosen}) == 1
    with pytest.raises(InputError, match=r"its entries start with encoder_k\., encoder_q\., queue, queue_ptr\.$"):
        load_surrogate(arch="resnet18_small", weights=paths["moco_v2"], weights_prefix="module.momentum.")


def test_weights_load_with_a_torch_that_has_no_safe_globals(net, tmp_path, monkeypatch):
    """pyproject admits torch>=2.1, and `torch.serialization.safe_globals` came in 2.5: on an older torch a plain state
    dict still loads, and a file with an argparse.Namespace is refused by name, as any other object is."""
    monkeypatch.delattr(torch.serialization, "safe_globals")
    torch.save(net.state_dict(), tmp_path / "w.pth")
    assert load_surrogate(arch="resnet18_small", weights=tmp_path / "w.pth").has_classifier
    torch.save({"state_dict": net.state_dict(), "args": argparse.Namespace(arch="resnet18")}, tmp_path / "a.pth")
    with pytest.raises(InputError, match=r"holds an object of type argparse\.Namespace, which dptool does not"):
        read_state_dict(tmp_path / "a.pth")

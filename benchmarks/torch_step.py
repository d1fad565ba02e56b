"""PyTorch yardstick: the SimCLR train step of simclr_tf, written out in torch.

The same network as simclr_tf.models (ResNet v1.5 with a projection shortcut
in the first block of every group, CIFAR stem, 2-layer projection head, the
online linear head on detached features), NT-Xent, and a LARS update with
GR's exclusions. No torchvision (it has no CPU build here). Used by
throughput.py through `time_torch`; needs `pip install -r
benchmarks/requirements.txt`.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - torch's usual alias.
from torch import nn

# The models of throughput.MODELS, resolved as simclr_tf resolves them:
# cifar_stem = image_size <= 32, proj_out_dim 128, a 10-class online linear
# head (lineareval_while_pretraining defaults to True).
MODELS = {
    "demo": {"image_size": 28, "channels": 1, "width_multiplier": 0.25},
    "resnet18_cifar": {
        "image_size": 32,
        "channels": 3,
        "width_multiplier": 1.0,
    },
}
PROJ_OUT_DIM = 128
NUM_CLASSES = 10
# Each mode: (autocast to bfloat16, torch.compile, channels_last layout).
MODES = {
    "float32": (False, False, False),
    "float32_channels_last": (False, False, True),
    "bf16": (True, False, False),
    "bf16_channels_last": (True, False, True),
    "compile_float32": (False, True, False),
    "compile_float32_channels_last": (False, True, True),
    "compile_bf16": (True, True, False),
    "compile_bf16_channels_last": (True, True, True),
}
# The step's hyper-parameters, as throughput.py gives simclr_tf: LARS at
# 0.3 x 256/256 (constant here; simclr_tf's schedule is a scalar op).
TEMPERATURE = 0.5
LEARNING_RATE = 0.3
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-6
TRUST_COEFFICIENT = 0.001
BN_MOMENTUM = 0.1  # torch convention: 1 - keras momentum (0.9).
BN_EPSILON = 1e-5


def _batch_norm(channels: int, dims: int, zero_init: bool = False) -> nn.Module:
    layer = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(
        channels, eps=BN_EPSILON, momentum=BN_MOMENTUM
    )
    if zero_init:
        nn.init.zeros_(layer.weight)
    return layer


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int):
    # Symmetric (k-1)/2 padding equals simclr_tf's fixed padding for odd k.
    return nn.Conv2d(
        in_channels, out_channels, kernel, stride, (kernel - 1) // 2, bias=False
    )


class BasicBlock(nn.Module):
    """ResNet v1.5 basic block; projection shortcut when `project`."""

    def __init__(
        self, in_channels: int, filters: int, stride: int, project: bool
    ):
        super().__init__()
        self.conv1 = _conv(in_channels, filters, 3, stride)
        self.bn1 = _batch_norm(filters, 2)
        self.conv2 = _conv(filters, filters, 3, 1)
        self.bn2 = _batch_norm(filters, 2, zero_init=True)
        self.shortcut = nn.Identity()
        if project:
            self.shortcut = nn.Sequential(
                _conv(in_channels, filters, 1, stride), _batch_norm(filters, 2)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class SimCLRNet(nn.Module):
    """ResNet-18 (CIFAR stem) + projection head + online linear head.

    forward maps [B, C, H, W] images to (z [B, 128], logits [B, 10]); the
    linear head reads detached encoder features, as simclr_tf's pretrain
    mode (ft_proj_selector=0) does.
    """

    def __init__(self, channels: int, width_multiplier: float):
        super().__init__()
        widths = [
            round(base * width_multiplier) for base in (64, 128, 256, 512)
        ]
        layers = [_conv(channels, widths[0], 3, 1), _batch_norm(widths[0], 2)]
        layers.append(nn.ReLU())
        in_channels = widths[0]
        for group, filters in enumerate(widths):
            for block in range(2):
                stride = 2 if group > 0 and block == 0 else 1
                layers.append(
                    BasicBlock(in_channels, filters, stride, block == 0)
                )
                in_channels = filters
        self.encoder = nn.Sequential(*layers)
        last_bn = _batch_norm(PROJ_OUT_DIM, 1)
        last_bn.register_parameter(
            "bias", None
        )  # GR: center=False, gamma only.
        self.projection_head = nn.Sequential(
            nn.Linear(in_channels, in_channels, bias=False),
            _batch_norm(in_channels, 1),
            nn.ReLU(),
            nn.Linear(in_channels, PROJ_OUT_DIM, bias=False),
            last_bn,
        )
        self.head_supervised = nn.Linear(in_channels, NUM_CLASSES)

    def forward(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(images).mean((2, 3))
        return self.projection_head(features), self.head_supervised(
            features.detach()
        )


def build_model(model_name: str) -> SimCLRNet:
    """The torch twin of throughput.MODELS[model_name] (train mode)."""
    if model_name not in MODELS:
        raise ValueError(
            f"model_name={model_name!r} is not one of {sorted(MODELS)}; "
            "use e.g. 'demo'."
        )
    spec = MODELS[model_name]
    return SimCLRNet(spec["channels"], spec["width_multiplier"]).train()


def nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float
) -> torch.Tensor:
    """NT-Xent (SimCLR eq. 1) as simclr_tf.losses.nt_xent on one device.

    Args:
        z1: [N, d] float projections of view 1 (computed in float32).
        z2: [N, d] float projections of view 2; row i pairs with z1 row i.
        temperature: tau > 0.

    Returns:
        Scalar float32 mean cross-entropy over the 2N anchors.
    """
    z = F.normalize(torch.cat([z1, z2]).float(), dim=-1)  # [2N, d]
    n = z1.shape[0]
    logits = z @ z.t() / temperature
    logits = logits - 1e9 * torch.eye(2 * n, dtype=logits.dtype)  # [2N, 2N]
    labels = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(logits, labels)


def lars_groups(model: SimCLRNet) -> tuple[list, list]:
    """(adapted, plain) parameters: GR excludes BN, biases and the linear
    head from weight decay and trust-ratio adaptation."""
    adapted, plain = [], []
    batch_norms = {
        id(p)
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        for p in module.parameters()
    }
    for name, parameter in model.named_parameters():
        excluded = (
            id(parameter) in batch_norms
            or name.endswith("bias")
            or name.startswith("head_supervised")
        )
        (plain if excluded else adapted).append(parameter)
    return adapted, plain


@torch.no_grad()
def lars_update(adapted: list, plain: list, velocities: dict) -> None:
    """One LARS step, as simclr_tf.optim.LARS (coupled decay, eta 0.001).

    Args:
        adapted: parameters decayed and trust-ratio scaled (lars_groups).
        plain: parameters updated with momentum SGD only.
        velocities: id(parameter) -> its momentum buffer, updated in place.
    """
    for parameters, adapt in ((adapted, True), (plain, False)):
        for parameter in parameters:
            gradient = parameter.grad
            rate = LEARNING_RATE
            if adapt:
                gradient = gradient + WEIGHT_DECAY * parameter
                weight_norm = torch.linalg.vector_norm(parameter)
                gradient_norm = torch.linalg.vector_norm(gradient)
                trust = torch.where(
                    (weight_norm > 0) & (gradient_norm > 0),
                    TRUST_COEFFICIENT
                    * weight_norm
                    / gradient_norm.clamp(1e-30),
                    torch.ones_like(weight_norm),
                )
                rate = LEARNING_RATE * trust
            velocity = velocities[id(parameter)]
            velocity.mul_(MOMENTUM).add_(rate * gradient)
            parameter.sub_(velocity)


def _make_loss(model: SimCLRNet, use_bf16: bool, compile_: bool):
    head = model.head_supervised

    def loss_fn(x1, x2, labels):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            z, logits = model(torch.cat([x1, x2]))
        z1, z2 = z.float().chunk(2)
        loss = nt_xent(z1, z2, TEMPERATURE)
        loss = loss + F.cross_entropy(logits.float(), torch.cat([labels] * 2))
        # GR / simclr_tf: the linear head's decay is a loss term under LARS.
        return loss + 0.5 * WEIGHT_DECAY * head.weight.square().sum()

    return torch.compile(loss_fn) if compile_ else loss_fn


def time_torch(
    model_name: str, mode: str, batch: int, steps: int, warmup: int
) -> dict[str, object]:
    """Times the torch SimCLR step on fixed random batches.

    Args:
        model_name: a key of MODELS.
        mode: a key of MODES.
        batch: global batch N (images; 2N views), >= 2.
        steps: timed steps, >= 1.
        warmup: untimed steps after the first (compiling) one, >= 0.

    Returns:
        images_per_second (N / p50 step), step_seconds_p50/p90,
        compile_seconds (first step), parameters, threads, loss.

    Raises:
        ValueError: unknown model_name or mode.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {sorted(MODES)}.")
    use_bf16, compile_, channels_last = MODES[mode]
    torch.manual_seed(0)
    torch.set_flush_denormal(True)  # TF (oneDNN) flushes denormals too.
    model = build_model(model_name)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    adapted, plain = lars_groups(model)
    velocities = {id(p): torch.zeros_like(p) for p in adapted + plain}
    loss_fn = _make_loss(model, use_bf16, compile_)
    spec = MODELS[model_name]
    shape = (batch, spec["channels"], spec["image_size"], spec["image_size"])
    generator = torch.Generator().manual_seed(0)
    x1, x2 = (
        torch.rand(shape, generator=generator).contiguous(memory_format=layout)
        for _ in range(2)
    )
    labels = torch.zeros(batch, dtype=torch.int64)
    times = []
    for _ in range(1 + warmup + steps):
        started = time.perf_counter()
        model.zero_grad(set_to_none=True)
        loss = loss_fn(x1, x2, labels)
        loss.backward()
        lars_update(adapted, plain, velocities)
        times.append(time.perf_counter() - started)
    p50, p90 = np.percentile(times[1 + warmup :], [50, 90])
    return {
        "images_per_second": batch / float(p50),
        "step_seconds_p50": float(p50),
        "step_seconds_p90": float(p90),
        "compile_seconds": times[0],
        "parameters": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "loss": float(loss.detach()),
    }

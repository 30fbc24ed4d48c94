"""Train one epoch, evaluate, and run a model on drawings: the loops, on data that lives on the
training device (or streams to it; ``sketchsweep.data.views``).

The whole dataset sits on the device as uint8 ``(N, 784)``; an epoch is a ``randperm`` and a loop
over index slices. Conversion to float and Normalize(0.5, 0.5) happen on the device per batch,
so there is no per-sample Python and no DataLoader. Metrics are summed on the device and read
once per epoch: a ``.item()`` per step would stall a GPU on every batch.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sketchsweep.calibration import reliability
from sketchsweep.cli import UserError
from sketchsweep.data.views import Batch, Rows, Split, StreamingSplit

View = Split | StreamingSplit | Rows


class DeviceError(UserError):
    """A device that cannot be used here (``cuda`` without a GPU)."""


def pick_device(choice: str, key: str = "trainer.device") -> torch.device:
    """``auto``: CUDA when available, else the CPU; ``cuda`` without a GPU is a ``DeviceError`` naming ``key``."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"{key}=cuda: no CUDA device is available (use {key}=auto or cpu)")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def to_input(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 ``(B, 784)`` in [0, 255] -> float ``(B, 1, 28, 28)`` in [-1, 1]:
    ToTensor's /255 then Normalize(mean=0.5, std=0.5), fused into one multiply-add."""
    x = images.view(-1, 1, 28, 28).float().mul_(2.0 / 255.0).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@dataclass
class MixedPrecision:
    """How the forward pass runs (``trainer.precision`` resolved for a device): autocast dtype
    (None: fp32), for fp16 a gradient scaler, and the channels-last layout: what Tensor Cores
    convolve without transposes, and on a CPU (oneDNN) ~1.3x faster to train in fp32 and bf16 alike
    (benchmarks/README.md). BatchNorm and the loss stay fp32 under autocast."""

    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    channels_last: bool = True

    def autocast(self, device: torch.device):
        return torch.autocast(device_type=device.type, dtype=self.dtype, enabled=self.dtype is not None)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: CUDA compute capability 8.0 (Ampere) or newer; a
    CPU with AVX512-BF16 or AMX. torch's is_bf16_supported() also counts slow emulation."""
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(choice: str, device: torch.device) -> MixedPrecision:
    """``auto``: bf16 autocast on CUDA devices with native bf16, fp32 elsewhere (on a CPU fp32 is
    the reference; ``bf16`` is ~2x faster on one with native bf16, and warns on one without)."""
    if choice == "auto":
        choice = "bf16" if device.type == "cuda" and native_bf16(device) else "fp32"
    if choice == "fp32":
        return MixedPrecision()
    if choice == "bf16":
        if device.type == "cpu" and not native_bf16(device):
            warnings.warn(
                "trainer.precision=bf16: this CPU emulates bf16 (no AVX512-BF16 or AMX), so it is "
                "slower than fp32 here",
                stacklevel=2,
            )
        return MixedPrecision(torch.bfloat16)
    if choice == "fp16":  # fp16 gradients underflow without loss scaling
        return MixedPrecision(torch.float16, torch.amp.GradScaler(device.type))
    raise ValueError(f"trainer.precision={choice}: expected auto, fp32, bf16 or fp16")


def prepare_model(model: nn.Module, device: torch.device, precision: MixedPrecision) -> nn.Module:
    """``model`` on ``device`` the way the engine trains it: on CUDA, cuDNN picks its fastest
    kernels (``cudnn.benchmark``: shapes are fixed 28x28, so its search pays once); weights are
    channels-last (``precision.channels_last``). Shared by training, the doctor and the benchmark,
    so they measure one thing."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if precision.channels_last else model


FUSED_OPTIMIZERS = ("torch.optim.Adam", "torch.optim.AdamW")


def optimizer_options(target: str, device: torch.device) -> dict[str, bool]:
    """Extra keyword arguments for the optimizer class ``target`` on ``device``: on CUDA, Adam and
    AdamW run fused (one kernel for the whole update instead of several per parameter tensor)."""
    return {"fused": True} if device.type == "cuda" and target in FUSED_OPTIMIZERS else {}


def random_affine(
    x: torch.Tensor,
    degrees: float = 10.0,
    scale: tuple[float, float] = (0.9, 1.1),
    translate: float = 0.1,
    hflip: bool = False,
) -> torch.Tensor:
    """Augment a normalized batch ``(B, 1, 28, 28)``: each image gets its own random rotation
    (±degrees), scale, shift (± a fraction of the side) and, if asked, a 50% horizontal flip.

    One ``affine_grid`` + ``grid_sample`` for the whole batch on its device: no per-image Python.
    """
    b, dev = x.shape[0], x.device
    angle = (torch.rand(b, device=dev) * 2 - 1) * math.radians(degrees)
    zoom = torch.empty(b, device=dev).uniform_(scale[0], scale[1])
    shift = (torch.rand(b, 2, device=dev) * 2 - 1) * (2 * translate)  # grid coordinates span 2 per side
    flip = torch.where(torch.rand(b, device=dev) < 0.5, -1.0, 1.0) if hflip else torch.ones(b, device=dev)
    # The grid maps output pixels to input pixels, so it holds the inverse transform.
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Shift so the background is 0 while sampling: pixels pulled from outside the image stay background.
    return F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


def mix_batch(
    x: torch.Tensor, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, switch_prob: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup or cutmix of a normalized batch ``(B, 1, H, W)`` with a permutation of itself.

    One share ``lam ~ Beta(alpha, alpha)`` for the batch (drawn from torch's CPU generator, like the
    box, so no device sync; the permutation from the device's); mixup blends
    ``lam * x + (1 - lam) * x[perm]``, cutmix pastes a box covering ``1 - lam`` of each image from
    ``x[perm]`` (``lam`` then is the exact share left). With both
    alphas > 0, cutmix is used with probability ``switch_prob``. Returns the mixed batch, ``perm``
    (the second label of each image is ``y[perm]``) and ``lam`` (the first label's weight).
    """
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or float(torch.rand(())) < switch_prob)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(x.shape[0], device=x.device)
    if not use_cutmix:
        return x.lerp(x[perm], 1.0 - lam), perm, lam
    h, w = x.shape[-2:]
    cut_h, cut_w = round(h * math.sqrt(1 - lam)), round(w * math.sqrt(1 - lam))
    cy, cx = (int(torch.randint(n, ())) for n in (h, w))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + (cut_h + 1) // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + (cut_w + 1) // 2, w)
    mixed = x.clone()
    mixed[..., y0:y1, x0:x1] = x[..., y0:y1, x0:x1][perm]  # only the box is gathered
    return mixed, perm, 1.0 - (y1 - y0) * (x1 - x0) / (h * w)


@dataclass
class Step:
    """What a training step does besides forward, backward and the update (all off by default)."""

    augment: Callable[[torch.Tensor], torch.Tensor] | None = None  # per-image, on the normalized batch
    mix: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, float]] | None = None  # mix_batch, bound
    mix_prob: float = 1.0  # share of batches mixed
    label_smoothing: float = 0.0
    after_update: Callable[[], None] | None = None  # e.g. EMA.update

    def inputs(self, images: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """The batch the model sees, with the permutation and share of a mixed batch (None, 1.0: unmixed)."""
        x = to_input(images, channels_last)
        if self.augment is not None:
            x = self.augment(x)
        if self.mix is not None and (self.mix_prob >= 1 or float(torch.rand(())) < self.mix_prob):
            return self.mix(x)
        return x, None, 1.0

    def loss(self, logits: torch.Tensor, y: torch.Tensor, perm: torch.Tensor | None, lam: float) -> torch.Tensor:
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        if perm is None:
            return loss
        return lam * loss + (1 - lam) * F.cross_entropy(logits, y[perm], label_smoothing=self.label_smoothing)


def train_one_epoch(
    model: nn.Module,
    data: View,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    generator: torch.Generator,
    on_step: Callable[[], None] | None = None,
    step: Step | None = None,
    precision: MixedPrecision | None = None,
) -> dict[str, float]:
    """One pass over ``data`` in the order drawn from ``generator``. Returns loss, accuracy, timing.
    The loss is the training loss (smoothed, mixed); accuracy counts each image's own label."""
    precision = precision or MixedPrecision()
    step = step or Step()
    model.train()
    start = time.perf_counter()
    loss_sum = torch.zeros((), device=data.device)
    correct = torch.zeros((), device=data.device, dtype=torch.long)
    seen = 0
    for images, y in data.batches(batch_size, generator):
        if len(y) < 2:  # BatchNorm cannot train on a batch of one image
            break
        x, perm, lam = step.inputs(images, precision.channels_last)
        with precision.autocast(data.device):
            logits = model(x)
            loss = step.loss(logits, y, perm, lam)
        optimizer.zero_grad(set_to_none=True)
        if precision.scaler is not None:
            precision.scaler.scale(loss).backward()
            precision.scaler.step(optimizer)
            precision.scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if step.after_update is not None:
            step.after_update()
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
        if on_step is not None:
            on_step()
    loss_val = loss_sum.item() / seen  # the one device sync of the epoch
    seconds = time.perf_counter() - start
    return {
        "train_loss": loss_val,
        "train_acc": correct.item() / seen,
        "epoch_seconds": seconds,
        "train_images_per_sec": seen / seconds,
    }


@torch.inference_mode()
def infer(model: nn.Module, batches: Iterable[Batch], precision: MixedPrecision | None = None) -> Iterator[Batch]:
    """``(float32 logits, labels)`` for each ``(uint8 images, labels)`` batch: the model in eval
    mode, under inference mode and ``precision``'s autocast, fed as training feeds it. The one
    inference loop: per-epoch evaluation, the evaluate command, predict and the ONNX parity check."""
    precision = precision or MixedPrecision()
    model.eval()
    for images, labels in batches:
        with precision.autocast(images.device):
            logits = model(to_input(images, precision.channels_last)).float()
        yield logits, labels


@torch.inference_mode()
def all_logits(
    model: nn.Module, data: View, batch_size: int = 1024, precision: MixedPrecision | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, labels)`` of every row of ``data``, in its order, on its device."""
    logits, labels = zip(*infer(model, data.batches(batch_size), precision), strict=True)
    return torch.cat(logits), torch.cat(labels)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    data: View,
    batch_size: int = 1024,
    prefix: str = "val",
    precision: MixedPrecision | None = None,
    temperature: float = 1.0,
) -> dict[str, float]:
    """Loss, top-1 and top-3 accuracy and the expected calibration error (15 bins) of ``model`` on
    ``data``, as ``<prefix>_loss``, ``<prefix>_acc``, ``<prefix>_top3``, ``<prefix>_ece``; the
    loss and ECE of the logits divided by ``temperature`` (a calibrated model's; then also
    ``<prefix>_ece_uncalibrated``, of the logits as they are)."""
    loss_sum = torch.zeros((), device=data.device)
    top1 = torch.zeros((), device=data.device, dtype=torch.long)
    top3 = torch.zeros((), device=data.device, dtype=torch.long)
    confidence, raw, correct = [], [], []  # per image, for the ECE: read once at the end
    for logits, y in infer(model, data.batches(batch_size), precision):
        if temperature != 1.0:
            raw.append(logits.softmax(dim=1).amax(dim=1))
            logits = logits / temperature
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        best = logits.topk(min(3, logits.shape[1]), dim=1).indices
        top1 += (best[:, 0] == y).sum()
        top3 += (best == y[:, None]).any(dim=1).sum()
        confidence.append(logits.softmax(dim=1).amax(dim=1))
        correct.append(best[:, 0] == y)
    n = len(data)
    hits = torch.cat(correct).cpu().numpy()
    out = {
        f"{prefix}_loss": loss_sum.item() / n,
        f"{prefix}_acc": top1.item() / n,
        f"{prefix}_top3": top3.item() / n,
        f"{prefix}_ece": reliability(torch.cat(confidence).cpu().numpy(), hits).ece,
    }
    if raw:
        out[f"{prefix}_ece_uncalibrated"] = reliability(torch.cat(raw).cpu().numpy(), hits).ece
    return out

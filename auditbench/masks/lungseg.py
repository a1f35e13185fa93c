"""Lung segmentation for chest X-rays that come without lung masks.

A small U-Net (Ronneberger, Fischer and Brox 2015, "U-Net: Convolutional Networks for Biomedical
Image Segmentation") trained by the project on the public Shenzhen and Montgomery County
image/mask pairs; its weights ship in ``auditbench/masks/weights``. Quality is measured with the
Dice coefficient (Dice 1945). See ``MODEL_CARD.md`` next to this module.
"""
from __future__ import annotations

import importlib.resources
import json
import math
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from skimage import exposure, measure
from torch import nn

from auditbench.data.io import read_mask, read_xray
from auditbench.registry import Registry

WEIGHTS_PACKAGE = "auditbench.masks"
WEIGHTS_NAME = "weights/lungseg_unet.safetensors"
DEFAULT_CHANNELS = (8, 16, 32, 64, 128)
DEFAULT_IMAGE_SIZE = 128
# CLAHE clip limit (skimage's default): evens out the windowing and contrast of web-scraped
# figures and scanner exports, which vary far more than the two NLM training sets.
CLAHE_CLIP = 0.01
PREDICT_BATCH = 32


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient 2|A∩B| / (|A| + |B|) of two boolean masks (Dice 1945).

    Returns NaN when both masks are empty (the overlap of two empty sets is undefined, and
    averaging it as 1 or 0 would bias a mean); callers average with ``np.nanmean``.
    """
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"dice: shapes differ, {a.shape} vs {b.shape}")
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(a, b).sum()) / total


# ----------------------------------------------------------------------------------------------
# Network


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015) with BatchNorm; ``channels`` per level, last = bottleneck.

    Input (B, 1, S, S) with S divisible by 2**(len(channels) - 1); output logits (B, 1, S, S).
    """

    def __init__(self, channels: Sequence[int] = DEFAULT_CHANNELS):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        self.channels = channels
        self.down = nn.ModuleList()
        c_prev = 1
        for c in channels:
            self.down.append(_conv_block(c_prev, c))
            c_prev = c
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for c_skip, c_deep in zip(reversed(channels[:-1]), reversed(channels[1:])):
            self.up.append(nn.ConvTranspose2d(c_deep, c_skip, 2, stride=2))
            self.dec.append(_conv_block(2 * c_skip, c_skip))
        self.head = nn.Conv2d(channels[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips[:-1])):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.head(x)


# ----------------------------------------------------------------------------------------------
# Preprocessing shared by training and inference


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, C, H, W); anti-aliased when shrinking so large scans do not alias."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def _to_net_size(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W) float [0, 1] -> (size, size) float32, aspect ratio not kept (as in training data)."""
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    return _resize(t, (size, size))[0, 0].clamp_(0.0, 1.0).numpy()


def _normalise(images: np.ndarray) -> np.ndarray:
    """CLAHE then centring, for (N, S, S) net-size images in [0, 1]."""
    out = np.empty_like(images, dtype=np.float32)
    for i, img in enumerate(images):
        out[i] = exposure.equalize_adapthist(np.clip(img, 0.0, 1.0), clip_limit=CLAHE_CLIP)
    return (out - 0.5) / 0.25


def postprocess(mask: np.ndarray) -> np.ndarray:
    """Keep the two largest connected components (two lungs) and fill their holes."""
    labels = measure.label(mask, connectivity=2)
    if labels.max() > 2:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        keep = np.argsort(sizes)[-2:]
        mask = np.isin(labels, keep)
    return ndimage.binary_fill_holes(mask)


# ----------------------------------------------------------------------------------------------
# Inference


class WeightsError(RuntimeError):
    """Lung segmentation weights are missing or unreadable; the message names the file."""


def shipped_weights():
    """The packaged weights file (an importlib.resources Traversable)."""
    return importlib.resources.files(WEIGHTS_PACKAGE).joinpath(WEIGHTS_NAME)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Segmenter(Protocol):
    name: str

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]: ...


class LungSegmenter:
    """The project's U-Net lung segmenter; ``predict`` returns masks at each image's own size."""

    name = "auditbench-unet"

    def __init__(self, model: UNet, image_size: int, metadata: dict | None = None, device=None):
        self.device = torch.device(device) if device is not None else _default_device()
        self.model = model.to(self.device).eval()
        self.image_size = int(image_size)
        self.metadata = dict(metadata or {})

    @classmethod
    def load(cls, path: Path | str | None = None, device=None) -> "LungSegmenter":
        """Load safetensors weights; ``None`` loads the weights shipped with the package."""
        if path is None:
            with importlib.resources.as_file(shipped_weights()) as p:
                return cls._load_file(Path(p), device)
        return cls._load_file(Path(path), device)

    @classmethod
    def _load_file(cls, path: Path, device) -> "LungSegmenter":
        from safetensors import safe_open

        if not path.is_file():
            raise WeightsError(
                f"lung segmentation weights not found: {path} (retrain with "
                "`auditbench masks train --pairs DIR --out FILE`)"
            )
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
            config = json.loads(meta["config"])
            model = UNet(config["channels"])
            state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
            model.load_state_dict(state)
        except Exception as exc:  # safetensors, json and torch each raise their own types
            raise WeightsError(f"cannot load lung segmentation weights {path}: {exc}") from exc
        return cls(model, config["image_size"], config, device)

    @torch.no_grad()
    def predict_proba(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Lung probabilities (float32, each image's own (H, W)), bilinearly resized back."""
        out: list[np.ndarray] = []
        s = self.image_size
        for start in range(0, len(images), PREDICT_BATCH):
            chunk = images[start : start + PREDICT_BATCH]
            for img in chunk:
                if np.ndim(img) != 2:
                    raise ValueError(f"predict expects (H, W) greyscale images, got {np.shape(img)}")
            x = _normalise(np.stack([_to_net_size(img, s) for img in chunk]))
            prob = torch.sigmoid(self.model(torch.from_numpy(x)[:, None].to(self.device)))
            for img, p in zip(chunk, prob):
                up = F.interpolate(p[None], size=img.shape, mode="bilinear", align_corners=False)
                out.append(up[0, 0].float().cpu().numpy())
        return out

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Boolean lung masks (H, W) for float [0, 1] greyscale images (H, W) of any size."""
        return [postprocess(p >= 0.5) for p in self.predict_proba(images)]


class TorchXRayVisionSegmenter:
    """torchxrayvision's PSPNet lung segmentation (chestx_det), left and right lung merged."""

    name = "torchxrayvision"
    LUNGS = ("Left Lung", "Right Lung")

    def __init__(self, device=None):
        try:
            import torchxrayvision as xrv
        except ImportError as exc:
            raise RuntimeError(
                "masks.model 'torchxrayvision' needs the torchxrayvision package: pip install "
                "torchxrayvision and make its weights available offline (they are downloaded to "
                "~/.torchxrayvision on first use), or use masks.model 'auditbench-unet'"
            ) from exc
        # Without internet the weight download would wait on the network; fail within seconds.
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(10)
        try:
            model = xrv.baseline_models.chestx_det.PSPNet()
        except Exception as exc:  # download and unpickling errors vary by version and platform
            raise RuntimeError(
                f"torchxrayvision is installed but its lung segmentation weights could not be "
                f"had ({type(exc).__name__}: {exc}); make them available offline in "
                "~/.torchxrayvision or use masks.model 'auditbench-unet'"
            ) from exc
        finally:
            socket.setdefaulttimeout(previous)
        self.device = torch.device(device) if device is not None else _default_device()
        self.model = model.to(self.device).eval()
        self.channels = [model.targets.index(t) for t in self.LUNGS]

    @torch.no_grad()
    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        out = []
        for img in images:
            # torchxrayvision expects [-1024, 1024] at 512x512
            x = torch.from_numpy(_to_net_size(img, 512) * 2048.0 - 1024.0)[None, None]
            logits = self.model(x.to(self.device))[0, self.channels]
            prob = torch.sigmoid(logits).max(dim=0).values
            up = F.interpolate(prob[None, None], size=img.shape, mode="bilinear", align_corners=False)
            out.append(postprocess(up[0, 0].cpu().numpy() >= 0.5))
        return out


# name -> a function that builds the segmenter; the registry stores the decorated function itself.
SEGMENTERS: Registry[Callable[[], Segmenter]] = Registry("lung segmentation model")


@SEGMENTERS.register("auditbench-unet")
def auditbench_unet() -> Segmenter:
    """The project's U-Net with the weights shipped in the package."""
    return LungSegmenter.load()


@SEGMENTERS.register("torchxrayvision")
def torchxrayvision_pspnet() -> Segmenter:
    """torchxrayvision's PSPNet (needs the package and its weights offline)."""
    return TorchXRayVisionSegmenter()


def build_segmenter(name: str = "auditbench-unet") -> Segmenter:
    """The lung segmenter registered as ``name`` (``masks.model`` in a protocol)."""
    return SEGMENTERS.get(name)()


# ----------------------------------------------------------------------------------------------
# Data and evaluation


def read_grey(path: Path) -> np.ndarray:
    """An X-ray file -> float32 greyscale [0, 1] (H, W) at its full size: :func:`auditbench.data.io.read_xray`,
    the reader of every data set, so the U-Net is trained and evaluated on what the pipeline gives it
    (PIL formats and DICOM; EXIF orientation applied, RGB as luminance, transparency on black, 16-bit
    by the file's bit depth). Raises :class:`auditbench.data.io.ImageReadError` naming the file."""
    return read_xray(path, max_side=None)


def pair_names(pairs_dir: Path) -> list[str]:
    """Sorted file names present in both ``cxr/`` and ``masks/``."""
    pairs_dir = Path(pairs_dir)
    cxr, masks = pairs_dir / "cxr", pairs_dir / "masks"
    if not cxr.is_dir() or not masks.is_dir():
        raise FileNotFoundError(f"{pairs_dir}: expected folders cxr/ and masks/ with paired PNGs")
    names = sorted({p.name for p in cxr.glob("*.png")} & {p.name for p in masks.glob("*.png")})
    if not names:
        raise FileNotFoundError(f"{pairs_dir}: no file name present in both cxr/ and masks/")
    return names


def split_pairs(
    names: Sequence[str], val_fraction: float = 0.15, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Deterministic split by image: sort names, permute with ``numpy.random.default_rng(seed)``,
    the first ``round(val_fraction * n)`` are validation. Returns (train, val), each sorted."""
    names = sorted(names)
    order = np.random.default_rng(seed).permutation(len(names))
    n_val = int(round(val_fraction * len(names)))
    val = sorted(names[i] for i in order[:n_val])
    train = sorted(names[i] for i in order[n_val:])
    return train, val


def _load_pairs(pairs_dir: Path, names: Sequence[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Images by :func:`read_grey`, masks by the data sets' mask reader at their image's shape
    (:func:`auditbench.data.io.read_mask`: 0/255 or 0/1, the image's aspect ratio)."""
    images = [read_grey(pairs_dir / "cxr" / n) for n in names]
    masks = [read_mask(pairs_dir / "masks" / n, image.shape) for n, image in zip(names, images)]
    return images, masks


def evaluate_on_pairs(segmenter: Segmenter, pairs_dir: Path, names: Sequence[str]) -> float:
    """Mean Dice of ``segmenter`` on the named pairs, at the pairs' own resolution."""
    images, masks = _load_pairs(Path(pairs_dir), names)
    preds = segmenter.predict(images)
    return float(np.nanmean([dice(p, m) for p, m in zip(preds, masks)]))


def v7_dice_scores(segmenter: Segmenter, ieee_root: Path) -> dict[str, float]:
    """Dice per image against the V7 Labs human lung masks (value 255) of an ieee8023 clone.

    Masks without any lung pixel (lateral views, which V7 left unannotated) are skipped: their
    Dice is 0 or undefined and says nothing about lung segmentation of frontal views.
    """
    ieee_root = Path(ieee_root)
    mask_dir = ieee_root / "annotations" / "v7labs-masks"
    images = {p.stem: p for p in (ieee_root / "images").iterdir() if p.is_file()}
    scores: dict[str, float] = {}
    for mask_path in sorted(mask_dir.glob("*.png")):
        if mask_path.stem not in images:
            continue
        truth = np.asarray(Image.open(mask_path).convert("L")) == 255
        if not truth.any():
            continue
        image = read_grey(images[mask_path.stem])
        if image.shape != truth.shape:
            raise ValueError(f"{mask_path}: mask shape {truth.shape} differs from image {image.shape}")
        scores[mask_path.stem] = dice(segmenter.predict([image])[0], truth)
    if not scores:
        raise FileNotFoundError(f"{mask_dir}: no V7 lung mask with a matching image")
    return scores


def evaluate_on_v7(segmenter: Segmenter, ieee_root: Path) -> float:
    """Mean Dice against the V7 human lung masks (see ``v7_dice_scores``)."""
    return float(np.nanmean(list(v7_dice_scores(segmenter, ieee_root).values())))


# ----------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainReport:
    """Outcome of ``train_lung_segmenter``; ``dice_val`` is the mean held-out Dice."""

    dice_val: float
    epochs: int
    image_size: int
    seed: int
    n_train: int
    n_val: int
    n_params: int
    seconds: float
    out_file: str
    val_names: list[str] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)


def _augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random small affine (rotation +-10 deg, scale 0.9-1.1, shift +-8%) applied to image and
    mask alike, then gamma 0.7-1.4 and contrast 0.8-1.2 on the image; no flips (the heart and
    the lungs' shapes are left-right asymmetric, and mirrored PA films do not occur)."""
    b = x.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=gen)

    angle = uniform(-10, 10) * math.pi / 180
    scale = uniform(0.9, 1.1)
    tx, ty = uniform(-0.08, 0.08), uniform(-0.08, 0.08)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = (F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False) >= 0.5).float()
    gamma = torch.exp(uniform(math.log(0.7), math.log(1.4)))[:, None, None, None]
    x = x.clamp(0, 1) ** gamma
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * uniform(0.8, 1.2)[:, None, None, None] + mean).clamp(0, 1)
    return x, y


def _dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum(dim=(1, 2, 3))
    soft_dice = (2 * inter + 1) / (prob.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + (1 - soft_dice).mean()


def train_lung_segmenter(
    pairs_dir: Path,
    out_file: Path,
    epochs: int = 18,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    val_fraction: float = 0.15,
    progress: bool = True,
    batch_size: int = 16,
    lr: float = 2e-3,
    channels: Sequence[int] = DEFAULT_CHANNELS,
) -> TrainReport:
    """Train the U-Net on ``pairs_dir`` (``cxr/X.png`` + ``masks/X.png``) and save safetensors.

    Split by image with ``split_pairs(names, val_fraction, seed)``; Adam with cosine learning
    rate decay, Dice + BCE loss, fixed epochs (no early stopping, so the validation Dice is not
    selected on). Weights are stored as float16, with the config and the split rule in the
    safetensors metadata; ``dice_val`` is measured with those float16 weights.
    """
    from safetensors.torch import save_file

    t0 = time.time()
    pairs_dir, out_file = Path(pairs_dir), Path(out_file)
    if image_size % 2 ** (len(channels) - 1):
        raise ValueError(f"image_size {image_size} must be divisible by {2 ** (len(channels) - 1)}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train_names, val_names = split_pairs(pair_names(pairs_dir), val_fraction, seed)
    if not train_names:
        raise ValueError(f"{pairs_dir}: no training pairs left after the validation split")
    images, masks = _load_pairs(pairs_dir, train_names)
    x_all = torch.from_numpy(np.stack([_to_net_size(im, image_size) for im in images]))[:, None]
    y_all = np.stack([_to_net_size(m.astype(np.float32), image_size) for m in masks])
    y_all = torch.from_numpy(y_all >= 0.5).float()[:, None]

    model = UNet(channels)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(train_names) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    history = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_names), generator=gen)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            x, y = _augment(x_all[idx], y_all[idx], gen)
            x = torch.from_numpy(_normalise(x[:, 0].numpy()))[:, None]
            loss = _dice_bce_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        seconds = round(time.time() - t0, 1)
        history.append({"epoch": epoch + 1, "loss": total / len(order), "seconds": seconds})
        if progress:
            print(f"epoch {epoch + 1}/{epochs} loss {total / len(order):.4f} ({seconds} s)", flush=True)

    config = {
        "architecture": "unet",
        "channels": list(model.channels),
        "image_size": image_size,
        "preprocessing": f"bilinear antialiased resize to image_size, CLAHE clip {CLAHE_CLIP}, (x-0.5)/0.25",
        "seed": seed,
        "val_fraction": val_fraction,
        "split_rule": "sorted names, numpy default_rng(seed).permutation, "
        "first round(val_fraction*n) = validation",
        "n_train": len(train_names),
        "n_val": len(val_names),
        "epochs": epochs,
    }
    # Evaluate the float16-rounded weights, i.e. exactly what is shipped.
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    segmenter = LungSegmenter(model, image_size, config, device="cpu")
    dice_val = evaluate_on_pairs(segmenter, pairs_dir, val_names) if val_names else float("nan")
    config["dice_val"] = round(dice_val, 4)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_file), metadata={"config": json.dumps(config)})
    report = TrainReport(
        dice_val=dice_val,
        epochs=epochs,
        image_size=image_size,
        seed=seed,
        n_train=len(train_names),
        n_val=len(val_names),
        n_params=n_params,
        seconds=time.time() - t0,
        out_file=str(out_file),
        val_names=val_names,
        history=history,
    )
    if progress:
        summary = {k: v for k, v in asdict(report).items() if k not in ("val_names", "history")}
        print(json.dumps(summary), flush=True)
    return report

"""Feature extractors for Frechet distances between image sets (docs/method.md, Metrics).

* :class:`FashionFeatureNet`: a small CNN classifier this project trains on the
  embedded teacher's dataset (Fashion-MNIST at 16x16 in [-1, 1]; recipe in
  ``examples/train_feature_classifier.py``).  Its weights ship in
  ``assets/fashion16_classifier/`` with its test accuracy and the feature
  statistics of the real test images, so a Frechet distance to real images
  needs neither the dataset nor a download.
* :func:`load_inception`: a local TorchScript Inception-v3 feature extractor in
  the format StyleGAN3 and clean-fid use (``inception-2015-12-05.pt``), for a
  real FID.  Nothing is downloaded.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch
from torch import nn
from .errors import InputError, TTFMError

CLASSIFIER_DIR = Path(__file__).resolve().parent / "assets" / "fashion16_classifier"
#: what the classifier reads: one 16x16 grey image in [-1, 1]
CLASSIFIER_IMAGE_SHAPE = (1, 16, 16)
INCEPTION_FILE_NAME = "inception-2015-12-05.pt"


class FashionFeatureNet(nn.Module):
    """Two 3x3 conv blocks and a 64-wide hidden layer; ``(B, 1, 16, 16)`` in [-1, 1] -> 10 logits.

    :meth:`features` is the hidden layer before its ReLU, ``(B, feature_dim)``
    (pre-activations are closer to Gaussian than the rectified values, and the
    Frechet distance fits a Gaussian).
    """

    def __init__(self, width: int = 32, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim, "num_classes": num_classes}
        self.conv = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.hidden = nn.Linear(2 * width * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.conv(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.features(x)))


class FeatureClassifier:
    """The shipped classifier, its card (accuracy, recipe) and the real test images' feature statistics."""

    def __init__(self, net: FashionFeatureNet, card: dict, test_mu: torch.Tensor, test_sigma: torch.Tensor):
        self.net, self.card = net.eval().requires_grad_(False), card
        self.test_mu, self.test_sigma = test_mu, test_sigma

    @property
    def image_shape(self) -> tuple[int, ...]:
        return CLASSIFIER_IMAGE_SHAPE

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """``(N, 1, 16, 16)`` images in [-1, 1] (clamped here) -> ``(N, F)`` float64 features."""
        if tuple(images.shape[1:]) != CLASSIFIER_IMAGE_SHAPE:
            raise InputError(f"the feature classifier reads {CLASSIFIER_IMAGE_SHAPE} images, got {tuple(images.shape[1:])}")
        out = [self.net.features(c.float().clamp(-1, 1)).double() for c in images.cpu().split(batch_size)]
        return torch.cat(out)

    def describe(self, teacher_source: str) -> dict:
        """What an evaluation report says of this classifier and its real images."""
        info = {"file": "ttfm_distill/assets/fashion16_classifier/model.safetensors",
                "test_accuracy": self.card["test_accuracy"], "feature_dim": self.card["config"]["feature_dim"],
                "real_images": "Fashion-MNIST test split, 10k images and their 10k mirror images (16x16, [-1, 1])",
                "recipe": self.card["recipe"]}
        if teacher_source != "builtin:fashion16":
            info["note"] = ("the teacher is not the embedded Fashion-MNIST teacher; fd_test_images still compares "
                            "with Fashion-MNIST")
        return info

    @torch.no_grad()
    def logits(self, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """``(N, 1, 16, 16)`` images in [-1, 1] (clamped here) -> ``(N, classes)`` class logits."""
        return torch.cat([self.net(c.float().clamp(-1, 1)) for c in images.cpu().split(batch_size)])


def load_feature_classifier(folder: str | Path = CLASSIFIER_DIR) -> FeatureClassifier:
    """Load the shipped classifier strictly (``model.safetensors`` + ``card.json``)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    card = json.loads((folder / "card.json").read_text())
    tensors = load_file(folder / "model.safetensors")
    net = FashionFeatureNet(**card["config"])
    net.load_state_dict({k[len("net."):]: v for k, v in tensors.items() if k.startswith("net.")}, strict=True)
    return FeatureClassifier(net, card, tensors["stats.test_mu"].double(), tensors["stats.test_sigma"].double())


def mirrored(images: torch.Tensor) -> torch.Tensor:
    """``images`` followed by their left-right mirror images (the embedded teacher learnt flipped data)."""
    return torch.cat([images, images.flip(-1)])


# ------------------------------------------------------------ Inception ------
class InceptionFormatError(TTFMError, ValueError):
    """The ``--inception`` file is not a TorchScript Inception feature extractor."""


def _format_hint(path: Path) -> str:
    return (f"--inception {path} is not a TorchScript Inception feature extractor; pass the "
            f"{INCEPTION_FILE_NAME} file that StyleGAN3/clean-fid use (a .pkl or plain state dict is not accepted)")


def load_inception(path: str | Path):
    """Load a TorchScript Inception-v3 feature extractor (``inception-2015-12-05.pt``).

    Only a TorchScript archive is read (``torch.jit.load``): a zip file with
    ``constants.pkl``.  Pickles, ``torch.save`` state dicts and TensorFlow
    graphs are refused with :class:`InceptionFormatError`.  The module is
    called as ``model(images_uint8, return_features=True)`` with
    ``(B, 3, H, W)`` uint8 images (it resizes to 299 inside), as StyleGAN3
    calls it, and must return ``(B, F)`` features.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InceptionFormatError(f"--inception {path} does not exist (or is not a file)")
    if not zipfile.is_zipfile(path):
        raise InceptionFormatError(_format_hint(path))
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    if not any(n.endswith("/constants.pkl") for n in names) or not any("/code/" in n for n in names):
        raise InceptionFormatError(_format_hint(path))
    try:
        model = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # torch raises RuntimeError and friends for damaged archives
        raise InceptionFormatError(f"{_format_hint(path)} ({type(e).__name__})") from None
    return model.eval()


def to_inception_input(images: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` in [-1, 1] -> ``(B, 3, H, W)`` uint8, grey repeated to RGB (StyleGAN3's convention)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if x.shape[1] != 3:
        raise InputError(f"Inception features need 1- or 3-channel images, got {x.shape[1]} channels")
    return x


@torch.no_grad()
def inception_features(model, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """``(N, C, H, W)`` images in [-1, 1] -> ``(N, F)`` float64 features of ``model``."""
    out = []
    for chunk in images.cpu().split(batch_size):
        feats = model(to_inception_input(chunk), return_features=True)
        if not torch.is_tensor(feats) or feats.dim() != 2 or feats.shape[0] != chunk.shape[0]:
            shape = tuple(feats.shape) if torch.is_tensor(feats) else type(feats).__name__
            raise InceptionFormatError(f"the --inception module returned {shape} for {chunk.shape[0]} images; "
                                       "expected (batch, features)")
        out.append(feats.double())
    return torch.cat(out)


def real_fashion_images(split: str, num: int, seed: int, shape: tuple):
    """``num`` random Fashion-MNIST images of ``split`` at 16x16 in [-1, 1], each mirrored with probability 1/2
    (a generator seeded with ``seed``), or a one-line reason string when ``shape`` is not theirs or the
    dataset is not installed."""
    from .data.fashion_mnist import DatasetUnavailable, load_fashion_mnist

    if tuple(shape) != CLASSIFIER_IMAGE_SHAPE:
        return f"real images exist here only for 1x16x16 Fashion-MNIST; this teacher makes {'x'.join(map(str, shape))}"
    try:
        images, _ = load_fashion_mnist(split, resolution=16)
    except DatasetUnavailable as e:
        return str(e)
    g = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(images)
    x = x[torch.randperm(len(x), generator=g)[:num]]
    return torch.where(torch.rand(len(x), 1, 1, 1, generator=g) < 0.5, x, x.flip(-1))

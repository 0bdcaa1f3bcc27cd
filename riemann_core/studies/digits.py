"""scikit-learn's handwritten digits as tensors, and the two networks the studies train.

The 1,797 8x8 images ship with scikit-learn (no download). A split is stratified and
deterministic given its seed; features are standardised with the statistics of the
examples a model trains on, so nothing leaks from validation or test data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

MODELS = ("mlp", "cnn")


@dataclass(frozen=True)
class Examples:
    """Inputs ``(N, 64)`` (pixels, flattened) and integer labels ``(N,)`` on one device."""

    inputs: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return len(self.targets)


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Pixels ``(1797, 64)`` as float64 and labels ``(1797,)``; needs scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise SystemExit(
            f"the digits studies need scikit-learn ({err}); install it with: "
            'python -m pip install -c constraints.txt -e ".[bench]"'
        ) from err
    features, labels = load_digits(return_X_y=True)
    return features.astype(np.float64), labels.astype(np.int64)


def stratified_split(
    labels: np.ndarray, fractions: tuple[float, ...], seed: int
) -> list[np.ndarray]:
    """Index arrays, one per fraction plus the remainder last, each class split alike."""
    if any(f <= 0 for f in fractions) or sum(fractions) >= 1:
        raise ValueError(f"fractions must be positive and sum to less than 1, got {fractions}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        cuts = np.round(np.cumsum(fractions) * rows.size).astype(int)
        for part, chunk in zip(parts, np.split(rows, cuts)):
            part.append(chunk)
    return [rng.permutation(np.concatenate(p)) for p in parts]


def standardiser(features: np.ndarray):
    """``x -> (x - mean) / std`` with the statistics of ``features`` (constant pixels kept 0)."""
    mean, std = features.mean(axis=0), features.std(axis=0)
    std = np.where(std > 0, std, 1.0)  # border pixels are 0 in every image
    return lambda x: (x - mean) / std


def to_examples(
    features: np.ndarray, labels: np.ndarray, device: torch.device, dtype: torch.dtype
) -> Examples:
    return Examples(
        torch.as_tensor(features, dtype=dtype, device=device),
        torch.as_tensor(labels, dtype=torch.long, device=device),
    )


def build_model(name: str, seed: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``mlp``: 64-64-10, tanh (4,810 parameters). ``cnn``: two 3x3 convolutions (8 and 16
    channels, the second with stride 2), tanh, and a linear read-out (3,818 parameters).

    Initialised on the CPU in float32 from ``seed`` (without touching the global generator),
    then cast to ``dtype``, so a seed gives the same network on every device and whatever
    ``torch.get_default_dtype()`` is (a float64 default drew other weights: found by an
    audit that re-ran a stability pair from a script that had set it).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    drawn = {"dtype": torch.float32}  # the dtype the committed studies' weights were drawn in
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "mlp":
            model = nn.Sequential(nn.Linear(64, 64, **drawn), nn.Tanh(), nn.Linear(64, 10, **drawn))
        else:
            model = nn.Sequential(
                nn.Unflatten(1, (1, 8, 8)),
                nn.Conv2d(1, 8, 3, padding=1, **drawn),
                nn.Tanh(),
                nn.Conv2d(8, 16, 3, stride=2, padding=1, **drawn),
                nn.Tanh(),
                nn.Flatten(),
                nn.Linear(16 * 4 * 4, 10, **drawn),
            )
    return model.to(device=device, dtype=dtype)

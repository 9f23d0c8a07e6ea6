"""k-means as fairseq's learn_kmeans.py fits it (scikit-learn's MiniBatchKMeans), nearest centroids, the fit
sample, and a saved fit (kmeans.pt) read back as data."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from nest.errors import FeatureError
from nest.io.torch_file import safe_torch_load
from nest.kmeans.features import FeatureRecipe


@dataclass
class KMeansOptions:
    """MiniBatchKMeans parameters; the defaults are fairseq's learn_kmeans.py (tests make them small)."""

    max_iter: int = 100
    batch_size: int = 10000
    tol: float = 0.0
    max_no_improvement: int = 100
    n_init: int = 20
    reassignment_ratio: float = 0.0


def fit_kmeans(x: np.ndarray, n_clusters: int, seed: int, options: KMeansOptions = KMeansOptions(),
               threads: Optional[int] = None) -> tuple[np.ndarray, dict]:
    """Centroids (K, D) float32 of ``x`` (N, D) by k-means++ initialised mini-batch k-means, and how
    long it ran (mini-batch steps, passes over the data). ``threads`` caps scikit-learn's OpenMP and
    BLAS threads (None: all cores): on a shared machine, spinning surplus threads cost more than they give."""
    from sklearn.cluster import MiniBatchKMeans
    from threadpoolctl import threadpool_limits

    if len(x) < n_clusters:
        raise FeatureError(f"--clusters {n_clusters} needs at least {n_clusters} sampled frames but the sample has "
                           f"{len(x)}: raise --sample-fraction or use fewer clusters")
    km = MiniBatchKMeans(n_clusters=n_clusters, init="k-means++", init_size=None, compute_labels=False,
                         random_state=seed, **asdict(options))
    with threadpool_limits(threads):
        km.fit(x)
    return km.cluster_centers_.astype(np.float32), {"steps": int(km.n_steps_), "passes": float(km.n_iter_)}


def assign(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each frame: labels (N,) int64 and squared distances (N,)."""
    x, c = x.float(), centroids.float()
    d = (c * c).sum(1)[None] - 2 * x @ c.T  # (N, K); |x|^2 does not change the argmin
    d_min, labels = d.min(1)
    return labels, (d_min + (x * x).sum(1)).clamp_min(0.0)


def mean_inertia(x: np.ndarray, centroids: torch.Tensor, chunk: int = 65536) -> float:
    """Mean squared distance of the frames ``x`` (N, D) to their nearest centroid, in chunks of frames."""
    total = sum(float(assign(torch.from_numpy(x[i: i + chunk]), centroids)[1].double().sum())
                for i in range(0, len(x), chunk))
    return total / max(len(x), 1)


def load_kmeans(path: str | Path) -> tuple[torch.Tensor, FeatureRecipe, dict]:
    """Centroids (K, D), feature recipe and fit information of a kmeans.pt (loaded as data)."""
    path = Path(path)
    if not path.is_file():
        raise FeatureError(f"--model {path}: no such file; it is the kmeans.pt of an earlier fit")
    d = safe_torch_load(path, str(path))
    if not isinstance(d, dict) or "centroids" not in d or "recipe" not in d:
        raise FeatureError(f"--model {path}: not a kmeans.pt of nest.kmeans (no centroids/recipe)")
    return d["centroids"].float(), FeatureRecipe(**d["recipe"]), d.get("fit", {})

"""HuBERT-style k-means targets: fit k-means on a seeded sample of the cuts' frames, label every cut.

  python prepare.py kmeans CUTS OUT_DIR --features mfcc --clusters 100 [--sample-fraction 0.1] [--jobs N]
  python prepare.py kmeans CUTS OUT_DIR --features encoder --checkpoint CKPT --layer 6 --clusters 500
  python prepare.py kmeans CUTS OUT_DIR --model kmeans.pt      # label new cuts with an existing fit
(also ``python -m nest.kmeans ...`` with the same arguments)

OUT_DIR gets ``cuts.jsonl.gz`` (each cut carries its labels as a TemporalArray ``targets`` of shape
(T', R) in ``targets-<time>.h5``, and ``targets_num_classes``), ``kmeans.pt`` (centroids and the feature recipe),
``summary.json`` and ``rejected.jsonl``. Features and label layout: nest/kmeans_features.py. The fit is
fairseq's learn_kmeans.py: scikit-learn's MiniBatchKMeans with its parameters.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
import urllib.parse
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from lhotse import CutSet
from lhotse.features.io import NumpyHdf5Writer
from tqdm import tqdm

from cuts.io import atomic_write, sha256_file, write_text
from cuts.prepare import DUPLICATE, UNREADABLE, NothingUsable, Rejection, SetWriter, finish
from nest.checkpoint import safe_torch_load
from nest.kmeans_features import FeatureError, FeatureRecipe, Featurizer, encoder_recipe, mfcc_recipe

log = logging.getLogger(__name__)
CHUNK = 8  # cuts per task sent to a worker process


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


def in_sample(cut_id: str, seed: int, fraction: float) -> bool:
    """Whether a cut is in the fit sample: a seeded hash of its id, the same for any order or --jobs."""
    if fraction >= 1.0:
        return True
    h = hashlib.blake2b(f"{seed}:{cut_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64 < fraction


# --- per-process work: each worker builds its Featurizer once (an encoder is loaded once per process) ---
_STATE: dict = {}


def _init_worker(recipe: dict, centroids: Optional[torch.Tensor], device: str, threads: Optional[int]) -> None:
    if threads:
        torch.set_num_threads(threads)
    _STATE["featurizer"] = Featurizer(FeatureRecipe(**recipe), device)
    _STATE["centroids"] = centroids


def _load(cut) -> tuple[Optional[np.ndarray], Optional[str]]:
    """Audio at the model rate, or why it cannot be used."""
    try:
        audio = _STATE["featurizer"].load_audio(cut)
    except Exception as e:  # any decoder error: the cut is reported, not fatal
        msg = str(e).splitlines()[0] if str(e) else ""
        return None, f"unreadable: {type(e).__name__}: {msg}".strip()
    if not np.isfinite(audio).all():
        return None, "corrupt: non-finite samples"
    return audio, None


def _features_of(cuts: list) -> list[Optional[np.ndarray]]:
    """Frame features (F, D) of each cut; None for a cut whose audio fails (pass 2 reports it)."""
    out = []
    for cut in cuts:
        audio, _ = _load(cut)
        out.append(None if audio is None else _STATE["featurizer"](audio))
    return out


def _labels_of(cuts: list) -> list[tuple]:
    """Per cut: (labels (T', R), cluster counts (K,), sum of squared distances) or (None, reason)."""
    featurizer, centroids = _STATE["featurizer"], _STATE["centroids"]
    out = []
    for cut in cuts:
        audio, why = _load(cut)
        if audio is None:
            out.append((None, why))
            continue
        labels, dist = assign(torch.from_numpy(featurizer(audio)), centroids)
        counts = np.bincount(labels.numpy(), minlength=len(centroids))
        out.append((featurizer.to_tokens(labels.numpy(), len(audio)), counts, float(dist.double().sum())))
    return out


def chunked(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def map_cuts(fn: Callable, cuts: Iterable, jobs: int, init_args: tuple) -> Iterator[tuple]:
    """(cut, ``fn``'s result for it) over the cuts in chunks, in ``jobs`` processes (one torch thread
    each), in input order, holding a bounded number of chunks in flight."""
    if jobs <= 1:
        _init_worker(*init_args, None)
        for chunk in chunked(cuts, CHUNK):
            yield from zip(chunk, fn(chunk))
        return
    with ProcessPoolExecutor(jobs, initializer=_init_worker, initargs=(*init_args, 1)) as pool:
        window: deque = deque()
        for chunk in chunked(cuts, CHUNK):
            window.append((chunk, pool.submit(fn, chunk)))
            if len(window) >= 4 * jobs:
                chunk, future = window.popleft()
                yield from zip(chunk, future.result())
        while window:
            chunk, future = window.popleft()
            yield from zip(chunk, future.result())


def open_cuts(path: str | Path) -> CutSet:
    """The cuts of a manifest (jsonl/jsonl.gz, local or URL), read lazily; errors name the file."""
    from cuts.sampler import open_cuts as open_manifest
    from cuts.shar import is_shar

    if is_shar(str(path)):
        raise FeatureError(f"CUTS {path} is a Shar folder: label the cuts manifest it was exported from, "
                           "then export the labelled cuts.jsonl.gz")
    try:
        return open_manifest(str(path), seed=0)
    except FileNotFoundError:
        raise FeatureError(f"CUTS {path}: no such file; give a cuts.jsonl.gz made by prepare.py") from None


def load_kmeans(path: str | Path) -> tuple[torch.Tensor, FeatureRecipe, dict]:
    """Centroids (K, D), feature recipe and fit information of a kmeans.pt (loaded as data)."""
    path = Path(path)
    if not path.is_file():
        raise FeatureError(f"--model {path}: no such file; it is the kmeans.pt of an earlier fit")
    d = safe_torch_load(path, str(path))
    if not isinstance(d, dict) or "centroids" not in d or "recipe" not in d:
        raise FeatureError(f"--model {path}: not a kmeans.pt of nest.kmeans (no centroids/recipe)")
    return d["centroids"].float(), FeatureRecipe(**d["recipe"]), d.get("fit", {})


def recipe_for_model(recipe: FeatureRecipe, checkpoint: Optional[str], model_path: str) -> FeatureRecipe:
    """The fit's recipe; encoder features must come from the very checkpoint the fit saw."""
    if recipe.kind != "encoder":
        return recipe
    ckpt = Path(checkpoint or recipe.checkpoint)
    if not ckpt.is_file():
        raise FeatureError(f"--model {model_path} was fit on encoder features of {recipe.checkpoint}, which is not "
                           "there: pass --checkpoint with that file's current path")
    if sha256_file(ckpt) != recipe.checkpoint_sha256:
        raise FeatureError(f"--checkpoint {ckpt} is not the checkpoint --model {model_path} was fit on "
                           f"({recipe.checkpoint}, sha256 {recipe.checkpoint_sha256[:12]}...)")
    return FeatureRecipe(**{**recipe.to_dict(), "checkpoint": str(ckpt.resolve())})


def run_kmeans(
    cuts_path: str | Path, out_dir: str | Path, *, features: Optional[str] = "mfcc", clusters: Optional[int] = None,
    sample_fraction: float = 0.1, jobs: int = 1, checkpoint: Optional[str] = None, layer: Optional[int] = None,
    model_path: Optional[str] = None, seed: int = 0, device: str = "cpu", config: Optional[str] = None,
    options: KMeansOptions = KMeansOptions(),
) -> dict:
    """Fit (or load with ``model_path``) k-means, label every cut, write OUT_DIR; returns the summary.

    ``clusters`` defaults to 100 for a fit and to the fit's own with ``model_path``.
    """
    cuts_path, out_dir = Path(cuts_path), Path(out_dir)
    cuts = open_cuts(cuts_path)
    if next(iter(cuts), None) is None:
        raise FeatureError(f"CUTS {cuts_path} holds no cuts; prepare a set first (prepare.py audio-dir ...)")
    if model_path:
        centroids, recipe, fit = load_kmeans(model_path)
        if features and features != recipe.kind:
            raise FeatureError(f"--features {features} but --model {model_path} was fit on {recipe.kind} features")
        if clusters is not None and clusters != len(centroids):
            raise FeatureError(f"--clusters {clusters} but --model {model_path} has {len(centroids)}: "
                               "leave --clusters out")
        recipe = recipe_for_model(recipe, checkpoint, model_path)
        fit = {**fit, "model": str(model_path)}
    else:
        if not 0.0 < sample_fraction <= 1.0:
            raise FeatureError(f"--sample-fraction {sample_fraction} must lie in (0, 1]")
        recipe = encoder_recipe(checkpoint, layer) if features == "encoder" else \
            mfcc_recipe(_model_config(config)) if features == "mfcc" else None
        if recipe is None:
            raise FeatureError(f"--features {features!r}: use mfcc or encoder")
        sampled = (c for c in cuts if in_sample(c.id, seed, sample_fraction))
        parts = [f for _, f in map_cuts(_features_of, tqdm(sampled, desc="k-means sample"), jobs,
                                        (recipe.to_dict(), None, device)) if f is not None and len(f)]
        if not parts:
            raise FeatureError(f"no frames in the fit sample of {cuts_path}: raise --sample-fraction "
                               f"(now {sample_fraction}) or check rejected audio")
        x = np.concatenate(parts)  # (N, D)
        del parts
        log.info("fitting %d clusters on %d frames x %d dims", clusters or 100, *x.shape)
        found, progress = fit_kmeans(x, clusters or 100, seed, options, threads=jobs)
        centroids = torch.from_numpy(found)
        fit = {"seed": seed, "sample_fraction": sample_fraction, "sample_frames": len(x), **progress,
               "sample_inertia": mean_inertia(x, centroids),
               "options": asdict(options)}
        del x
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = label_cuts(cuts, cuts_path, out_dir, recipe, centroids, jobs, device)
    # After the labels: a run that fails on the way leaves the previous fit, labels and manifest together.
    with atomic_write(out_dir / "kmeans.pt", binary=True) as f:
        torch.save({"centroids": centroids, "recipe": recipe.to_dict(), "num_classes": len(centroids), "fit": fit}, f)
    summary.update(features=recipe.kind, layer=recipe.layer, checkpoint=recipe.checkpoint,
                   labels_per_token=recipe.labels_per_token, fit=fit)
    write_text(out_dir / "summary.json", json.dumps(summary, indent=1))
    return summary


def _model_config(config: Optional[str]):
    if config is None:
        return None
    from nest.config import load_config

    return load_config(config).model


def label_cuts(cuts: CutSet, cuts_path: Path, out_dir: Path, recipe: FeatureRecipe, centroids: torch.Tensor,
               jobs: int, device: str) -> dict:
    """Label every cut (streamed) into OUT_DIR; a cut whose audio fails is listed in rejected.jsonl."""
    K = len(centroids)
    dtype = np.int16 if K < 2**15 else np.int32
    counts, dist_sum = np.zeros(K, dtype=np.int64), 0.0
    # HDF5: one file for any number of cuts, exact integers, read by key in each dataloader worker. A new file
    # per run, the older ones removed once the manifest that names the new one is in place.
    h5 = (out_dir / f"targets-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.h5").resolve()
    try:
        with SetWriter(out_dir) as writer, NumpyHdf5Writer(h5) as arrays:
            results = map_cuts(_labels_of, cuts, jobs, (recipe.to_dict(), centroids, device))
            for cut, result in tqdm(results, desc="k-means labels"):
                source = str(cut.recording.sources[0].source) if cut.has_recording else cut.id
                if result[0] is None:
                    writer.reject(Rejection(source, UNREADABLE, f"{result[1]} (cut {cut.id})"))
                    continue
                labels, c, d = result
                try:  # quoted: h5py makes groups of "/", so "a" and "a/b" would collide
                    stored = arrays.store_array(urllib.parse.quote(cut.id, safe=""), labels.astype(dtype),
                                                frame_shift=recipe.token_shift, temporal_dim=0, start=cut.start)
                except ValueError:  # h5py: the key exists already
                    writer.reject(Rejection(source, DUPLICATE, f"id {cut.id!r} listed again"))
                    continue
                counts += c
                dist_sum += d
                writer.add_cut(cut.with_custom("targets", stored).with_custom("targets_num_classes", K), source)
            summary = finish(writer, str(cuts_path))
    except BaseException:  # nothing of this run stays
        h5.unlink(missing_ok=True)
        raise
    for old in out_dir.glob("targets*.h5"):
        if old.resolve() != h5:
            old.unlink()
    frames = int(counts.sum())
    p = counts[counts > 0] / max(frames, 1)
    summary.update(num_classes=K, clusters_used=int((counts > 0).sum()),
                   usage_perplexity=float(np.exp(-(p * np.log(p)).sum())),
                   inertia=dist_sum / max(frames, 1), labelled_frames=frames)
    return summary


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``kmeans`` on an argparse subparsers object (prepare.py kmeans ...)."""
    p = subparsers.add_parser("kmeans", help="HuBERT-style k-means targets: fit on a sample, label every cut",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=cmd_kmeans)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("cuts", help="CutSet manifest (cuts.jsonl.gz)")
    p.add_argument("out", help="output folder")
    p.add_argument("--features", choices=["mfcc", "encoder"], default=None, help="default: mfcc (or --model's)")
    p.add_argument("--clusters", type=int, default=None, help="k-means clusters (default 100)")
    p.add_argument("--sample-fraction", type=float, default=0.1, help="share of cuts whose frames the fit sees")
    p.add_argument("--jobs", type=int, default=1,
                   help="processes computing features and labels, and threads of the k-means fit")
    p.add_argument("--checkpoint", default=None, help="our checkpoint or a .nemo file (--features encoder)")
    p.add_argument("--layer", type=int, default=None,
                   help="encoder layer from 0 (first Conformer block's output; negative from the end)")
    p.add_argument("--model", default=None, help="kmeans.pt of an earlier fit: label only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="device of the encoder (--features encoder)")
    p.add_argument("--config", default=None, help="model YAML whose token rate MFCC labels follow (default: ours)")


def cmd_kmeans(args) -> dict:
    return run_kmeans(args.cuts, args.out, features=args.features or (None if args.model else "mfcc"),
                      clusters=args.clusters, sample_fraction=args.sample_fraction, jobs=args.jobs,
                      checkpoint=args.checkpoint, layer=args.layer, model_path=args.model, seed=args.seed,
                      device=args.device, config=args.config)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nest.kmeans", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = cmd_kmeans(args)
    except (FeatureError, NothingUsable, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

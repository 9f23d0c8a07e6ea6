"""k-means targets for a CutSet: fit on a seeded sample of its frames (or take an earlier fit), then label every
cut into OUT_DIR (see nest.kmeans.cli for the layout)."""
from __future__ import annotations

import json
import logging
import os
import time
import urllib.parse
from collections import deque
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from lhotse.cut import Cut
from lhotse.features.io import NumpyHdf5Writer
from tqdm import tqdm

from cuts.console import error_line
from cuts.io import atomic_write, sha256_file, write_text
from cuts.lock import folder_lock
from cuts.prepare import DUPLICATE, UNREADABLE, Rejection, SetWriter, finish
from cuts.sources import manifest_cuts
from cuts.workers import process_pool
from nest.config.load import load_model_config, open_manifest
from nest.errors import FeatureError
from nest.kmeans.features import FeatureRecipe, Featurizer, encoder_recipe, mfcc_recipe
from nest.kmeans.fit import KMeansOptions, assign, fit_kmeans, load_kmeans, mean_inertia
from nest.kmeans.sample import fit_sample

log = logging.getLogger(__name__)
CHUNK = 8  # cuts per task sent to a worker process


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
        return None, f"unreadable: {error_line(e)}"
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
    with process_pool(jobs, _init_worker, (*init_args, 1)) as pool:
        window: deque = deque()
        for chunk in chunked(cuts, CHUNK):
            window.append((chunk, pool.submit(fn, chunk)))
            if len(window) >= 4 * jobs:
                chunk, future = window.popleft()
                yield from zip(chunk, future.result())
        while window:
            chunk, future = window.popleft()
            yield from zip(chunk, future.result())


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
    cuts = open_manifest(cuts_path, "CUTS", FeatureError, refuse_shar="label the cuts manifest it was exported "
                         "from, then export the labelled cuts.jsonl.gz")
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
        if clusters is not None and clusters < 1:
            raise FeatureError(f"--clusters {clusters}: give at least 1")
        recipe = encoder_recipe(checkpoint, layer) if features == "encoder" else \
            mfcc_recipe(load_model_config(config) if config else None) if features == "mfcc" else None
        if recipe is None:
            raise FeatureError(f"--features {features!r}: use mfcc or encoder")
    with folder_lock(out_dir):  # one run per folder, from the fit on (a second one refuses, naming this one)
        if not model_path:
            x, sample = fit_sample(lambda: read_cuts(cuts_path, IGNORE),
                                   lambda c: map_cuts(_features_of, c, jobs, (recipe.to_dict(), None, device)),
                                   seed=seed, fraction=sample_fraction, clusters=clusters or 100, what=str(cuts_path))
            log.info("fitting %d clusters on %d frames x %d dims", clusters or 100, *x.shape)
            found, progress = fit_kmeans(x, clusters or 100, seed, options, threads=jobs)
            centroids = torch.from_numpy(found)
            fit = {"seed": seed, **sample, **progress, "sample_inertia": mean_inertia(x, centroids),
                   "options": asdict(options)}
            del x
        summary = label_cuts(cuts_path, out_dir, recipe, centroids, jobs, device)
        # After the labels: a run that fails on the way leaves the previous fit, labels and manifest together.
        with atomic_write(out_dir / "kmeans.pt", binary=True) as f:
            torch.save({"centroids": centroids, "recipe": recipe.to_dict(), "num_classes": len(centroids), "fit": fit}, f)
        summary.update(features=recipe.kind, layer=recipe.layer, checkpoint=recipe.checkpoint,
                       labels_per_token=recipe.labels_per_token, fit=fit)
        write_text(out_dir / "summary.json", json.dumps(summary, indent=1))
    return summary


class _Ignore:
    """Where the fit sample's pass sends bad lines: the labelling pass reads them again and lists them."""

    def reject(self, rejection: Rejection) -> None:
        pass


IGNORE = _Ignore()


def read_cuts(cuts_path: Path, writer) -> Iterator[Cut]:
    """The cuts of the manifest; a line that is no usable cut goes to ``writer.reject`` (and rejected.jsonl)."""
    return (cut for _, cut in manifest_cuts([cuts_path], "first", writer))


def label_cuts(cuts_path: Path, out_dir: Path, recipe: FeatureRecipe, centroids: torch.Tensor, jobs: int,
               device: str) -> dict:
    """Label every cut (streamed) into OUT_DIR; a cut whose audio fails is listed in rejected.jsonl."""
    K = len(centroids)
    dtype = np.int16 if K < 2**15 else np.int32
    counts, dist_sum = np.zeros(K, dtype=np.int64), 0.0
    # HDF5: one file for any number of cuts, exact integers, read by key in each dataloader worker. A new file
    # per run, the older ones removed once the manifest that names the new one is in place.
    h5 = (out_dir / f"targets-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.h5").resolve()
    try:
        with SetWriter(out_dir) as writer, NumpyHdf5Writer(h5) as arrays:
            results = map_cuts(_labels_of, read_cuts(cuts_path, writer), jobs, (recipe.to_dict(), centroids, device))
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

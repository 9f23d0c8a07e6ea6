"""The one preflight of a training run: every start-up check, in the order a user's mistakes are found.

1. Values: ranges and choices of every key (nest.config.checks, also run by load_config), then the names only
   Lightning's registries know (trainer.accelerator, trainer.strategy).
2. The sets: data.train_cuts given; each of train, val and noise cuts exists, is a CutSet (or the message names
   the ``nest-prepare`` command that makes one) and holds cuts; k-means labels fit the model (nest.training.sources).
3. Side files: data.bins and data.bucket_batch_size load.
4. Checkpoints: resume (``auto``: last.ckpt, or a new run with a line saying so) exists and loads; init_from is a
   file.
5. The experiment folder (every rank; the first moves old logs aside): a new run never writes into another run's
   (one without a checkpoint is taken over); a resumed one keeps its model.
6. The data itself: the sampler makes a batch and the first cuts' audio loads; a warning when cuts would never
   be trained on or the bins look like another corpus's (cuts.feed.DataFeed.preflight).

Every failure is a ConfigError naming the key, the file and the fix, before Lightning starts.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from cuts.bins import Bins
from cuts.feed import DataFeed, DataSetupError
from cuts.sampler import NoBatchError, load_batch_sizes
from nest.config.checks import KNOWN_ACCELERATORS, KNOWN_STRATEGIES, validate
from nest.config.load import to_yaml
from nest.config.schema import RunConfig
from nest.errors import CheckpointError, ConfigError
from nest.io.torch_file import safe_torch_load
from nest.training.sources import check_sources

log = logging.getLogger(__name__)


@dataclass
class StartUp:
    """What the preflight found: where the run lives, what it resumes, and its data feed."""

    exp_dir: Path
    resume_from: Optional[str]  # a checkpoint path, or None for a new run
    feed: DataFeed


def preflight(cfg: RunConfig) -> StartUp:
    """Run every start-up check (module docstring) and return what the run needs; raises ConfigError."""
    validate(cfg)
    check_trainer_names(cfg)
    d = cfg.data
    if not d.train_cuts:
        raise ConfigError("data.train_cuts is empty: give one or more CutSet manifests or Shar folders")
    check_sources(cfg)
    for key, path, load in (("data.bins", d.bins, Bins.load), ("data.bucket_batch_size", d.bucket_batch_size,
                                                               load_batch_sizes)):
        if path:
            try:
                load(path)
            except (OSError, ValueError) as e:  # the loaders' messages name the file, the line and the fix
                raise ConfigError(f"{key}: {e}") from None
    if cfg.init_from:
        check_checkpoint_path("init_from", cfg.init_from)
    exp_dir = Path(cfg.exp_dir).resolve()
    resume_from = find_resume(cfg, exp_dir)
    # On every rank: a rank that went on while the first one stopped would wait for it until the DDP timeout.
    check_exp_dir(cfg, exp_dir, resume_from, first_rank=_global_rank_from_env() == 0)
    if resume_from and _global_rank_from_env() == 0:
        say_if_finished(cfg, resume_from)
    feed = DataFeed(d, cfg.model.preprocessor.sample_rate, cfg.seed, with_targets=cfg.model.targets == "kmeans")
    try:
        feed.preflight()
    except (NoBatchError, DataSetupError) as e:
        raise ConfigError(str(e)) from None
    return StartUp(exp_dir, resume_from, feed)


def check_trainer_names(cfg: RunConfig) -> None:
    """trainer.accelerator and trainer.strategy beyond the common values are checked against Lightning's
    registries (importing Lightning takes seconds, so the common values are accepted without it)."""
    from pytorch_lightning.accelerators import AcceleratorRegistry
    from pytorch_lightning.strategies import StrategyRegistry

    t = cfg.trainer
    for kind, value, known, registry in (
        ("accelerator", t.accelerator, KNOWN_ACCELERATORS, lambda: {"gpu", *AcceleratorRegistry.available_accelerators()}),
        ("strategy", t.strategy, KNOWN_STRATEGIES, StrategyRegistry.available_strategies),
    ):
        names = sorted({"auto", *registry()})
        if value not in known and value not in names:
            raise ConfigError(f"trainer.{kind}={value!r} is not one of Lightning's: {', '.join(names)}")


def check_checkpoint_path(key: str, value: str) -> None:
    """``value`` names a checkpoint file (a folder or a missing file is a ConfigError saying what to give)."""
    path = Path(value)
    if path.is_dir():
        inside = next((str(p) for p in (path / "checkpoints" / "last.ckpt", path / "last.ckpt") if p.is_file()), None)
        example = f" such as {inside}" if inside else " (a .ckpt of nest-train, or a NeMo .nemo file)"
        raise ConfigError(f"{key}: {value} is a folder: give a checkpoint file{example}")
    if not path.is_file():
        raise ConfigError(f"{key}: {value} does not exist")


def _load_problem(path: Path) -> Optional[str]:
    """Why the checkpoint ``path`` does not load (read as data, its tensors mapped, not read), or None."""
    try:
        safe_torch_load(path, str(path), mmap=True)
    except CheckpointError as e:
        return str(e)
    return None


def _step_checkpoints(folder: Path) -> list[Path]:
    """The step checkpoints of ``folder``, newest first (by the step in their name: stepNNNNNNNN.ckpt)."""
    found = [(int(m.group(1)), p) for p in folder.glob("step*.ckpt") if (m := re.fullmatch(r"step(\d+)\.ckpt", p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def find_resume(cfg: RunConfig, exp_dir: Path) -> Optional[str]:
    """The checkpoint to continue from: ``resume=auto`` takes last.ckpt (the newest: nest.training.saving writes
    it on a timer, on SIGUSR1 and at the end; Lightning's own hpc_ckpt files are not written). A checkpoint that
    does not load (empty, cut short, damaged) stops the run here, naming the newest step checkpoint that does."""
    if cfg.resume in (None, "", "none"):
        return None
    if cfg.resume == "auto":
        folder = exp_dir / "checkpoints"
        last = folder / "last.ckpt"
        if not last.is_file():
            log.info("resume=auto: no checkpoint in %s yet: a new run starts at step 0", folder)
            return None
        problem = _load_problem(last)
        if problem:
            steps = _step_checkpoints(folder)
            good = next((p for p in steps if _load_problem(p) is None), None)
            if good:
                offer = f"the newest step checkpoint that loads is {good}: continue from it with resume={good}"
            else:
                none = "no step checkpoint of that folder loads either" if steps else "that folder holds no step checkpoint"
                offer = f"{none}: start a new run in another exp_dir"
            raise ConfigError(f"resume=auto: {problem.removesuffix('.')}; {offer}")
        return str(last)
    check_checkpoint_path("resume", cfg.resume)
    problem = _load_problem(Path(cfg.resume))
    if problem:
        raise ConfigError(f"resume: {problem}")
    return cfg.resume


def say_if_finished(cfg: RunConfig, ckpt_path: str) -> None:
    """A resumed run whose checkpoint already reached trainer.max_steps trains nothing: one line says so."""
    step = safe_torch_load(Path(ckpt_path), ckpt_path, mmap=True).get("global_step", 0)
    if 0 < cfg.trainer.max_steps <= step:
        log.warning("resume: %s is at step %d, trainer.max_steps=%d: nothing to train (the summary is that run's); "
                    "raise trainer.max_steps to go on, or give a new exp_dir for a new run", ckpt_path, step,
                    cfg.trainer.max_steps)


def check_exp_dir(cfg: RunConfig, exp_dir: Path, ckpt_path: Optional[str], first_rank: bool = True) -> None:
    """A new run never writes into another run's folder; a resumed one keeps its model. A folder whose run
    stopped before its first checkpoint (config.yaml and tb/ only) holds nothing to continue: a new run starts
    there, its TensorBoard logs moved aside (by the first rank, which alone writes there)."""
    existing = next(p for p in (exp_dir, *exp_dir.parents) if p.exists())
    if not existing.is_dir() or (first_rank and not os.access(existing, os.W_OK | os.X_OK)):
        what = "is a file" if existing == exp_dir else f"would be made in {existing}, which " + (
            "is a file" if not existing.is_dir() else "is not writable")
        raise ConfigError(f"exp_dir {exp_dir} {what}: give a folder this run can write")
    ckpts = exp_dir / "checkpoints"
    has_checkpoint = ckpts.is_dir() and any(ckpts.glob("*.ckpt"))
    if has_checkpoint and cfg.resume in (None, "", "none"):
        raise ConfigError(f"exp_dir {exp_dir} already holds a run (checkpoints): continue it with resume=auto, "
                          f"or give another exp_dir")
    tb = exp_dir / "tb"
    try:
        stale = not has_checkpoint and tb.is_dir() and any(tb.iterdir())
    except FileNotFoundError:  # moved aside by the first rank in the meantime
        stale = False
    if stale:
        if not first_rank:
            return
        n = 1 + max((int(p.name.rsplit("-", 1)[1]) for p in exp_dir.glob("tb.no-checkpoint-*")
                     if p.name.rsplit("-", 1)[1].isdigit()), default=0)
        aside = tb.rename(exp_dir / f"tb.no-checkpoint-{n}")
        log.warning("exp_dir %s holds a run that saved no checkpoint: a new run starts there (its TensorBoard logs "
                    "are moved to %s)", exp_dir, aside)
        return
    saved = exp_dir / "config.yaml"
    if ckpt_path and saved.is_file():
        before = (yaml.safe_load(saved.read_text()) or {}).get("model", {})
        now = yaml.safe_load(to_yaml(cfg))["model"]
        diffs = _dict_diff(before, now, "model")
        if diffs:
            raise ConfigError(f"resume: the model of {exp_dir} differs from this configuration ({'; '.join(diffs)}); "
                              f"resume with the same model settings, or start a new exp_dir")


def _dict_diff(a: dict, b: dict, prefix: str) -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _dict_diff(x, y, f"{prefix}.{k}")
        elif x != y:
            out.append(f"{prefix}.{k}: {x!r} -> {y!r}")
    return out


def _global_rank_from_env() -> int:
    """The rank before Lightning sets up its environment; nonzero for any process but the first of node 0
    (Lightning's own launcher sets only NODE_RANK in the first process of other nodes)."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var):
            return int(os.environ[var])
    return int(os.environ.get("NODE_RANK") or 0) + int(os.environ.get("LOCAL_RANK") or 0)

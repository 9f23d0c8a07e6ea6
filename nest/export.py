"""Export a pretrained model for fine-tuning: a NeMo .nemo, or a Hugging Face transformers Parakeet folder.

  nest-export CKPT OUT --format nemo|hf [--force]        (also: python -m nest.export)

CKPT is any checkpoint this project loads: train.py's .ckpt, save_model's file or a NeMo .nemo, of either
objective (NEST, Wav2vec-BERT).

--format nemo writes OUT (.nemo) as NeMo 3.0.0 writes it: a tar of model_config.yaml (NeMo's class as
``target``, every section its constructor reads, no data sections) and model_weights.ckpt (every tensor of
NeMo's model under NeMo's names), and prints the overrides that fine-tune its encoder with NeMo's CTC and
hybrid RNNT/CTC scripts.

--format hf writes the folder OUT: config.json and model.safetensors of transformers' ParakeetEncoder and
preprocessor_config.json of its ParakeetFeatureExtractor (needs transformers 5: pip install '.[hf]').

A setting the target cannot express fails before anything is written, naming the setting. OUT is written
whole or not at all; an existing OUT is replaced only with --force.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml

from cuts.console import HelpFormatter
from cuts.io import atomic_write
from nest.config.schema import OptimConfig
from nest.errors import CheckpointError, ConfigError
from nest.io.checkpoint import load_model
from nest.io.nemo import to_nemo_config, to_nemo_state_dict
from nest.objectives.config import ModelConfig

FORMATS = ("nemo", "hf")


class ExportError(ValueError):
    """An export that cannot be done as asked; the message names the file or setting and the fix."""


def run_optim(ckpt: Path) -> dict:
    """The optimizer settings of a train.py checkpoint, else this project's defaults (NeMo's NEST recipe)."""
    optim = asdict(OptimConfig())
    if ckpt.suffix != ".nemo":
        try:  # memory-mapped: only the small hyper-parameter entry is read, not the tensors a second time
            saved = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a file of torch's legacy format cannot be mapped
            saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        optim.update((saved.get("hyper_parameters") or {}).get("optim_config") or {})
    return optim


def check_output(out: Path, fmt: str, force: bool) -> None:
    """Refuse an output path that would lose data or that the target cannot use, before any work."""
    if fmt == "nemo" and out.suffix != ".nemo":
        raise ExportError(f"{out}: a NeMo export is a file ending in .nemo (NeMo's restore_from wants it)")
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise ExportError(f"{out} exists: give --force to replace it, or another OUT")
    if fmt == "nemo" and out.is_dir():
        raise ExportError(f"{out} is a folder: not replacing a folder with a .nemo file")
    if fmt == "hf" and out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise ExportError(f"{out} is a folder that is not an export (no config.json): not replacing it")


def write_nemo(out: Path, config: dict, state: dict[str, torch.Tensor]) -> None:
    """A .nemo as NeMo's save_to writes it: an uncompressed tar of ./model_config.yaml and ./model_weights.ckpt."""
    members = [("model_config.yaml", yaml.safe_dump(config, sort_keys=False).encode())]
    weights = io.BytesIO()
    torch.save(state, weights)
    members.append(("model_weights.ckpt", weights.getvalue()))
    now = time.time()
    with atomic_write(out, binary=True) as f, tarfile.open(fileobj=f, mode="w") as tar:
        folder = tarfile.TarInfo("./")
        folder.type, folder.mode, folder.mtime = tarfile.DIRTYPE, 0o755, now
        tar.addfile(folder)
        for name, data in members:
            info = tarfile.TarInfo(f"./{name}")
            info.size, info.mode, info.mtime = len(data), 0o644, now
            tar.addfile(info, io.BytesIO(data))


def write_folder(out: Path, fill) -> None:
    """``fill(folder)`` into a new folder beside ``out``, then renamed to ``out`` (the old one removed after)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        fill(tmp)
        mask = _umask()  # mkdtemp (and transformers' safetensors writer) make private files; give open()'s
        os.chmod(tmp, 0o777 & ~mask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~mask)
        old = None
        if out.exists() or out.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / "out")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Every encoder setting NeMo's fine-tuning configs must repeat: it loads the encoder with strict=False, so
# a layer, head or width that differs leaves tensors random (or fails on a shape) without naming the cause.
def finetune_overrides(cfg: ModelConfig) -> list[str]:
    """Hydra overrides (``++key=value``: set or add) that make a NeMo ASR config's front end and encoder ours."""
    p, e = cfg.preprocessor, cfg.encoder
    values = {
        "model.sample_rate": p.sample_rate, "model.preprocessor.sample_rate": p.sample_rate,
        "model.preprocessor.window_size": p.window_size, "model.preprocessor.window_stride": p.window_stride,
        "model.preprocessor.features": p.features, "model.preprocessor.n_fft": p.n_fft,
        "model.preprocessor.normalize": "per_feature",
        **({"model.preprocessor.preemph": p.preemph} if p.preemph != 0.97 else {}),
        **({"model.preprocessor.log_zero_guard_value": p.log_zero_guard_value} if p.log_zero_guard_value != 2**-24
           else {}),
        "model.encoder.feat_in": p.features, "model.encoder.n_layers": e.n_layers, "model.encoder.d_model": e.d_model,
        "model.encoder.n_heads": e.n_heads, "model.encoder.subsampling": "dw_striding",
        "model.encoder.subsampling_factor": e.subsampling_factor,
        "model.encoder.subsampling_conv_channels": e.subsampling_conv_channels,
        "model.encoder.ff_expansion_factor": e.ff_expansion_factor, "model.encoder.self_attention_model": "rel_pos",
        "model.encoder.untie_biases": True, "model.encoder.xscaling": e.xscaling, "model.encoder.use_bias": e.use_bias,
        "model.encoder.conv_kernel_size": e.conv_kernel_size, "model.encoder.conv_norm_type": e.conv_norm_type,
        "model.encoder.att_context_size": "[-1,-1]",
    }
    shown = lambda v: str(v).lower() if isinstance(v, bool) else str(v)  # noqa: E731
    return [f"'++{k}={shown(v)}'" if "[" in shown(v) else f"++{k}={shown(v)}" for k, v in values.items()]


def finetune_help(cfg: ModelConfig, out: Path) -> str:
    """How to fine-tune the exported encoder with NeMo 3.0.0's ASR scripts."""
    init = [f"+init_from_nemo_model.ssl.path={out.resolve()}", "'+init_from_nemo_model.ssl.include=[encoder]'"]
    lines = "  " + " \\\n  ".join(init + finetune_overrides(cfg))
    return (
        f"Fine-tune its encoder with NeMo 3.0.0 (from NeMo's examples/asr folder), CTC:\n"
        f"python asr_ctc/speech_to_text_ctc_bpe.py --config-path=../conf/fastconformer "
        f"--config-name=fast-conformer_ctc_bpe \\\n  model.tokenizer.dir=... model.train_ds.manifest_filepath=... "
        f"model.validation_ds.manifest_filepath=... \\\n{lines}\n"
        f"or hybrid RNNT/CTC: asr_hybrid_transducer_ctc/speech_to_text_hybrid_rnnt_ctc_bpe.py "
        f"--config-path=../conf/fastconformer/hybrid_transducer_ctc \\\n"
        f"  --config-name=fastconformer_hybrid_transducer_ctc_bpe with the same overrides.\n"
        f"Give every model.* override above: NeMo loads the encoder with strict=False, so a setting that differs\n"
        f"leaves tensors random without a word (fast-conformer_ctc_bpe.yaml has n_layers: 18; this encoder has "
        f"{cfg.encoder.n_layers}).\n"
        f"init_from_pretrained (the key on NEST's model card) is not a NeMo key: nothing is loaded with it and "
        f"nothing says so."
        + ("\nmask_position=post_conv: NeMo's layout keeps the subsampling under encoder.pre_encode.pre_encode.*, "
           "which init_from_nemo_model does not load into an ASR model's encoder.pre_encode.*: it stays random "
           "(the conformer layers load). --format hf carries it." if cfg.mask_position == "post_conv" else "")
    )


def export(ckpt: str | Path, out: str | Path, fmt: str, force: bool = False) -> str:
    """Export ``ckpt`` to ``out`` in ``fmt`` (nemo | hf); returns what to tell the user."""
    ckpt, out = Path(ckpt), Path(out)
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose nemo or hf")
    check_output(out, fmt, force)
    try:
        model = load_model(ckpt)
    except (tarfile.TarError, EOFError, RuntimeError) as e:  # a truncated or corrupt file, as torch/tarfile say it
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ExportError(f"{ckpt}: not a readable checkpoint ({reason}); was it copied whole?") from None
    cfg, state = model.cfg, model.state_dict()
    what = f"{cfg.objective} encoder ({cfg.encoder.n_layers} layers, d_model {cfg.encoder.d_model})"
    if fmt == "nemo":
        config = to_nemo_config(cfg, run_optim(ckpt))  # refuses what NeMo cannot hold, before writing
        write_nemo(out, config, to_nemo_state_dict(cfg, state))
        return f"wrote {out}: {config['target'].rsplit('.', 1)[-1]}, {what}\n\n{finetune_help(cfg, out)}"
    from nest.io.hf import parakeet_refusals, training_differences, write_parakeet

    parakeet_refusals(cfg)
    write_folder(out, lambda folder: write_parakeet(cfg, state, folder))
    notes = "\n".join(f"  - {n}" for n in training_differences(cfg))
    return (f"wrote {out}: ParakeetEncoder + ParakeetFeatureExtractor, {what}\n"
            f"Load: ParakeetEncoder.from_pretrained('{out}'); for CTC see README (Export). Fine-tuning differences:\n"
            f"{notes}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="nest-export", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("ckpt", help="train.py's .ckpt, save_model's file or a NeMo .nemo file")
    ap.add_argument("out", help="the .nemo file (--format nemo) or the folder (--format hf) to write")
    ap.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
    ap.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = ap.parse_args(argv)
    try:
        message = export(args.ckpt, args.out, args.fmt, args.force)
    except (ExportError, CheckpointError, ConfigError, OSError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, also for tarfile's multi-line reasons
        return 2
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())

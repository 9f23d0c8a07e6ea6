"""Multi-layer encoder features per cut, and the pretrained encoder for downstream use.

  python -m nest.extract CKPT CUTS OUT_DIR --layers all|i,j,... [--format npy|lhotse] [--batch-size 8]

``npy`` writes ``OUT_DIR/layer{i}/{cut_id}.npy`` of shape (frames, d_model); ``lhotse`` writes the arrays
with Lhotse's NumpyFilesWriter and ``OUT_DIR/cuts_with_features.jsonl.gz`` whose cuts carry one
TemporalArray per layer (``layer_{i}``, frame shift = subsampling x hop). Layers count from 0 (the
output of the first Conformer block) to n_layers - 1 (the encoder's output).
"""
from __future__ import annotations

import argparse
import logging
import sys
import urllib.parse
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torchaudio
from lhotse import CutSet
from lhotse.features.io import NumpyFilesWriter
from lhotse.shar.utils import to_shar_placeholder
from lhotse.utils import fastcopy
from torch import nn
from tqdm import tqdm

from cuts.dataset import at_rate, load_mono
from cuts.console import HelpFormatter, error_line, one_line
from cuts.sampler import open_cuts
from nest.io.checkpoint import load_model
from nest.objectives.base import select_layers

log = logging.getLogger(__name__)


class PretrainedEncoder(nn.Module):
    """Mel features + FastConformer encoder of a pretrained model, for downstream use and fine-tuning.

    ``forward(audio (B, S), audio_lens (B,), sample_rate=None)`` -> encoded (B, d_model, T'), encoded_lens (B,).
    Audio at another ``sample_rate`` than the model's is resampled first (torchaudio).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.preprocessor = model.preprocessor
        self.encoder = model.encoder
        self.d_model = model.cfg.encoder.d_model
        self.sample_rate = model.cfg.preprocessor.sample_rate

    def forward(self, audio: torch.Tensor, audio_lens: torch.Tensor,
                sample_rate: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        if sample_rate is not None and sample_rate != self.sample_rate:
            audio = torchaudio.functional.resample(audio, sample_rate, self.sample_rate)
            audio_lens = torch.div(audio_lens * self.sample_rate, sample_rate, rounding_mode="floor")
        feats, lens = self.preprocessor(audio, audio_lens)
        return self.encoder(feats, lens)


def load_pretrained_encoder(path: str | Path, train: bool = False) -> PretrainedEncoder:
    """The encoder of a checkpoint of ours or of a NeMo ``.nemo`` file, in eval mode unless ``train``.

    Example::

        encoder = load_pretrained_encoder("exp/nest/checkpoints/best.ckpt", train=True)  # to fine-tune
        encoded, lens = encoder(audio, audio_lens, sample_rate=16000)  # (B, d_model, T'), 80 ms frames
    """
    return PretrainedEncoder(load_model(path)).train(train)


def extract(
    ckpt: str, cuts: CutSet, out_dir: Path, layers: str = "all", fmt: str = "npy", batch_size: int = 8,
    device: Optional[str] = None,
) -> int:
    """Write features of the selected layers for every cut; returns the number of cuts done."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(ckpt).to(device).eval()
    sr = model.cfg.preprocessor.sample_rate
    chosen = select_layers(layers, model.cfg.encoder.n_layers)
    frame_shift = model.cfg.encoder.subsampling_factor * model.cfg.preprocessor.window_stride
    out_dir = Path(out_dir)
    writer = NumpyFilesWriter(out_dir / "arrays") if fmt == "lhotse" else None
    cut_writer = CutSet.open_writer(out_dir / "cuts_with_features.jsonl.gz", overwrite=True) if writer else None
    done = 0
    batch: list = []

    def flush():
        nonlocal done
        audio_list, ok = [], []
        for c in batch:
            try:
                audio_list.append(torch.from_numpy(load_mono(at_rate(c, sr))))
                ok.append(c)
            except Exception as e:  # one bad file is reported and skipped
                log.warning("skipping cut %s: audio failed to load (%s)", c.id, error_line(e))
        batch[:] = ok
        if not batch:
            return
        lens = torch.tensor([len(a) for a in audio_list])
        audio = torch.nn.utils.rnn.pad_sequence(audio_list, batch_first=True).to(device)
        _, enc_lens, hidden = model.encode(audio, lens.to(device), return_layers=True)
        for b, cut in enumerate(batch):
            n = int(enc_lens[b])
            for i in chosen:
                arr = hidden[i][b, :, :n].T.float().cpu().numpy().astype(np.float32)  # (T', D)
                if writer is None:
                    path = out_dir / f"layer{i}" / f"{cut.id}.npy"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    np.save(path, arr)
                else:
                    # Lhotse's file writer takes flat names: a cut id such as spk1/001 is quoted.
                    key = f"{urllib.parse.quote(cut.id, safe='')}-layer{i}"
                    stored = writer.store_array(key, arr, frame_shift=frame_shift, temporal_dim=0)
                    cut = cut.with_custom(f"layer_{i}", stored)
            if cut_writer is not None:
                if cut.has_recording and any(src.type == "memory" for src in cut.recording.sources):
                    # Audio held in memory (read from Shar) stays in its shards: the manifest keeps a placeholder.
                    cut = fastcopy(cut, recording=to_shar_placeholder(cut.recording, cut))
                cut_writer.write(cut)
            done += 1
        batch.clear()

    for cut in tqdm(cuts, desc="extract"):
        batch.append(cut)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if cut_writer is not None:
        cut_writer.close()
    return done


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nest.extract", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("ckpt", help="our checkpoint (.ckpt/.pt) or a NeMo .nemo file")
    ap.add_argument("cuts", help="CutSet manifest (local or URL) or Lhotse Shar folder, as data.train_cuts takes")
    ap.add_argument("out_dir")
    ap.add_argument("--layers", default="all", help="all, or comma-separated layer indices (negative from the end)")
    ap.add_argument("--format", choices=["npy", "lhotse"], default="npy")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    try:
        n = extract(args.ckpt, open_cuts(args.cuts, seed=0), Path(args.out_dir), args.layers, args.format,
                    args.batch_size, args.device)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    print(f"wrote features of {n} cuts to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

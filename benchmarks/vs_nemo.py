"""This project against NVIDIA NeMo 3.0.0, side by side on the same inputs; prints one JSON object.

  python benchmarks/vs_nemo.py [--nemo-python /work/nemo_venv/bin/python] [--preset small] [--batch 4]
      [--seconds 10] [--files 120] [--rounds 3]

NeMo is never a dependency of this project: it runs in a virtual environment of its own, e.g.

  python3 -m venv /work/nemo_venv
  /work/nemo_venv/bin/pip install torch==2.11.0 torchaudio==2.11.0 'nemo_toolkit[asr]==3.0.0'

(the full ``[asr]`` extra installs as is; what the NeMo side imports is ``nemo.collections.asr`` with its
``ssl_models``, ``ssl_dataset`` and ``ssl_modules``, plus lhotse and omegaconf). Without that interpreter
only this project's side runs and the ratios are null.

One worker process per side (this interpreter for ours, ``--nemo-python`` for NeMo's) gets the same
inputs, and the two alternate round by round so that both see the same load on a shared machine; each
figure is the best of ``--rounds``.

- model: forward + loss + backward of a preset (``model_preset``; NeMo built from its NEST YAML values
  with the same sizes) on one batch of the same random audio, torch's default threads, fp32 on CPU.
- data: NeMo's ``LhotseAudioNoiseDataset`` with ``MultiSpeakerNoiseAugmentation`` (NEST's defaults, a
  noise manifest) against this data path (``NoiseMixer`` with the same defaults, ``load_batch_audio``,
  ``collate``) on the same batches of the same generated 16 kHz FLAC files, one torch thread each as in
  DataLoader workers; and the raw decode of the clean audio with soundfile, in the same worker.

``*_vs_nemo``: ours over NeMo's audio seconds per second (above 1: ours is faster).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- workers (one per side, own interpreter)

def nemo_model_config(enc: dict, q: dict) -> dict:
    """NeMo's NEST YAML model section (examples/asr/conf/ssl/nest/nest_fast-conformer.yaml), data removed."""
    return {
        "sample_rate": 16000, "num_classes": q["num_classes"], "num_books": q["num_books"], "code_dim": q["code_dim"],
        "squeeze_single": False, "mask_position": "pre_conv",
        "preprocessor": {"_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
                         "sample_rate": 16000, "normalize": "per_feature", "window_size": 0.025, "window_stride": 0.01,
                         "window": "hann", "features": 80, "n_fft": 512, "log": True, "frame_splicing": 1,
                         "dither": 1e-5, "pad_to": 16, "pad_value": 0.0},
        "spec_augment": {"_target_": "nemo.collections.asr.modules.SpectrogramAugmentation", "freq_masks": 0,
                         "time_masks": 0, "freq_width": 27, "time_width": 0.05},
        "masking": {"_target_": "nemo.collections.asr.modules.RandomBlockMasking", "block_size": 40, "mask_prob": 0.01,
                    "feat_in": 80, "freeze": True, "allow_overlap": True},
        "quantizer": {"_target_": "nemo.collections.asr.modules.RandomProjectionVectorQuantizer", "feat_in": 80,
                      "code_dim": q["code_dim"], "num_books": q["num_books"], "num_classes": q["num_classes"],
                      "dist_fn": "l2", "freeze": True, "squeeze_single": False, "combine_time_steps": 8},
        "encoder": {"_target_": "nemo.collections.asr.modules.ConformerEncoder", "feat_in": 80, "feat_out": -1,
                    "n_layers": enc["n_layers"], "d_model": enc["d_model"], "use_bias": enc["use_bias"],
                    "subsampling": "dw_striding", "subsampling_factor": 8, "subsampling_conv_channels": 256,
                    "causal_downsampling": False, "ff_expansion_factor": 4, "self_attention_model": "rel_pos",
                    "n_heads": enc["n_heads"], "att_context_size": [-1, -1], "att_context_style": "regular",
                    "xscaling": enc["xscaling"], "untie_biases": True, "pos_emb_max_len": 5000,
                    "conv_kernel_size": enc["conv_kernel_size"], "conv_norm_type": "batch_norm",
                    "conv_context_size": None, "dropout": 0.1, "dropout_pre_encoder": 0.1, "dropout_emb": 0.0,
                    "dropout_att": 0.1, "stochastic_depth_drop_prob": 0.0, "stochastic_depth_mode": "linear",
                    "stochastic_depth_start_layer": 1},
        "decoder": {"_target_": "nemo.collections.asr.modules.MultiSoftmaxDecoder", "feat_in": enc["d_model"],
                    "num_classes": q["num_classes"], "num_decoders": q["num_books"], "squeeze_single": False,
                    "use_bias": True},
        "loss": {"_target_": "nemo.collections.asr.losses.MultiMLMLoss", "combine_time_steps": 8,
                 "mask_threshold": 0.8, "num_decoders": q["num_books"], "squeeze_single": False},
    }


NEMO_AUGMENTOR = {"_target_": "nemo.collections.asr.modules.ssl_modules.MultiSpeakerNoiseAugmentation",
                  "prob": 0.5, "noise_ratio": 0.5, "min_r_speech": -5.0, "max_r_speech": 5.0, "min_r_noise": -5.0,
                  "max_r_noise": 20.0, "min_mix_rate": 0.5, "max_mix_rate": 0.5, "min_num_segments": 1,
                  "max_num_segments": 1, "min_num_speakers": 1, "max_num_speakers": 1}


class Worker:
    """Builds one side from the setup message, then times one round per command."""

    def __init__(self, side: str, setup: dict):
        import torch
        from lhotse import CutSet

        self.torch, self.side, self.setup = torch, side, setup
        torch.manual_seed(0)
        samples = int(setup["seconds"] * 16000)
        self.audio = 0.1 * torch.randn(setup["batch"], samples)
        self.lens = torch.full((setup["batch"],), samples)
        cuts = {c.id: c for c in CutSet.from_file(setup["cuts"])}
        self.batches = [CutSet.from_cuts(cuts[i] for i in ids) for ids in setup["batches"]]
        self.audio_s = sum(c.duration for b in self.batches for c in b)
        self.model = self.step = self.load = None

    def build(self):
        if self.side == "nemo":
            from nemo.collections.asr.data.ssl_dataset import LhotseAudioNoiseDataset
            from nemo.collections.asr.models.ssl_models import EncDecDenoiseMaskedTokenPredModel
            from omegaconf import OmegaConf

            cfg = OmegaConf.create(nemo_model_config(self.setup["encoder"], self.setup["quantizer"]))
            model = EncDecDenoiseMaskedTokenPredModel(cfg=cfg).train()

            def step():
                log_probs, enc_len, masks, tokens = model.forward(
                    input_signal=self.audio, input_signal_length=self.lens, noisy_input_signal=self.audio,
                    noisy_input_signal_length=self.lens, apply_mask=True)
                model.loss(masks=masks, decoder_outputs=log_probs, targets=tokens, decoder_lengths=enc_len).backward()

            ds = LhotseAudioNoiseDataset(noise_manifest=self.setup["noise_manifest"],
                                         batch_augmentor_cfg=OmegaConf.create(NEMO_AUGMENTOR))
            self.load = lambda index, batch: ds[batch]
        else:
            sys.path.insert(0, str(ROOT))
            from lhotse import CutSet

            from benchmarks.dataloader import raw_decode
            from cuts.config import NoiseConfig
            from cuts.dataset import NestDataset, SamplerItem
            from cuts.noise import NoiseMixer
            from nest.objectives import NestModel, model_preset

            model = NestModel(model_preset(self.setup["preset"])).train()

            def step():
                model(self.audio, self.lens, self.audio, self.lens).loss.backward()

            from cuts.dataset import keep_freed_memory

            keep_freed_memory()  # as this project's dataloader workers run
            noise = list(CutSet.from_file(self.setup["noise_cuts"]))
            ds = NestDataset(16000, NoiseMixer(NoiseConfig(), noise), seed=0)
            self.load = lambda index, batch: ds[SamplerItem(cuts=batch, index=index)]
            self.raw = lambda index, batch: raw_decode(SamplerItem(cuts=batch, index=index))
        self.model = model
        self.step = step
        step()  # warm-up: lazy initialisations, allocator
        model.zero_grad(set_to_none=True)

    def run(self, task: str) -> dict:
        torch = self.torch
        if task == "model":
            torch.set_num_threads(self.setup["model_threads"])
            times = []
            for _ in range(self.setup["steps"]):
                t0 = time.perf_counter()
                self.step()
                times.append(time.perf_counter() - t0)
                self.model.zero_grad(set_to_none=True)
            return {"step_s": min(times), "audio_s": self.setup["batch"] * self.setup["seconds"]}
        torch.set_num_threads(1)  # as in a DataLoader worker
        fn = self.raw if task == "raw" else self.load
        t0 = time.perf_counter()
        for index, batch in enumerate(self.batches):
            fn(index, batch)
        return {"seconds": time.perf_counter() - t0, "audio_s": self.audio_s}


def worker_main(side: str) -> None:
    """Reads one JSON command a line from stdin, answers one JSON line on stdout."""
    import logging

    logging.disable(logging.WARNING)  # NeMo and lhotse warnings would interleave with the answers
    worker = None
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "setup":
            worker = Worker(side, msg)
            worker.build()
            answer = {"ok": True}
        else:
            answer = worker.run(msg["cmd"])
        print(json.dumps(answer), flush=True)


# ---------------------------------------------------------------- driver

def make_data(tmp: Path, files: int) -> dict:
    """Generated FLAC speech stand-ins, noise files, their manifests for both sides, and the batches."""
    import numpy as np
    import soundfile as sf
    from lhotse import CutSet, Recording

    sys.path.insert(0, str(ROOT))
    from benchmarks.prepare import librispeech_like_durations
    from cuts.config import DataConfig
    from cuts.sampler import build_sampler

    rng = np.random.default_rng(0)
    recs = []
    for i, d in enumerate(librispeech_like_durations(files, seed=1)):
        path = tmp / f"u{i:04d}.flac"
        sf.write(path, (0.1 * rng.standard_normal(int(d * 16000))).astype(np.float32), 16000)
        recs.append(Recording.from_file(path))
    noise, lines = [], []
    for i in range(20):
        path = tmp / f"n{i:02d}.flac"
        sf.write(path, (0.05 * rng.standard_normal(10 * 16000)).astype(np.float32), 16000)
        noise.append(Recording.from_file(path).to_cut())
        lines.append(json.dumps({"audio_filepath": str(path), "duration": 10.0}))
    cuts = CutSet.from_cuts(r.to_cut() for r in recs)
    cuts.to_file(tmp / "cuts.jsonl.gz")
    CutSet.from_cuts(noise).to_file(tmp / "noise.jsonl.gz")
    (tmp / "noise.json").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(batch_duration=200.0, num_buckets=min(10, files), max_duration=40.0, drop_last=False)
    batches = [[c.id for c in b] for b in build_sampler(cuts, cfg, train=True, seed=0)]
    return {"cuts": str(tmp / "cuts.jsonl.gz"), "noise_cuts": str(tmp / "noise.jsonl.gz"),
            "noise_manifest": str(tmp / "noise.json"), "batches": batches}


def start(python: str, side: str, setup: dict) -> subprocess.Popen:
    proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--worker", side], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    ask(proc, {"cmd": "setup", **setup})
    return proc


def ask(proc: subprocess.Popen, msg: dict) -> dict:
    proc.stdin.write(json.dumps(msg) + "\n")
    proc.stdin.flush()
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with {proc.wait()} on {msg['cmd']}")
        if line.startswith("{"):  # anything else a library printed is not an answer
            return json.loads(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nemo-python", default="/work/nemo_venv/bin/python")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=2, help="model steps per round (the fastest counts)")
    ap.add_argument("--files", type=int, default=120)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model-threads", type=int, default=os.cpu_count() or 1, help="torch threads of the model step")
    ap.add_argument("--tasks", default="model,data", help="model, data or both")
    ap.add_argument("--worker", choices=["ours", "nemo"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker_main(args.worker)
    from dataclasses import asdict

    sys.path.insert(0, str(ROOT))
    from nest.objectives import model_preset

    model_cfg = model_preset(args.preset)
    have_nemo = Path(args.nemo_python).is_file() and subprocess.run(
        [args.nemo_python, "-c", "import nemo.collections.asr"], capture_output=True).returncode == 0
    with tempfile.TemporaryDirectory() as d:
        setup = {**make_data(Path(d), args.files), "preset": args.preset, "batch": args.batch,
                 "seconds": args.seconds, "steps": args.steps, "model_threads": args.model_threads,
                 "encoder": asdict(model_cfg.encoder), "quantizer": asdict(model_cfg.quantizer)}
        sides = {"ours": start(sys.executable, "ours", setup)}
        if have_nemo:
            sides["nemo"] = start(args.nemo_python, "nemo", setup)
        best: dict = {}
        for _ in range(args.rounds):
            tasks = args.tasks.split(",") + (["raw"] if "data" in args.tasks else [])
            for task in tasks:
                for side, proc in sides.items():
                    if task == "raw" and side == "nemo":
                        continue
                    r = ask(proc, {"cmd": task})
                    rate = r["audio_s"] / (r["step_s"] if task == "model" else r["seconds"])
                    best[(side, task)] = max(best.get((side, task), 0.0), rate)
        for proc in sides.values():
            proc.stdin.close()
            proc.wait()
    def get(key):
        return best.get(key, 0.0)

    ratio = (lambda a, b: round(a / b, 3) if a and b else None)
    print(json.dumps({
        "preset": args.preset, "batch": args.batch, "seconds_per_utterance": args.seconds, "files": args.files,
        "nemo": have_nemo,
        "model_audio_s_per_s": round(get(("ours", "model")), 2),
        "nemo_model_audio_s_per_s": round(get(("nemo", "model")), 2) if have_nemo else None,
        "model_step_vs_nemo": ratio(get(("ours", "model")), get(("nemo", "model"))),
        "data_audio_s_per_s": round(get(("ours", "data")), 1),
        "nemo_data_audio_s_per_s": round(get(("nemo", "data")), 1) if have_nemo else None,
        "raw_decode_audio_s_per_s": round(get(("ours", "raw")), 1),
        "data_path_vs_nemo": ratio(get(("ours", "data")), get(("nemo", "data"))),
        "data_path_vs_raw_decode": ratio(get(("ours", "data")), get(("ours", "raw"))),
        "nemo_data_path_vs_raw_decode": ratio(get(("nemo", "data")), get(("ours", "raw"))),
        "model_threads": args.model_threads, "rounds": args.rounds, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }))


if __name__ == "__main__":
    main()

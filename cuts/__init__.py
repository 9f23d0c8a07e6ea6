"""Data: CutSets, noise sets, duration bins, sampler, dataset and the training data feed for NEST pretraining."""
import os
import shutil


def _configure_audio_backend() -> None:
    """Lhotse's default audio backend, less two members that only cost here:

    - sph2pipe, when its binary is absent (it must be downloaded separately): libsndfile then reads
      SPHERE files (PCM SPHERE works; shorten-compressed SPHERE still needs sph2pipe on PATH);
    - the torchaudio backends: torchaudio 2.9+ has no audio I/O of its own, and asking whether they
      apply costs an import-system lookup on every file read.
    A user's LHOTSE_AUDIO_BACKEND is left alone.
    """
    if os.environ.get("LHOTSE_AUDIO_BACKEND"):
        return
    from lhotse.audio import backend as b

    if b.CURRENT_AUDIO_BACKEND is not None:
        return
    default = b.get_default_audio_backend()
    if not isinstance(default, b.CompositeAudioBackend):
        return
    drop = (b.TorchaudioDefaultBackend, b.TorchaudioFFMPEGBackend)
    if not shutil.which("sph2pipe"):
        drop += (b.Sph2pipeSubprocessBackend,)
    b.set_current_audio_backend(b.CompositeAudioBackend([x for x in default.backends if not isinstance(x, drop)]))


_configure_audio_backend()

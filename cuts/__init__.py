"""Data: CutSets, noise sets, duration bins, sampler, dataset and datamodule for NEST pretraining."""
import os
import shutil


def _read_sphere_with_libsndfile() -> None:
    """Lhotse sends every .sph file to the sph2pipe binary, which must be downloaded separately.
    Where it is absent, let libsndfile read SPHERE files instead (PCM SPHERE works; shorten-compressed
    SPHERE still needs sph2pipe on PATH)."""
    if shutil.which("sph2pipe") or os.environ.get("LHOTSE_AUDIO_BACKEND"):
        return
    from lhotse.audio import backend as b

    default = b.get_default_audio_backend()
    if isinstance(default, b.CompositeAudioBackend) and b.CURRENT_AUDIO_BACKEND is None:
        kept = [x for x in default.backends if not isinstance(x, b.Sph2pipeSubprocessBackend)]
        b.set_current_audio_backend(b.CompositeAudioBackend(kept))


_read_sphere_with_libsndfile()

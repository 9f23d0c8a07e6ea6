"""Every exception type of ``nest``: the bottom layer, so that any layer can raise and any command can catch them.

Each is an error whose message is the whole story for the user (it names the key, file or flag and says what
to do): the commands print it on one line, without a traceback. The data side (``cuts``) has its own.
"""


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names the key."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


class FeatureError(ValueError):
    """A k-means feature source that cannot be used; the message names the flag or file and what to do."""


class ProbeError(ValueError):
    """Input the probe cannot use; the message names the file, cut or key and what to do."""


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss."""


class DataLoadError(RuntimeError):
    """Too many cuts of the recent batches failed to load."""


class CalibrationError(ValueError):
    """Calibration cannot give batch sizes (one utterance does not fit, the device failed); the message says why
    and what to do."""

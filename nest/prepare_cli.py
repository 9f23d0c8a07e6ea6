"""prepare.py's command line: the data commands of :mod:`cuts.cli` and the model-side ones (calibrate, kmeans)."""
from __future__ import annotations

from cuts.cli import main as data_main
from nest.calibrate import add_parser as add_calibrate
from nest.kmeans import add_parser as add_kmeans


def _data_config(path, overrides):
    from nest.config.load import load_config  # torch and the models load only for the commands that need them

    return load_config(path, overrides).data  # a malformed file is a ConfigError naming it and the line


def add_run_config(subparsers) -> None:
    """``bins`` and ``report`` follow the data section of a training config: ``--config YAML`` and ``key=value``."""
    for name in ("bins", "report"):
        p = subparsers.choices[name]
        p.add_argument("--config", default=None, help="training config (YAML) whose data section to follow")
        p.add_argument("overrides", nargs="*", help="config key=value, as given to nest-train")
        p.set_defaults(read_data_config=_data_config)


def main(argv=None) -> int:
    """``prepare.py COMMAND ...`` (also installed as ``nest-prepare``)."""
    return data_main(argv, extra=[add_calibrate, add_kmeans, add_run_config])

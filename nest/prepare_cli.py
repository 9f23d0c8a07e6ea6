"""prepare.py's command line: the data commands of :mod:`cuts.cli` and the model-side ones (calibrate, kmeans)."""
from __future__ import annotations

from cuts.cli import main as data_main
from nest.calibrate import add_parser as add_calibrate
from nest.kmeans import add_parser as add_kmeans


def main(argv=None) -> int:
    """``prepare.py COMMAND ...`` (also installed as ``nest-prepare``)."""
    return data_main(argv, extra=[add_calibrate, add_kmeans])

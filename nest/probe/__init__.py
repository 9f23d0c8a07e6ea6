"""Does pretraining help? A frozen-encoder probe (``python -m nest.probe``, ``nest-probe``; see nest.probe.run).

Import order: features (sources, labels, pooled features and their cache) -> head -> run (the command).
"""
from nest.probe.features import FeatureSet, label_of, load_source
from nest.probe.head import LayerWeightedSum, ProbeHead
from nest.probe.run import main, run_probe

"""HuBERT-style k-means targets (``nest-prepare kmeans``, ``python -m nest.kmeans``; see nest.kmeans.cli).

Import order: features (MFCC or encoder frames, label layout) -> fit -> sample (the frames a fit sees) -> label -> cli.
"""
from nest.kmeans.features import FeatureRecipe, Featurizer, mfcc, mfcc_recipe
from nest.kmeans.fit import KMeansOptions, assign, fit_kmeans, load_kmeans
from nest.kmeans.label import run_kmeans
from nest.kmeans.cli import add_parser, main

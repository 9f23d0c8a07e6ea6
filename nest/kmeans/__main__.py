"""python -m nest.kmeans"""
import sys

from nest.kmeans.cli import main

sys.exit(main())

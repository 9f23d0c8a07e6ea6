"""python -m nest.probe"""
import sys

from nest.probe.run import main

sys.exit(main())

#!/usr/bin/env python
"""NEST pretraining: python train.py --config configs/X.yaml key=value ...

Every key of every section (data, model, optim, trainer) can be set with key=value; `--help`
lists them with their defaults. Unknown keys and wrong types fail at start-up.
"""
import argparse
import json
import logging
import sys

from nest.config import ConfigError, describe, load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Sections and keys with their defaults:\n\n" + describe(),
    )
    parser.add_argument("--config", help="YAML file (e.g. configs/nest_tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. trainer.max_steps=1000")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        from nest.run import train  # after the config is checked: importing Lightning takes seconds

        summary = train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

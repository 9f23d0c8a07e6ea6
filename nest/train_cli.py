"""NEST pretraining: train.py --config configs/X.yaml key=value ...  (also installed as ``nest-train``)

Every key of every section (data, model, optim, trainer) can be set with key=value; `--help` lists them
with their defaults and meaning. Unknown keys, wrong types and values out of range fail at start-up.
"""
import argparse
import json
import sys

from cuts.console import HelpFormatter, configure_logging as command_logging, one_line
from nest.config import describe, load_config
from nest.errors import ConfigError
from nest.summary import summary_line


EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped early by a signal, last.ckpt written; run again with resume=auto


def configure_logging() -> None:
    """Our lines and Lightning's from INFO (with the time: runs last days), other libraries' from WARNING."""
    command_logging("%(asctime)s %(levelname)s %(name)s: %(message)s",
                    ("nest", "cuts", "pytorch_lightning", "lightning_fabric"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="train.py", description=__doc__, formatter_class=HelpFormatter,
        epilog="Sections and keys with their defaults:\n\n" + describe(),
    )
    parser.add_argument("--config", help="YAML file (e.g. configs/nest_tiny.yaml; a bare name is looked up in the "
                                         "repository's configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. trainer.max_steps=1000")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        from nest.training.run import RUN_ERRORS, train  # after the config is checked: importing Lightning takes seconds

        summary = train(cfg)
    except ConfigError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        from nest.training.run import RUN_ERRORS

        if isinstance(e, RUN_ERRORS):
            print(f"error: {one_line(e)}", file=sys.stderr)
            return 1
        raise
    print(json.dumps(summary, indent=1))
    print(summary_line(summary))  # the line README quotes, as `python -m nest.summary` and the recipes end with
    if summary.get("stopped_by"):  # not finished: a recipe must not mark its training stage done
        print(f"stopped by {summary['stopped_by']} at step {summary['steps']}: continue with resume=auto",
              file=sys.stderr)
        return EXIT_STOPPED
    return 0

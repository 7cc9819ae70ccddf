"""The ``alignkit`` command: one sub-command per stage, plus data and built-in helpers.

    alignkit sft --config configs/sft/tiny.yaml [--resume] [--section.key=value ...]

Bad data, configs and model paths end with a one-paragraph message and exit code 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from alignkit.config import ConfigError, load_config, parse_overrides
from alignkit.engine import TrainingError
from alignkit.modeling import ModelLoadError
from alignkit.schema import DataError

# Stage name -> (module, config class name, train function name); imported lazily so
# `alignkit --help` stays fast.
STAGES = {
    "sft": ("alignkit.sft", "SFTConfig", "train_sft"),
    "rm": ("alignkit.rm", "RMConfig", "train_rm"),
    "ppo": ("alignkit.ppo", "PPOConfig", "train_ppo"),
    "dpo": ("alignkit.dpo", "DPOConfig", "train_dpo"),
    "kto": ("alignkit.dpo", "KTOConfig", "train_kto"),
    "classifier": ("alignkit.classifier", "ClassifierConfig", "train_classifier"),
    "pipeline": ("alignkit.pipeline", "PipelineConfig", "run_pipeline"),
}
EXTRA_COMMANDS = {}  # name -> (add_arguments(parser), run(args) -> int); filled by modules below


def _stage_parser(sub, name):
    p = sub.add_parser(name, help=f"train the {name} stage", description=f"Run the {name} stage from a YAML config. "
                       "Override any field with --section.key=value.")
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def run_stage(name: str, config: str | None, overrides: list[str], resume: bool = False, print_only: bool = False):
    import importlib

    mod_name, cls_name, fn_name = STAGES[name]
    mod = importlib.import_module(mod_name)
    cfg = load_config(getattr(mod, cls_name), config, parse_overrides(overrides))
    if resume:
        if not hasattr(cfg, "train"):
            raise ConfigError(f"--resume is not supported by the {name} stage")
        cfg.train.resume = True
    if print_only:
        import yaml

        from alignkit.config import to_dict

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return None
    return getattr(mod, fn_name)(cfg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignkit", description="SFT -> reward model -> PPO on one feedback schema.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in STAGES:
        _stage_parser(sub, name)
    from alignkit import commands

    commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command in STAGES:
            summary = run_stage(args.command, args.config, rest, resume=args.resume, print_only=args.print_config)
            if summary is not None and os.environ.get("RANK", "0") == "0":
                import json

                print(json.dumps(summary, indent=2, default=str))
            return 0
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return args.func(args)
    except (DataError, ConfigError, ModelLoadError) as e:
        print(f"alignkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"alignkit {args.command}: training stopped: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

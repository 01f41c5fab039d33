"""The `iclmix` console command: one parser, subcommands contributed by each package."""

from __future__ import annotations

import argparse
import sys

from icl_core.errors import ConfigError, NonFiniteLossError


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("icl-mixtures")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    from analysis import cli as analysis_cli
    from icl_core import cli as core_cli
    from sweeps import cli as sweep_cli

    parser = argparse.ArgumentParser(prog="iclmix", description="ICL Mixtures: pretraining-coverage sweeps.")
    parser.add_argument("--version", action="version", version=f"iclmix {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    core_cli.add_commands(sub)
    sweep_cli.add_commands(sub)
    analysis_cli.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"iclmix: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"iclmix: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `iclmix sweep plan F | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("iclmix: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

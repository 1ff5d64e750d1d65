"""`python -m benchmarks.robustness`: the command line (the usage text is the package's docstring)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import signal
import sys
from pathlib import Path

import benchmarks.robustness as package
from benchmarks.robustness.runner import ISSUE_DURATIONS, PHASES, QUICK_DURATIONS, run
from common.errors import UserError
from common.paths import REPO_ROOT


def _limit(text: str) -> int | str:
    """--front-proxy-limit: a number of calls (at least 1) or `auto`."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of calls or auto, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"at least 1, not {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.robustness", description=package.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=REPO_ROOT / "model_repository")
    parser.add_argument("--output", type=Path, default=None,
                        help="results directory (default benchmarks/results/<date>-<machine>-robustness)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    parser.add_argument("--quick", action="store_true", help="seconds per phase: a smoke test, not figures")
    parser.add_argument("--data", type=Path, default=None, help="dataset (default: the checkpoint's)")
    parser.add_argument("--images", type=int, default=2000, help="test images the load draws from")
    parser.add_argument("--no-pin", action="store_true", help="capacity and overload: gateway and load "
                        "generator share every core (default: disjoint cores, as benchmarks.run)")
    parser.add_argument("--gateway-arg", action="append", default=[], metavar="ARG",
                        help="added to every gateway's command line (repeat; e.g. --gateway-arg=--budget-reserve "
                             "--gateway-arg=0.3): experiments, not the defaults the targets are about")
    parser.add_argument("--front-proxy-limit", type=_limit, default=None, metavar="N|auto",
                        help="capacity and overload through nginx (deploy/nginx; on the gateway's cores) refusing "
                             "calls beyond N in flight (auto: the gateway's own admission bound, from its start-up "
                             "log): the deployment that refuses before Python (default: none)")
    parser.add_argument("--front-proxy-template", type=Path, default=None, metavar="PATH",
                        help="with --front-proxy-limit: nginx's configuration template (default: "
                             "deploy/nginx/templates/default.conf.template; the same ${EE_...} placeholders)")
    for name, default in ISSUE_DURATIONS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=None,
                            help=f"default {default} ({QUICK_DURATIONS[name]} with --quick)")
    args = parser.parse_args(argv)
    phases = [phase.strip() for phase in args.phases.split(",") if phase.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if args.front_proxy_template is not None and args.front_proxy_limit is None:
        raise UserError("--front-proxy-template needs --front-proxy-limit")
    if args.front_proxy_template is not None and not args.front_proxy_template.is_file():
        raise UserError(f"--front-proxy-template: no file {args.front_proxy_template}")
    if unknown:
        raise UserError(f"unknown phases {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    durations = dict(QUICK_DURATIONS if args.quick else ISSUE_DURATIONS)
    for name in durations:
        if getattr(args, name) is not None:
            durations[name] = getattr(args, name)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the servers started here stop
    stamp = dt.datetime.now().strftime("%Y-%m-%d")
    output = args.output or REPO_ROOT / "benchmarks" / "results" / f"{stamp}-{platform.node()}-robustness"
    command = "python -m benchmarks.robustness " + " ".join(sys.argv[1:] if argv is None else argv)
    document = run(args.model_repository, output, phases, durations, args.data, args.images, command,
                   pin=not args.no_pin, gateway_args=tuple(args.gateway_arg), front_proxy_limit=args.front_proxy_limit,
                   front_proxy_template=args.front_proxy_template)
    print(json.dumps(document["targets"], indent=2))
    print(f"results in {output / 'robustness.json'}")
    return 0

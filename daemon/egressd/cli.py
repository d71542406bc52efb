"""The `egressd` command: run, check-config, demo, uninstall-rules."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .errors import EgressdError, ValidationError

DEFAULT_CONFIG = "/etc/egressd/egressd.toml"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="egressd", description="Egress firewall daemon for Linux nodes.")
    p.add_argument("--version", action="version", version=f"egressd {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the daemon in the foreground")
    r.add_argument("--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    c = sub.add_parser("check-config", help="validate a config file and the policy files it names")
    c.add_argument("path")
    sub.add_parser("demo", help="build a throw-away namespace lab and show egressd enforcing policies")
    u = sub.add_parser("uninstall-rules", help="remove egressd's nftables table on purpose (opens the node)")
    u.add_argument("--yes", action="store_true", help="do not ask")
    return p


def _print_errors(e: ValidationError) -> None:
    for fe in e.errors:
        print(f"error: {fe}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "check-config":
            from .baked import load_baked

            baked = load_baked(args.path)
            print(
                f"ok: {args.path}: {len(baked.policies)} policies, {len(baked.bindings)} workspace bindings, "
                f"{len(baked.workloads)} workloads"
            )
            return 0
        if args.cmd == "run":
            from .daemon import run

            return run(args.config)
        if args.cmd == "demo":
            from .demo import main as demo_main

            return demo_main()
        if args.cmd == "uninstall-rules":
            from .core.ruleset import delete_table
            from .libnft import Nft

            if not args.yes:
                print("This removes egressd's rules: restricted workloads become unrestricted. Use --yes.", file=sys.stderr)
                return 2
            Nft().run(delete_table())
            print("removed table inet egressd")
            return 0
    except ValidationError as e:
        _print_errors(e)
        return 2
    except EgressdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())

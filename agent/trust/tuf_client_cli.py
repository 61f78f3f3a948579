"""`edgefleet-tuf-client`: the tuf-conformance client protocol, driving the agent's `TrustClient`.

    edgefleet-tuf-client --metadata-dir D init ROOT
    edgefleet-tuf-client --metadata-dir D --metadata-url U refresh
    edgefleet-tuf-client --metadata-dir D --metadata-url U --target-name P [--target-name P2 ...]
                         --target-base-url T --target-dir X download

Exit 0 on full success, 1 on any failure. Trusted metadata lives in D under unversioned names
(`root.json`, `timestamp.json`, ...); targets are stored in X under their URL-quoted target
path, and a target already there with matching hashes is not downloaded again.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from agent.errors import EdgefleetError
from agent.logs import configure_logging
from agent.trust.client import TrustClient
from agent.trust.fetchers import http_fetcher

logger = logging.getLogger("edgefleet.tuf_client")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgefleet-tuf-client",
        description="TUF client (tuf-conformance CLI protocol) backed by the edgefleet agent's trust code.",
    )
    p.add_argument("--metadata-dir", required=True, type=Path, help="trusted metadata directory")
    p.add_argument("--metadata-url", help="base URL of the repository's metadata")
    p.add_argument("--target-name", action="append", default=[], help="target path (repeatable)")
    p.add_argument("--target-base-url", help="base URL of the repository's targets")
    p.add_argument("--target-dir", type=Path, help="where verified targets are stored")
    p.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING or ERROR")
    sub = p.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="trust ROOT (copied into the metadata dir; no network)")
    init.add_argument("trusted_root", type=Path)
    sub.add_parser("refresh", help="update top-level metadata")
    sub.add_parser("download", help="refresh, then download the --target-name targets in order")
    return p


def _client(args: argparse.Namespace) -> TrustClient:
    if not args.metadata_url:
        raise SystemExit("--metadata-url is required for this command")
    target_dir = args.target_dir or (args.metadata_dir / "targets")
    return TrustClient(
        metadata_dir=args.metadata_dir,
        target_dir=target_dir,
        fetcher=http_fetcher(),
        metadata_base_url=args.metadata_url,
        targets_base_url=args.target_base_url or "",
    )


def run(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    args = _parser().parse_args(argv)
    configure_logging(level=args.log_level)
    try:
        if args.command == "init":
            args.metadata_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(args.trusted_root, args.metadata_dir / "root.json")
            return 0
        client = _client(args)
        if args.command == "refresh":
            client.refresh()
            return 0
        if not args.target_name or not args.target_base_url or not args.target_dir:
            print("download needs --target-name, --target-base-url and --target-dir", file=sys.stderr)
            return 1
        with client.session() as session:
            for name in args.target_name:
                session.download_target(name)
        return 0
    except (EdgefleetError, OSError) as exc:
        print(f"edgefleet-tuf-client: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())


if __name__ == "__main__":  # pragma: no cover
    main()

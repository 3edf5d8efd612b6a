"""``python -m credproxy.devidp``: the development IdP as a process (demo, tests, benchmarks).

It serves a fresh :class:`~.idp.DevIdP` on loopback until SIGTERM or SIGINT,
prints the token URL on stdout once serving and logs one line per event on
stderr (fingerprints only); ``--mint`` writes a first login for
``credproxy import`` and ``--port-file`` the URL, both atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from functools import partial
from pathlib import Path

# The command line runs the server; the state machine (idp.py) stays sans-IO.
import trio  # noqa: TID251

from credproxy.devidp.idp import DevIdP, fingerprint
from credproxy.devidp.server import serve_listeners

__all__ = ["main"]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m credproxy.devidp",
        description=(
            "Development OAuth token endpoint on loopback: short-lived access tokens, "
            "rotating refresh tokens, family revocation on refresh-token reuse."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind (default 0: any free)")
    parser.add_argument(
        "--lifetime", type=float, default=60, help="access token lifetime in seconds (default 60)"
    )
    parser.add_argument("--client-id", default="credproxy-dev", help="accepted client_id")
    parser.add_argument(
        "--device-interval",
        type=float,
        default=5,
        help="polling interval announced by the device flow, seconds (default 5)",
    )
    parser.add_argument(
        "--device-expires-in",
        type=float,
        default=600,
        help="lifetime of a device code, seconds (default 600)",
    )
    parser.add_argument(
        "--mint",
        metavar="FILE",
        type=Path,
        help="write a freshly minted token as JSON to FILE (mode 0600), for `credproxy import`",
    )
    parser.add_argument(
        "--port-file", metavar="FILE", type=Path, help="write the token URL to FILE once serving"
    )
    args = parser.parse_args(argv)
    if args.lifetime <= 0:
        parser.error("--lifetime must be positive")
    if args.device_interval < 0 or args.device_expires_in <= 0:
        parser.error("--device-interval must not be negative, --device-expires-in must be positive")
    return args


def _write_private(path: Path, text: str) -> None:
    """Write *text* to *path* atomically with mode 0600.

    Atomic because scripts poll for these files: they must never see one
    half-written. mkstemp creates the file 0600 from the start.
    """
    path = path.expanduser()
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def _run(args: argparse.Namespace) -> int:
    idp = DevIdP(
        lifetime=args.lifetime,
        client_id=args.client_id,
        device_interval=args.device_interval,
        device_expires_in=args.device_expires_in,
    )
    # Bound outside any nursery, so "address already in use" arrives as a plain
    # OSError rather than wrapped in an ExceptionGroup.
    listeners = await trio.open_tcp_listeners(args.port, host=args.host)
    # The receiver is open before the URL is announced, so a SIGTERM sent the
    # moment a script sees the URL is handled here, not by Python's default.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(partial(serve_listeners, idp, listeners, log=_stderr))
            # Mint before announcing: once the URL (or port file) appears, the
            # token file is complete.
            if args.mint is not None:
                token = idp.mint()
                await trio.to_thread.run_sync(
                    _write_private, args.mint, json.dumps(token, indent=2) + "\n"
                )
                _stderr(
                    f"devidp: minted family 1 into {args.mint} "
                    f"(refresh token {fingerprint(token['refresh_token'])})"
                )
            if args.port_file is not None:
                await trio.to_thread.run_sync(_write_private, args.port_file, url + "\n")
            print(url, flush=True)
            async for signum in signals:
                _stderr(f"devidp: {signal.Signals(signum).name}, stopping")
                nursery.cancel_scope.cancel()
                break
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the development IdP until SIGTERM or SIGINT; returns the exit status (0).

    Prints the token URL as one line on stdout once serving; logs one line per
    refresh on stderr (fingerprints only). Exits 2 on bad arguments and 1 if
    the address cannot be bound or a file cannot be written.
    """
    args = _parse_args(argv)
    try:
        return trio.run(_run, args)
    except OSError as exc:
        _stderr(f"devidp: {exc}")
        return 1

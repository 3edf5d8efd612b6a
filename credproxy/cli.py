"""The ``credproxy`` command: argument wiring only.

``credproxy token`` runs inside sandboxes on every API call, so it is
dispatched before anything else is imported (not even argparse); host-side
commands import what they need when they run.
"""

from __future__ import annotations

import sys

from credproxy.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    CredproxyError,
    DaemonUnavailable,
    UsageError,
)

# `typing` costs ~5 ms of `credproxy token`'s start-up; annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["token"]:
        from credproxy.inner.client import token_main

        return token_main(args[1:])
    if args[:1] == ["forward"]:
        from credproxy.inner.forward import main as forward_main

        return forward_main(args[1:])
    if args[:1] == ["git-credential"]:
        from credproxy.inner.gitcred import main as git_credential_main

        return git_credential_main(args[1:])
    if args[:2] == ["key", "get"]:
        from credproxy.inner.client import key_get_main

        return key_get_main(args[2:])
    parser = _parser()
    ns, extra = parser.parse_known_args(args)
    if ns.command == "import" and not any(e.startswith("-") and e != "-" for e in extra):
        ns.args += extra  # `import PROVIDER --bucket B FILE`: FILE comes after the option
    elif extra:
        words = (
            ns.command,
            getattr(ns, "key_command", None),
            getattr(ns, "signing_key_command", None),
        )
        prog = " ".join(["credproxy", *(w for w in words if w)])
        _usage_error(prog, f"unrecognized arguments: {' '.join(extra)}")
    if ns.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        result: int = ns.func(ns)
        return result
    except CredproxyError as exc:
        print(f"credproxy {ns.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`credproxy status | head -1`): nothing to say,
        # and nothing more written at exit (Python's own advice for SIGPIPE).
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE


def _parser() -> Any:
    import argparse

    from credproxy._version import __version__ as version

    class Parser(argparse.ArgumentParser):
        """argparse's parser, whose usage errors are one line (as every failure's)."""

        def error(self, message: str) -> NoReturn:
            _usage_error(self.prog, message)

    # (Subparsers are made of the same class as their parent.)
    p = Parser(
        prog="credproxy",
        description="Serve OAuth access tokens to sandboxes; keep refresh tokens on the host.",
        epilog="`credproxy COMMAND --help` says more about each command; the exit codes "
        "and the errors a user can meet are in docs/cli.md.",
    )
    p.add_argument("--version", action="version", version=f"credproxy {version}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("serve", help="run the daemon in the foreground")
    s.add_argument(
        "--idle-exit",
        type=_seconds,
        metavar="SECONDS",
        help="exit 0 after this long with no session and no connection",
    )
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser(
        "run",
        help="run a command with a sandbox session",
        description="Open a sandbox session, run CMD with CREDPROXY_SOCKET set, close it after. "
        "'{socket}' in an argument is replaced by the session's socket path.",
        epilog=RUN_GRANTS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="GRANT",
        help="what the session may use (repeatable; the GRANT forms are listed below)",
    )
    s.add_argument(
        "--allow-uid",
        action="append",
        default=[],
        type=int,
        metavar="UID",
        help="also accept connections from this uid (repeatable; root is never implied)",
    )
    s.add_argument("--name", default="", help="a name for the session in status and logs")
    s.add_argument(
        "--capability",
        action="store_true",
        help="require a capability token, handed to CMD on fd 3 "
        "(CREDPROXY_CAPABILITY_FD=3, LLXPRT_CAPABILITY_FD=3), not in the environment; "
        "HTTP clients send it as Proxy-Authorization: Bearer TOKEN "
        "(credproxy forward does so itself)",
    )
    s.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    s.set_defaults(func=cmd_run)

    # Dispatched before argparse (see main); listed here for --help.
    sub.add_parser("token", help="(inside a sandbox) print an access token", add_help=False)
    sub.add_parser(
        "forward",
        help="(inside a sandbox) run CMD with a base URL on 127.0.0.1 that reaches the API proxy",
        add_help=False,
    )
    sub.add_parser(
        "git-credential",
        help="(inside a sandbox) a git credential helper that answers with a granted token",
        add_help=False,
    )

    s = sub.add_parser(
        "import",
        help="store a token given as JSON, or adopt another tool's login (--from)",
        description="Store a token given as JSON. With --from TOOL, adopt the login of "
        "claude-code, codex, gemini-cli or qwen-code from its own credentials file (FILE "
        "defaults to the tool's usual path); the tool must then no longer refresh its copy.",
    )
    # One positional list: argparse would otherwise bind an optional FILE together
    # with PROVIDER and refuse `import PROVIDER --bucket B FILE`.
    s.add_argument(
        "args",
        nargs="+",
        metavar="PROVIDER [FILE|-]",
        help="provider name, then a JSON file or - for stdin (default)",
    )
    s.add_argument("--bucket", default="default")
    s.add_argument(
        "--from",
        dest="from_tool",
        metavar="TOOL",
        help="adopt the login in TOOL's credentials file: "
        "claude-code, codex, gemini-cli or qwen-code",
    )
    s.add_argument(
        "--retire-source",
        action="store_true",
        help="with --from: replace the refresh token in TOOL's file with a marker so "
        "that TOOL cannot spend it (a 0600 backup of the file is kept)",
    )
    s.add_argument(
        "--force",
        action="store_true",
        help="store the token even if the one stored already expires later "
        "(it may hold the newer, rotated refresh token)",
    )
    s.set_defaults(func=cmd_import)

    s = sub.add_parser(
        "login",
        help="log in to a provider on this host and store the token",
        description="Log in with the device flow (RFC 8628), the browser and a loopback "
        "redirect (PKCE), or by pasting the code; the token is stored like `import` does "
        "and a running daemon serves it at once. Only the user code is shown, no secret.",
    )
    s.add_argument("provider")
    s.add_argument("--bucket", default="default")
    s.add_argument(
        "--flow",
        choices=["device", "loopback", "paste"],
        help="default: the provider's flow, else device when it has a "
        "device_authorization_url, else loopback",
    )
    s.add_argument(
        "--no-browser", action="store_true", help="print the URL instead of opening a browser"
    )
    s.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        help="give up after this long (default 300 for loopback and paste; "
        "the device flow ends when its code expires)",
    )
    s.set_defaults(func=cmd_login)

    s = sub.add_parser("logout", help="remove a stored token (its renewals stop)")
    s.add_argument("provider")
    s.add_argument("--bucket", default="default")
    s.set_defaults(func=cmd_logout)

    k = sub.add_parser("key", help="store or remove API keys; (inside a sandbox) read one")
    ksub = k.add_subparsers(dest="key_command", metavar="ACTION", required=True)
    # Dispatched before argparse (see main): it runs inside sandboxes.
    ksub.add_parser(
        "get", help="(inside a sandbox) print a granted API key (key:NAME)", add_help=False
    )
    s = ksub.add_parser("set", help="store an API key read from stdin")
    s.add_argument("name")
    s.set_defaults(func=cmd_key_set)
    s = ksub.add_parser("rm", help="remove an API key")
    s.add_argument("name")
    s.set_defaults(func=cmd_key_rm)

    k = sub.add_parser(
        "signing-key",
        help='keep a signing grant\'s private key in the store (private_key = "store:NAME")',
        description="Keep the private key of a signing grant (docs/signing.md) in credproxy's "
        "store, apart from the API keys a sandbox may be granted; a provider then names it "
        'with private_key = "store:NAME" (or key_file = "store:NAME" for Google\'s JSON key).',
    )
    ksub = k.add_subparsers(dest="signing_key_command", metavar="ACTION", required=True)
    s = ksub.add_parser(
        "import", help="copy a private key file (PEM or Google's JSON) into the store"
    )
    s.add_argument("name")
    s.add_argument("file", help="the key file; checked to be a key, stored 0600 as it is")
    s.set_defaults(func=cmd_signing_key_import)
    s = ksub.add_parser("list", help="the names of the stored signing keys")
    s.set_defaults(func=cmd_signing_key_list)
    s = ksub.add_parser("rm", help="remove a stored signing key")
    s.add_argument("name")
    s.set_defaults(func=cmd_signing_key_rm)

    s = sub.add_parser("status", help="sessions, grants, tokens and renewals (no secrets)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser(
        "release",
        help="end the quota holds on a provider's buckets (all of them, or P:B for one)",
        description="End the quota holds on PROVIDER (every bucket) or PROVIDER:BUCKET, "
        "whoever set them: the daemon (an upstream 429) or a sandbox (report_failure). "
        "Every session's failover profile of PROVIDER starts again from its first bucket. "
        "`credproxy status` lists the holds.",
    )
    s.add_argument("target", metavar="PROVIDER[:BUCKET]")
    s.set_defaults(func=cmd_release)

    s = sub.add_parser(
        "reload",
        help="make the running daemon re-read its config file",
        description="The running daemon re-reads its config file (as on SIGHUP, or when the "
        "file changes): new requests of running sessions get the new providers, api sections, "
        "limits and failover settings their grants allow. A bad file is refused with its "
        "line and field, and the daemon keeps the configuration it runs with (exit 2).",
    )
    s.set_defaults(func=cmd_reload)

    s = sub.add_parser(
        "stop",
        help="stop the running daemon cleanly (as SIGTERM does)",
        description="Stop the running daemon as SIGTERM does: sessions close, refreshes "
        "already sent upstream finish and are written. Returns once the daemon has exited.",
    )
    s.add_argument(
        "--timeout",
        type=_seconds,
        default=20.0,
        metavar="SECONDS",
        help="how long to wait for it to exit (default 20)",
    )
    s.set_defaults(func=cmd_stop)

    s = sub.add_parser("install-units", help="write the systemd user units")
    s.add_argument("--user", action="store_true", default=True, help="(default) user units")
    s.set_defaults(func=cmd_install_units)
    return p


RUN_GRANTS_HELP = """\
GRANT is one of:
  PROVIDER         every bucket (account) of PROVIDER: its tokens and its API
  PROVIDER:BUCKET  one bucket of PROVIDER
  PROVIDER:B1,B2   those buckets as a profile: without a bucket, the first that
                   can serve is served (failover in that order)
  api:PROVIDER     PROVIDER's API through the HTTP proxy only, for every bucket;
                   the tokens themselves are never served to the sandbox
  api:PROVIDER:BUCKET  one bucket's API through the HTTP proxy only
  key:NAME         the API key NAME (inside: credproxy key get NAME)
  '*'              everything: every provider, bucket, API and key
Without --allow, the config's [sandbox] default_allow is used. A grant that
names nothing configured is warned about at once (the sandbox itself is told
no more than "not found"); see docs/cli.md."""


def _seconds(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


# --- host commands ------------------------------------------------------------


def cmd_serve(ns: Any) -> int:
    from credproxy.shell import daemon

    return daemon.main(ns.idle_exit)


def _store() -> Any:
    from credproxy.shell import faults, paths
    from credproxy.shell.store import TokenStore

    root = paths.state_dir()
    # The same check the daemon makes at start: refuse a state directory of
    # another uid, repair (and say so) one that others may write to.
    repaired = paths.secure_dir(root, what="state directory", follow_symlinks=True)
    if repaired is not None:
        print(
            f"credproxy: warning: the state directory {root} was mode {repaired:04o}; "
            "it is 0700 now (only you may read your tokens)",
            file=sys.stderr,
        )
    return TokenStore(root, faults.from_env())


def _notify_daemon(provider: str, bucket: str) -> None:
    """Tell a running daemon that a token changed; fine if none runs, said if it did not hear."""
    from credproxy.inner.client import Client, silent_daemon
    from credproxy.shell import paths

    client = Client(paths.control_socket(), timeout=5)
    try:
        try:
            client.connect()
        except CredproxyError:
            if silent_daemon(paths.control_socket()) is None:
                return  # no daemon runs: the next one reads the store
            raise
        client.call("token_changed", {"provider": provider, "bucket": bucket})
    except CredproxyError as exc:
        print(
            f"credproxy: warning: the running daemon was not told that {provider}:{bucket} "
            f"changed ({exc}); until it is, it may serve the old token: run this command "
            "again, or `credproxy stop` (the next `credproxy run` starts a daemon again)",
            file=sys.stderr,
        )
    finally:
        client.close()


def expires_text(left: float) -> str:
    """``expires in 1 h 2 min`` / ``expired 38 s ago``: *left* seconds, said shortly."""
    span = _span(abs(left))
    return f"expires in {span}" if left >= 0 else f"expired {span} ago"


def _span(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 2 * 86400:
        h, m = divmod(s // 60, 60)
        return f"{h} h {m} min" if m else f"{h} h"
    d, h = divmod(s // 3600, 24)
    return f"{d} d {h} h" if h else f"{d} d"


def cmd_import(ns: Any) -> int:
    if len(ns.args) > 2:
        raise UsageError("import takes PROVIDER and at most one FILE")
    file = ns.args[1] if len(ns.args) > 1 else None
    if ns.from_tool is not None:
        return adopt_login(
            ns.args[0], ns.bucket, ns.from_tool, file, ns.retire_source, force=ns.force
        )
    if ns.retire_source:
        raise UsageError("--retire-source goes with --from TOOL")
    return import_token(ns.args[0], ns.bucket, file or "-", force=ns.force)


def import_token(provider: str, bucket: str, file: str, *, force: bool = False) -> int:
    """Read token JSON from *file* (``-``: stdin), validate, store under the key's lock."""
    import json

    from credproxy.core.names import check_name
    from credproxy.errors import NotFound

    check_name("provider", provider)
    check_name("bucket", bucket)
    source = "standard input" if file == "-" else file
    try:
        if file == "-":
            if sys.stdin.isatty():
                print(
                    f"Paste the token JSON for {provider}:{bucket} (access_token, with "
                    "refresh_token and expires_in or expiry), then press Ctrl-D on a line "
                    "of its own:",
                    file=sys.stderr,
                )
            text = _stdin_text("the token (read from stdin)")
        else:
            with open(file, encoding="utf-8") as f:
                text = f.read()
    except FileNotFoundError:
        raise NotFound(f"{source} does not exist (give the token file's path)") from None
    except OSError as exc:
        raise UsageError(f"cannot read {source}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{source} is not UTF-8 text (a token file is JSON)") from None
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise UsageError(
            f"{source} is not valid JSON (line {getattr(exc, 'lineno', '?')})"
        ) from None
    store_token(provider, bucket, raw, older_ok=force)
    return EXIT_OK


def store_token(provider: str, bucket: str, raw: Any, *, older_ok: bool = True) -> dict[str, Any]:
    """Normalize token JSON *raw*, store it under the key's lock, tell the daemon; say so.

    Without *older_ok* (an import), a token that expires before the stored one is
    refused: the stored one may carry the newer, rotated refresh token, which an
    older copy would replace with a spent one (a login lost).
    """
    import os
    import time

    from credproxy.core.tokendata import normalize_token

    token = normalize_token(raw, time.time())
    os.umask(0o077)
    store = _store()
    with store.locked(provider, bucket):
        store.recover_pending(provider, bucket)  # clears leftovers of a killed refresh
        stored = None if older_ok else store.read(provider, bucket)
        new_expiry, old_expiry = token.get("expiry"), (stored or {}).get("expiry")
        if (
            isinstance(new_expiry, int | float)
            and isinstance(old_expiry, int | float)
            and new_expiry < old_expiry
        ):
            raise UsageError(
                f"{provider}:{bucket} already holds a token that expires later "
                f"({expires_text(old_expiry - time.time())}, against "
                f"{expires_text(new_expiry - time.time())}): it may carry the newer, rotated "
                "refresh token, so nothing was stored (--force stores this one anyway)"
            )
        store.write(provider, bucket, token)
    _notify_daemon(provider, bucket)
    expiry = token.get("expiry")
    left = "no expiry" if expiry is None else expires_text(expiry - time.time())
    rt = "with" if token.get("refresh_token") else "without"
    print(f"stored {provider}:{bucket} ({left}, {rt} refresh token)")
    return token


#: The preset that refreshes the login each tool makes (see docs/providers.md).
_ADOPT_PRESETS = {
    "claude-code": "claude",
    "codex": "codex",
    "gemini-cli": "gemini",
    "qwen-code": "qwen",
}


def adopt_login(
    provider: str, bucket: str, tool: str, file: str | None, retire: bool, *, force: bool = False
) -> int:
    """Store the login in *tool*'s credentials file; with *retire*, disable the tool's copy."""
    import os
    from pathlib import Path

    from credproxy.core import adopt
    from credproxy.core.names import check_name
    from credproxy.shell.adopt import read_source, retire_source

    check_name("provider", provider)
    check_name("bucket", bucket)
    if tool not in adopt.TOOLS:
        raise UsageError(f"unknown tool {tool!r}; --from takes one of: {', '.join(adopt.TOOLS)}")
    if file == "-":
        raise UsageError("--from reads the tool's own file: give its path, not -")
    path = Path(file).expanduser() if file else adopt.default_path(tool, Path.home(), os.environ)
    raw = adopt.parse_source(tool, read_source(path), str(path))
    store_token(provider, bucket, raw, older_ok=force)
    title = adopt.TOOLS[tool].title
    if retire:
        backup = retire_source(tool, path, raw["refresh_token"])
        print(
            f"retired the refresh token in {path} (backup: {backup}, mode 0600); "
            f"{title} can no longer refresh that login: give it tokens from credproxy"
        )
    else:
        print(
            f"important: {title} must no longer refresh its copy in {path}; if both refresh "
            "the same refresh token, they log each other out. Stop using that login in "
            f"{title}, or run this again with --retire-source to disable it (a backup is kept)."
        )
    _config_hint(provider, _ADOPT_PRESETS[tool])
    return EXIT_OK


def _config_hint(provider: str, preset: str) -> None:
    """Say how to configure *provider* if the config does not define it yet."""
    from credproxy.errors import ConfigError
    from credproxy.shell import paths

    try:
        if provider in paths.load_config().providers:
            return
    except ConfigError:
        return  # the daemon reports a bad config in full; not this command's business
    print(
        f"note: credproxy cannot refresh {provider} until {paths.config_file()} has "
        f'[providers.{provider}] with preset = "{preset}" (see docs/providers.md)'
    )


def cmd_login(ns: Any) -> int:
    """Run a login flow; store the token only if it succeeded (Ctrl-C stores nothing)."""
    import signal

    from credproxy.core import login
    from credproxy.core.names import DEFAULT_BUCKET, check_name
    from credproxy.errors import NotFound, StoreError
    from credproxy.shell import paths
    from credproxy.shell.login import log_in

    check_name("provider", ns.provider)
    check_name("bucket", ns.bucket)
    cfg = paths.load_config()
    provider = cfg.providers.get(ns.provider)
    if provider is None:
        raise NotFound(
            f"no provider {ns.provider} in {paths.config_file()}; add [providers.{ns.provider}] "
            "(a preset is the quickest: see docs/providers.md)"
        )
    from credproxy.core.presets import PRESETS

    preset = PRESETS.get(provider.preset or "")
    for key, hint in (preset.login_needs if preset is not None else {}).items():
        if not getattr(provider, key, None):
            raise UsageError(
                f"provider {ns.provider} needs {key} to log in: {hint}; set it in "
                f"[providers.{ns.provider}] of {paths.config_file()}"
            )
    if preset is not None and preset.notice:
        print(f"credproxy login: note: {preset.notice}", file=sys.stderr)
    flow = login.choose_flow(ns.provider, provider, ns.flow)
    token = log_in(ns.provider, provider, flow, no_browser=ns.no_browser, give_up_after=ns.timeout)
    # From here on the login has happened: a Ctrl-C must not cut the store
    # write (or the daemon's notice) in half, so SIGINT waits until after.
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        store_token(ns.provider, ns.bucket, token)
    except StoreError as exc:
        # The token is lost with this process (only a new login gets another).
        bucket = "" if ns.bucket == DEFAULT_BUCKET else f" --bucket {ns.bucket}"
        raise StoreError(
            f"the login succeeded but its token was not stored: {exc}; check that the state "
            f"directory {paths.state_dir()} is yours and writable and that its disk has free "
            f"space, then log in again: credproxy login {ns.provider}{bucket}"
        ) from None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return EXIT_OK


def cmd_logout(ns: Any) -> int:
    store = _store()
    with store.locked(ns.provider, ns.bucket):
        removed = store.remove(ns.provider, ns.bucket)
    _notify_daemon(ns.provider, ns.bucket)
    if not removed:
        print(f"credproxy logout: no token stored for {ns.provider}:{ns.bucket}", file=sys.stderr)
        return EXIT_NOT_FOUND
    print(f"removed {ns.provider}:{ns.bucket}")
    return EXIT_OK


def _stdin_text(what: str) -> str:
    """All of standard input as text; not UTF-8 is a usage error (it would fail later)."""
    try:
        text = sys.stdin.read()
        text.encode("utf-8")  # (undecodable bytes come as surrogates in a C locale)
    except UnicodeError:
        raise UsageError(f"{what} is not UTF-8 text") from None
    return text


def cmd_key_set(ns: Any) -> int:
    import os

    from credproxy.core.names import check_name

    check_name("key", ns.name)
    if sys.stdin.isatty():
        print(f"Enter the value of {ns.name}, then Ctrl-D:", file=sys.stderr)
    value = _stdin_text("the key value (read from stdin)")
    if value.endswith("\n"):
        value = value[:-1]
    if not value:
        raise UsageError("the key value (read from stdin) is empty")
    os.umask(0o077)
    _store().write_key(ns.name, value)
    print(f"stored key {ns.name}")
    return EXIT_OK


def cmd_key_rm(ns: Any) -> int:
    if not _store().remove_key(ns.name):
        print(f"credproxy key rm: no key named {ns.name}", file=sys.stderr)
        return EXIT_NOT_FOUND
    print(f"removed key {ns.name}")
    return EXIT_OK


def cmd_signing_key_import(ns: Any) -> int:
    """Check that FILE is a key credproxy can sign with, then keep a 0600 copy under NAME."""
    import os
    import stat

    from credproxy.core.names import check_name
    from credproxy.errors import NotFound
    from credproxy.shell.signing_keys import MAX_KEY_FILE_BYTES, describe_key

    check_name("signing key", ns.name)
    try:
        with open(ns.file, "rb") as f:  # (a pipe too: `<(pass show app-key)`)
            st = os.fstat(f.fileno())
            data = f.read(MAX_KEY_FILE_BYTES + 1)
            if len(data) > MAX_KEY_FILE_BYTES:
                raise UsageError(
                    f"{ns.file} is larger than {MAX_KEY_FILE_BYTES} bytes: not a key file"
                )
    except FileNotFoundError:
        raise NotFound(f"no file {ns.file}") from None
    except OSError as exc:
        raise UsageError(f"cannot read {ns.file}: {exc.strerror}") from None
    what = describe_key(data, ns.file)  # MintFailed names the file, never its content
    os.umask(0o077)
    _store().write_signing_key(ns.name, data)
    print(f"stored signing key {ns.name}: {what}")
    key = "key_file" if "key_file" in what else "private_key"
    print(f'use it with {key} = "store:{ns.name}" in the provider\'s table')
    if stat.S_IMODE(st.st_mode) & 0o077:
        print(
            f"warning: {ns.file} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}): "
            "the key may have been seen; remove the file, or consider the key exposed",
            file=sys.stderr,
        )
    return EXIT_OK


def cmd_signing_key_list(ns: Any) -> int:
    for name in _store().signing_key_names():
        print(name)
    return EXIT_OK


def cmd_signing_key_rm(ns: Any) -> int:
    from credproxy.core.names import check_name

    check_name("signing key", ns.name)
    if not _store().remove_signing_key(ns.name):
        print(f"credproxy signing-key rm: no signing key named {ns.name}", file=sys.stderr)
        return EXIT_NOT_FOUND
    print(f"removed signing key {ns.name}")
    return EXIT_OK


def cmd_status(ns: Any) -> int:
    import json

    from credproxy.inner.client import Client, silent_daemon
    from credproxy.shell import paths
    from credproxy.shell.launcher import version_mismatch

    try:
        with Client(paths.control_socket(), timeout=5) as c:
            status = c.call("status")
    except DaemonUnavailable:
        silent = silent_daemon(paths.control_socket())
        if silent is not None:
            raise DaemonUnavailable(silent) from None
        status = _offline_status()
    _add_grant_problems(status)
    other = status.get("daemon") and version_mismatch(status["daemon"].get("version"))
    if other:
        print(f"credproxy status: warning: {other}", file=sys.stderr)
    if ns.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return EXIT_OK
    print(_render_status(status))
    return EXIT_OK


def cmd_release(ns: Any) -> int:
    """End the quota holds on PROVIDER[:BUCKET]; with no daemon running, "not found" (exit 3)."""
    from credproxy.core.names import check_name
    from credproxy.errors import NotFound
    from credproxy.inner.client import Client, silent_daemon
    from credproxy.shell import paths

    provider, colon, bucket = ns.target.partition(":")
    check_name("provider", provider)
    payload = {"provider": provider}
    if colon:
        check_name("bucket", bucket)
        payload["bucket"] = bucket
    try:
        with Client(paths.control_socket(), timeout=5) as c:
            released = c.call("release", payload)["released"]
    except DaemonUnavailable:
        silent = silent_daemon(paths.control_socket())
        if silent is not None:
            raise DaemonUnavailable(silent) from None
        raise NotFound(
            f"no quota hold on {ns.target}: the daemon is not running, and holds live in "
            "its memory only"
        ) from None
    if released:
        print(f"released {released} hold{'s' if released != 1 else ''} on {ns.target}")
    else:
        # Not "not found": the release was done (the sessions' profiles of the
        # provider start again from their first bucket), with no hold to end.
        print(
            f"no quota hold on {ns.target} (`credproxy status` lists the holds); "
            f"profiles of {provider} start again from their first bucket"
        )
    return EXIT_OK


def cmd_reload(ns: Any) -> int:
    from credproxy.inner.client import Client
    from credproxy.shell import paths

    try:
        with Client(paths.control_socket(), timeout=30) as c:
            changes = c.call("reload")
    except DaemonUnavailable:
        # Nothing runs: check the file the next daemon will read (a bad one raises).
        path = paths.config_file()
        paths.load_config(path)
        print(f"credproxy reload: the daemon is not running; it reads {path} when it starts")
        return EXIT_OK
    except UsageError as exc:
        print(
            f"credproxy reload: {exc}; the daemon keeps the configuration it runs with",
            file=sys.stderr,
        )
        return EXIT_USAGE
    said = [
        f"{what}: {', '.join(changes.get(field) or [])}"
        for what, field in (
            ("providers added", "providers_added"),
            ("providers removed", "providers_removed"),
            ("providers changed", "providers_changed"),
            ("sections changed", "sections_changed"),
        )
        if changes.get(field)
    ]
    print(f"reloaded {changes.get('file')}: {'; '.join(said) if said else 'nothing changed'}")
    return EXIT_OK


def cmd_stop(ns: Any) -> int:
    import contextlib

    from credproxy.inner.client import Client, silent_daemon
    from credproxy.shell import paths

    try:
        with Client(paths.control_socket(), timeout=10) as c:
            pong = c.call("ping")
            pid = int(pong["pid"])
            # The daemon may close the connection as it stops, before the reply.
            with contextlib.suppress(DaemonUnavailable):
                try:
                    c.call("stop")
                except UsageError:  # (an older daemon: "Unknown operation: stop")
                    raise UsageError(
                        f"the running daemon (pid {pid}) is version {pong.get('version')} and "
                        f"has no stop; end it with kill -TERM {pid}"
                    ) from None
    except DaemonUnavailable:
        silent = silent_daemon(paths.control_socket())
        if silent is not None:
            raise DaemonUnavailable(silent) from None
        print("credproxy stop: the daemon is not running")
        return EXIT_OK
    if not _wait_exit(pid, ns.timeout):
        print(
            f"credproxy stop: the daemon (pid {pid}) is still running after {ns.timeout:g} s; "
            f"see its log, or end it with kill -TERM {pid}",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    print(f"stopped the credproxy daemon (pid {pid})")
    return EXIT_OK


def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait until process *pid* has exited (not our child: through a pidfd); False on timeout."""
    import os
    import select

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def _add_grant_problems(status: dict[str, Any]) -> None:
    """Name, per session, each grant that gives it nothing (cause and fix), from the config file.

    The daemon re-reads the file when it changes, so the file is what it
    serves with, unless the file is bad now: then that is said instead.
    """
    from credproxy.core.grantcheck import grant_problems
    from credproxy.core.grants import Grants
    from credproxy.errors import ConfigError
    from credproxy.shell import paths

    try:
        cfg = paths.load_config()
    except ConfigError as exc:
        status["config_error"] = str(exc)
        return
    stored = {(t["provider"], t["bucket"]) for t in status.get("tokens", [])}
    for s in status["sessions"]:
        try:
            grants = Grants.parse(list(s.get("grants", [])))
        except CredproxyError:
            continue
        s["grant_problems"] = [
            {"grant": p.grant, "cause": p.cause, "error": p.message, "fix": p.fix}
            for p in grant_problems(
                grants, cfg.providers, stored, status.get("keys"), str(paths.config_file())
            )
        ]


def _failures(count: int) -> str:
    return f"{count} failure" if count == 1 else f"{count} failures"


def _offline_status() -> dict[str, Any]:
    import time
    from datetime import UTC, datetime

    from credproxy.core.policy import token_expiry
    from credproxy.errors import StoreError

    store = _store()
    tokens = []
    now = time.time()
    for provider in store.providers():
        for bucket in store.buckets(provider):
            entry: dict[str, Any] = {"provider": provider, "bucket": bucket}
            try:
                tok = store.read(provider, bucket) or {}
            except StoreError as exc:
                entry["error"] = str(exc)
                tokens.append(entry)
                continue
            exp = token_expiry(tok)
            entry["expiry"] = (
                None
                if exp is None
                else datetime.fromtimestamp(exp, UTC).isoformat(timespec="seconds")
            )
            entry["expires_in"] = None if exp is None else round(exp - now)
            entry["refreshable"] = bool(tok.get("refresh_token")) and exp is not None
            tokens.append(entry)
    # (No daemon: no sessions, no holds, no failures counted; the same keys as online.)
    return {
        "daemon": None,
        "sessions": [],
        "tokens": tokens,
        "holds": [],
        "keys": store.key_names(),
    }


def _render_status(st: dict[str, Any]) -> str:
    lines = []
    d = st.get("daemon")
    if d:
        lines.append(f"daemon: pid {d['pid']}, version {d['version']}, since {d['running_since']}")
    else:
        lines.append("daemon: not running")
    if st.get("config_error"):
        kept = "the daemon keeps the one it runs with" if d else "no daemon starts on it"
        lines.append(f"config: {st['config_error']} ({kept})")
    sessions = st.get("sessions", [])
    lines.append(f"sessions: {len(sessions)}")
    for s in sessions:
        lines.append(
            f"  {s['id']} {s['name']!r}: grants {', '.join(s['grants']) or '-'}; "
            f"{s['connections']} connections; launcher pid {s['launcher_pid']}"
        )
        for p in s.get("grant_problems", []):
            lines.append(f"    grant {p['grant']!r}: {p['error']}; {p['fix']}")
        for r in s.get("renewals", []):
            state = (
                "re-auth required"
                if r["reauth_required"]
                else "gave up"
                if r["gave_up"]
                else f"next renewal {r['next_renewal']} (in {r['next_renewal_in']} s)"
            )
            extra = (
                f", {_failures(r['failures'])}, last error: {r['last_error']}"
                if r["failures"]
                else ""
            )
            lines.append(f"    {r['provider']}:{r['bucket']}: {state}{extra}")
        for prof in s.get("profiles", []):
            buckets = ", ".join(
                b["bucket"]
                + ("*" if b["bucket"] == prof["current"] else "")
                + ("" if b["state"] == "ok" else f" ({b['state']})")
                for b in prof["buckets"]
            )
            lines.append(f"    profile {prof['provider']} [{prof['strategy']}]: {buckets}")
    tokens = st.get("tokens", [])
    lines.append(f"tokens: {len(tokens)}")
    for t in tokens:
        if "error" in t:
            lines.append(f"  {t['provider']}:{t['bucket']}: unreadable: {t['error']}")
            continue
        left = t.get("expires_in")
        bits = ["no expiry" if left is None else expires_text(left)]
        bits.append("refreshable" if t.get("refreshable") else "not refreshable")
        if t.get("reauth_required"):
            bits.append("RE-AUTH REQUIRED")
        if t.get("failures"):
            bits.append(f"{_failures(t['failures'])} in a row (last: {t.get('last_error')})")
        if t.get("unsaved_since"):
            bits.append(
                f"NOT ON DISK since {t['unsaved_since']} (kept in memory; "
                f"{t.get('save_failures', 0)} failed writes: {t.get('last_error')})"
            )
        if t.get("next_renewal"):
            bits.append(f"next renewal {t['next_renewal']}")
        lines.append(f"  {t['provider']}:{t['bucket']}: " + ", ".join(bits))
    holds = st.get("holds", [])
    lines.append(f"holds: {len(holds)}" + (" (credproxy release P[:B] ends them)" if holds else ""))
    for hold in holds:
        lines.append(
            f"  {hold['provider']}:{hold['bucket']}: quota-exhausted, held by {hold['source']} "
            f"until {hold['until']} (in {hold['ends_in']} s)"
        )
    keys = st.get("keys", [])
    lines.append(f"keys: {', '.join(keys) if keys else '-'}")
    return "\n".join(lines)


def cmd_install_units(ns: Any) -> int:
    import os
    import shutil
    from pathlib import Path

    from credproxy.shell import units

    # ExecStart= must be absolute: the executable on PATH, else the one running now.
    found = shutil.which("credproxy")
    exe = os.path.abspath(found) if found else str(Path(sys.argv[0]).resolve())
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    dest = Path(config_home) / "systemd" / "user"
    try:
        written = units.install_units(dest, exe)
    except OSError as exc:
        where = exc.filename or dest
        raise CredproxyError(f"cannot write the units in {where}: {exc.strerror}") from None
    for path in written:
        print(f"wrote {path}")
    if any(Path(exe).is_relative_to(tmp) for tmp in ("/tmp", "/var/tmp")):  # noqa: S108
        print(
            f"credproxy install-units: warning: {exe} is under a temporary directory, which "
            "the service cannot see (PrivateTmp=yes); install credproxy elsewhere "
            "(pipx install .) and run install-units again",
            file=sys.stderr,
        )
    print("next: systemctl --user daemon-reload && systemctl --user enable --now credproxy.socket")
    return EXIT_OK


# --- credproxy run --------------------------------------------------------------


def cmd_run(ns: Any) -> int:
    from credproxy.shell import launcher

    cmd = list(ns.cmd)
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    if not cmd:
        _usage_error("credproxy run", "a command is needed: credproxy run --allow GRANT -- CMD")
    return launcher.run(
        cmd,
        allow=ns.allow,
        allow_uids=ns.allow_uid,
        name=ns.name,
        capability=ns.capability,
    )


def _usage_error(prog: str, message: str) -> NoReturn:
    """Say a usage error of command *prog* in one line on stderr, with where its help is; exit 2."""
    print(f"{prog}: {message} (see {prog} --help)", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


__all__ = ["EXIT_FAILURE", "main"]

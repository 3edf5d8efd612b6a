"""The shipped systemd user units: accepted by systemd, hardened, and installed as promised."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from credproxy.shell import paths
from credproxy.shell.units import UNIT_NAMES, install_units, unit_texts

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "systemd"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze not installed (Debian/Ubuntu package: systemd)",
)
# docs/design.md section 6.2: `systemd-analyze security --offline=yes --user` at most 1.5.
MAX_EXPOSURE = 1.5


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    """A private 0700 XDG_RUNTIME_DIR: systemd-analyze --user refuses to run without one."""
    path = Path(tempfile.mkdtemp(prefix="cp-run-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _analyze(runtime_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime_dir)}
    return subprocess.run(
        [SYSTEMD_ANALYZE or "", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def _exec_start(text: str) -> str:
    (line,) = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    return line.removeprefix("ExecStart=")


def _fake_executable(directory: Path) -> str:
    """An executable file for ExecStart=, since verify checks that it exists."""
    path = directory / "credproxy"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return str(path)


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_both_units(tmp_path: Path, runtime_dir: Path) -> None:
    """systemd-analyze verify --user reports nothing about either installed unit."""
    units = install_units(tmp_path / "units", _fake_executable(tmp_path / "bin"))
    result = _analyze(runtime_dir, "verify", "--user", *map(str, units))
    assert result.returncode == 0, result.stderr
    # Unknown keys and bad values are only warnings (exit status 0), so read them.
    complaints = [line for line in result.stderr.splitlines() if "credproxy." in line]
    assert complaints == []


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_a_path_that_needs_quoting(
    tmp_path: Path, runtime_dir: Path
) -> None:
    """An executable path with a space and a percent sign is written so systemd finds it."""
    executable = _fake_executable(tmp_path / "my tools" / "100%")
    units = install_units(tmp_path / "units", executable)
    result = _analyze(runtime_dir, "verify", "--user", *map(str, units))
    # verify complains "Command ... is not executable" if the quoting were wrong.
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "credproxy." in line] == []


@needs_systemd_analyze
@pytest.mark.parametrize("executable", [None, "/usr/bin/credproxy"])
def test_service_exposure_is_at_most_1_5(
    executable: str | None, tmp_path: Path, runtime_dir: Path
) -> None:
    """The service, as shipped and as installed, scores at most 1.5 in systemd-analyze security."""
    if executable is None:
        unit = SHIPPED / "credproxy.service"
    else:
        unit = next(p for p in install_units(tmp_path, executable) if p.suffix == ".service")
    result = _analyze(runtime_dir, "security", "--offline=yes", "--user", str(unit))
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for credproxy\.service: ([0-9.]+)", result.stdout)
    assert match is not None, result.stdout
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_install_units_writes_both_with_the_given_exec_start(tmp_path: Path) -> None:
    """install_units creates the directory and writes both units, ExecStart pointing at us."""
    dest = tmp_path / "config" / "systemd" / "user"
    written = install_units(dest, "/opt/credproxy/bin/credproxy")
    assert written == [dest / name for name in UNIT_NAMES]
    service = (dest / "credproxy.service").read_text()
    assert _exec_start(service) == "/opt/credproxy/bin/credproxy serve --idle-exit 300"
    # Only ExecStart= changes; the socket unit is copied as shipped.
    shipped_service = (SHIPPED / "credproxy.service").read_text()
    assert service == shipped_service.replace(
        "ExecStart=%h/.local/bin/credproxy", "ExecStart=/opt/credproxy/bin/credproxy"
    )
    assert (dest / "credproxy.socket").read_text() == (SHIPPED / "credproxy.socket").read_text()


def test_install_units_files_are_0644_whatever_the_umask(tmp_path: Path) -> None:
    """Unit files are world-readable 0644 even under umask 077, and no temporary files remain."""
    old = os.umask(0o077)
    try:
        written = install_units(tmp_path, "/usr/bin/credproxy")
    finally:
        os.umask(old)
    assert [stat.S_IMODE(p.stat().st_mode) for p in written] == [0o644, 0o644]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(UNIT_NAMES)


def test_install_units_replaces_existing_units(tmp_path: Path) -> None:
    """Installing again for a moved executable replaces the old units."""
    install_units(tmp_path, "/old/credproxy")
    install_units(tmp_path, "/new/credproxy")
    service = (tmp_path / "credproxy.service").read_text()
    assert _exec_start(service) == "/new/credproxy serve --idle-exit 300"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(UNIT_NAMES)


def test_unit_texts_escapes_specifiers_and_quotes_spaces() -> None:
    """A path with "%", "$" and a space is escaped for systemd's command-line syntax."""
    service = unit_texts("/opt/my tools/100%/$x/credproxy")["credproxy.service"]
    assert _exec_start(service) == '"/opt/my tools/100%%/$$x/credproxy" serve --idle-exit 300'


@pytest.mark.parametrize("executable", ["credproxy", "bin/credproxy", "/bin/cred\nproxy"])
def test_unit_texts_rejects_relative_or_multiline_paths(executable: str) -> None:
    """A relative executable (the manager's PATH is not the shell's) or a line break is refused."""
    with pytest.raises(ValueError, match=r"ExecStart|line"):
        unit_texts(executable)


def test_units_and_paths_agree_on_locations(monkeypatch: pytest.MonkeyPatch) -> None:
    """The socket unit listens where credproxy.shell.paths puts the control socket, and the service
    makes writable the state and runtime directories credproxy.shell.paths uses."""
    runtime, home = "/run/user/4242", "/home/someone"
    monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
    monkeypatch.setenv("HOME", home)
    for name in ("CREDPROXY_RUNTIME_DIR", "CREDPROXY_STATE_DIR", "XDG_STATE_HOME"):
        monkeypatch.delenv(name, raising=False)
    # Specifiers as a user manager expands them when XDG_STATE_HOME is unset.
    specifiers = {"%t": runtime, "%h": home}

    def expand(value: str) -> str:
        for spec, path in specifiers.items():
            value = value.replace(spec, path)
        return value

    def values(text: str, key: str) -> list[str]:
        return [
            expand(word)
            for line in text.splitlines()
            if line.startswith(f"{key}=")
            for word in line.removeprefix(f"{key}=").split()
        ]

    socket_unit = (SHIPPED / "credproxy.socket").read_text()
    service_unit = (SHIPPED / "credproxy.service").read_text()
    assert values(socket_unit, "ListenStream") == [str(paths.control_socket())]
    writable = values(service_unit, "ReadWritePaths")
    assert str(paths.runtime_dir()) in writable
    assert str(paths.sessions_dir().parent) in writable
    assert str(paths.state_dir()) in writable
    # Not StateDirectory= (%S): systemd 252 puts a user unit's state directory in
    # ~/.config (tests/test_systemd_user.py found it); the unit pins the path.
    assert values(service_unit, "Environment") == [f"CREDPROXY_STATE_DIR={paths.state_dir()}"]


def test_units_are_found_from_the_source_checkout() -> None:
    """In an editable install unit_texts() reads systemd/, so edits there take effect."""
    if (Path(sys.modules["credproxy"].__file__ or "").parent / "_units").is_dir():
        pytest.skip("credproxy is installed from a wheel here; test_packaging covers that")
    texts = unit_texts("/usr/bin/credproxy")
    assert texts["credproxy.socket"] == (SHIPPED / "credproxy.socket").read_text()


def test_install_units_command_writes_units_and_says_what_next(tmp_path: Path) -> None:
    """`credproxy install-units` writes both units under $XDG_CONFIG_HOME/systemd/user with ExecStart at the installed executable."""
    import os
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("credproxy")
    env = dict(
        os.environ, XDG_CONFIG_HOME=str(tmp_path / "cfg"), PATH=f"{exe.parent}:{os.environ['PATH']}"
    )
    proc = subprocess.run(
        [str(exe), "install-units"], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    unit_dir = tmp_path / "cfg" / "systemd" / "user"
    service = (unit_dir / "credproxy.service").read_text()
    assert f"ExecStart={exe} serve --idle-exit 300" in service
    assert (unit_dir / "credproxy.socket").exists()
    assert "systemctl --user enable --now credproxy.socket" in proc.stdout

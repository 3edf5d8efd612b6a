"""The benchmark runs end to end in quick mode and reports every figure.

Timings are the benchmark's business, not the tests': nothing here asserts a
duration or a ratio. The one figure checked for its value is figure 6, which is
a correctness property (one upstream refresh for 1,000 concurrent requests).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "run.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("ssh-agent", "ssh-keygen", "ssh-add")),
        reason="the benchmark's peer is OpenSSH's ssh-agent (apt package openssh-client)",
    ),
]


def test_quick_benchmark_reports_every_figure(tmp_path: Path) -> None:
    """`bench/run.py --quick --json FILE` exits 0 with numeric rows for figures 1-8."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "requests_per_second = 0" in proc.stdout, "the table must say the rate limit is off"
    result = json.loads(out.read_text())
    assert result["mode"] == "quick"
    rows = result["figures"]
    assert {r["figure"] for r in rows} == {1, 2, 3, 4, 5, 6, 7, 8}
    for row in rows:
        value = row["credproxy"]
        assert isinstance(value, int | float) and math.isfinite(value), row
        for key in ("peer", "ratio"):
            assert row[key] is None or isinstance(row[key], int | float), row
        assert row["met"] in (True, False, None), row
        if row["target"] is not None and row["target"] != "report ratio":
            assert row["met"] is not None, row
    for fig in (1, 2, 3, 4):
        assert any(r["figure"] == fig and isinstance(r["peer"], int | float) for r in rows), fig
    (herd,) = [r for r in rows if r["figure"] == 6]
    assert herd["credproxy"] == 1, result["details"].get("figure6")
    assert result["details"]["figure6"]["replies_ok"] == result["details"]["figure6"]["connections"]
    # figure 7 (the API proxy) ran: the added-latency row of the plain-HTTP path is there
    # (its nginx anchor only where nginx is installed), and every stream was read.
    assert any(r["figure"] == 7 and "added p50" in r["metric"] for r in rows)
    # The agent-shaped POSTs were answered on every path (the upstream checks the token).
    assert all(d["n"] > 0 for d in result["details"]["figure7"]["agent"].values())
    streams = result["details"]["figure7"]["streams"]["runs"]
    assert streams and all(run["events"] > 0 for runs in streams.values() for run in runs)
    # figure 8 (signing): both algorithms minted against the verifying issuer, and a
    # minted token was served in the same rounds as a login's.
    metrics = {r["metric"] for r in rows if r["figure"] == 8}
    assert {m.split(":")[0] for m in metrics} >= {"mint, RS256", "mint, ES256"}
    assert "get_token of a minted token, 1 client: p99" in metrics

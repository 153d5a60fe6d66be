"""report.html in a real browser: headless Chromium, opened from a file URL with the network off.

Chromium is found on PATH or installed with apt-get when we are root. Outside CI a missing Chromium
skips the test with the reason; with ``CI=true`` it must run. Set ``HARNESS_SCREENSHOT_DIR`` to keep
the screenshot somewhere to look at.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from synthetic import synthetic_records

from bptt_harness.report import generate_from_records

EVIL = "<script>alert(1)</script>"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars",
         # No network at all: every host name fails to resolve and any proxy use goes nowhere.
         '--host-resolver-rules=MAP * ~NOTFOUND', "--proxy-server=127.0.0.1:9"]


def _find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def _install_chromium() -> str:
    """Returns '' on success or why it could not be installed."""
    if os.geteuid() != 0:
        return "chromium is not installed and this user is not root (apt-get install chromium)"
    if not shutil.which("apt-get"):
        return "chromium is not installed and apt-get is not available"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if r.returncode != 0:
            return f"installing chromium failed: {' '.join(cmd)}: {(r.stderr or r.stdout).strip()[-300:]}"
    return ""


@pytest.fixture(scope="module")
def chromium() -> str:
    path = _find_chromium()
    if path is None:
        reason = _install_chromium()
        path = _find_chromium()
        if path is None:
            if os.environ.get("CI") == "true":
                pytest.fail(f"CI=true but no browser: {reason}")
            pytest.skip(reason)
    return path


def _run(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=180)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    recs = synthetic_records(repeats=2, study=EVIL)
    for r in recs:  # a stability edge too, so every kind of cell shows
        if r["config"]["bptt"] == 35 and r["config"]["batch_size"] == 10:
            r["status"] = r["result"]["status"] = "diverged"
            r["error"] = "non-finite loss at step 7 <b>bold?</b>"
            r["result"]["diverged_step"] = 7
            r["result"]["val_curve"], r["result"]["val_ppl"] = [], None
    out = tmp_path_factory.mktemp("report")
    return generate_from_records(recs, study_name=EVIL, out_dir=out,
                                 storage_display="postgresql://bob:***@db/test").html


def test_report_renders_offline_in_chromium(chromium: str, report: Path):
    url = report.resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        r = _run(chromium, Path(profile), "--enable-logging=stderr", "--v=0", "--virtual-time-budget=20000",
                 "--dump-dom", url)
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    # Every console message (errors, failed loads, uncaught exceptions) counts as a failure.
    console = [line for line in r.stderr.splitlines() if "CONSOLE" in line]
    assert not console, "\n".join(console)
    source = report.read_text()
    ids = re.findall(r'<div id="(fig-[a-z-]+)" class="plot">', source)
    assert len(ids) == 8  # with the verdict at every budget
    starts = [(dom.index(f'id="{i}"'), i) for i in ids]
    bounds = sorted(starts) + [(len(dom), None)]
    for (start, fig_id), (end, _) in zip(bounds, bounds[1:]):
        assert 'class="main-svg"' in dom[start:end], f"figure {fig_id} has no plotly SVG"
    assert 'id="ranking"' in dom and "<td" in dom.split('id="ranking"')[1][:5000]
    assert 'class="headline"' in dom and "Use bptt" in dom
    # The study name is text, not a script: escaped in the DOM and never executed.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert "<script>alert(1)</script>" not in dom
    assert "&lt;b&gt;bold?&lt;/b&gt;" in dom


def test_report_screenshot(chromium: str, report: Path, tmp_path: Path):
    shot = tmp_path / "report.png"
    with tempfile.TemporaryDirectory() as profile:
        r = _run(chromium, Path(profile), "--window-size=1280,5200", "--virtual-time-budget=20000",
                 f"--screenshot={shot}", report.resolve().as_uri())
    assert r.returncode == 0 and shot.is_file() and shot.stat().st_size > 50_000, r.stderr[-2000:]
    keep = os.environ.get("HARNESS_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "report.png")


def test_compare_renders_offline_in_chromium(chromium: str, tmp_path: Path):
    import pandas as pd
    from synthetic import SyntheticLaw

    from bptt_harness.report.compare import write_compare
    from bptt_harness.report.frame import records_to_frame

    a = synthetic_records(bptts=(35, 140, 560), batch_sizes=(20, 320), machine_id="a1", gpu_name="GPU <A>",
                          law=SyntheticLaw(card_mib=16_384.0))
    b = synthetic_records(bptts=(35, 140, 560), batch_sizes=(20, 320), machine_id="b2", gpu_name="GPU B",
                          law=SyntheticLaw(card_mib=81_920.0, peak_tokens_per_s=900_000.0))
    trials = pd.concat([records_to_frame(a), records_to_frame(b)], ignore_index=True)
    html = write_compare(trials, name="ab", out_root=tmp_path).html
    with tempfile.TemporaryDirectory() as profile:
        r = _run(chromium, Path(profile), "--enable-logging=stderr", "--v=0", "--virtual-time-budget=20000",
                 "--dump-dom", html.resolve().as_uri())
    assert r.returncode == 0, r.stderr[-2000:]
    assert not [line for line in r.stderr.splitlines() if "CONSOLE" in line]
    ids = re.findall(r'<div id="(fig-[a-z0-9-]+)" class="plot">', html.read_text())
    assert len(ids) == 5  # throughput, memory, energy, one feasible-region map per machine
    assert r.stdout.count('class="main-svg"') >= len(ids)
    assert "GPU &lt;A&gt;" in r.stdout and 'id="side-by-side-table"' in r.stdout

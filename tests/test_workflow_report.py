"""The HTML report: `snakemake --report FILE.html` on a finished tiny run gives one self-contained page
that headless Chromium (Debian's package) renders with the metrics, the rule graph and every figure.

Without Chromium the browser checks skip, unless MASKDISTILL_REQUIRE_CHROMIUM=1 (set by .ci/run,
which installs it) turns the skip into a failure."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import snakemake
from PIL import Image

FIGURES = {"report.png", "stages.png", "gallery_train.jpg", "gallery_val.jpg"}
EMBEDDED = re.compile(r'"data_uri": "(data:image/[a-z]+;charset=utf8;filename=([^;]+);base64,[^"]+)"')


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("MASKDISTILL_REQUIRE_CHROMIUM") == "1":
            pytest.fail("MASKDISTILL_REQUIRE_CHROMIUM=1 but Chromium is not installed")
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    return path


def headless(profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium with the flags a machine without network needs; JavaScript gets time to run."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--virtual-time-budget=15000", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def screenshot(profile: Path, url: str, out: Path, size: tuple[int, int] = (1400, 1000)) -> np.ndarray:
    headless(profile, f"--window-size={size[0]},{size[1]}", f"--screenshot={out}", url)
    return np.asarray(Image.open(out).convert("L"), dtype=np.float32)


@pytest.fixture(scope="module")
def html_report(finished_tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    snakemake(finished_tiny_run, "--report", str(out))
    return finished_tiny_run, out


def test_the_report_is_one_self_contained_page_with_every_figure(html_report):
    _, out = html_report
    text = out.read_text()
    assert not re.search(r'<(script|link|img)[^>]+(src|href)="https?://', text), "an external resource"
    embedded = {name: uri for uri, name in EMBEDDED.findall(text)}
    assert FIGURES <= set(embedded), FIGURES - set(embedded)
    for name in FIGURES:  # each embedded figure decodes to an image
        data = base64.b64decode(embedded[name].split("base64,", 1)[1])
        image = Image.open(io.BytesIO(data))
        assert image.width > 100 and image.height > 100, name


def test_chromium_renders_the_metrics_and_the_rule_graph(html_report, tmp_path):
    run, out = html_report
    dom = headless(tmp_path / "profile", "--dump-dom", out.as_uri()).stdout
    metrics = json.loads((run / "results" / "metrics.json").read_text())
    for stage in ("initial_masks", "maskrcnn", "segmentation"):
        assert f"<td>{stage}</td>" in dom and f"<td>{metrics[stage]['miou']:.1f}</td>" in dom, stage
    pixels = screenshot(tmp_path / "profile", out.as_uri(), tmp_path / "page.png")
    assert pixels.shape == (1000, 1400)
    assert pixels.std() > 20  # text, a table and the rule graph, not an empty page
    assert (pixels < 100).mean() > 0.01  # dark pixels: the text is drawn


def test_chromium_draws_every_embedded_figure(html_report, tmp_path):
    _, out = html_report
    embedded = {name: uri for uri, name in EMBEDDED.findall(out.read_text())}
    for name in sorted(FIGURES):
        page = tmp_path / f"{name}.html"
        page.write_text(f'<html><body style="margin:0"><img src="{embedded[name]}"></body></html>')
        pixels = screenshot(tmp_path / "profile", page.as_uri(), tmp_path / f"{name}.png", (800, 600))
        assert pixels.std() > 10, f"{name} did not render"

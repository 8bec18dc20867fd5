"""Run reports: `tessera report` renders summary.json as a self-contained HTML page with three
charts and a PNG of the main one. The page is opened in a real browser (headless Chromium,
where installed) and its charts are measured there: each must exist, have a size, and hold
drawn marks of non-zero size."""

from __future__ import annotations

import html
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image, ImageStat

from jobs.cli import main as cli
from jobs.report import load_summary, render_html, write_report

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed here (Debian: apt-get install chromium; .ci/run installs it)"
)
RUN_ID = "20261122T010437Z-33ed4c"


def a_summary(run_id: str = RUN_ID, started_at: str = "2026-11-22T01:04:37+00:00", **changes) -> dict:
    """A summary.json as `tessera run` writes it: several commits, errors of four codes."""
    summary = {
        "job": "demo-moderation",
        "run_id": run_id,
        "started_at": started_at,
        "finished_at": "2026-11-22T01:06:02+00:00",
        "wall_s": 85.0,
        "rows_in": 1000,
        "rows_out": 1000,
        "ok": 950,
        "errors": 50,
        "errors_by_code": {"decode.corrupt": 7, "fetch.not_found": 3, "model.invalid_output": 38, "video.too_long": 2},
        "invariant": {"rows_in": 1000, "rows_out": 1000, "ids_written_twice": 0, "ok": True},
        "duplicates": {"count": 2, "examples": [{"id": "img-1", "source": "m.jsonl#L9"}]},
        "throughput_rows_per_s": 11.76,
        "timeline": [[20.0 + 6.0 * i, 100 * (i + 1)] for i in range(10)],
        "latency_ms": {
            "fetch_ms": {"p50": 0.4, "p95": 2.7},
            "decode_ms": {"p50": 19.0, "p95": 234.6},
            "infer_ms": {"p50": 1908.6, "p95": 2194.9},
        },
        "tokens": {"input": 625_000, "output": 17_042},
        "pixel_bytes_to_actor": 5_287_296,
        "reasks": 37,
        "truncated": 15,
        "model": {"uri": "builtin:tiny", "revision": "574c24a6298b", "type": "llava_next"},
        "prompt_sha256": "104c03be" * 8,
        "spec_sha256": "d3c3c946" * 8,
        "plan": {"replicas": [1, 1], "gpus_per_replica": 0.0, "cpu_concurrency": 1, "rows_per_file": 100},
        "output": {"path": "/data/out/demo", "run_dir": f"/data/out/demo/run-{run_id}"},
    }
    summary.update(changes)
    return summary


def write_summary(output: Path, summary: dict) -> None:
    folder = output / "_runs" / summary["run_id"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary))


def test_html_is_self_contained_and_has_the_three_charts():
    page = render_html(a_summary())
    assert [m for m in re.findall(r'data-chart="(\w+)"', page)] == ["throughput", "errors", "latency"]
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "model.invalid_output" in page and "Invariant holds" in page
    assert page.count('class="bar"') == 4 + 6  # one bar per error code; p50 and p95 per stage


def test_a_broken_invariant_and_an_error_free_run_read_as_such():
    broken = a_summary(invariant={"rows_in": 10, "rows_out": 9, "ids_written_twice": 0, "ok": False})
    assert "Invariant BROKEN" in render_html(broken)
    clean = render_html(a_summary(errors=0, errors_by_code={}, timeline=[]))
    assert "No error rows" in clean and "no rows were committed" in clean


def test_report_writes_html_and_png_next_to_the_latest_summary(tmp_path):
    write_summary(tmp_path, a_summary("older", started_at="2026-11-21T00:00:00+00:00"))
    write_summary(tmp_path, a_summary())
    files = write_report(str(tmp_path))
    assert files.summary["run_id"] == RUN_ID
    assert Path(files.html).parent == tmp_path / "_runs" / RUN_ID
    image = Image.open(io.BytesIO(Path(files.png).read_bytes()))
    assert image.size[0] >= 1000 and _is_drawn(image)
    assert load_summary(str(tmp_path), "older")["run_id"] == "older"
    with pytest.raises(FileNotFoundError, match="no summary for run nope"):
        load_summary(str(tmp_path), "nope")


def test_cli_prints_the_table_and_the_paths(tmp_path):
    write_summary(tmp_path, a_summary())
    result = CliRunner().invoke(cli, ["report", str(tmp_path), "--run", RUN_ID])
    assert result.exit_code == 0, result.output
    assert "rows in" in result.output and "model.invalid_output 38" in result.output
    assert "report.html" in result.output and "report.png" in result.output
    missing = CliRunner().invoke(cli, ["report", str(tmp_path / "nothing-here")])
    assert missing.exit_code == 2 and "no run summaries" in missing.output


REASON = ("1000 of the last 1000 rows failed with fetch.* errors (100% > output.max_error_rate 20%); "
          "most of them fetch.not_found (1000). Stopping; committed results are kept and a rerun resumes.")


def an_aborted_summary(run_id: str = "20261123T000000Z-abcdef") -> dict:
    """What pipeline/run.py writes when the error budget stops a run."""
    import time

    from pipeline.run import aborted_summary
    from schemas.spec import parse_spec

    spec = parse_spec({"name": "demo-moderation", "input": {"manifest": "m.jsonl"}, "output": {"path": "/data/out/demo"},
                       "task": {"preset": "moderation"}})
    return aborted_summary(spec, run_id, REASON, time.time() - 42)


def test_an_aborted_run_reads_as_aborted_and_says_why(tmp_path):
    for summary in (an_aborted_summary(), {"job": "demo-moderation", "run_id": "old-abort", "aborted": REASON}):
        page = render_html(summary)
        assert "Aborted" in page and html.escape(REASON) in page and "Invariant holds" not in page
        assert "data-chart" not in page  # no data: no empty charts that read as "nothing happened"
    write_summary(tmp_path, a_summary())
    write_summary(tmp_path, an_aborted_summary())  # started after the finished run: the latest
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "ABORTED" in result.output and REASON in result.output and "rerun" in result.output
    assert "report.png" in result.output
    write_summary(tmp_path, {"job": "demo-moderation", "run_id": "old-abort", "aborted": REASON})
    old = CliRunner().invoke(cli, ["report", str(tmp_path), "--run", "old-abort"])
    assert old.exit_code == 0 and REASON in old.output


# A script added to a copy of the page: measures every chart as the browser laid it out and
# writes the numbers into the DOM, which --dump-dom prints.
_MEASURE = """
<script>
const charts = {};
for (const svg of document.querySelectorAll("svg.chart")) {
  const box = svg.getBoundingClientRect();
  const marks = [...svg.querySelectorAll(".bar, .series, .area")].map((el) => {
    const b = el.getBBox();
    const style = getComputedStyle(el);
    return {kind: el.getAttribute("class"), width: b.width, height: b.height, fill: style.fill, stroke: style.stroke};
  });
  const labels = [...svg.querySelectorAll("text")].filter((t) => t.getComputedTextLength() > 0).length;
  charts[svg.dataset.chart] = {width: box.width, height: box.height, marks, labels};
}
const out = document.createElement("pre");
out.id = "measurements";
out.textContent = JSON.stringify(charts);
document.body.appendChild(out);
</script>
"""


def _chromium(tmp_path: Path, *args: str) -> str:
    profile = tmp_path / "chromium-profile"
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", *args,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@needs_chromium
def test_charts_are_drawn_in_a_real_browser(tmp_path):
    write_summary(tmp_path, a_summary())
    files = write_report(str(tmp_path))
    page = Path(files.html).read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", _MEASURE + "</body>"))

    dom = _chromium(tmp_path, "--window-size=1000,2000", "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="measurements">(.*?)</pre>', dom, re.S)
    assert found, "the page did not run in the browser"
    charts = json.loads(html.unescape(found.group(1)))

    assert set(charts) == {"throughput", "errors", "latency"}
    for name, chart in charts.items():
        assert chart["width"] > 500 and chart["height"] > 100, name
        assert chart["labels"] >= 5, name  # tick labels, categories, values
        assert chart["marks"], f"{name}: nothing drawn"
        for mark in chart["marks"]:
            assert mark["width"] > 0 and mark["height"] > 0, (name, mark)
            assert mark["fill"] != "none" or mark["stroke"] != "none", (name, mark)
    assert [m["kind"] for m in charts["throughput"]["marks"]] == ["area", "series"]
    assert len(charts["errors"]["marks"]) == 4
    assert len(charts["latency"]["marks"]) == 6

    screenshot = tmp_path / "page.png"
    _chromium(tmp_path, "--window-size=1000,2000", f"--screenshot={screenshot}", Path(files.html).as_uri())
    assert _is_drawn(Image.open(screenshot))


def _is_drawn(image: Image.Image) -> bool:
    """Not a blank canvas: the pixels vary."""
    return max(ImageStat.Stat(image.convert("L")).stddev) > 10

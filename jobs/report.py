"""`tessera report OUTPUT_PATH [--run RUN_ID]`: a run's summary.json as a page a person would
rather look at than read.

Writes next to the summary, in `OUTPUT_PATH/_runs/<run_id>/`: `report.html`, one
self-contained file (inline CSS and SVG; no scripts, fonts or requests, so it opens
air-gapped and from an e-mail attachment), and `report.png`, the main chart (throughput over
time) as an image for places that show only images. Without `--run` it reports the run that
started last. The charts come from jobs/charts.py.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from datetime import datetime, timezone

from jobs import charts
from jobs.summary import duplicate_ids
from pipeline import storage
from pipeline.run import summary_uri
from schemas.spec import StorageSpec


@dataclass(frozen=True)
class ReportFiles:
    html: str
    png: str
    summary: dict


def write_report(output_path: str, run_id: str | None = None, storage_spec: StorageSpec | None = None) -> ReportFiles:
    summary = load_summary(output_path, run_id, storage_spec)
    folder = storage.join(output_path, "_runs", summary["run_id"])
    html_uri, png_uri = storage.join(folder, "report.html"), storage.join(folder, "report.png")
    storage.write_bytes(html_uri, render_html(summary).encode(), storage_spec)
    storage.write_bytes(png_uri, render_png(summary), storage_spec)
    return ReportFiles(html=html_uri, png=png_uri, summary=summary)


def load_summary(output_path: str, run_id: str | None = None, storage_spec: StorageSpec | None = None) -> dict:
    """The summary of `run_id`, or of the run that started last. FileNotFoundError if none."""
    if run_id:
        uri = summary_uri(output_path, run_id)
        if not storage.exists(uri, storage_spec):
            known = ", ".join(run_ids(output_path, storage_spec)[-5:]) or "none"
            raise FileNotFoundError(f"no summary for run {run_id} under {output_path} (recent runs: {known})")
        return json.loads(storage.read_bytes(uri, storage_spec))
    summaries = [json.loads(storage.read_bytes(uri, storage_spec)) for uri in _summary_uris(output_path, storage_spec)]
    if not summaries:
        raise FileNotFoundError(f"no run summaries under {output_path}/_runs (has a run of this job finished?)")
    return max(summaries, key=lambda summary: summary.get("started_at") or "")


def run_ids(output_path: str, storage_spec: StorageSpec | None = None) -> list[str]:
    return sorted(uri.rstrip("/").split("/")[-2] for uri in _summary_uris(output_path, storage_spec))


def _summary_uris(output_path: str, storage_spec: StorageSpec | None) -> list[str]:
    runs = storage.join(output_path, "_runs")
    return [uri for uri in storage.list_files(runs, storage_spec, suffix="summary.json")]


# -- the page ---------------------------------------------------------------------------------


def render_png(summary: dict) -> bytes:
    """The main chart, with a heading so that the image stands on its own."""
    scene = _throughput(summary)
    heading = f"{summary.get('job', '?')} · run {summary.get('run_id', '?')} · throughput over time"
    return charts.with_heading(scene, heading, _headline(summary)).to_png()


def _throughput(summary: dict) -> charts.Scene:
    # An aborted run's summary has no timeline: "no rows were committed" would be untrue.
    empty = "no timeline: the run aborted" if summary.get("aborted") else "no rows were committed"
    return charts.throughput_chart(
        summary.get("timeline") or [], summary.get("wall_s") or 0.0, summary.get("throughput_rows_per_s"), empty=empty
    )


def _headline(summary: dict) -> str:
    if reason := summary.get("aborted"):
        reason = reason if len(reason) <= 90 else reason[:89] + "…"
        return f"ABORTED after {charts.fmt_duration(summary.get('wall_s') or 0)}: {reason}"
    rate = summary.get("throughput_rows_per_s") or 0
    return (
        f"{summary.get('rows_out', 0):,} rows in {charts.fmt_duration(summary.get('wall_s') or 0)} "
        f"({charts.fmt_number(rate)} rows/s), {summary.get('ok', 0):,} ok, {summary.get('errors', 0):,} errors"
    )


def render_html(summary: dict) -> str:
    esc = html.escape
    title = f"tessera · {summary.get('job', '?')} · run {summary.get('run_id', '?')}"
    chart_cards = [
        _chart_card(
            "Throughput over time",
            "Rows committed per second. Results are committed a file at a time, so each file's rows "
            "are spread over the time since the previous commit; the dashed line is the run's mean.",
            _throughput(summary),
        ),
        _chart_card(
            "Errors by code",
            "Rows that came out with status error, by their error code, with their share of all rows. "
            "Each code is a documented, stable cause (docs/errors.md).",
            charts.errors_chart(summary.get("errors_by_code") or {}, summary.get("rows_out") or 0),
        ),
        _chart_card(
            "Latency per stage",
            "Per row: fetch from storage and decode + tiling (the model's processor) on CPU workers. "
            "Infer is per generate() batch, so it holds the whole batch. Log scale.",
            charts.latency_chart(summary.get("latency_ms") or {}),
        ),
    ]
    if summary.get("aborted"):
        # Only what the aborted run's summary holds: empty charts would read as "nothing happened".
        present = [key in summary for key in ("timeline", "errors_by_code", "latency_ms")]
        sections = [_header(summary), _aborted(summary), *[card for card, shown in zip(chart_cards, present) if shown], _details(summary)]
    else:
        sections = [_header(summary), _kpis(summary), *chart_cards, _details(summary)]
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(sections)
        + f"\n<footer>Made by <code>tessera report</code> on {generated} from "
        f"<code>{esc(str((summary.get('output') or {}).get('path', '')))}/_runs/{esc(str(summary.get('run_id', '?')))}/summary.json</code>.</footer>\n"
        "</main>\n</body>\n</html>\n"
    )


def _header(summary: dict) -> str:
    esc = html.escape
    invariant = summary.get("invariant") or {}
    holds = bool(invariant.get("ok")) and not summary.get("aborted")
    badge = "Aborted: the run stopped before its end; no invariant check" if summary.get("aborted") else (
        f"Invariant holds: {invariant.get('rows_in', 0):,} rows in = {invariant.get('rows_out', 0):,} rows out, each id once"
        if holds
        else f"Invariant BROKEN: {invariant.get('rows_in', 0):,} rows in, {invariant.get('rows_out', 0):,} rows out, "
        f"{invariant.get('missing', 0):,} ids without a row, {invariant.get('ids_written_twice', 0):,} ids written twice"
    )
    model = summary.get("model") or {}
    meta = [f"run <code>{esc(str(summary.get('run_id', '?')))}</code>", esc(_when(summary.get("started_at")))]
    if "wall_s" in summary:
        meta.append(esc(charts.fmt_duration(summary["wall_s"] or 0)))
    if model or not summary.get("aborted"):  # an aborted run's summary may not name its model
        meta.append(f"model <code>{esc(str(model.get('uri', '?')))}</code> rev <code>{esc(str(model.get('revision', '?')))}</code>")
    return (
        "<header>\n<p class=\"eyebrow\">tessera run report</p>\n"
        f"<h1>{esc(str(summary.get('job', '?')))}</h1>\n"
        f"<p class=\"meta\">{' · '.join(meta)}</p>\n"
        f"<p class=\"badge {'ok' if holds else 'broken'}\">{esc(badge)}</p>\n</header>"
    )


def _kpis(summary: dict) -> str:
    rows = summary.get("rows_out") or 0
    tokens = summary.get("tokens") or {}
    errors = summary.get("errors") or 0
    cards = [
        ("Rows", f"{rows:,}", f"{summary.get('rows_in', 0):,} distinct ids in" + _skipped(summary)),
        ("OK", f"{summary.get('ok', 0):,}", _share(summary.get("ok", 0), rows)),
        ("Errors", f"{errors:,}", _share(errors, rows) + f" · {len(summary.get('errors_by_code') or {})} codes", "bad" if errors else ""),
        ("Throughput", f"{charts.fmt_number(summary.get('throughput_rows_per_s') or 0)}/s", "rows per second, wall clock"),
        ("Tokens", f"{_compact(tokens.get('input', 0))} → {_compact(tokens.get('output', 0))}", "in → out"),
        ("Re-asks", f"{summary.get('reasks', 0):,}", f"{summary.get('truncated', 0):,} answers cut at the token limit"),
    ]
    items = []
    for label, value, note, *tone in cards:
        css = f"kpi {tone[0]}" if tone and tone[0] else "kpi"
        items.append(
            f"<div class=\"{css}\"><div class=\"label\">{label}</div><div class=\"value\">{html.escape(value)}</div>"
            f"<div class=\"note\">{html.escape(note)}</div></div>"
        )
    return "<section class=\"kpis\">\n" + "\n".join(items) + "\n</section>"


def _aborted(summary: dict) -> str:
    return (
        "<section class=\"card\" id=\"aborted\">\n<h2>Why the run stopped</h2>\n"
        f"<p class=\"reason\">{html.escape(str(summary['aborted']))}</p>\n"
        "<p class=\"note\">Files it committed before the stop are kept and count as results; a rerun of the "
        "same spec resumes from them (only rows without a committed result run again).</p>\n</section>"
    )


def _skipped(summary: dict) -> str:
    skipped = summary.get("skipped") or 0
    return f" · {skipped:,} done by earlier runs" if skipped else ""


def _chart_card(title: str, note: str, scene: charts.Scene) -> str:
    return (
        f"<section class=\"card\" id=\"{scene.name}\">\n<h2>{html.escape(title)}</h2>\n"
        f"<p class=\"note\">{html.escape(note)}</p>\n{scene.to_svg()}\n</section>"
    )


def _details(summary: dict) -> str:
    model = summary.get("model") or {}
    plan = summary.get("plan") or {}
    output = summary.get("output") or {}
    duplicates = duplicate_ids(summary)
    latency = summary.get("latency_ms") or {}
    rows = [
        ("Started", _when(summary.get("started_at"))),
        ("Finished", _when(summary.get("finished_at"))),
        ("Model", f"{model.get('uri')} ({model.get('type')}), revision {model.get('revision')}" if model else None),
        ("Spec sha256", summary.get("spec_sha256")),
        ("Prompt sha256", summary.get("prompt_sha256")),
        ("Plan", ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in plan.items()) or None),
        ("Pixels to the model", _bytes(summary["pixel_bytes_to_actor"]) + " (uint8, through the object store)"
         if "pixel_bytes_to_actor" in summary else None),
        ("Latency p50 / p95", "; ".join(
            f"{charts.STAGE_LABELS.get(stage, stage)} {_ms(q.get('p50'))} / {_ms(q.get('p95'))}" for stage, q in latency.items()
        )),  # fmt: skip
        ("Duplicate ids", f"{duplicates.get('count', 0):,}" + _examples(duplicates.get("listed") or [])
         if "manifest.duplicate_id" in summary or "duplicates" in summary else None),
        ("Results", output.get("run_dir")),
    ]
    if summary.get("aborted"):  # only what its summary holds, not a column of dashes
        rows = [(label, value) for label, value in rows if value not in (None, "", "–")]
    body = "\n".join(
        f"<tr><th>{html.escape(label)}</th><td>{html.escape(str(value) if value is not None else '–')}</td></tr>"
        for label, value in rows
    )
    return f"<section class=\"card\" id=\"details\">\n<h2>Run details</h2>\n<table>\n{body}\n</table>\n</section>"


def _examples(examples: list[dict]) -> str:
    if not examples:
        return ""
    shown = ", ".join(str(example.get("id")) for example in examples[:5])
    return f" (e.g. {shown}{' …' if len(examples) > 5 else ''}; all listed in summary.json)"


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} % of rows" if whole else "–"


def _compact(value: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return str(value)


def _bytes(value: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value} B"


def _ms(value: float | None) -> str:
    return "–" if value is None else charts.fmt_ms(value)


def _when(iso: str | None) -> str:
    if not iso:
        return "–"
    try:
        return datetime.fromisoformat(iso).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        return iso


_CSS = """
:root { --ink: #1f2933; --muted: #616e7c; --line: #e4e7eb; --bg: #f5f7fa; --accent: #2563eb;
        --ok: #15803d; --bad: #c2410c; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 880px; margin: 0 auto; padding: 32px 20px 48px; }
header { margin-bottom: 20px; }
.eyebrow { margin: 0; color: var(--muted); font-size: 12px; letter-spacing: .08em; text-transform: uppercase; }
h1 { margin: 2px 0 4px; font-size: 28px; line-height: 1.2; }
h2 { margin: 0 0 2px; font-size: 17px; }
.meta { margin: 0 0 12px; color: var(--muted); }
code { font: 13px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; color: var(--ink); }
.badge { display: inline-block; margin: 0; padding: 4px 12px; border-radius: 999px; font-size: 13px; font-weight: 600; }
.badge.ok { background: #dcfce7; color: var(--ok); }
.badge.broken { background: #ffedd5; color: var(--bad); }
.reason { margin: 0 0 8px; color: var(--bad); font-weight: 600; overflow-wrap: anywhere; }
.kpis { display: grid; grid-template-columns: repeat(3, 1fr); gap: 12px; margin-bottom: 16px; }
.kpi { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 12px 14px; }
.kpi .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .06em; }
.kpi .value { font-size: 24px; font-weight: 650; font-variant-numeric: tabular-nums; white-space: nowrap; }
.kpi .note { color: var(--muted); font-size: 12px; }
.kpi.bad .value { color: var(--bad); }
.card { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 18px 20px; margin-bottom: 16px; }
.card .note { margin: 0 0 10px; color: var(--muted); font-size: 13px; }
svg.chart { display: block; width: 100%; height: auto; }
table { width: 100%; border-collapse: collapse; font-size: 13px; }
th, td { text-align: left; vertical-align: top; padding: 6px 8px; border-top: 1px solid var(--line); }
th { width: 180px; color: var(--muted); font-weight: 500; }
td { overflow-wrap: anywhere; font-variant-numeric: tabular-nums; }
@media (max-width: 640px) { .kpis { grid-template-columns: repeat(2, 1fr); } }
footer { color: var(--muted); font-size: 12px; margin-top: 8px; }
"""

"""The run summary as a short table on the terminal."""

from __future__ import annotations

import click


def duplicate_ids(summary: dict) -> dict:
    """{count, listed} of the run's duplicate manifest ids; summaries written before the key
    became `manifest.duplicate_id` called it `duplicates`, with `examples`."""
    if "manifest.duplicate_id" in summary:
        return summary["manifest.duplicate_id"]
    old = summary.get("duplicates") or {}
    return {"count": old.get("count", 0), "listed": old.get("examples") or []}


def _fmt_ms(value) -> str:
    return "-" if value is None else (f"{value:.0f}" if value >= 100 else f"{value:.1f}")


def print_summary(summary: dict) -> None:
    if summary.get("aborted"):
        print_aborted(summary)
        return
    echo = click.echo
    inv = summary["invariant"]
    mark = "holds" if inv["ok"] else "BROKEN"
    echo("")
    echo(f"tessera · {summary['job']} · run {summary['run_id']}")
    echo(f"  rows in     {summary['rows_in']:>8}   distinct manifest ids")
    echo(f"  rows out    {summary['rows_out']:>8}   invariant rows in = rows out, each id once: {mark}")
    if not inv["ok"]:
        echo(f"  broken by   {inv.get('missing', 0)} ids without a row, {inv.get('ids_written_twice', 0)} rows twice, "
             f"{inv.get('ids_not_in_manifest', 0)} ids not in the manifest")
    if summary.get("skipped"):
        echo(f"  skipped     {summary['skipped']:>8}   already committed by earlier runs (resume)")
    echo(f"  processed   {summary.get('processed', summary['ok'] + summary['errors']):>8}   by this run")
    echo(f"  ok          {summary['ok']:>8}")
    echo(f"  errors      {summary['errors']:>8}" + ("   " + ", ".join(f"{code} {n}" for code, n in summary["errors_by_code"].items()) if summary["errors"] else ""))
    if duplicates := duplicate_ids(summary)["count"]:
        echo(f"  duplicates  {duplicates:>8}   manifest.duplicate_id (listed in summary.json)")
    echo(f"  throughput  {summary['throughput_rows_per_s'] or 0:>8.2f}   rows/s over {summary['wall_s']:.1f} s")
    lat = summary["latency_ms"]
    echo("  latency ms  " + "   ".join(f"{stage[:-3]} p50 {_fmt_ms(v['p50'])} p95 {_fmt_ms(v['p95'])}" for stage, v in lat.items()))
    placement = summary.get("placement")
    if placement and placement["replicas"]:
        gpus = sorted({g for r in summary["replicas"].values() for g in r.get("gpu_ids") or []})
        echo(f"  replicas    {placement['replicas']:>8}   on {placement['nodes']} node(s)" + (f", GPUs {', '.join(gpus)}" if gpus else ", CPU"))
    echo(f"  tokens      {summary['tokens']['input']} in, {summary['tokens']['output']} out; re-asks {summary['reasks']}, cut at the limit {summary['truncated']}")
    echo(f"  results     {summary['output']['run_dir']}")
    echo(f"  summary     {summary['output']['path']}/_runs/{summary['run_id']}/summary.json")
    path = summary["output"]["path"]
    if "://" in path and not path.startswith("file://"):
        echo(f"  read it     tessera results SPEC.yaml   (the current table, latest row per id)")
    else:
        echo(f"  read it     tessera results {path}")
        echo(f"  or in SQL   SELECT status, error_code, count(*) FROM read_parquet('{path}/**/*.parquet') GROUP BY ALL")


def print_aborted(summary: dict) -> None:
    """A run that stopped early wrote only why and when (pipeline/run.py aborted_summary; older
    ones only job, run id and the reason): say that, and what to do next."""
    echo = click.echo
    echo("")
    echo(f"tessera · {summary.get('job', '?')} · run {summary.get('run_id', '?')} · ABORTED")
    echo(f"  why         {summary['aborted']}")
    if summary.get("started_at"):
        echo(f"  ran         {summary['started_at']} for {summary.get('wall_s') or 0:.1f} s")
    echo("  results     what it committed before the stop is kept; a rerun of the spec resumes from there")
    if run_dir := (summary.get("output") or {}).get("run_dir"):
        echo(f"  committed   {run_dir}")

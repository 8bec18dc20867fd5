"""`tessera`: the command line. The only face most users see.

Exit status: 0 when the job ran to its end (even if some rows are errors), 2 for an invalid
spec or arguments, 1 when the job failed or the rows-in = rows-out invariant did not hold.
"""

from __future__ import annotations

import json
import os
import sys

import click
import yaml

from jobs.logs import configure_logging
from schemas.errors import ErrorCode
from schemas.spec import load_spec

EXIT_FAILED = 1
EXIT_USAGE = 2


def _load(spec_path: str, overrides: tuple[str, ...], task: bool = True):
    """The resolved spec; with `task`, its task resolved too, so that a bad output schema is a
    usage error now and not a failed job later. A schema module may sit next to the spec."""
    from schemas.tasks import resolve_task

    try:
        spec = load_spec(spec_path, list(overrides)).resolved()
        if task:
            resolve_task(spec.task, search_dirs=[os.path.dirname(os.path.abspath(spec_path))])
        return spec
    except ValueError as exc:  # a SpecError, or what is wrong with the output schema
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)


def _at_tick(spec, tick: str | None):
    """The spec rendered for `--tick` (and the tick), or unchanged when it has no tick templates."""
    from jobs.ticks import TickError, parse_tick, render_for_tick, uses_tick

    if tick is None:
        if uses_tick(spec):
            click.echo("error: input.manifest uses {{ tick }}: pass --tick TIME (ISO 8601) or --tick latest", err=True)
            sys.exit(EXIT_USAGE)
        return spec, None
    try:
        tick_time = parse_tick(tick, spec)
        return render_for_tick(spec, tick_time).resolved(), tick_time
    except TickError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="tessera")
def main() -> None:
    """tessera: run a vision-language model over manifests of images, videos and documents,
    and write one schema-validated result row per input to Parquet.

    \b
    Start with:  tessera run jobs/examples/demo-moderation.yaml
    Every spec key is described in docs/spec.md.
    """


set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
    help="Override a spec key, e.g. --set model.batch_size=16 (repeatable; value parsed as YAML).",
)


def estimate_options(command):
    """--estimate and what it plans for (jobs/estimate.py)."""
    options = [
        click.option("--estimate", is_flag=True, help="With --dry-run: sample ~200 rows through the real CPU stage and print "
                     "what the whole job needs: GPU-hours, CPU cores per GPU, bandwidth, wall time."),
        click.option("--gpus", type=click.IntRange(min=1), default=8, show_default=True, help="--estimate: GPUs to plan for."),
        click.option("--items", type=click.IntRange(min=1), help="--estimate: items in the whole job (default: count the manifest)."),
        click.option("--rate", type=click.FloatRange(min=0, min_open=True), help="--estimate: measured items/s of one model "
                     "replica, e.g. from a GPU benchmark (default: the roofline of docs/capacity.md)."),
        click.option("--output-tokens", type=click.IntRange(min=1), help="--estimate: tokens generated per item "
                     "(default: min(task max_new_tokens, 200))."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command()
@click.argument("spec_path", metavar="SPEC.yaml", type=click.Path(dir_okay=False))
@set_option
@click.option("--ray-address", help="Ray cluster to use (default: ray.address in the spec, then RAY_ADDRESS, then a local cluster).")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N manifest rows (for a quick try).")
@click.option("--dry-run", is_flag=True, help="Print the plan (rows, media kinds, resolved spec) and exit without running the model.")
@click.option("--run-id", help="Use this run id instead of a fresh one.")
@click.option("--tick", metavar="TIME|latest", help="Run as the scheduled run of this tick: an ISO 8601 time, or `latest` "
              "(the most recent tick of the spec's schedule). Renders `{{ tick }}` in input.manifest.")
@click.option("--env-file", type=click.Path(exists=True, dir_okay=False), help="Set the variables in this JSON file "
              "first (written by `tessera submit --forward-env`); their values are masked in logs.")
@estimate_options
def run(spec_path, overrides, ray_address, limit, dry_run, run_id, tick, env_file, estimate, gpus, items, rate, output_tokens):
    """Run the job in SPEC.yaml to its end and print a summary."""
    if env_file:
        from jobs.forward_env import load_env_file

        load_env_file(env_file)
    spec = _load(spec_path, overrides)
    spec, tick_time = _at_tick(spec, tick)
    tick_text = tick_time.isoformat() if tick_time else None
    if dry_run or estimate:
        configure_logging(job=spec.name, tick=tick_text)
        if estimate:
            from jobs.estimate import estimate as plan_capacity, print_estimate

            print_estimate(plan_capacity(spec, gpus, items=items, rate=rate, output_tokens=output_tokens))
        else:
            from jobs.plan import print_dry_run

            print_dry_run(spec, limit)
        return
    _execute(spec, run_id=run_id, ray_address=ray_address, limit=limit, tick=tick_text)


def _execute(spec, *, run_id=None, ray_address=None, limit=None, tick=None, redrive_codes=None) -> None:
    """Run (or re-drive) a job, print its summary, exit with the documented status."""
    from pipeline.run import OutputExists, new_run_id, run_job

    run_id = run_id or new_run_id()  # made here, so that every log line of the run carries it
    configure_logging(job=spec.name, run_id=run_id, tick=tick)
    try:
        summary = run_job(spec, run_id=run_id, ray_address=ray_address, limit=limit, redrive_codes=redrive_codes)
    except (FileNotFoundError, OutputExists) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except Exception as exc:  # the job itself failed: say why, exit 1
        import structlog

        structlog.get_logger("tessera").exception("run_failed", error=str(exc))
        click.echo(f"error: the job failed: {type(exc).__name__}: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    from jobs.summary import print_summary

    print_summary(summary)
    if not summary["invariant"]["ok"]:
        sys.exit(EXIT_FAILED)


@main.command()
@click.argument("spec_path", metavar="SPEC.yaml", type=click.Path(dir_okay=False))
@set_option
@click.option("--codes", metavar="CODE[,CODE…]", help="Only error rows with these codes, e.g. fetch.timeout,model.oom (default: every error row).")
@click.option("--ray-address", help="Ray cluster to use (as for `tessera run`).")
def redrive(spec_path, overrides, codes, ray_address):
    """Re-run only the error rows of earlier runs of SPEC.yaml (the dead letters), all of them
    or those with the given codes. Their new rows supersede the old ones in `tessera results`."""
    spec = _load(spec_path, overrides)
    wanted = tuple(code.strip() for code in (codes or "").split(",") if code.strip())
    unknown = [code for code in wanted if code not in {c.value for c in ErrorCode}]
    if unknown:
        click.echo(f"error: unknown error code(s): {', '.join(unknown)} (docs/errors.md lists them)", err=True)
        sys.exit(EXIT_USAGE)
    _execute(spec, ray_address=ray_address, redrive_codes=wanted)


def _output_of(path_or_spec: str):
    """An output path, or a spec (its output.path and storage options)."""
    if path_or_spec.endswith((".yaml", ".yml")):
        spec = _load(path_or_spec, (), task=False)  # reading results needs no schema module
        return spec.output.path, spec.storage
    from schemas.spec import StorageSpec

    return path_or_spec, StorageSpec()


@main.command()
@click.argument("output", metavar="OUTPUT_PATH|SPEC.yaml")
@click.option("--status", type=click.Choice(["ok", "error"]), help="Only rows with this status.")
@click.option("--code", "error_code", metavar="CODE", help="Only error rows with this code.")
@click.option("--format", "fmt", type=click.Choice(["table", "jsonl", "csv", "parquet"]), default="table", show_default=True)
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="Write here (a path, or s3://… with the spec's storage options) instead of standard output (required for parquet).")
@click.option("--limit", type=click.IntRange(min=1), help="At most N rows (table format: 20 unless given).")
@click.option("--sql", "show_sql", is_flag=True, help="Print the DuckDB query that reads the current table, and exit.")
def results(output, status, error_code, fmt, out_path, limit, show_sql):
    """The current results of a job: the latest row per id over all of its runs, errors
    included, columns unioned by name across runs."""
    from pipeline.results import current_results, results_sql

    path, storage_spec = _output_of(output)
    if show_sql:
        click.echo(results_sql(path))
        return
    filters = []
    if status:
        filters.append(f"status = '{status}'")
    if error_code:
        filters.append(f"error_code = '{error_code.replace(chr(39), '')}'")
    table = current_results(path, storage_spec, where=" AND ".join(filters) or None)
    if fmt == "table" and not out_path:
        limit = limit or 20
    if limit:
        table = table.slice(0, limit)
    from jobs.tables import write_table

    write_table(table, fmt, out_path, storage_spec)


@main.command()
@click.argument("output", metavar="OUTPUT_PATH|SPEC.yaml")
@click.option("--target-file-mb", type=click.FloatRange(min=1), default=64, show_default=True, help="Size of the merged files.")
@click.option("--staging-older-than-hours", type=click.FloatRange(min=0), default=6, show_default=True,
              help="Also delete staging files of killed runs older than this.")
def compact(output, target_file_mb, staging_older_than_hours):
    """Merge the small result files of finished runs, and clean up staging files left by
    killed runs."""
    from pipeline.results import compact as compact_output
    from pipeline.run import remove_stale_staging

    path, storage_spec = _output_of(output)
    report = compact_output(path, storage_spec, target_file_mb)
    removed = remove_stale_staging(path, storage_spec, staging_older_than_hours * 3600)
    click.echo(
        f"compacted {report['files_merged']} files into {report['files_written']} across {report['runs']} finished runs; "
        f"removed {removed} stale staging files"
    )


@main.command()
@click.argument("spec_path", metavar="SPEC.yaml", type=click.Path(dir_okay=False))
@set_option
def validate(spec_path, overrides):
    """Check SPEC.yaml and print it with every default filled in."""
    spec = _load(spec_path, overrides)
    click.echo(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), nl=False)
    click.echo(f"# {spec_path}: valid", err=True)


@main.command()
@click.argument("name", metavar="PRESET_OR_SCHEMA")
def schema(name):
    """Print the JSON Schema of a task's output: a preset (moderation, document_extraction,
    caption), a `module:PydanticModel`, or a JSON Schema file."""
    from schemas.tasks import task_from_preset_or_schema

    try:
        task = task_from_preset_or_schema(name)
    except ValueError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    click.echo(json.dumps(task.json_schema, indent=2))


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--images", default=32, show_default=True, help="How many images.")
@click.option("--videos", default=4, show_default=True, help="How many short videos.")
def sample(directory, images, videos):
    """Write a small sample corpus (images, videos, a PDF, a few broken files) and its
    manifest.jsonl into DIRECTORY."""
    from jobs.sample import write_sample_corpus

    manifest = write_sample_corpus(directory, n_images=images, n_videos=videos)
    click.echo(f"wrote {manifest}")


# --- on a cluster: submit, status, logs, stop, list, schedule (jobs/submit.py, jobs/schedule.py) ---

address_option = click.option(
    "--address", metavar="URL",
    help="The cluster's Ray dashboard, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, then RAY_ADDRESS).",
)
forward_option = click.option(
    "--forward-env", "forward", multiple=True, metavar="NAME",
    help="Give the job this variable of your environment (repeatable). It does not go in the runtime env, "
    "which Ray's dashboard shows, and is masked in logs. Prefer the cluster's own credentials.",
)
ship_code_option = click.option(
    "--ship-code/--no-ship-code", default=True, show_default=True,
    help="Send this tessera's code with the job, or use the tessera installed in the cluster's image.",
)


def _cluster(action):
    """Run `action()`; turn the errors of talking to a cluster into a message and an exit status."""
    from jobs.forward_env import ForwardEnvError
    from jobs.submit import BadRequest, SubmitError
    from jobs.ticks import TickError

    try:
        return action()
    except (BadRequest, ForwardEnvError, TickError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except SubmitError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILED)


def _exit_with(status: str) -> None:
    click.echo(status)
    sys.exit(0 if status == "SUCCEEDED" else EXIT_FAILED)


@main.command()
@click.argument("spec_path", metavar="SPEC.yaml", type=click.Path(dir_okay=False))
@set_option
@address_option
@forward_option
@ship_code_option
@click.option("--tick", metavar="TIME|latest", help="Submit it as the run of this tick (renders `{{ tick }}` in input.manifest).")
@click.option("--submission-id", help="Use this submission id (default: <job name>-<run id>).")
@click.option("--wait", is_flag=True, help="Wait for the job to end; exit 0 if it SUCCEEDED, 1 otherwise.")
@click.option("--follow", is_flag=True, help="Print the job's logs as they come until it ends; exit as with --wait.")
def submit(spec_path, overrides, address, forward, ship_code, tick, submission_id, wait, follow):
    """Submit the job in SPEC.yaml to a Ray cluster and print its submission id.

    \b
    The job carries this tessera's code and the resolved spec; the cluster's image provides
    the dependencies (infra/Dockerfile). Follow it with `tessera status ID` and
    `tessera logs ID --follow`. Local paths in the spec must exist on the cluster's nodes.
    """
    from jobs import submit as jobs_submit

    spec = _load(spec_path, overrides)
    spec, tick_time = _at_tick(spec, tick)
    configure_logging(job=spec.name, tick=tick_time.isoformat() if tick_time else None)
    client = _cluster(lambda: jobs_submit.connect(address))
    submission = _cluster(lambda: jobs_submit.submit_spec(
        client, spec, submission_id=submission_id, tick=tick_time, forward=forward, ship_code=ship_code))
    click.echo(submission.submission_id)
    if follow:
        _cluster(lambda: jobs_submit.follow_logs(client, submission.submission_id, lambda text: click.echo(text, nl=False)))
    if wait or follow:
        _exit_with(_cluster(lambda: jobs_submit.wait_until_done(client, submission.submission_id)))


@main.command()
@click.argument("submission_id", metavar="ID")
@address_option
@click.option("--wait", is_flag=True, help="Wait for the job to end; exit 0 if it SUCCEEDED, 1 otherwise.")
@click.option("--json", "as_json", is_flag=True, help="Print it as JSON.")
def status(submission_id, address, wait, as_json):
    """Show a submitted job: status, job name, run id, tick, times, Ray's message (the error of a
    FAILED job), and where its results and summary are."""
    from jobs import submit as jobs_submit

    client = _cluster(lambda: jobs_submit.connect(address))
    if wait:
        _cluster(lambda: jobs_submit.wait_until_done(client, submission_id))
    described = jobs_submit.describe(_cluster(lambda: jobs_submit.job_info(client, submission_id)))
    click.echo(json.dumps(described, indent=2) if as_json else jobs_submit.format_status(described))
    if wait and described["status"] != "SUCCEEDED":
        sys.exit(EXIT_FAILED)


@main.command()
@click.argument("submission_id", metavar="ID")
@address_option
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until the job ends.")
def logs(submission_id, address, follow):
    """Print the logs of a submitted job (tessera's lines are JSON with job, run_id and tick)."""
    from jobs import submit as jobs_submit

    client = _cluster(lambda: jobs_submit.connect(address))
    if follow:
        _cluster(lambda: jobs_submit.follow_logs(client, submission_id, lambda text: click.echo(text, nl=False)))
    else:
        click.echo(_cluster(lambda: jobs_submit.job_logs(client, submission_id)), nl=False)


@main.command()
@click.argument("submission_id", metavar="ID")
@address_option
@click.option("--wait", is_flag=True, help="Wait until the job has stopped.")
def stop(submission_id, address, wait):
    """Stop a submitted job (Ray sends its driver SIGTERM, then SIGKILL)."""
    from jobs import submit as jobs_submit

    client = _cluster(lambda: jobs_submit.connect(address))
    if not _cluster(lambda: jobs_submit.stop_job(client, submission_id)):
        click.echo(f"{submission_id} had already ended: {_cluster(lambda: jobs_submit.status_of(client, submission_id))}")
        return
    click.echo(f"stopping {submission_id}")
    if wait:
        click.echo(_cluster(lambda: jobs_submit.wait_until_done(client, submission_id)))


@main.command(name="list")
@address_option
@click.option("--job", "job_name", metavar="NAME", help="Only the runs of this job.")
@click.option("--all", "include_all", is_flag=True, help="Every job on the cluster, not only tessera's.")
@click.option("--json", "as_json", is_flag=True, help="Print them as JSON.")
def list_jobs(address, job_name, include_all, as_json):
    """List the jobs submitted to the cluster, oldest first."""
    from jobs import submit as jobs_submit

    client = _cluster(lambda: jobs_submit.connect(address))
    found = _cluster(lambda: jobs_submit.tessera_jobs(client, job_name, include_all))
    if as_json:
        click.echo(json.dumps([jobs_submit.describe(info) for info in found], indent=2))
    else:
        click.echo(jobs_submit.format_table(found))


@main.command()
@click.argument("spec_paths", metavar="SPEC.yaml...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@set_option
@address_option
@forward_option
@ship_code_option
@click.option("--poll-seconds", type=click.FloatRange(min=1), default=30, show_default=True,
              help="How often to look at the cluster between ticks (for held-back ticks and deadlines).")
@click.option("--once", is_flag=True, help="Look once, submit what is due now, and exit (e.g. run by an outside cron; "
              "what is due: ticks since the last one on the cluster, or within starting_deadline_seconds).")
def schedule(spec_paths, overrides, address, forward, ship_code, poll_seconds, once):
    """Run the schedules of the specs: submit each job to the cluster at its cron ticks.

    \b
    Each spec needs `schedule: {cron: "0 3 * * *", timezone: UTC, concurrency_policy: forbid,
    starting_deadline_seconds: 3600}`, with the semantics of a Kubernetes CronJob. The cluster
    holds the only state: restart the scheduler at any time, a tick is never submitted twice
    (its submission id is the job name and the tick time). Stop it with Ctrl-C or SIGTERM.
    """
    from jobs import submit as jobs_submit
    from jobs.forward_env import collect
    from jobs.schedule import ScheduledJob, Scheduler, stop_on_signals

    configure_logging()
    jobs = [_cluster(lambda path=path: ScheduledJob.from_spec(_load(path, overrides), source=path)) for path in spec_paths]
    for job in jobs:
        _cluster(lambda job=job: jobs_submit.check_no_credentials(job.spec))
    _cluster(lambda: collect(forward))  # a missing variable is an error now, not at the first tick
    client = _cluster(lambda: jobs_submit.connect(address))
    scheduler = _cluster(lambda: Scheduler(jobs, client, forward=forward, ship_code=ship_code, poll_seconds=poll_seconds))
    if once:
        _cluster(scheduler.recover)  # an unreachable cluster is an exit status here, not a retry
        for submission in _cluster(scheduler.step):
            click.echo(submission.submission_id)
        return
    _cluster(lambda: scheduler.run_forever(stop_on_signals()))


@main.command()
@click.argument("output_path", metavar="OUTPUT_PATH")
@click.option("--run", "run_id", metavar="RUN_ID", help="The run to report (default: the run that started last).")
def report(output_path, run_id):
    """Render a run's summary as a self-contained HTML page with charts (throughput over
    time, errors by code, latency per stage) and a PNG of the main chart, written next to
    its summary.json under OUTPUT_PATH/_runs/RUN_ID/; print the summary table."""
    from jobs.report import write_report
    from jobs.summary import print_summary

    try:
        files = write_report(output_path, run_id)
    except FileNotFoundError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    print_summary(files.summary)
    click.echo(f"  report      {files.html}")
    click.echo(f"  chart       {files.png}")


if __name__ == "__main__":
    main()

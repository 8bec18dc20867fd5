"""`tessera`: the command line. The only face most users see.

Exit status: 0 when the job ran to its end (even if some rows are errors), 2 for an invalid
spec or arguments, 1 when the job failed or the rows-in = rows-out invariant did not hold.
"""

from __future__ import annotations

import json
import sys

import click
import yaml

from jobs.logs import configure_logging
from schemas.spec import SpecError, load_spec

EXIT_FAILED = 1
EXIT_USAGE = 2


def _load(spec_path: str, overrides: tuple[str, ...]):
    try:
        return load_spec(spec_path, list(overrides)).resolved()
    except SpecError as exc:
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


@main.command()
@click.argument("spec_path", metavar="SPEC.yaml", type=click.Path(dir_okay=False))
@set_option
@click.option("--ray-address", help="Ray cluster to use (default: ray.address in the spec, then RAY_ADDRESS, then a local cluster).")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N manifest rows (for a quick try).")
@click.option("--dry-run", is_flag=True, help="Print the plan (rows, media kinds, resolved spec) and exit without running the model.")
@click.option("--run-id", help="Use this run id instead of a fresh one.")
def run(spec_path, overrides, ray_address, limit, dry_run, run_id):
    """Run the job in SPEC.yaml to its end and print a summary."""
    spec = _load(spec_path, overrides)
    configure_logging(job=spec.name)
    if dry_run:
        from jobs.plan import print_dry_run

        print_dry_run(spec, limit)
        return
    from pipeline.run import run_job

    try:
        summary = run_job(spec, run_id=run_id, ray_address=ray_address, limit=limit)
    except FileNotFoundError as exc:
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
def validate(spec_path, overrides):
    """Check SPEC.yaml and print it with every default filled in."""
    spec = _load(spec_path, overrides)
    from schemas.tasks import resolve_task

    try:
        resolve_task(spec.task)
    except ValueError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
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


if __name__ == "__main__":
    main()

"""The scheduler, with an injectable clock (no test waits for real minutes), against a real Ray
head started here. Policy tests launch `sleep` jobs carrying the scheduler's submission ids and
metadata, so Ray's own job states decide what is running; one test runs a real tessera job
for a tick and reads the day's results back.
"""

from __future__ import annotations

import copy
import json
import socket
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs

sys.path.insert(0, str(Path(__file__).parent))
from ray_head import RayHead  # noqa: E402

from jobs.cli import main  # noqa: E402
from jobs.schedule import ScheduledJob, Scheduler, plan_tick  # noqa: E402
from jobs.submit import (  # noqa: E402
    Submission, connect, job_metadata, new_run_id, submit_job, tessera_jobs, wait_until_done,
)
from jobs.ticks import CronSchedule, TickError, parse_tick, render_for_tick, tick_stamp  # noqa: E402
from schemas.spec import ScheduleSpec, parse_spec  # noqa: E402

# One xdist worker runs this whole module: its module-scoped fixtures are costly.
pytestmark = pytest.mark.xdist_group("schedule")

UTC = timezone.utc


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


class FakeClock:
    """Schedule time that moves only when told to (or by `wait`, instantly)."""

    def __init__(self, now: datetime):
        self.current = now

    def now(self) -> datetime:
        return self.current

    def set(self, when: datetime) -> None:
        self.current = when

    def wait(self, seconds: float, stop: threading.Event) -> None:
        self.current += timedelta(seconds=seconds)


def make_spec(name: str, cron: str = "*/5 * * * *", manifest: str = "s3://lake/m.jsonl", **schedule):
    return parse_spec({
        "name": name,
        "input": {"manifest": manifest},
        "output": {"path": f"s3://lake/out/{name}"},
        "task": {"preset": "moderation"},
        "schedule": {"cron": cron, **schedule},
    })


# --- ticks, templates and the plan: no cluster ---------------------------------------------


def test_ticks_between_is_half_open_and_in_the_schedule_timezone():
    cron = CronSchedule.from_spec(ScheduleSpec(cron="0 3 * * *", timezone="Europe/Berlin"))
    ticks = cron.ticks_between(at("2026-11-20T02:00:00"), at("2026-11-22T02:00:00"))  # 03:00 Berlin = 02:00 UTC
    assert [t.isoformat() for t in ticks] == ["2026-11-21T03:00:00+01:00", "2026-11-22T03:00:00+01:00"]
    assert cron.ticks_between(ticks[-1], at("2026-11-22T02:00:00")) == []


def test_a_daylight_saving_night_has_one_tick():
    cron = CronSchedule.from_spec(ScheduleSpec(cron="30 2 * * *", timezone="Europe/Berlin"))
    # 2026-03-29 02:30 does not exist in Berlin: the day still gets exactly one run.
    ticks = cron.ticks_between(at("2026-03-28T12:00:00"), at("2026-03-30T12:00:00"))
    assert len(ticks) == 2 and ticks[0].date().isoformat() == "2026-03-29"


def test_a_fall_back_night_runs_a_fixed_time_once():
    cron = CronSchedule.from_spec(ScheduleSpec(cron="30 2 * * *", timezone="Europe/Berlin"))
    # 2026-10-25 02:30 happens twice in Berlin (CEST, then CET an hour later): it runs at the first.
    ticks = cron.ticks_between(at("2026-10-24T12:00:00"), at("2026-10-26T12:00:00"))
    assert [t.isoformat() for t in ticks] == ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"]
    assert cron.latest_at_or_before(at("2026-10-25T01:40:00")).isoformat() == "2026-10-25T02:30:00+02:00"
    assert cron.next_after(at("2026-10-25T00:40:00")).isoformat() == "2026-10-26T02:30:00+01:00"
    # A schedule with a wildcard hour runs every real hour, the repeated one too (as cron does).
    half_hourly = CronSchedule.from_spec(ScheduleSpec(cron="*/30 * * * *", timezone="Europe/Berlin"))
    repeated = half_hourly.ticks_between(at("2026-10-24T23:45:00"), at("2026-10-25T01:45:00"))
    assert [t.isoformat() for t in repeated] == [
        "2026-10-25T02:00:00+02:00", "2026-10-25T02:30:00+02:00", "2026-10-25T02:00:00+01:00", "2026-10-25T02:30:00+01:00",
    ]


def test_plan_starts_the_latest_due_tick_and_misses_the_rest():
    cron = CronSchedule.from_spec(ScheduleSpec(cron="*/5 * * * *"))
    plan = plan_tick(cron, at("2026-11-22T02:59:00"), at("2026-11-22T03:11:00"), None)
    assert plan.start == at("2026-11-22T03:10:00")
    assert plan.missed == [(at("2026-11-22T03:00:00"), "superseded"), (at("2026-11-22T03:05:00"), "superseded")]
    assert plan_tick(cron, at("2026-11-22T03:10:00"), at("2026-11-22T03:11:00"), None).start is None


def test_plan_honours_the_starting_deadline():
    cron = CronSchedule.from_spec(ScheduleSpec(cron="0 3 * * *"))
    late = plan_tick(cron, at("2026-11-21T03:00:00"), at("2026-11-22T03:10:00"), timedelta(minutes=5))
    assert late.start is None and late.missed == [(at("2026-11-22T03:00:00"), "past_deadline")]
    in_time = plan_tick(cron, at("2026-11-21T03:00:00"), at("2026-11-22T03:04:00"), timedelta(minutes=5))
    assert in_time.start == at("2026-11-22T03:00:00")


def test_manifest_is_rendered_for_the_tick_with_the_prompt_jinja():
    spec = make_spec("t", manifest="s3://lake/uploads/{{ tick.strftime('%Y-%m-%d') }}/*.jsonl")
    tick = parse_tick("2026-11-22T03:00:00", spec)
    assert render_for_tick(spec, tick).input.manifest == "s3://lake/uploads/2026-11-22/*.jsonl"
    yesterday = make_spec("t", manifest="{{ (tick - timedelta(days=1)).strftime('%Y/%m/%d') }}.jsonl")
    assert render_for_tick(yesterday, tick).input.manifest == "2026/11/21.jsonl"
    with pytest.raises(TickError, match="'day' is undefined"):
        render_for_tick(make_spec("t", manifest="{{ day }}.jsonl"), tick)


def test_latest_tick_and_errors_that_say_what_to_fix():
    spec = make_spec("t", cron="0 3 * * *")
    assert parse_tick("latest", spec, now=at("2026-11-22T10:00:00")) == at("2026-11-22T03:00:00")
    with pytest.raises(TickError, match="ISO 8601"):
        parse_tick("yesterday", spec)
    with pytest.raises(TickError, match="not a cron expression"):
        ScheduledJob.from_spec(make_spec("t", cron="every night"))
    with pytest.raises(TickError, match="IANA timezone"):
        ScheduledJob.from_spec(make_spec("t", timezone="Mars/Olympus"))
    no_schedule = parse_spec({"name": "n", "input": {"manifest": "m"}, "output": {"path": "o"}, "task": {"preset": "caption"}})
    with pytest.raises(TickError, match="has no `schedule:`"):
        ScheduledJob.from_spec(no_schedule, "n.yaml")
    with pytest.raises(TickError, match="share a job name"):
        Scheduler([ScheduledJob.from_spec(make_spec("same"))] * 2, client=None)


def test_run_without_a_tick_refuses_a_tick_template(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(json.dumps({"name": "t", "input": {"manifest": "{{ tick.year }}/m.jsonl"},
                                "output": {"path": "o"}, "task": {"preset": "caption"}}))
    result = CliRunner().invoke(main, ["run", str(spec)])
    assert result.exit_code == 2
    assert "pass --tick" in result.stderr


def test_submission_ids_are_deterministic():
    from jobs.submit import scheduled_submission_id

    berlin = parse_tick("2026-11-22T04:00:00+01:00", make_spec("t"))
    assert scheduled_submission_id("nightly", berlin) == "nightly-20261122T030000Z" == f"nightly-{tick_stamp(at('2026-11-22T03:00:00'))}"


# --- against a real Ray head ------------------------------------------------------------------


@pytest.fixture(scope="module")
def head():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "disabled")
        patch.delenv("RAY_ADDRESS", raising=False)
        patch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
        ray_head = RayHead()
        ray_head.start()
        try:
            yield ray_head
        finally:
            ray_head.stop()
    assert not ray_head.our_processes(), "the head left processes behind"


@pytest.fixture(scope="module")
def client(head):
    return connect(head.dashboard_url)


def shell_launcher(client, command: str):
    """Launch a plain shell command as the tick's run, with the ids and metadata a real
    submission carries, so the scheduler finds it on the cluster as one of its runs."""
    launched = []

    def launch(spec, *, submission_id, tick):
        run_id = new_run_id()
        submit_job(client, entrypoint=command, submission_id=submission_id, metadata=job_metadata(spec, run_id, tick))
        launched.append(submission_id)
        return Submission(submission_id, run_id, tick)

    launch.launched = launched
    return launch


def step_until_submitted(scheduler: Scheduler, tries: int = 4) -> list[Submission]:
    """A step that should submit, asked again at the same (fake) time if it did not: on a loaded
    machine the head can fail a call, and the scheduler by design leaves a tick it could not
    submit unsettled and tries it at its next step. A tick held back or missed stays []."""
    for _ in range(tries):
        if submitted := scheduler.step():
            return submitted
        time.sleep(2)
    return []


def runs_on_cluster(client, name: str) -> list[str]:
    return [info.submission_id for info in tessera_jobs(client, name)]


def stop_all(client, name: str) -> None:
    for submission_id in runs_on_cluster(client, name):
        client.stop_job(submission_id)
    for submission_id in runs_on_cluster(client, name):
        wait_until_done(client, submission_id, poll_s=0.5, timeout_s=120)


def events(logs, name: str) -> list[dict]:
    return [e for e in logs if e["event"] == name]


def test_exactly_one_submission_per_tick(client):
    name = "every-five"
    clock = FakeClock(at("2026-11-22T02:58:00"))
    launch = shell_launcher(client, "true")
    scheduler = Scheduler([ScheduledJob.from_spec(make_spec(name, concurrency_policy="allow"))], client,
                          clock=clock, launch=launch, poll_seconds=60)
    stop = threading.Event()
    seen = []

    def wait(seconds, _stop):  # the loop's own waits, until 03:11, with a look at the cluster each time
        clock.current += timedelta(seconds=seconds)
        seen.append(clock.current)
        if clock.current >= at("2026-11-22T03:11:00"):
            stop.set()

    clock.wait = wait
    scheduler.run_forever(stop)
    assert launch.launched == [f"{name}-20261122T030000Z", f"{name}-20261122T030500Z", f"{name}-20261122T031000Z"]
    assert sorted(runs_on_cluster(client, name)) == launch.launched
    assert len(seen) > len(launch.launched)  # it looked more often than it submitted
    stop_all(client, name)


def closed_port() -> int:
    """A loopback port nothing listens on: a connection there is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_cluster_blip_is_logged_and_the_scheduler_goes_on(client):
    name = "blip"
    clock = FakeClock(at("2026-11-22T02:58:00"))
    launch = shell_launcher(client, "true")
    away = copy.copy(client)  # the same client, pointed where no head answers
    away._address = f"http://127.0.0.1:{closed_port()}"
    scheduler = Scheduler([ScheduledJob.from_spec(make_spec(name, concurrency_policy="allow"))], away,
                          clock=clock, launch=launch, poll_seconds=60)
    outage = {at("2026-11-22T03:05:00")}  # besides the first step: the tick's own step finds the head away
    stop = threading.Event()

    def wait(seconds, _stop):
        clock.current += timedelta(seconds=seconds)
        scheduler.client = away if clock.current in outage else client
        if clock.current >= at("2026-11-22T03:07:00"):
            stop.set()

    clock.wait = wait
    with capture_logs() as logs:
        scheduler.run_forever(stop)
    unreachable = events(logs, "cluster_unreachable")
    assert len(unreachable) == 2 and "job" not in unreachable[0] and unreachable[1]["job"] == name
    assert "cannot reach the cluster" in unreachable[0]["error"]
    # Recovered at 02:59, submitted 03:00 on time and 03:05 a minute late, once each.
    assert launch.launched == [f"{name}-20261122T030000Z", f"{name}-20261122T030500Z"]
    assert [e["late_s"] for e in events(logs, "tick_submitted")] == [0.0, 60.0]
    stop_all(client, name)


def test_forbid_holds_a_tick_while_the_previous_run_is_running(client):
    name = "forbidden"
    clock = FakeClock(at("2026-11-22T02:59:00"))
    launch = shell_launcher(client, "sleep 600")
    scheduler = Scheduler([ScheduledJob.from_spec(make_spec(name, concurrency_policy="forbid"))], client,
                          clock=clock, launch=launch)
    scheduler.recover()
    clock.set(at("2026-11-22T03:00:05"))
    assert [s.submission_id for s in step_until_submitted(scheduler)] == [f"{name}-20261122T030000Z"]

    with capture_logs() as logs:
        clock.set(at("2026-11-22T03:05:05"))
        assert scheduler.step() == []  # 03:00 still runs: 03:05 is held back
        clock.set(at("2026-11-22T03:06:00"))
        assert scheduler.step() == []
        clock.set(at("2026-11-22T03:10:05"))
        assert scheduler.step() == []  # and now 03:05 is superseded by 03:10, held back in turn
    blocked = events(logs, "tick_blocked")
    assert [e["tick"] for e in blocked] == ["2026-11-22T03:05:00+00:00", "2026-11-22T03:10:00+00:00"]
    assert blocked[0]["previous"] == [f"{name}-20261122T030000Z"]
    assert [(e["tick"], e["reason"]) for e in events(logs, "tick_missed")] == [("2026-11-22T03:05:00+00:00", "superseded")]

    client.stop_job(f"{name}-20261122T030000Z")
    wait_until_done(client, f"{name}-20261122T030000Z", poll_s=0.5, timeout_s=120)
    clock.set(at("2026-11-22T03:11:00"))
    assert [s.submission_id for s in step_until_submitted(scheduler)] == [f"{name}-20261122T031000Z"]  # late, but not missed
    assert sorted(runs_on_cluster(client, name)) == [f"{name}-20261122T030000Z", f"{name}-20261122T031000Z"]
    stop_all(client, name)


def test_forbid_with_a_deadline_gives_the_tick_up(client):
    name = "forbidden-deadline"
    clock = FakeClock(at("2026-11-22T02:59:00"))
    launch = shell_launcher(client, "sleep 600")
    spec = make_spec(name, cron="0 3 * * *", concurrency_policy="forbid", starting_deadline_seconds=120)
    scheduler = Scheduler([ScheduledJob.from_spec(spec)], client, clock=clock, launch=launch)
    scheduler.recover()
    clock.set(at("2026-11-22T03:00:01"))
    scheduler.step()
    with capture_logs() as logs:  # a day later (in schedule time) the run is still going
        clock.set(at("2026-11-23T03:00:30"))
        scheduler.step()
        clock.set(at("2026-11-23T03:02:01"))  # past the 120 s deadline
        scheduler.step()
    assert launch.launched == [f"{name}-20261122T030000Z"]
    assert [e["tick"] for e in events(logs, "tick_blocked")] == ["2026-11-23T03:00:00+00:00"]
    assert [(e["tick"], e["reason"]) for e in events(logs, "tick_missed")] == [("2026-11-23T03:00:00+00:00", "past_deadline")]
    stop_all(client, name)


def test_replace_stops_the_previous_run(client):
    name = "replaced"
    clock = FakeClock(at("2026-11-22T02:59:00"))
    launch = shell_launcher(client, "sleep 600")
    scheduler = Scheduler([ScheduledJob.from_spec(make_spec(name, concurrency_policy="replace"))], client,
                          clock=clock, launch=launch)
    scheduler.recover()
    clock.set(at("2026-11-22T03:00:01"))
    scheduler.step()
    clock.set(at("2026-11-22T03:05:01"))
    assert [s.submission_id for s in step_until_submitted(scheduler)] == [f"{name}-20261122T030500Z"]
    assert wait_until_done(client, f"{name}-20261122T030000Z", poll_s=0.5, timeout_s=120) == "STOPPED"
    stop_all(client, name)


def test_a_restarted_scheduler_does_not_submit_a_tick_again(client):
    name = "restarted"
    spec = make_spec(name, cron="0 3 * * *", starting_deadline_seconds=3600, concurrency_policy="allow")
    launch = shell_launcher(client, "true")
    first = Scheduler([ScheduledJob.from_spec(spec)], client, clock=FakeClock(at("2026-11-22T03:00:10")), launch=launch)
    assert [s.submission_id for s in step_until_submitted(first)] == [f"{name}-20261122T030000Z"]

    # A new process, 20 s later, with the tick inside its catch-up window: Ray's history says
    # the tick was submitted, so nothing is.
    with capture_logs() as logs:
        second = Scheduler([ScheduledJob.from_spec(spec)], client, clock=FakeClock(at("2026-11-22T03:00:30")), launch=launch)
        assert second.step() == []
    loaded = events(logs, "schedule_loaded")[0]
    assert loaded["last_tick"] == "2026-11-22T03:00:00+00:00"

    # Two schedulers at once: `late` checks that the tick is free, then `early` submits it,
    # then `late` submits too: Ray refuses the second job with the same id, and `late` says so.
    early = Scheduler([ScheduledJob.from_spec(spec)], client, clock=FakeClock(at("2026-11-23T03:00:02")), launch=launch)

    def submit_after_the_other(spec, *, submission_id, tick):
        assert [s.submission_id for s in step_until_submitted(early)] == [submission_id]
        return launch(spec, submission_id=submission_id, tick=tick)

    late = Scheduler([ScheduledJob.from_spec(spec)], client, clock=FakeClock(at("2026-11-23T03:00:02")),
                     launch=submit_after_the_other)
    with capture_logs() as logs:
        assert late.step() == []
    assert events(logs, "tick_already_submitted")[0]["submission_id"] == f"{name}-20261123T030000Z"
    assert late.state[name].settled_until == at("2026-11-23T03:00:00")
    assert launch.launched == [f"{name}-20261122T030000Z", f"{name}-20261123T030000Z"]
    assert sorted(runs_on_cluster(client, name)) == launch.launched
    stop_all(client, name)


def test_catch_up_only_within_the_deadline(client):
    launch = shell_launcher(client, "true")
    # Started ten minutes after the 03:00 tick: caught up with a 15 min deadline, not with 5.
    for name, deadline, expected in (("catch-up-15", 900, ["catch-up-15-20261122T030000Z"]), ("catch-up-5", 300, [])):
        spec = make_spec(name, cron="0 3 * * *", starting_deadline_seconds=deadline)
        scheduler = Scheduler([ScheduledJob.from_spec(spec)], client, clock=FakeClock(at("2026-11-22T03:10:00")), launch=launch)
        assert [s.submission_id for s in step_until_submitted(scheduler)] == expected
    # After two days away, only the latest missed tick runs (the earlier one is superseded).
    name = "catch-up-15"
    wait_until_done(client, f"{name}-20261122T030000Z", poll_s=0.5, timeout_s=120)  # forbid: let it end first
    with capture_logs() as logs:
        scheduler = Scheduler([ScheduledJob.from_spec(make_spec(name, cron="0 3 * * *", starting_deadline_seconds=900))],
                              client, clock=FakeClock(at("2026-11-24T03:01:00")), launch=launch)
        assert [s.submission_id for s in step_until_submitted(scheduler)] == [f"{name}-20261124T030000Z"]
    assert [(e["tick"], e["reason"]) for e in events(logs, "tick_missed")] == [("2026-11-23T03:00:00+00:00", "superseded")]
    stop_all(client, "catch-up-15")


@pytest.mark.slow
def test_a_scheduled_tessera_job_reads_the_day_of_its_tick(client, tmp_path, tiny_model_path):
    """The real launcher: tessera's own submission, manifest rendered for the tick, results read back."""
    from jobs.sample import write_sample_corpus

    for day, n_images in (("2026-11-21", 1), ("2026-11-22", 2)):
        manifest = write_sample_corpus(tmp_path / "lake" / day, n_images=n_images, n_videos=0)
        rows = [json.loads(line) for line in manifest.read_text().splitlines()]
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows if str(r.get("id", "")).startswith("img-")))
    spec = parse_spec({
        "name": "nightly-e2e",
        "input": {"manifest": str(tmp_path / "lake") + "/{{ tick.strftime('%Y-%m-%d') }}/manifest.jsonl"},
        "output": {"path": str(tmp_path / "out")},
        "task": {"preset": "moderation", "sampling": {"max_new_tokens": 128}},
        "schedule": {"cron": "0 3 * * *", "starting_deadline_seconds": 3600},
    })
    scheduler = Scheduler([ScheduledJob.from_spec(spec)], client, clock=FakeClock(at("2026-11-22T03:00:20")))
    (submission,) = step_until_submitted(scheduler)
    assert submission.submission_id == "nightly-e2e-20261122T030000Z"
    status = wait_until_done(client, submission.submission_id, poll_s=2, timeout_s=540)
    assert status == "SUCCEEDED", client.get_job_logs(submission.submission_id)[-4000:]
    ids = duckdb.sql(f"SELECT id FROM read_parquet('{tmp_path}/out/**/*.parquet') ORDER BY id").fetchall()
    assert [r[0] for r in ids] == ["img-000", "img-001"]  # the 22nd's two images, not the 21st's one
    info = client.get_job_info(submission.submission_id)
    assert info.metadata["tessera.tick"] == "2026-11-22T03:00:00+00:00"
    assert "--tick 2026-11-22T03:00:00+00:00" in info.entrypoint


def test_schedule_command_once_submits_the_due_tick_once(head, client, tmp_path):
    """`tessera schedule --once` as a user runs it, twice: the second run finds the tick on the
    cluster and submits nothing. (A daily tick a few minutes ago, well inside its deadline.)"""
    latest = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=5)
    spec = tmp_path / "daily.yaml"
    spec.write_text(json.dumps({
        "name": "daily-once",
        "input": {"manifest": str(tmp_path / "{{ tick.strftime('%Y-%m-%d') }}" / "manifest.jsonl")},
        "output": {"path": str(tmp_path / "out")},
        "task": {"preset": "moderation"},
        "schedule": {"cron": f"{latest.minute} {latest.hour} * * *", "starting_deadline_seconds": 3600},
    }))
    first = CliRunner().invoke(main, ["schedule", str(spec), "--address", head.dashboard_url, "--once"])
    assert first.exit_code == 0, first.output
    assert first.stdout.split() == [f"daily-once-{tick_stamp(latest)}"]
    second = CliRunner().invoke(main, ["schedule", str(spec), "--address", head.dashboard_url, "--once"])
    assert second.exit_code == 0, second.output
    assert second.stdout.split() == []
    assert runs_on_cluster(client, "daily-once") == [f"daily-once-{tick_stamp(latest)}"]
    stop_all(client, "daily-once")


def test_schedule_command_explains_a_spec_without_schedule(head, tmp_path):
    spec = tmp_path / "plain.yaml"
    spec.write_text(json.dumps({"name": "plain", "input": {"manifest": "m.jsonl"}, "output": {"path": "o"},
                                "task": {"preset": "caption"}}))
    result = CliRunner().invoke(main, ["schedule", str(spec), "--address", head.dashboard_url, "--once"])
    assert result.exit_code == 2
    assert "has no `schedule:`" in result.stderr

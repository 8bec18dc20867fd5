"""Cron ticks and tick templates: when a scheduled job runs, and what it reads when it does.

A *tick* is one scheduled time of a job's `schedule.cron`, a timezone-aware datetime in the
schedule's timezone. Manifest paths may use it in Jinja, e.g.

    input: {manifest: "s3://lake/uploads/{{ tick.strftime('%Y-%m-%d') }}/*.jsonl"}

so the nightly run of 2026-11-22 reads that day's folder, whenever it actually starts (a late
or caught-up run still reads the day of its own tick). `timedelta` is in scope too, for
"yesterday's uploads": `{{ (tick - timedelta(days=1)).strftime('%Y-%m-%d') }}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from schemas.spec import JobSpec, ScheduleSpec

# The same Jinja settings as task prompts (pipeline/prepare.py): sandboxed, and an unknown
# name is an error rather than an empty string, which would silently read the wrong folder.
_JINJA = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)

# Kubernetes gives up counting missed ticks past 100; so do we (only the latest one can run).
MAX_MISSED_TICKS = 100


class TickError(ValueError):
    """A schedule, tick or tick template is invalid. The message says what to fix."""


@dataclass(frozen=True)
class CronSchedule:
    """A cron expression in a timezone. Ticks come out in that timezone."""

    cron: str
    tz: ZoneInfo

    @classmethod
    def from_spec(cls, schedule: ScheduleSpec) -> "CronSchedule":
        if not croniter.is_valid(schedule.cron):
            raise TickError(
                f"schedule.cron {schedule.cron!r} is not a cron expression "
                "(five fields: minute hour day-of-month month day-of-week, e.g. '0 3 * * *')"
            )
        try:
            tz = ZoneInfo(schedule.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise TickError(
                f"schedule.timezone {schedule.timezone!r} is not an IANA timezone (e.g. UTC, Europe/Berlin)"
            ) from None
        return cls(schedule.cron, tz)

    def latest_at_or_before(self, moment: datetime) -> datetime:
        tick = self._cron_at_or_before(moment)
        while self._repeats_wall_time(tick):
            tick = self._cron_at_or_before(_utc(tick) - timedelta(microseconds=1))
        return tick

    def next_after(self, moment: datetime) -> datetime:
        iterator = croniter(self.cron, moment.astimezone(self.tz))
        tick = self._local(iterator.get_next(datetime))
        while self._repeats_wall_time(tick):
            tick = self._local(iterator.get_next(datetime))
        return tick

    def ticks_between(self, after: datetime, until: datetime, limit: int = MAX_MISSED_TICKS + 1) -> list[datetime]:
        """Ticks in (after, until], oldest first; at most the newest `limit` of them."""
        # Compared and stepped in UTC: two aware datetimes of one timezone compare by wall
        # time, so the two passes of a fall-back hour would look like one.
        ticks: list[datetime] = []
        tick = self.latest_at_or_before(until)
        while _utc(tick) > _utc(after) and len(ticks) < limit:
            ticks.append(tick)
            tick = self.latest_at_or_before(_utc(tick) - timedelta(microseconds=1))
        return ticks[::-1]

    def _cron_at_or_before(self, moment: datetime) -> datetime:
        # croniter's get_prev is strictly before its start: start a hair later (in UTC: wall-clock
        # arithmetic would jump the fall-back hour) to include `moment`. From inside a fall-back
        # hour it can land a day early, so walk forward from there.
        moment = _utc(moment)
        tick = croniter(self.cron, (moment + timedelta(microseconds=1)).astimezone(self.tz)).get_prev(datetime)
        forward = croniter(self.cron, tick)
        while _utc(following := forward.get_next(datetime)) <= moment:
            tick = following
        return self._local(tick)

    def _local(self, tick: datetime) -> datetime:
        """The tick with its fold set from its real instant (croniter's own fold is unreliable)."""
        return _utc(tick).astimezone(self.tz)

    def _repeats_wall_time(self, tick: datetime) -> bool:
        """The second pass of a fall-back hour for a schedule at fixed hours: that wall time ran
        already, an hour ago (as in cron: `30 2 * * *` runs once). Schedules with a wildcard hour
        run every real hour, the repeated one too."""
        fields = self.cron.split()
        wildcard_hour = self.cron == "@hourly" or (len(fields) >= 5 and fields[1].startswith("*"))
        return not wildcard_hour and tick.fold == 1 and tick.replace(fold=0).utcoffset() != tick.utcoffset()


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(timezone.utc)


def tick_stamp(tick: datetime) -> str:
    """The tick in UTC, compact and sortable: 20261122T030000Z (for ids and file names)."""
    return tick.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def tick_iso(tick: datetime) -> str:
    return tick.isoformat()


def parse_tick(text: str, spec: JobSpec, now: datetime | None = None) -> datetime:
    """`--tick` as given: `latest` (the most recent tick of the spec's schedule) or an ISO 8601
    time; a time without an offset is in the schedule's timezone (UTC without a schedule)."""
    tz = CronSchedule.from_spec(spec.schedule).tz if spec.schedule else ZoneInfo("UTC")
    if text == "latest":
        if spec.schedule is None:
            raise TickError("--tick latest needs a `schedule:` in the spec; give an ISO 8601 time instead")
        return CronSchedule.from_spec(spec.schedule).latest_at_or_before(now or datetime.now(timezone.utc))
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise TickError(f"--tick {text!r} is neither `latest` nor an ISO 8601 time like 2026-11-22T03:00:00Z") from None
    return moment.replace(tzinfo=tz) if moment.tzinfo is None else moment.astimezone(tz)


def manifest_templates(spec: JobSpec) -> list[str]:
    manifests = spec.input.manifest
    return [m for m in (manifests if isinstance(manifests, list) else [manifests]) if "{{" in m or "{%" in m]


def uses_tick(spec: JobSpec) -> bool:
    return bool(manifest_templates(spec))


def render_for_tick(spec: JobSpec, tick: datetime) -> JobSpec:
    """A copy of the spec whose manifest paths are rendered for `tick` (others unchanged)."""
    rendered = spec.model_copy(deep=True)
    manifests = spec.input.manifest
    if isinstance(manifests, list):
        rendered.input.manifest = [_render(m, tick) for m in manifests]
    else:
        rendered.input.manifest = _render(manifests, tick)
    return rendered


def _render(path: str, tick: datetime) -> str:
    if "{{" not in path and "{%" not in path:
        return path
    try:
        return _JINJA.from_string(path).render(tick=tick, timedelta=timedelta)
    except TemplateError as exc:
        raise TickError(
            f"cannot render input.manifest {path!r} for tick {tick.isoformat()}: {exc} "
            "(only `tick` and `timedelta` are defined)"
        ) from None

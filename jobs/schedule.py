"""The long-lived scheduler: `tessera schedule SPEC.yaml [SPEC2.yaml …] --address …`.

Each spec's `schedule:` has the semantics of a Kubernetes CronJob, and the Ray cluster is the
only state the scheduler keeps (so it can restart, or move, at any time):

- A tick's submission id is `<job name>-<tick in UTC>` (e.g. `nightly-20261122T030000Z`). Ray
  refuses a second job with the same id, so a tick is never submitted twice, even by a
  scheduler restarted a second after submitting it, or by two schedulers at once.
- On start the scheduler asks Ray for the latest tick it submitted for each job and carries
  on from there; with no history, from its own start less `starting_deadline_seconds`.
- Only the most recent due tick can start; older unstarted ticks are missed ("superseded"),
  and so is a tick older than `starting_deadline_seconds` ("past_deadline").
- `concurrency_policy` is checked by asking Ray for this schedule's runs of the job that are
  still PENDING or RUNNING: `forbid` holds the tick back (it starts when the run ends, if
  still within the deadline and not superseded), `replace` stops those runs and starts the
  new one, `allow` starts it regardless.

Time comes from an injectable `Clock`, so tests move through days of ticks without waiting.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Protocol

import structlog

from jobs.submit import (
    ACTIVE, META_JOB, META_TICK, AlreadySubmitted, ClusterUnreachable, Submission, SubmitError, find_job,
    scheduled_submission_id, stop_job, submit_spec, tessera_jobs,
)
from jobs.ticks import CronSchedule, TickError, render_for_tick, tick_iso
from schemas.spec import JobSpec

log = structlog.get_logger("tessera.schedule")

# Never sleep less than this between steps: a clock that wakes a hair early must not spin.
MIN_WAIT_S = 0.5


class Clock(Protocol):
    def now(self) -> datetime: ...

    def wait(self, seconds: float, stop: threading.Event) -> None: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def wait(self, seconds: float, stop: threading.Event) -> None:
        stop.wait(seconds)


@dataclass(frozen=True)
class ScheduledJob:
    spec: JobSpec
    cron: CronSchedule

    @classmethod
    def from_spec(cls, spec: JobSpec, source: str = "spec") -> "ScheduledJob":
        if spec.schedule is None:
            raise TickError(f"{source} has no `schedule:`; add e.g. schedule: {{cron: '0 3 * * *'}}")
        job = cls(spec, CronSchedule.from_spec(spec.schedule))
        render_for_tick(spec, job.cron.next_after(datetime.now(timezone.utc)))  # template errors now, not at 03:00
        return job

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def policy(self) -> str:
        return self.spec.schedule.concurrency_policy

    @property
    def deadline(self) -> timedelta | None:
        seconds = self.spec.schedule.starting_deadline_seconds
        return None if seconds is None else timedelta(seconds=seconds)


@dataclass(frozen=True)
class TickPlan:
    start: datetime | None  # the tick to start now, if any
    missed: list[tuple[datetime, str]] = field(default_factory=list)  # (tick, reason): never to run


def plan_tick(cron: CronSchedule, settled_until: datetime, now: datetime, deadline: timedelta | None) -> TickPlan:
    """Which tick may start now, given that every tick up to `settled_until` is dealt with."""
    due = cron.ticks_between(settled_until, now)
    if not due:
        return TickPlan(None)
    latest, older = due[-1], due[:-1]
    missed = [(tick, "superseded") for tick in older]
    if deadline is not None and now - latest > deadline:
        return TickPlan(None, missed + [(latest, "past_deadline")])
    return TickPlan(latest, missed)


@dataclass
class JobState:
    settled_until: datetime  # every tick at or before it was submitted or missed
    blocked: datetime | None = None  # the tick last held back by `forbid` (logged once)


Launch = Callable[..., Submission]


class Scheduler:
    def __init__(
        self,
        jobs: list[ScheduledJob],
        client,
        *,
        clock: Clock | None = None,
        launch: Launch | None = None,
        forward: tuple[str, ...] = (),
        ship_code: bool = True,
        poll_seconds: float = 30.0,
    ):
        names = [job.name for job in jobs]
        if len(set(names)) != len(names):
            raise TickError(f"two specs share a job name ({', '.join(sorted({n for n in names if names.count(n) > 1}))}); "
                            "submission ids are made of the name, so each scheduled job needs its own")
        self.jobs = jobs
        self.client = client
        self.clock = clock or SystemClock()
        self.launch = launch or (
            lambda spec, *, submission_id, tick: submit_spec(
                client, spec, submission_id=submission_id, tick=tick, forward=forward, ship_code=ship_code
            )
        )
        self.poll_seconds = poll_seconds
        self.state: dict[str, JobState] = {}

    # --- state, from Ray ---------------------------------------------------------------

    def recover(self) -> None:
        """Carry on from the latest tick Ray knows this schedule submitted, for each job."""
        now = self.clock.now()
        latest: dict[str, datetime] = {}
        for info in tessera_jobs(self.client):
            meta = info.metadata or {}
            if meta.get(META_TICK):
                tick = datetime.fromisoformat(meta[META_TICK])
                latest[meta[META_JOB]] = max(tick, latest.get(meta[META_JOB], tick))
        for job in self.jobs:
            start = now - job.deadline if job.deadline is not None else now
            self.state[job.name] = JobState(settled_until=latest.get(job.name, start))
            log.info("schedule_loaded", job=job.name, cron=job.cron.cron, timezone=str(job.cron.tz),
                     policy=job.policy, last_tick=tick_iso(latest[job.name]) if job.name in latest else None,
                     next_tick=tick_iso(job.cron.next_after(now)))

    def _active_runs(self, job: ScheduledJob) -> list[str]:
        return [
            info.submission_id for info in tessera_jobs(self.client, job.name)
            if (info.metadata or {}).get(META_TICK) and str(info.status.value) in ACTIVE
        ]

    # --- one step ------------------------------------------------------------------------

    def step(self) -> list[Submission]:
        """Look at every job once: submit what is due, log what is held back or missed.
        A cluster that does not answer is logged and asked again at the next step."""
        try:
            if not self.state:
                self.recover()
        except SubmitError as exc:
            log.error(_failure_event(exc), error=str(exc), hint="retrying at the next step")
            return []
        now = self.clock.now()
        submitted = []
        for job in self.jobs:
            try:
                if submission := self._step_job(job, now):
                    submitted.append(submission)
            except ClusterUnreachable as exc:  # the other jobs would fail the same way
                log.error("cluster_unreachable", job=job.name, error=str(exc), hint="retrying at the next step")
                break
            except (SubmitError, TickError) as exc:
                log.error("tick_failed", job=job.name, error=str(exc))
        return submitted

    def _step_job(self, job: ScheduledJob, now: datetime) -> Submission | None:
        state = self.state[job.name]
        plan = plan_tick(job.cron, state.settled_until, now, job.deadline)
        for tick, reason in plan.missed:
            log.warning("tick_missed", job=job.name, tick=tick_iso(tick), reason=reason)
            state.settled_until = tick  # oldest first, all after settled_until (a max() would compare wall times)
        if plan.start is None:
            return None
        tick = plan.start
        submission_id = scheduled_submission_id(job.name, tick)
        if find_job(self.client, submission_id) is not None:
            log.info("tick_already_submitted", job=job.name, tick=tick_iso(tick), submission_id=submission_id)
            state.settled_until = tick
            return None
        if not self._concurrency_allows(job, tick, state):
            return None
        try:
            submission = self.launch(job.spec, submission_id=submission_id, tick=tick)
        except AlreadySubmitted:
            log.info("tick_already_submitted", job=job.name, tick=tick_iso(tick), submission_id=submission_id)
            submission = None
        state.settled_until, state.blocked = tick, None
        if submission:
            log.info("tick_submitted", job=job.name, tick=tick_iso(tick), submission_id=submission.submission_id,
                     run_id=submission.run_id, late_s=round((now - tick).total_seconds(), 3))
        return submission

    def _concurrency_allows(self, job: ScheduledJob, tick: datetime, state: JobState) -> bool:
        if job.policy == "allow":
            return True
        active = self._active_runs(job)
        if not active:
            return True
        if job.policy == "forbid":
            if state.blocked != tick:
                log.info("tick_blocked", job=job.name, tick=tick_iso(tick), reason="previous_run_active",
                         previous=active, hint="it starts when they end, unless past the deadline or superseded")
                state.blocked = tick
            return False
        for submission_id in active:  # replace
            stop_job(self.client, submission_id)
            log.info("run_replaced", job=job.name, tick=tick_iso(tick), stopped=submission_id)
        return True

    # --- forever -------------------------------------------------------------------------

    def seconds_to_next_step(self) -> float:
        now = self.clock.now()
        next_tick = min(job.cron.next_after(now) for job in self.jobs)
        return max(MIN_WAIT_S, min(self.poll_seconds, (next_tick - now).total_seconds()))

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():  # the first step recovers the state from Ray
            self.step()
            self.clock.wait(self.seconds_to_next_step(), stop)
        log.info("scheduler_stopped")


def _failure_event(exc: SubmitError) -> str:
    return "cluster_unreachable" if isinstance(exc, ClusterUnreachable) else "recover_failed"


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT, so the scheduler finishes its step and exits."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop

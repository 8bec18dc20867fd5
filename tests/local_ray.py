"""`ray.init` for tests, asked again once when the node is slow to come up.

Ray waits a fixed 30 s for a new raylet to register with its GCS ("The current node timed out
during startup"); on two loaded cores (two test workers starting clusters, a moto server) it
sometimes takes longer. The processes the failed attempt started are this process's children:
they are stopped (by PID, nothing else) before the second attempt.
"""

from __future__ import annotations

import psutil

from ray_head import kill_and_wait

STARTUP_TIMEOUT = "timed out during startup"


def init_ray(**kwargs):
    import ray

    for attempt in (1, 2):
        before = {child.pid for child in psutil.Process().children(recursive=True)}
        try:
            return ray.init(**kwargs)
        except Exception as exc:
            if STARTUP_TIMEOUT not in str(exc) or attempt == 2:
                raise
            ray.shutdown()
            _stop_new_children(before)


def _stop_new_children(before: set[int]) -> None:
    kill_and_wait([child for child in psutil.Process().children(recursive=True) if child.pid not in before])

"""`ray.init` for tests, asked again once when the node is slow to come up; the shared cluster.

Ray waits a fixed 30 s for a new raylet to register with its GCS ("The current node timed out
during startup"); on two loaded cores (two test workers starting clusters, a moto server) it
sometimes takes longer. The processes the failed attempt started are this process's children:
they are stopped (by PID, nothing else) before the second attempt.
"""

from __future__ import annotations

import psutil
from ray_head import kill_and_wait

from actors.predictor import TEST_HOOKS_ENV

STARTUP_TIMEOUT = "timed out during startup"
# The test-only hooks of actors/predictor.py and pipeline/decode.py (inert unless a row id or
# the bytes of an item ask for one) are switched on in the shared cluster's workers, so the
# tests of the hooks run on it instead of starting a cluster of their own.
TEST_HOOKS = {"env_vars": {TEST_HOOKS_ENV: "1"}}


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


def shared_cluster():
    """The local cluster tests share (2 CPUs, test hooks on): started if none is running.
    One that is running without the hooks (a test started its own) is replaced."""
    import ray

    if ray.is_initialized() and ray.get_runtime_context().runtime_env.get("env_vars") == TEST_HOOKS["env_vars"]:
        return ray
    ray.shutdown()
    init_ray(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
        runtime_env=TEST_HOOKS,
    )
    return ray

"""Forward named environment variables to a job on a cluster, without Ray's dashboard showing them.

Ray displays a job's `runtime_env` (its `env_vars` included) in the dashboard and in
`ray job list`, so a credential must never go there. A variable the user names with
`tessera submit --forward-env NAME` travels instead in a file inside the job's working-dir
package, which Ray stores in the cluster's GCS like the job's code and does not display. The
job's driver loads it (`tessera run --env-file`), and each Ray worker of the job loads it
through the runtime env's `worker_process_setup_hook`. The values are masked in every log line.

Prefer the cluster's own credentials (instance roles, Kubernetes secrets): anyone who can
submit jobs to the cluster can read this file, as they can read anything else a job holds.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from jobs.logs import mask_values

ENV_FILE = ".tessera-forwarded-env.json"
SETUP_HOOK = "jobs.forward_env.load_in_worker"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ForwardEnvError(ValueError):
    """A variable to forward is not a valid name or is not set here."""


def collect(names: Iterable[str], environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The values of `names` from this environment; every name must be set."""
    values = {}
    for name in names:
        if not _NAME.match(name):
            raise ForwardEnvError(f"--forward-env {name!r} is not an environment variable name")
        if name not in environ:
            raise ForwardEnvError(f"--forward-env {name}: the variable is not set in this environment")
        values[name] = environ[name]
    return values


def write_env_file(directory: Path, values: Mapping[str, str]) -> Path:
    path = Path(directory) / ENV_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(dict(values), handle)
    return path


def load_env_file(path: str | os.PathLike) -> list[str]:
    """Set the variables in `path` in this process (masked in logs from now on); their names."""
    values = json.loads(Path(path).read_text())
    mask_values(values.values())
    os.environ.update(values)
    return sorted(values)


def load_in_worker() -> None:
    """Ray's `worker_process_setup_hook`: a job's workers start in its working dir."""
    path = Path.cwd() / ENV_FILE
    if path.exists():
        load_env_file(path)

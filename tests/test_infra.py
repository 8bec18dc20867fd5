"""infra/: every manifest parses and carries what its kind requires; the Ray cluster-launcher
config passes Ray's own schema; the image runs the `tessera` the README documents.

No KubeRay CRD schemas are available offline, so the Kubernetes kinds are checked against
their required fields (and the fields tessera relies on) by hand. No Docker engine runs here:
the Dockerfile is checked as text, not built.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml
from croniter import croniter

from jobs.cli import main
from jobs.submit import PACKAGES
from schemas.spec import parse_spec

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def all_kubernetes_documents() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in sorted(KUBERAY.glob("*.yaml")) for doc in documents(path)]


def by_kind(docs, kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def named(docs, kind: str, name: str) -> dict:
    (found,) = [doc for doc in by_kind(docs, kind) if doc["metadata"]["name"] == name]
    return found


# --- the shapes the kinds require -----------------------------------------------------------


def check_pod_spec(pod: dict, where: str) -> None:
    assert pod.get("containers"), f"{where}: a pod needs containers"
    for container in pod["containers"]:
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", container["name"]), f"{where}: container name"
        assert container.get("image"), f"{where}: container {container['name']} has no image"
    mounted = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
    volumes = {v["name"] for v in pod.get("volumes", [])}
    assert mounted <= volumes, f"{where}: mounts {mounted - volumes} have no volume"


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    """RayCluster spec (ray.io/v1): a head group with a pod template; worker groups with a
    name, replica bounds and a pod template; the Ray version of our image and client."""
    assert spec["rayVersion"] == ray.__version__, f"{where}: rayVersion must match the image's Ray"
    head = spec["headGroupSpec"]
    check_pod_spec(head["template"]["spec"], f"{where} head")
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0", "the Job Submission API must be reachable"
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    for group in groups:
        for key in ("groupName", "minReplicas", "maxReplicas", "template"):
            assert key in group, f"{where} group {group.get('groupName')}: {key} is required"
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        check_pod_spec(group["template"]["spec"], f"{where} group {group['groupName']}")
    gpu_groups = [g for g in groups if _gpus(g)]
    cpu_groups = [g for g in groups if not _gpus(g)]
    assert gpu_groups and cpu_groups, f"{where}: a CPU and a GPU worker group"
    assert all(_image(g).endswith("-cuda") for g in gpu_groups), "GPU groups run the CUDA image"
    assert all(_image(g).endswith("-cpu") for g in cpu_groups), "CPU groups run the CPU image"


def _container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


def _image(group: dict) -> str:
    return _container(group)["image"]


def _gpus(group: dict) -> int:
    return int(_container(group).get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def check_rayjob(job: dict, docs: list[dict], where: str) -> dict:
    """RayJob (ray.io/v1): an entrypoint, and a cluster to run it on. Returns the spec it runs."""
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("tessera run /specs/"), "the RayJob runs the documented command"
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode")
    check_ray_cluster_spec(spec["rayClusterSpec"], where)
    # The spec file the entrypoint names is mounted on the head, from a ConfigMap in the same file.
    head_pod = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    spec_path = Path(shlex.split(spec["entrypoint"])[2])
    (mount,) = [m for m in head_pod["containers"][0]["volumeMounts"] if m["mountPath"] == str(spec_path.parent)]
    (volume,) = [v for v in head_pod["volumes"] if v["name"] == mount["name"]]
    config_map = named(docs, "ConfigMap", volume["configMap"]["name"])
    return parse_spec(yaml.safe_load(config_map["data"][spec_path.name]), source=where)


# --- the files --------------------------------------------------------------------------------


def test_every_kubernetes_document_has_the_basics():
    docs = all_kubernetes_documents()
    assert {doc["kind"] for _, doc in docs} >= {"RayCluster", "RayJob", "CronJob", "ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Deployment"}
    for path, doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), path
        name = doc["metadata"].get("name") or doc["metadata"].get("generateName")
        assert name and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?-?", name), f"{path}: {name!r}"
        if doc["kind"] == "ConfigMap":
            assert doc["data"], f"{path}: empty ConfigMap"


def test_raycluster_has_cpu_and_gpu_worker_groups():
    (cluster,) = documents(KUBERAY / "raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    check_ray_cluster_spec(cluster["spec"], "raycluster.yaml")
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # drivers only


def test_rayjob_runs_a_valid_spec():
    docs = documents(KUBERAY / "rayjob.yaml")
    (job,) = by_kind(docs, "RayJob")
    spec = check_rayjob(job, docs, "rayjob.yaml")
    assert spec.input.manifest.startswith("s3://")
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_cronjob_creates_rayjobs_on_the_specs_own_schedule():
    docs = documents(KUBERAY / "cronjob.yaml")
    (cron,) = by_kind(docs, "CronJob")
    assert cron["apiVersion"] == "batch/v1"
    spec = cron["spec"]
    assert croniter.is_valid(spec["schedule"])
    assert spec["concurrencyPolicy"] in ("Allow", "Forbid", "Replace")
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure"), "a Job's pods may not restart Always"
    check_pod_spec(pod, "cronjob.yaml")

    # The RayJob it creates, from the template the script names.
    script = pod["containers"][0]["command"][-1]
    created = re.search(r"kubectl create -f (\S+)", script).group(1)
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if created.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    template = named(docs, "ConfigMap", volume["configMap"]["name"])["data"][Path(created).name]
    rayjob = yaml.safe_load(template)
    assert rayjob["kind"] == "RayJob" and rayjob["metadata"]["generateName"]
    job_spec = check_rayjob(rayjob, docs, "cronjob.yaml RayJob")
    assert rayjob["spec"]["entrypoint"].endswith("--tick latest")

    # `--tick latest` uses the spec's schedule: it must be the CronJob's.
    assert job_spec.schedule.cron == spec["schedule"]
    assert job_spec.schedule.timezone == spec["timeZone"]
    assert "{{ tick" in job_spec.input.manifest
    label = rayjob["metadata"]["labels"]["tessera/job"]
    assert f"-l tessera/job={label}" in script, "forbid looks at this job's RayJobs"

    # RBAC: the pod's service account may create and list RayJobs.
    account = pod["serviceAccountName"]
    binding = [b for b in by_kind(docs, "RoleBinding") if {"kind": "ServiceAccount", "name": account} in b["subjects"]]
    (role,) = [named(docs, "Role", b["roleRef"]["name"]) for b in binding]
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert {("ray.io", "rayjobs", "create"), ("ray.io", "rayjobs", "list")} <= granted


def test_scheduler_deployment_runs_tessera_schedule_on_valid_specs():
    docs = documents(KUBERAY / "scheduler.yaml")
    (deployment,) = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    check_pod_spec(pod, "scheduler.yaml")
    assert deployment["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    args = pod["containers"][0]["args"]
    assert args[0] == "schedule" and "--address" in args
    (config_map,) = by_kind(docs, "ConfigMap")
    mount = pod["containers"][0]["volumeMounts"][0]["mountPath"]
    specs = [a for a in args if a.startswith(mount + "/")]
    assert specs
    names = set()
    for path in specs:
        spec = parse_spec(yaml.safe_load(config_map["data"][Path(path).name]), source=path)
        assert spec.schedule is not None
        names.add(spec.name)
    assert len(names) == len(specs), "scheduled jobs need distinct names"


def test_cluster_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "cluster-launcher" / "aws.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` runs: the schema ray ships, and more
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert types["gpu"]["docker"]["worker_image"].endswith("-cuda")
    assert config["docker"]["image"].endswith("-cpu")
    # The launcher starts containers with `bash`; our image's ENTRYPOINT (tessera) must be reset.
    assert '--entrypoint=""' in config["docker"]["run_options"]


# --- the image --------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (INFRA / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_has_cpu_and_cuda_variants_on_the_clients_ray():
    instructions = dockerfile_instructions()
    args = dict(value.split("=", 1) for kind, value in instructions if kind == "ARG" and "=" in value)
    assert args["VARIANT"] == "cpu"
    assert args["RAY_VERSION"] == ray.__version__, "the Job Submission API wants the same Ray on both sides"
    stages = {value.split(" AS ")[-1].strip() for kind, value in instructions if kind == "FROM" and " AS " in value}
    assert {"base-cpu", "base-cuda"} <= stages
    assert any(kind == "FROM" and value.startswith("base-${VARIANT}") for kind, value in instructions)
    copied = {value.split()[-1].strip("./") for kind, value in instructions if kind == "COPY"}
    assert set(PACKAGES) <= copied, "the image holds the same packages `tessera submit` ships"
    run = " ".join(value for kind, value in instructions if kind == "RUN")
    assert "-c constraints.txt" in run and "tessera --version" in run


def image_command() -> list[str]:
    instructions = dict(dockerfile_instructions())
    import json

    return json.loads(instructions["ENTRYPOINT"])


def documented_docker_runs() -> list[list[str]]:
    """The arguments after the image in every `docker run … tessera:…` line of the READMEs."""
    runs = []
    for readme in (REPO / "README.md", INFRA / "README.md"):
        for line in readme.read_text().splitlines():
            if line.strip().startswith("docker run"):
                words = shlex.split(line.split("#")[0])
                (image_at,) = [i for i, w in enumerate(words) if re.match(r"^tessera:(cpu|cuda)$", w)]
                runs.append(words[image_at + 1:])
    return runs


def test_the_images_command_is_the_documented_tessera():
    assert image_command() == ["tessera"]
    runs = documented_docker_runs()
    assert runs, "the READMEs show how to run the image"
    for args in runs:
        assert args[0] in main.commands, f"`docker run IMAGE {' '.join(args)}` is not a tessera command"
        assert (REPO / args[1]).exists(), f"{args[1]} (mounted at /work) does not exist"


def test_every_documented_tessera_command_exists():
    """Each `tessera <command>` in the READMEs' code blocks is a command of the CLI."""
    for readme in (REPO / "README.md", INFRA / "README.md"):
        blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme.read_text(), flags=re.S)
        for block in blocks:
            for line in block.splitlines():
                line = line.split("#")[0].strip()
                if line.startswith("tessera "):
                    command = line.split()[1]
                    assert command in main.commands, f"{readme.name}: `{line}` is not a tessera command"


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_build_commands_in_the_readme_name_the_variants(variant):
    text = (INFRA / "README.md").read_text()
    build = f"docker build -f infra/Dockerfile{' --build-arg VARIANT=cuda' if variant == 'cuda' else ''} -t tessera:{variant} ."
    assert build in text

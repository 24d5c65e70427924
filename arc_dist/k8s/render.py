"""Render the packaged manifests (``arc_dist/k8s/manifests/``) for one run.

The YAML files there are complete, commented manifests with example values (run name
``arc-train``, 2 nodes of 8 GPUs), readable and appliable as they are. :func:`render` parses one
flavour plus ``configmap.yaml`` with PyYAML and writes each setting at the paths that hold it
(object names, run labels, the launcher's flags, pod resources, each controller's node counts,
the rendezvous address the controller gives node 0), checks the settings together, and
:func:`to_yaml` prints one YAML stream::

    arc-dist k8s --kind job --name llm-7b --image ghcr.io/me/arc-dist:0.1.0 \\
        --nodes 4 --gpus-per-node 8 --checkpoint-url s3://my-bucket/llm-7b | kubectl apply -f -

Kinds: ``job`` (Indexed Job + headless Service, no operator), ``jobset`` (JobSet),
``trainjob`` (Kubeflow Trainer v2 TrainJob + its TrainingRuntime), ``pytorchjob`` (Kubeflow
Training Operator v1, legacy), ``rayjob`` (KubeRay). Needs PyYAML only. Why a renderer and
not Kustomize overlays: docs/kubernetes.md.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFESTS = Path(__file__).resolve().parent / "manifests"
KINDS = ("job", "jobset", "trainjob", "pytorchjob", "rayjob")

# The example values the manifests are written with (render() sets its own at every place).
TEMPLATE_NAME = "arc-train"
TEMPLATE_SECRET = "arc-dist-storage"
TEMPLATE_DOMAIN = "cluster.local"
RUN_LABEL = "arc-dist.io/run"
INSTANCE_LABEL = "app.kubernetes.io/instance"
CHECKPOINT_ANNOTATION = "arc-dist.io/checkpoint-url"
CHECKPOINT_KEY = "ARC_CHECKPOINT_URL"
GPU = "nvidia.com/gpu"
#: seconds between SIGTERM and SIGKILL left for the launcher itself, after the workers' share
SHUTDOWN_MARGIN_S = 30

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[mkMGTPE])?$")
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://\S+$")
_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
_UNITS.update({"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60})


def quantity(value: str) -> float:
    """A Kubernetes resource quantity (``"64Gi"``, ``"500m"``, ``"32"``) as a number."""
    m = _QUANTITY.match(value)
    if not m:
        raise ValueError(f"{value!r} is not a Kubernetes quantity such as 32, 500m or 64Gi")
    return float(m.group(1)) * _UNITS[m.group(3) or ""]


@dataclass(kw_only=True)
class RunSettings:
    """What differs between runs. Every field is checked in ``__post_init__``."""

    #: run name: object names, labels, hostnames and the rendezvous id derive from it
    name: str = TEMPLATE_NAME
    #: namespace to put every object in; None leaves it to ``kubectl -n``
    namespace: str | None = None
    #: training image (k8s/Dockerfile), e.g. ghcr.io/me/arc-dist:0.1.0
    image: str
    #: nodes (pods) to start; the group may shrink to ``min_nodes`` while a pod is replaced
    nodes: int = 2
    #: fewest nodes to keep training with (launcher --nnodes MIN:MAX); None means ``nodes``
    min_nodes: int | None = None
    gpus_per_node: int = 8
    #: fsspec URL of this run's checkpoints, e.g. s3://bucket/run-name
    checkpoint_url: str
    #: CPU and memory requests of each training pod; memory is also its limit and holds /dev/shm
    cpu: str = "32"
    memory: str = "256Gi"
    shm_size: str = "64Gi"
    #: SIGTERM-to-SIGKILL window; the final checkpoint must fit in it (minus 30 s)
    grace_period: int = 300
    #: in-pod restarts of the worker group before the launcher exits with a code
    max_restarts: int = 3
    #: Secret holding the storage credentials (AWS_ACCESS_KEY_ID, ...), passed with envFrom
    storage_secret: str = TEMPLATE_SECRET
    cluster_domain: str = TEMPLATE_DOMAIN

    def __post_init__(self) -> None:
        if self.min_nodes is None:
            self.min_nodes = self.nodes
        if not _DNS_LABEL.match(self.name) or len(self.name) > 40:
            raise ValueError(
                f"--name={self.name!r} is invalid: use at most 40 lowercase letters, digits and "
                "'-', starting with a letter (pod hostnames are built from it)"
            )
        for flag, value in (
            ("--namespace", self.namespace),
            ("--storage-secret", self.storage_secret),
        ):
            if value is not None and not re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", value):
                raise ValueError(f"{flag}={value!r} is not a valid Kubernetes name")
        if not self.image or any(c.isspace() for c in self.image):
            raise ValueError(f"--image={self.image!r} is invalid: give an image reference")
        if self.nodes < 1:
            raise ValueError(f"--nodes={self.nodes} is invalid: use 1 or more")
        if not 1 <= self.min_nodes <= self.nodes:
            raise ValueError(
                f"--min-nodes={self.min_nodes} is invalid: use 1 <= MIN <= --nodes ({self.nodes})"
            )
        if self.gpus_per_node < 1:
            raise ValueError(f"--gpus-per-node={self.gpus_per_node} is invalid: use 1 or more")
        if not _URL.match(self.checkpoint_url):
            raise ValueError(
                f"--checkpoint-url={self.checkpoint_url!r} is invalid: give an fsspec URL every "
                "pod can reach, e.g. s3://bucket/run-name"
            )
        for flag, value in (
            ("--cpu", self.cpu),
            ("--memory", self.memory),
            ("--shm-size", self.shm_size),
        ):
            try:
                quantity(value)
            except ValueError as e:
                raise ValueError(f"{flag}: {e}") from None
        if quantity(self.shm_size) >= quantity(self.memory):
            raise ValueError(
                f"--shm-size={self.shm_size} must be below --memory={self.memory}: /dev/shm is "
                "memory-backed and counts against the pod's memory limit"
            )
        if self.grace_period < 2 * SHUTDOWN_MARGIN_S:
            raise ValueError(
                f"--grace-period={self.grace_period} is too short: use at least "
                f"{2 * SHUTDOWN_MARGIN_S} s (the final checkpoint is written in it)"
            )
        if self.max_restarts < 0:
            raise ValueError(f"--max-restarts={self.max_restarts} is invalid: use 0 or more")
        if not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", self.cluster_domain):
            raise ValueError(f"--cluster-domain={self.cluster_domain!r} is not a DNS domain")

    @property
    def shutdown_timeout(self) -> int:
        """Launcher ``--shutdown-timeout``: how long it waits for torchrun after SIGTERM."""
        return self.grace_period - SHUTDOWN_MARGIN_S

    @property
    def worker_shutdown_timeout(self) -> int:
        """``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``: torchrun's wait for its workers, a bit less."""
        return self.shutdown_timeout - 10


def load(kind: str) -> list[dict[str, Any]]:
    """The example objects for ``kind``: the ConfigMap, then the flavour's objects."""
    import yaml

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
    docs: list[dict[str, Any]] = []
    for name in ("configmap.yaml", f"{kind}.yaml"):
        docs += [d for d in yaml.safe_load_all((MANIFESTS / name).read_text()) if d]
    return docs


# ------------------------------------------------------------------------------ known paths


def walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every dict in a parsed manifest, depth first."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def replicated_jobs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """A JobSet's replicated Jobs, or those of the JobSet a TrainingRuntime describes."""
    if doc["kind"] == "JobSet":
        return doc["spec"]["replicatedJobs"]
    if doc["kind"] in ("TrainingRuntime", "ClusterTrainingRuntime"):
        return doc["spec"]["template"]["spec"]["replicatedJobs"]
    return []


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(role, PodTemplateSpec) of every pod an object creates (none for ConfigMap, Service,
    TrainJob: a TrainJob's pods are its runtime's)."""
    spec = doc.get("spec", {})
    if doc["kind"] == "Job":
        yield "trainer", spec["template"]
    elif doc["kind"] == "PyTorchJob":
        for rtype, rspec in spec["pytorchReplicaSpecs"].items():
            yield rtype, rspec["template"]
    elif doc["kind"] == "RayJob":
        yield "ray-head", spec["rayClusterSpec"]["headGroupSpec"]["template"]
        for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
            yield group["groupName"], group["template"]
        if "submitterPodTemplate" in spec:
            yield "submitter", spec["submitterPodTemplate"]
    for rjob in replicated_jobs(doc):
        yield rjob["name"], rjob["template"]["spec"]["template"]


def launcher_argv(container: dict[str, Any]) -> list[str] | None:
    """The arguments after ``arc_dist.launch`` in a container's command + args, if any."""
    argv = [*container.get("command", []), *container.get("args", [])]
    if "arc_dist.launch" not in argv:
        return None
    return argv[argv.index("arc_dist.launch") + 1 :]


def launcher_flag(container: dict[str, Any], flag: str) -> str:
    """The value of the launcher's ``flag=VALUE`` in a container's args."""
    args = container["args"]
    (value,) = [a.split("=", 1)[1] for a in args[: args.index("--")] if a.startswith(flag + "=")]
    return value


def _set_flag(container: dict[str, Any], flag: str, value: object) -> None:
    args = container["args"]
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg.startswith(flag + "="):
            args[i] = f"{flag}={value}"
            return
    raise KeyError(f"container {container['name']!r} has no {flag}= flag before '--'")


def gpu_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in pod["containers"] if GPU in c.get("resources", {}).get("limits", {})]


def rendezvous_host(doc: dict[str, Any], name: str, domain: str) -> str:
    """Node 0's DNS name, which each controller derives from the run name (its full name where
    the pod finds it in its own /etc/hosts, see job.yaml)."""
    fqdn = f".{name}.$(POD_NAMESPACE).svc.{domain}"
    if doc["kind"] == "Job":
        return f"{name}-0{fqdn}"
    if doc["kind"] == "PyTorchJob":
        return f"{name}-worker-0"
    (rjob,) = replicated_jobs(doc)  # JobSet, TrainingRuntime (whose JobSet takes the run name)
    return f"{name}-{rjob['name']}-0-0{fqdn}"


# ------------------------------------------------------------------------------ rendering


def render(kind: str, s: RunSettings) -> list[dict[str, Any]]:
    """The objects of ``kind`` with the settings ``s`` applied."""
    docs = load(kind)
    if kind == "rayjob" and s.min_nodes != s.nodes:
        raise ValueError("--min-nodes: the RayJob flavour runs a fixed number of workers")
    for doc in docs:
        meta = doc["metadata"]
        name = f"{s.name}-config" if doc["kind"] == "ConfigMap" else s.name
        ns = {"namespace": s.namespace} if s.namespace else {}
        rest = {k: v for k, v in meta.items() if k not in ("name", "namespace")}
        doc["metadata"] = {"name": name, **ns, **rest}
        for d in walk(doc):  # metadata labels, selectors: wherever the run is named
            if RUN_LABEL in d:
                d[RUN_LABEL] = s.name
                if INSTANCE_LABEL in d:
                    d[INSTANCE_LABEL] = s.name
            if CHECKPOINT_ANNOTATION in d:
                d[CHECKPOINT_ANNOTATION] = s.checkpoint_url
        for _role, pod in pod_templates(doc):
            _render_pod(doc, pod["spec"], s)
        _SIZE[doc["kind"]](doc, s)
    return docs


def _render_pod(doc: dict[str, Any], pod: dict[str, Any], s: RunSettings) -> None:
    if "subdomain" in pod:
        pod["subdomain"] = s.name  # the Service of the Job flavour
    for c in pod["containers"]:
        c["image"] = s.image
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("configMapKeyRef")
            if ref is not None:
                ref["name"] = f"{s.name}-config"
        for e in c.get("envFrom", []):
            if "secretRef" in e:
                e["secretRef"]["name"] = s.storage_secret
    if not gpu_containers(pod):
        return  # Ray head, submitter: sized in the template
    pod["terminationGracePeriodSeconds"] = s.grace_period
    for c in gpu_containers(pod):
        c["resources"] = {
            "requests": {"cpu": s.cpu, "memory": s.memory, GPU: s.gpus_per_node},
            "limits": {"memory": s.memory, GPU: s.gpus_per_node},
        }
    for v in pod.get("volumes", []):
        if v.get("emptyDir", {}).get("medium") == "Memory":
            v["emptyDir"]["sizeLimit"] = s.shm_size
    for c in pod["containers"]:
        if launcher_argv(c) is None:
            continue
        port = launcher_flag(c, "--rdzv-endpoint").rsplit(":", 1)[1]
        host = rendezvous_host(doc, s.name, s.cluster_domain)
        _set_flag(c, "--rdzv-endpoint", f"{host}:{port}")
        _set_flag(c, "--rdzv-id", s.name)
        _set_flag(c, "--nnodes", f"{s.min_nodes}:{s.nodes}")
        _set_flag(c, "--nproc-per-node", s.gpus_per_node)
        _set_flag(c, "--max-restarts", s.max_restarts)
        _set_flag(c, "--shutdown-timeout", s.shutdown_timeout)
        for e in c["env"]:
            if e["name"] == "TORCH_ELASTIC_SHUTDOWN_TIMEOUT":
                e["value"] = str(s.worker_shutdown_timeout)


def _size_configmap(doc: dict[str, Any], s: RunSettings) -> None:
    doc["data"][CHECKPOINT_KEY] = s.checkpoint_url


def _size_jobs(doc: dict[str, Any], s: RunSettings) -> None:
    jobs = (
        [doc["spec"]]
        if doc["kind"] == "Job"
        else [r["template"]["spec"] for r in replicated_jobs(doc)]
    )
    for job_spec in jobs:
        job_spec["completions"] = job_spec["parallelism"] = s.nodes


def _size_runtime(doc: dict[str, Any], s: RunSettings) -> None:
    _size_jobs(doc, s)
    torch = doc["spec"]["mlPolicy"]["torch"]
    torch["numProcPerNode"] = s.gpus_per_node
    torch["elasticPolicy"].update(
        minNodes=s.min_nodes, maxNodes=s.nodes, maxRestarts=s.max_restarts
    )


def _size_trainjob(doc: dict[str, Any], s: RunSettings) -> None:
    doc["spec"]["runtimeRef"]["name"] = s.name
    doc["spec"]["trainer"].update(numNodes=s.nodes, numProcPerNode=s.gpus_per_node)


def _size_pytorchjob(doc: dict[str, Any], s: RunSettings) -> None:
    spec = doc["spec"]
    spec["pytorchReplicaSpecs"]["Worker"]["replicas"] = s.nodes
    spec["nprocPerNode"] = str(s.gpus_per_node)
    spec["elasticPolicy"].update(
        minReplicas=s.min_nodes, maxReplicas=s.nodes, maxRestarts=s.max_restarts, rdzvId=s.name
    )


def _size_rayjob(doc: dict[str, Any], s: RunSettings) -> None:
    spec = doc["spec"]
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        group.update(replicas=s.nodes, minReplicas=s.nodes, maxReplicas=s.nodes)
    words = spec["entrypoint"].split(" ")
    for flag, value in (("--workers", s.nodes * s.gpus_per_node), ("--name", s.name)):
        words[words.index(flag) + 1] = str(value)  # a retry resumes the run by its name
    spec["entrypoint"] = " ".join(words)


_SIZE: dict[str, Callable[[dict[str, Any], RunSettings], None]] = {
    "ConfigMap": _size_configmap,
    "Service": lambda doc, s: None,
    "Job": _size_jobs,
    "JobSet": _size_jobs,
    "TrainingRuntime": _size_runtime,
    "TrainJob": _size_trainjob,
    "PyTorchJob": _size_pytorchjob,
    "RayJob": _size_rayjob,
}


def to_yaml(docs: list[dict[str, Any]], command: str) -> str:
    import yaml

    class NoAliasDumper(yaml.SafeDumper):
        """Write repeated subtrees out in full: no &anchors/*aliases in what kubectl reads."""

        def ignore_aliases(self, data: Any) -> bool:
            return True

    header = (
        f"# Rendered by arc-dist; arc_dist/k8s/manifests/ explains every setting.\n#   {command}\n"
    )
    body = yaml.dump_all(
        docs, Dumper=NoAliasDumper, sort_keys=False, default_flow_style=False, width=100
    )
    return header + "---\n" + body


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``arc-dist k8s`` flags."""
    d = RunSettings.__dataclass_fields__
    a = p.add_argument
    a(
        "--kind",
        required=True,
        choices=KINDS,
        help="job: Indexed Job + Service, no operator; jobset: JobSet; trainjob: Kubeflow Trainer "
        "v2; pytorchjob: Kubeflow Training Operator v1 (legacy); rayjob: KubeRay",
    )
    a("--image", required=True, help="training image built from k8s/Dockerfile")
    a("--checkpoint-url", required=True, help="fsspec URL for this run's checkpoints")
    a("--name", default=d["name"].default, help="run name (default %(default)s)")
    a("--namespace", help="namespace for every object (default: kubectl's)")
    a("--nodes", type=int, default=d["nodes"].default, help="nodes (default %(default)s)")
    a(
        "--min-nodes",
        type=int,
        help="keep training with this many while pods are replaced (default: --nodes)",
    )
    a(
        "--gpus-per-node",
        type=int,
        default=d["gpus_per_node"].default,
        help="GPUs per node = processes per node (default %(default)s)",
    )
    a("--cpu", default=d["cpu"].default, help="CPU request per pod (default %(default)s)")
    a(
        "--memory",
        default=d["memory"].default,
        help="memory request and limit per pod, /dev/shm included (default %(default)s)",
    )
    a("--shm-size", default=d["shm_size"].default, help="/dev/shm size (default %(default)s)")
    a(
        "--grace-period",
        type=int,
        default=d["grace_period"].default,
        help="terminationGracePeriodSeconds: room for the final checkpoint (default %(default)s)",
    )
    a(
        "--max-restarts",
        type=int,
        default=d["max_restarts"].default,
        help="launcher's in-pod group restarts (default %(default)s)",
    )
    a(
        "--storage-secret",
        default=d["storage_secret"].default,
        help="Secret with the storage credentials (default %(default)s)",
    )
    a(
        "--cluster-domain",
        default=d["cluster_domain"].default,
        help="cluster DNS domain (default %(default)s)",
    )
    a("-o", "--output", help="write here instead of stdout")


def run(args: argparse.Namespace) -> str:
    """Render what the parsed ``arc-dist k8s`` flags ask for and write it (stdout or
    ``--output``); returns the text. Raises ValueError naming the flag and the fix for a bad
    value."""
    fields = RunSettings.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in fields}
    settings = RunSettings(**values)
    flags = [f"--kind={args.kind}"] + [
        f"--{k.replace('_', '-')}={v}" for k, v in values.items() if v != fields[k].default
    ]
    text = to_yaml(render(args.kind, settings), shlex.join(["arc-dist", "k8s", *flags]))
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return text

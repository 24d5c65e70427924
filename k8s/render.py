"""Render the manifests in ``k8s/`` for one run: the one place to set image, size and checkpoint URL.

The YAML files next to this script are complete, commented manifests with example values (run
name ``arc-train``, 2 nodes of 8 GPUs); you can edit and apply them directly. This script loads
one flavour plus ``configmap.yaml``, sets the values below everywhere they occur (the launcher
flags, the GPU requests, the node counts of each controller, the ConfigMap, the labels, the
rendezvous address), checks that they make sense together, and prints one YAML stream::

    python k8s/render.py job --name llm-7b --image ghcr.io/me/arc-dist:0.1.0 \\
        --nodes 4 --gpus-per-node 8 --checkpoint-url s3://my-bucket/llm-7b | kubectl apply -f -

Flavours: ``job`` (Indexed Job + headless Service, no operator), ``pytorchjob`` (Kubeflow),
``jobset`` (JobSet), ``rayjob`` (KubeRay). Needs PyYAML only. See docs/kubernetes.md.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
KINDS = ("job", "pytorchjob", "jobset", "rayjob")

# The example values the templates are written with; render() replaces them.
TEMPLATE_NAME = "arc-train"
TEMPLATE_SECRET = "arc-dist-storage"
TEMPLATE_DOMAIN = "cluster.local"
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
    """The template objects for ``kind``: the ConfigMap, then the flavour's objects."""
    if kind not in KINDS:
        raise ValueError(f"unknown flavour {kind!r}: use one of {', '.join(KINDS)}")
    docs: list[dict[str, Any]] = []
    for name in ("configmap.yaml", f"{kind}.yaml"):
        docs += [d for d in yaml.safe_load_all((HERE / name).read_text()) if d]
    return docs


# ------------------------------------------------------------------------------ tree helpers


def walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every dict in a parsed manifest, depth first."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def pod_specs(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every pod spec (a dict with ``containers``) in a manifest."""
    return (d for d in walk(doc) if isinstance(d.get("containers"), list))


def map_strings(node: Any, fn: Callable[[str], str]) -> Any:
    """Apply ``fn`` to every string value (not key) in a tree; returns the new tree."""
    if isinstance(node, dict):
        return {k: map_strings(v, fn) for k, v in node.items()}
    if isinstance(node, list):
        return [map_strings(v, fn) for v in node]
    return fn(node) if isinstance(node, str) else node


def launcher_argv(container: dict[str, Any]) -> list[str] | None:
    """The arguments after ``arc_dist.launch`` in a container's command + args, if any."""
    argv = [*container.get("command", []), *container.get("args", [])]
    if "arc_dist.launch" not in argv:
        return None
    return argv[argv.index("arc_dist.launch") + 1 :]


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


# ------------------------------------------------------------------------------ rendering


def render(kind: str, s: RunSettings) -> list[dict[str, Any]]:
    """The objects of flavour ``kind`` with the settings ``s`` applied."""
    docs = load(kind)
    if kind == "rayjob" and s.min_nodes != s.nodes:
        raise ValueError("--min-nodes: the RayJob flavour runs a fixed number of workers")
    domain = f".svc.{s.cluster_domain}"
    docs = map_strings(
        docs,
        lambda v: v.replace(TEMPLATE_NAME, s.name).replace(f".svc.{TEMPLATE_DOMAIN}", domain),
    )
    for doc in docs:
        if s.namespace:
            doc["metadata"] = {
                "name": doc["metadata"]["name"],
                "namespace": s.namespace,
                **doc["metadata"],
            }
        for d in walk(doc):
            if CHECKPOINT_ANNOTATION in d:
                d[CHECKPOINT_ANNOTATION] = s.checkpoint_url
            if isinstance(d.get("secretRef"), dict):
                d["secretRef"]["name"] = s.storage_secret
        for pod in pod_specs(doc):
            for c in pod["containers"]:
                c["image"] = s.image
            if not gpu_containers(pod):
                continue  # Ray head, submitter: sized in the template
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
                if launcher_argv(c) is not None:
                    _set_flag(c, "--nnodes", f"{s.min_nodes}:{s.nodes}")
                    _set_flag(c, "--nproc-per-node", s.gpus_per_node)
                    _set_flag(c, "--max-restarts", s.max_restarts)
                    _set_flag(c, "--shutdown-timeout", s.shutdown_timeout)
                    for e in c["env"]:
                        if e["name"] == "TORCH_ELASTIC_SHUTDOWN_TIMEOUT":
                            e["value"] = str(s.worker_shutdown_timeout)
        _SIZE[doc["kind"]](doc, s)
    return docs


def _size_configmap(doc: dict[str, Any], s: RunSettings) -> None:
    doc["data"][CHECKPOINT_KEY] = s.checkpoint_url


def _size_indexed_job(job_spec: dict[str, Any], s: RunSettings) -> None:
    job_spec["completions"] = job_spec["parallelism"] = s.nodes


def _size_job(doc: dict[str, Any], s: RunSettings) -> None:
    _size_indexed_job(doc["spec"], s)


def _size_pytorchjob(doc: dict[str, Any], s: RunSettings) -> None:
    spec = doc["spec"]
    spec["pytorchReplicaSpecs"]["Worker"]["replicas"] = s.nodes
    spec["nprocPerNode"] = str(s.gpus_per_node)
    spec["elasticPolicy"].update(
        minReplicas=s.min_nodes, maxReplicas=s.nodes, maxRestarts=s.max_restarts
    )


def _size_jobset(doc: dict[str, Any], s: RunSettings) -> None:
    for rjob in doc["spec"]["replicatedJobs"]:
        _size_indexed_job(rjob["template"]["spec"], s)


def _size_rayjob(doc: dict[str, Any], s: RunSettings) -> None:
    spec = doc["spec"]
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        group.update(replicas=s.nodes, minReplicas=s.nodes, maxReplicas=s.nodes)
    workers = s.nodes * s.gpus_per_node
    spec["entrypoint"], n = re.subn(r"--workers[= ]\d+", f"--workers {workers}", spec["entrypoint"])
    assert n == 1, "rayjob.yaml's entrypoint must pass --workers once"


_SIZE: dict[str, Callable[[dict[str, Any], RunSettings], None]] = {
    "ConfigMap": _size_configmap,
    "Service": lambda doc, s: None,
    "Job": _size_job,
    "PyTorchJob": _size_pytorchjob,
    "JobSet": _size_jobset,
    "RayJob": _size_rayjob,
}


class _NoAliasDumper(yaml.SafeDumper):
    """Write repeated subtrees out in full: no &anchors/*aliases in what kubectl reads."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_yaml(docs: list[dict[str, Any]], command: str) -> str:
    header = (
        f"# Rendered by k8s/render.py; the templates in k8s/ explain every setting.\n"
        f"#   {command}\n"
    )
    body = yaml.dump_all(
        docs, Dumper=_NoAliasDumper, sort_keys=False, default_flow_style=False, width=100
    )
    return header + "---\n" + body


def build_parser() -> argparse.ArgumentParser:
    d = RunSettings.__dataclass_fields__
    p = argparse.ArgumentParser(
        prog="python k8s/render.py",
        description="Render arc-dist's Kubernetes manifests for one run (see docs/kubernetes.md).",
    )
    a = p.add_argument
    a(
        "kind",
        choices=KINDS,
        help="job: Indexed Job, no operator; pytorchjob: Kubeflow; jobset: JobSet; rayjob: KubeRay",
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
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        settings = RunSettings(
            name=ns.name,
            namespace=ns.namespace,
            image=ns.image,
            nodes=ns.nodes,
            min_nodes=ns.min_nodes,
            gpus_per_node=ns.gpus_per_node,
            checkpoint_url=ns.checkpoint_url,
            cpu=ns.cpu,
            memory=ns.memory,
            shm_size=ns.shm_size,
            grace_period=ns.grace_period,
            max_restarts=ns.max_restarts,
            storage_secret=ns.storage_secret,
            cluster_domain=ns.cluster_domain,
        )
        docs = render(ns.kind, settings)
    except ValueError as e:
        parser.error(str(e))
    text = to_yaml(copy.deepcopy(docs), "python k8s/render.py " + " ".join(argv))
    if ns.output:
        Path(ns.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Offline checks of the Kubernetes manifests shipped in arc_dist/k8s/ (no cluster in CI).

* Built-in kinds (ConfigMap, Service, Job) and every pod/Job template embedded in a custom
  resource are validated against Kubernetes' own schemas with kubernetes-validate in strict
  mode (an unknown field fails), for the oldest supported and the newest Kubernetes.
* Custom resources (JobSet, TrainJob, TrainingRuntime and the JobSet inside it, PyTorchJob,
  RayJob) are validated against the JSON Schemas in arc_dist/k8s/schemas/, and deliberately
  broken copies must fail, which proves the schemas bite.
* Cross-checks tie the manifests to the code: the failure policies use arc_dist's ExitCode
  values, the container command parses with the launcher's own argument parser and agrees
  with the controller's sizes and the rendezvous Service, every training pod carries the
  settings docs/kubernetes.md promises, and no secret value is written inline.
* The same checks run on manifests rendered by ``arc-dist k8s`` with other sizes, image and URL,
  and the wheel must carry the manifests.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from arc_dist.cli import main as cli_main  # noqa: E402
from arc_dist.errors import ExitCode  # noqa: E402
from arc_dist.k8s import render  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"  # the user-facing folder: Dockerfile, the Kubeflow exit-code shim
MANIFESTS = ROOT / "arc_dist" / "k8s" / "manifests"
SCHEMA_DIR = ROOT / "arc_dist" / "k8s" / "schemas"
KINDS = render.KINDS
#: oldest Kubernetes the manifests claim to support (docs/kubernetes.md), and the newest known
K8S_VERSIONS = ("1.31", "1.37")
BUILTIN_API_VERSIONS = {"v1", "batch/v1"}
SCHEMAS = {
    ("kubeflow.org/v1", "PyTorchJob"): "pytorchjob.kubeflow.org-v1.json",
    ("jobset.x-k8s.io/v1alpha2", "JobSet"): "jobset.jobset.x-k8s.io-v1alpha2.json",
    ("ray.io/v1", "RayJob"): "rayjob.ray.io-v1.json",
    ("trainer.kubeflow.org/v1alpha1", "TrainingRuntime"): (
        "trainingruntime.trainer.kubeflow.org-v1alpha1.json"
    ),
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainjob.trainer.kubeflow.org-v1alpha1.json",
}
IMAGE_ROOT = "/opt/arc-dist"  # WORKDIR and COPY target in k8s/Dockerfile
REQUIRED_ENV = {
    "PYTHONUNBUFFERED": "1",
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
}
QUANTITY = re.compile(r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[mkMGTPE])?$")
SECRETISH = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)


def _load_shim() -> Any:
    spec = importlib.util.spec_from_file_location("arc_k8s_shim", K8S / "kubeflow_exit_codes.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


shim = _load_shim()

#: settings that differ from every template value, to prove render() reaches every place
OTHER = dict(
    name="llm-7b-run3",
    namespace="ml-team",
    image="registry.example.com/team/arc-dist:1.2.3",
    nodes=5,
    min_nodes=4,
    gpus_per_node=4,
    checkpoint_url="gs://ckpt-bucket/llm-7b/run3",
    cpu="48",
    memory="400Gi",
    shm_size="96Gi",
    grace_period=600,
    max_restarts=5,
    storage_secret="team-gcs-creds",
    cluster_domain="k8s.internal",
)


def template_bundle(kind: str) -> list[dict[str, Any]]:
    return [d for f in ("configmap.yaml", f"{kind}.yaml") for d in _yaml_docs(MANIFESTS / f)]


def rendered_bundle(kind: str) -> list[dict[str, Any]]:
    settings = dict(OTHER)
    if kind == "rayjob":
        settings["min_nodes"] = settings["nodes"]
    text = render.to_yaml(render.render(kind, render.RunSettings(**settings)), "test")
    assert "&id" not in text and "*id" not in text, "rendered YAML must not use aliases"
    return [d for d in yaml.safe_load_all(text) if d]


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


BUNDLES: dict[str, Callable[[], list[dict[str, Any]]]] = {}
for _kind in KINDS:
    BUNDLES[f"{_kind}-template"] = lambda k=_kind: template_bundle(k)
    BUNDLES[f"{_kind}-rendered"] = lambda k=_kind: rendered_bundle(k)


@pytest.fixture(params=sorted(BUNDLES), ids=sorted(BUNDLES))
def bundle(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return BUNDLES[request.param]()


# --------------------------------------------------------------------------- helpers


def find(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def main_doc(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The object that defines the training pods (a TrainJob's are its TrainingRuntime's)."""
    (doc,) = [d for d in docs if d["kind"] not in ("ConfigMap", "Service", "TrainJob")]
    return doc


pod_templates = render.pod_templates


def training_pods(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Pods that run training code (everything but the RayJob's submitter)."""
    return [(role, t) for role, t in pod_templates(doc) if role != "submitter"]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def launcher_args(container: dict[str, Any]) -> list[str] | None:
    return render.launcher_argv(container)


def parse_launcher(argv: list[str]) -> Any:
    """Parse with the launcher's own parser (its validate() needs the script on disk: skipped)."""
    from arc_dist.elastic.launcher import build_parser

    return build_parser().parse_args(argv)


def _script_parser(image_path: str) -> Any:
    """``build_parser()`` of a training script shipped in the image, if it defines one."""
    path = ROOT / image_path.removeprefix(IMAGE_ROOT + "/")
    spec = importlib.util.spec_from_file_location(f"arc_k8s_{path.stem}", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # as when the script runs: its folder is importable
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(path.parent))
    build = getattr(mod, "build_parser", None)
    return build() if callable(build) else None


def flag(argv: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in argv[: argv.index("--")] if a.startswith(name + "=")]
    return value


def run_name(docs: list[dict[str, Any]]) -> str:
    return main_doc(docs)["metadata"]["labels"]["arc-dist.io/run"]


def checkpoint_url(docs: list[dict[str, Any]]) -> str:
    return find(docs, "ConfigMap")["data"]["ARC_CHECKPOINT_URL"]


def builtin_objects(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Objects kubernetes-validate can check: built-in docs, and the templates inside CRDs."""
    if doc["apiVersion"] in BUILTIN_API_VERSIONS:
        yield doc["kind"], doc
        return
    name = doc["metadata"]["name"]
    if render.replicated_jobs(doc):
        for rjob in render.replicated_jobs(doc):
            job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}}
            job["spec"] = rjob["template"]["spec"]
            yield f"{doc['kind']}/{rjob['name']} Job", job
        return
    for role, template in pod_templates(doc):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}}
        wrapped["template"] = template
        yield f"{doc['kind']}/{role} PodTemplate", wrapped


def schema_for(doc: dict[str, Any]) -> dict[str, Any]:
    return json.loads((SCHEMA_DIR / SCHEMAS[doc["apiVersion"], doc["kind"]]).read_text())


def schema_errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema_for(doc))
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


# --------------------------------------------------------------------------- validity


def test_every_manifest_parses() -> None:
    files = sorted(MANIFESTS.glob("*.yaml"))
    assert {f.stem for f in files} == {"configmap", *KINDS}
    for f in files:
        docs = _yaml_docs(f)
        assert docs, f
        for d in docs:
            assert {"apiVersion", "kind", "metadata"} <= d.keys(), f
            assert d["metadata"]["name"], f


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_kinds_and_embedded_templates_validate_strictly(
    bundle: list[dict[str, Any]], version: str
) -> None:
    checked = 0
    for doc in bundle:
        for what, obj in builtin_objects(doc):
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{what} invalid for Kubernetes {version}: {list(e.path)}: {e.message}")
            checked += 1
    assert checked >= 2


def test_crd_schemas_are_valid_and_name_their_source() -> None:
    for fname in SCHEMAS.values():
        schema = json.loads((SCHEMA_DIR / fname).read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["x-source"]["project"] and schema["x-source"]["version"]
        assert fname in (SCHEMA_DIR / "README.md").read_text()


def test_custom_resources_validate_against_schemas(bundle: list[dict[str, Any]]) -> None:
    crds = [d for d in bundle if d["apiVersion"] not in BUILTIN_API_VERSIONS]
    for doc in crds:
        assert schema_errors(doc) == [], doc["kind"]
        if doc["kind"] == "TrainingRuntime":  # the JobSet the Trainer creates from it
            assert schema_errors(runtime_jobset(doc)) == [], "TrainingRuntime's JobSet"


def runtime_jobset(runtime: dict[str, Any]) -> dict[str, Any]:
    """The JobSet a TrainingRuntime describes, as a JobSet object (named like the TrainJob)."""
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": runtime["metadata"]["name"]},
        "spec": runtime["spec"]["template"]["spec"],
    }


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node: Any = doc
        for p in parents:
            node = node[p]
        node[last] = value

    return mutate


def _rename(path: str, new_key: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for p in parents:
            node = node[int(p) if p.isdigit() else p]
        node[new_key] = node.pop(last)

    return mutate


BROKEN = {
    "pytorchjob-restartPolicy-enum": ("pytorchjob", _set("spec.pytorchReplicaSpecs.Worker.restartPolicy", "Sometimes")),
    "pytorchjob-unknown-field": ("pytorchjob", _rename("spec.elasticPolicy.maxRestarts", "maxRestart")),
    "pytorchjob-replica-type": ("pytorchjob", _rename("spec.pytorchReplicaSpecs.Worker", "Workers")),
    "pytorchjob-no-pytorch-container": ("pytorchjob", _set("spec.pytorchReplicaSpecs.Worker.template.spec.containers.0.name", "trainer")),
    "pytorchjob-rdzv-backend": ("pytorchjob", _set("spec.elasticPolicy.rdzvBackend", "c10")),
    "pytorchjob-replicas-type": ("pytorchjob", _set("spec.pytorchReplicaSpecs.Worker.replicas", "2")),
    "jobset-action-enum": ("jobset", _set("spec.failurePolicy.rules.0.action", "FailJobset")),
    "jobset-reason-enum": ("jobset", _set("spec.failurePolicy.rules.0.onJobFailureReasons", ["PodFailurePolicies"])),
    "jobset-rule-name": ("jobset", _set("spec.failurePolicy.rules.0.name", "fail-on-code")),
    "jobset-restart-strategy": ("jobset", _set("spec.failurePolicy.restartStrategy", "Blocking")),
    "jobset-unknown-field": ("jobset", _rename("spec.network.enableDNSHostnames", "enableDnsHostnames")),
    "rayjob-unknown-field": ("rayjob", _rename("spec.rayClusterSpec.workerGroupSpecs.0.replicas", "replica")),
    "rayjob-start-param-int": ("rayjob", _set("spec.rayClusterSpec.headGroupSpec.rayStartParams.num-gpus", 0)),
    "rayjob-submission-mode": ("rayjob", _set("spec.submissionMode", "K8sJob")),
    "rayjob-no-entrypoint": ("rayjob", lambda d: d["spec"].pop("entrypoint")),
    "rayjob-no-head": ("rayjob", lambda d: d["spec"]["rayClusterSpec"].pop("headGroupSpec")),
    "runtime-nproc-enum": ("trainjob", _set("spec.mlPolicy.torch.numProcPerNode", "all")),
    "runtime-elastic-and-numnodes": ("trainjob", _set("spec.mlPolicy.numNodes", 2)),
    "runtime-unknown-field": ("trainjob", _rename("spec.mlPolicy.torch.elasticPolicy.maxNodes", "maxReplicas")),
    "runtime-two-policies": ("trainjob", _set("spec.mlPolicy.mpi", {"numProcPerNode": 1})),
    "trainjob-unknown-field": ("trainjob:TrainJob", _rename("spec.trainer.numNodes", "replicas")),
    "trainjob-runtime-kind": ("trainjob:TrainJob", _set("spec.runtimeRef.kind", "Runtime")),
    "trainjob-no-runtime": ("trainjob:TrainJob", lambda d: d["spec"].pop("runtimeRef")),
    "trainjob-managed-by": ("trainjob:TrainJob", _set("spec.managedBy", "me")),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_schemas_reject_broken_copies(case: str) -> None:
    kind, mutate = BROKEN[case]
    kind, _, obj = kind.partition(":")
    bundle = template_bundle(kind)
    doc = copy.deepcopy(find(bundle, obj) if obj else main_doc(bundle))
    assert schema_errors(doc) == []
    mutate(doc)
    assert schema_errors(doc), f"schema accepted a broken {kind} ({case})"


def test_strict_validation_rejects_unknown_and_mistyped_builtin_fields() -> None:
    job = find(template_bundle("job"), "Job")
    broken = copy.deepcopy(job)
    rule = broken["spec"]["podFailurePolicy"]["rules"][1]
    rule["onExitCode"] = rule.pop("onExitCodes")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)
    broken = copy.deepcopy(job)
    broken["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"]["fieldref"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_resource_quantities_and_enums_are_well_formed(bundle: list[dict[str, Any]]) -> None:
    """What kubernetes-validate does not check: quantity syntax and enum spelling."""
    for doc in bundle:
        for _role, template in pod_templates(doc):
            spec = template["spec"]
            assert spec.get("restartPolicy", "Never") in ("Always", "OnFailure", "Never")
            for c in spec["containers"]:
                for section in ("requests", "limits"):
                    for res, q in c.get("resources", {}).get(section, {}).items():
                        assert QUANTITY.match(str(q)), f"{c['name']} {section}.{res}={q!r}"
                assert c.get("imagePullPolicy", "IfNotPresent") in (
                    "Always",
                    "IfNotPresent",
                    "Never",
                )
            for v in spec.get("volumes", []):
                if "emptyDir" in v:
                    assert v["emptyDir"].get("medium", "") in ("", "Memory")
                    assert QUANTITY.match(str(v["emptyDir"]["sizeLimit"]))


# --------------------------------------------------------------------------- exit codes


def _job_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "Job":
        return [doc["spec"]]
    return [r["template"]["spec"] for r in render.replicated_jobs(doc)]


@pytest.mark.parametrize("kind", ["job", "jobset", "trainjob"])
def test_pod_failure_policy_follows_the_exit_code_contract(kind: str) -> None:
    for job_spec in _job_specs(main_doc(template_bundle(kind))):
        container = job_spec["template"]["spec"]["containers"][0]
        assert job_spec["template"]["spec"]["restartPolicy"] == "Never"
        assert job_spec["completionMode"] == "Indexed"
        assert job_spec["podReplacementPolicy"] == "Failed"
        rules = job_spec["podFailurePolicy"]["rules"]
        # disruptions first, so a preempted pod is never counted whatever it exited with
        assert rules[0] == {
            "action": "Ignore",
            "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
        }
        by_action: dict[str, set[int]] = {}
        for rule in rules[1:]:
            codes = rule["onExitCodes"]
            assert codes["operator"] == "In"
            assert codes["containerName"] == container["name"]
            assert codes["values"] == sorted(codes["values"]), "the API requires sorted values"
            assert rule["action"] in ("FailJob", "FailIndex", "Count")
            by_action.setdefault(rule["action"], set()).update(codes["values"])
        assert by_action == {
            "FailJob": {ExitCode.UNRECOVERABLE, ExitCode.BAD_NODE},
            "Count": {ExitCode.RETRY, ExitCode.HARDWARE},
        }
        assert job_spec["backoffLimitPerIndex"] >= 1 and job_spec["maxFailedIndexes"] == 0


@pytest.mark.parametrize("kind", ["jobset", "trainjob"])
def test_jobset_fails_on_pod_failure_policy_and_restarts_otherwise(kind: str) -> None:
    doc = main_doc(template_bundle(kind))
    spec = doc["spec"] if kind == "jobset" else runtime_jobset(doc)["spec"]
    rules = spec["failurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJobSet"
    assert rules[0]["onJobFailureReasons"] == ["PodFailurePolicy"]
    assert {r["action"] for r in rules[1:]} == {"RestartJobSet"}
    assert "MaxFailedIndexesExceeded" in rules[1]["onJobFailureReasons"]
    assert spec["failurePolicy"]["maxRestarts"] >= 1
    assert spec["failurePolicy"]["restartStrategy"] == "BlockingRecreate"


def test_exit_code_annotations_match_exitcode(bundle: list[dict[str, Any]]) -> None:
    doc = main_doc(bundle)
    note = doc["metadata"]["annotations"].get("arc-dist.io/exit-codes")
    if doc["kind"] == "RayJob":
        assert note is None  # KubeRay does not act on exit codes; do not pretend it does
        return
    want = {
        int(ExitCode[n.upper().replace("-", "_")])
        for n in ("retry", "unrecoverable", "hardware", "bad-node")
    }
    got = {}
    for part in note.split():
        code, name = part.split("=")
        got[int(code)] = name
        assert int(ExitCode[name.upper().replace("-", "_")]) == int(code)
    assert set(got) == want


def test_kubeflow_shim_codes_match_exitcode() -> None:
    assert shim.RETRYABLE_CODES == {ExitCode.RETRY, ExitCode.HARDWARE}
    assert max(ExitCode) < shim.RETRYABLE_BASE <= 128
    for code in ExitCode:
        out = shim.translate(int(code))
        if code in (ExitCode.RETRY, ExitCode.HARDWARE):
            assert 128 <= out <= 255  # Kubeflow ExitCode policy: retryable
        else:
            assert out == code  # 0 is success; 11, 13 stay in 1-127: permanent
    assert shim.translate(-signal.SIGKILL) == 137  # OOM kill: retryable
    assert shim.translate(1) == 1


def test_pytorchjob_uses_exit_code_policy_through_the_shim() -> None:
    doc = main_doc(template_bundle("pytorchjob"))
    worker = doc["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert worker["restartPolicy"] == "ExitCode"
    (c,) = [c for c in worker["template"]["spec"]["containers"] if c["name"] == "pytorch"]
    argv = [*c["command"], *c.get("args", [])]
    shim_path = f"{IMAGE_ROOT}/k8s/kubeflow_exit_codes.py"
    assert argv.index(shim_path) < argv.index("arc_dist.launch")


def _run_shim(child_code: str, *, sigterm_when_ready: bool = False) -> int:
    proc = subprocess.Popen(
        [sys.executable, str(K8S / "kubeflow_exit_codes.py"), sys.executable, "-c", child_code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if sigterm_when_ready:  # the child inherits the shim's stdout: wait for its handler
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    return proc.returncode


@pytest.mark.timeout(60)
def test_kubeflow_shim_translates_real_exit_codes_and_forwards_sigterm() -> None:
    assert _run_shim(f"import sys; sys.exit({int(ExitCode.RETRY)})") == 128 + ExitCode.RETRY
    assert (
        _run_shim(f"import sys; sys.exit({int(ExitCode.UNRECOVERABLE)})") == ExitCode.UNRECOVERABLE
    )
    assert _run_shim("pass") == 0
    # the child (standing in for the launcher) gets SIGTERM, finishes its "checkpoint", exits 10
    child = textwrap.dedent(
        f"""
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: (time.sleep(0.2), sys.exit({int(ExitCode.RETRY)})))
        print("ready", flush=True)
        time.sleep(30)
        sys.exit(0)
        """
    )
    assert _run_shim(child, sigterm_when_ready=True) == 128 + ExitCode.RETRY


# --------------------------------------------------------------------------- launcher command


def test_launcher_command_agrees_with_the_controller(bundle: list[dict[str, Any]]) -> None:
    doc = main_doc(bundle)
    if doc["kind"] == "RayJob":
        pytest.skip("Ray Train starts the workers; no launcher")
    name = run_name(bundle)
    for _role, template in training_pods(doc):
        spec = template["spec"]
        gpu_containers = render.gpu_containers(spec)
        assert len(gpu_containers) == 1
        c = gpu_containers[0]
        argv = launcher_args(c)
        assert argv is not None, "the training container must run python -m arc_dist.launch"
        assert c["command"][0] == "/usr/bin/tini"
        ns = parse_launcher(argv)
        assert "--" in argv and ns.script == argv[argv.index("--") + 1]
        gpus = c["resources"]["limits"]["nvidia.com/gpu"]
        assert c["resources"]["requests"]["nvidia.com/gpu"] == gpus
        assert ns.nproc_per_node == str(gpus)
        lo, hi = (int(x) for x in ns.nnodes.split(":"))
        assert ns.rdzv_backend == "c10d" and ns.rdzv_id == name
        host, port = ns.rdzv_endpoint.rsplit(":", 1)
        # SIGTERM: torchrun waits for its workers < the launcher waits for torchrun < SIGKILL
        worker_wait = int(env_of(c)["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]["value"])
        assert 0 < worker_wait < ns.shutdown_timeout < spec["terminationGracePeriodSeconds"]
        assert ns.log_dir.startswith("/tmp/")  # the scratch emptyDir
        # every $(VAR) in command/args is defined in env, or Kubernetes passes it literally
        defined = set(env_of(c))
        for arg in [*c["command"], *c["args"]]:
            for var in re.findall(r"\$\((\w+)\)", arg):
                assert var in defined, f"{arg} uses $({var}), which the container does not define"
        # the training script is shipped in the image and gets this run's checkpoint URL
        assert ns.script.startswith(IMAGE_ROOT + "/")
        assert (ROOT / ns.script.removeprefix(IMAGE_ROOT + "/")).is_file(), ns.script
        assert "--checkpoint-dir=$(ARC_CHECKPOINT_URL)" in ns.script_args
        script_parser = _script_parser(ns.script)
        if script_parser is not None:  # the example's own flags accept what the manifest passes
            script_parser.parse_args(ns.script_args)
        container_ports = {p["containerPort"] for p in c.get("ports", [])}
        assert int(port) in container_ports

        if doc["kind"] in ("Job", "JobSet", "TrainingRuntime"):
            job_spec = _job_specs(doc)[0]
            assert hi == job_spec["completions"] == job_spec["parallelism"]
            assert 1 <= lo <= hi
            if doc["kind"] == "Job":
                svc = find(bundle, "Service")
                subdomain = spec["subdomain"]
                assert svc["metadata"]["name"] == subdomain
                assert port == str(svc["spec"]["ports"][0]["port"])
                first_pod = f"{doc['metadata']['name']}-0"
            else:  # JobSet, or the JobSet a TrainJob creates (named after the TrainJob)
                if doc["kind"] == "TrainingRuntime":
                    check_trainjob(bundle, doc, c, ns)
                jobset = doc if doc["kind"] == "JobSet" else runtime_jobset(doc)
                network = jobset["spec"]["network"]
                subdomain = network.get("subdomain", jobset["metadata"]["name"])
                assert network["enableDNSHostnames"] is True
                rjob = jobset["spec"]["replicatedJobs"][0]["name"]
                first_pod = f"{jobset['metadata']['name']}-{rjob}-0-0"
            domain = host.split(".svc.", 1)[1]
            assert host == f"{first_pod}.{subdomain}.$(POD_NAMESPACE).svc.{domain}"
            assert len(f"{first_pod[:-1]}{hi - 1}") <= 63  # hostname limit
        else:  # PyTorchJob
            elastic = doc["spec"]["elasticPolicy"]
            worker = doc["spec"]["pytorchReplicaSpecs"]["Worker"]
            assert (lo, hi) == (elastic["minReplicas"], elastic["maxReplicas"])
            assert hi == worker["replicas"]
            assert ns.max_restarts == elastic["maxRestarts"]
            assert doc["spec"]["nprocPerNode"] == ns.nproc_per_node
            assert host == f"{doc['metadata']['name']}-worker-0"
            assert int(port) == elastic["rdzvPort"] and elastic["rdzvId"] == ns.rdzv_id
            conf = ",".join(f"{kv['key']}={kv['value']}" for kv in elastic.get("rdzvConf", []))
            assert conf == ns.rdzv_conf
            assert "pytorchjob-port" in {p["name"] for p in c["ports"]}


def check_trainjob(bundle: list[dict[str, Any]], runtime: dict[str, Any], c: dict[str, Any],
                   ns: Any) -> None:  # fmt: skip
    """The TrainJob, its runtime and the launcher agree, the way Kubeflow Trainer v2 reads them."""
    job = find(bundle, "TrainJob")
    ref = job["spec"]["runtimeRef"]
    assert (ref["kind"], ref["name"]) == (runtime["kind"], runtime["metadata"]["name"])
    assert ref["apiGroup"] == "trainer.kubeflow.org"
    assert job["metadata"]["name"] == runtime["metadata"]["name"]  # its JobSet's name
    lo, hi = (int(x) for x in ns.nnodes.split(":"))
    trainer = job["spec"]["trainer"]
    # image, command, env and resources stay the runtime's: the TrainJob would replace them
    assert set(trainer) == {"numNodes", "numProcPerNode"}
    assert trainer["numNodes"] == hi and str(trainer["numProcPerNode"]) == ns.nproc_per_node
    torch = runtime["spec"]["mlPolicy"]["torch"]
    assert str(torch["numProcPerNode"]) == ns.nproc_per_node
    elastic = torch["elasticPolicy"]
    assert (elastic["minNodes"], elastic["maxNodes"]) == (lo, hi)
    assert elastic["maxRestarts"] == ns.max_restarts
    # the Trainer fills the container named "node" of the Job labelled as the trainer step,
    # and points PET_MASTER_ADDR/PORT at node 0 on port 29400: the launcher's rendezvous
    (rjob,) = render.replicated_jobs(runtime)
    assert rjob["name"] == "node" and c["name"] == "node"
    assert rjob["template"]["metadata"]["labels"][
        "trainer.kubeflow.org/trainjob-ancestor-step"
    ] == ("trainer")
    host, port = ns.rdzv_endpoint.rsplit(":", 1)
    assert port == "29400" and host.startswith(f"{job['metadata']['name']}-node-0-0.")
    reserved = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR",
                "PET_MASTER_PORT"}  # fmt: skip
    assert not reserved & set(env_of(c)), "the Trainer sets these; it rejects jobs that do"


def test_headless_service_selects_the_training_pods() -> None:
    docs = template_bundle("job")
    svc, job = find(docs, "Service"), find(docs, "Job")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert job["spec"]["template"]["spec"]["subdomain"] == svc["metadata"]["name"]


# --------------------------------------------------------------------------- every training pod


def test_every_training_pod_has_the_required_settings(bundle: list[dict[str, Any]]) -> None:
    doc = main_doc(bundle)
    name, url = run_name(bundle), checkpoint_url(bundle)
    configmap = find(bundle, "ConfigMap")
    for meta in (doc["metadata"], configmap["metadata"]):
        assert meta["labels"]["arc-dist.io/run"] == name
        assert meta["labels"]["app.kubernetes.io/instance"] == name
    assert doc["metadata"]["annotations"]["arc-dist.io/checkpoint-url"] == url
    pods = training_pods(doc)
    assert pods
    for role, template in pods:
        where = f"{doc['kind']}/{role}"
        labels = template["metadata"]["labels"]
        assert labels["arc-dist.io/run"] == name and labels["app.kubernetes.io/instance"] == name
        assert template["metadata"]["annotations"]["arc-dist.io/checkpoint-url"] == url
        spec = template["spec"]
        assert spec["terminationGracePeriodSeconds"] >= 60, where
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0, where
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
        assert spec["automountServiceAccountToken"] is False, where
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec["containers"]:
            cwhere = f"{where}/{c['name']}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, cwhere
            assert sc["runAsNonRoot"] is True and sc["capabilities"]["drop"] == ["ALL"], cwhere
            # /dev/shm: memory-backed emptyDir with a size limit that fits the memory limit
            (shm,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            shm_dir = volumes[shm["name"]]["emptyDir"]
            assert shm_dir["medium"] == "Memory", cwhere
            res = c["resources"]
            assert render.quantity(shm_dir["sizeLimit"]) < render.quantity(res["limits"]["memory"])
            # CPU/memory requests; GPU requests equal limits where GPUs are used
            assert {"cpu", "memory"} <= res["requests"].keys(), cwhere
            if "nvidia.com/gpu" in res.get("limits", {}):
                assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] >= 1
            # environment
            env = env_of(c)
            for var, value in REQUIRED_ENV.items():
                assert env[var].get("value") == value, f"{cwhere}: {var}"
            assert int(env["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"]["value"]) > 0
            assert int(env["TORCH_FR_BUFFER_SIZE"]["value"]) > 0  # the dump needs a buffer
            ref = env["ARC_CHECKPOINT_URL"]["valueFrom"]["configMapKeyRef"]
            assert ref["name"] == configmap["metadata"]["name"], cwhere
            assert ref["key"] in configmap["data"], cwhere
            assert [list(s) for s in c["envFrom"]] == [["secretRef"]], cwhere


def test_gpu_pods_tolerate_the_gpu_taint(bundle: list[dict[str, Any]]) -> None:
    for _role, template in training_pods(main_doc(bundle)):
        if render.gpu_containers(template["spec"]):
            keys = {t["key"] for t in template["spec"].get("tolerations", [])}
            assert "nvidia.com/gpu" in keys


def test_no_secret_values_inline(bundle: list[dict[str, Any]]) -> None:
    assert not [d for d in bundle if d["kind"] == "Secret"], "create Secrets with kubectl"
    for d in render.walk(bundle):
        if "name" in d and "value" in d and SECRETISH.search(d["name"]):
            pytest.fail(f"env {d['name']} has an inline value; use secretKeyRef or envFrom")
        if "name" in d and str(d.get("name", "")).startswith("AWS_") and "value" in d:
            pytest.fail(f"env {d['name']} has an inline value")
        for key in ("secretRef", "secretKeyRef"):
            if key in d:
                assert set(d[key]) <= {"name", "key", "optional"}
    text = "\n".join(p.read_text() for p in MANIFESTS.glob("*.yaml"))
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), "an AWS access key id in a manifest"


# --------------------------------------------------------------------------- RayJob


def test_rayjob_runs_the_ray_example_sized_to_the_cluster(bundle: list[dict[str, Any]]) -> None:
    doc = main_doc(bundle)
    if doc["kind"] != "RayJob":
        pytest.skip("RayJob only")
    spec = doc["spec"]
    cluster = spec["rayClusterSpec"]
    (group,) = cluster["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    gpus = worker["resources"]["limits"]["nvidia.com/gpu"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"]
    words = spec["entrypoint"].split()
    script = words[words.index("python") + 1]
    assert script == f"{IMAGE_ROOT}/examples/train_ray.py"
    assert (ROOT / "examples" / "train_ray.py").is_file()
    assert "--gpu" in words
    assert words[words.index("--workers") + 1] == str(group["replicas"] * gpus)
    assert words[words.index("--storage-path") + 1] == '"$ARC_CHECKPOINT_URL"'
    assert words[words.index("--name") + 1] == run_name(bundle)  # a retry resumes the run
    script_parser = _script_parser(script)
    if script_parser is not None:
        script_parser.parse_args([w.strip('"') for w in words[words.index(script) + 1 :]])
    # the entrypoint is expanded by the submitter's shell: it must have the variable too
    (submitter,) = spec["submitterPodTemplate"]["spec"]["containers"]
    assert "configMapKeyRef" in env_of(submitter)["ARC_CHECKPOINT_URL"]["valueFrom"]
    assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    for params in (head["rayStartParams"], group["rayStartParams"]):
        assert all(isinstance(v, str) for v in params.values())
    assert cluster["rayVersion"] == _dockerfile_args()["RAY_VERSION"]


# --------------------------------------------------------------------------- render.py


def test_render_reaches_every_setting() -> None:
    for kind in KINDS:
        text = yaml.safe_dump_all(rendered_bundle(kind))
        for template_value in (
            "arc-train",
            "ghcr.io/example",
            "my-bucket",
            "arc-dist-storage",
            "cluster.local",
            "256Gi",
            "64Gi",
        ):
            assert template_value not in text, f"{kind}: {template_value} left after render"
        docs = rendered_bundle(kind)
        assert all(d["metadata"]["namespace"] == OTHER["namespace"] for d in docs)
        doc = main_doc(docs)
        for _role, template in training_pods(doc):
            for c in template["spec"]["containers"]:
                assert c["image"] == OTHER["image"]
                for e in c.get("envFrom", []):
                    assert e["secretRef"]["name"] == OTHER["storage_secret"]
            for c in render.gpu_containers(template["spec"]):
                assert template["spec"]["terminationGracePeriodSeconds"] == OTHER["grace_period"]
                assert c["resources"]["limits"]["nvidia.com/gpu"] == OTHER["gpus_per_node"]
                argv = launcher_args(c)
                if argv is not None:
                    assert flag(argv, "--nnodes") == f"{OTHER['min_nodes']}:{OTHER['nodes']}"
                    assert flag(argv, "--max-restarts") == str(OTHER["max_restarts"])


def test_cli_writes_a_file(tmp_path: Path) -> None:
    out = tmp_path / "run.yaml"
    argv = ["k8s", "--kind", "trainjob", "--image", "img:1", "--checkpoint-url", "s3://b/r",
            "--nodes", "3", "--name", "run-3", "-o", str(out)]  # fmt: skip
    assert cli_main(argv) == 0
    text = out.read_text()
    docs = [d for d in yaml.safe_load_all(text) if d]
    assert [d["kind"] for d in docs] == ["ConfigMap", "TrainingRuntime", "TrainJob"]
    assert text.startswith("# Rendered by arc-dist")
    assert "arc-dist k8s --kind=trainjob --image=img:1" in text.splitlines()[1]
    assert find(docs, "TrainJob")["spec"]["trainer"]["numNodes"] == 3


@pytest.mark.timeout(120)
def test_cli_and_the_old_script_print_the_manifest_and_reject_bad_values(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "arc_dist.cli", "k8s", "--kind", "job", "--image", "img:1",
           "--checkpoint-url", "s3://b/r", "--nodes", "4"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert find(list(yaml.safe_load_all(proc.stdout)), "Job")["spec"]["completions"] == 4
    old = [sys.executable, str(K8S / "render.py"), "job", *cmd[cmd.index("--image") :]]
    proc2 = subprocess.run(old, capture_output=True, text=True, env=env, timeout=60)
    assert proc2.returncode == 0 and proc2.stdout == proc.stdout, proc2.stderr
    bad = [*cmd[:-2], "--nodes", "0"]
    proc = subprocess.run(bad, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "--nodes=0 is invalid: use 1 or more" in proc.stderr
    proc = subprocess.run([*cmd[:5], "deployment", *cmd[6:]], capture_output=True, text=True,
                          env=env, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "invalid choice: 'deployment'" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_wheel_ships_the_manifests_and_schemas(tmp_path: Path) -> None:
    """Built from a copy of the sources, so the checkout gets no build/ or egg-info."""
    import shutil

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "arc_dist", src / "arc_dist",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("arc_dist-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in [*MANIFESTS.glob("*.yaml"), *SCHEMA_DIR.glob("*.json")]:
        assert str(path.relative_to(ROOT)) in names, f"{path.name} is not in the wheel"
    assert "arc_dist/k8s/render.py" in names


@pytest.mark.parametrize(
    ("change", "flag_name"),
    [
        ({"name": "Bad_Name"}, "--name"),
        ({"name": "x" * 41}, "--name"),
        ({"nodes": 0}, "--nodes"),
        ({"min_nodes": 3, "nodes": 2}, "--min-nodes"),
        ({"gpus_per_node": 0}, "--gpus-per-node"),
        ({"checkpoint_url": "/local/only"}, "--checkpoint-url"),
        ({"memory": "64Gi", "shm_size": "64Gi"}, "--shm-size"),
        ({"cpu": "lots"}, "--cpu"),
        ({"grace_period": 30}, "--grace-period"),
        ({"image": ""}, "--image"),
    ],
)
def test_render_rejects_bad_settings(change: dict[str, Any], flag_name: str) -> None:
    settings = {**OTHER, **change}
    with pytest.raises(ValueError, match=re.escape(flag_name)):
        render.RunSettings(**settings)


def test_render_rejects_elastic_rayjob() -> None:
    """KubeRay's group has a fixed size; the other kinds take --min-nodes."""
    with pytest.raises(ValueError, match="--min-nodes"):
        render.render("rayjob", render.RunSettings(**OTHER))


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, buf = [], ""
    for raw in (K8S / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, rest = buf.partition(" ")
        lines.append((instr.upper(), rest.strip()))
        buf = ""
    return lines


def _dockerfile_args() -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in _dockerfile() if i == "ARG" and "=" in a)


def test_dockerfile_builds_a_non_root_image_with_the_project() -> None:
    instrs = _dockerfile()
    kinds = [i for i, _ in instrs]
    assert set(kinds) <= {
        "ARG",
        "FROM",
        "ENV",
        "RUN",
        "WORKDIR",
        "COPY",
        "USER",
        "ENTRYPOINT",
        "CMD",
        "LABEL",
    }
    first = next(i for i in kinds if i != "ARG")
    assert first == "FROM"
    base = _dockerfile_args()["BASE_IMAGE"]
    assert re.match(r"^[\w./-]+:[\w.-]+$", base) and "cuda" in base, base
    users = [a for i, a in instrs if i == "USER"]
    assert users, "no USER: the container would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root uid (runAsNonRoot)"
    assert kinds.index("USER") > max(k for k, i in enumerate(kinds) if i == "RUN")
    workdir = [a for i, a in instrs if i == "WORKDIR"][-1]
    assert workdir == IMAGE_ROOT
    assert ("COPY", f". {IMAGE_ROOT}") in instrs
    runs = " ".join(a for i, a in instrs if i == "RUN")
    assert re.search(r"pip install .*\"?" + re.escape(IMAGE_ROOT) + r"\[\$\{EXTRAS\}\]", runs)
    assert "tini" in runs
    entrypoint = json.loads([a for i, a in instrs if i == "ENTRYPOINT"][-1])
    assert entrypoint[0] == "/usr/bin/tini"
    # what the manifests assume about the image
    for kind in KINDS:
        for _role, template in pod_templates(main_doc(template_bundle(kind))):
            spec = template["spec"]
            assert str(spec["securityContext"]["runAsUser"]) == uid
            for c in spec["containers"]:
                if "command" in c:
                    assert c["command"][0] == entrypoint[0]


def test_docker_context_ships_what_the_manifests_run() -> None:
    ignored = [
        line.strip()
        for line in (K8S / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {".git", ".venv"} <= set(ignored)
    for path in (
        "k8s/kubeflow_exit_codes.py",
        "examples/train_ddp.py",
        "examples/train_ray.py",
        "pyproject.toml",
    ):
        top = path.split("/")[0]
        assert top not in ignored, f"{path} is excluded from the image"
        assert (ROOT / path).is_file(), f"{path} is referenced by k8s/ but missing"

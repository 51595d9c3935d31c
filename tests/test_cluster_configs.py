"""Every YAML in cluster/ and jobs/configs/ loads and is checked against what its reader expects:

- jobs/configs/*.yaml: our own typed config (`config.load`).
- the Ray cluster launcher YAML: Ray's own JSON schema (ray/autoscaler/ray-schema.json, through
  Ray's `validate_config`), and its AWS node_config keys against EC2 RunInstances' input
  (botocore's service model: what the AWS node provider passes them to).
- the KubeRay manifests: no CRD schema ships with Ray, so the ray.io/v1 field names are a
  table here, written from KubeRay's API reference and checked against its CRDs
  (ray-operator/config/crd/bases at v1.7.0-rc.0-5), for the parts of the API the manifests use.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ssl_dist import config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAMLS = sorted((ROOT / "cluster").glob("*.yaml"))
JOB_CONFIGS = sorted((ROOT / "jobs" / "configs").glob("*.yaml"))
LAUNCHER_YAMLS = [p for p in CLUSTER_YAMLS if "provider" in (yaml.safe_load(p.read_text()) or {})]
KUBE_YAMLS = [p for p in CLUSTER_YAMLS if p not in LAUNCHER_YAMLS]


def kube_documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_the_configs_are_there():
    names = {p.name for p in CLUSTER_YAMLS}
    assert LAUNCHER_YAMLS and {"kuberay-raycluster.yaml", "kuberay-rayjob.yaml"} <= names
    kinds = {d["kind"] for p in KUBE_YAMLS for d in kube_documents(p)}
    assert {"RayCluster", "RayJob", "ServiceAccount"} <= kinds
    assert (ROOT / "cluster" / "README.md").is_file() and (ROOT / "cluster" / "Dockerfile").is_file()


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_job_configs_load_and_validate(path):
    cfg = config.load(path)
    assert config.from_dict(config.to_dict(cfg)) == cfg


# ---- Ray cluster launcher ---------------------------------------------------------------------


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_cluster_launcher_yaml_matches_rays_schema_and_ec2(path):
    import botocore.session
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    cluster = yaml.safe_load(path.read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)  # the file as written: unknown or mistyped fields fail here
    validate_config(prepare_config(cluster))  # as `ray up` sees it: merged with the AWS defaults, Ray's own checks

    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    run_instances = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances")
    ec2_fields = set(run_instances.input_shape.members)
    for name, node_type in types.items():
        unknown = set(node_type["node_config"]) - ec2_fields
        assert not unknown, f"{name}: not RunInstances fields: {unknown}"
        assert "IamInstanceProfile" in node_type["node_config"], f"{name}: S3 goes through an instance role"
    workers = [t for n, t in types.items() if n != cluster["head_node_type"]]
    assert workers and all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)  # GPU
    assert types[cluster["head_node_type"]]["node_config"]["InstanceType"].startswith(("m", "c", "r"))  # CPU

    # The setup installs this project, from the project folder mounted on every node.
    assert any(target.rstrip("/").endswith("ssl-dist") and source == "." for target, source
               in cluster["file_mounts"].items())
    assert any("pip install" in c and "ssl-dist" in c for c in cluster["setup_commands"])


# ---- KubeRay: ray.io/v1 field table -----------------------------------------------------------

POD_SPEC = {
    "activeDeadlineSeconds", "affinity", "automountServiceAccountToken", "containers", "dnsConfig", "dnsPolicy",
    "enableServiceLinks", "ephemeralContainers", "hostAliases", "hostIPC", "hostNetwork", "hostPID", "hostUsers",
    "hostname", "hostnameOverride", "imagePullSecrets", "initContainers", "nodeName", "nodeSelector", "os",
    "overhead", "preemptionPolicy", "priority", "priorityClassName", "readinessGates", "resourceClaims",
    "resources", "restartPolicy", "runtimeClassName", "schedulerName", "schedulingGates", "schedulingGroup",
    "securityContext", "serviceAccount", "serviceAccountName", "setHostnameAsFQDN", "shareProcessNamespace",
    "subdomain", "terminationGracePeriodSeconds", "tolerations", "topologySpreadConstraints", "volumes",
}
CONTAINER = {
    "args", "command", "env", "envFrom", "image", "imagePullPolicy", "lifecycle", "livenessProbe", "name", "ports",
    "readinessProbe", "resizePolicy", "resources", "restartPolicy", "restartPolicyRules", "securityContext",
    "startupProbe", "stdin", "stdinOnce", "terminationMessagePath", "terminationMessagePolicy", "tty",
    "volumeDevices", "volumeMounts", "workingDir",
}
VOLUME = {
    "awsElasticBlockStore", "azureDisk", "azureFile", "cephfs", "cinder", "configMap", "csi", "downwardAPI",
    "emptyDir", "ephemeral", "fc", "flexVolume", "flocker", "gcePersistentDisk", "gitRepo", "glusterfs", "hostPath",
    "image", "iscsi", "name", "nfs", "persistentVolumeClaim", "photonPersistentDisk", "portworxVolume", "projected",
    "quobyte", "rbd", "scaleIO", "secret", "storageos", "vsphereVolume",
}
# type: (allowed fields, {field: type of its value, [type] for a list of them})
KUBERAY = {
    "RayCluster": ({"apiVersion", "kind", "metadata", "spec", "status"}, {"spec": "RayClusterSpec"}),
    "RayJob": ({"apiVersion", "kind", "metadata", "spec", "status"}, {"spec": "RayJobSpec"}),
    "RayJobSpec": ({"activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
                    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
                    "preRunningDeadlineSeconds", "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes",
                    "submissionMode", "submitterConfig", "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished"},
                   {"rayClusterSpec": "RayClusterSpec"}),
    "RayClusterSpec": ({"authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                        "headGroupSpec", "headServiceAnnotations", "historyServerOptions", "managedBy", "networkPolicy",
                        "rayVersion", "suspend", "tlsOptions", "upgradeStrategy", "workerGroupSpecs"},
                       {"authOptions": "AuthOptions", "headGroupSpec": "HeadGroupSpec",
                        "workerGroupSpecs": ["WorkerGroupSpec"]}),
    "AuthOptions": ({"enableK8sTokenAuth", "mode", "secretName"}, {}),
    "HeadGroupSpec": ({"enableIngress", "headService", "ingressOptions", "labels", "rayStartParams", "resources",
                       "serviceType", "template"}, {"template": "PodTemplateSpec"}),
    "WorkerGroupSpec": ({"groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts",
                         "priority", "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template"},
                        {"template": "PodTemplateSpec"}),
    "PodTemplateSpec": ({"metadata", "spec"}, {"spec": "PodSpec"}),
    "PodSpec": (POD_SPEC, {"containers": ["Container"], "volumes": ["Volume"], "tolerations": ["Toleration"]}),
    "Container": (CONTAINER, {"env": ["EnvVar"], "envFrom": ["EnvFromSource"], "ports": ["ContainerPort"],
                              "resources": "ResourceRequirements", "volumeMounts": ["VolumeMount"]}),
    "EnvVar": ({"name", "value", "valueFrom"}, {}),
    "EnvFromSource": ({"configMapRef", "prefix", "secretRef"}, {"secretRef": "SecretEnvSource"}),
    "SecretEnvSource": ({"name", "optional"}, {}),
    "ContainerPort": ({"containerPort", "hostIP", "hostPort", "name", "protocol"}, {}),
    "ResourceRequirements": ({"claims", "limits", "requests"}, {}),
    "VolumeMount": ({"mountPath", "mountPropagation", "name", "readOnly", "recursiveReadOnly", "subPath",
                     "subPathExpr"}, {}),
    "Volume": (VOLUME, {"emptyDir": "EmptyDirVolumeSource"}),
    "EmptyDirVolumeSource": ({"medium", "sizeLimit"}, {}),
    "Toleration": ({"effect", "key", "operator", "tolerationSeconds", "value"}, {}),
}


def kuberay_problems(value, kind: str, path: str) -> list[str]:
    """Field names of `value` (a `kind` per KUBERAY) that KubeRay's API does not have, recursively."""
    if not isinstance(value, dict):
        return [f"{path}: a {kind} must be a mapping"]
    allowed, nested = KUBERAY[kind]
    problems = [f"{path}.{key}: not a field of {kind}" for key in value if key not in allowed]
    for key, sub in nested.items():
        if key not in value:
            continue
        if isinstance(sub, list):
            problems += [p for i, item in enumerate(value[key]) for p in kuberay_problems(item, sub[0], f"{path}.{key}[{i}]")]
        else:
            problems += kuberay_problems(value[key], sub, f"{path}.{key}")
    return problems


def test_the_field_table_catches_misspelled_fields():
    bad = {"apiVersion": "ray.io/v1", "kind": "RayJob",
           "spec": {"entrypoint": "python x.py", "shutdownAfterJobFinish": True,
                    "rayClusterSpec": {"headGroupSpec": {"template": {"spec": {"containers": [{"name": "h", "imag": "x"}]}}},
                                       "workerGroupSpecs": [{"groupNam": "g"}]}}}
    assert sorted(kuberay_problems(bad, "RayJob", "RayJob")) == [
        "RayJob.spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].imag: not a field of Container",
        "RayJob.spec.rayClusterSpec.workerGroupSpecs[0].groupNam: not a field of WorkerGroupSpec",
        "RayJob.spec.shutdownAfterJobFinish: not a field of RayJobSpec"]


def cluster_specs(doc: dict) -> list[dict]:
    return [doc["spec"]] if doc["kind"] == "RayCluster" else [doc["spec"]["rayClusterSpec"]]


@pytest.mark.parametrize("path", KUBE_YAMLS, ids=lambda p: p.name)
def test_kuberay_manifests_use_kuberays_fields(path):
    for doc in kube_documents(path):
        assert doc["apiVersion"] in ("ray.io/v1", "v1"), doc["apiVersion"]
        if doc["apiVersion"] != "ray.io/v1":
            continue
        assert kuberay_problems(doc, doc["kind"], doc["kind"]) == []
        for spec in cluster_specs(doc):
            assert spec["rayVersion"].startswith("2.")
            groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
            for group in groups:  # rayStartParams: a map of strings
                assert all(isinstance(v, str) for v in group["rayStartParams"].values())
            for worker in spec["workerGroupSpecs"]:
                assert worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]
                (container,) = worker["template"]["spec"]["containers"]
                assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1  # GPU workers
            head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
            assert "nvidia.com/gpu" not in head["resources"].get("limits", {})  # a CPU head
        if doc["kind"] == "RayJob":
            assert doc["spec"]["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
            assert "jobs/pretrain.py" in doc["spec"]["entrypoint"]
            entry_config = doc["spec"]["entrypoint"].split("--config", 1)[1].split()[0]
            assert (ROOT / entry_config.split("/ssl-dist/", 1)[1]).is_file()  # a config the image holds


# ---- what `ray up` syncs to every node -----------------------------------------------------------

PROJECT_FILES = ["pyproject.toml", "jobs/pretrain.py", "ssl_dist/keys.py", "ssl_dist/data/stream.py",
                 "cluster/aws-gpu.yaml", "notes.md"]
NOT_SYNCED = [".git/config", ".venv/bin/python", "runs/x/model.pt", "data/cifar/train.tar",
              "ssl_dist/__pycache__/a.pyc", ".env", ".env.local", "id_rsa", "id_ed25519.pub", ".netrc", ".pgpass",
              "kubeconfig", "deploy/kubeconfig-prod.yaml", "infra/terraform.tfstate", "certs/server.pem",
              "certs/server.key", "conf/credentials.json", ".aws/config", ".ssh/known_hosts", "auth_token"]


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_cluster_launcher_syncs_the_projects_files_and_no_secrets(path, tmp_path):
    import shutil
    import subprocess

    from ray.autoscaler._private.command_runner import SSHCommandRunner

    from ssl_dist import secret_filter

    cluster = yaml.safe_load(path.read_text())
    assert cluster["rsync_filter"] == [".gitignore"]  # what git ignores, rsync leaves out (every folder's)
    ignored = set((ROOT / ".gitignore").read_text().splitlines())
    assert set(secret_filter.rsync_excludes()) <= ignored  # and the project's .gitignore names the secrets
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed here")
    # The arguments `ray up` gives rsync for every file mount, from this YAML.
    rsync = ["rsync", "-a", *SSHCommandRunner._create_rsync_filter_args(None, cluster)]

    project = tmp_path / "project"
    for rel in PROJECT_FILES + NOT_SYNCED:
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text("x\n")
    shutil.copy(ROOT / ".gitignore", project / ".gitignore")  # the project's own, as shipped
    subprocess.run([*rsync, f"{project}/", f"{tmp_path / 'node'}/"], check=True)  # `~/ssl-dist: .`
    synced = sorted(p.relative_to(tmp_path / "node").as_posix() for p in (tmp_path / "node").rglob("*") if p.is_file())
    assert synced == sorted([*PROJECT_FILES, ".gitignore"])
    assert all(secret_filter.secret_file_pattern(rel) for rel in NOT_SYNCED[5:])  # (the same list as submit's)

    # Single files Ray mounts with the same rsync arguments still go: the token (file_mounts),
    # the head's SSH key to the workers and its bootstrap config (added by `ray up`).
    (tmp_path / "home" / ".ray").mkdir(parents=True)
    (tmp_path / "mounted").mkdir()
    for name in ("auth_token", "ray-autoscaler_us-west-2.pem", "ray-bootstrap-k2j4h6.yaml"):
        (tmp_path / "home" / ".ray" / name).write_text("x\n")
        subprocess.run([*rsync, str(tmp_path / "home" / ".ray" / name), str(tmp_path / "mounted" / name)], check=True)
        assert (tmp_path / "mounted" / name).is_file(), name

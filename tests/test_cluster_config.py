"""`cluster.yaml`: Ray's own launcher checks, offline, and the invariants the cluster relies on.

How this stays offline: `ray up` runs `prepare_config` (merge the provider's defaults.yaml shipped in the
wheel, fold `setup_commands` into the head/worker lists, check the docker section, fill per-type
min/max_workers) and `validate_config` (the launcher's JSON schema, ray-schema.json, plus the head-type and
min_workers checks) before anything touches AWS; only then does it call the AWS provider:
`fillout_available_node_types_resources` (ec2:DescribeInstanceTypes; failures there are only a warning,
which is why the file states each type's resources) and `bootstrap_aws` (IAM, key pairs, subnets, security
groups; its module imports boto3 at import time). The tests run the first two, exactly as Ray ships them,
and never the AWS half, so they need no credentials, no network and not even boto3.
"""

from __future__ import annotations

import copy
import fnmatch
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
DOCS = ROOT / "docs" / "cluster.md"
IMAGE = "rayproject/ray:2.60.0-py311-gpu"
PLACEHOLDER = re.compile(r"CHANGE_ME-[A-Za-z0-9_-]*[A-Za-z0-9]")


@pytest.fixture(scope="module")
def raw() -> str:
    return CLUSTER.read_text()


@pytest.fixture(scope="module")
def config(raw) -> dict:
    return yaml.safe_load(raw)


@pytest.fixture(scope="module")
def prepared(config) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(config))
    validate_config(cfg)
    return cfg


def gpu_types(cfg: dict) -> dict[str, dict]:
    return {k: v for k, v in cfg["available_node_types"].items() if v.get("resources", {}).get("GPU", 0) > 0}


def commands(cfg: dict, *keys: str) -> list[str]:
    return [c for k in keys for c in cfg.get(k) or []]


def mlflow_command(cfg: dict) -> str:
    found = [c for c in commands(cfg, "head_setup_commands", "head_start_ray_commands") if "mlflow server" in c]
    assert len(found) == 1, "exactly one command on the head starts the MLflow server"
    return found[0]


def option(cmd: str, name: str) -> str:
    m = re.search(rf"{name}[ =](\"[^\"]*\"|'[^']*'|\S+)", cmd)
    assert m, f"{name} missing from: {cmd}"
    return m.group(1).strip("'\"")


# --- Ray's own checks -------------------------------------------------------------------------------------

def test_ray_launcher_accepts_the_file(prepared):
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


def test_the_schema_check_is_not_vacuous(config):
    """The same two calls reject what `ray up` would: an unknown key, a node type without resources."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    typo = copy.deepcopy(config)
    typo["idle_timeout_minute"] = 5
    no_resources = copy.deepcopy(config)
    del no_resources["available_node_types"]["gpu_a10g"]["resources"]
    for bad in (typo, no_resources):
        with pytest.raises(jsonschema.ValidationError):
            validate_config(prepare_config(bad))


# --- GPU workers ------------------------------------------------------------------------------------------

def test_gpu_workers_autoscale_from_zero_and_are_released_when_idle(prepared):
    gpus = gpu_types(prepared)
    kinds = {v["node_config"]["InstanceType"] for v in gpus.values()}
    assert {"g5.xlarge", "g6.xlarge", "p4d.24xlarge"} <= kinds  # A10G, L4, A100
    for name, node in gpus.items():
        assert node["min_workers"] == 0, f"{name} must scale from zero"
        assert node["resources"]["CPU"] >= 1
    assert any(node["max_workers"] > 0 for node in gpus.values()), "no GPU type can be launched"
    spot = [n for n, v in gpus.items() if v["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    assert spot, "a spot-capacity type is offered"
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0, "no trials on the head"
    assert 0 < prepared["idle_timeout_minutes"] <= 10
    assert prepared["max_workers"] >= max(v["max_workers"] for v in gpus.values())


def test_every_shipped_gpu_sweep_fits_on_every_enabled_gpu_type(prepared):
    """A trial that fits no node type would wait forever: the autoscaler only logs a warning."""
    enabled = {n: v["resources"] for n, v in gpu_types(prepared).items() if v["max_workers"] > 0}
    sweeps = [p for p in sorted((ROOT / "sweeps").glob("*.yaml"))
              if (yaml.safe_load(p.read_text()).get("resources") or {}).get("gpu", 0) > 0]
    assert sweeps, "the paper-scale sweep files ask for GPUs"
    for path in sweeps:
        res = yaml.safe_load(path.read_text())["resources"]
        for name, node in enabled.items():
            per_node = min(node["CPU"] // res.get("cpu", 1), node["GPU"] // res["gpu"])
            assert per_node >= 1, f"{path.name} ({res}) fits no {name} node ({node})"


# --- head: MLflow server -----------------------------------------------------------------------------------

def test_mlflow_server_runs_on_the_head_only(prepared):
    cmd = mlflow_command(prepared)
    assert not [c for c in commands(prepared, "worker_setup_commands", "worker_start_ray_commands")
                if "mlflow server" in c]
    assert option(cmd, "--backend-store-uri").startswith("sqlite:////"), "sqlite at an absolute path on the head"
    assert option(cmd, "--artifacts-destination").startswith("s3://"), "workers upload through the server"
    assert "--no-serve-artifacts" not in cmd and "--default-artifact-root" not in cmd
    assert option(cmd, "--port") == "5000"
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in cmd
    assert "nohup" in cmd and ".pid" in cmd
    # The MLflow store's directory on the head's disk is mounted into the head's container only.
    head_opts = " ".join(prepared["docker"].get("head_run_options", []))
    store = option(cmd, "--backend-store-uri")[len("sqlite:///"):]
    assert str(Path(store).parent) in head_opts


def test_mlflow_allowed_hosts_cover_the_private_network_and_port_forwarding(prepared):
    hosts = option(mlflow_command(prepared), "--allowed-hosts").split(",")
    assert "*" not in hosts

    def allowed(host: str) -> bool:  # MLflow 3.x's rule (mlflow.server.security_utils.is_allowed_host_header)
        return any(fnmatch.fnmatch(host, h) if "*" in h else host == h for h in hosts)

    for ok in ("127.0.0.1:5000", "localhost:5000", "10.0.12.34:5000", "172.31.5.6:5000", "192.168.1.2:5000"):
        assert allowed(ok), ok
    for bad in ("54.12.3.4:5000", "172.32.0.1:5000", "evil.example.com:5000"):
        assert not allowed(bad), bad


# --- every node: image, project, auth ---------------------------------------------------------------------

def test_docker_image_is_the_pinned_ray_gpu_image(prepared):
    docker = prepared["docker"]
    assert docker["image"] == IMAGE
    assert docker.get("head_image", IMAGE) == IMAGE and docker.get("worker_image", IMAGE) == IMAGE
    for node in prepared["available_node_types"].values():
        assert node.get("docker", {}).get("worker_image", IMAGE) == IMAGE
    version = IMAGE.split(":")[1].split("-")[0]
    setup = " ".join(prepared["setup_commands"])
    assert f"ray[tune,default]=={version}" in setup, "pip must not move Ray off the image's version"


def test_project_and_torch_are_installed_on_every_node(prepared):
    assert prepared["file_mounts"].get("~/iclmix") == ".", "the repository is mounted on every node"
    for key in ("head_setup_commands", "worker_setup_commands"):  # after Ray merged setup_commands into both
        cmds = prepared[key]
        assert any(re.search(r"pip install .*-e ~/iclmix", c) for c in cmds), key
        assert any(re.search(r"pip install .*torch", c) for c in cmds), key


def test_token_authentication_agrees_between_head_and_workers(prepared):
    docker = prepared["docker"]
    shared = " ".join(docker.get("run_options", []))
    assert re.search(r"RAY_AUTH_MODE=token\b", shared), "set once for every node's container"
    per_side = " ".join(docker.get("head_run_options", []) + docker.get("worker_run_options", []))
    starts = " ".join(commands(prepared, "head_start_ray_commands", "worker_start_ray_commands"))
    assert "RAY_AUTH_MODE" not in per_side + starts, "no node may override the shared auth mode"
    assert prepared["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", "same token on every node"


# --- nothing secret, nothing public -----------------------------------------------------------------------

def test_no_credentials_in_the_file(raw, config):
    for pattern in (r"aws_access_key_id", r"aws_secret_access_key", r"aws_session_token",
                    r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", r"RAY_AUTH_TOKEN\s*=", r"\b[0-9a-f]{64}\b"):
        assert not re.search(pattern, raw, re.IGNORECASE if pattern.startswith("aws") else 0), pattern
    for run in re.findall(r"[A-Za-z0-9/+]{40,}", raw):  # AWS secret keys: 40 characters of base64
        assert not (re.search(r"\d", run) and re.search(r"[A-Z]", run) and re.search(r"[a-z]", run)), run
    assert "aws_credentials" not in config["provider"]
    for node in config["available_node_types"].values():
        assert "IamInstanceProfile" in node["node_config"], "instances get their rights from a role, not keys"


def test_nothing_is_opened_to_the_internet(config):
    values = yaml.safe_dump(config)  # everything but the comments, which may name what is avoided
    assert "0.0.0.0/0" not in values and "::/0" not in values
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        assert not rule.get("IpRanges") and not rule.get("Ipv6Ranges"), rule
    # With a security group on every node type Ray creates none of its own: the group it would create
    # opens tcp/22 to 0.0.0.0/0 (ray.autoscaler._private.aws.config._create_default_ssh_inbound_rules).
    for name, node in config["available_node_types"].items():
        assert node["node_config"].get("SecurityGroupIds"), name
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "the dashboard is reached through port forwarding"


def test_placeholders_are_marked_and_listed_at_the_top(raw, config):
    header = raw.split("cluster_name:")[0]
    values = set(PLACEHOLDER.findall(raw.replace(header, "")))
    assert values, "the user-specific values are CHANGE_ME- placeholders"
    for value in values:
        assert value in header, f"{value} is not listed in the comment block at the top"
    head = config["available_node_types"][config["head_node_type"]]["node_config"]
    must = {
        "region": config["provider"]["region"],
        "ami": head["ImageId"],
        "security group": head["SecurityGroupIds"][0],
        "key name": head["KeyName"],
        "ssh key": config["auth"]["ssh_private_key"],
        "instance profile": head["IamInstanceProfile"]["Arn"],
        "bucket": option(mlflow_command(config), "--artifacts-destination"),
    }
    for what, value in must.items():
        assert PLACEHOLDER.search(value), f"{what} should be a CHANGE_ME- placeholder, not {value!r}"


def test_docs_submit_the_sweep_with_shared_storage_and_the_head_tracking_server(config):
    text = DOCS.read_text()
    bucket = option(mlflow_command(config), "--artifacts-destination")[len("s3://"):].split("/")[0]
    assert f"--storage s3://{bucket}/iclmix-runs" in text
    assert "--tracking-uri http://<head-private-ip>:5000" in text
    for step in ("ray up cluster.yaml", "ray job submit", "ray job logs", "ray attach cluster.yaml -p 5000",
                 "ray down cluster.yaml", "iclmix analyze"):
        assert step in text, step

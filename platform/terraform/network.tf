# Security groups: each component admits only the ports it serves, from the groups that use it.
# Egress to AWS APIs and ECR is HTTPS only (through the subnets' NAT gateway or VPC endpoints).

resource "aws_security_group" "dagster" {
  name        = "${var.name}-dagster"
  description = "Dagster webserver, daemon and code location (ECS Fargate tasks)"
  vpc_id      = var.vpc_id
}

resource "aws_security_group" "rds" {
  name        = "${var.name}-rds"
  description = "RDS PostgreSQL for Dagster and MLflow"
  vpc_id      = var.vpc_id
}

resource "aws_security_group" "msk" {
  name        = "${var.name}-msk"
  description = "MSK brokers (IAM authentication only)"
  vpc_id      = var.vpc_id
}

resource "aws_security_group" "dms" {
  name        = "${var.name}-dms"
  description = "DMS replication instance: reads the bank database, writes to S3"
  vpc_id      = var.vpc_id
}

# ---------------------------------------------------------------------------- between the groups

locals {
  # Every connection between two of the module's groups, TCP on one port: an egress rule on the
  # client's group and an ingress rule on the server's, both from the one entry here.
  flows = {
    code_location_grpc = {
      description = "Webserver and daemon call the code location's gRPC server"
      client      = aws_security_group.dagster.id
      server      = aws_security_group.dagster.id
      port        = local.code_location_port
    }
    postgres = {
      description = "Dagster storage and the MLflow store on RDS PostgreSQL, from the Dagster tasks"
      client      = aws_security_group.dagster.id
      server      = aws_security_group.rds.id
      port        = 5432
    }
    kafka = {
      description = "Kafka clients in the Dagster tasks to the MSK brokers, IAM authentication port"
      client      = aws_security_group.dagster.id
      server      = aws_security_group.msk.id
      port        = 9098
    }
  }

  # AWS APIs and ECR, by group (HTTPS to anywhere: the subnets route it to NAT or endpoints).
  https_egress = {
    dagster = { group = aws_security_group.dagster.id, description = "AWS APIs (Kinesis, S3, STS, Secrets Manager, CloudWatch Logs) and ECR" }
    dms     = { group = aws_security_group.dms.id, description = "S3, Secrets Manager and KMS APIs" }
  }
}

resource "aws_vpc_security_group_egress_rule" "flow" {
  for_each                     = local.flows
  security_group_id            = each.value.client
  description                  = each.value.description
  ip_protocol                  = "tcp"
  from_port                    = each.value.port
  to_port                      = each.value.port
  referenced_security_group_id = each.value.server
}

resource "aws_vpc_security_group_ingress_rule" "flow" {
  for_each                     = local.flows
  security_group_id            = each.value.server
  description                  = each.value.description
  ip_protocol                  = "tcp"
  from_port                    = each.value.port
  to_port                      = each.value.port
  referenced_security_group_id = each.value.client
}

resource "aws_vpc_security_group_egress_rule" "https" {
  for_each          = local.https_egress
  security_group_id = each.value.group
  description       = each.value.description
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = "0.0.0.0/0"
}

# ---------------------------------------------------------------------------- from and to outside

# One rule per CIDR block or group a variable lists. Alike in form, but each lets a different
# outside party reach a different port: kept apart, so that each says what it allows.

resource "aws_vpc_security_group_ingress_rule" "dagster_webserver" {
  for_each          = toset(var.webserver_allowed_cidrs)
  security_group_id = aws_security_group.dagster.id
  description       = "Dagster UI from an allowed private range"
  ip_protocol       = "tcp"
  from_port         = local.webserver_port
  to_port           = local.webserver_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_ingress_rule" "msk_from_clients" {
  for_each                     = toset(var.kafka_client_security_group_ids)
  security_group_id            = aws_security_group.msk.id
  description                  = "Other Kafka clients (e.g. Spark executors), IAM port"
  ip_protocol                  = "tcp"
  from_port                    = 9098
  to_port                      = 9098
  referenced_security_group_id = each.value
}

resource "aws_vpc_security_group_egress_rule" "dms_source" {
  for_each          = toset(var.dms_source_cidr_blocks)
  security_group_id = aws_security_group.dms.id
  description       = "The bank's PostgreSQL database"
  ip_protocol       = "tcp"
  from_port         = 5432
  to_port           = 5432
  cidr_ipv4         = each.value
}

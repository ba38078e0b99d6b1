# Dagster on ECS Fargate, three services from one image (the repository's Dockerfile):
# - code-location: `dagster code-server start -m assets.definitions` (the image's command),
#   found at code-location.<name>.internal:4000; sensors run and runs execute here;
# - webserver: the UI on port 3000, private (var.webserver_allowed_cidrs);
# - daemon: schedules, sensors, the run queue (exactly one task, ever).
# All three share the Dagster storage on RDS (DAGSTER_PG_URL, from Secrets Manager).

resource "aws_ecs_cluster" "main" {
  name = var.name

  setting {
    name  = "containerInsights"
    value = "enabled"
  }

  configuration {
    execute_command_configuration {
      kms_key_id = aws_kms_key.main.arn
      logging    = "OVERRIDE"
      log_configuration {
        cloud_watch_encryption_enabled = true
        cloud_watch_log_group_name     = aws_cloudwatch_log_group.this["ecs"].name
      }
    }
  }
}

resource "aws_service_discovery_private_dns_namespace" "main" {
  name        = "${var.name}.internal"
  description = "streamguard services (the Dagster code location)"
  vpc         = var.vpc_id
}

resource "aws_service_discovery_service" "code_location" {
  name = "code-location"

  dns_config {
    namespace_id   = aws_service_discovery_private_dns_namespace.main.id
    routing_policy = "MULTIVALUE"
    dns_records {
      type = "A"
      ttl  = 10
    }
  }
}

locals {
  code_location_host = "${aws_service_discovery_service.code_location.name}.${aws_service_discovery_private_dns_namespace.main.name}"
  grpc_target        = ["--grpc-host", local.code_location_host, "--grpc-port", tostring(local.code_location_port)]

  # The code location's settings (assets.resources.deployment_resources turns each set variable
  # into a dagster.EnvVar). Secrets are not here: they come from Secrets Manager below.
  code_location_environment = [
    { name = "STREAMGUARD_DEPLOYMENT", value = "production" },
    { name = "STREAMGUARD_HOME", value = "/var/lib/streamguard" },
    # The lake and MLflow's artifacts in the module's buckets (the outputs lake_uri and
    # mlflow_artifacts_uri); STREAMGUARD_HOME then holds only local scratch.
    { name = "STREAMGUARD_LAKE_URI", value = "${local.lake_bucket_uri}/${local.lake_prefix}" },
    { name = "STREAMGUARD_MLFLOW_ARTIFACTS_URI", value = "s3://${aws_s3_bucket.data["mlflow"].id}/artifacts" },
    { name = "STREAMGUARD_STREAM", value = aws_kinesis_stream.this["transactions"].name },
    { name = "AWS_REGION", value = var.region },
    { name = "STREAMGUARD_KAFKA_BOOTSTRAP", value = aws_msk_cluster.main.bootstrap_brokers_sasl_iam },
    { name = "STREAMGUARD_KAFKA_SECURITY", value = "msk_iam" },
    { name = "STREAMGUARD_KAFKA_TOPIC", value = var.kafka_transactions_topic },
    { name = "STREAMGUARD_ALERTS_TOPIC", value = var.kafka_alerts_topic },
  ]

  # Read by the image's Dagster instance config (dagster.yaml: storage.postgres.postgres_url).
  dagster_secrets = [
    { name = "DAGSTER_PG_URL", valueFrom = "${aws_secretsmanager_secret.database.arn}:dagster_url::" },
  ]

  code_location_secrets = concat(local.dagster_secrets, [
    { name = "MLFLOW_TRACKING_URI", valueFrom = "${aws_secretsmanager_secret.database.arn}:mlflow_tracking_uri::" },
  ])

  # MLflow creates its tables in an empty database, but not the database itself: the init
  # container creates it on the RDS instance once (idempotent).
  create_mlflow_database = <<-PY
    import os
    import sqlalchemy as sa
    engine = sa.create_engine(os.environ['DAGSTER_PG_URL'], isolation_level='AUTOCOMMIT')
    with engine.connect() as connection:
        query = sa.text('SELECT 1 FROM pg_database WHERE datname = :name')
        if connection.execute(query, {'name': '${local.mlflow_database}'}).first() is None:
            connection.execute(sa.text('CREATE DATABASE ${local.mlflow_database}'))
  PY

  # Every container logs to the module's ECS log group.
  container_logs = {
    logDriver = "awslogs"
    options = {
      awslogs-group         = aws_cloudwatch_log_group.this["ecs"].name
      awslogs-region        = var.region
      awslogs-stream-prefix = var.name
    }
  }

  # The three services, by name: the size and role of the task, and how it is deployed. The one
  # task-definition and service resource below serve all three.
  dagster_services = {
    code-location = {
      cpu           = var.code_location_cpu
      memory        = var.code_location_memory
      task_role_arn = aws_iam_role.this["code_location"].arn
      # Found by the webserver and the daemon at code-location.<name>.internal.
      registry_arns = [aws_service_discovery_service.code_location.arn]
      # Rolling: the new task starts before the old one stops.
      deployment_minimum_healthy_percent = 100
      deployment_maximum_percent         = 200
    }
    # The webserver and the daemon have no task role: they only talk to the code location and
    # to PostgreSQL.
    webserver = {
      cpu                                = 1024
      memory                             = 2048
      task_role_arn                      = null
      registry_arns                      = []
      deployment_minimum_healthy_percent = 100
      deployment_maximum_percent         = 200
    }
    daemon = {
      cpu           = 512
      memory        = 1024
      task_role_arn = null
      registry_arns = []
      # Never two daemons at once, not even during a deployment.
      deployment_minimum_healthy_percent = 0
      deployment_maximum_percent         = 100
    }
  }

  # What each service's task runs, all from the one image. A map of its own, not part of
  # dagster_services: checkov expands a for_each only over values it can evaluate, and these
  # (variables inside nested locals) it cannot, so it would check one unexpanded template.
  dagster_containers = {
    code-location = [
      {
        name             = "create-mlflow-database"
        image            = var.image
        essential        = false
        command          = ["python", "-c", local.create_mlflow_database]
        secrets          = local.dagster_secrets
        logConfiguration = local.container_logs
      },
      {
        # No command: the image's own, the code server.
        name         = "code-location"
        image        = var.image
        essential    = true
        portMappings = [{ containerPort = local.code_location_port, protocol = "tcp" }]
        environment  = local.code_location_environment
        secrets      = local.code_location_secrets
        dependsOn    = [{ containerName = "create-mlflow-database", condition = "SUCCESS" }]
        healthCheck = {
          command     = ["CMD", "dagster", "api", "grpc-health-check", "-p", tostring(local.code_location_port)]
          interval    = 30
          timeout     = 10
          retries     = 3
          startPeriod = 120
        }
        logConfiguration = local.container_logs
      },
    ]
    webserver = [
      {
        name         = "webserver"
        image        = var.image
        essential    = true
        command      = concat(["dagster-webserver", "-h", "0.0.0.0", "-p", tostring(local.webserver_port)], local.grpc_target)
        portMappings = [{ containerPort = local.webserver_port, protocol = "tcp" }]
        secrets      = local.dagster_secrets
        healthCheck = {
          command     = ["CMD", "python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${local.webserver_port}/server_info', timeout=5)"]
          interval    = 30
          timeout     = 10
          retries     = 3
          startPeriod = 60
        }
        logConfiguration = local.container_logs
      },
    ]
    daemon = [
      {
        name      = "daemon"
        image     = var.image
        essential = true
        command   = concat(["dagster-daemon", "run"], local.grpc_target)
        secrets   = local.dagster_secrets
        healthCheck = {
          command     = ["CMD", "dagster-daemon", "liveness-check"]
          interval    = 60
          timeout     = 30
          retries     = 3
          startPeriod = 120
        }
        logConfiguration = local.container_logs
      },
    ]
  }
}

resource "aws_ecs_task_definition" "dagster" {
  #checkov:skip=CKV_AWS_336:Every service writes under DAGSTER_HOME (Dagster's compute logs, run artifacts), the code location Spark's scratch under /tmp too; a read-only root has not been tried on ECS
  for_each                 = local.dagster_services
  family                   = "${var.name}-${each.key}"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = each.value.cpu
  memory                   = each.value.memory
  execution_role_arn       = aws_iam_role.this["ecs_execution"].arn
  task_role_arn            = each.value.task_role_arn

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = "X86_64"
  }

  container_definitions = jsonencode(local.dagster_containers[each.key])
}

resource "aws_ecs_service" "dagster" {
  for_each               = local.dagster_services
  name                   = each.key
  cluster                = aws_ecs_cluster.main.id
  task_definition        = aws_ecs_task_definition.dagster[each.key].arn
  desired_count          = 1
  launch_type            = "FARGATE"
  platform_version       = "LATEST"
  propagate_tags         = "SERVICE"
  enable_execute_command = false

  deployment_minimum_healthy_percent = each.value.deployment_minimum_healthy_percent
  deployment_maximum_percent         = each.value.deployment_maximum_percent

  network_configuration {
    subnets          = var.private_subnet_ids
    security_groups  = [aws_security_group.dagster.id]
    assign_public_ip = false
  }

  dynamic "service_registries" {
    for_each = each.value.registry_arns
    content {
      registry_arn = service_registries.value
    }
  }

  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }
}


# PostgreSQL for Dagster (runs, event logs, schedules: database "dagster") and the MLflow
# tracking store and registry (database "mlflow", created by the code-location task's init
# container on first start). Private, encrypted, TLS enforced, IAM authentication enabled.

resource "aws_db_subnet_group" "main" {
  name       = var.name
  subnet_ids = var.private_subnet_ids
}

resource "aws_db_parameter_group" "main" {
  name   = "${var.name}-postgres${var.db_engine_version}"
  family = "postgres${var.db_engine_version}"

  parameter {
    name  = "rds.force_ssl"
    value = "1"
  }

  # Slow statements and DDL in the PostgreSQL log (exported to CloudWatch below).
  parameter {
    name  = "log_statement"
    value = "ddl"
  }

  parameter {
    name  = "log_min_duration_statement"
    value = "1000"
  }
}

resource "aws_db_instance" "main" {
  identifier     = var.name
  engine         = "postgres"
  engine_version = var.db_engine_version
  instance_class = var.db_instance_class

  db_name  = local.dagster_database
  username = var.db_username
  password = var.db_password

  allocated_storage     = var.db_allocated_storage_gb
  max_allocated_storage = var.db_allocated_storage_gb * 4
  storage_type          = "gp3"
  storage_encrypted     = true
  kms_key_id            = aws_kms_key.main.arn

  db_subnet_group_name   = aws_db_subnet_group.main.name
  vpc_security_group_ids = [aws_security_group.rds.id]
  publicly_accessible    = false
  multi_az               = var.db_multi_az
  parameter_group_name   = aws_db_parameter_group.main.name

  iam_database_authentication_enabled = true
  auto_minor_version_upgrade          = true
  backup_retention_period             = var.db_backup_retention_days
  copy_tags_to_snapshot               = true
  deletion_protection                 = true
  skip_final_snapshot                 = false
  final_snapshot_identifier           = "${var.name}-final"

  enabled_cloudwatch_logs_exports       = ["postgresql", "upgrade"]
  performance_insights_enabled          = true
  performance_insights_kms_key_id       = aws_kms_key.main.arn
  performance_insights_retention_period = 7
  monitoring_interval                   = 60
  monitoring_role_arn                   = aws_iam_role.this["rds_monitoring"].arn
}

# The connection settings the ECS tasks read (never in a task definition or an image): the
# Dagster storage URL and the MLflow tracking URI, psycopg2 driver (dagster-postgres fails on
# psycopg 3, SQLAlchemy 2.1's default).
resource "aws_secretsmanager_secret" "database" {
  #checkov:skip=CKV2_AWS_57:The password is the RDS master password set from var.db_password; rotate it by changing the variable and applying (a rotation Lambda would change it behind Terraform's back)
  name                    = "${var.name}/database"
  description             = "Dagster storage URL and MLflow tracking URI for the streamguard ECS tasks"
  kms_key_id              = aws_kms_key.main.arn
  recovery_window_in_days = 7
}

resource "aws_secretsmanager_secret_version" "database" {
  secret_id = aws_secretsmanager_secret.database.id
  secret_string = jsonencode({
    username            = var.db_username
    password            = var.db_password
    host                = aws_db_instance.main.address
    port                = aws_db_instance.main.port
    dagster_url         = "postgresql+psycopg2://${var.db_username}:${var.db_password}@${aws_db_instance.main.address}:${aws_db_instance.main.port}/${local.dagster_database}?sslmode=require"
    mlflow_tracking_uri = "postgresql+psycopg2://${var.db_username}:${var.db_password}@${aws_db_instance.main.address}:${aws_db_instance.main.port}/${local.mlflow_database}?sslmode=require"
  })
}

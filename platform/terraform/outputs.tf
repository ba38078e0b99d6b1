output "transactions_stream_name" {
  description = "Kinesis stream of transactions (STREAMGUARD_STREAM)."
  value       = aws_kinesis_stream.this["transactions"].name
}

output "weather_stream_name" {
  description = "Kinesis stream of weather readings (landed as JSON lines by Firehose)."
  value       = aws_kinesis_stream.this["weather"].name
}

output "weather_landing_uri" {
  description = "Where Firehose lands the weather readings."
  value       = "${local.lake_bucket_uri}/${var.weather_landing_prefix}"
}

output "msk_bootstrap_brokers_iam" {
  description = "MSK bootstrap servers for IAM authentication, port 9098 (STREAMGUARD_KAFKA_BOOTSTRAP with STREAMGUARD_KAFKA_SECURITY=msk_iam)."
  value       = aws_msk_cluster.main.bootstrap_brokers_sasl_iam
}

output "lake_bucket" {
  description = "Lake bucket: Delta tables under lake/, landed files under landing/, DMS output under the DMS folder."
  value       = aws_s3_bucket.data["lake"].id
}

output "lake_uri" {
  description = "Where the Delta tables go."
  value       = "${local.lake_bucket_uri}/${local.lake_prefix}"
}

output "mlflow_artifacts_uri" {
  description = "MLflow artifact root."
  value       = "s3://${aws_s3_bucket.data["mlflow"].id}/artifacts"
}

output "dms_dir" {
  description = "The DMS endpoint's folder: DmsConfig.dms_dir of the accounts CDC job and its sensor."
  value       = "${local.lake_bucket_uri}/${var.dms_bucket_folder}"
}

output "database_secret_arn" {
  description = "Secrets Manager secret with the Dagster storage URL (dagster_url) and the MLflow tracking URI (mlflow_tracking_uri)."
  value       = aws_secretsmanager_secret.database.arn
}

output "db_address" {
  description = "RDS PostgreSQL host."
  value       = aws_db_instance.main.address
}

output "code_location_role_arn" {
  description = "IAM role of the code-location task (sensors and runs)."
  value       = aws_iam_role.this["code_location"].arn
}

output "spark_role_arn" {
  description = "IAM role for Spark drivers and executors outside the code-location task."
  value       = aws_iam_role.this["spark"].arn
}

output "ecs_cluster_name" {
  description = "ECS cluster of the Dagster services."
  value       = aws_ecs_cluster.main.name
}

output "code_location_grpc" {
  description = "The code location's gRPC address inside the VPC."
  value       = "${local.code_location_host}:${local.code_location_port}"
}

output "kms_key_arn" {
  description = "The module's KMS key (streams, buckets, MSK, RDS, DMS, logs, secrets)."
  value       = aws_kms_key.main.arn
}

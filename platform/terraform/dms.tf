# The bank's accounts as change data: DMS reads PostgreSQL (full load, then ongoing changes) and
# writes CSV files to s3://<lake>/<dms_bucket_folder>/<schema>/<table>/: LOAD00000001.csv ...
# then change files named by time, each row starting with the Op column (I, U, D), a header
# row in every file. That is the layout streamguard.dms reads (assets.cdc, dms_files_sensor):
# DmsConfig(dms_dir="s3://<lake>/<dms_bucket_folder>", db_schema=..., table=...).

resource "aws_dms_replication_subnet_group" "main" {
  replication_subnet_group_id          = var.name
  replication_subnet_group_description = "${var.name} DMS replication instance subnets"
  subnet_ids                           = var.private_subnet_ids

  depends_on = [aws_iam_role_policy_attachment.dms_service]
}

resource "aws_dms_replication_instance" "main" {
  replication_instance_id     = var.name
  replication_instance_class  = var.dms_instance_class
  allocated_storage           = 50
  publicly_accessible         = false
  multi_az                    = false
  auto_minor_version_upgrade  = true
  kms_key_arn                 = aws_kms_key.main.arn
  replication_subnet_group_id = aws_dms_replication_subnet_group.main.id
  vpc_security_group_ids      = [aws_security_group.dms.id]

  depends_on = [aws_iam_role_policy_attachment.dms_service]
}

resource "aws_dms_endpoint" "source" {
  endpoint_id                     = "${var.name}-bank-source"
  endpoint_type                   = "source"
  engine_name                     = "postgres"
  database_name                   = var.dms_source_database
  secrets_manager_arn             = var.dms_source_secret_arn
  secrets_manager_access_role_arn = aws_iam_role.this["dms_secrets"].arn
  ssl_mode                        = "require"
  kms_key_arn                     = aws_kms_key.main.arn

  # Logical replication with test_decoding (needs no extension on the source); the heartbeat
  # keeps the replication slot's position moving while the bank's database is idle.
  postgres_settings {
    capture_ddls        = false
    heartbeat_enable    = true
    heartbeat_frequency = 5
    plugin_name         = "test-decoding"
  }
}

resource "aws_dms_s3_endpoint" "lake" {
  endpoint_id             = "${var.name}-lake-target"
  endpoint_type           = "target"
  bucket_name             = aws_s3_bucket.data["lake"].id
  bucket_folder           = var.dms_bucket_folder
  service_access_role_arn = aws_iam_role.this["dms_s3"].arn
  kms_key_arn             = aws_kms_key.main.arn

  # What streamguard.dms reads: CSV with a header row, Op on every row (full load too).
  data_format                       = "csv"
  add_column_name                   = true
  include_op_for_full_load          = true
  cdc_inserts_only                  = false
  cdc_inserts_and_updates           = false
  csv_delimiter                     = ","
  csv_row_delimiter                 = "\\n"
  compression_type                  = "NONE"
  date_partition_enabled            = false
  cdc_max_batch_interval            = 60
  cdc_min_file_size                 = 32000
  encryption_mode                   = "SSE_KMS"
  server_side_encryption_kms_key_id = aws_kms_key.main.arn
}

resource "aws_dms_replication_task" "accounts" {
  replication_task_id      = "${var.name}-bank-to-lake"
  migration_type           = "full-load-and-cdc"
  replication_instance_arn = aws_dms_replication_instance.main.replication_instance_arn
  source_endpoint_arn      = aws_dms_endpoint.source.endpoint_arn
  target_endpoint_arn      = aws_dms_s3_endpoint.lake.endpoint_arn
  start_replication_task   = var.start_dms_task

  table_mappings = jsonencode({
    rules = [
      for index, table in var.dms_source_tables : {
        rule-type   = "selection"
        rule-id     = tostring(index + 1)
        rule-name   = "include-${table}"
        rule-action = "include"
        object-locator = {
          schema-name = var.dms_source_schema
          table-name  = table
        }
      }
    ]
  })

  replication_task_settings = jsonencode({
    Logging = {
      EnableLogging = true
    }
    FullLoadSettings = {
      TargetTablePrepMode = "DO_NOTHING"
    }
  })
}

# The streams. Transactions are read by the code location (the sensor and the scoring runs, or
# the Spark job); weather readings are landed in the lake as files by Firehose (firehose.tf).

locals {
  streams = {
    transactions = {
      shard_count         = var.transactions_shard_count
      shard_level_metrics = ["IncomingRecords", "IteratorAgeMilliseconds", "ReadProvisionedThroughputExceeded"]
    }
    weather = {
      shard_count         = var.weather_shard_count
      shard_level_metrics = []
    }
  }
}

resource "aws_kinesis_stream" "this" {
  for_each         = local.streams
  name             = "${var.name}-${each.key}"
  shard_count      = each.value.shard_count
  retention_period = var.stream_retention_hours
  encryption_type  = "KMS"
  kms_key_id       = aws_kms_key.main.arn

  # Provisioned: the runner plans batches per shard, and shard counts are part of the capacity
  # plan (on-demand would reshard under load, which the runner follows but does not need).
  stream_mode_details {
    stream_mode = "PROVISIONED"
  }

  shard_level_metrics = each.value.shard_level_metrics
}

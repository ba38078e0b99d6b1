# Weather readings: Kinesis -> Firehose -> JSON lines files in the lake bucket, the files the
# weather job reads (one reading per line, `.jsonl`).

resource "aws_kinesis_firehose_delivery_stream" "weather" {
  #checkov:skip=CKV_AWS_240:Server-side encryption of a delivery stream applies only to DirectPut sources; this one reads a KMS-encrypted Kinesis stream and writes SSE-KMS objects
  #checkov:skip=CKV_AWS_241:Same as CKV_AWS_240: no Firehose-side encryption setting exists for a Kinesis-stream source; the stream and the bucket use the module's CMK
  name        = "${var.name}-weather-to-lake"
  destination = "extended_s3"

  kinesis_source_configuration {
    kinesis_stream_arn = aws_kinesis_stream.this["weather"].arn
    role_arn           = aws_iam_role.this["firehose"].arn
  }

  extended_s3_configuration {
    role_arn            = aws_iam_role.this["firehose"].arn
    bucket_arn          = aws_s3_bucket.data["lake"].arn
    prefix              = var.weather_landing_prefix
    error_output_prefix = "landing/errors/weather/!{firehose:error-output-type}/"
    buffering_size      = 5
    buffering_interval  = 60
    compression_format  = "UNCOMPRESSED"
    file_extension      = ".jsonl"
    kms_key_arn         = aws_kms_key.main.arn

    # One reading per line, whatever the producer sent.
    processing_configuration {
      enabled = true
      processors {
        type = "AppendDelimiterToRecord"
      }
    }

    cloudwatch_logging_options {
      enabled         = true
      log_group_name  = aws_cloudwatch_log_group.this["firehose"].name
      log_stream_name = "weather-to-lake"
    }
  }
}

resource "aws_cloudwatch_log_stream" "firehose" {
  name           = "weather-to-lake"
  log_group_name = aws_cloudwatch_log_group.this["firehose"].name
}

# The buckets: the lake (Delta tables, landed files, DMS output), MLflow's artifacts, and the
# access logs of both. Every bucket: versioned, encrypted, no public access, TLS only, owner
# enforced (no ACLs).
#
# The lake's Delta tables are written by delta-rs, which commits with S3 conditional writes
# (put-if-absent on the _delta_log entry); no DynamoDB lock table is needed or used.

locals {
  # The buckets that hold the project's data, configured alike: SSE-KMS with the module's key,
  # access logs into the log bucket (under their own prefix), old versions kept for a while.
  data_buckets = {
    lake   = { name = local.lake_bucket, log_prefix = "lake/" }
    mlflow = { name = local.mlflow_bucket, log_prefix = "mlflow/" }
  }

  # The lake's root, which the outputs' URIs (Delta tables, landing, DMS) start with.
  lake_bucket_uri = "s3://${aws_s3_bucket.data["lake"].id}"

  # Every bucket, the access-log bucket (below) included, for what they all share. Listed, not
  # merge(aws_s3_bucket.data, ...): checkov expands a for_each only over a map it can read,
  # and otherwise checks one unexpanded resource against the wrong buckets.
  buckets = {
    lake        = aws_s3_bucket.data["lake"]
    mlflow      = aws_s3_bucket.data["mlflow"]
    access_logs = aws_s3_bucket.access_logs
  }
}

# ---------------------------------------------------------------------------- every bucket

# What every bucket has, the access-log bucket included: versioning, no public access, owner
# enforced, and a policy that refuses plain HTTP.
resource "aws_s3_bucket_versioning" "this" {
  for_each = local.buckets
  bucket   = each.value.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_public_access_block" "this" {
  for_each                = local.buckets
  bucket                  = each.value.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "this" {
  for_each = local.buckets
  bucket   = each.value.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

data "aws_iam_policy_document" "tls_only" {
  for_each = local.buckets

  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [each.value.arn, "${each.value.arn}/*"]
    principals {
      type        = "AWS"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

# ---------------------------------------------------------------------------- lake and MLflow

resource "aws_s3_bucket" "data" {
  #checkov:skip=CKV_AWS_144:Cross-region replication is a disaster-recovery choice (second region, its own key and cost); versioning keeps every overwritten object here, and models can be retrained from the lake
  #checkov:skip=CKV2_AWS_62:No consumer for S3 event notifications: the Dagster sensors list the lake's prefixes themselves and record what they saw, and nothing reacts to model artifacts
  for_each = local.data_buckets
  bucket   = each.value.name
}

resource "aws_s3_bucket_server_side_encryption_configuration" "data" {
  for_each = local.data_buckets
  bucket   = aws_s3_bucket.data[each.key].id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.main.arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_logging" "data" {
  for_each      = local.data_buckets
  bucket        = aws_s3_bucket.data[each.key].id
  target_bucket = aws_s3_bucket.access_logs.id
  target_prefix = each.value.log_prefix
}

resource "aws_s3_bucket_lifecycle_configuration" "data" {
  for_each = local.data_buckets
  bucket   = aws_s3_bucket.data[each.key].id

  rule {
    id     = "noncurrent-versions-and-incomplete-uploads"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_retention_days
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }
}

resource "aws_s3_bucket_policy" "data" {
  for_each = local.data_buckets
  bucket   = aws_s3_bucket.data[each.key].id
  policy   = data.aws_iam_policy_document.tls_only[each.key].json
}

# ---------------------------------------------------------------------------- access logs

# Its own resources where it differs from the data buckets: SSE-S3 (the only encryption S3
# access logging delivers to), no access logging of itself, objects that expire, and a policy
# that lets the logging service write.

resource "aws_s3_bucket" "access_logs" {
  #checkov:skip=CKV_AWS_18:This is the access-log bucket; logging it into itself would loop
  #checkov:skip=CKV_AWS_144:Access logs are audit copies; replicate them with the account's central log archive if required
  #checkov:skip=CKV2_AWS_62:No consumer for notifications about log objects
  #checkov:skip=CKV_AWS_145:S3 server access logging can only deliver to SSE-S3 (AES256) buckets, not SSE-KMS
  bucket = local.logs_bucket
}

resource "aws_s3_bucket_server_side_encryption_configuration" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id

  rule {
    id     = "expire-access-logs"
    status = "Enabled"
    filter {}
    expiration {
      days = var.log_retention_days
    }
    noncurrent_version_expiration {
      noncurrent_days = 7
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }
}

resource "aws_s3_bucket_policy" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id
  policy = data.aws_iam_policy_document.access_logs.json
}

# With BucketOwnerEnforced, the logging service writes under a bucket policy (not ACLs).
data "aws_iam_policy_document" "access_logs" {
  source_policy_documents = [data.aws_iam_policy_document.tls_only["access_logs"].json]

  statement {
    sid       = "S3ServerAccessLogsFromThisModulesBuckets"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.access_logs.arn}/*"]
    principals {
      type        = "Service"
      identifiers = ["logging.s3.amazonaws.com"]
    }
    condition {
      test     = "ArnLike"
      variable = "aws:SourceArn"
      values   = [for bucket in aws_s3_bucket.data : bucket.arn]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

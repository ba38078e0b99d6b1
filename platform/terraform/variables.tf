# ---------------------------------------------------------------------------- deployment

variable "name" {
  description = "Prefix of every resource name (streams, buckets, roles, cluster, services)."
  type        = string
  default     = "streamguard"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{2,20}$", var.name))
    error_message = "name: 3-21 lower-case letters, digits and dashes, starting with a letter (it is part of bucket names)."
  }
}

variable "region" {
  description = "AWS region of every resource."
  type        = string
  default     = "us-east-1"
}

variable "tags" {
  description = "Tags added to every resource (on top of Project and ManagedBy)."
  type        = map(string)
  default     = {}
}

# ---------------------------------------------------------------------------- network

variable "vpc_id" {
  description = "VPC that holds MSK, RDS, DMS and the ECS services."
  type        = string
}

variable "private_subnet_ids" {
  description = "Private subnets in at least two availability zones (RDS, MSK brokers, DMS, ECS tasks). They need a route to AWS APIs and ECR (NAT gateway or VPC endpoints)."
  type        = list(string)

  validation {
    condition     = length(var.private_subnet_ids) >= 2
    error_message = "private_subnet_ids: at least two subnets, in different availability zones."
  }
}

variable "webserver_allowed_cidrs" {
  description = "CIDR blocks that may reach the Dagster webserver on port 3000 (a VPN or bastion range). Empty: nobody; the webserver has no authentication of its own, so never open it to the internet."
  type        = list(string)
  default     = []
}

# ---------------------------------------------------------------------------- streams

variable "transactions_shard_count" {
  description = "Shards of the transactions Kinesis stream (1 MB/s or 1,000 records/s of writes each)."
  type        = number
  default     = 2
}

variable "weather_shard_count" {
  description = "Shards of the weather readings Kinesis stream."
  type        = number
  default     = 1
}

variable "stream_retention_hours" {
  description = "Kinesis retention. The runner replays exact sequence ranges after a failure, so keep it well above the longest outage you want to recover from without loss (24-8760)."
  type        = number
  default     = 168

  validation {
    condition     = var.stream_retention_hours >= 24 && var.stream_retention_hours <= 8760
    error_message = "stream_retention_hours must be between 24 and 8760."
  }
}

variable "kafka_transactions_topic" {
  description = "Kafka topic the transactions arrive on (STREAMGUARD_KAFKA_TOPIC); the code location may read it."
  type        = string
  default     = "transactions"
}

variable "kafka_alerts_topic" {
  description = "Kafka topic the alerts are published to (STREAMGUARD_ALERTS_TOPIC)."
  type        = string
  default     = "fraud-alerts"
}

variable "msk_kafka_version" {
  description = "Apache Kafka version of the MSK cluster."
  type        = string
  default     = "3.6.0"
}

variable "msk_instance_type" {
  description = "Broker instance type of the MSK cluster."
  type        = string
  default     = "kafka.m7g.large"
}

variable "msk_brokers_per_subnet" {
  description = "MSK brokers per private subnet (the broker count is this times the number of subnets)."
  type        = number
  default     = 1
}

variable "msk_volume_size_gb" {
  description = "EBS storage per MSK broker, in GiB."
  type        = number
  default     = 100
}

# ---------------------------------------------------------------------------- lake

variable "noncurrent_version_retention_days" {
  description = "Days an overwritten or deleted S3 object version is kept (the lake's vacuum and MLflow deletions become recoverable for this long)."
  type        = number
  default     = 30
}

variable "weather_landing_prefix" {
  description = "Prefix in the lake bucket where Firehose lands the weather readings as JSON lines."
  type        = string
  default     = "landing/weather/"
}

# ---------------------------------------------------------------------------- DMS

variable "dms_source_secret_arn" {
  description = "Secrets Manager secret holding the bank database's DMS credentials (JSON with username, password, host, port, as DMS expects). Created by the database owner, never in this module."
  type        = string
}

variable "dms_source_secret_kms_key_arn" {
  description = "KMS key that encrypts dms_source_secret_arn, when it is a customer-managed key (null: the AWS-managed key)."
  type        = string
  default     = null
}

variable "dms_source_database" {
  description = "Name of the bank's PostgreSQL database that DMS reads."
  type        = string
  default     = "bank"
}

variable "dms_source_schema" {
  description = "Schema DMS replicates (the folder under the DMS prefix; assets.cdc DmsConfig.db_schema)."
  type        = string
  default     = "bank"
}

variable "dms_source_tables" {
  description = "Tables of dms_source_schema that DMS replicates (assets.cdc DmsConfig.table reads one of them)."
  type        = list(string)
  default     = ["accounts"]
}

variable "dms_source_cidr_blocks" {
  description = "CIDR blocks of the bank database, which the DMS replication instance connects to on port 5432."
  type        = list(string)
}

variable "dms_bucket_folder" {
  description = "Prefix in the lake bucket where DMS writes (the endpoint's BucketFolder; DmsConfig.dms_dir is s3://<lake bucket>/<this>)."
  type        = string
  default     = "dms"
}

variable "dms_instance_class" {
  description = "DMS replication instance class."
  type        = string
  default     = "dms.t3.medium"
}

variable "create_dms_service_roles" {
  description = "Create the account-wide roles DMS requires (dms-vpc-role, dms-cloudwatch-logs-role). Set false when the account already has them."
  type        = bool
  default     = true
}

variable "start_dms_task" {
  description = "Start the DMS replication task after creating it (full load, then ongoing changes)."
  type        = bool
  default     = false
}

# ---------------------------------------------------------------------------- RDS

variable "db_password" {
  description = "Master password of the RDS PostgreSQL instance for Dagster and MLflow. Pass it as TF_VAR_db_password from your secret store; it is copied into a Secrets Manager secret that the ECS tasks read. Letters and digits only, so it can sit in a URL unescaped."
  type        = string
  sensitive   = true

  validation {
    condition     = can(regex("^[A-Za-z0-9]{20,128}$", var.db_password))
    error_message = "db_password: 20-128 letters and digits."
  }
}

variable "db_username" {
  description = "Master user name of the RDS PostgreSQL instance."
  type        = string
  default     = "streamguard"

  validation {
    condition     = can(regex("^[a-z][a-z0-9_]{0,62}$", var.db_username))
    error_message = "db_username: lower-case letters, digits and underscores, starting with a letter."
  }
}

variable "db_instance_class" {
  description = "RDS instance class."
  type        = string
  default     = "db.t4g.medium"
}

variable "db_engine_version" {
  description = "PostgreSQL major version of the RDS instance."
  type        = string
  default     = "16"
}

variable "db_allocated_storage_gb" {
  description = "RDS storage, in GiB (autoscaling up to four times this)."
  type        = number
  default     = 50
}

variable "db_multi_az" {
  description = "Run RDS with a standby in a second availability zone."
  type        = bool
  default     = true
}

variable "db_backup_retention_days" {
  description = "Days of RDS automated backups."
  type        = number
  default     = 14
}

# ---------------------------------------------------------------------------- ECS

variable "image" {
  description = "Code-location image (the repository's Dockerfile), e.g. <account>.dkr.ecr.<region>.amazonaws.com/streamguard:<git sha>. Pin a tag or digest, never latest."
  type        = string
}

variable "code_location_cpu" {
  description = "Fargate CPU units of the code-location task (runs execute in it)."
  type        = number
  default     = 2048
}

variable "code_location_memory" {
  description = "Fargate memory (MiB) of the code-location task."
  type        = number
  default     = 8192
}

variable "log_retention_days" {
  description = "Days CloudWatch keeps the container and service logs."
  type        = number
  default     = 365
}

variable "kafka_client_security_group_ids" {
  description = "Extra security groups (e.g. a Spark cluster's) allowed to reach the MSK brokers on the IAM port."
  type        = list(string)
  default     = []
}

variable "spark_trusted_services" {
  description = "AWS services that may assume the Spark jobs' role (where the Spark driver and executors run)."
  type        = list(string)
  default     = ["ecs-tasks.amazonaws.com"]
}

# Terraform and provider versions this module is written against.
#
# Not applied here: the provider cannot be downloaded on the machine this module was written on,
# so only `terraform fmt`, checkov and the moto drift test (tests/test_terraform.py) ran. Run
# `terraform init && terraform validate && terraform plan` before the first apply.
terraform {
  required_version = ">= 1.5.0"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # 5.80: aws_dms_s3_endpoint, Firehose file_extension and AppendDelimiterToRecord, MSK
      # cluster_uuid; < 7: the next major may rename arguments used here.
      version = ">= 5.80, < 7.0"
    }
  }

  # State holds the database password (sensitive, but in clear in the state file): keep it in an
  # encrypted, access-controlled backend, e.g.
  # backend "s3" { bucket = "...", key = "streamguard/terraform.tfstate", encrypt = true, use_lockfile = true }
}

provider "aws" {
  region = var.region

  default_tags {
    tags = merge({ Project = var.name, ManagedBy = "terraform" }, var.tags)
  }
}

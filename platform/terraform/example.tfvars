# An example of the values a deployment sets (copy to prod.tfvars and edit). The database
# password is not here: export TF_VAR_db_password from your secret store.
name   = "streamguard"
region = "us-east-1"

vpc_id             = "vpc-0123456789abcdef0"
private_subnet_ids = ["subnet-0aaaaaaaaaaaaaaa1", "subnet-0bbbbbbbbbbbbbbb2"]

# Who may open the Dagster UI (a VPN range); empty: nobody.
webserver_allowed_cidrs = ["10.8.0.0/16"]

# The image built from the repository's Dockerfile, by tag or digest.
image = "123456789012.dkr.ecr.us-east-1.amazonaws.com/streamguard:0123abc"

# The bank's database, which DMS reads (its secret holds username, password, host, port).
dms_source_secret_arn  = "arn:aws:secretsmanager:us-east-1:123456789012:secret:bank/dms-source-AbCdEf"
dms_source_cidr_blocks = ["10.20.0.0/16"]
dms_source_database    = "bank"
dms_source_schema      = "bank"
dms_source_tables      = ["accounts"]

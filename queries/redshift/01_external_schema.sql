-- The lake's tables as Redshift Spectrum reads them: the Glue database sluice registers them in
-- ([catalog] kind = "glue"). :glue_database and :iam_role come from sluice.toml.
CREATE EXTERNAL SCHEMA IF NOT EXISTS lake
FROM DATA CATALOG DATABASE :glue_database
IAM_ROLE :iam_role
CREATE EXTERNAL DATABASE IF NOT EXISTS;

-- Targets of `load = "copy"` (load_into = "analytics.{table}_staging") and of the procedures.
-- COPY ... FORMAT AS PARQUET matches columns by position: a staging table has the columns of
-- the Parquet files in file order. Partition columns (event_date) live in the path, not in the
-- files: the procedures derive them.
CREATE SCHEMA IF NOT EXISTS analytics;

CREATE TABLE IF NOT EXISTS analytics.support_tickets_staging (
  ticket_id VARCHAR(256),
  created_ts TIMESTAMP,
  updated_ts TIMESTAMP,
  status VARCHAR(64),
  priority VARCHAR(64),
  customer_email VARCHAR(512),
  subject VARCHAR(4096),
  body VARCHAR(65535),
  agent_id VARCHAR(256),
  _sluice_source VARCHAR(1024)
);

CREATE TABLE IF NOT EXISTS analytics.support_tickets (
  ticket_id VARCHAR(256),
  created_ts TIMESTAMP,
  updated_ts TIMESTAMP,
  status VARCHAR(64),
  priority VARCHAR(64),
  customer_email VARCHAR(512),
  subject VARCHAR(4096),
  body VARCHAR(65535),
  agent_id VARCHAR(256),
  _sluice_source VARCHAR(1024),
  event_date DATE
)
DISTKEY (ticket_id)
SORTKEY (event_date);

CREATE TABLE IF NOT EXISTS analytics.app_logs_staging (
  event_ts TIMESTAMP,
  log_level VARCHAR(16),
  service_name VARCHAR(256),
  hostname VARCHAR(256),
  request_id VARCHAR(256),
  latency_ms DOUBLE PRECISION,
  message VARCHAR(65535),
  user_id VARCHAR(256),
  _sluice_source VARCHAR(1024)
);

CREATE TABLE IF NOT EXISTS analytics.app_logs (
  event_ts TIMESTAMP,
  log_level VARCHAR(16),
  service_name VARCHAR(256),
  hostname VARCHAR(256),
  request_id VARCHAR(256),
  latency_ms DOUBLE PRECISION,
  message VARCHAR(65535),
  user_id VARCHAR(256),
  _sluice_source VARCHAR(1024),
  event_date DATE
)
DISTKEY (request_id)
SORTKEY (event_date);

-- The embedded warehouse's aggregates (queries/aggregates/), kept by the procedures.
CREATE TABLE IF NOT EXISTS analytics.daily_ticket_stats (
  event_date DATE,
  status VARCHAR(64),
  tickets BIGINT,
  avg_hours_open DOUBLE PRECISION,
  customers BIGINT
)
SORTKEY (event_date);

CREATE TABLE IF NOT EXISTS analytics.daily_service_health (
  event_date DATE,
  service_name VARCHAR(256),
  requests BIGINT,
  errors BIGINT,
  error_rate DOUBLE PRECISION,
  avg_latency_ms DOUBLE PRECISION,
  max_latency_ms DOUBLE PRECISION,
  users BIGINT
)
SORTKEY (event_date);

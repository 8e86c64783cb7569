-- PostgreSQL (or any server on the PostgreSQL wire) as the warehouse: targets of
-- `load = "copy"` (load_into = "analytics.{table}_staging") and of the procedures. Binary COPY
-- matches columns by name; partition columns (event_date) are loaded where the target has them.
CREATE SCHEMA IF NOT EXISTS analytics;

CREATE TABLE IF NOT EXISTS analytics.support_tickets_staging (
  ticket_id text,
  created_ts timestamp,
  updated_ts timestamp,
  status text,
  priority text,
  customer_email text,
  subject text,
  body text,
  agent_id text,
  _sluice_source text
);

CREATE TABLE IF NOT EXISTS analytics.support_tickets (
  ticket_id text PRIMARY KEY,
  created_ts timestamp,
  updated_ts timestamp,
  status text,
  priority text,
  customer_email text,
  subject text,
  body text,
  agent_id text,
  _sluice_source text,
  event_date date
);

CREATE TABLE IF NOT EXISTS analytics.app_logs_staging (
  event_ts timestamp,
  log_level text,
  service_name text,
  hostname text,
  request_id text,
  latency_ms double precision,
  message text,
  user_id text,
  _sluice_source text
);

CREATE TABLE IF NOT EXISTS analytics.app_logs (
  event_ts timestamp,
  log_level text,
  service_name text,
  hostname text,
  request_id text PRIMARY KEY,
  latency_ms double precision,
  message text,
  user_id text,
  _sluice_source text,
  event_date date
);

-- The embedded warehouse's aggregates (queries/aggregates/), kept by the procedures.
CREATE TABLE IF NOT EXISTS analytics.daily_ticket_stats (
  event_date date,
  status text,
  tickets bigint,
  avg_hours_open double precision,
  customers bigint
);

CREATE TABLE IF NOT EXISTS analytics.daily_service_health (
  event_date date,
  service_name text,
  requests bigint,
  errors bigint,
  error_rate double precision,
  avg_latency_ms double precision,
  max_latency_ms double precision,
  users bigint
);

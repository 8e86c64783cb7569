-- app_logs, the benchmark's typed variant: `ts` arrives as a timestamp (the reader rejects
-- values that are not one), so only what is left is typed here.
-- Invalid rows get a _reject_reason (they go to rejected/app_logs/); dedup (one row per
-- request_id, the latest event_ts) is the table's unique_key/order_by in sluice.toml.
WITH typed AS (
  SELECT
    ts AS event_ts,
    CASE lower(trim(level)) WHEN 'warning' THEN 'warn' ELSE lower(trim(level)) END AS log_level,
    service AS service_name,
    lower(host) AS hostname,
    request_id,
    TRY_CAST(latency_ms AS DOUBLE) AS latency_ms,
    message,
    user_id,
    level AS raw_level,
    latency_ms AS raw_latency,
    _source_file,
    _source_row
  FROM app_logs
)
SELECT
  event_ts,
  log_level,
  service_name,
  hostname,
  request_id,
  latency_ms,
  message,
  user_id,
  CAST(event_ts AS DATE) AS event_date,
  CASE
    WHEN request_id IS NULL THEN 'missing request_id'
    WHEN service_name IS NULL THEN 'missing service'
    WHEN event_ts IS NULL THEN 'missing ts'
    WHEN log_level IS NULL THEN 'missing level'
    WHEN log_level NOT IN ('debug', 'info', 'warn', 'error', 'fatal')
      THEN 'unknown level: ' || raw_level
    WHEN latency_ms IS NULL THEN 'invalid latency_ms: ' || coalesce(raw_latency, 'null')
    WHEN latency_ms < 0 THEN 'negative latency_ms: ' || raw_latency
  END AS _reject_reason,
  _source_file,
  _source_row
FROM typed

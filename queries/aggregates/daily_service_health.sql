-- Daily error rate and latency per service.
SELECT
  event_date,
  service_name,
  count(*) AS requests,
  sum(CASE WHEN log_level IN ('error', 'fatal') THEN 1 ELSE 0 END) AS errors,
  CAST(sum(CASE WHEN log_level IN ('error', 'fatal') THEN 1 ELSE 0 END) AS DOUBLE)
    / count(*) AS error_rate,
  avg(latency_ms) AS avg_latency_ms,
  max(latency_ms) AS max_latency_ms,
  count(DISTINCT user_id) AS users
FROM app_logs
GROUP BY event_date, service_name
ORDER BY event_date, service_name

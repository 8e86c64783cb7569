-- The aggregation procedures sluice calls after each load (call = [...] in sluice.toml). Each
-- merges its staging table into the full table (the latest row per key wins, as in the lake),
-- then rebuilds the aggregate for the days whose rows changed. sluice runs each call in one
-- transaction with its marker row, so a procedure must not COMMIT itself.
CREATE OR REPLACE PROCEDURE analytics.sp_build_daily_ticket_stats(run_date date)
LANGUAGE plpgsql
AS $$
BEGIN
  CREATE TEMP TABLE changed_days AS
    SELECT DISTINCT CAST(created_ts AS date) AS event_date FROM analytics.support_tickets_staging
    UNION
    SELECT t.event_date FROM analytics.support_tickets t
    JOIN analytics.support_tickets_staging s ON t.ticket_id = s.ticket_id;
  DELETE FROM analytics.support_tickets t
    USING analytics.support_tickets_staging s
    WHERE t.ticket_id = s.ticket_id;
  INSERT INTO analytics.support_tickets
    SELECT ticket_id, created_ts, updated_ts, status, priority, customer_email, subject, body,
           agent_id, _sluice_source, CAST(created_ts AS date)
    FROM (
      SELECT s.*, row_number() OVER (PARTITION BY ticket_id ORDER BY updated_ts DESC) AS n
      FROM analytics.support_tickets_staging s
    ) latest
    WHERE n = 1;
  DELETE FROM analytics.support_tickets_staging;
  DELETE FROM analytics.daily_ticket_stats WHERE event_date IN (SELECT event_date FROM changed_days);
  INSERT INTO analytics.daily_ticket_stats
    SELECT event_date,
           status,
           count(*),
           avg(CAST(extract(epoch FROM updated_ts - created_ts) AS double precision)) / 3600.0,
           count(DISTINCT customer_email)
    FROM analytics.support_tickets
    WHERE event_date IN (SELECT event_date FROM changed_days)
    GROUP BY event_date, status;
  DROP TABLE changed_days;
  RAISE INFO 'daily_ticket_stats rebuilt for run date %', run_date;
END;
$$;

CREATE OR REPLACE PROCEDURE analytics.sp_build_daily_service_health(run_date date)
LANGUAGE plpgsql
AS $$
BEGIN
  CREATE TEMP TABLE changed_days AS
    SELECT DISTINCT CAST(event_ts AS date) AS event_date FROM analytics.app_logs_staging
    UNION
    SELECT t.event_date FROM analytics.app_logs t
    JOIN analytics.app_logs_staging s ON t.request_id = s.request_id;
  DELETE FROM analytics.app_logs t
    USING analytics.app_logs_staging s
    WHERE t.request_id = s.request_id;
  INSERT INTO analytics.app_logs
    SELECT event_ts, log_level, service_name, hostname, request_id, latency_ms, message, user_id,
           _sluice_source, CAST(event_ts AS date)
    FROM (
      SELECT s.*, row_number() OVER (PARTITION BY request_id ORDER BY event_ts DESC) AS n
      FROM analytics.app_logs_staging s
    ) latest
    WHERE n = 1;
  DELETE FROM analytics.app_logs_staging;
  DELETE FROM analytics.daily_service_health WHERE event_date IN (SELECT event_date FROM changed_days);
  INSERT INTO analytics.daily_service_health
    SELECT event_date,
           service_name,
           count(*),
           sum(CASE WHEN log_level IN ('error', 'fatal') THEN 1 ELSE 0 END),
           CAST(sum(CASE WHEN log_level IN ('error', 'fatal') THEN 1 ELSE 0 END) AS double precision)
             / count(*),
           avg(latency_ms),
           max(latency_ms),
           count(DISTINCT user_id)
    FROM analytics.app_logs
    WHERE event_date IN (SELECT event_date FROM changed_days)
    GROUP BY event_date, service_name;
  DROP TABLE changed_days;
  RAISE INFO 'daily_service_health rebuilt for run date %', run_date;
END;
$$;

-- The aggregation procedures sluice calls after each load (call = [...] in sluice.toml). Each
-- merges its staging table into the full table (the latest row per key wins, as in the lake),
-- then rebuilds the aggregate for the days whose rows changed. Everything runs in the call's
-- transaction: no TRUNCATE (it would commit half-way).
CREATE OR REPLACE PROCEDURE analytics.sp_build_daily_ticket_stats(run_date DATE)
AS $$
BEGIN
  CREATE TEMP TABLE changed_days AS
    SELECT DISTINCT CAST(created_ts AS DATE) AS event_date FROM analytics.support_tickets_staging
    UNION
    SELECT t.event_date FROM analytics.support_tickets t
    JOIN analytics.support_tickets_staging s ON t.ticket_id = s.ticket_id;
  DELETE FROM analytics.support_tickets
    USING analytics.support_tickets_staging s
    WHERE analytics.support_tickets.ticket_id = s.ticket_id;
  INSERT INTO analytics.support_tickets
    SELECT ticket_id, created_ts, updated_ts, status, priority, customer_email, subject, body,
           agent_id, _sluice_source, CAST(created_ts AS DATE)
    FROM (
      SELECT s.*, ROW_NUMBER() OVER (PARTITION BY ticket_id ORDER BY updated_ts DESC) AS n
      FROM analytics.support_tickets_staging s
    ) latest
    WHERE n = 1;
  DELETE FROM analytics.support_tickets_staging;
  DELETE FROM analytics.daily_ticket_stats WHERE event_date IN (SELECT event_date FROM changed_days);
  INSERT INTO analytics.daily_ticket_stats
    SELECT event_date,
           status,
           COUNT(*),
           AVG(CAST(DATEDIFF(microsecond, created_ts, updated_ts) AS DOUBLE PRECISION)) / 1e6 / 3600.0,
           COUNT(DISTINCT customer_email)
    FROM analytics.support_tickets
    WHERE event_date IN (SELECT event_date FROM changed_days)
    GROUP BY event_date, status;
  DROP TABLE changed_days;
  RAISE INFO 'daily_ticket_stats rebuilt for run date %', run_date;
END;
$$ LANGUAGE plpgsql;

CREATE OR REPLACE PROCEDURE analytics.sp_build_daily_service_health(run_date DATE)
AS $$
BEGIN
  CREATE TEMP TABLE changed_days AS
    SELECT DISTINCT CAST(event_ts AS DATE) AS event_date FROM analytics.app_logs_staging
    UNION
    SELECT t.event_date FROM analytics.app_logs t
    JOIN analytics.app_logs_staging s ON t.request_id = s.request_id;
  DELETE FROM analytics.app_logs
    USING analytics.app_logs_staging s
    WHERE analytics.app_logs.request_id = s.request_id;
  INSERT INTO analytics.app_logs
    SELECT event_ts, log_level, service_name, hostname, request_id, latency_ms, message, user_id,
           _sluice_source, CAST(event_ts AS DATE)
    FROM (
      SELECT s.*, ROW_NUMBER() OVER (PARTITION BY request_id ORDER BY event_ts DESC) AS n
      FROM analytics.app_logs_staging s
    ) latest
    WHERE n = 1;
  DELETE FROM analytics.app_logs_staging;
  DELETE FROM analytics.daily_service_health WHERE event_date IN (SELECT event_date FROM changed_days);
  INSERT INTO analytics.daily_service_health
    SELECT event_date,
           service_name,
           COUNT(*),
           SUM(CASE WHEN log_level IN ('error', 'fatal') THEN 1 ELSE 0 END),
           CAST(SUM(CASE WHEN log_level IN ('error', 'fatal') THEN 1 ELSE 0 END) AS DOUBLE PRECISION)
             / COUNT(*),
           AVG(latency_ms),
           MAX(latency_ms),
           COUNT(DISTINCT user_id)
    FROM analytics.app_logs
    WHERE event_date IN (SELECT event_date FROM changed_days)
    GROUP BY event_date, service_name;
  DROP TABLE changed_days;
  RAISE INFO 'daily_service_health rebuilt for run date %', run_date;
END;
$$ LANGUAGE plpgsql;

-- Daily ticket statistics: tickets per day and status, hours from creation to last update,
-- distinct customers.
SELECT
  event_date,
  status,
  count(*) AS tickets,
  avg(date_part('epoch', updated_ts) - date_part('epoch', created_ts)) / 3600.0 AS avg_hours_open,
  count(DISTINCT customer_email) AS customers
FROM support_tickets
GROUP BY event_date, status
ORDER BY event_date, status

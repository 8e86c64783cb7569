-- support_tickets, the benchmark's typed variant: both times arrive as timestamps.
-- Invalid rows get a _reject_reason (they go to rejected/support_tickets/); dedup (one row per
-- ticket_id, the latest updated_ts) is the table's unique_key/order_by in sluice.toml.
WITH typed AS (
  SELECT
    nullif(trim(ticket_id), '') AS ticket_id,
    created_at AS created_ts,
    updated_at AS updated_ts,
    replace(lower(trim(status)), ' ', '_') AS status,
    lower(priority) AS priority,
    lower(customer_email) AS customer_email,
    subject,
    body,
    nullif(agent, '') AS agent_id,
    status AS raw_status,
    _source_file,
    _source_row
  FROM support_tickets
)
SELECT
  ticket_id,
  created_ts,
  updated_ts,
  status,
  priority,
  customer_email,
  subject,
  body,
  agent_id,
  CAST(created_ts AS DATE) AS event_date,
  CASE
    WHEN ticket_id IS NULL THEN 'missing ticket_id'
    WHEN created_ts IS NULL THEN 'missing created_at'
    WHEN updated_ts IS NULL THEN 'missing updated_at'
    WHEN status IS NULL THEN 'missing status'
    WHEN status NOT IN ('open', 'pending', 'in_progress', 'resolved', 'closed')
      THEN 'unknown status: ' || raw_status
  END AS _reject_reason,
  _source_file,
  _source_row
FROM typed

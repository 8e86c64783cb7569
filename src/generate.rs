//! `sluice generate`: the benchmark workload's raw data (application logs as JSON lines, support
//! tickets as CSV) with the same kinds and rates of dirt as the shared `gen.py`, so the project
//! benchmarks itself without Python. Deterministic: the bytes depend on kind, rows and seed.

use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;

use chrono::{DateTime, Duration, TimeZone, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// The header line of the tickets CSV.
const TICKETS_HEADER: &str =
    "ticket_id,created_at,updated_at,status,priority,customer_email,subject,body,agent\n";
/// Rows generated per parallel chunk.
const CHUNK: usize = 100_000;
/// Events are spread over this many seconds (30 days).
const SPAN_S: f64 = 30.0 * 86_400.0;

/// Which dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// JSON-lines application logs.
    Logs,
    /// CSV support tickets.
    Tickets,
}

impl Kind {
    /// The default number of base rows (as gen.py: about 1.08 GB and 0.5 GB).
    pub fn default_rows(self) -> usize {
        match self {
            Kind::Logs => 3_700_000,
            Kind::Tickets => 1_300_000,
        }
    }
}

fn epoch0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 3, 1, 0, 0, 0)
        .single()
        .unwrap_or_default()
}

const SERVICES: [&str; 10] = [
    "checkout",
    "payments",
    "search",
    "auth",
    "inventory",
    "gateway",
    "notifications",
    "profile",
    "recommendations",
    "shipping",
];
const LEVELS: [(&str, f64); 14] = [
    ("INFO", 30.0),
    ("info", 25.0),
    ("Info", 5.0),
    ("DEBUG", 8.0),
    ("debug", 7.0),
    ("WARN", 6.0),
    ("warn", 4.0),
    ("Warn", 2.0),
    ("WARNING", 2.0),
    ("ERROR", 4.0),
    ("error", 3.0),
    ("Error", 1.0),
    ("FATAL", 0.3),
    (" info ", 0.5),
];
const PATHS: [&str; 9] = [
    "/api/v1/orders",
    "/api/v1/cart",
    "/api/v2/search",
    "/login",
    "/api/v1/users",
    "/api/v1/payments/charge",
    "/healthz",
    "/api/v1/items",
    "/api/v1/shipments",
];
const VERBS: [&str; 4] = ["GET", "POST", "PUT", "DELETE"];
const WORDS: [&str; 27] = [
    "cache",
    "miss",
    "upstream",
    "timeout",
    "retry",
    "connection",
    "pool",
    "exhausted",
    "slow",
    "query",
    "user",
    "session",
    "refreshed",
    "token",
    "expired",
    "rate",
    "limit",
    "exceeded",
    "backend",
    "unavailable",
    "circuit",
    "breaker",
    "open",
    "payload",
    "too",
    "large",
    "invalid",
];
const TZS: [(&str, i64); 7] = [
    ("Z", 0),
    ("+00:00", 0),
    ("+02:00", 120),
    ("-05:00", -300),
    ("+05:30", 330),
    ("-08:00", -480),
    ("+09:00", 540),
];
const BAD_TS: [&str; 7] = [
    "not-a-timestamp",
    "",
    "2024-13-45T99:61:00Z",
    "03/05/2024 12:34:56",
    "2024-03-0",
    "yesterday",
    "1709251200",
];

fn weighted<'a>(r: &mut StdRng, items: &[(&'a str, f64)]) -> &'a str {
    let total: f64 = items.iter().map(|(_, w)| w).sum();
    let mut x = r.random::<f64>() * total;
    for (v, w) in items {
        if x < *w {
            return v;
        }
        x -= w;
    }
    items[items.len() - 1].0
}

fn pick<'a>(r: &mut StdRng, items: &[&'a str]) -> &'a str {
    items[r.random_range(0..items.len())]
}

fn uuid(r: &mut StdRng) -> String {
    let h = format!("{:032x}", r.random::<u128>());
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..]
    )
}

fn fmt_ts(r: &mut StdRng, epoch_s: f64) -> String {
    if r.random::<f64>() < 0.01 {
        return pick(r, &BAD_TS).to_string();
    }
    let t = epoch0() + Duration::microseconds((epoch_s * 1e6) as i64);
    let u = r.random::<f64>();
    if u < 0.55 {
        return t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
    }
    if u < 0.85 {
        let (suffix, off) = TZS[r.random_range(0..TZS.len())];
        let local = t + Duration::minutes(off);
        return if r.random::<bool>() {
            format!("{}{suffix}", local.format("%Y-%m-%dT%H:%M:%S%.6f"))
        } else {
            format!("{}{suffix}", local.format("%Y-%m-%dT%H:%M:%S"))
        };
    }
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

fn json_str(out: &mut String, s: &str) {
    // serde_json escapes exactly what JSON needs.
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into()));
}

/// One log line (without newline) and its event time.
fn log_row(
    r: &mut StdRng,
    i: usize,
    n: usize,
    rid: Option<&str>,
    svc: Option<&str>,
    epoch: Option<f64>,
) -> (String, f64, String, String) {
    let epoch_s = epoch.unwrap_or_else(|| (i as f64 / n as f64) * SPAN_S + r.random::<f64>() * 2.0);
    let ts = fmt_ts(r, epoch_s);
    let u = r.random::<f64>();
    let level = if u < 0.005 {
        None
    } else if u < 0.006 {
        Some(pick(r, &["verbose", "???", "LVL5"]))
    } else {
        Some(weighted(r, &LEVELS))
    };
    let service = svc
        .map(str::to_string)
        .unwrap_or_else(|| pick(r, &SERVICES).to_string());
    let host = format!(
        "{service}-{:02}.{}.internal",
        r.random_range(1..25),
        if r.random::<f64>() < 0.1 {
            "PROD"
        } else {
            "prod"
        }
    );
    let lat_i = (-(1.0 - r.random::<f64>()).ln() * 80.0) as i64 + 1;
    let u = r.random::<f64>();
    let latency = if u < 0.005 {
        pick(r, &["-1", "-250", "\"n/a\"", "\"\"", "\"NaNms\"", "\"-3\""]).to_string()
    } else if u < 0.70 {
        lat_i.to_string()
    } else if u < 0.92 {
        format!("\"{lat_i}\"")
    } else {
        format!(
            "{}",
            lat_i as f64 + (r.random::<f64>() * 1000.0).round() / 1000.0
        )
    };
    let status = pick(
        r,
        &[
            "200", "200", "200", "200", "201", "204", "400", "404", "500", "503",
        ],
    );
    let k = r.random::<f64>();
    let message = if k < 0.6 {
        format!(
            "{} {}/{} returned {status} in {lat_i}ms trace={:016x}",
            pick(r, &VERBS),
            pick(r, &PATHS),
            r.random_range(0..10_000_000),
            r.random::<u64>()
        )
    } else if k < 0.9 {
        let words: Vec<&str> = (0..6).map(|_| pick(r, &WORDS)).collect();
        format!(
            "{} (attempt {}) shard={} id={:012x}",
            words.join(" "),
            r.random_range(1..6),
            r.random_range(0..64),
            r.random::<u64>() >> 16
        )
    } else {
        format!(
            "user said \"{}, {}\" \\ path=C:\\tmp\\{} caf\u{e9} \u{2713} tab\there id={:010x}",
            pick(r, &WORDS),
            pick(r, &WORDS),
            r.random_range(0..999),
            r.random::<u64>() >> 24
        )
    };
    let user = (r.random::<f64>() >= 0.2).then(|| format!("u_{:07}", r.random_range(0..2_000_000)));
    let request_id = rid.map(str::to_string).unwrap_or_else(|| uuid(r));
    let mut line = String::with_capacity(320);
    line.push_str("{\"ts\":");
    json_str(&mut line, &ts);
    line.push_str(",\"level\":");
    match level {
        Some(l) => json_str(&mut line, l),
        None => line.push_str("null"),
    }
    line.push_str(",\"service\":");
    json_str(&mut line, &service);
    line.push_str(",\"host\":");
    json_str(&mut line, &host);
    line.push_str(",\"request_id\":");
    json_str(&mut line, &request_id);
    let _ = write!(line, ",\"latency_ms\":{latency},\"message\":");
    json_str(&mut line, &message);
    line.push_str(",\"user_id\":");
    match &user {
        Some(u) => json_str(&mut line, u),
        None => line.push_str("null"),
    }
    line.push('}');
    (line, epoch_s, request_id, service)
}

/// Emits pending late copies whose slot has come (every 512 rows, as gen.py).
fn flush_pending(out: &mut Vec<String>, pending: &mut Vec<(usize, String)>) {
    if pending.is_empty() || !out.len().is_multiple_of(512) {
        return;
    }
    let mut keep = Vec::new();
    for (at, row) in pending.drain(..) {
        if at <= out.len() {
            out.push(row);
        } else {
            keep.push((at, row));
        }
    }
    *pending = keep;
}

fn logs_chunk(seed: u64, k: usize, start: usize, end: usize, n: usize) -> String {
    let mut r = StdRng::seed_from_u64(seed ^ (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 1);
    let mut out: Vec<String> = Vec::with_capacity(end - start);
    let mut pending: Vec<(usize, String)> = Vec::new();
    for i in start..end {
        let (line, epoch_s, rid, svc) = log_row(&mut r, i, n, None, None, None);
        out.push(line);
        if r.random::<f64>() < 0.03 {
            let later = epoch_s + 1.0 + r.random::<f64>() * 599.0;
            let (dup, ..) = log_row(&mut r, i, n, Some(&rid), Some(&svc), Some(later));
            let at = out.len() + r.random_range(1..2000);
            pending.push((at, dup));
        }
        flush_pending(&mut out, &mut pending);
    }
    out.extend(pending.into_iter().map(|(_, l)| l));
    let mut text = out.join("\n");
    text.push('\n');
    text
}

const STATUSES: [(&str, f64); 12] = [
    ("Open", 20.0),
    ("OPEN", 5.0),
    ("open", 15.0),
    ("Pending", 10.0),
    ("pending", 5.0),
    ("Resolved", 15.0),
    ("RESOLVED", 3.0),
    ("closed", 12.0),
    ("Closed", 8.0),
    (" open ", 1.0),
    ("In Progress", 5.0),
    ("in_progress", 1.0),
];
const PRIOS: [&str; 8] = [
    "low", "Low", "MEDIUM", "medium", "High", "high", "URGENT", "urgent",
];
const FIRST: [&str; 14] = [
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory",
    "niaj", "olivia", "peggy",
];
const DOMAINS: [&str; 5] = [
    "example.com",
    "Example.COM",
    "mail.test",
    "corp.example.org",
    "GMAIL.test",
];
const SUBJECTS: [&str; 10] = [
    "Cannot log in",
    "Refund request",
    "Order not delivered",
    "Billing question",
    "App crashes on start",
    "Change shipping address",
    "Password reset, urgent",
    "Feature request: dark mode",
    "Invoice \"missing\"",
    "Account locked",
];
const BODY: [&str; 40] = [
    "hello",
    "team",
    "I",
    "tried",
    "to",
    "checkout",
    "but",
    "the",
    "page",
    "said",
    "error",
    "please",
    "help,",
    "the",
    "order",
    "number",
    "is",
    "attached.",
    "thanks;",
    "regards",
    "customer",
    "also",
    "my",
    "card",
    "was",
    "charged",
    "twice",
    "and",
    "I",
    "would",
    "like",
    "a",
    "refund",
    "as",
    "soon",
    "as",
    "possible",
    "hello",
    "team",
    "thanks;",
];

fn body(r: &mut StdRng) -> String {
    let n = r.random_range(25..65);
    let mut words: Vec<&str> = (0..n).map(|_| pick(r, &BODY)).collect();
    if r.random::<f64>() < 0.06 {
        let at = r.random_range(0..n);
        words.insert(at, "\n--\n");
    }
    if r.random::<f64>() < 0.1 {
        let at = r.random_range(0..n);
        words.insert(at, "\"quoted\"");
    }
    format!("{} ref#{:08x}", words.join(" "), r.random::<u32>())
}

fn csv_field(out: &mut String, s: &str) {
    if s.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&s.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(s);
    }
}

fn dts(r: &mut StdRng, t: DateTime<Utc>) -> String {
    if r.random::<f64>() < 0.9 {
        t.format("%Y-%m-%d %H:%M:%S").to_string()
    } else {
        t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
    }
}

fn csv_line(fields: &[String]) -> String {
    let mut line = String::with_capacity(512);
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        csv_field(&mut line, f);
    }
    line.push('\n');
    line
}

fn tickets_chunk(seed: u64, k: usize, start: usize, end: usize, n: usize) -> String {
    let mut r = StdRng::seed_from_u64(seed ^ (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 2);
    let mut lines: Vec<String> = Vec::with_capacity(end - start);
    let mut pending: Vec<(usize, String)> = Vec::new();
    for i in start..end {
        let created_s = (i as f64 / n as f64) * SPAN_S + r.random::<f64>() * 10.0;
        let created = epoch0() + Duration::seconds(created_s as i64);
        let updated = created + Duration::seconds(r.random_range(60..3 * 86_400));
        let tid = format!("TCK-{i:08}");
        let tid_out = if r.random::<f64>() < 0.01 {
            String::new()
        } else {
            tid
        };
        let mut c_str = dts(&mut r, created);
        if r.random::<f64>() < 0.004 {
            c_str = pick(&mut r, &["", "N/A", "2024-02-30 25:00:00", "03/07/2024"]).to_string();
        }
        let u_str = dts(&mut r, updated);
        let status = if r.random::<f64>() > 0.003 {
            weighted(&mut r, &STATUSES).to_string()
        } else {
            pick(&mut r, &["??", "unknown", ""]).to_string()
        };
        let mut email = format!(
            "{}.{}@{}",
            pick(&mut r, &FIRST),
            r.random_range(0..100_000),
            pick(&mut r, &DOMAINS)
        );
        if r.random::<f64>() < 0.1 {
            email = email.to_uppercase();
        }
        let agent = if r.random_range(0..201) == 200 {
            String::new()
        } else {
            format!("agent{:03}", r.random_range(0..200))
        };
        let row = vec![
            tid_out.clone(),
            c_str,
            u_str,
            status,
            pick(&mut r, &PRIOS).to_string(),
            email,
            pick(&mut r, &SUBJECTS).to_string(),
            body(&mut r),
            agent,
        ];
        lines.push(csv_line(&row));
        if !tid_out.is_empty() && r.random::<f64>() < 0.02 {
            let upd2 = updated + Duration::seconds(r.random_range(60..5 * 86_400));
            let mut v2 = row.clone();
            v2[2] = dts(&mut r, upd2);
            v2[3] = pick(&mut r, &["Resolved", "closed", "CLOSED", "Pending"]).to_string();
            v2[7] = body(&mut r);
            let line = csv_line(&v2);
            if r.random::<f64>() < 0.3 {
                let back = r.random_range(0..50);
                let at = lines.len().saturating_sub(1 + back);
                lines.insert(at, line);
            } else {
                let at = lines.len() + r.random_range(1..3000);
                pending.push((at, line));
            }
        }
        flush_pending(&mut lines, &mut pending);
    }
    lines.extend(pending.into_iter().map(|(_, l)| l));
    lines.concat()
}

/// The text of a small dataset, in memory (one chunk; for benches and tests).
pub fn sample(kind: Kind, rows: usize, seed: u64) -> String {
    match kind {
        Kind::Logs => logs_chunk(seed, 0, 0, rows, rows),
        Kind::Tickets => {
            let mut s = String::from(TICKETS_HEADER);
            s.push_str(&tickets_chunk(seed, 0, 0, rows, rows));
            s
        }
    }
}

/// Writes `rows` base rows of `kind` to `out` (plus the late copies / later versions).
pub fn generate(kind: Kind, out: &Path, rows: usize, seed: u64, threads: usize) -> Result<u64> {
    let file = std::fs::File::create(out)
        .map_err(|e| Error::io(format!("cannot create {}", out.display()), e))?;
    let mut w = std::io::BufWriter::with_capacity(8 << 20, file);
    let io = |e| Error::io(format!("cannot write {}", out.display()), e);
    if kind == Kind::Tickets {
        w.write_all(TICKETS_HEADER.as_bytes()).map_err(io)?;
    }
    let chunks: Vec<(usize, usize)> = (0..rows)
        .step_by(CHUNK)
        .map(|s| (s, (s + CHUNK).min(rows)))
        .collect();
    let mut written = 0u64;
    // Generate `threads` chunks at a time, write them in order.
    let threads = threads.max(1);
    for (g, slice) in chunks.chunks(threads).enumerate() {
        let first = g * threads;
        let texts: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = slice
                .iter()
                .enumerate()
                .map(|(j, &(start, end))| {
                    let k = first + j;
                    s.spawn(move || match kind {
                        Kind::Logs => logs_chunk(seed, k, start, end, rows),
                        Kind::Tickets => tickets_chunk(seed, k, start, end, rows),
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect()
        });
        for t in texts {
            w.write_all(t.as_bytes()).map_err(io)?;
            written += t.len() as u64;
        }
    }
    w.flush().map_err(io)?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_deterministic_and_dirty() {
        let a = sample(Kind::Logs, 5_000, 1);
        assert_eq!(a, sample(Kind::Logs, 5_000, 1));
        assert_ne!(a, sample(Kind::Logs, 5_000, 2));
        let lines = a.lines().count();
        // About 3% of requests are logged twice.
        assert!((5_050..5_300).contains(&lines), "{lines}");
        assert!(a.contains("\"latency_ms\":\""), "string latencies");
        assert!(a.contains("+05:30\""), "offsets");
        let t = sample(Kind::Tickets, 2_000, 1);
        assert!(t.starts_with("ticket_id,created_at"));
        assert!(t.contains("\n--\n"), "newlines inside quoted bodies");
        assert!(t.contains("\"\"quoted\"\""), "quotes inside quotes");
    }
}

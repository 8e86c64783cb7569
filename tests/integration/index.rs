//! The key index: a commit reads only the files holding keys it replaces and rewrites only
//! those; the index survives crashes at every step; a damaged or missing index is rebuilt and
//! never dedups wrongly; `sluice index check` finds a table changed behind its back.

use std::collections::BTreeMap;

use crate::support::*;

/// Data files of the table with their modification times.
fn data_files(p: &Project) -> BTreeMap<String, std::time::SystemTime> {
    p.files("processed/support_tickets")
        .into_iter()
        .filter(|f| f.ends_with(".parquet"))
        .map(|f| {
            let t = std::fs::metadata(p.lake().join(&f))
                .unwrap()
                .modified()
                .unwrap();
            (f, t)
        })
        .collect()
}

fn tickets_report(report: &serde_json::Value) -> &serde_json::Value {
    &report["tables"]["support_tickets"]
}

#[test]
fn a_commit_rewrites_only_the_files_holding_replaced_keys_and_the_index_agrees() {
    let p = Project::empty();
    p.add_raw("support_tickets", "a.csv", &batch(0, 300, 3, 9, "open"));
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(
        p.files("_sluice/index/support_tickets").len(),
        2,
        "a run and the head"
    );
    let first = data_files(&p);
    assert_eq!(first.len(), 3, "one file per day: {first:?}");

    // New keys only: new files, nothing rewritten.
    p.add_raw("support_tickets", "b.csv", &batch(300, 90, 3, 9, "open"));
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    let t = tickets_report(&report);
    assert_eq!(
        (t["rows_written"].as_u64(), t["rows_replaced"].as_u64()),
        (Some(90), Some(0))
    );
    assert_eq!(t["files_rewritten"], 0);
    let second = data_files(&p);
    assert_eq!(second.len(), 6);
    assert!(
        first.iter().all(|(f, m)| second.get(f) == Some(m)),
        "old files untouched"
    );

    // Newer versions of five keys of one day (tickets 1, 4, 7, 10, 13: day 2 of a.csv):
    // only that day's file of a.csv is rewritten, without them.
    let updates: Vec<u8> = {
        let rows: Vec<String> = [1, 4, 7, 10, 13]
            .iter()
            .map(|i| format!("T{i:05},2024-03-02T08:00:00,2024-03-02T15:00:00,resolved,high,c{i}@example.com,subject {i},body {i},agent{}", i % 7))
            .collect();
        let refs: Vec<&str> = rows.iter().map(String::as_str).collect();
        tickets(&refs)
    };
    p.add_raw("support_tickets", "c.csv", &updates);
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    let t = tickets_report(&report);
    assert_eq!(t["rows_replaced"], 5, "{t:#}");
    assert_eq!(t["files_rewritten"], 1, "{t:#}");
    assert!(t["bytes_rewritten"].as_u64().unwrap() > 0);
    let third = data_files(&p);
    let gone: Vec<&String> = second.keys().filter(|f| !third.contains_key(*f)).collect();
    assert_eq!(gone.len(), 1, "{gone:?}");
    assert!(gone[0].contains("event_date=2024-03-02"), "{gone:?}");
    let kept = second
        .iter()
        .filter(|(f, m)| third.get(*f) == Some(m))
        .count();
    assert_eq!(kept, 5, "every other file untouched");
    let rows = table(&p);
    assert_eq!(rows.len(), 390);
    let resolved: Vec<&str> = rows
        .iter()
        .filter(|r| r.1 == "resolved")
        .map(|r| r.0.as_str())
        .collect();
    assert_eq!(resolved, ["T00001", "T00004", "T00007", "T00010", "T00013"]);
    assert_eq!(index_check(&p).0, 0, "{}", index_check(&p).1);

    // An older version of a replaced key, and the same updates again in other bytes (CRLF):
    // duplicates, nothing rewritten.
    let stale = batch(4, 1, 3, 10, "pending");
    p.add_raw("support_tickets", "d.csv", &stale);
    let crlf = String::from_utf8(updates).unwrap().replace('\n', "\r\n");
    p.add_raw("support_tickets", "e.csv", crlf.as_bytes());
    let before = data_files(&p);
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    let t = tickets_report(&report);
    assert_eq!(
        (t["rows_duplicate"].as_u64(), t["files_rewritten"].as_u64()),
        (Some(6), Some(0)),
        "{t:#}"
    );
    assert_eq!(data_files(&p), before, "no file written or rewritten");
    assert_eq!(table(&p), rows);
    let (code, out) = index_check(&p);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok: 390 keys"), "{out}");
}

/// The same runs into a lake whose index was damaged between them give the same table as an
/// undamaged lake, and the report says the index was rebuilt.
#[test]
fn a_damaged_or_missing_index_is_rebuilt_and_never_dedups_wrongly() {
    let updates = batch(0, 30, 3, 15, "resolved");
    let older = batch(30, 10, 3, 5, "pending");
    let run_all = |damage: Option<&dyn Fn(&Project)>| {
        let p = Project::empty();
        p.add_raw("support_tickets", "a.csv", &batch(0, 300, 3, 9, "open"));
        assert_eq!(p.run().0, 0);
        if let Some(d) = damage {
            d(&p);
        }
        p.add_raw("support_tickets", "b.csv", &updates);
        p.add_raw("support_tickets", "c.csv", &older);
        let (code, report) = p.run();
        assert_eq!(code, 0, "{report:#}");
        (p, report)
    };
    let (control, report) = run_all(None);
    let t = tickets_report(&report);
    assert_eq!(
        (t["rows_replaced"].as_u64(), t["rows_duplicate"].as_u64()),
        (Some(30), Some(10))
    );
    assert!(t.get("index_rebuilt").is_none(), "{t:#}");
    let want = table(&control);

    let run_file = |p: &Project| {
        p.files("_sluice/index/support_tickets")
            .into_iter()
            .find(|f| f.ends_with(".idx"))
            .map(|f| p.lake().join(f))
            .unwrap()
    };
    let head = |p: &Project| p.lake().join("_sluice/index/support_tickets/head.json");
    type Damage = Box<dyn Fn(&Project)>;
    let damages: Vec<(&str, Damage)> = vec![
        (
            "run cut short",
            Box::new(move |p: &Project| {
                let f = run_file(p);
                let data = std::fs::read(&f).unwrap();
                std::fs::write(&f, &data[..data.len() / 2]).unwrap();
            }),
        ),
        (
            "pages flipped",
            Box::new(move |p: &Project| {
                let f = run_file(p);
                let mut data = std::fs::read(&f).unwrap();
                // Every page gets a flipped byte; the directory and trailer stay whole.
                let pages = data.len() * 3 / 4;
                for i in (5..pages).step_by(97) {
                    data[i] ^= 0x20;
                }
                std::fs::write(&f, &data).unwrap();
            }),
        ),
        (
            "run deleted",
            Box::new(move |p: &Project| std::fs::remove_file(run_file(p)).unwrap()),
        ),
        (
            "head garbage",
            Box::new(move |p: &Project| std::fs::write(head(p), b"{\"format\":").unwrap()),
        ),
        (
            "head deleted",
            Box::new(move |p: &Project| std::fs::remove_file(head(p)).unwrap()),
        ),
        (
            "older format",
            Box::new(move |p: &Project| {
                let text = std::fs::read_to_string(head(p)).unwrap();
                std::fs::write(head(p), text.replacen("\"format\": 1", "\"format\": 0", 1))
                    .unwrap();
            }),
        ),
    ];
    for (name, damage) in &damages {
        let (p, report) = run_all(Some(damage.as_ref()));
        let t = tickets_report(&report);
        assert!(t["index_rebuilt"].is_string(), "{name}: {t:#}");
        assert_eq!(
            (t["rows_replaced"].as_u64(), t["rows_duplicate"].as_u64()),
            (Some(30), Some(10)),
            "{name}"
        );
        assert_eq!(table(&p), want, "{name}");
        let (code, out) = index_check(&p);
        assert_eq!(code, 0, "{name}: {out}");
    }
}

#[test]
fn index_check_finds_a_file_removed_behind_its_back_and_rebuild_repairs_it() {
    let p = Project::empty();
    p.add_raw("support_tickets", "a.csv", &batch(0, 300, 3, 9, "open"));
    assert_eq!(p.run().0, 0);
    let (code, out) = index_check(&p);
    assert_eq!(code, 0, "{out}");
    let victim = data_files(&p).into_keys().next().unwrap();
    std::fs::remove_file(p.lake().join(&victim)).unwrap();
    let (code, out) = index_check(&p);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("100 differences") || out.contains("differences"),
        "{out}"
    );
    let out = p.sluice(&["index", "rebuild"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("support_tickets: key index rebuilt: 200 keys in 2 files"),
        "{}",
        text(&out)
    );
    let (code, out) = index_check(&p);
    assert_eq!(code, 0, "{out}");
    // A table without a key has no index.
    let out = p.sluice(&["index", "check", "nope"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("no table \"nope\""), "{}", text(&out));
}

/// A crash at every step of a commit that replaces rows, then a rerun: the table of an
/// uninterrupted run, and an index that agrees with it.
#[test]
fn a_crash_at_any_step_of_a_replacing_commit_leaves_table_and_index_whole() {
    let updates = batch(0, 40, 3, 15, "resolved");
    let fresh = batch(300, 20, 3, 9, "open");
    let control = Project::empty();
    control.add_raw("support_tickets", "a.csv", &batch(0, 300, 3, 9, "open"));
    assert_eq!(control.run().0, 0);
    control.add_raw("support_tickets", "b.csv", &updates);
    control.add_raw("support_tickets", "c.csv", &fresh);
    assert_eq!(control.run().0, 0);
    let want = table(&control);
    assert_eq!(want.len(), 320);
    for step in crate::crash::STEPS {
        let p = Project::empty();
        p.add_raw("support_tickets", "a.csv", &batch(0, 300, 3, 9, "open"));
        assert_eq!(p.run().0, 0);
        p.add_raw("support_tickets", "b.csv", &updates);
        p.add_raw("support_tickets", "c.csv", &fresh);
        let out = p.sluice(&["run", "--crash-at", step]);
        assert!(!out.status.success(), "{step}: no crash");
        let (code, report) = p.run();
        assert_eq!(code, 0, "{step}: {report:#}");
        assert_eq!(table(&p), want, "{step}");
        let (code, out) = index_check(&p);
        assert_eq!(code, 0, "{step}: {out}");
        assert!(
            p.files("_sluice/staging").is_empty() && p.files("_sluice/pending").is_empty(),
            "{step}"
        );
    }
}

/// `sluice compact` on a keyed Delta table replaces its files: the index is rebuilt with it,
/// so that a later update replaces the row in the compacted file, not in a file the table no
/// longer holds (which would bring its rows back).
#[cfg(feature = "delta")]
#[test]
fn compacting_a_delta_table_rebuilds_its_index() {
    let p = Project::empty();
    p.edit_config(
        "order_by = \"updated_ts\"",
        "order_by = \"updated_ts\"\nformat = \"delta\"",
    );
    for k in 0..3 {
        p.add_raw(
            "support_tickets",
            &format!("a{k}.csv"),
            &batch(k * 100, 100, 3, 9, "open"),
        );
        assert_eq!(p.run().0, 0);
    }
    let out = p.sluice(&["compact", "support_tickets"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("9 files removed"), "{}", text(&out));
    let (code, out) = index_check(&p);
    assert_eq!(code, 0, "{out}");
    p.add_raw("support_tickets", "u.csv", &batch(0, 10, 3, 15, "resolved"));
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(tickets_report(&report)["rows_replaced"], 10);
    let out = p.sluice(&[
        "query",
        "SELECT count(*) AS n, count(DISTINCT ticket_id) AS k, sum(CASE WHEN status = 'resolved' THEN 1 ELSE 0 END) AS r FROM support_tickets",
        "--format",
        "csv",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "n,k,r\n300,300,10",
        "{}",
        text(&out)
    );
    let (code, out) = index_check(&p);
    assert_eq!(code, 0, "{out}");
}

/// `target_file_size`: a partition's new rows go to files of about that size, not one file that
/// grows; a size below 1MiB is a config error.
#[test]
fn files_are_closed_at_the_target_size() {
    let p = Project::empty();
    p.edit_config(
        "order_by = \"updated_ts\"",
        "order_by = \"updated_ts\"\ntarget_file_size = \"1MiB\"",
    );
    // 6,000 tickets on one day with bodies that do not compress: ~5 MB of Parquet.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let rows: Vec<String> = (0..6000)
        .map(|i| {
            let body: String = (0..50)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    format!("{x:016x}")
                })
                .collect();
            format!(
                "T{i:05},2024-03-01T08:00:00,2024-03-01T09:00:00,open,high,c@example.com,s,{body},a"
            )
        })
        .collect();
    let refs: Vec<&str> = rows.iter().map(String::as_str).collect();
    p.add_raw("support_tickets", "big.csv", &tickets(&refs));
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    let sizes: Vec<u64> = data_files(&p)
        .keys()
        .map(|f| std::fs::metadata(p.lake().join(f)).unwrap().len())
        .collect();
    assert!(sizes.len() >= 3, "{sizes:?}");
    assert!(sizes.iter().all(|&s| s < 3 << 20), "{sizes:?}");
    assert_eq!(table(&p).len(), 6000);
    assert_eq!(index_check(&p).0, 0);

    p.edit_config(
        "target_file_size = \"1MiB\"",
        "target_file_size = \"10KiB\"",
    );
    let out = p.sluice(&["validate"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("target_file_size \"10KiB\" is too small"),
        "{}",
        text(&out)
    );
}

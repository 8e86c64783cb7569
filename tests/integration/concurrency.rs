//! Two runs at once on one lake never process a file twice.

use crate::support::*;

#[test]
fn two_concurrent_runs_process_each_file_once() {
    for _ in 0..2 {
        let p = Project::with_fixtures();
        let a = p
            .cmd(&["run", "--json"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let b = p
            .cmd(&["run", "--json"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let a = a.wait_with_output().unwrap();
        let b = b.wait_with_output().unwrap();
        assert!(a.status.success(), "{}", text(&a));
        assert!(b.status.success(), "{}", text(&b));
        let ra: serde_json::Value = serde_json::from_slice(&a.stdout).unwrap();
        let rb: serde_json::Value = serde_json::from_slice(&b.stdout).unwrap();
        check_accounting(&ra);
        check_accounting(&rb);
        let mut keys: Vec<String> = ra["files"]
            .as_array()
            .unwrap()
            .iter()
            .chain(rb["files"].as_array().unwrap())
            .map(|f| f["key"].as_str().unwrap().to_string())
            .collect();
        keys.sort();
        let n = keys.len();
        keys.dedup();
        assert_eq!(keys.len(), n, "a file was processed twice: {keys:?}");
        assert_eq!(n, 6);
        assert_example_tables(&p);
    }
}

/// Runs `sluice run --json` with the run held after its plan (before the commit lock) until
/// the returned pause file is removed; returns once the run is held there.
fn held_after_plan(p: &Project) -> (std::process::Child, std::path::PathBuf) {
    held_at(p, &["run", "--json", "-v"], "planned")
}

/// The same files, one run after another, in this order.
fn sequential(files: &[(&str, Vec<u8>)]) -> Project {
    let p = Project::empty();
    for (name, data) in files {
        p.add_raw("support_tickets", name, data);
        let (code, report) = p.run();
        assert_eq!(code, 0, "{report:#}");
    }
    p
}

/// A commit planned beside another run's commit that replaces keys elsewhere in the table
/// goes through without being planned again (its plan is rebased on the newer index); one that
/// meets keys the other commit wrote is planned again under the lock. Either way the table and
/// its index are what the runs one after the other give; also when the plan was made into a
/// table holding no row yet (its first file all rejected: the plan's keys are its index
/// entries', looked up only if a commit came in between).
#[test]
fn a_plan_made_beside_another_commit_is_rebased_or_made_again_on_a_conflict() {
    // The second batch replaces tickets 0..30; the third either other keys (30..60) or the
    // same ones, later.
    for (empty, conflict) in [(false, false), (false, true), (true, false), (true, true)] {
        let first = match empty {
            false => batch(0, 300, 3, 9, "open"),
            true => batch(1000, 20, 3, 9, "no such status"),
        };
        let second = batch(0, 30, 3, 10, "pending");
        let third = match conflict {
            false => batch(30, 30, 3, 11, "resolved"),
            true => batch(0, 30, 3, 11, "resolved"),
        };
        let p = Project::empty();
        p.add_raw("support_tickets", "a.csv", &first);
        assert_eq!(p.run().0, 0);
        if empty {
            assert!(p.files("processed/support_tickets").is_empty());
        }
        p.add_raw("support_tickets", "b.csv", &second);
        let (held, pause) = held_after_plan(&p);
        // While the first run waits with its plan of b.csv, another run commits c.csv.
        p.add_raw("support_tickets", "c.csv", &third);
        let (code, report) = p.run();
        assert_eq!(code, 0, "{report:#}");
        assert_eq!(report["files"].as_array().unwrap().len(), 1, "{report:#}");
        std::fs::remove_file(&pause).unwrap();
        let out = held.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let log = text(&out);
        let replanned = log.contains("running the batch again");
        assert_eq!(
            replanned, conflict,
            "empty {empty}, conflict {conflict}: {log}"
        );
        let held_report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        check_accounting(&held_report);
        // b.csv is older than c.csv by updated_at: the order of the commits does not matter.
        let expected = sequential(&[("a.csv", first), ("b.csv", second), ("c.csv", third)]);
        assert_eq!(
            table(&p),
            table(&expected),
            "empty {empty}, conflict {conflict}"
        );
        assert_eq!(index_check(&p).0, 0, "{}", index_check(&p).1);
        assert!(p.files("_sluice/pending").is_empty());
        assert!(p.files("_sluice/staging").is_empty());
    }
}

/// With `batch_files`, runs started together share a backlog batch by batch, each file once,
/// and the table is what one run makes of it.
#[test]
fn workers_with_bounded_batches_share_a_backlog_each_file_once() {
    let files: Vec<(String, Vec<u8>)> = (0..12)
        .map(|i| {
            // Overlapping keys: each file replaces half of the previous one's.
            (
                format!("f{i:02}.csv"),
                batch(i * 20, 40, 3, 8 + i as u32, "open"),
            )
        })
        .collect();
    let p = Project::empty();
    for (name, data) in &files {
        p.add_raw("support_tickets", name, data);
    }
    let workers: Vec<std::process::Child> = (0..3)
        .map(|_| {
            p.cmd(&["run", "--json", "--batch-files", "2"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut keys = Vec::new();
    for w in workers {
        let out = w.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        check_accounting(&r);
        for f in r["files"].as_array().unwrap() {
            if f["source"] == "support_tickets" {
                assert_eq!(f["status"], "processed", "{f:#}");
                keys.push(f["key"].as_str().unwrap().to_string());
            }
        }
    }
    keys.sort();
    let n = keys.len();
    keys.dedup();
    assert_eq!(n, 12, "every file processed: {keys:?}");
    assert_eq!(keys.len(), 12, "a file processed twice");
    // One run over all of them (newest updated_at wins whatever the order).
    let one = Project::empty();
    for (name, data) in &files {
        one.add_raw("support_tickets", name, data);
    }
    assert_eq!(one.run().0, 0);
    assert_eq!(table(&p), table(&one));
    assert_eq!(index_check(&p).0, 0, "{}", index_check(&p).1);
    // Batches of two: six commits of the table.
    let commits = p.files("_sluice/ledger").len();
    assert_eq!(commits, 6, "{commits} commits");
    // One run of batches of five: three commits, one report line adding them up.
    let solo = Project::empty();
    for (name, data) in &files {
        solo.add_raw("support_tickets", name, data);
    }
    let (code, report) = solo.run_with(&["--batch-files", "5"]);
    assert_eq!(code, 0, "{report:#}");
    check_accounting(&report);
    assert_eq!(solo.files("_sluice/ledger").len(), 3);
    let t = &report["tables"]["support_tickets"];
    let held = t["rows_written"].as_u64().unwrap() - t["rows_replaced"].as_u64().unwrap();
    assert_eq!(held as usize, table(&solo).len(), "{t:#}");
    assert_eq!(table(&solo), table(&one));
}

//! `sluice compact` on plain Parquet tables: the small files of a partition merged into files of
//! at most the target size in one ledger commit with the key index; the same rows before and
//! after; later runs replace keys correctly; a crash at any step of the compaction, then a
//! rerun, gives the uninterrupted result.

use std::collections::BTreeMap;

use crate::support::*;

const TARGET: u64 = 1 << 20;

/// Tickets `first..first+n` over three days from 2024-03-01, updated at `hour` with `status`.
fn tickets_of(first: usize, n: usize, hour: u32, status: &str) -> Vec<u8> {
    batch(first, n, 3, hour, status)
}

/// Data files under a prefix and their sizes.
fn data_files(p: &Project, prefix: &str) -> BTreeMap<String, u64> {
    p.files(prefix)
        .into_iter()
        .filter(|f| f.ends_with(".parquet"))
        .map(|f| {
            let size = std::fs::metadata(p.lake().join(&f)).unwrap().len();
            (f, size)
        })
        .collect()
}

/// Data files per partition folder.
fn per_partition(files: &BTreeMap<String, u64>) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for f in files.keys() {
        let dir = f.rsplit_once('/').map(|(d, _)| d.to_string()).unwrap();
        *out.entry(dir).or_default() += 1;
    }
    out
}

/// A keyed tickets table of `runs` commits of 20 new tickets each (three partitions).
fn many_small_commits(runs: usize) -> Project {
    let p = Project::empty();
    for r in 0..runs {
        p.add_raw(
            "support_tickets",
            &format!("b{r}.csv"),
            &tickets_of(r * 20, 20, 9, "open"),
        );
        let (code, report) = p.run();
        assert_eq!(code, 0, "{report:#}");
    }
    p
}

/// Runs `sluice compact` on the tickets table; its summary.
fn compact(p: &Project, extra: &[&str]) -> String {
    let mut args = vec!["compact", "support_tickets", "--target-size", "1MiB"];
    args.extend_from_slice(extra);
    let out = p.sluice(&args);
    assert!(out.status.success(), "{}", text(&out));
    text(&out)
}

/// Newer versions of tickets 0..30 and older versions of 30..40: the replacing run.
fn replace(p: &Project) -> serde_json::Value {
    p.add_raw(
        "support_tickets",
        "new.csv",
        &tickets_of(0, 30, 15, "resolved"),
    );
    p.add_raw(
        "support_tickets",
        "old.csv",
        &tickets_of(30, 10, 5, "pending"),
    );
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    report
}

#[test]
fn compacting_a_keyed_plain_table_merges_small_files_and_keeps_its_index() {
    let p = many_small_commits(8);
    let before = data_files(&p, "processed/support_tickets");
    assert_eq!(before.len(), 24, "a file per commit and day: {before:?}");
    let rows = table(&p);
    assert_eq!(rows.len(), 160);

    let out = compact(&p, &[]);
    let bytes_before: u64 = before.values().sum();
    assert!(
        out.contains(
            "compact processed/support_tickets: 3 files added, 24 files removed; 24 -> 3 files, "
        ),
        "{out}"
    );
    assert!(out.contains(&format!("{bytes_before} -> ")), "{out}");
    let after = data_files(&p, "processed/support_tickets");
    assert_eq!(after.len(), 3, "{after:?}");
    assert!(after.values().all(|s| *s <= TARGET), "{after:?}");
    assert!(
        after.keys().all(|f| !before.contains_key(f)),
        "every small file was replaced"
    );
    assert_eq!(per_partition(&after).len(), 3, "one file per day");
    assert_eq!(table(&p), rows, "the same rows");
    let q = p.sluice(&[
        "query",
        "SELECT count(*) AS n, count(DISTINCT ticket_id) AS k FROM support_tickets",
        "--format",
        "json",
    ]);
    assert!(q.status.success(), "{}", text(&q));
    let v: serde_json::Value = serde_json::from_slice(&q.stdout).unwrap();
    assert_eq!(
        (v[0]["n"].as_u64(), v[0]["k"].as_u64()),
        (Some(160), Some(160))
    );
    let (code, check) = index_check(&p);
    assert_eq!(code, 0, "{check}");
    assert!(check.contains("ok: 160 keys in 3 files"), "{check}");
    assert!(p.files("_sluice/pending").is_empty());
    assert!(p.files("_sluice/staging").is_empty());

    // Nothing left to compact.
    let again = compact(&p, &[]);
    assert!(!again.contains("files added"), "{again}");
    assert_eq!(data_files(&p, "processed/support_tickets"), after);

    // A run replacing keys held by the merged files: no key resurrected or doubled, the same
    // table as a lake that was never compacted.
    let report = replace(&p);
    let t = &report["tables"]["support_tickets"];
    assert_eq!(
        (t["rows_replaced"].as_u64(), t["rows_duplicate"].as_u64()),
        (Some(30), Some(10)),
        "{t:#}"
    );
    let control = many_small_commits(8);
    replace(&control);
    let got = table(&p);
    assert_eq!(got, table(&control));
    assert_eq!(got.len(), 160);
    assert_eq!(got.iter().filter(|r| r.1 == "resolved").count(), 30);
    assert_eq!(got.iter().filter(|r| r.1 == "pending").count(), 0);
    let (code, check) = index_check(&p);
    assert_eq!(code, 0, "{check}");
}

#[test]
fn a_crash_at_any_compaction_step_then_a_rerun_gives_the_uninterrupted_result() {
    let control = many_small_commits(4);
    compact(&control, &[]);
    let want_files = per_partition(&data_files(&control, "processed/support_tickets"));
    let want = table(&control);
    replace(&control);
    let want_after = table(&control);

    for step in ["staged", "committed", "indexed", "published", "archived"] {
        let p = many_small_commits(4);
        let out = p.sluice(&[
            "compact",
            "support_tickets",
            "--target-size",
            "1MiB",
            "--crash-at",
            step,
        ]);
        assert!(
            !out.status.success(),
            "{step}: the injected crash did not happen"
        );
        assert!(
            text(&out).contains(&format!("injected crash at {step}")),
            "{step}: {}",
            text(&out)
        );
        // The rerun finishes (or discards and redoes) the interrupted compaction.
        compact(&p, &[]);
        assert_eq!(
            per_partition(&data_files(&p, "processed/support_tickets")),
            want_files,
            "{step}"
        );
        assert_eq!(table(&p), want, "{step}");
        let (code, check) = index_check(&p);
        assert_eq!(code, 0, "{step}: {check}");
        assert!(p.files("_sluice/pending").is_empty(), "{step}");
        assert!(p.files("_sluice/staging").is_empty(), "{step}");
        replace(&p);
        assert_eq!(table(&p), want_after, "{step}");
        assert_eq!(index_check(&p).0, 0, "{step}");
    }
}

#[test]
fn a_crash_during_compaction_is_finished_by_the_next_run() {
    let p = many_small_commits(3);
    let want = table(&p);
    let out = p.sluice(&["compact", "--target-size", "1MiB", "--crash-at", "indexed"]);
    assert!(!out.status.success());
    // Not a compaction but a run: its recovery rolls the committed compaction forward.
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(data_files(&p, "processed/support_tickets").len(), 3);
    assert_eq!(table(&p), want);
    assert_eq!(index_check(&p).0, 0);
}

#[test]
fn a_plain_table_without_a_key_compacts_too() {
    let p = Project::single_table(
        "ev",
        "jsonl",
        "[{ name = \"id\", type = \"int64\" }, { name = \"v\", type = \"string\" }]",
        "SELECT id, v, _source_file, _source_row FROM ev",
    );
    let mut want = Vec::new();
    for r in 0..6 {
        let mut data = String::new();
        for i in 0..50 {
            let id = r * 50 + i;
            data.push_str(&format!("{{\"id\":{id},\"v\":\"value {id}\"}}\n"));
            want.push(Some(format!("value {id}")));
        }
        // A repeated row: without a key both stay.
        data.push_str("{\"id\":0,\"v\":\"value 0\"}\n");
        want.push(Some("value 0".to_string()));
        p.add_raw("ev", &format!("e{r}.json"), data.as_bytes());
        assert_eq!(p.run().0, 0);
    }
    want.sort();
    let values = |p: &Project| {
        let mut v = p.strings("processed/ev_clean", "v");
        v.sort();
        v
    };
    assert_eq!(data_files(&p, "processed/ev_clean").len(), 6);
    assert_eq!(values(&p), want);
    let out = p.sluice(&["compact"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out)
            .contains("compact processed/ev_clean: 1 files added, 6 files removed; 6 -> 1 files"),
        "{}",
        text(&out)
    );
    assert_eq!(data_files(&p, "processed/ev_clean").len(), 1);
    assert_eq!(values(&p), want);
    assert!(
        !p.lake().join("_sluice/index/ev_clean").exists(),
        "no key, no index"
    );

    // The next run adds its file beside the merged one.
    p.add_raw("ev", "late.json", b"{\"id\":999,\"v\":\"late\"}\n");
    assert_eq!(p.run().0, 0);
    want.push(Some("late".to_string()));
    want.sort();
    assert_eq!(values(&p), want);
    assert_eq!(data_files(&p, "processed/ev_clean").len(), 2);
}

//! Exactly once under what real producers do: the same content under several names,
//! re-uploads, renames, crashes at every step and two runs at once, checked against a model
//! (each distinct content ingested once), plus identical rows arriving in other bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::support::*;

/// A plain table `t_clean` (no key) over CSV files of `id,v`.
fn plain() -> Project {
    Project::single_table(
        "t",
        "csv",
        r#"[{ name = "id", type = "int64" }, { name = "v", type = "string" }]"#,
        "SELECT id, v, _source_file, _source_row FROM t",
    )
}

/// Content number `c`: three rows with ids c*100 .. c*100+2.
fn content(c: u64) -> Vec<u8> {
    let mut s = String::from("id,v\n");
    for j in 0..3 {
        s.push_str(&format!("{},c{c}\n", c * 100 + j));
    }
    s.into_bytes()
}

/// The ids the table holds, sorted (a repeated id is a repeated ingest).
fn ids(p: &Project) -> Vec<u64> {
    let mut ids: Vec<u64> = p
        .strings("processed/t_clean", "id")
        .into_iter()
        .map(|s| s.unwrap().parse().unwrap())
        .collect();
    ids.sort();
    ids
}

/// The files now in `raw/t/`: name -> content number.
fn raw_state(p: &Project) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for f in p.files("raw/t") {
        let data = std::fs::read(p.lake().join(&f)).unwrap();
        let c = (0..CONTENTS)
            .find(|&c| content(c) == data)
            .expect("raw holds only uploaded contents");
        let name = Path::new(&f)
            .strip_prefix("raw/t")
            .unwrap()
            .to_string_lossy()
            .into_owned();
        out.insert(name, c);
    }
    out
}

fn status(p: &Project) -> serde_json::Value {
    let out = p.sluice(&["status", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)))
}

#[test]
fn the_same_content_under_a_third_name_after_a_re_upload_is_a_duplicate() {
    let p = plain();
    let f = content(1);
    p.add_raw("t", "f.csv", &f);
    let (code, r) = p.run();
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["tables"]["t_clean"]["rows_written"], 3);
    for (step, name) in [(2, "copy1.csv"), (3, "f.csv"), (4, "copy2.csv")] {
        p.add_raw("t", name, &f);
        let (code, r) = p.run();
        assert_eq!(code, 0, "step {step}: {r:#}");
        let files = r["files"].as_array().unwrap();
        assert_eq!(files.len(), 1, "step {step}: {r:#}");
        assert_eq!(files[0]["status"], "duplicate", "step {step}: {r:#}");
        assert_eq!(ids(&p), vec![100, 101, 102], "step {step}");
    }
    // Four ledger records, none overwritten: the processed one and three duplicates.
    let entries = p.files("_sluice/ledger");
    assert_eq!(entries.len(), 4, "{entries:?}");
    let mut outcomes = Vec::new();
    for e in entries {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(p.lake().join(e)).unwrap()).unwrap();
        for f in v["files"].as_array().unwrap() {
            outcomes.push(f["outcome"].as_str().unwrap().to_string());
        }
    }
    outcomes.sort();
    assert_eq!(
        outcomes,
        ["duplicate", "duplicate", "duplicate", "processed"],
        "{outcomes:?}"
    );
}

/// Distinct contents the random sequences use.
const CONTENTS: u64 = 6;
const NAMES: [&str; 4] = ["a.csv", "b.csv", "c.csv", "in/d.csv"];

/// A small seeded generator (xorshift), so a failing sequence can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn random_uploads_renames_crashes_and_concurrent_runs_ingest_each_content_once() {
    for seed in [
        0x9e37_79b9_7f4a_7c15u64,
        0xdead_beef_1234_5678,
        0x0123_4567_89ab_cdef,
        0x5eed_0000_0000_0004,
    ] {
        let p = plain();
        let mut rng = Rng(seed);
        let mut log = Vec::new();
        // Contents ever put into raw/, and contents a run that ended well found in raw/.
        let mut uploaded = BTreeSet::new();
        let mut must = BTreeSet::new();
        for step in 0..100 {
            let before = raw_state(&p);
            match rng.below(20) {
                0..=6 => {
                    let c = rng.below(CONTENTS);
                    let name = NAMES[rng.below(NAMES.len() as u64) as usize];
                    log.push(format!("{step}: upload content {c} as {name}"));
                    p.add_raw("t", name, &content(c));
                    uploaded.insert(c);
                }
                7..=8 => {
                    let present: Vec<&String> = before.keys().collect();
                    let free: Vec<&str> = NAMES
                        .iter()
                        .copied()
                        .filter(|n| !before.contains_key(*n))
                        .collect();
                    if present.is_empty() || free.is_empty() {
                        continue;
                    }
                    let from = present[rng.below(present.len() as u64) as usize].clone();
                    let to = free[rng.below(free.len() as u64) as usize];
                    log.push(format!("{step}: rename {from} -> {to}"));
                    let raw = p.lake().join("raw/t");
                    std::fs::create_dir_all(raw.join(to).parent().unwrap()).unwrap();
                    std::fs::rename(raw.join(&from), raw.join(to)).unwrap();
                }
                9..=13 => {
                    log.push(format!("{step}: run"));
                    let (code, r) = p.run();
                    assert_eq!(code, 0, "seed {seed:x}: {}\n{r:#}", log.join("\n"));
                    must.extend(before.values().copied());
                    assert!(
                        p.files("raw/t").is_empty(),
                        "seed {seed:x}: a run left raw files: {:?}\n{}",
                        p.files("raw/t"),
                        log.join("\n")
                    );
                }
                14..=17 => {
                    let at =
                        crate::crash::STEPS[rng.below(crate::crash::STEPS.len() as u64) as usize];
                    log.push(format!("{step}: run, crash at {at}"));
                    let out = p.sluice(&["run", "--json", "--crash-at", at]);
                    if out.status.success() {
                        // Nothing to do: the run ended before the crash point.
                        must.extend(before.values().copied());
                    }
                }
                _ => {
                    log.push(format!("{step}: two runs at once"));
                    let spawn = |p: &Project| {
                        p.cmd(&["run", "--json"])
                            .stdout(std::process::Stdio::piped())
                            .stderr(std::process::Stdio::piped())
                            .spawn()
                            .unwrap()
                    };
                    let (a, b) = (spawn(&p), spawn(&p));
                    for out in [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()] {
                        assert!(
                            out.status.success(),
                            "seed {seed:x}: {}\n{}",
                            text(&out),
                            log.join("\n")
                        );
                        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                        check_accounting(&r);
                    }
                    must.extend(before.values().copied());
                }
            }
            // At most once, at every step.
            let held = ids(&p);
            let distinct: BTreeSet<u64> = held.iter().copied().collect();
            assert_eq!(
                distinct.len(),
                held.len(),
                "seed {seed:x}: some content was ingested twice: {held:?}\n{}",
                log.join("\n")
            );
        }
        // Settle, then exactly once: everything a good run saw, nothing that was never uploaded.
        let last = raw_state(&p);
        let (code, r) = p.run();
        assert_eq!(code, 0, "seed {seed:x}: {r:#}");
        must.extend(last.values().copied());
        let held = ids(&p);
        let got: BTreeSet<u64> = held.iter().map(|id| id / 100).collect();
        assert_eq!(held.len(), got.len() * 3, "seed {seed:x}: {held:?}");
        assert!(
            must.is_subset(&got),
            "seed {seed:x}: contents {must:?} must all be in the table, it has {got:?}\n{}",
            log.join("\n")
        );
        assert!(got.is_subset(&uploaded), "seed {seed:x}");
        assert!(p.files("raw/t").is_empty());
        assert!(p.files("_sluice/pending").is_empty());
        assert!(p.files("_sluice/staging").is_empty());
        assert!(
            p.files("_sluice/claims").is_empty(),
            "seed {seed:x}: {:?}\n{}",
            p.files("_sluice/claims"),
            log.join("\n")
        );
        assert_eq!(status(&p)["failed"], serde_json::json!([]), "seed {seed:x}");
    }
}

/// The files under a lake prefix with their modification times.
fn file_times(p: &Project, prefix: &str) -> Vec<(String, std::time::SystemTime)> {
    p.files(prefix)
        .into_iter()
        .map(|f| {
            let m = std::fs::metadata(p.lake().join(&f))
                .unwrap()
                .modified()
                .unwrap();
            (f, m)
        })
        .collect()
}

#[test]
fn rows_identical_to_held_rows_in_other_bytes_are_duplicates_and_nothing_is_rewritten() {
    let p = Project::empty();
    let rows: Vec<String> = (0..200)
        .map(|i| {
            format!(
                "T-{i:05},2024-03-0{d}T08:00:00Z,2024-03-0{d}T09:00:00Z,open,high,a{i}@example.com,Subject {i},\"Body, {i}\",agent-{i}",
                d = 1 + i % 3
            )
        })
        .collect();
    let refs: Vec<&str> = rows.iter().map(String::as_str).collect();
    let lf = tickets(&refs);
    p.add_raw("support_tickets", "lf.csv", &lf);
    let (code, r) = p.run();
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["tables"]["support_tickets"]["rows_written"], 200);
    let before = file_times(&p, "processed/support_tickets");
    // The same rows with CRLF line ends: other bytes, the same rows.
    let crlf = String::from_utf8(lf).unwrap().replace('\n', "\r\n");
    p.add_raw("support_tickets", "crlf.csv", crlf.as_bytes());
    let (code, r) = p.run();
    assert_eq!(code, 0, "{r:#}");
    let f = &r["files"][0];
    assert_eq!(f["status"], "processed", "{r:#}");
    assert_eq!(f["rows_read"], 200, "{r:#}");
    assert_eq!(f["rows_duplicate"], 200, "{r:#}");
    assert_eq!(f["rows_written"], 0, "{r:#}");
    let t = &r["tables"]["support_tickets"];
    assert_eq!(t["rows_replaced"].as_u64().unwrap_or(0), 0, "{r:#}");
    let after = file_times(&p, "processed/support_tickets");
    assert_eq!(before, after, "no partition file was rewritten");
    // One changed value with the same updated_at still replaces its row.
    let mut changed = rows.clone();
    changed[7] = changed[7].replace(",open,", ",pending,");
    let refs: Vec<&str> = changed.iter().map(String::as_str).collect();
    p.add_raw("support_tickets", "changed.csv", &tickets(&refs));
    let (code, r) = p.run();
    assert_eq!(code, 0, "{r:#}");
    let f = &r["files"][0];
    assert_eq!(f["rows_written"], 1, "{r:#}");
    assert_eq!(f["rows_duplicate"], 199, "{r:#}");
    assert_eq!(r["tables"]["support_tickets"]["rows_replaced"], 1, "{r:#}");
    assert_eq!(p.rows("processed/support_tickets"), 200);
}

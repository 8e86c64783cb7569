//! The memory limit: the same tables under a small limit (small chunks, small buffers, few open
//! writers), and clear errors for a limit that is not a size.

use crate::support::*;

#[test]
fn a_small_memory_limit_gives_the_same_tables() {
    let p = Project::with_fixtures();
    let (code, report) = p.run_with(&["--memory-limit", "64MiB"]);
    assert_eq!(code, 0, "{report}");
    assert_example_tables(&p);
    assert!(
        p.files("_sluice/tmp").is_empty(),
        "{:?}",
        p.files("_sluice/tmp")
    );
}

/// A file far larger than a chunk, read in 1 MiB chunks by both threads (CSV records with
/// newlines inside quotes cut at chunk ends, later versions of a ticket in other chunks), makes
/// the same table as one read in one piece.
#[test]
fn chunked_reading_and_streaming_dedup_match_one_piece() {
    let mut tables = Vec::new();
    for limit in ["64MiB", "8GiB"] {
        let p = Project::with_fixtures();
        let file = p.path().join("big.csv");
        let out = p.sluice(&[
            "generate",
            "tickets",
            file.to_str().unwrap(),
            "--rows",
            "12000",
        ]);
        assert!(out.status.success(), "{}", text(&out));
        let data = std::fs::read(&file).unwrap();
        assert!(data.len() > 3 << 20, "{}", data.len());
        p.add_raw("support_tickets", "big.csv", &data);
        let (code, report) = p.run_with(&["--memory-limit", limit]);
        assert_eq!(code, 0, "{report}");
        let counts = file_counts(&report);
        let big = &counts["support_tickets/big.csv"];
        assert!(big.1 > 12_000, "{big:?}");
        let mut rows: Vec<(Option<String>, Option<String>)> = p
            .strings("processed/support_tickets", "ticket_id")
            .into_iter()
            .zip(p.strings("processed/support_tickets", "status"))
            .collect();
        rows.sort();
        tables.push((big.clone(), rows, p.rows("rejected/support_tickets")));
    }
    assert_eq!(tables[0], tables[1]);
}

#[test]
fn a_memory_limit_that_is_not_a_size_is_a_usage_error() {
    let p = Project::with_fixtures();
    let out = p.sluice(&["--memory-limit", "lots", "run"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--memory-limit"), "{}", text(&out));
    p.edit_config("[lake]", "[engine]\nmemory_limit = \"12KB\"\n\n[lake]");
    let out = p.sluice(&["run"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("engine.memory_limit"), "{}", text(&out));
    assert!(text(&out).contains("too small"), "{}", text(&out));
}

/// A batch with more distinct keys than the dedup index's share of a 64 MiB limit (half of it,
/// about 600,000 keys) spills the index to disk and settles it a partition at a time: the
/// report says so, versions of a key on both sides of a spill (newer, older and tied orders)
/// settle as in memory, and the table is the one an 8 GiB limit (no spill) gives.
#[test]
fn a_dedup_index_past_its_share_of_the_memory_limit_spills_with_the_same_table() {
    const KEYS: u64 = 700_000;
    let mut csv = String::from("id,seq,note,day\n");
    for k in 0..KEYS {
        csv.push_str(&format!("k{k},5,first,{}\n", k % 3));
    }
    // After the spill: every 7th key again, newer (seq 6), older (seq 4) or tied (seq 5: the
    // later row wins).
    for k in (0..KEYS).step_by(7) {
        let seq = 4 + (k / 7) % 3;
        csv.push_str(&format!("k{k},{seq},again,{}\n", k % 3));
    }
    let again = KEYS.div_ceil(7);
    let mut outcomes = Vec::new();
    for limit in ["64MiB", "8GiB"] {
        let p = Project::single_table(
            "events",
            "csv",
            "[{ name = \"id\", type = \"string\" }, { name = \"seq\", type = \"int64\" }, \
             { name = \"note\", type = \"string\" }, { name = \"day\", type = \"int64\" }]",
            "SELECT id, seq, note, day, _source_file, _source_row FROM events",
        );
        p.edit_config(
            "query = \"events.sql\"\n",
            "query = \"events.sql\"\npartition_by = [\"day\"]\nunique_key = [\"id\"]\n\
             order_by = \"seq\"\n",
        );
        p.add_raw("events", "big.csv", csv.as_bytes());
        let (code, report) = p.run_with(&["--memory-limit", limit]);
        assert_eq!(code, 0, "{report}");
        let t = &report["tables"]["events_clean"];
        assert_eq!(t["rows_written"], KEYS, "{t}");
        assert_eq!(t["rows_duplicate"], again, "{t}");
        let spilled = t["dedup_spilled_partitions"].as_u64().unwrap_or(0);
        let keys = t["dedup_spilled_keys"].as_u64().unwrap_or(0);
        if limit == "64MiB" {
            assert!(spilled >= 64, "{t}");
            assert!(keys >= 500_000, "{t}");
        } else {
            assert_eq!((spilled, keys), (0, 0), "{t}");
        }
        let out = p.sluice(&[
            "query",
            "SELECT note, seq, count(*) AS n FROM events_clean GROUP BY note, seq ORDER BY 1, 2",
            "--format",
            "csv",
        ]);
        assert!(out.status.success(), "{}", text(&out));
        let summary = String::from_utf8_lossy(&out.stdout).into_owned();
        let out = p.sluice(&[
            "query",
            "SELECT id, seq, note, day FROM events_clean WHERE id LIKE 'k1%' ORDER BY id",
            "--format",
            "csv",
        ]);
        assert!(out.status.success(), "{}", text(&out));
        let rows = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            p.files("_sluice/tmp").is_empty(),
            "{:?}",
            p.files("_sluice/tmp")
        );
        outcomes.push((summary, rows));
    }
    // Of the keys seen again, a third lost (seq 4); the others' newer or tied rows won.
    let older = (0..KEYS).step_by(7).filter(|k| (k / 7) % 3 == 0).count();
    let expected = format!(
        "note,seq,n\nagain,5,{}\nagain,6,{}\nfirst,5,{}\n",
        (0..KEYS).step_by(7).filter(|k| (k / 7) % 3 == 1).count(),
        (0..KEYS).step_by(7).filter(|k| (k / 7) % 3 == 2).count(),
        KEYS as usize - again as usize + older,
    );
    assert_eq!(outcomes[0].0.trim_end(), expected.trim_end());
    assert_eq!(outcomes[0], outcomes[1]);
}

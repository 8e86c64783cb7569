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

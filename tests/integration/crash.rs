//! Crash injection: a run killed at any step, then rerun, gives exactly the tables of an
//! uninterrupted run.

use crate::support::*;

/// Every `--crash-at` point, in the order a run passes them.
pub const STEPS: [&str; 8] = [
    "claimed",
    "read",
    "staged",
    "committed",
    "indexed",
    "published",
    "archived",
    "warehouse",
];

#[test]
fn a_crash_at_any_step_then_a_rerun_gives_the_uninterrupted_tables() {
    // And inside the warehouse step: partitions swapped in, the aggregate's state not written.
    for step in STEPS.into_iter().chain(["aggregate-swapped"]) {
        let p = Project::with_fixtures();
        let out = p.sluice(&["run", "--json", "--crash-at", step]);
        assert!(
            !out.status.success(),
            "{step}: the injected crash did not happen"
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(&format!("injected crash at {step}"))
        );
        let (code, report) = p.run();
        assert_eq!(code, 0, "{step}: {report:#}");
        assert_example_tables(&p);
        // The ledger holds each raw file once.
        let out = p.sluice(&["status", "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(status["processed_files"], 6, "{step}");
        assert_example_warehouse(&p);
        let out = p.sluice(&[
            "query",
            "SELECT sum(tickets) AS n FROM daily_ticket_stats",
            "--format",
            "csv",
        ]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "n\n1033",
            "{step}"
        );
        // And once more: nothing to do.
        let (code, report) = p.run();
        assert_eq!(
            (code, report["status"].as_str()),
            (0, Some("nothing_to_do")),
            "{step}"
        );
    }
}

#[test]
fn a_crash_during_a_merge_keeps_the_older_rows_until_the_rerun() {
    let p = Project::empty();
    p.add_fixture("support_tickets", "2024-03-01.csv");
    p.add_fixture("support_tickets", "2024-03-02.csv");
    assert_eq!(p.run().0, 0);
    let before = p.rows("processed/support_tickets");
    p.add_fixture("support_tickets", "2024-03-03.csv.gz");
    let out = p.sluice(&["run", "--crash-at", "staged"]);
    assert!(!out.status.success());
    // Nothing of the crashed commit is visible.
    assert_eq!(p.rows("processed/support_tickets"), before);
    assert_eq!(p.run().0, 0);
    assert_eq!(p.rows("processed/support_tickets"), TICKETS_ROWS);
}

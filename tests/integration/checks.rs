//! Data checks (`[[table.check]]`): a failing `error` check publishes nothing and leaves the
//! raw files for the next run; `warn` checks publish and report; `validate` plans the checks;
//! `sluice check TABLE` runs them on the whole table.

use serde_json::Value;

use crate::support::*;

/// A pipeline of one CSV source `orders` and one table `orders_clean` partitioned by `day`;
/// rows without an id are rejected. `checks` is appended to the table.
fn project(checks: &str) -> Project {
    let p = Project::empty();
    std::fs::write(
        p.config(),
        format!(
            "[lake]\nroot = \"lake\"\n\n[retry]\nmax_attempts = 2\n\n[[source]]\nname = \"orders\"\n\
             format = \"csv\"\nschema = \"orders.toml\"\n\n[[table]]\nname = \"orders_clean\"\n\
             source = \"orders\"\nquery = \"orders.sql\"\npartition_by = [\"day\"]\n\n{checks}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        p.path().join("orders.toml"),
        "columns = [{ name = \"id\", type = \"int64\" }, { name = \"day\", type = \"string\" }, \
         { name = \"status\", type = \"string\" }, { name = \"amount\", type = \"int64\" }]\n",
    )
    .unwrap();
    std::fs::write(
        p.path().join("orders.sql"),
        "SELECT id, day, status, amount, \
         CASE WHEN id IS NULL THEN 'missing id' END AS _reject_reason, _source_file, _source_row \
         FROM orders\n",
    )
    .unwrap();
    p
}

/// Rows `(id, day, status, amount)` as CSV; `None` is an empty field.
fn csv(rows: &[(Option<i64>, &str, &str, Option<i64>)]) -> Vec<u8> {
    let mut s = "id,day,status,amount\n".to_string();
    for (id, day, status, amount) in rows {
        let f = |v: &Option<i64>| v.map(|v| v.to_string()).unwrap_or_default();
        s.push_str(&format!("{},{day},{status},{}\n", f(id), f(amount)));
    }
    s.into_bytes()
}

/// `n` good rows from id `first`, over two days.
fn good(first: i64, n: i64) -> Vec<(Option<i64>, &'static str, &'static str, Option<i64>)> {
    (first..first + n)
        .map(|i| {
            (
                Some(i),
                if i % 2 == 0 {
                    "2024-03-01"
                } else {
                    "2024-03-02"
                },
                "open",
                Some(i * 10),
            )
        })
        .collect()
}

fn checks(report: &Value) -> Vec<Value> {
    report["checks"].as_array().cloned().unwrap_or_default()
}

fn check<'a>(list: &'a [Value], kind: &str) -> &'a Value {
    list.iter()
        .find(|c| c["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} check in {list:?}"))
}

const STRICT: &str = "[[table.check]]\nnot_null = [\"amount\"]\n\n\
                      [[table.check]]\naccepted_values = { column = \"status\", values = [\"open\", \"closed\"] }\n\n\
                      [[table.check]]\nmax_reject_rate = 0.2\n";

#[test]
fn failing_checks_publish_nothing_and_a_fixed_rerun_publishes() {
    let p = project(STRICT);
    let mut rows = good(1, 10);
    rows[2].3 = None; // a null amount
    rows[4].2 = "bogus"; // a status not accepted
    rows[5].2 = "bogus";
    rows.push((None, "2024-03-01", "open", Some(1))); // rejected: no id
    rows.push((None, "2024-03-01", "open", Some(2)));
    rows.push((None, "2024-03-02", "open", Some(3)));
    p.add_raw("orders", "a.csv", &csv(&rows));
    let (code, report) = p.run();
    assert_eq!(code, 1, "{report:#}");
    let list = checks(&report);
    assert_eq!(list.len(), 3, "{list:?}");
    let nn = check(&list, "not_null");
    assert_eq!(nn["passed"], false);
    assert_eq!(nn["message"], "amount: 1 nulls");
    let av = check(&list, "accepted_values");
    assert_eq!(av["passed"], false);
    assert!(
        av["message"].as_str().unwrap().starts_with("2 rows"),
        "{av}"
    );
    assert_eq!(av["rows"][0]["status"], "bogus");
    let rr = check(&list, "max_reject_rate");
    assert_eq!(rr["passed"], false);
    let expected = format!("3 of {} rows rejected", rows.len());
    assert!(
        rr["message"].as_str().unwrap().starts_with(&expected),
        "{rr}"
    );
    // Nothing published or staged; the raw file waits for the next run.
    assert!(
        p.files("processed").is_empty(),
        "{:?}",
        p.files("processed")
    );
    assert!(p.files("rejected").is_empty());
    assert!(p.files("_sluice/staging").is_empty());
    assert_eq!(p.files("raw/orders"), vec!["raw/orders/a.csv".to_string()]);
    let f = &report["files"][0];
    assert_eq!(f["status"], "failed");
    assert!(
        f["error"].as_str().unwrap().contains("data checks failed"),
        "{f}"
    );
    // The summary says it.
    let out = p.sluice(&["status"]);
    assert!(out.status.success(), "{}", text(&out));

    // The data fixed: the rerun publishes it all.
    let fixed = good(1, 10);
    p.add_raw("orders", "a.csv", &csv(&fixed));
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    assert!(checks(&report).iter().all(|c| c["passed"] == true));
    assert_eq!(p.rows("processed/orders_clean"), fixed.len());
    let mut amounts: Vec<i64> = p
        .strings("processed/orders_clean", "amount")
        .into_iter()
        .map(|a| a.unwrap().parse().unwrap())
        .collect();
    amounts.sort();
    let want: Vec<i64> = fixed.iter().map(|r| r.3.unwrap()).collect();
    assert_eq!(amounts, want);
    assert!(p.files("raw/orders").is_empty());
}

#[test]
fn a_batch_failing_every_attempt_goes_to_failed() {
    let p = project(STRICT);
    let mut rows = good(1, 4);
    rows[0].3 = None;
    p.add_raw("orders", "a.csv", &csv(&rows));
    assert_eq!(p.run().0, 1);
    assert_eq!(p.files("raw/orders").len(), 1);
    assert_eq!(p.run().0, 1);
    assert!(p.files("raw/orders").is_empty());
    assert!(
        p.files("failed/orders")
            .contains(&"failed/orders/a.csv".to_string())
    );
    assert!(p.files("processed").is_empty());
}

#[test]
fn warn_checks_publish_and_report() {
    let p = project(
        "[[table.check]]\nname = \"known status\"\nseverity = \"warn\"\n\
         accepted_values = { column = \"status\", values = [\"open\"] }\n",
    );
    let mut rows = good(1, 6);
    rows[1].2 = "closed";
    p.add_raw("orders", "a.csv", &csv(&rows));
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    let list = checks(&report);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["name"], "known status");
    assert_eq!(list[0]["severity"], "warn");
    assert_eq!(list[0]["passed"], false);
    assert!(list[0]["message"].as_str().unwrap().starts_with("1 rows"));
    assert_eq!(p.rows("processed/orders_clean"), rows.len());
    // The summary line says it.
    p.add_raw(
        "orders",
        "b.csv",
        &csv(&[(Some(99), "2024-03-03", "void", Some(1))]),
    );
    let out = p.sluice(&["run"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("checks: 1 run, 1 failed"), "{t}");
    assert!(t.contains("known status WARNING"), "{t}");
}

#[test]
fn an_sql_check_puts_its_rows_in_the_report() {
    let p = project(
        "[[table.check]]\nsql = \"queries/checks/no_big_orders.sql\"\n\n\
         [[table.check]]\nunique = [\"id\"]\nseverity = \"warn\"\n",
    );
    std::fs::create_dir_all(p.path().join("queries/checks")).unwrap();
    std::fs::write(
        p.path().join("queries/checks/no_big_orders.sql"),
        "SELECT id, day, amount FROM orders_clean WHERE amount > 1000 ORDER BY id",
    )
    .unwrap();
    let mut rows = good(1, 8);
    rows[3].3 = Some(5000);
    rows[6].3 = Some(7000);
    rows.push((Some(2), "2024-03-01", "open", Some(20))); // id 2 twice
    p.add_raw("orders", "a.csv", &csv(&rows));
    let (code, report) = p.run();
    assert_eq!(code, 1, "{report:#}");
    let list = checks(&report);
    let sql = check(&list, "sql");
    assert_eq!(sql["passed"], false);
    assert!(
        sql["message"]
            .as_str()
            .unwrap()
            .ends_with("returned 2 rows"),
        "{sql}"
    );
    let got: Vec<(i64, String, i64)> = sql["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["id"].as_i64().unwrap(),
                r["day"].as_str().unwrap().to_string(),
                r["amount"].as_i64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(i64, String, i64)> = rows
        .iter()
        .filter(|r| r.3.unwrap() > 1000)
        .map(|r| (r.0.unwrap(), r.1.to_string(), r.3.unwrap()))
        .collect();
    assert_eq!(got, want);
    let u = check(&list, "unique");
    assert_eq!(u["passed"], false);
    assert_eq!(u["rows"][0]["id"], 2);
    assert_eq!(u["rows"][0]["rows"], 2);
    assert!(p.files("processed").is_empty());
}

#[test]
fn min_rows_and_row_count_change() {
    let p = project("[[table.check]]\nmin_rows = 3\n\n[[table.check]]\nrow_count_change = 2.0\n");
    // Too few rows.
    p.add_raw("orders", "a.csv", &csv(&good(1, 2)));
    let (code, report) = p.run();
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(
        check(&checks(&report), "min_rows")["message"],
        "2 rows (at least 3)"
    );
    let list = checks(&report);
    let rc = check(&list, "row_count_change");
    assert_eq!(rc["passed"], true);
    assert!(
        rc["message"]
            .as_str()
            .unwrap()
            .contains("no previous commit")
    );
    std::fs::remove_file(p.lake().join("raw/orders/a.csv")).unwrap();

    // A first batch of 10, then 4 (less than half): refused; then 6: published.
    p.add_raw("orders", "b.csv", &csv(&good(100, 10)));
    assert_eq!(p.run().0, 0);
    p.add_raw("orders", "c.csv", &csv(&good(200, 4)));
    let (code, report) = p.run();
    assert_eq!(code, 1, "{report:#}");
    let list = checks(&report);
    let rc = check(&list, "row_count_change");
    assert_eq!(rc["passed"], false);
    assert!(
        rc["message"]
            .as_str()
            .unwrap()
            .starts_with("4 rows written, the previous commit 10"),
        "{rc}"
    );
    assert_eq!(p.rows("processed/orders_clean"), 10);
    std::fs::remove_file(p.lake().join("raw/orders/c.csv")).unwrap();
    p.add_raw("orders", "d.csv", &csv(&good(300, 6)));
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(p.rows("processed/orders_clean"), 16);
}

#[test]
fn validate_plans_every_check() {
    let p = project(STRICT);
    let out = p.sluice(&["validate"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("orders_clean: 3 checks"),
        "{}",
        text(&out)
    );

    let p = project("[[table.check]]\nnot_null = [\"amount\", \"price\"]\n");
    let out = p.sluice(&["validate"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(
        t.contains("check 1 (not_null(amount,price))") && t.contains("no column price"),
        "{t}"
    );

    let p = project("[[table.check]]\nsql = \"bad.sql\"\n");
    std::fs::write(p.path().join("bad.sql"), "SELECT nope FROM orders_clean").unwrap();
    let out = p.sluice(&["validate"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("bad.sql") && t.contains("nope"), "{t}");

    let p = project("[[table.check]]\nmin_rows = 1\nnot_null = [\"id\"]\n");
    let out = p.sluice(&["validate"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(
        t.contains("table orders_clean check 1") && t.contains("not_null, min_rows"),
        "{t}"
    );

    let p = project("[[table.check]]\nseverity = \"warn\"\n");
    let out = p.sluice(&["validate"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("names no check"), "{}", text(&out));
}

#[test]
fn check_command_runs_the_checks_on_the_whole_table() {
    let p = project("[[table.check]]\nnot_null = [\"amount\"]\n");
    p.add_raw("orders", "a.csv", &csv(&good(1, 5)));
    assert_eq!(p.run().0, 0);
    p.add_raw("orders", "b.csv", &csv(&good(10, 3)));
    assert_eq!(p.run().0, 0);
    let out = p.sluice(&["check", "orders_clean"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("orders_clean not_null(amount) passed"),
        "{}",
        text(&out)
    );

    // A stricter check on the whole table: 5 + 3 rows, of which `closed` none.
    p.edit_config(
        "not_null = [\"amount\"]",
        "not_null = [\"amount\"]\n\n[[table.check]]\nmin_rows = 9\n\n[[table.check]]\n\
         max_reject_rate = 0.0\n\n[[table.check]]\naccepted_values = { column = \"status\", values = [\"closed\"] }",
    );
    let out = p.sluice(&["check", "orders_clean", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    let list = v["checks"].as_array().unwrap().clone();
    assert_eq!(check(&list, "min_rows")["message"], "8 rows (at least 9)");
    assert_eq!(check(&list, "max_reject_rate")["passed"], true);
    let av = check(&list, "accepted_values");
    assert_eq!(av["message"], "8 rows with 1 values of status not accepted");
    assert_eq!(av["rows"][0]["rows"], 8);
}

/// `sluice check --json` on the project: the exit code and the answer.
fn check_json(p: &Project, extra: &[&str]) -> (i32, Value) {
    let mut args = vec!["check", "orders_clean", "--json"];
    args.extend_from_slice(extra);
    let out = p.sluice(&args);
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    (out.status.code().unwrap_or(-1), v)
}

#[cfg(feature = "delta")]
#[test]
fn checks_hold_a_delta_batch_back_and_check_reads_only_its_active_files() {
    let p = project("[[table.check]]\nnot_null = [\"amount\"]\n\n[[table.check]]\nmin_rows = 1\n");
    p.edit_config(
        "partition_by = [\"day\"]",
        "partition_by = [\"day\"]\nformat = \"delta\"",
    );
    let mut rows = good(1, 10);
    rows[2].3 = None;
    p.add_raw("orders", "a.csv", &csv(&rows));
    let (code, report) = p.run();
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(check(&checks(&report), "not_null")["passed"], false);
    let log = p.lake().join("processed/orders_clean/_delta_log");
    let commits = || {
        std::fs::read_dir(&log)
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .path()
                        .extension()
                        .is_some_and(|x| x == "json")
                })
                .count()
            })
            .unwrap_or(0)
    };
    assert_eq!(
        commits(),
        0,
        "no Delta commit for a batch that failed its checks"
    );
    p.add_raw("orders", "a.csv", &csv(&good(1, 10)));
    assert_eq!(p.run().0, 0);
    let first = commits();
    assert!(first >= 1);
    p.add_raw("orders", "b.csv", &csv(&good(20, 4)));
    assert_eq!(p.run().0, 0);
    assert_eq!(commits(), first + 1);
    // OPTIMIZE leaves the replaced files on disk: `check` counts the active files' rows only.
    let out = p.sluice(&["compact", "orders_clean"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        p.rows("processed/orders_clean") > 14,
        "the old files are still there"
    );
    p.edit_config("min_rows = 1", "min_rows = 15");
    let (code, v) = check_json(&p, &[]);
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(
        check(v["checks"].as_array().unwrap(), "min_rows")["message"],
        "14 rows (at least 15)"
    );
    assert_eq!(
        check(v["checks"].as_array().unwrap(), "not_null")["passed"],
        true
    );
}

#[test]
fn checks_hold_a_batch_back_on_an_s3_lake() {
    let moto = crate::aws::Moto::start();
    moto.create_bucket("checks");
    let p = project(STRICT);
    std::fs::write(
        p.config(),
        std::fs::read_to_string(p.config())
            .unwrap()
            .replace("root = \"lake\"", "root = \"s3://checks/lake\""),
    )
    .unwrap();
    let mut rows = good(1, 10);
    rows[4].2 = "bogus";
    moto.put("checks", "lake/raw/orders/a.csv", csv(&rows));
    let (code, report) = crate::aws::run_json(&moto, &p, &[]);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(check(&checks(&report), "accepted_values")["passed"], false);
    assert!(moto.keys("checks", "lake/processed/").is_empty());
    assert!(moto.keys("checks", "lake/_sluice/staging/").is_empty());
    assert_eq!(
        moto.keys("checks", "lake/raw/"),
        vec!["lake/raw/orders/a.csv".to_string()]
    );
    moto.put("checks", "lake/raw/orders/a.csv", csv(&good(1, 10)));
    let (code, report) = crate::aws::run_json(&moto, &p, &[]);
    assert_eq!(code, 0, "{report:#}");
    assert!(checks(&report).iter().all(|c| c["passed"] == true));
    let (code, out, err) = crate::aws::sluice(&moto, &p, &["check", "orders_clean", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], true, "{v:#}");
}

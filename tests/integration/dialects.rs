//! CSV dialects and text encodings (issue 16): header case, skipped lines, comments, TSV and
//! other delimiters, backslash escapes, null spellings, Latin-1 / windows-1252 / UTF-16 files,
//! with typed columns whose bad values reject their row alone.

use serde_json::Value;

use crate::support::*;

/// Adds lines after the source's `schema = ...` line of a `single_table` project.
fn source_options(p: &Project, source: &str, lines: &str) {
    let at = format!("schema = \"{source}.toml\"\n");
    p.edit_config(&at, &format!("{at}{lines}\n"));
}

/// The values of `columns` in a table's Parquet files, one row each, sorted by the first
/// column as a number.
fn rows(p: &Project, prefix: &str, columns: &[&str]) -> Vec<Vec<Option<String>>> {
    let cols: Vec<Vec<Option<String>>> = columns.iter().map(|c| p.strings(prefix, c)).collect();
    let mut rows: Vec<Vec<Option<String>>> = (0..cols[0].len())
        .map(|i| cols.iter().map(|c| c[i].clone()).collect())
        .collect();
    rows.sort_by_key(|r| {
        r[0].as_deref()
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(i64::MAX)
    });
    rows
}

fn some(values: &[&str]) -> Vec<Option<String>> {
    values.iter().map(|v| Some(v.to_string())).collect()
}

/// Text as ISO-8859-1 bytes: each character is its code point (all below 256 here).
fn latin1(text: &str) -> Vec<u8> {
    text.chars()
        .map(|c| u8::try_from(c as u32).expect("a Latin-1 character"))
        .collect()
}

/// Text as windows-1252 bytes: Latin-1, plus the printable characters of 0x80..0x9F used here.
fn windows_1252(text: &str) -> Vec<u8> {
    text.chars()
        .map(|c| match c {
            '€' => 0x80,
            '‘' => 0x91,
            '’' => 0x92,
            '“' => 0x93,
            '”' => 0x94,
            '–' => 0x96,
            c => u8::try_from(c as u32).expect("a Latin-1 character"),
        })
        .collect()
}

fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// The SHA-256 the ledger holds for each raw file (by file name).
fn ledger_hashes(p: &Project) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    for f in p.files("_sluice/ledger") {
        let entry: Value = serde_json::from_slice(&std::fs::read(p.lake().join(&f)).unwrap())
            .unwrap_or_else(|e| panic!("{f}: {e}"));
        for file in entry["files"].as_array().into_iter().flatten() {
            let key = file["key"].as_str().unwrap_or_default();
            let name = key.rsplit('/').next().unwrap_or_default().to_string();
            out.insert(
                name,
                file["sha256"].as_str().unwrap_or_default().to_string(),
            );
        }
    }
    out
}

/// A CRM export's mixed-case header matches the schema with `header_case = "insensitive"`;
/// the default exact matching fails the file, naming it, the missing column and the header's
/// columns.
#[test]
fn header_case_insensitive_reads_a_mixed_case_crm_header() {
    let columns = "[{ name = \"customer_id\", type = \"int64\" }, { name = \"full_name\", type = \"string\" }, { name = \"email\", from = \"E-Mail\", type = \"string\" }]";
    let sql = "SELECT customer_id, full_name, email, _source_file, _source_row FROM crm";
    let data = b"Customer_ID,FULL_NAME,e-mail,Segment\n7,Ada Lovelace,ada@example.com,A\n8,Alan Turing,alan@example.com,B\n";

    let exact = Project::single_table("crm", "csv", columns, sql);
    exact.add_raw("crm", "contacts.csv", data);
    let (code, report) = exact.run();
    assert_eq!(code, 1, "{report:#}");
    let f = &report["files"][0];
    assert_eq!(f["status"], "failed", "{f}");
    let err = f["error"].as_str().unwrap();
    assert!(
        err.contains("contacts.csv")
            && err.contains("the header has no column \"customer_id\"")
            && err.contains("(it has: Customer_ID, FULL_NAME, e-mail, Segment)"),
        "{err}"
    );
    assert!(exact.files("processed").is_empty());

    let p = Project::single_table("crm", "csv", columns, sql);
    source_options(&p, "crm", "header_case = \"insensitive\"");
    p.add_raw("crm", "contacts.csv", data);
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(
        rows(
            &p,
            "processed/crm_clean",
            &["customer_id", "full_name", "email"]
        ),
        [
            some(&["7", "Ada Lovelace", "ada@example.com"]),
            some(&["8", "Alan Turing", "alan@example.com"])
        ]
    );
}

/// A TSV row: id, name, qty.
type TsvRow = (i64, &'static str, i64);

/// A headerless TSV with two preamble lines (`skip_rows`, one with an odd quote) and comment
/// lines before and between records: columns by position, tabs inside quotes kept, rows
/// numbered by the file's lines, a bad int64 rejected alone.
#[test]
fn a_headerless_tsv_with_comments_and_skipped_rows() {
    let p = Project::single_table(
        "events",
        "csv",
        "[{ name = \"id\", type = \"int64\" }, { name = \"name\", type = \"string\" }, { name = \"qty\", type = \"int64\" }]",
        "SELECT id, name, qty, _source_row AS line, _source_file, _source_row FROM events",
    );
    source_options(
        &p,
        "events",
        "csv = { delimiter = \"\\t\", header = false, skip_rows = 2, comment = \"#\" }",
    );
    // Each line and the row it holds (id, name, qty), if any: the expected rows are computed
    // from the lines written.
    let records: [(&str, Option<TsvRow>); 8] = [
        ("Report generated 2024-03-01\t(do not edit)", None),
        ("\"an unbalanced quote in the preamble", None),
        ("# id\tname\tqty", None),
        ("1\tanna\t5", Some((1, "anna", 5))),
        ("2\t\"tab\there\"\t7", Some((2, "tab\there", 7))),
        ("# another \"comment", None),
        ("3\tcarl\tmany", None),
        ("4\tdora\t-2", Some((4, "dora", -2))),
    ];
    let mut data = String::new();
    for (text, _) in &records {
        data.push_str(text);
        data.push('\n');
    }
    p.add_raw("events", "day.tsv", data.as_bytes());
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(
        file_counts(&report)["events/day.tsv"],
        ("processed".into(), 4, 3, 1, 0)
    );
    let want: Vec<Vec<Option<String>>> = records
        .iter()
        .enumerate()
        .filter_map(|(i, (_, r))| {
            let (id, name, qty) = (*r)?;
            Some(vec![
                Some(id.to_string()),
                Some(name.to_string()),
                Some(qty.to_string()),
                Some((i + 1).to_string()),
            ])
        })
        .collect();
    assert_eq!(
        rows(&p, "processed/events_clean", &["id", "name", "qty", "line"]),
        want
    );
    let line = 1 + records
        .iter()
        .position(|(t, _)| t.starts_with("3\t"))
        .unwrap();
    assert_eq!(
        p.strings("rejected/events_clean", "_source_row"),
        [Some(line.to_string())]
    );
    assert_eq!(
        p.strings("rejected/events_clean", "_reject_reason"),
        [Some(
            "column qty: \"many\" is not a valid int64".to_string()
        )]
    );
}

/// A CRM customer: id, name, city, balance in cents, (day, month, year) of the first order.
type Customer = (i64, &'static str, &'static str, i64, (u32, u32, i32));

/// A CRM export in Latin-1 with CRLF line ends, `;` delimiters, accented names, a decimal with
/// a point and German dates: read back as the UTF-8 text the test encoded; a bad decimal and a
/// bad date reject their rows alone, with the decoded text as `_raw_record`; the ledger holds
/// the hash of the stored (Latin-1) bytes.
#[test]
fn a_latin1_crm_export_with_crlf_and_semicolons() {
    let p = Project::single_table(
        "crm",
        "csv",
        "[{ name = \"id\", from = \"Kundennr\", type = \"int64\" }, \
          { name = \"name\", from = \"Name\", type = \"string\" }, \
          { name = \"city\", from = \"Stadt\", type = \"string\" }, \
          { name = \"balance\", from = \"Saldo\", type = \"decimal(12,2)\" }, \
          { name = \"since\", from = \"Kunde seit\", type = \"date\", format = \"%d.%m.%Y\" }]",
        "SELECT id, name, city, balance, since, _source_row AS line, _source_file, _source_row FROM crm",
    );
    source_options(
        &p,
        "crm",
        "encoding = \"latin1\"\ncsv = { delimiter = \";\" }",
    );
    let good: [Customer; 4] = [
        (1, "José Müller", "Málaga", 123_450, (1, 3, 2024)),
        (2, "Françoise Nuñez", "Zürich", -1_705, (15, 11, 2023)),
        (4, "Ñandú Öztürk", "São Paulo", 10, (29, 2, 2024)),
        (6, "Zoë Ångström", "Logroño", 700, (5, 6, 2021)),
    ];
    let bad_decimal = "3;Jürgen Weiß;Köln;12,5x;02.01.2022";
    let bad_date = "5;Søren Kierkegård;Århus;1.00;31.13.2024";
    let line_of = |(id, name, city, cents, (d, m, y)): &Customer| {
        let sign = if *cents < 0 { "-" } else { "" };
        format!(
            "{id};{name};{city};{sign}{}.{:02};{d:02}.{m:02}.{y}",
            cents.abs() / 100,
            cents.abs() % 100
        )
    };
    let lines = [
        "Kundennr;Name;Stadt;Saldo;Kunde seit".to_string(),
        line_of(&good[0]),
        line_of(&good[1]),
        bad_decimal.to_string(),
        line_of(&good[2]),
        bad_date.to_string(),
        line_of(&good[3]),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\r\n")).collect();
    let stored = latin1(&text);
    assert!(stored.iter().any(|&b| b >= 0x80) && std::str::from_utf8(&stored).is_err());
    p.add_raw("crm", "export.csv", &stored);
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(
        file_counts(&report)["crm/export.csv"],
        ("processed".into(), 6, 4, 2, 0)
    );
    let want: Vec<Vec<Option<String>>> = good
        .iter()
        .map(|r| {
            let (id, name, city, cents, (d, m, y)) = *r;
            let sign = if cents < 0 { "-" } else { "" };
            let line = 1 + lines.iter().position(|l| *l == line_of(r)).unwrap();
            some(&[
                &id.to_string(),
                name,
                city,
                &format!("{sign}{}.{:02}", cents.abs() / 100, cents.abs() % 100),
                &format!("{y:04}-{m:02}-{d:02}"),
                &line.to_string(),
            ])
        })
        .collect();
    assert_eq!(
        rows(
            &p,
            "processed/crm_clean",
            &["id", "name", "city", "balance", "since", "line"]
        ),
        want
    );
    let rejected = rows(
        &p,
        "rejected/crm_clean",
        &["_source_row", "_reject_reason", "_raw_record"],
    );
    let line = |raw: &str| (1 + lines.iter().position(|l| l == raw).unwrap()).to_string();
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    assert_eq!(rejected[0][0], Some(line(bad_decimal)));
    assert_eq!(
        rejected[0][1].as_deref(),
        Some("column balance: \"12,5x\" is not a valid decimal(12,2)")
    );
    assert_eq!(rejected[0][2].as_deref(), Some(bad_decimal));
    assert_eq!(rejected[1][0], Some(line(bad_date)));
    let reason = rejected[1][1].as_deref().unwrap();
    assert!(
        reason.starts_with("column since: \"31.13.2024\" is not a valid date"),
        "{reason}"
    );
    assert_eq!(rejected[1][2].as_deref(), Some(bad_date));
    assert_eq!(ledger_hashes(&p)["export.csv"], sha256(&stored));
}

/// `encoding = "utf-16"`: a little-endian file with its BOM and a big-endian one with its own
/// are each decoded by their BOM (non-BMP characters and CRLF included); hashes are of the
/// stored bytes.
#[test]
fn utf16_files_decode_by_their_bom() {
    let p = Project::single_table(
        "notes",
        "csv",
        "[{ name = \"id\", type = \"int64\" }, { name = \"author\", type = \"string\" }, { name = \"note\", type = \"string\" }]",
        "SELECT id, author, note, _source_file, _source_row FROM notes",
    );
    source_options(&p, "notes", "encoding = \"utf-16\"");
    let le_rows = [
        (1, "Łukasz", "naïve, “quoted”\r\nsecond line"),
        (2, "李雷", "party 🎉"),
    ];
    let be_rows = [(3, "Ἀριστοτέλης", "σοφία"), (4, "Ana", "")];
    let csv = |rows: &[(i32, &str, &str)]| {
        let mut s = String::from("id,author,note\r\n");
        for (id, author, note) in rows {
            s.push_str(&format!("{id},{author},\"{note}\"\r\n"));
        }
        s
    };
    let mut le = vec![0xff, 0xfe];
    le.extend(csv(&le_rows).encode_utf16().flat_map(u16::to_le_bytes));
    let mut be = vec![0xfe, 0xff];
    be.extend(csv(&be_rows).encode_utf16().flat_map(u16::to_be_bytes));
    p.add_raw("notes", "le.csv", &le);
    p.add_raw("notes", "be.csv", &be);
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    let counts = file_counts(&report);
    assert_eq!(counts["notes/le.csv"], ("processed".into(), 2, 2, 0, 0));
    assert_eq!(counts["notes/be.csv"], ("processed".into(), 2, 2, 0, 0));
    let want: Vec<Vec<Option<String>>> = le_rows
        .iter()
        .chain(&be_rows)
        .map(|(id, author, note)| {
            vec![
                Some(id.to_string()),
                Some(author.to_string()),
                // An empty field is null (the default null value).
                (!note.is_empty()).then(|| note.to_string()),
            ]
        })
        .collect();
    assert_eq!(
        rows(&p, "processed/notes_clean", &["id", "author", "note"]),
        want
    );
    let hashes = ledger_hashes(&p);
    assert_eq!(hashes["le.csv"], sha256(&le));
    assert_eq!(hashes["be.csv"], sha256(&be));
}

/// windows-1252: `€` (0x80), curly quotes and an en dash (0x91..0x96) decode to their
/// characters, with a `|` delimiter.
#[test]
fn a_windows_1252_file_with_euro_and_curly_quotes() {
    let p = Project::single_table(
        "offers",
        "csv",
        "[{ name = \"id\", type = \"int64\" }, { name = \"label\", type = \"string\" }, { name = \"price\", type = \"string\" }]",
        "SELECT id, label, price, _source_file, _source_row FROM offers",
    );
    source_options(
        &p,
        "offers",
        "encoding = \"windows-1252\"\ncsv = { delimiter = \"|\" }",
    );
    let offers = [
        (1, "“Premium” café – 5 € off", "€ 12.00"),
        (2, "Kid’s ‘mini’ menu", "7,50 €"),
    ];
    let mut text = String::from("id|label|price\n");
    for (id, label, price) in &offers {
        text.push_str(&format!("{id}|{label}|{price}\n"));
    }
    let stored = windows_1252(&text);
    assert!(stored.contains(&0x80) && stored.contains(&0x93));
    p.add_raw("offers", "offers.csv", &stored);
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    let want: Vec<Vec<Option<String>>> = offers
        .iter()
        .map(|(id, label, price)| some(&[&id.to_string(), label, price]))
        .collect();
    assert_eq!(
        rows(&p, "processed/offers_clean", &["id", "label", "price"]),
        want
    );
    assert_eq!(ledger_hashes(&p)["offers.csv"], sha256(&stored));
}

/// `escape = "\\"`: `\"` inside quoted fields, an escaped backslash before a closing quote,
/// delimiters and newlines inside quotes, in a file of several read chunks; each row keeps the
/// line its record starts at.
#[test]
fn backslash_escaped_quotes_across_chunks() {
    let p = Project::single_table(
        "msgs",
        "csv",
        "[{ name = \"id\", type = \"int64\" }, { name = \"body\", type = \"string\" }, { name = \"tail\", type = \"string\" }]",
        "SELECT id, body, tail, _source_row AS line, _source_file, _source_row FROM msgs",
    );
    source_options(&p, "msgs", "csv = { escape = \"\\\\\" }");
    let filler = "x".repeat(40);
    let mut data = String::from("id,body,tail\n");
    let mut want = Vec::new();
    let mut line = 2;
    for i in 0..40_000 {
        let (raw, body) = match i % 3 {
            0 => (
                format!("\"He said \\\"hi {i}\\\", then left;\nsecond line {filler}\""),
                format!("He said \"hi {i}\", then left;\nsecond line {filler}"),
            ),
            1 => (
                format!("\"C:\\\\data\\\\{i}\\\\\""),
                format!("C:\\data\\{i}\\"),
            ),
            _ => (format!("plain {i} {filler}"), format!("plain {i} {filler}")),
        };
        data.push_str(&format!("{i},{raw},t{i}\n"));
        want.push(some(&[
            &i.to_string(),
            &body,
            &format!("t{i}"),
            &line.to_string(),
        ]));
        line += 1 + raw.matches('\n').count();
    }
    // Cut into chunks of at most 1 MiB (a batch's size / 16 per thread, at least 1 MiB).
    assert!(data.len() > 2 << 20, "{}", data.len());
    p.add_raw("msgs", "big.csv", data.as_bytes());
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(
        file_counts(&report)["msgs/big.csv"],
        ("processed".into(), 40_000, 40_000, 0, 0)
    );
    let got = rows(&p, "processed/msgs_clean", &["id", "body", "tail", "line"]);
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g, w);
    }
}

/// `null_values`: each listed spelling is null, in text and typed columns alike (not a
/// rejection); others, `n/a` included, are values. `null_value` (one) still works.
#[test]
fn null_values_lists_the_spellings_of_null() {
    let columns = "[{ name = \"id\", type = \"int64\" }, { name = \"name\", type = \"string\" }, { name = \"score\", type = \"int64\" }]";
    let sql = "SELECT id, name, score, _source_file, _source_row FROM scores";
    let p = Project::single_table("scores", "csv", columns, sql);
    source_options(
        &p,
        "scores",
        "csv = { null_values = [\"\", \"NULL\", \"N/A\", \"\\\\N\"] }",
    );
    let records = [
        ("1", "NULL", "10"),
        ("2", "", "N/A"),
        ("3", "\\N", "\\N"),
        ("4", "n/a", ""),
        ("5", "-", "3"),
    ];
    let nulls = ["", "NULL", "N/A", "\\N"];
    let mut data = String::from("id,name,score\n");
    for (id, name, score) in &records {
        data.push_str(&format!("{id},{name},{score}\n"));
    }
    p.add_raw("scores", "s.csv", data.as_bytes());
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(
        file_counts(&report)["scores/s.csv"],
        ("processed".into(), 5, 5, 0, 0)
    );
    let cell = |v: &str| (!nulls.contains(&v)).then(|| v.to_string());
    let want: Vec<Vec<Option<String>>> = records
        .iter()
        .map(|(id, name, score)| vec![cell(id), cell(name), cell(score)])
        .collect();
    assert_eq!(
        rows(&p, "processed/scores_clean", &["id", "name", "score"]),
        want
    );

    // One spelling: `null_value`; the empty field is then text.
    let q = Project::single_table("scores", "csv", columns, sql);
    source_options(&q, "scores", "csv = { null_value = \"-\" }");
    q.add_raw("scores", "s.csv", b"id,name,score\n1,-,-\n2,,4\n");
    let (code, report) = q.run();
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(
        rows(&q, "processed/scores_clean", &["id", "name", "score"]),
        [
            vec![Some("1".into()), None, None],
            vec![Some("2".into()), Some(String::new()), Some("4".into())]
        ]
    );
}

/// Dialect mistakes are config errors (exit 2) naming the option.
#[test]
fn dialect_mistakes_are_config_errors_naming_the_option() {
    for (options, wanted) in [
        (
            "csv = { delimiter = \";\", quote = \";\" }",
            "csv.quote and csv.delimiter are the same character",
        ),
        ("csv = { escape = \"\\\\\\\\\" }", "escape"),
        ("csv = { comment = \"€\" }", "csv.comment"),
        (
            "csv = { null_value = \"\", null_values = [\"NULL\"] }",
            "csv.null_value and csv.null_values are both given",
        ),
        ("encoding = \"ebcdic-37\"", "unknown encoding \"ebcdic-37\""),
    ] {
        let p = Project::single_table(
            "t",
            "csv",
            "[{ name = \"id\", type = \"string\" }]",
            "SELECT id, _source_file, _source_row FROM t",
        );
        source_options(&p, "t", options);
        let out = p.sluice(&["validate"]);
        assert_eq!(out.status.code(), Some(2), "{options}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(wanted), "{options}: {err}");
    }
}

/// `encoding` is a source option: JSON lines files are decoded too (a UTF-16LE file with its
/// BOM, a Latin-1 one).
#[test]
fn json_lines_sources_decode_too() {
    let p = Project::single_table(
        "people",
        "jsonl",
        "[{ name = \"id\", type = \"int64\" }, { name = \"name\", type = \"string\" }]",
        "SELECT id, name, _source_file, _source_row FROM people",
    );
    source_options(&p, "people", "encoding = \"utf-16le\"");
    let names = ["Zoë", "Ærøskøbing Ñu", "Łódź 🎉"];
    let mut text = String::new();
    for (i, n) in names.iter().enumerate() {
        text.push_str(&format!("{{\"id\":{i},\"name\":\"{n}\"}}\r\n"));
    }
    let mut stored = vec![0xff, 0xfe];
    stored.extend(text.encode_utf16().flat_map(u16::to_le_bytes));
    p.add_raw("people", "p.jsonl", &stored);
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    let want: Vec<Vec<Option<String>>> = names
        .iter()
        .enumerate()
        .map(|(i, n)| some(&[&i.to_string(), n]))
        .collect();
    assert_eq!(rows(&p, "processed/people_clean", &["id", "name"]), want);
    assert_eq!(ledger_hashes(&p)["p.jsonl"], sha256(&stored));

    let q = Project::single_table(
        "people",
        "jsonl",
        "[{ name = \"id\", type = \"int64\" }, { name = \"name\", type = \"string\" }]",
        "SELECT id, name, _source_file, _source_row FROM people",
    );
    source_options(&q, "people", "encoding = \"latin1\"");
    q.add_raw(
        "people",
        "l.jsonl",
        &latin1("{\"id\":1,\"name\":\"Ångström\"}\n"),
    );
    assert_eq!(q.run().0, 0);
    assert_eq!(
        rows(&q, "processed/people_clean", &["id", "name"]),
        [some(&["1", "Ångström"])]
    );
}

//! Redaction: one process-wide set of sensitive strings and one function, [`mask`], that every
//! output passes through (log lines of every level and format, stdout, the exit message, run
//! reports and `.error.json` files in the lake, notification subjects and bodies).
//!
//! Values are registered when the config loads ([`config_value`]: passwords, and the password
//! and token-like parts of URLs and connection strings from any source) and when a `secret:`
//! reference resolves ([`secret`]: the whole value too). Each value is masked in every form it
//! takes on the way out: as is, percent-encoded (the `url` crate's normalised forms and a fully
//! encoded one), form-encoded, JSON-escaped and Rust-`Debug`-escaped. A value from `secret:<ref>`
//! becomes `[secret:<ref>]`, any other `[redacted:<config key>]`. Values shorter than
//! [`MIN_LEN`] bytes are not masked: they are too likely to be part of ordinary text.

use std::borrow::Cow;
use std::io::Write;
use std::sync::RwLock;

use memchr::memmem::Finder;
use tracing_subscriber::fmt::MakeWriter;

/// The shortest value masked, in bytes.
pub const MIN_LEN: usize = 6;

/// One form of a sensitive value and what replaces it.
struct Entry {
    finder: Finder<'static>,
    mask: String,
}

/// The registered forms (each pattern once) and their masks.
static REGISTRY: RwLock<Vec<Entry>> = RwLock::new(Vec::new());

/// The mask naming a value's origin: characters that could break JSON or a log line out.
fn mask_for(label: &str) -> String {
    let clean: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_-./#:@+=,".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("[{clean}]")
}

/// Registers `value` (in all its encoded forms) to be replaced by `[<label>]`.
fn add(value: &str, label: &str) {
    if value.len() < MIN_LEN {
        return;
    }
    let mask = mask_for(label);
    let forms = forms(value);
    let mut reg = REGISTRY.write().unwrap_or_else(|e| e.into_inner());
    for f in forms {
        if f.len() >= MIN_LEN && !reg.iter().any(|e| e.finder.needle() == f.as_bytes()) {
            reg.push(Entry {
                finder: Finder::new(f.as_bytes()).into_owned(),
                mask: mask.clone(),
            });
        }
    }
}

/// Marks the value of `secret:<reference>` as secret, whole (and trimmed of surrounding
/// whitespace).
pub fn secret(value: &str, reference: &str) {
    let label = format!("secret:{reference}");
    add(value, &label);
    let trimmed = value.trim();
    if trimmed != value {
        add(trimmed, &label);
    }
}

/// Registers what is sensitive in the config value of `key`: with `reference` (the value came
/// from `secret:<reference>`) the whole value; from any source a password setting, and the
/// password, token-like query values and token-like path segments of a URL (a notify target's
/// `webhook:` URL included) or of a `key=value` connection string.
pub fn config_value(key: &str, value: &str, reference: Option<&str>) {
    let label = match reference {
        Some(r) => format!("secret:{r}"),
        None => format!("redacted:{key}"),
    };
    if let Some(r) = reference {
        secret(value, r);
    }
    if key.ends_with("password") {
        add(value, &label);
    }
    // A notify target: its address is the value that errors quote.
    let address = value
        .strip_prefix("webhook:")
        .or_else(|| value.strip_prefix("sns:"))
        .unwrap_or(value);
    if reference.is_some() && address != value {
        add(address, &label);
    }
    // Outside secrets, only the keys that are connection strings or endpoints have parts to hide
    // (an `s3://` lake root has none).
    let connection = key == "warehouse.url" || key.starts_with("notify.");
    if reference.is_none() && !connection {
        return;
    }
    if address.contains("://") {
        url_parts(address, &label, reference.is_some());
    } else if address.contains('=') {
        keyword_parts(address, &label);
    }
}

/// The sensitive parts of a URL; `whole`: the URL is a secret, so its normalised form, every
/// query value and the shorter token-like path segments are too.
fn url_parts(text: &str, label: &str, whole: bool) {
    let tokenish = |s: &str| if whole { token_like(s) } else { long_token(s) };
    let Ok(url) = url::Url::parse(text) else {
        return;
    };
    if whole {
        add(url.as_str(), label);
        add(url.as_str().trim_end_matches('/'), label);
    }
    if let Some(p) = url.password() {
        add(p, label);
        add(&percent_decode(p), label);
    }
    for (k, v) in url.query_pairs() {
        if whole || secret_name(&k) || tokenish(&v) {
            add(&v, label);
        }
    }
    if let Some(query) = url.query() {
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or(("", pair));
            let decoded = percent_decode(v);
            if whole || secret_name(k) || tokenish(&decoded) {
                add(v, label);
            }
        }
    }
    if let Some(segments) = url.path_segments() {
        for s in segments {
            let decoded = percent_decode(s);
            if tokenish(&decoded) {
                add(s, label);
                add(&decoded, label);
            }
        }
    }
}

/// The passwords of a `key=value key=value` connection string (libpq style).
fn keyword_parts(text: &str, label: &str) {
    for pair in text.split_whitespace() {
        if let Some((k, v)) = pair.split_once('=')
            && secret_name(k)
        {
            add(v.trim_matches('\''), label);
        }
    }
}

/// Whether a parameter name suggests a credential.
fn secret_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "pass",
        "pwd",
        "secret",
        "token",
        "key",
        "sig",
        "auth",
        "credential",
        "code",
    ]
    .iter()
    .any(|w| n.contains(w))
}

/// Whether a path segment or query value of a plain config value looks like a token: long, with
/// letters and digits.
fn long_token(s: &str) -> bool {
    s.len() >= 16 && s.chars().any(|c| c.is_ascii_digit()) && s.chars().any(|c| c.is_alphabetic())
}

/// Whether a part of a secret URL looks like a token: long, or letters and digits mixed.
fn token_like(s: &str) -> bool {
    s.len() >= 16
        || (s.len() >= MIN_LEN
            && s.chars().any(|c| c.is_ascii_digit())
            && s.chars().any(|c| c.is_alphabetic()))
}

/// `%XX` sequences decoded (invalid ones kept as they are).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(h) = bytes.get(i + 1..i + 3)
            && let Ok(hex) = std::str::from_utf8(h)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every byte but RFC 3986's unreserved ones as `%XX`.
fn percent_encode_all(s: &str, lower: bool) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else if lower {
            out.push_str(&format!("%{b:02x}"));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The forms a value takes in output: as is, percent-encoded the ways the `url` crate and
/// encoders print it, then each of those JSON- and Debug-escaped.
fn forms(value: &str) -> Vec<String> {
    let mut base = vec![
        value.to_string(),
        percent_encode_all(value, false),
        percent_encode_all(value, true),
        url::form_urlencoded::byte_serialize(value.as_bytes()).collect(),
    ];
    if let Ok(mut u) = url::Url::parse("http://h/") {
        if u.set_password(Some(value)).is_ok()
            && let Some(p) = u.password()
        {
            base.push(p.to_string());
        }
        if let Ok(mut segs) = u.path_segments_mut() {
            segs.clear().push(value);
        }
        base.push(u.path().trim_start_matches('/').to_string());
        u.set_query(Some(value));
        base.extend(u.query().map(str::to_string));
        u.set_fragment(Some(value));
        base.extend(u.fragment().map(str::to_string));
    }
    let mut out: Vec<String> = Vec::new();
    for b in base {
        let json = json_escaped(&b);
        let debug = debug_escaped(&b);
        let json_twice = json_escaped(&json);
        for f in [b, json, debug, json_twice] {
            if !out.contains(&f) {
                out.push(f);
            }
        }
    }
    out
}

fn json_escaped(s: &str) -> String {
    let quoted = serde_json::Value::String(s.to_string()).to_string();
    quoted[1..quoted.len() - 1].to_string()
}

fn debug_escaped(s: &str) -> String {
    let quoted = format!("{s:?}");
    quoted[1..quoted.len() - 1].to_string()
}

/// `text` with every registered value replaced by its mask. Overlapping matches are replaced
/// together, so no byte of a registered value is left.
pub fn mask_bytes(text: &[u8]) -> Cow<'_, [u8]> {
    if text.len() < MIN_LEN {
        return Cow::Borrowed(text);
    }
    let reg = REGISTRY.read().unwrap_or_else(|e| e.into_inner());
    let mut hits: Vec<(usize, usize, usize)> = Vec::new();
    for (i, e) in reg.iter().enumerate() {
        let n = e.finder.needle().len();
        hits.extend(e.finder.find_iter(text).map(|at| (at, at + n, i)));
    }
    if hits.is_empty() {
        return Cow::Borrowed(text);
    }
    hits.sort_unstable_by_key(|&(start, end, _)| (start, std::cmp::Reverse(end)));
    let mut out = Vec::with_capacity(text.len());
    let mut at = 0;
    let mut k = 0;
    while k < hits.len() {
        let (start, mut end, first) = hits[k];
        let mut masks = vec![first];
        k += 1;
        while k < hits.len() && hits[k].0 < end {
            end = end.max(hits[k].1);
            if !masks.iter().any(|&m| reg[m].mask == reg[hits[k].2].mask) {
                masks.push(hits[k].2);
            }
            k += 1;
        }
        out.extend_from_slice(&text[at..start]);
        for m in masks {
            out.extend_from_slice(reg[m].mask.as_bytes());
        }
        at = end;
    }
    out.extend_from_slice(&text[at..]);
    Cow::Owned(out)
}

/// `text` with every registered value replaced by its mask.
pub fn mask(text: &str) -> Cow<'_, str> {
    match mask_bytes(text.as_bytes()) {
        Cow::Borrowed(_) => Cow::Borrowed(text),
        // Matches of UTF-8 patterns in UTF-8 text start and end at character boundaries.
        Cow::Owned(v) => Cow::Owned(
            String::from_utf8(v).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into()),
        ),
    }
}

/// `value` as pretty JSON, masked: what a report or state file in the lake, a webhook body or
/// the `--json` output holds.
pub fn to_json<T: serde::Serialize>(value: &T) -> serde_json::Result<String> {
    Ok(mask(&serde_json::to_string_pretty(value)?).into_owned())
}

/// Writes `text` to stdout, masked.
pub fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    // A closed stdout (a pipe whose reader left) is not worth a panic.
    let _ = out.write_all(mask(text).as_bytes());
    let _ = out.flush();
}

/// Writes `text` to stderr, masked.
pub fn eprint(text: &str) {
    let _ = std::io::stderr().write_all(mask(text).as_bytes());
}

/// Whether stderr gets ANSI colours: only a terminal, and not with `NO_COLOR` set (non-empty).
pub fn stderr_colour() -> bool {
    use std::io::IsTerminal;
    colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

/// The colour rule: a terminal and `NO_COLOR` unset or empty.
pub fn colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// A tracing writer factory whose writers mask each formatted line before it reaches `M`'s.
#[derive(Debug, Clone, Copy)]
pub struct Masked<M>(pub M);

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for Masked<M> {
    type Writer = MaskedWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        MaskedWriter {
            inner: self.0.make_writer(),
            buf: Vec::new(),
        }
    }
}

/// Collects one event's formatted text; masks and writes it on flush or drop.
#[derive(Debug)]
pub struct MaskedWriter<W: Write> {
    inner: W,
    buf: Vec<u8>,
}

impl<W: Write> MaskedWriter<W> {
    fn emit(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let text = std::mem::take(&mut self.buf);
        self.inner.write_all(&mask_bytes(&text))?;
        self.inner.flush()
    }
}

impl<W: Write> Write for MaskedWriter<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.emit()
    }
}

impl<W: Write> Drop for MaskedWriter<W> {
    fn drop(&mut self) {
        let _ = self.emit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The registry is process-wide: each test uses values of its own.

    #[test]
    fn a_secret_is_masked_in_every_form() {
        let v = "p@ss w/rd\"x=1&y";
        secret(v, "db#password");
        let m = "[secret:db#password]";
        for text in [
            v.to_string(),
            percent_encode_all(v, false),
            percent_encode_all(v, true),
            url::form_urlencoded::byte_serialize(v.as_bytes()).collect(),
            serde_json::json!({ "e": v }).to_string(),
            format!("{v:?}"),
            serde_json::Value::String(serde_json::json!({ "e": v }).to_string()).to_string(),
        ] {
            let out = mask(&text);
            assert!(out.contains(m), "{text} -> {out}");
            assert!(!out.contains("w/rd") && !out.contains("w%2Frd"), "{out}");
        }
        assert_eq!(mask("nothing here"), "nothing here");
    }

    #[test]
    fn a_webhook_url_from_a_secret_is_masked_as_reqwest_prints_it() {
        let target = "webhook:http://127.0.0.1:9/hook/Tok3n-Path-x1?token=Qu3ry-T0k&b=a b";
        config_value("notify.on_failure", target, Some("hooks#down"));
        let url = url::Url::parse(&target[8..]).unwrap();
        let err = format!("error sending request for url ({url})");
        let out = mask(&err);
        assert_eq!(out, "error sending request for url ([secret:hooks#down])");
        // The parts alone, too.
        assert_eq!(
            mask("GET /hook/Tok3n-Path-x1"),
            "GET /hook/[secret:hooks#down]"
        );
        assert_eq!(mask("t=Qu3ry-T0k."), "t=[secret:hooks#down].");
    }

    #[test]
    fn parts_of_urls_and_connection_strings_are_masked_from_any_source() {
        config_value(
            "warehouse.url",
            "postgres://loader:Pw-0f-Url@db:5432/x?sslmode=require",
            None,
        );
        config_value(
            "notify.on_success",
            "webhook:https://hooks.example.com/services/T0AB12CD/B0XYZ789/aAbBcCdDeEfF0123",
            None,
        );
        config_value("warehouse.password", "plain-pass-word", None);
        config_value("warehouse.url", "host=db password='kw-pass-1' user=u", None);
        assert_eq!(
            mask("postgres://loader:Pw-0f-Url@db"),
            "postgres://loader:[redacted:warehouse.url]@db"
        );
        assert_eq!(
            mask("https://hooks.example.com/services/T0AB12CD/B0XYZ789/aAbBcCdDeEfF0123"),
            "https://hooks.example.com/services/T0AB12CD/B0XYZ789/[redacted:notify.on_success]"
        );
        config_value("lake.root", "s3://bucket/prefix-2024-x", None);
        assert_eq!(
            mask("s3://bucket/prefix-2024-x"),
            "s3://bucket/prefix-2024-x"
        );
        assert_eq!(
            mask("a plain-pass-word b kw-pass-1"),
            "a [redacted:warehouse.password] b [redacted:warehouse.url]"
        );
        // Not secret: the host, the scheme, the query's mode.
        assert!(mask("sslmode=require on db:5432").contains("require"));
    }

    #[test]
    fn overlapping_values_leave_no_byte_and_short_values_are_ignored() {
        secret("abcdefgh-1", "a");
        secret("fgh-1-xyzxyz", "b");
        assert_eq!(mask("<abcdefgh-1-xyzxyz>"), "<[secret:a][secret:b]>");
        secret("short", "c");
        assert_eq!(mask("a short one"), "a short one");
    }

    #[test]
    fn the_log_writer_masks_each_line() {
        secret("log-line-secret", "log");
        let mut sink = Vec::new();
        {
            let mut w = MaskedWriter {
                inner: &mut sink,
                buf: Vec::new(),
            };
            w.write_all(b"WARN x=log-line-").unwrap();
            w.write_all(b"secret done\n").unwrap();
        }
        assert_eq!(
            String::from_utf8(sink).unwrap(),
            "WARN x=[secret:log] done\n"
        );
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None));
    }
}

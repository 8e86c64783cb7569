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

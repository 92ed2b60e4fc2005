//! Every configuration file shipped in `config/` parses, and every file in
//! `config/invalid/` is refused by `gateway check-config` with the key it names on its
//! first line (`# expect: <key>`).

use std::path::{Path, PathBuf};
use std::process::Command;

use gateway::config::Config;

fn files(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    out.sort();
    out
}

fn check_config(path: &Path) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["check-config", "--config"])
        .arg(path)
        .env_clear()
        .output()
        .expect("run gateway");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn shipped_configs_parse() {
    let mut shipped = files("config");
    shipped.extend(files("config/examples"));
    assert!(shipped.len() >= 2);
    for path in shipped {
        if let Err(e) = Config::load(&path, std::iter::empty()) {
            panic!("{e}");
        }
    }
}

#[test]
fn invalid_configs_name_the_key() {
    let invalid = files("config/invalid");
    assert!(invalid.len() >= 8);
    for path in invalid {
        let text = std::fs::read_to_string(&path).expect("read");
        let key = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .expect("first line names the key");
        let (code, stderr) = check_config(&path);
        assert_eq!(code, Some(2), "{}: {stderr}", path.display());
        assert!(
            stderr
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{key}:"))),
            "{}: expected a problem for {key}, got:\n{stderr}",
            path.display()
        );
    }
}

#[test]
fn check_config_accepts_the_default_and_reports_missing_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let (code, stderr) = check_config(&root.join("config/gateway.toml"));
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stderr) = check_config(&root.join("config/examples/production.toml"));
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("tls.cert:")
            && stderr.contains("tls.client_ca:")
            && stderr.contains("admin.token_file:"),
        "{stderr}"
    );
}

/// A worker-thread count the runtime cannot use is refused before anything starts, with
/// the variable and the fix named (the runtime itself panics with a backtrace).
#[test]
fn run_refuses_a_bad_tokio_worker_threads() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for bad in ["abc", "0", "-1", " 4"] {
        let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["run", "--config"])
            .arg(root.join("config/gateway.toml"))
            .env_clear()
            .env("TOKIO_WORKER_THREADS", bad)
            .output()
            .expect("run gateway");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {stderr}");
        assert!(
            stderr.contains("TOKIO_WORKER_THREADS") && stderr.contains("whole number above 0"),
            "{bad:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

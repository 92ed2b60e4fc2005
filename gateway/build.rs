//! Stamps the git commit into the binary for `gateway_build_info` and `--version`
//! (`EDGE_GATEWAY_COMMIT` overrides it, e.g. in a container build without `.git`).
//!
//! Not `GATEWAY_*`: cargo also sets this variable when it runs the binary (`cargo run`,
//! tests), and every `GATEWAY_<SECTION>__<KEY>` variable is a configuration override
//! the gateway refuses when it names no key.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn main() {
    println!("cargo:rerun-if-env-changed=EDGE_GATEWAY_COMMIT");
    let commit = std::env::var("EDGE_GATEWAY_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=EDGE_GATEWAY_COMMIT={commit}");
    // Run again when HEAD moves (only paths that exist: a missing one would make cargo
    // run this script on every build).
    let dirs = [
        git(&["rev-parse", "--git-dir"]),
        git(&["rev-parse", "--git-common-dir"]),
    ];
    for dir in dirs.into_iter().flatten() {
        for f in ["HEAD", "refs/heads", "packed-refs"] {
            let p = Path::new(&dir).join(f);
            if p.exists() {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
    }
}

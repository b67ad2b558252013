//! Stamps the binary with the commit it was built from (`SCALECAR_COMMIT`),
//! for `--version` and `scalecar_build_info`. Outside a git checkout (a
//! source tarball, a container build without .git) it is `unknown`.

fn main() {
    let commit = std::env::var("SCALECAR_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            std::process::Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .map(|s| s.trim().to_string())
        })
        .filter(|c| c.bytes().all(|b| b.is_ascii_alphanumeric()))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=SCALECAR_COMMIT={commit}");
    println!("cargo:rerun-if-env-changed=SCALECAR_COMMIT");
    // A new commit (or branch switch) rebuilds the stamp.
    for head in ["../.git/HEAD", "../.git/refs/heads"] {
        if std::path::Path::new(head).exists() {
            println!("cargo:rerun-if-changed={head}");
        }
    }
}

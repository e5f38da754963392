//! Running commands and finding the repository's paths.

use std::{
    env,
    ffi::{OsStr, OsString},
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _};

/// The repository root: xtask's manifest sits one level below it.
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask's manifest dir has a parent")
}

/// `<repo>/.tools`: what `setup` installs that is not a system package
/// (git-ignored).
pub fn tools_dir() -> PathBuf {
    repo_root().join(".tools")
}

/// `<repo>/.tools/bin`, put first on PATH for every cargo command.
pub fn tools_bin() -> PathBuf {
    tools_dir().join("bin")
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` if set (relative to the
/// current directory, as cargo reads it), else `<repo>/target`.
pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => env::current_dir().unwrap_or_default().join(dir),
        None => repo_root().join("target"),
    }
}

/// The release `lb` binary that `cargo xtask build` makes.
pub fn lb_bin() -> PathBuf {
    target_dir().join("release/lb")
}

/// PATH with `<repo>/.tools/bin` first.
fn path_with_tools() -> anyhow::Result<OsString> {
    let mut paths = vec![tools_bin()];
    paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    env::join_paths(paths).context("joining PATH")
}

/// A cargo command with the environment every build, lint and test step
/// shares, so that they reuse each other's build-script runs: run from the
/// repository root, `.tools/bin` first on PATH, and `LB_REQUIRE_EBPF=1` so
/// that lb-userspace's build script fails instead of embedding an empty
/// eBPF object.
pub fn cargo<I, S>(args: I) -> anyhow::Result<Command>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new("cargo");
    cmd.args(args)
        .current_dir(repo_root())
        .env("PATH", path_with_tools()?)
        .env("LB_REQUIRE_EBPF", "1");
    if env::var_os("CARGO_TARGET_DIR").is_some() {
        // Absolute, since the command runs from the repository root.
        cmd.env("CARGO_TARGET_DIR", target_dir());
    }
    Ok(cmd)
}

/// Echoes `cmd` as `$ cmd ...`, runs it with the terminal's stdout and
/// stderr (and no stdin: CI has none), and fails with the command line if it
/// does not exit 0.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let line = display(cmd);
    println!("$ {line}");
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("could not start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` quietly and returns what it printed, whatever its exit status;
/// for checks. Fails only if it cannot be started.
pub fn output(cmd: &mut Command) -> anyhow::Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{}`", display(cmd)))
}

/// `cmd` as a shell line, with the variables it sets in front. PATH is shown
/// as what was prepended to it rather than in full.
fn display(cmd: &Command) -> String {
    let mut words = Vec::new();
    for (key, value) in cmd.get_envs() {
        let key = key.to_string_lossy();
        match value {
            Some(_) if key == "PATH" => words.push(format!("PATH={}:$PATH", tools_bin().display())),
            Some(value) => words.push(format!("{key}={}", quote(value))),
            None => {}
        }
    }
    words.push(quote(cmd.get_program()));
    words.extend(cmd.get_args().map(quote));
    words.join(" ")
}

/// Quotes `word` for a POSIX shell if it needs it.
fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:+,@%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Whether this process runs with effective uid 0.
pub fn is_root() -> bool {
    // The second field of `Uid:` in /proc/self/status is the effective uid.
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// A duration as `3.2s`, or `2m05s` from a minute up.
pub fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 60.0 {
        format!("{s:.1}s")
    } else {
        let whole = d.as_secs();
        format!("{}m{:02}s", whole / 60, whole % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_only_what_needs_it() {
        assert_eq!(quote(OsStr::new("--test-threads=1")), "--test-threads=1");
        assert_eq!(quote(OsStr::new("${Status}")), "'${Status}'");
        assert_eq!(quote(OsStr::new("it's")), r"'it'\''s'");
        assert_eq!(quote(OsStr::new("")), "''");
    }

    #[test]
    fn echoes_env_then_command() {
        let mut cmd = Command::new("cargo");
        cmd.args(["test", "a b"]).env("LB_REQUIRE_EBPF", "1");
        assert_eq!(display(&cmd), "LB_REQUIRE_EBPF=1 cargo test 'a b'");
    }

    #[test]
    fn formats_durations() {
        assert_eq!(secs(Duration::from_millis(3240)), "3.2s");
        assert_eq!(secs(Duration::from_secs(125)), "2m05s");
    }

    #[test]
    fn root_is_the_parent_of_xtask() {
        assert!(repo_root().join("xtask/Cargo.toml").is_file());
    }
}

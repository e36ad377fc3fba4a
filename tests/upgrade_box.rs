//! End-to-end: `sgbox upgrade` and `sgbox rollback` on a real local box (QEMU, Debian 13, real
//! cloud-init, Docker and Compose) running stand-in Sourcegraph images from a real registry. One
//! box goes through, in order:
//! 1. a forbidden path (a downgrade) refused in preflight, nothing changed;
//! 2. `--dry-run` of the multi-version path: the plan, nothing changed;
//! 3. not enough disk (the data disk filled) refused in preflight, nothing changed;
//! 4. a multi-version upgrade 5.9 → 7.4 across the Postgres 16 waypoint 5.11, with sgbox killed
//!    during a migrator hop and a re-run that completes from the journal on the box;
//! 5. 7.4 → 7.5 with the 7.5 migrator failing half-way (dirty schema): automatic rollback, 7.4
//!    serving again, the database's data checksum and schema as before;
//! 6. the standard upgrade 7.4 → 7.5, with `/__version` polled every 100 ms and failures counted;
//! 7. `sgbox rollback` to 7.4 and its snapshot; `sgbox history` shows all of it.
//!
//! Needs what `tests/local_box.rs` needs (`bash .ci/setup`); missing tools fail the test.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::localbox::{base_image, http_get, Registry};
use common::{run, sgbox, text};
use serde_json::Value;

const OLD: &str = "5.9.17785";
const WAYPOINT: &str = "5.11.6271";
const MID: &str = "7.4.0";
const NEW: &str = "7.5.4453";
const NAME: &str = "upg";

fn json_of(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", text(&out.stdout), text(&out.stderr)))
}

fn ssh(st: &Path, cmd: &str) -> String {
    let out = run(sgbox(st).args(["ssh", "--name", NAME, "--", cmd]));
    assert!(out.status.success(), "`{cmd}` on the box: {}\n{}", text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

/// Talk to the stand-in pgsql's line protocol from inside its container.
fn db(st: &Path, lines: &str) -> String {
    ssh(st, &format!("sudo docker exec pgsql sh -c 'printf \"{}\" | nc -w 3 127.0.0.1 5432'", lines.replace('\n', "\\n")))
}

fn db_state(st: &Path) -> (String, String) {
    let out = db(st, "CHECKSUM\nINFO\n");
    let sum = out.lines().find_map(|l| l.strip_prefix("CHECKSUM ")).unwrap_or_else(|| panic!("no checksum in {out:?}")).to_string();
    let info = out.lines().find(|l| l.starts_with("INFO ")).unwrap_or_else(|| panic!("no info in {out:?}")).to_string();
    (sum, info)
}

fn version(url: &str) -> Option<String> {
    http_get(&format!("{url}/__version")).map(|s| s.trim().to_string())
}

fn journal(st: &Path) -> Value {
    let t = ssh(st, "sudo cat /var/lib/sgbox/upgrade.json 2>/dev/null || echo null");
    serde_json::from_str(&t).unwrap_or(Value::Null)
}

fn snapshots(st: &Path) -> String {
    let data = st.join(NAME).join("local/data.qcow2");
    let out = std::process::Command::new("qemu-img").args(["snapshot", "-l", "-U"]).arg(&data).output().unwrap();
    text(&out.stdout)
}

fn upgrade(st: &Path, extra: &[&str]) -> std::process::Output {
    run(sgbox(st).args(["upgrade", "--name", NAME, "--yes", "--timeout", "20m"]).args(extra))
}

/// Everything an unchanged box shows: release file, compose file, journal and snapshots.
fn fingerprint(st: &Path) -> String {
    format!("{}{}", ssh(st, "cat /etc/sgbox/deployment.json; sha256sum /opt/sgbox/docker-compose.yaml; sudo cat /var/lib/sgbox/upgrade.json 2>/dev/null || true"), snapshots(st))
}

/// Deletes the box when the test ends, failed or not: a VM left running would slow every later test.
struct Teardown<'a>(&'a Path);

impl Drop for Teardown<'_> {
    fn drop(&mut self) {
        let _ = run(sgbox(self.0).args(["down", "--name", NAME, "--cloud", "local", "--delete-data", "--yes"]));
    }
}

#[test]
fn upgrade_lifecycle() {
    let image = base_image();
    let registry = Registry::start();
    registry.push_standins(&[OLD, WAYPOINT, MID, NEW]);
    let state = tempfile::tempdir().unwrap();
    let st = state.path();
    let _teardown = Teardown(st);

    let out = run(sgbox(st).args(["up", "--cloud", "local", "--name", NAME, "--version", OLD, "--registry-mirror", &registry.mirror_for_guest(), "--mirror-mode", "tags-only"])
        .args(["--base-image", image.to_str().unwrap(), "--yes", "--output", "json", "--timeout", "25m"]));
    assert!(out.status.success(), "up {OLD}: {}", text(&out.stderr));
    let url = json_of(&out)["url"].as_str().unwrap().to_string();
    assert_eq!(version(&url).as_deref(), Some(OLD));

    // User data in the database, which every upgrade and rollback must keep.
    let put = db(st, "PUT repo github.com/sourcegraph/sourcegraph\nPUT saved-search lang:rust sgbox\n");
    assert_eq!(put.matches("OK").count(), 2, "{put}");
    let (sum0, info0) = db_state(st);
    assert!(info0.contains("pg_major=12") && info0.contains(&format!("schema={OLD}")), "{info0}");
    let before = fingerprint(st);

    // 1. A downgrade is a path Sourcegraph forbids without an explicit opt-in: refused, exit 2.
    let out = upgrade(st, &["--to", "5.8"]);
    assert_eq!(out.status.code(), Some(2), "downgrade must be refused: {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("fix:"), "{}", text(&out.stderr));
    assert_eq!(fingerprint(st), before, "a refused path changes nothing");

    // 2. Dry run: the plan through the waypoint and a passing preflight; nothing changed.
    let out = run(sgbox(st).args(["upgrade", "--name", NAME, "--to", MID, "--dry-run", "--output", "json"]));
    assert!(out.status.success(), "dry-run: {}", text(&out.stderr));
    let plan = json_of(&out);
    assert_eq!(plan["kind"], "multi-version");
    let steps = plan["steps"].to_string();
    assert!(steps.contains(&format!("migrator {WAYPOINT}: upgrade --from=v{OLD} --to=v{WAYPOINT}")), "{plan:#}");
    assert!(steps.contains(&format!("migrator {NEW}: upgrade --from=v{WAYPOINT} --to=v{MID}")), "{plan:#}");
    assert_eq!(plan["preflight"]["ok"], true, "{plan:#}");
    assert_eq!(fingerprint(st), before, "a dry run changes nothing");

    // 3. Not enough disk: fill the data disk to 256 MiB free; refused in preflight, exit 2.
    ssh(st, "sudo sh -c 'fallocate -l $(( $(df -B1 --output=avail /mnt/sgbox-data | tail -n 1) - 268435456 )) /mnt/sgbox-data/fill'");
    let out = upgrade(st, &["--to", MID]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "a full disk must be refused: {err}");
    assert!(err.contains("disk") && err.contains("free") && err.contains("fix:"), "{err}");
    ssh(st, "sudo rm /mnt/sgbox-data/fill");
    assert_eq!(fingerprint(st), before, "a refused upgrade changes nothing");

    // 4. Multi-version 5.9 → 7.4 in one command; sgbox is killed during a migrator hop and a
    //    re-run finishes from the journal on the box.
    let mut child = sgbox(st).args(["upgrade", "--name", NAME, "--to", MID, "--yes", "--timeout", "20m"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let until = Instant::now() + Duration::from_secs(900);
    let killed_at = loop {
        let j = journal(st);
        let started = j["steps"].as_array().and_then(|s| s.iter().find(|e| e["step"] == "migrate" && e["status"] == "started").cloned());
        if let Some(e) = started {
            child.kill().unwrap();
            child.wait().unwrap();
            break e;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the upgrade ended ({status}) before a migrator hop was seen running: {j:#}");
        }
        assert!(Instant::now() < until, "no migrator hop started: {j:#}");
        std::thread::sleep(Duration::from_millis(300));
    };
    eprintln!("killed sgbox during hop {} -> {}", killed_at["from"], killed_at["to"]);
    let out = upgrade(st, &["--output", "json"]);
    assert!(out.status.success(), "the re-run must complete the upgrade: {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("resuming"), "{}", text(&out.stderr));
    let done = json_of(&out);
    assert_eq!(done["to"], MID);
    assert_eq!(version(&url).as_deref(), Some(MID));
    let j = journal(st);
    assert_eq!(j["outcome"], "done");
    assert!(j["steps"].as_array().unwrap().iter().all(|e| e["status"] == "done"), "{j:#}");
    let (sum1, info1) = db_state(st);
    assert_eq!(sum1, sum0, "user data survived the multi-version upgrade");
    assert!(info1.contains("pg_major=16") && info1.contains(&format!("schema={MID}")), "converted to Postgres 16 and migrated: {info1}");
    assert!(ssh(st, "cat /etc/sgbox/deployment.json").contains(MID));
    assert!(!snapshots(st).trim().is_empty(), "a snapshot was taken first");

    // 5. The 7.5 migrator fails half-way (dirty schema): automatic rollback to 7.4 and its data.
    let fail = "services:\n  migrator:\n    environment:\n      - SGBOX_STANDIN_FAIL=migrator-dirty@7.5.4453\n";
    ssh(st, &format!("echo '{fail}' | sudo tee /opt/sgbox/docker-compose.override.yaml >/dev/null"));
    let out = upgrade(st, &["--to", NEW]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "a failed migrator fails the upgrade: {err}");
    assert!(err.contains("rolled back") && err.contains("migrator"), "{err}");
    assert_eq!(version(&url).as_deref(), Some(MID), "7.4 serves again");
    let (sum2, info2) = db_state(st);
    assert_eq!(sum2, sum0, "data intact after the rollback");
    assert!(info2.contains(&format!("schema={MID}")) && !info2.contains("dirty"), "the dirty schema was undone by the snapshot: {info2}");
    assert_eq!(journal(st)["outcome"], "rolled-back");
    ssh(st, "echo 'services: {}' | sudo tee /opt/sgbox/docker-compose.override.yaml >/dev/null");

    // 6. Standard upgrade 7.4 → 7.5 while a client polls every 100 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let poller = {
        let (stop, seen, url) = (stop.clone(), seen.clone(), url.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let v = version(&url);
                seen.lock().unwrap().push(v);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let out = upgrade(st, &["--to", NEW, "--output", "json"]);
    stop.store(true, Ordering::Relaxed);
    poller.join().unwrap();
    assert!(out.status.success(), "standard upgrade: {}", text(&out.stderr));
    assert_eq!(version(&url).as_deref(), Some(NEW));
    let seen = seen.lock().unwrap().clone();
    let failed = seen.iter().filter(|v| v.is_none()).count();
    let first_new = seen.iter().position(|v| v.as_deref() == Some(NEW)).expect("the poller saw the new release");
    assert!(seen[..first_new].iter().flatten().all(|v| v == MID), "only the old release before the switch");
    assert!(seen[first_new..].iter().flatten().all(|v| v == NEW), "never back to the old release after the switch");
    eprintln!("standard upgrade {MID} -> {NEW}: {} requests every 100 ms, {failed} failed", seen.len());
    assert!(failed * 10 < seen.len(), "the old release kept serving for most of the upgrade: {failed} of {} failed", seen.len());
    let (sum3, info3) = db_state(st);
    assert_eq!(sum3, sum0);
    assert!(info3.contains(&format!("schema={NEW}")), "{info3}");

    // 7. `sgbox rollback`: back to 7.4 and the data of before the upgrade.
    let out = run(sgbox(st).args(["rollback", "--name", NAME, "--yes", "--output", "json", "--timeout", "20m"]));
    assert!(out.status.success(), "rollback: {}", text(&out.stderr));
    assert_eq!(json_of(&out)["release"], MID);
    assert_eq!(version(&url).as_deref(), Some(MID));
    let (sum4, info4) = db_state(st);
    assert_eq!(sum4, sum0);
    assert!(info4.contains(&format!("schema={MID}")), "{info4}");

    let out = run(sgbox(st).args(["history", "--name", NAME, "--output", "json"]));
    let h = json_of(&out);
    assert_eq!(h["release"], MID);
    let actions: Vec<String> = h["history"].as_array().unwrap().iter().map(|e| format!("{} {}", e["action"].as_str().unwrap(), e["release"].as_str().unwrap())).collect();
    assert_eq!(actions, [format!("up {OLD}"), format!("upgrade {MID}"), format!("rollback {MID}"), format!("upgrade {NEW}"), format!("rollback {MID}")], "{h:#}");
    let on_box = ssh(st, "cat /etc/sgbox/history.jsonl");
    assert_eq!(on_box.lines().count(), 4, "the box keeps its own history: {on_box}");

    let out = run(sgbox(st).args(["down", "--name", NAME, "--delete-data", "--yes"]));
    assert!(out.status.success(), "down: {}", text(&out.stderr));
    drop(registry);
}

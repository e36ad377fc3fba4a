//! Is the box ready? Three checks in order, each polled until a shared deadline: cloud-init has
//! finished, every compose service is healthy (or, for the migrator, exited 0), and Sourcegraph
//! answers `GET /__version` with the target release through the box's public HTTP port. On
//! failure, the evidence: the tail of the cloud-init log, the unit's journal and the logs of the
//! services that were not healthy.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;
use serde_json::Value;

use crate::onbox::Session;
use crate::output::Phase;
use crate::settings::Tls;

pub const PROJECT: &str = crate::render::PROJECT;

/// One compose service container, as Docker reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceState {
    pub service: String,
    pub state: String,
    pub health: String,
    pub exit_code: i64,
}

impl ServiceState {
    /// Healthy for the deployment: running and healthy (or without a healthcheck); one-shot
    /// services (the migrator) count once they exited 0.
    pub fn ok(&self, one_shot: bool) -> bool {
        if one_shot {
            return self.state == "exited" && self.exit_code == 0;
        }
        self.state == "running" && (self.health.is_empty() || self.health == "healthy")
    }
}

/// Services that run once and exit.
pub fn one_shot(service: &str) -> bool {
    service == "migrator"
}

/// Parse Docker's container list (`GET /containers/json?all=1`, see [`services_cmd`]): the
/// project's service containers, with their health and exit code from the `Status` text
/// ("Up 2 minutes (healthy)", "Exited (0) 3 seconds ago"). One-off containers (`compose run`)
/// are left out, as `docker compose ps` leaves them out.
pub fn parse_services(text: &str) -> Vec<ServiceState> {
    let items: Vec<Value> = serde_json::from_str(text.trim()).unwrap_or_default();
    items
        .iter()
        .filter(|v| v["Labels"]["com.docker.compose.oneoff"].as_str() != Some("True"))
        .filter_map(|v| {
            let service = v["Labels"]["com.docker.compose.service"].as_str()?.to_string();
            let status = v["Status"].as_str().unwrap_or_default();
            let health = ["unhealthy", "healthy", "health: starting"]
                .iter()
                .find(|h| status.contains(&format!("({h})")))
                .map(|h| if *h == "health: starting" { "starting" } else { h })
                .unwrap_or_default()
                .to_string();
            let exit_code = status.strip_prefix("Exited (").and_then(|r| r.split(')').next()).and_then(|c| c.parse().ok()).unwrap_or(0);
            Some(ServiceState { service, state: v["State"].as_str().unwrap_or_default().to_string(), health, exit_code })
        })
        .collect()
}

/// Which expected services are not yet ok (missing ones included).
pub fn not_ready(expected: &[String], states: &[ServiceState]) -> Vec<String> {
    expected.iter().filter(|name| !states.iter().any(|s| &s.service == *name && s.ok(one_shot(name)))).cloned().collect()
}

/// The project's containers, straight from the Docker API with curl. `docker compose ps` gives
/// the same facts, but it is a 60 MB Go program: under emulation one call took 17 s of a
/// saturated box, and readiness polls every few seconds.
pub fn services_cmd() -> String {
    format!("sudo curl -sSf --unix-socket /run/docker.sock '{}'", containers_url())
}

/// Percent-encoding for a Docker API query value (a JSON filter).
fn url_encode(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() || b"-_.".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

fn project_label() -> String {
    format!("com.docker.compose.project={PROJECT}")
}

/// The Docker API's list of the project's containers, stopped ones included.
fn containers_url() -> String {
    format!("http://docker/containers/json?all=1&filters={}", url_encode(&serde_json::json!({ "label": [project_label()] }).to_string()))
}

pub struct Deadline(pub Instant);

impl Deadline {
    fn passed(&self) -> bool {
        Instant::now() >= self.0
    }
}

/// Wait until cloud-init reports done. An early `error` before boot-finished is not final
/// (cloud-init's status can say error while its final stage has not run yet). The box waits
/// for boot-finished itself (a file test a second), and asks cloud-init's status (a Python
/// start: seconds of an emulated CPU) only once it is there, or every 50 s.
pub async fn cloud_init(ssh: &Session, deadline: &Deadline, phase: &Phase) -> Result<()> {
    loop {
        let out = ssh
            .exec("f=/var/lib/cloud/instance/boot-finished; i=0; while [ ! -e $f ] && [ $i -lt 50 ]; do sleep 1; i=$((i+1)); done; cloud-init status 2>/dev/null; test -e $f && echo boot-finished")
            .await?;
        let status = out.stdout.lines().find_map(|l| l.strip_prefix("status:")).map(str::trim).unwrap_or("unknown").to_string();
        let finished = out.stdout.contains("boot-finished");
        phase.set(format!("cloud-init: {status}"));
        match status.as_str() {
            "done" => return Ok(()),
            "error" | "degraded done" | "degraded" if finished => {
                let long = ssh.exec("cloud-init status --long 2>&1 | tail -n 20").await?;
                bail!("cloud-init finished with status `{status}`:\n{}", long.stdout.trim_end());
            }
            _ => {}
        }
        if deadline.passed() {
            bail!("cloud-init was still `{status}` when the time was up");
        }
        if finished {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
}

/// The data disk is mounted. When it is not (it arrived after the boot script gave up, as when an
/// interrupted `up` attaches it late), run the boot script again and start Docker and the stack;
/// Docker itself refuses to start without the disk, so nothing lands on the root disk.
pub async fn data_disk(ssh: &Session) -> Result<()> {
    let mount = crate::render::DATA_MOUNT;
    if ssh.exec(&format!("mountpoint -q {mount}")).await?.status == 0 {
        return Ok(());
    }
    crate::output::warn(format!("the data disk is not mounted on {mount}; running the boot script again"));
    // The boot script may add the fstab line (systemd makes mount units from it: reload), and
    // Docker's refused starts may have hit systemd's start limit (reset it).
    let out = ssh
        .exec(&format!(
            "sudo {} 2>&1 && sudo systemctl daemon-reload && sudo systemctl reset-failed docker.service docker.socket sourcegraph.service 2>/dev/null; sudo systemctl start docker.service sourcegraph.service 2>&1",
            crate::render::BOOT_SCRIPT
        ))
        .await?;
    if out.status == 0 && ssh.exec(&format!("mountpoint -q {mount}")).await?.status == 0 {
        return Ok(());
    }
    let tail: Vec<&str> = out.stdout.lines().rev().take(5).collect();
    bail!(
        "the data disk is not mounted on {mount}, so Docker was not started (nothing was written to the root disk): {}",
        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
    )
}

/// What the box prints while the stack starts: the project's containers (one JSON list per
/// line, [`parse_services`]) now, again at every start, exit or health change of one of them
/// (Docker's event stream), and afresh every 10 s; for `secs` at most. Idle between events: no
/// poll costs the emulated CPU that the services are starting on. (The e2e's verifies after a
/// restore waited about 30 s, the old period, in some runs and 1 s in others, all healthy in the
/// end: a change that came without an event costs at most the period, and one list is one curl.)
///
/// It ends as soon as sgbox stops reading. sgbox never writes to its stdin, so the end of stdin
/// is sgbox closing the channel, and the watch (in a session of its own, so that all of it goes,
/// the event stream's curl included) is stopped then. Otherwise it ran on until its next write
/// failed, up to 11 s, and sgbox waited for it: closing a channel waits for the box's side to
/// close (libssh2), so every `up`, verify and rollback took 11-12 s longer than the services did.
pub fn watch_services_cmd(secs: u64) -> String {
    let list = containers_url();
    // Docker matches `health_status` as a prefix of `health_status: healthy` (moby#25798).
    let events =
        url_encode(&serde_json::json!({ "type": ["container"], "label": [project_label()], "event": ["start", "die", "health_status"] }).to_string());
    // `--foreground`: timeout would otherwise put curl in a process group of its own, out of
    // reach of the stop below.
    let watch = format!(
        "end=$(( $(date +%s) + {secs} ))
list() {{ curl -sS --unix-socket /run/docker.sock '{list}'; echo; }}
while [ \"$(date +%s)\" -lt \"$end\" ]; do
  if ! curl -sSf -m 5 --unix-socket /run/docker.sock http://docker/_ping >/dev/null 2>&1; then echo 'docker: not answering yet'; sleep 2; continue; fi
  since=$(date +%s)
  list
  left=$(( end - since )); [ \"$left\" -gt 10 ] && left=10; [ \"$left\" -lt 1 ] && left=1
  timeout --foreground \"$left\" curl -sSN --unix-socket /run/docker.sock \"http://docker/events?since=$since&filters={events}\" | while read -r _; do list; done
  sleep 1
done"
    );
    let script = format!(
        "exec 3<&0
setsid sh -c {} </dev/null 3<&- &
w=$!
{{ cat <&3; kill -TERM -$w; }} >/dev/null 2>&1 &
wait $w
rc=$?
kill -TERM -$w 2>/dev/null
exit $rc",
        crate::onbox::quote(&watch)
    );
    format!("sudo sh -c {}", crate::onbox::quote(&script))
}

/// Wait until every expected service is ok, watching the box's own event stream
/// ([`watch_services_cmd`]). Returns the final states.
pub async fn services(ssh: &Session, expected: &[String], deadline: &Deadline, phase: &Phase) -> Result<Vec<ServiceState>, (String, Vec<String>)> {
    let seen = Arc::new(Mutex::new((expected.to_vec(), Vec::<ServiceState>::new())));
    loop {
        let left = deadline.0.saturating_duration_since(Instant::now());
        let missing = seen.lock().expect("lock").0.clone();
        if left.is_zero() {
            return Err((format!("{} of {} services were not healthy when the time was up", missing.len(), expected.len()), missing));
        }
        let (want, set, into) = (expected.to_vec(), phase.setter(), seen.clone());
        let on_line = move |line: &str| -> bool {
            if !line.starts_with('[') {
                set(line.to_string());
                return false;
            }
            let states = parse_services(line);
            let missing = not_ready(&want, &states);
            set(format!("{}/{} services healthy", want.len() - missing.len(), want.len()));
            let done = missing.is_empty();
            *into.lock().expect("lock") = (missing, states);
            done
        };
        // The box ends the watch a little before the deadline, so its last word is heard.
        let secs = left.as_secs().saturating_sub(5).max(1);
        match ssh.watch(&watch_services_cmd(secs), left + Duration::from_secs(30), on_line).await {
            Ok((None, _)) => return Ok(seen.lock().expect("lock").1.clone()),
            Ok((Some(status), _)) if status != 0 => phase.set(format!("watching the containers ended with {status}")),
            Ok(_) => {}
            Err(e) if e.is_connection() => {
                phase.set(format!("ssh: {e}; reconnecting"));
                let _ = ssh.reconnect().await;
            }
            Err(e) => phase.set(format!("ssh: {e}")),
        }
        if !deadline.passed() {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
}

/// GET `url/__version` once.
pub async fn version(url: &str) -> Result<String, String> {
    let url = format!("{url}/__version");
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent =
            ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(5))).http_status_as_error(false).build().into();
        let mut resp = agent.get(&url).call().map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp.body_mut().read_to_string().map_err(|e| e.to_string())?;
        if status.is_success() {
            Ok(body.trim().to_string())
        } else {
            Err(format!("HTTP {status}"))
        }
    })
    .await
    .expect("http task")
}

/// Ask Sourcegraph's version from inside the box, the way a visitor reaches it: through Caddy,
/// with the site's name as SNI and Host once TLS is on (Caddy then serves only that name, so a
/// check of `http://<ip>/__version` could never pass). Over loopback, so the certificate is not
/// what is checked here (an ACME one may still be on its way), the route is.
pub fn version_cmd(tls: &Tls, hostname: Option<&str>) -> String {
    match (tls, hostname) {
        (Tls::None, _) | (_, None) => "curl -sS -m 10 -f http://127.0.0.1/__version".into(),
        (_, Some(h)) => format!("curl -sS -m 10 -f --insecure --resolve {h}:443:127.0.0.1 https://{h}/__version"),
    }
}

/// `/__version` once, asked on the box ([`version_cmd`]).
pub async fn version_on_box(ssh: &Session, cmd: &str) -> Result<String, String> {
    match ssh.exec(cmd).await {
        Ok(o) if o.status == 0 => Ok(o.stdout.trim().to_string()),
        Ok(o) => Err(o.stderr.trim().lines().last().unwrap_or("no answer").to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Poll `/__version` (asked on the box with `cmd`) until it equals `release`.
pub async fn answers(ssh: &Session, cmd: &str, release: &str, deadline: &Deadline, phase: &Phase) -> Result<()> {
    loop {
        let got = version_on_box(ssh, cmd).await;
        match &got {
            Ok(v) if v == release => return Ok(()),
            Ok(v) => phase.set(format!("/__version says {v}")),
            Err(e) => phase.set(format!("/__version: {e}")),
        }
        if deadline.passed() {
            bail!("/__version did not answer {release} in time, asked on the box with `{cmd}` (last: {})", got.unwrap_or_else(|e| e));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// The evidence for a failed wait, as text for stderr.
pub async fn diagnostics(ssh: &Session, failing: &[String]) -> String {
    let mut out = String::new();
    let mut section = |title: &str, body: &str| {
        out.push_str(&format!("--- {title}\n{}\n", body.trim_end()));
    };
    if let Ok(o) = ssh.exec("sudo tail -n 25 /var/log/cloud-init-output.log").await {
        section("tail of /var/log/cloud-init-output.log", &o.stdout);
    }
    if let Ok(o) = ssh.exec("sudo journalctl -u sourcegraph.service -n 15 --no-pager").await {
        section("journal of sourcegraph.service", &o.stdout);
    }
    for s in failing.iter().take(6) {
        if let Ok(o) = ssh.exec(&format!("sudo docker compose --ansi never -p {PROJECT} logs --no-color --tail 20 {s} 2>&1")).await {
            section(&format!("logs of {s}"), &o.stdout);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// The watch under a real shell, with Docker's API played by a `curl` on PATH (its event
    /// stream: two events, then silence, its pid in `curl.pid`), and stdin held open as sgbox's
    /// channel holds it; closed once `close_after` lists have come. Its stdout, and how long
    /// it ran on after stdin closed (or in all).
    fn run_watch(dir: &Path, secs: u64, close_after: Option<usize>) -> (String, Duration) {
        use std::io::{BufRead, BufReader};
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let fake_curl = format!(
            "for a; do url=$a; done\necho \"$url\" >> {d}/curl.log\ncase $url in\n  *_ping) exit 0 ;;\n  *containers/json*) echo '[{{\"State\":\"running\"}}]' ;;\n  *events*) echo $$ > {d}/curl.pid; echo e1; sleep 0.2; echo e2; exec sleep 60 ;;\nesac",
            d = dir.display()
        );
        crate::testkit::fake_tool(&bin, "curl", &fake_curl);
        crate::testkit::fake_tool(&bin, "sudo", "exec \"$@\"");
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        let mut child = std::process::Command::new("sh")
            .args(["-c", &watch_services_cmd(secs)])
            .env("PATH", path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take();
        let (mut out, mut lists, mut since) = (String::new(), 0, Instant::now());
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line.unwrap();
            lists += usize::from(line.starts_with('['));
            out.push_str(&line);
            out.push('\n');
            if close_after.is_some_and(|n| lists >= n) && stdin.is_some() {
                drop(stdin.take());
                since = Instant::now();
            }
        }
        let took = since.elapsed();
        child.wait().unwrap();
        (out, took)
    }

    /// The list comes at once, again at each event, and the watch ends by itself at its bound.
    #[test]
    fn the_services_watch_lists_at_start_and_at_each_event_and_ends_on_time() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("curl.log");
        let (stdout, took) = run_watch(dir.path(), 2, None);
        let lists = stdout.lines().filter(|l| l.starts_with('[')).count();
        assert!(lists >= 3, "a list at start and one per event: {stdout}");
        assert!(took < Duration::from_secs(10), "the watch ended by its bound: {took:?}");
        let urls = std::fs::read_to_string(&log).unwrap();
        let events = urls.lines().find(|u| u.contains("/events?")).expect("the event stream was asked for");
        let filters = events.split("filters=").nth(1).unwrap();
        let decoded = String::from_utf8(
            filters
                .split('%')
                .enumerate()
                .flat_map(|(i, part)| {
                    if i == 0 {
                        part.as_bytes().to_vec()
                    } else {
                        let mut v = vec![u8::from_str_radix(&part[..2], 16).unwrap()];
                        v.extend_from_slice(&part.as_bytes()[2..]);
                        v
                    }
                })
                .collect(),
        )
        .unwrap();
        let f: Value = serde_json::from_str(&decoded).unwrap();
        assert_eq!(f["event"], serde_json::json!(["start", "die", "health_status"]), "{decoded}");
        assert_eq!(f["label"][0], format!("com.docker.compose.project={PROJECT}"));
    }

    /// sgbox stops reading once every service is ok, and closing its channel closes the watch's
    /// stdin: the watch, its event stream included, stops then, not at its next write (the
    /// channel's close waited for that: 11-12 s of every `up` and verify).
    #[test]
    fn the_services_watch_stops_when_its_reader_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let (stdout, took) = run_watch(dir.path(), 60, Some(3));
        assert!(stdout.lines().filter(|l| l.starts_with('[')).count() >= 3, "{stdout}");
        assert!(took < Duration::from_secs(3), "the watch ended {took:?} after its stdin closed, with 50 s to go and its event stream silent");
        let pid = std::fs::read_to_string(dir.path().join("curl.pid")).unwrap();
        let stat = format!("/proc/{}/stat", pid.trim());
        let gone = (0..40).any(|_| {
            let state =
                std::fs::read_to_string(&stat).ok().and_then(|s| s.rsplit(')').next().and_then(|r| r.split_whitespace().next()).map(str::to_string));
            std::thread::sleep(Duration::from_millis(50));
            state.is_none_or(|st| st == "Z")
        });
        assert!(gone, "the event stream's curl was stopped with the watch");
    }

    #[test]
    fn parses_the_container_list_and_judges_health() {
        let list = r#"[
 {"Names":["/pgsql"],"State":"running","Status":"Up 3 minutes (healthy)","Labels":{"com.docker.compose.project":"sourcegraph","com.docker.compose.service":"pgsql","com.docker.compose.oneoff":"False"}},
 {"Names":["/migrator"],"State":"exited","Status":"Exited (0) 2 minutes ago","Labels":{"com.docker.compose.service":"migrator","com.docker.compose.oneoff":"False"}},
 {"Names":["/caddy"],"State":"running","Status":"Up 2 minutes","Labels":{"com.docker.compose.service":"caddy"}},
 {"Names":["/sourcegraph-frontend-0"],"State":"running","Status":"Up 4 seconds (health: starting)","Labels":{"com.docker.compose.service":"sourcegraph-frontend-0"}},
 {"Names":["/searcher-0"],"State":"running","Status":"Up 1 minute (unhealthy)","Labels":{"com.docker.compose.service":"searcher-0"}},
 {"Names":["/sourcegraph-migrator-run-1"],"State":"exited","Status":"Exited (1) 1 second ago","Labels":{"com.docker.compose.service":"migrator","com.docker.compose.oneoff":"True"}}
]"#;
        let s = parse_services(list);
        assert_eq!(s.len(), 5, "the one-off run is not a service container: {s:?}");
        assert_eq!(s[0], ServiceState { service: "pgsql".into(), state: "running".into(), health: "healthy".into(), exit_code: 0 });
        assert_eq!(s[3].health, "starting");
        assert_eq!(s[4].health, "unhealthy");
        let expected: Vec<String> =
            ["pgsql", "migrator", "caddy", "sourcegraph-frontend-0", "searcher-0", "gitserver-0"].iter().map(|s| s.to_string()).collect();
        assert_eq!(not_ready(&expected, &s), vec!["sourcegraph-frontend-0".to_string(), "searcher-0".to_string(), "gitserver-0".to_string()]);

        let failed = r#"[{"State":"exited","Status":"Exited (1) 3 seconds ago","Labels":{"com.docker.compose.service":"migrator"}}]"#;
        let s = parse_services(failed);
        assert_eq!(s[0].exit_code, 1);
        assert!(!s[0].ok(true), "a migrator that failed is not ready");
        assert_eq!(not_ready(&["migrator".to_string()], &s), vec!["migrator".to_string()]);
        assert!(parse_services("").is_empty());
    }
}

//! Is the box ready? Three checks in order, each polled until a shared deadline: cloud-init has
//! finished, every compose service is healthy (or, for the migrator, exited 0), and Sourcegraph
//! answers `GET /__version` with the target release through the box's public HTTP port. On
//! failure, the evidence: the tail of the cloud-init log, the unit's journal and the logs of the
//! services that were not healthy.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;
use serde_json::Value;

use crate::progress::Phase;
use crate::ssh::Ssh;

pub const PROJECT: &str = crate::render::PROJECT;

/// One compose service as `docker compose ps` reports it.
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

/// Parse `docker compose ps --all --format json`: an array (older Compose) or one object per line.
pub fn parse_ps(text: &str) -> Vec<ServiceState> {
    let t = text.trim();
    let items: Vec<Value> = if t.starts_with('[') {
        serde_json::from_str(t).unwrap_or_default()
    } else {
        t.lines().filter_map(|l| serde_json::from_str(l.trim()).ok()).collect()
    };
    items
        .iter()
        .map(|v| ServiceState {
            service: v["Service"].as_str().unwrap_or_default().to_string(),
            state: v["State"].as_str().unwrap_or_default().to_string(),
            health: v["Health"].as_str().unwrap_or_default().to_string(),
            exit_code: v["ExitCode"].as_i64().unwrap_or(0),
        })
        .collect()
}

/// Which expected services are not yet ok (missing ones included).
pub fn not_ready(expected: &[String], states: &[ServiceState]) -> Vec<String> {
    expected
        .iter()
        .filter(|name| !states.iter().any(|s| &s.service == *name && s.ok(one_shot(name))))
        .cloned()
        .collect()
}

pub fn compose_ps_cmd() -> String {
    format!("sudo docker compose -p {PROJECT} ps --all --format json")
}

pub struct Deadline(pub Instant);

impl Deadline {
    fn passed(&self) -> bool {
        Instant::now() >= self.0
    }
}

/// Poll cloud-init until it reports done. An early `error` before boot-finished is not final
/// (cloud-init's status can say error while its final stage has not run yet).
pub async fn cloud_init(ssh: &Ssh, deadline: &Deadline, phase: &Phase) -> Result<()> {
    loop {
        let out = ssh.exec("cloud-init status 2>/dev/null; test -e /var/lib/cloud/instance/boot-finished && echo boot-finished").await?;
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
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
}

/// Poll compose until every expected service is ok. Returns the final states.
pub async fn services(ssh: &Ssh, expected: &[String], deadline: &Deadline, phase: &Phase) -> Result<Vec<ServiceState>, (String, Vec<String>)> {
    let mut last_missing = expected.to_vec();
    loop {
        match ssh.exec(&compose_ps_cmd()).await {
            Ok(out) if out.status == 0 => {
                let states = parse_ps(&out.stdout);
                let missing = not_ready(expected, &states);
                phase.set(format!("{}/{} services healthy", expected.len() - missing.len(), expected.len()));
                if missing.is_empty() {
                    return Ok(states);
                }
                last_missing = missing;
            }
            Ok(out) => phase.set(format!("docker compose ps: {}", out.stderr.trim())),
            Err(e) => phase.set(format!("ssh: {e}")),
        }
        if deadline.passed() {
            return Err((format!("{} of {} services were not healthy when the time was up", last_missing.len(), expected.len()), last_missing));
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
}

/// GET `url/__version` once.
pub async fn version(url: &str) -> Result<String, String> {
    let url = format!("{url}/__version");
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(5))).http_status_as_error(false).build().into();
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

/// Poll `/__version` until it equals `release`.
pub async fn answers(url: &str, release: &str, deadline: &Deadline, phase: &Phase) -> Result<()> {
    loop {
        let got = version(url).await;
        match &got {
            Ok(v) if v == release => return Ok(()),
            Ok(v) => phase.set(format!("/__version says {v}")),
            Err(e) => phase.set(format!("/__version: {e}")),
        }
        if deadline.passed() {
            bail!("{url}/__version did not answer {release} in time (last: {})", got.unwrap_or_else(|e| e));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// The evidence for a failed wait, as text for stderr.
pub async fn diagnostics(ssh: &Ssh, failing: &[String]) -> String {
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

    #[test]
    fn parses_both_ps_formats_and_judges_health() {
        let ndjson = r#"{"Service":"pgsql","State":"running","Health":"healthy","ExitCode":0}
{"Service":"migrator","State":"exited","Health":"","ExitCode":0}
{"Service":"caddy","State":"running","Health":"","ExitCode":0}
{"Service":"sourcegraph-frontend-0","State":"running","Health":"starting","ExitCode":0}"#;
        let s = parse_ps(ndjson);
        assert_eq!(s.len(), 4);
        let expected: Vec<String> = ["pgsql", "migrator", "caddy", "sourcegraph-frontend-0", "gitserver-0"].iter().map(|s| s.to_string()).collect();
        assert_eq!(not_ready(&expected, &s), vec!["sourcegraph-frontend-0".to_string(), "gitserver-0".to_string()]);

        let array = r#"[{"Service":"migrator","State":"exited","Health":"","ExitCode":1}]"#;
        let s = parse_ps(array);
        assert!(!s[0].ok(true), "a migrator that failed is not ready");
        assert_eq!(not_ready(&["migrator".to_string()], &s), vec!["migrator".to_string()]);
        assert!(parse_ps("").is_empty());
    }
}

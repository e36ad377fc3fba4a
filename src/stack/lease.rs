//! The lease on a box: one `sgbox upgrade` or `rollback` at a time, whichever laptop it runs
//! from. The local state folder's lock only sees one laptop; the lease lives on the box
//! (`/var/lib/sgbox/upgrade.lease`, checked and set under `flock` there), names its holder, and
//! is kept alive by a heartbeat over a connection of its own every 30 s. A lease whose heartbeat
//! is older than its TTL, or whose holder was a sgbox on this same machine that is gone, is
//! stale and taken over (said on stderr); otherwise the second command is refused, naming the
//! holder, unless `--break-lock`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;

use crate::onbox::ssh::Target;
use crate::onbox::{quote, Session};
use crate::output;
use crate::state::{now_rfc3339, whoami};

pub const PATH: &str = "/var/lib/sgbox/upgrade.lease";
/// A holder silent this long is gone (its heartbeat comes every HEARTBEAT).
const TTL: Duration = Duration::from_secs(180);
const HEARTBEAT: Duration = Duration::from_secs(30);

/// Who holds a lease, as the lease file says (`key=value` lines).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Holder {
    pub id: String,
    pub owner: String,
    pub host: String,
    pub pid: u32,
    pub command: String,
    pub started: String,
    pub heartbeat: u64,
}

impl Holder {
    fn parse(text: &str) -> Holder {
        let mut h = Holder::default();
        for l in text.lines() {
            let Some((k, v)) = l.split_once('=') else { continue };
            let v = v.to_string();
            match k {
                "id" => h.id = v,
                "owner" => h.owner = v,
                "host" => h.host = v,
                "pid" => h.pid = v.parse().unwrap_or(0),
                "command" => h.command = v,
                "started" => h.started = v,
                "heartbeat" => h.heartbeat = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        h
    }

    fn describe(&self, now: u64) -> String {
        format!(
            "`sgbox {}` by {} (pid {} on {}), started {}, last heartbeat {} s ago",
            self.command,
            self.owner,
            self.pid,
            self.host,
            self.started,
            now.saturating_sub(self.heartbeat)
        )
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

/// The shell that takes (`take`), renews (`renew`) or drops (`drop`) the lease for `me`, under
/// flock on the box. It prints `OK`, or `HELD` and the lease, or `LOST` (renewing a lease that
/// is somebody else's now).
fn script(op: &str, me: &Holder, force: bool) -> String {
    let body = format!("id={}\nowner={}\nhost={}\npid={}\ncommand={}\nstarted={}\n", me.id, me.owner, me.host, me.pid, me.command, me.started);
    let sh = format!(
        r#"set -eu
L={PATH}
mkdir -p "${{L%/*}}"
exec 9>"$L.lock"
flock 9
now=$(date +%s)
held=$(grep '^id=' "$L" 2>/dev/null | cut -d= -f2- || true)
hb=$(grep '^heartbeat=' "$L" 2>/dev/null | cut -d= -f2- || true)
case "$OP" in
take)
  if [ -n "$held" ] && [ "$held" != "$ME" ] && [ "$FORCE" != 1 ] && [ $((now - ${{hb:-0}})) -lt {ttl} ]; then echo HELD; cat "$L"; exit 0; fi
  {{ printf '%s' "$BODY"; echo "heartbeat=$now"; }} >"$L.tmp" && mv "$L.tmp" "$L"; echo OK ;;
renew)
  if [ "$held" != "$ME" ]; then echo LOST; cat "$L" 2>/dev/null || true; exit 0; fi
  sed "s/^heartbeat=.*/heartbeat=$now/" "$L" >"$L.tmp" && mv "$L.tmp" "$L"; echo OK ;;
drop)
  if [ "$held" = "$ME" ]; then rm -f "$L"; fi; echo OK ;;
esac
"#,
        ttl = TTL.as_secs()
    );
    format!("sudo env OP={} ME={} FORCE={} BODY={} sh -c {}", quote(op), quote(&me.id), if force { "1" } else { "0" }, quote(&body), quote(&sh))
}

/// A lease this process holds; its heartbeat stops when it is dropped.
pub struct Lease {
    me: Holder,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

/// Take the box's lease for `command`, or refuse naming its holder. `target` and `pinned` open
/// the heartbeat's own connection.
pub async fn acquire(on: &Session, target: Target, pinned: String, name: &str, command: &str, break_lock: bool) -> Result<Lease> {
    let mut me = Holder {
        id: format!("{}-{}", std::process::id(), crate::state::random_token(12)),
        owner: whoami(),
        host: hostname(),
        pid: std::process::id(),
        command: command.to_string(),
        started: now_rfc3339(),
        heartbeat: 0,
    };
    let mut force = break_lock;
    loop {
        let out = on.run(&script("take", &me, force)).await?;
        if out.trim_start().starts_with("OK") {
            break;
        }
        let held = Holder::parse(out.trim_start().trim_start_matches("HELD"));
        let now = unix_now();
        // A sgbox on this machine that is gone (killed, crashed) left it: take it over.
        if !force && held.host == me.host && held.pid != 0 && !std::path::Path::new(&format!("/proc/{}", held.pid)).exists() {
            output::note(format!("taking over the box's lease from a sgbox that is gone: {}", held.describe(now)));
            force = true;
            continue;
        }
        return Err(crate::error::UserError::field(
            "name",
            format!("another sgbox is changing the box \"{name}\": {}", held.describe(now)),
        )
        .hint(format!(
            "wait for it to finish (`sgbox history --name {name}`); if it is gone for good, run again with --break-lock (its lease expires by itself {} s after its last heartbeat)",
            TTL.as_secs()
        ))
        .into());
    }
    if break_lock {
        output::warn("--break-lock: this sgbox took the box's lease regardless of its holder");
    }
    me.heartbeat = unix_now();
    let renew = script("renew", &me, false);
    let heartbeat = tokio::spawn(async move {
        let mut conn: Option<Session> = None;
        loop {
            tokio::time::sleep(HEARTBEAT).await;
            if conn.is_none() {
                let deadline = Instant::now() + Duration::from_secs(20);
                conn = Session::connect(target.clone(), Some(&pinned), false, || async { Ok(String::new()) }, deadline).await.ok();
            }
            let Some(c) = conn.as_ref() else { continue };
            match c.run(&renew).await {
                Ok(out) if out.trim_start().starts_with("LOST") => {
                    output::warn(format!("the box's lease was taken by another sgbox: {}", Holder::parse(&out).describe(unix_now())));
                    return;
                }
                Ok(_) => {}
                // Reconnect on the next beat.
                Err(_) => conn = None,
            }
        }
    });
    Ok(Lease { me, heartbeat })
}

impl Lease {
    /// Give the lease back (the heartbeat stops).
    pub async fn release(self, on: &Session) {
        self.heartbeat.abort();
        if let Err(e) = on.run(&script("drop", &self.me, false)).await {
            output::warn(format!("could not release the box's lease (it expires by itself in {} s): {e:#}", TTL.as_secs()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Holder {
        Holder {
            id: "42-abc".into(),
            owner: "alice@laptop".into(),
            host: "laptop".into(),
            pid: 42,
            command: "upgrade".into(),
            started: "2026-12-01T10:00:00Z".into(),
            heartbeat: 0,
        }
    }

    /// The lease script, run by a real shell against a scratch lease file (the box's path
    /// rewritten): taken, refused to another holder, renewed, taken over when stale or forced,
    /// dropped only by its holder.
    #[test]
    fn the_lease_script_takes_refuses_renews_and_drops() {
        let tmp = tempfile::tempdir().unwrap();
        let lease = tmp.path().join("upgrade.lease");
        let run = |op: &str, h: &Holder, force: bool| -> String {
            let cmd = script(op, h, force).replace(PATH, lease.to_str().unwrap()).replacen("sudo env", "env", 1);
            let out = std::process::Command::new("sh").arg("-c").arg(&cmd).output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let a = me();
        let b = Holder { id: "7-xyz".into(), owner: "bob@desk".into(), host: "desk".into(), pid: 7, ..me() };
        assert_eq!(run("take", &a, false).trim(), "OK");
        let held = run("take", &b, false);
        assert!(held.starts_with("HELD"), "{held}");
        let h = Holder::parse(held.trim_start_matches("HELD"));
        assert_eq!((h.owner.as_str(), h.pid, h.command.as_str()), ("alice@laptop", 42, "upgrade"));
        assert!(h.heartbeat > 0);
        assert!(h.describe(h.heartbeat + 5).contains("last heartbeat 5 s ago"));
        assert_eq!(run("renew", &a, false).trim(), "OK");
        assert!(run("renew", &b, false).starts_with("LOST"));
        assert_eq!(run("drop", &b, false).trim(), "OK");
        assert!(lease.exists(), "only its holder drops a lease");
        // Stale: a heartbeat older than the TTL is taken over.
        let text = std::fs::read_to_string(&lease).unwrap();
        let old =
            text.lines().map(|l| if l.starts_with("heartbeat=") { "heartbeat=1".to_string() } else { l.to_string() }).collect::<Vec<_>>().join("\n");
        std::fs::write(&lease, old + "\n").unwrap();
        assert_eq!(run("take", &b, false).trim(), "OK");
        assert!(run("take", &a, false).starts_with("HELD"));
        assert_eq!(run("take", &a, true).trim(), "OK", "--break-lock");
        assert_eq!(run("drop", &a, false).trim(), "OK");
        assert!(!lease.exists());
    }
}

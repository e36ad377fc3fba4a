//! End-to-end on one real local box: `sgbox up --cloud local` boots a QEMU VM (Debian 13 built
//! with debootstrap, real cloud-init, sshd, Docker and Compose v2), which pulls stand-in
//! Sourcegraph images of four releases from a real registry on this machine. Under emulation a
//! boot and a stack start take minutes, so ONE box goes through every scenario, in the order that
//! needs the fewest restarts (the automatic rollback swaps the data disk while the VM runs; the
//! one reboot is `sgbox rollback`'s restore of a disk that went from under the box):
//!
//!  0. 5.9 baked into the base image by a VM (`image build --cloud local --version`), the scrub
//!     checked on the baked disk (no host key, machine id, login user, cloud-init state, Docker
//!     identity; the release's images and /etc/sgbox/image.json there);
//!  1. `up` at 5.9 from the baked image with the registry stopped (nothing can be pulled): healthy at the release (by our own GET and by `status`), the data disk and
//!     Docker's root on it, sshd restricted; a re-run of `up` changes nothing; no password printed;
//!     nothing of the image's default configuration (scenario 11) on it;
//!  2. `upgrade` refusals with nothing changed: a downgrade (exit 2), `--dry-run` of 5.9 → 7.4,
//!     a full data disk (exit 2);
//!  3. the multi-version upgrade 5.9 → 7.4 across the Postgres 16 waypoint 5.11, with sgbox
//!     killed during a migrator hop and a re-run that completes from the journal on the box;
//!  4. 7.4 → 7.5 with the 7.5 migrator failing half-way (dirty schema): automatic rollback, 7.4
//!     serving again, the database's data checksum and schema as before, and the box not
//!     restarted for it (the data disk is swapped back while the VM runs);
//!  5. the standard upgrade 7.4 → 7.5 with `/__version` polled every 100 ms and failures counted;
//!  6. the data disk unmounted and without its fstab line (what a first boot whose disk came late
//!     leaves): Docker refuses the root disk and `status` says why; then `sgbox rollback` to 7.4
//!     and its snapshot, which cannot swap a disk that is not mounted and restores it with a
//!     restart: the boot script mounts it again, the boot's unit brings the stack back;
//!     `sgbox history` shows all of it;
//!  7. and 8. (folded into 6: the reboot and the late disk, one boot and one stack start less);
//!  9. a changed host key is refused;
//! 10. `down` leaves no process and no overlay but keeps the data disk; `--delete-data` removes it;
//! 11. a second VM launched from the same image WITHOUT sgbox (meta-data with a key, no user-data,
//!     as a cloud console launches an image), no registry reachable, becomes a working box by the
//!     image's default configuration: site admin claimed by the box before Caddy starts, its
//!     password root-only; its own host keys and machine id.
//!
//! Each scenario's duration is printed (`e2e: ...`), so a slow machine shows where it hurts.
//! Needs qemu-system-x86, qemu-utils, debootstrap, genisoimage, docker-registry, busybox-static
//! and root (debootstrap): `bash .ci/setup`. Missing tools fail the test; nothing is skipped.

use std::io::BufRead;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::localbox::{base_image, free_port, qemu_pids, Registry};
use crate::common::{run, sgbox, text};
use serde_json::Value;

const OLD: &str = "5.9.17785";
const WAYPOINT: &str = "5.11.6271";
const MID: &str = "7.4.0";
const NEW: &str = "7.5.4453";
const NAME: &str = "e2e";
/// Health-checked services of MID and NEW that OLD does not have.
const SINCE_MID: &[&str] = &["syntactic-code-intel-worker"];
/// The box serves Sourcegraph under this name with a certificate from a test CA (`tls = custom`),
/// through Debian's real Caddy.
const HOST: &str = "sourcegraph.sgbox.test";

/// The test CA that signed the box's certificate, once made.
static CA: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// A test CA and a certificate for HOST signed by it, with openssl: (CA, chain, key).
fn test_certificates(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let (ca_key, ca, key, csr, leaf, ext) =
        (dir.join("ca.key"), dir.join("ca.pem"), dir.join("site.key"), dir.join("site.csr"), dir.join("site.pem"), dir.join("san.cnf"));
    std::fs::write(&ext, format!("subjectAltName=DNS:{HOST}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"))
        .unwrap();
    let openssl = |args: &[&str]| {
        let o = std::process::Command::new("openssl").args(args).output().expect("openssl is installed (bash .ci/setup)");
        assert!(o.status.success(), "openssl {args:?}: {}", text(&o.stderr));
    };
    let p = |x: &std::path::PathBuf| x.display().to_string();
    // A new P-256 key at `key`, and a request (or with -x509, a self-signed certificate).
    let new_key = |first: &[&str], key: &std::path::PathBuf, out: &std::path::PathBuf, subject: &str| {
        let mut a = first.to_vec();
        let (k, o) = (p(key), p(out));
        a.extend(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", &k, "-out", &o, "-subj", subject]);
        openssl(&a);
    };
    new_key(&["req", "-x509", "-days", "2"], &ca_key, &ca, "/CN=sgbox test CA");
    new_key(&["req"], &key, &csr, &format!("/CN={HOST}"));
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p(&csr),
        "-CA",
        &p(&ca),
        "-CAkey",
        &p(&ca_key),
        "-CAcreateserial",
        "-out",
        &p(&leaf),
        "-days",
        "2",
        "-extfile",
        &p(&ext),
    ]);
    (ca, leaf, key)
}

/// The forwarded port in the box's site URL, `https://HOST:port/...` (None for another URL).
fn https_port(url: &str) -> Option<&str> {
    url.strip_prefix(&format!("https://{HOST}:")).map(|rest| rest.split('/').next().unwrap_or(""))
}

/// curl's arguments to reach `url` on the box: HOST resolved to the local forward, the test CA
/// trusted (the certificate is checked for real from here).
fn curl_to(url: &str) -> Vec<String> {
    let mut a = vec!["-sS".to_string(), "-m".into(), "10".into()];
    if let Some(port) = https_port(url) {
        a.extend(["--resolve".into(), format!("{HOST}:{port}:127.0.0.1"), "--cacert".into(), CA.get().expect("the test CA").display().to_string()]);
    }
    a.push(url.to_string());
    a
}

/// The pollers' client of the box's site (`https://HOST:port`): the certificate checked against the
/// test CA; 10 s timeouts, like `get`. In this process, TLS sessions resumed: spawning curl 20
/// times a second took a good part of this machine's two cores, which the emulated box runs on.
struct Site {
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// A kept-alive connection of a poller, and how many requests it carried.
struct Kept {
    s: std::io::BufReader<Tls>,
    used: u32,
}

/// A kept-alive poller opens a new connection after this many requests: a browser's pattern,
/// a new connection a second at 100 ms, each of them a TLS handshake the box's CPU pays for.
const REQUESTS_PER_CONNECTION: u32 = 10;

impl Site {
    fn new(url: &str) -> Site {
        use rustls::pki_types::pem::PemObject;
        let port: u16 = https_port(url).and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("not the box's https URL: {url}"));
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(CA.get().expect("the test CA")).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Site { addr: ([127, 0, 0, 1], port).into(), tls: Arc::new(tls) }
    }

    fn connect(&self) -> Option<Tls> {
        let limit = Duration::from_secs(10);
        let tcp = std::net::TcpStream::connect_timeout(&self.addr, limit).ok()?;
        tcp.set_read_timeout(Some(limit)).ok()?;
        tcp.set_write_timeout(Some(limit)).ok()?;
        // The request follows TLS's last handshake record at once (not after the server's
        // delayed acknowledgement, 40 ms).
        tcp.set_nodelay(true).ok()?;
        let name = rustls::pki_types::ServerName::try_from(HOST).ok()?;
        Some(rustls::StreamOwned::new(rustls::ClientConnection::new(self.tls.clone(), name).ok()?, tcp))
    }

    /// GET `path` on a new connection (HTTP/1.0: the server closes after the answer), so a
    /// listener that stops taking connections shows: the body of a 2xx answer; None for any
    /// other answer, a refused or cut connection, a bad certificate or a timeout.
    fn get(&self, path: &str) -> Option<String> {
        use std::io::{Read, Write};
        let mut s = self.connect()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {HOST}\r\nUser-Agent: sgbox-e2e\r\n\r\n").as_bytes()).ok()?;
        let mut buf = Vec::new();
        match s.read_to_end(&mut buf) {
            Ok(_) => {}
            // Closed without TLS's close_notify: the answer counts only if it is whole (below).
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
            Err(_) => return None,
        }
        let answer = String::from_utf8_lossy(&buf);
        let (head, body) = answer.split_once("\r\n\r\n")?;
        let code: u16 = head.split(' ').nth(1)?.parse().ok()?;
        let length = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<usize>().ok()).flatten()
        });
        let whole = length.is_none_or(|n| body.len() == n);
        ((200..300).contains(&code) && whole).then(|| body.to_string())
    }

    /// GET `path` as a browser does: HTTP/1.1 on a kept-alive connection, a new one after
    /// [`REQUESTS_PER_CONNECTION`]. A kept connection the server closed while it was idle (a
    /// drained Caddy closes its idle connections) is retried once on a new one, as RFC 9110
    /// §9.2.2 allows for a GET and every browser does, but only when not a byte of an answer
    /// came back: `retried` counts those. Anything else fails as in [`Site::get`].
    fn get_kept(&self, kept: &mut Option<Kept>, path: &str, retried: &mut u32) -> Option<String> {
        let reused = kept.as_ref().is_some_and(|k| k.used > 0);
        match self.exchange(kept, path) {
            Ok(body) => Some(body),
            Err(answered) => {
                *kept = None;
                if reused && !answered {
                    *retried += 1;
                    self.exchange(kept, path).ok()
                } else {
                    None
                }
            }
        }
    }

    /// One request on `kept` (opened if None; dropped after its last request or a `close`). Err
    /// tells whether any byte of an answer had come.
    fn exchange(&self, kept: &mut Option<Kept>, path: &str) -> Result<String, bool> {
        use std::io::{BufRead, Read, Write};
        if kept.is_none() {
            *kept = Some(Kept { s: std::io::BufReader::new(self.connect().ok_or(false)?), used: 0 });
        }
        let k = kept.as_mut().unwrap();
        k.used += 1;
        let last = k.used >= REQUESTS_PER_CONNECTION;
        let close = if last { "Connection: close\r\n" } else { "" };
        let req = format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\nUser-Agent: sgbox-e2e\r\n{close}\r\n");
        k.s.get_mut().write_all(req.as_bytes()).map_err(|_| false)?;
        k.s.get_mut().flush().map_err(|_| false)?;
        let mut status = String::new();
        if k.s.read_line(&mut status).map_err(|_| false)? == 0 {
            return Err(false);
        }
        let code: u16 = status.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or(true)?;
        let (mut length, mut chunked, mut closes) = (None, false, last);
        loop {
            let mut line = String::new();
            if k.s.read_line(&mut line).map_err(|_| true)? == 0 {
                return Err(true);
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let Some((name, value)) = line.split_once(':') else { return Err(true) };
            let value = value.trim();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = Some(value.parse::<usize>().map_err(|_| true)?),
                "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                "connection" => closes |= value.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let mut size = String::new();
                k.s.read_line(&mut size).map_err(|_| true)?;
                let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16).map_err(|_| true)?;
                let mut chunk = vec![0; n + 2];
                k.s.read_exact(&mut chunk).map_err(|_| true)?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(n) = length {
            body.resize(n, 0);
            k.s.read_exact(&mut body).map_err(|_| true)?;
        } else {
            // Neither: the body ends with the connection.
            closes = true;
            match k.s.read_to_end(&mut body) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
                Err(_) => return Err(true),
            }
        }
        if closes {
            *kept = None;
        }
        if (200..300).contains(&code) {
            Ok(String::from_utf8_lossy(&body).to_string())
        } else {
            Err(true)
        }
    }
}

fn get(url: &str) -> Option<String> {
    let out = std::process::Command::new("curl").arg("-f").args(curl_to(url)).output().ok()?;
    out.status.success().then(|| text(&out.stdout))
}

/// The e2e's docker-compose.override.yaml: `more` (services' YAML, none of those below: Compose
/// refuses a service named twice) and a health-check interval of five minutes for the services
/// that have one in every release the test runs. Each check is a container exec, most of a second
/// of the emulated box's CPU: at Sourcegraph's intervals (5-10 s) they kept the box busy, and at
/// one a minute they still took a seventh of a host core while the box idled. Until a container
/// is first healthy (at most five minutes after its start) it is checked every 2 s, so a start is
/// seen healthy as soon as it is, whatever start period a service has of its own.
fn checks_override(more: &str) -> String {
    checks_override_with(&[], more)
}

/// `checks_override`, with the health checks of `also` (services of every release from here on:
/// Compose refuses an override of a service its release does not have) at that rate too.
fn checks_override_with(also: &[&str], more: &str) -> String {
    let checked = [
        "blobstore",
        "codeinsights-db",
        "codeintel-db",
        "pgsql",
        "precise-code-intel-worker",
        "searcher-0",
        "sourcegraph-frontend-0",
        "sourcegraph-frontend-internal",
        "syntect-server",
        "zoekt-webserver-0",
    ];
    let mut y = format!("services:\n{more}");
    for &s in checked.iter().chain(also) {
        y.push_str(&format!("  {s}:\n    healthcheck:\n      interval: 300s\n      start_period: 300s\n      start_interval: 2s\n"));
    }
    y
}

/// The baked image's disk, read with debugfs (no boot): what the scrub must have removed is
/// gone, and what the bake recorded is there. Two boxes from it then differ in host keys and
/// machine id: neither is in the image, so each box makes its own at first boot.
fn scrubbed(baked: &Path, n_images: usize) {
    let raw = baked.with_extension("raw");
    let o = std::process::Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(baked.join("base.qcow2")).arg(&raw).output().unwrap();
    assert!(o.status.success(), "qemu-img convert: {}", text(&o.stderr));
    let fs = |cmd: &str| {
        let o = std::process::Command::new("debugfs").args(["-R", cmd]).arg(&raw).output().expect("debugfs (e2fsprogs) is installed");
        format!("{}{}", text(&o.stdout), text(&o.stderr))
    };
    let ssh = fs("ls -p /etc/ssh");
    assert!(ssh.contains("/sshd_config/"), "debugfs reads the image: {ssh}");
    assert!(!ssh.contains("ssh_host_"), "no SSH host key in the image: {ssh}");
    let id = fs("cat /etc/machine-id");
    let id = id.lines().filter(|l| !l.starts_with("debugfs")).collect::<String>();
    assert!(id.trim().is_empty() || id.trim() == "uninitialized", "no machine id in the image: {id}");
    // Nor D-Bus's copy, which systemd would take over the empty one.
    let dbus = fs("stat /var/lib/dbus/machine-id");
    assert!(dbus.contains("Type: symlink") || dbus.contains("File not found"), "no D-Bus machine id in the image: {dbus}");
    let home = fs("ls -p /home");
    assert!(home.lines().filter(|l| l.starts_with('/')).all(|l| l.contains("/./") || l.contains("/../")), "no login user's home: {home}");
    for (dir, gone) in [("/root", ".bash_history"), ("/root/.ssh", "authorized_keys"), ("/usr/local/sbin", "sgbox-bake"), ("/etc/sgbox", "bake.env")]
    {
        let l = fs(&format!("ls -p {dir}"));
        assert!(!l.contains(&format!("/{gone}/")), "{dir}/{gone} is scrubbed: {l}");
    }
    let cfg = fs("ls -p /etc/cloud/cloud.cfg.d");
    assert!(cfg.contains("/90-sgbox-image-default.cfg/"), "the image's default configuration, for a launch without sgbox: {cfg}");
    assert!(!fs("ls -p /etc/sgbox").contains("/image-default.cfg/"), "moved, not copied");
    let docker = fs("ls -p /var/lib/docker");
    assert!(docker.contains("/image/") && docker.contains("/overlay2/"), "the baked images: {docker}");
    for gone in ["engine-id", "containers", "network"] {
        assert!(!docker.contains(&format!("/{gone}/")), "Docker's {gone} is scrubbed: {docker}");
    }
    let cloud = fs("ls -p /var/lib/cloud");
    assert!(!cloud.contains("/instances/") && !cloud.contains("/instance/"), "cloud-init's state is cleaned: {cloud}");
    let record = fs("cat /etc/sgbox/image.json");
    // debugfs's banner (stderr) follows the file's one line.
    let record = record.lines().find(|l| l.starts_with('{')).unwrap_or("");
    let v: Value = serde_json::from_str(record).unwrap_or_else(|e| panic!("/etc/sgbox/image.json ({e}): {record}"));
    assert_eq!(v["release"], OLD, "{v:#}");
    assert_eq!(v["images"].as_object().map(|m| m.len()), Some(n_images), "every image of the release: {v:#}");
    std::fs::remove_file(&raw).unwrap();
}

/// A box launched from the baked image WITHOUT sgbox, as a cloud console launches a machine
/// image: plain QEMU, a blank data disk, and a NoCloud seed with only meta-data (an instance id
/// and the launch's public key, as EC2's metadata gives a key pair) and empty user-data. The
/// image's default configuration alone must make it a working box. Killed (by PID) on drop.
struct ConsoleBox {
    dir: tempfile::TempDir,
    pid: u32,
    ssh_port: u16,
    http_port: u16,
}

/// The default user of the local base image's cloud-init (Debian's `debian`; `admin` on Debian's
/// AWS images): the launch's key pair is its.
const CONSOLE_USER: &str = "debian";

impl ConsoleBox {
    fn launch(image: &Path) -> ConsoleBox {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let cmd = |c: &mut std::process::Command| {
            let o = c.output().unwrap();
            assert!(o.status.success(), "{c:?}: {}{}", text(&o.stdout), text(&o.stderr));
        };
        cmd(std::process::Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", "console-launch", "-f"]).arg(d.join("key")));
        let public = std::fs::read_to_string(d.join("key.pub")).unwrap();
        std::fs::write(
            d.join("meta-data"),
            format!("instance-id: i-console-{}\nlocal-hostname: console\npublic-keys:\n  - {}\n", std::process::id(), public.trim()),
        )
        .unwrap();
        std::fs::write(d.join("user-data"), "").unwrap();
        cmd(std::process::Command::new("genisoimage")
            .args(["-quiet", "-volid", "cidata", "-joliet", "-rock", "-output"])
            .arg(d.join("seed.iso"))
            .arg(d.join("user-data"))
            .arg(d.join("meta-data")));
        cmd(std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(image.join("base.qcow2"))
            .arg(d.join("overlay.qcow2"))
            .arg("16G"));
        cmd(std::process::Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(d.join("data.qcow2")).arg("20G"));
        let p = |n: &str| d.join(n).display().to_string();
        // Ports picked here and bound by QEMU a moment later can be taken in between by another
        // test's server: QEMU then refuses to start, and other ports are tried (as sgbox does).
        let mut attempts = 0;
        let (ssh_port, http_port) = loop {
            attempts += 1;
            let (ssh_port, http_port) = (free_port(), free_port());
            let o = std::process::Command::new("qemu-system-x86_64")
                .args([
                    "-name",
                    "sgbox-e2e-console",
                    "-accel",
                    "tcg",
                    "-cpu",
                    "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt,+cx16",
                    "-smp",
                    "2",
                    "-m",
                    "4096",
                    "-display",
                    "none",
                    "-daemonize",
                    "-pidfile",
                    &p("qemu.pid"),
                    "-serial",
                    &format!("file:{}", p("console.log")),
                    "-monitor",
                    "none",
                    "-kernel",
                    &image.join("vmlinuz").display().to_string(),
                    "-initrd",
                    &image.join("initrd.img").display().to_string(),
                    "-append",
                    "root=LABEL=rootfs rw console=ttyS0 net.ifnames=0 panic=-1",
                    "-drive",
                    &format!("file={},if=none,id=root,format=qcow2", p("overlay.qcow2")),
                    "-device",
                    "virtio-blk-pci,drive=root",
                    "-drive",
                    &format!("file={},if=none,id=data,format=qcow2", p("data.qcow2")),
                    "-device",
                    "virtio-blk-pci,drive=data,serial=sgbox-data",
                    "-drive",
                    &format!("file={},if=none,id=seed,format=raw,readonly=on", p("seed.iso")),
                    "-device",
                    "virtio-blk-pci,drive=seed",
                    "-netdev",
                    &format!("user,id=n0,hostfwd=tcp:127.0.0.1:{ssh_port}-:22,hostfwd=tcp:127.0.0.1:{http_port}-:80"),
                    "-device",
                    "virtio-net-pci,netdev=n0,romfile=",
                    "-device",
                    "virtio-rng-pci",
                ])
                .output()
                .unwrap();
            if o.status.success() {
                break (ssh_port, http_port);
            }
            let err = text(&o.stderr);
            assert!(err.contains("host forwarding rule") && attempts < 4, "qemu-system-x86_64 did not start: {err}");
        };
        let pid = std::fs::read_to_string(d.join("qemu.pid")).unwrap().trim().parse().unwrap();
        ConsoleBox { dir, pid, ssh_port, http_port }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }

    /// Until the site answers `release` (Caddy starts only once the box has claimed its admin).
    fn wait_for(&self, release: &str, within: Duration) {
        let until = Instant::now() + within;
        while crate::common::localbox::http_get(&self.url("/__version")).map(|v| v.trim().to_string()).as_deref() != Some(release) {
            assert!(Instant::now() < until, "the console-launched box never served {release}:\n{}", self.console());
            std::thread::sleep(Duration::from_secs(3));
        }
    }

    /// `cmd` over SSH as the image's default user with the launch's key (this test's own box:
    /// its host key is not pinned).
    fn ssh(&self, cmd: &str) -> std::process::Output {
        std::process::Command::new("ssh")
            .arg("-i")
            .arg(self.dir.path().join("key"))
            .args(["-p", &self.ssh_port.to_string(), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes"])
            .args(["-o", "LogLevel=ERROR", &format!("{CONSOLE_USER}@127.0.0.1"), cmd])
            .output()
            .unwrap()
    }
}

impl Drop for ConsoleBox {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").arg(self.pid.to_string()).status();
        let until = Instant::now() + Duration::from_secs(30);
        while Path::new(&format!("/proc/{}", self.pid)).exists() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// POST a JSON body to a URL: the HTTP status.
fn post_json(url: &str, body: &str) -> u16 {
    let o = std::process::Command::new("curl")
        .args([
            "-sS",
            "-m",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            "@-",
            url,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(body.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    text(&o.stdout).trim().parse().unwrap_or(0)
}

/// What the last run of the rollback's start step said of `sourcegraph.service` (its log keeps
/// every run, each after a `=== ` line).
fn start_said(st: &Path) -> String {
    ssh(st, "sudo awk '/^=== /{run=\"\"} /^== .*sourcegraph.service is/{run=run $0 \"\\n\"} END{printf \"%s\", run}' /var/lib/sgbox/steps/rollback-start.log")
}

fn json_of(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", text(&out.stdout), text(&out.stderr)))
}

fn console_tail(st: &Path) -> String {
    let log = std::fs::read_to_string(st.join(NAME).join("local/console.log")).unwrap_or_default();
    log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// `sgbox ssh -- cmd`, whatever its outcome.
fn ssh_out(st: &Path, cmd: &str) -> std::process::Output {
    run(sgbox(st).args(["ssh", "--name", NAME, "--", cmd]))
}

/// `sgbox ssh -- cmd`, which must succeed; its stdout.
fn ssh(st: &Path, cmd: &str) -> String {
    let out = ssh_out(st, cmd);
    assert!(out.status.success(), "`{cmd}` on the box: {}\n{}", text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

/// The user's docker-compose.override.yaml on the box, written the way a user would: piped into
/// `sgbox ssh -- sudo tee` (the command gets the input, then end of file).
fn put_override(st: &Path, yaml: &str) {
    use std::io::Write;
    let mut child = sgbox(st)
        .args(["ssh", "--name", NAME, "--", "sudo tee /opt/sgbox/docker-compose.override.yaml"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(yaml.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "writing the override: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), yaml, "tee echoed what it was given");
}

fn wait_healthy(st: &Path, within: Duration) -> Value {
    let until = Instant::now() + within;
    loop {
        let out = run(sgbox(st).args(["status", "--name", NAME, "--output", "json"]));
        if out.status.success() {
            let v = json_of(&out);
            if v["healthy"] == Value::Bool(true) {
                return v;
            }
            if Instant::now() > until {
                panic!("not healthy within {within:?}: {v:#}\nconsole:\n{}", console_tail(st));
            }
        }
        std::thread::sleep(Duration::from_secs(5));
    }
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
    get(&format!("{url}/__version")).map(|s| s.trim().to_string())
}

/// A `sgbox upgrade` running in the background, its stderr read line by line.
struct Watched {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    err_reader: std::thread::JoinHandle<()>,
    out_reader: std::thread::JoinHandle<String>,
    progress: String,
}

impl Watched {
    fn start(st: &Path, args: &[&str]) -> Watched {
        let mut child = sgbox(st)
            .args(["upgrade", "--name", NAME, "--yes", "--timeout", "20m"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let out_reader = std::thread::spawn(move || {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::BufReader::new(stdout), &mut s).ok();
            s
        });
        let (tx, lines) = std::sync::mpsc::channel::<String>();
        let stderr = child.stderr.take().unwrap();
        let err_reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Watched { child, lines, err_reader, out_reader, progress: String::new() }
    }

    /// Read progress until a line starts with `prefix` (a phase sgbox prints).
    fn until_line(&mut self, prefix: &str) {
        let until = Instant::now() + Duration::from_secs(1200);
        loop {
            match self.lines.recv_timeout(Duration::from_secs(1)) {
                Ok(line) => {
                    self.progress.push_str(&line);
                    self.progress.push('\n');
                    if line.starts_with(prefix) {
                        return;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("the upgrade ended ({:?}) before `{prefix}`:\n{}", self.child.wait(), self.progress)
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            }
            assert!(Instant::now() < until, "no `{prefix}`:\n{}", self.progress);
        }
    }

    /// Wait until a step unit matching `pattern` runs on the box (a poll that cannot connect, the
    /// box being busy, polls again).
    fn until_unit(&mut self, st: &Path, pattern: &str) {
        let until = Instant::now() + Duration::from_secs(120);
        let cmd = format!("systemctl list-units '{pattern}' --state=active --no-legend --plain");
        while !text(&ssh_out(st, &cmd).stdout).contains("sgbox-step-") && Instant::now() < until {
            assert!(self.child.try_wait().unwrap().is_none(), "the upgrade ended before {pattern} was seen running:\n{}", self.progress);
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.err_reader.join().unwrap();
    }

    fn wait(mut self) -> std::process::Output {
        let status = self.child.wait().unwrap();
        self.err_reader.join().unwrap();
        for line in self.lines.try_iter() {
            self.progress.push_str(&line);
            self.progress.push('\n');
        }
        std::process::Output { status, stdout: self.out_reader.join().unwrap().into_bytes(), stderr: self.progress.into_bytes() }
    }
}

fn journal(st: &Path) -> Value {
    let t = ssh(st, "sudo cat /var/lib/sgbox/upgrade.json 2>/dev/null || echo null");
    serde_json::from_str(&t).unwrap_or(Value::Null)
}

/// Each step of an upgrade's journal with the time it ended (or failed), for the log: where a
/// slow machine spends an upgrade's minutes.
fn print_steps(what: &str, j: &Value) {
    let steps: Vec<String> = j["steps"]
        .as_array()
        .map(|s| {
            s.iter()
                .map(|e| {
                    format!(
                        "{}{} {} {}",
                        e["step"].as_str().unwrap_or("?"),
                        e["to"].as_str().map(|t| format!("→{t}")).unwrap_or_default(),
                        e["status"].as_str().unwrap_or("?"),
                        e["at"].as_str().unwrap_or("-")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    eprintln!("e2e: {what}: started {} | {}", j["started_at"].as_str().unwrap_or("?"), steps.join(" | "));
}

/// The phases sgbox reported done (or failed), with their durations, for the log.
fn print_phases(what: &str, out: &std::process::Output) {
    let done: Vec<String> = text(&out.stderr).lines().filter(|l| l.starts_with(['✓', '✗'])).map(|l| l.chars().take(90).collect()).collect();
    eprintln!("e2e: {what}: {}", done.join(" | "));
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
    format!(
        "{}{}",
        ssh(st, "cat /etc/sgbox/deployment.json; sha256sum /opt/sgbox/docker-compose.yaml; sudo cat /var/lib/sgbox/upgrade.json 2>/dev/null || true"),
        snapshots(st)
    )
}

/// Scenario durations, printed as they end and once more as a table at the end.
struct Clock {
    last: Instant,
    laps: Vec<(String, f64, f64)>,
}

/// Milliseconds of one fixed piece of work on one of this machine's CPUs (in this debug build,
/// 220–410 ms on the 2.0 GHz Xeon of the kind CI runs on, as the host's load varied): a figure
/// to compare runs by, not a test.
fn cpu_probe_ms() -> f64 {
    let start = Instant::now();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..20_000_000u32 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    std::hint::black_box(x);
    start.elapsed().as_secs_f64() * 1000.0
}

impl Clock {
    fn new() -> Clock {
        Clock { last: Instant::now(), laps: Vec::new() }
    }

    /// Each scenario's seconds, and after it how fast this machine's CPU was then: the same
    /// machine has emulated the box up to twice as slowly from one run to the next, and a slow
    /// run's figures mean little without it.
    fn lap(&mut self, what: &str) {
        let secs = self.last.elapsed().as_secs_f64();
        let probe = cpu_probe_ms();
        self.last = Instant::now();
        eprintln!("e2e: {what}: {secs:.0} s (host CPU probe after it: {probe:.0} ms)");
        self.laps.push((what.to_string(), secs, probe));
    }

    fn table(&self) {
        let total: f64 = self.laps.iter().map(|(_, s, _)| s).sum();
        eprintln!("e2e: scenarios of the shared local box (seconds; host CPU probe after each, ms):");
        for (w, s, p) in &self.laps {
            eprintln!("e2e:   {s:6.0}  {p:5.0}  {w}");
        }
        eprintln!("e2e:   {total:6.0}         total");
    }
}

/// Deletes the box when the test ends, failed or not: a VM left running would slow every later test.
struct Teardown<'a>(&'a Path);

impl Drop for Teardown<'_> {
    fn drop(&mut self) {
        let _ = run(sgbox(self.0).args(["down", "--name", NAME, "--cloud", "local", "--delete-data", "--yes"]));
    }
}

#[test]
#[ignore = "end to end on a real QEMU box (20+ minutes): .ci/test runs it with --include-ignored"]
fn local_box_lifecycle() {
    eprintln!("e2e: host CPU probe before the first scenario: {:.0} ms", cpu_probe_ms());
    let mut clock = Clock::new();
    base_image();
    clock.lap("base image (built once, then cached)");
    let mut registry = Registry::start();
    registry.push_standins(&[OLD, WAYPOINT, MID, NEW]);
    clock.lap("registry with the stand-ins of 4 releases");

    // 0. The first release baked into the base image (`image build --cloud local --version`: a
    //    VM pulls it from the registry, scrubs itself, powers off), the scrub checked on the
    //    baked disk itself; then the registry stops answering, and the box comes up from the
    //    baked image pulling nothing.
    let bake_dir = tempfile::tempdir().unwrap();
    let baked = bake_dir.path().join("baked");
    let out = run(sgbox(bake_dir.path())
        .args([
            "image",
            "build",
            "--cloud",
            "local",
            "--version",
            OLD,
            "--registry-mirror",
            &registry.mirror_for_guest(),
            "--mirror-mode",
            "tags-only",
        ])
        .arg("--out")
        .arg(&baked)
        .args(["--timeout", "20m", "--output", "json"]));
    assert!(out.status.success(), "image build --version: {}", text(&out.stderr));
    let b = json_of(&out);
    assert!(b["release"] == OLD && b["cached"] == false && b["image"]["release"] == OLD, "{b:#}");
    eprintln!("e2e: baked {OLD} in {:.0} s", b["image"]["build_seconds"].as_f64().unwrap_or(0.0));
    scrubbed(&baked, b["digests"].as_object().map(|d| d.len()).unwrap_or(0));
    clock.lap("bake 5.9 into the base image (a VM), its scrub checked on the disk");
    registry.pause();
    let image = baked;
    let mirror = registry.mirror_for_guest();
    let state = tempfile::tempdir().unwrap();
    let st = state.path();
    let _teardown = Teardown(st);
    let certs = tempfile::tempdir().unwrap();
    let (ca, chain, key) = test_certificates(certs.path());
    CA.set(ca).unwrap();
    // The user's docker-compose.override.yaml, given to `up` (`--compose-override`), so that it
    // applies from the first start on: health checks once a minute after a service is healthy.
    // Under emulation a health check is a container exec costing a good part of a second of the
    // box's CPU; Sourcegraph's 5-10 s intervals held the idle box at half its two vCPUs (QEMU at
    // 110-140 % of this machine's CPU, 30-50 % with this). Starting services are still checked
    // every few seconds (`start_interval`), so nothing waits longer for a healthy service.
    let user_override = certs.path().join("docker-compose.override.yaml");
    std::fs::write(&user_override, checks_override("")).unwrap();
    let up_args = || -> Vec<String> {
        let mut a: Vec<String> = ["up", "--cloud", "local", "--name", NAME, "--version", OLD, "--hostname", HOST, "--tls", "custom"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend([
            "--tls-cert".to_string(),
            chain.display().to_string(),
            "--tls-key".to_string(),
            key.display().to_string(),
            "--registry-mirror".to_string(),
        ]);
        a.push(mirror.clone());
        a.extend(["--mirror-mode", "tags-only", "--base-image"].iter().map(|s| s.to_string()));
        a.push(image.display().to_string());
        a.push("--compose-override".to_string());
        a.push(user_override.display().to_string());
        a.extend(["--yes", "--output", "json", "--timeout", "25m"].iter().map(|s| s.to_string()));
        a
    };

    // 1. Up: healthy at the release, checked independently of sgbox's own wait.
    let out = run(sgbox(st).args(up_args()));
    assert!(out.status.success(), "up failed: {}\nconsole:\n{}", text(&out.stderr), console_tail(st));
    let up = json_of(&out);
    eprintln!("e2e: up phases (s): {}", up["timings"]);
    assert_eq!(up["release"], OLD);
    let url = up["url"].as_str().unwrap().to_string();
    assert!(url.starts_with(&format!("https://{HOST}:")), "{url}");
    // Served by Debian's Caddy with the user's certificate (checked against the test CA), which
    // reached the box over SSH, not in the user-data; plain HTTP for the name is redirected.
    assert_eq!(version(&url).as_deref(), Some(OLD));
    let http = format!("http://127.0.0.1:{}/", up["ports"]["http"]);
    let o = std::process::Command::new("curl")
        .args(["-sS", "-m", "10", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}", "-H", &format!("Host: {HOST}"), &http])
        .output()
        .unwrap();
    let redirect = text(&o.stdout);
    assert!(redirect.starts_with("308 https://sourcegraph.sgbox.test/"), "Caddy redirects HTTP to HTTPS: {redirect}");
    assert!(up["ssh"]["host_key_fingerprint"].as_str().unwrap_or("").starts_with("SHA256:"), "host key pinned: {up:#}");
    let overlay = st.join(NAME).join("local/overlay.qcow2");
    let data = st.join(NAME).join("local/data.qcow2");
    let pids = qemu_pids(&overlay.display().to_string());
    assert_eq!(pids.len(), 1, "one VM: {pids:?}");
    let mut stderr_all = text(&out.stderr);
    // Nothing could be pulled: the boot script copied the baked images into the data disk's
    // Docker root.
    let seeded = ssh(st, "sudo grep -c \"seeding Docker's root\" /var/log/cloud-init-output.log; sudo docker images -q | wc -l");
    assert!(seeded.lines().next().is_some_and(|n| n.trim() != "0"), "the boot script seeded Docker's root: {seeded}");
    registry.resume();
    clock.lap("up from the baked image, no registry (boot, cloud-init, 27 services healthy)");

    let status = wait_healthy(st, Duration::from_secs(60));
    let services = status["services"].as_array().unwrap();
    assert!(services.len() >= 20, "every compose service is reported: {status:#}");
    assert_eq!(status["unhealthy"], Value::Array(vec![]));
    assert_eq!(status["data_disk_mounted"], true, "{status:#}");

    // The box is the one rendered: data on the separate disk, Docker's root there, SSH only for sgbox.
    // An image's own drop-in (sorting after 00-) cannot loosen sshd: the first value read wins.
    let out = ssh_out(
        st,
        "echo 'PasswordAuthentication yes' | sudo tee /etc/ssh/sshd_config.d/10-image.conf >/dev/null; findmnt -n -o SOURCE,FSTYPE /mnt/sgbox-data; sudo docker info --format '{{.DockerRootDir}}'; sudo sshd -T | grep -i '^allowusers\\|^passwordauthentication'; sudo rm /etc/ssh/sshd_config.d/10-image.conf; cloud-init status",
    );
    let o = text(&out.stdout);
    assert!(out.status.success(), "{o}\n{}", text(&out.stderr));
    assert!(o.contains("ext4"), "data disk mounted: {o}");
    assert!(o.contains("/mnt/sgbox-data/docker"), "docker root on the data disk: {o}");
    assert!(o.contains("allowusers sgbox"), "sshd restricted: {o}");
    assert!(o.contains("passwordauthentication no"), "an image's drop-in does not win: {o}");
    assert!(o.contains("status: done"), "{o}");
    stderr_all.push_str(&text(&out.stderr));

    // No secret in the user-data: the box made its database passwords at first boot, on the data
    // disk (the compose project's .env links there), and a box that loses its root disk but keeps
    // the data disk gets the same ones back from the boot script.
    let secrets_cmd = "readlink /opt/sgbox/.env; sudo cat /mnt/sgbox-data/sgbox/secrets.env; sudo stat -c %a /mnt/sgbox-data/sgbox/secrets.env";
    let out = ssh_out(st, secrets_cmd);
    let on_box = text(&out.stdout);
    assert!(out.status.success(), "{on_box}\n{}", text(&out.stderr));
    assert!(on_box.starts_with("/mnt/sgbox-data/sgbox/secrets.env\n") && on_box.trim_end().ends_with("\n600"), "{on_box}");
    let passwords: Vec<String> = on_box.lines().filter_map(|l| l.split_once("PASSWORD=").map(|(_, v)| v.to_string())).collect();
    assert_eq!(passwords.len(), 3, "{on_box}");
    for p in &passwords {
        assert!(p.len() == 32 && p.bytes().all(|b| b.is_ascii_alphanumeric()), "{p}");
    }
    let ud = text(&ssh_out(st, "sudo cat /var/lib/cloud/instance/user-data.txt").stdout);
    let valued = ud.match_indices("PASSWORD=").any(|(i, m)| ud[i + m.len()..].starts_with(|c: char| c.is_ascii_alphanumeric()));
    assert!(ud.contains("#cloud-config") && !valued, "no password value in the user-data");
    assert!(
        !ud.contains("PRIVATE KEY") && !ud.contains(std::fs::read_to_string(&key).unwrap().lines().nth(1).unwrap()),
        "no TLS key in the user-data"
    );
    let o = ssh(st, "sudo stat -c '%a %U' /opt/sgbox/tls/sourcegraph.key; sudo docker inspect -f '{{.Config.Image}} {{.Path}}' caddy");
    assert!(o.starts_with("600 root\n") && o.contains("/usr/bin/caddy"), "the key arrived 0600; Caddy is Debian's: {o}");
    assert!(passwords.iter().all(|p| !ud.contains(p.as_str())));
    let out = ssh_out(st, &format!("sudo rm /opt/sgbox/.env && sudo /usr/local/sbin/sgbox-data-disk 2>/dev/null && {{ {secrets_cmd}; }}"));
    assert_eq!(text(&out.stdout), on_box, "the same passwords after the root disk lost its link: {}", text(&out.stderr));
    for f in std::fs::read_dir(st.join(NAME)).unwrap() {
        let body = std::fs::read_to_string(f.unwrap().path()).unwrap_or_default();
        assert!(passwords.iter().all(|p| !body.contains(p.as_str())), "a database password is in the local state");
    }

    // The site admin is sgbox's: created through site-init, kept 0600, shown only when asked;
    // nobody else can claim the site now.
    assert_eq!(up["admin"]["claimed"], true, "{up:#}");
    let admin_file = st.join(NAME).join("admin.json");
    assert_eq!(std::fs::metadata(&admin_file).unwrap().permissions().mode() & 0o777, 0o600);
    let out = run(sgbox(st).args(["admin", "--name", NAME, "--output", "json"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let admin = json_of(&out);
    let admin_pw = admin["password"].as_str().unwrap().to_string();
    assert!(admin_pw.len() >= 12, "{admin:#}");
    let page = get(&format!("{url}/sign-in")).unwrap_or_default();
    assert!(page.contains("\"needsSiteInit\":false"), "{page}");
    let post = |path: &str, body: &str| -> String {
        let o = std::process::Command::new("curl")
            .args(["-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "-H", "Content-Type: application/json", "--data", body])
            .args(curl_to(&format!("{url}{path}")))
            .output()
            .unwrap();
        text(&o.stdout)
    };
    assert_eq!(
        post("/-/site-init", r#"{"email":"mallory@example.com","username":"mallory","password":"mallory-wants-in"}"#),
        "500",
        "already initialized"
    );
    assert_eq!(post("/-/sign-in", &serde_json::json!({ "email": "admin", "password": admin_pw }).to_string()), "200");
    assert!(!up.to_string().contains(admin_pw.as_str()), "up's result does not carry the admin password");
    let pw: Vec<String> = passwords.clone();

    // Re-running `up` on the running box changes nothing and answers at once.
    let out = run(sgbox(st).args(up_args()));
    assert!(out.status.success(), "re-run: {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--compose-override") && text(&out.stderr).contains("is for a new box"), "{}", text(&out.stderr));
    let again = json_of(&out);
    assert_eq!(again["url"], up["url"], "same ports");
    assert_eq!(again["instance_id"], up["instance_id"]);
    assert_eq!(qemu_pids(&overlay.display().to_string()), pids, "no second VM");
    stderr_all.push_str(&text(&out.stderr));
    let printed = format!("{}{}", text(&out.stderr), text(&out.stdout));
    for p in pw.iter().chain([&admin_pw]) {
        assert!(!printed.contains(p.as_str()), "a password was printed");
    }
    assert!(!stderr_all.contains(admin_pw.as_str()), "the admin password was printed by up");
    clock.lap("status, the box's disks and sshd, idempotent re-run of up");

    // Nothing of the image's default configuration (for a launch without sgbox, scenario 11)
    // reached the box `up` made: its user-data replaced every key of it.
    let o = ssh(
        st,
        &format!(
            "id {CONSOLE_USER} 2>&1 || true; test -e {} && echo leaked || true; sudo sshd -T | grep -i '^allowusers'",
            "/usr/local/sbin/sgbox-site-admin"
        ),
    );
    assert!(
        o.contains("no such user") && !o.contains("leaked") && o.contains("allowusers sgbox"),
        "`up`'s user-data replaced the image's default: {o}"
    );
    let identity = "cat /etc/machine-id; ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub";
    let ours = ssh(st, identity);

    // The user's override, given to `up`, is the box's from the first start on (every upgrade
    // and rollback applies it, the hand-over's copies included).
    let o = ssh(st, "cat /opt/sgbox/docker-compose.override.yaml; sudo docker inspect -f '{{.Config.Healthcheck.Interval}}' pgsql");
    assert_eq!(o, format!("{}5m0s\n", checks_override("")), "the override of `up` is on the box and applied");

    // User data in the database, which every upgrade and rollback must keep.
    let put = db(st, "PUT repo github.com/sourcegraph/sourcegraph\nPUT saved-search lang:rust sgbox\n");
    assert_eq!(put.matches("OK").count(), 2, "{put}");
    let (sum0, info0) = db_state(st);
    assert!(info0.contains("pg_major=12") && info0.contains(&format!("schema={OLD}")), "{info0}");
    let before = fingerprint(st);

    // 2a. A downgrade is a path Sourcegraph forbids without an explicit opt-in: refused, exit 2.
    let out = upgrade(st, &["--to", "5.8"]);
    assert_eq!(out.status.code(), Some(2), "downgrade must be refused: {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("fix:"), "{}", text(&out.stderr));
    assert_eq!(fingerprint(st), before, "a refused path changes nothing");

    // 2b. Dry run: the plan through the waypoint and a passing preflight; nothing changed.
    let out = run(sgbox(st).args(["upgrade", "--name", NAME, "--to", MID, "--dry-run", "--output", "json"]));
    assert!(out.status.success(), "dry-run: {}", text(&out.stderr));
    let plan = json_of(&out);
    assert_eq!(plan["kind"], "multi-version");
    let steps = plan["steps"].to_string();
    assert!(steps.contains(&format!("migrator {WAYPOINT}: upgrade --from=v{OLD} --to=v{WAYPOINT}")), "{plan:#}");
    assert!(steps.contains(&format!("migrator {NEW}: upgrade --from=v{WAYPOINT} --to=v{MID}")), "{plan:#}");
    assert_eq!(plan["preflight"]["ok"], true, "{plan:#}");
    assert_eq!(fingerprint(st), before, "a dry run changes nothing");

    // 2c. Not enough disk: fill the data disk to 256 MiB free; refused in preflight, exit 2.
    ssh(st, "sudo sh -c 'fallocate -l $(( $(df -B1 --output=avail /mnt/sgbox-data | tail -n 1) - 268435456 )) /mnt/sgbox-data/fill'");
    let out = upgrade(st, &["--to", MID]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "a full disk must be refused: {err}");
    assert!(err.contains("disk") && err.contains("free") && err.contains("fix:"), "{err}");
    ssh(st, "sudo rm /mnt/sgbox-data/fill");
    assert_eq!(fingerprint(st), before, "a refused upgrade changes nothing");
    clock.lap("upgrade refusals: downgrade, dry run, full disk");

    // 3. Multi-version 5.9 → 7.4 in one command; sgbox is killed during a migrator hop and a
    //    re-run finishes from the journal on the box. The hop's start is read from sgbox's own
    //    progress lines (polling the box over SSH would slow the emulated box), then the hop's
    //    systemd unit is seen running before the kill.
    let mut w = Watched::start(st, &["--to", MID]);
    w.until_line("… migrator ");
    w.until_unit(st, "sgbox-step-migrate-*");
    w.kill();
    let j = journal(st);
    let killed_at = j["steps"].as_array().and_then(|s| s.iter().find(|e| e["step"] == "migrate" && e["status"] == "started").cloned());
    let killed_at = killed_at.unwrap_or_else(|| panic!("sgbox was killed during a migrator hop: {j:#}"));
    eprintln!("e2e: killed sgbox during hop {} -> {}", killed_at["from"], killed_at["to"]);
    let out = upgrade(st, &["--output", "json"]);
    print_phases("multi-version upgrade, resumed", &out);
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
    print_steps("multi-version upgrade's journal", &j);
    clock.lap("multi-version upgrade 5.9 -> 7.4, killed and resumed");

    // 4. The 7.5 migrator fails half-way (dirty schema): automatic rollback to 7.4 and its data.
    let boot_before = ssh(st, "cat /proc/sys/kernel/random/boot_id");
    // From 7.4 on every release of the test has syntactic-code-intel-worker, whose 5 s health
    // check alone cost the idle box a tenth of its two vCPUs: once a minute too.
    let fail = checks_override_with(SINCE_MID, "  migrator:\n    environment:\n      - SGBOX_STANDIN_FAIL=migrator-dirty@7.5.4453\n");
    put_override(st, &fail);
    let out = upgrade(st, &["--to", NEW]);
    print_phases("failed upgrade", &out);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "a failed migrator fails the upgrade: {err}");
    assert!(err.contains("rolled back") && err.contains("migrator"), "{err}");
    assert_eq!(err.matches("on the box; the end of").count(), 1, "the cause is said once: {err}");
    assert_eq!(version(&url).as_deref(), Some(MID), "7.4 serves again");
    let (sum2, info2) = db_state(st);
    assert_eq!(sum2, sum0, "data intact after the rollback");
    assert!(info2.contains(&format!("schema={MID}")) && !info2.contains("dirty"), "the dirty schema was undone by the snapshot: {info2}");
    let j = journal(st);
    print_steps("failed upgrade's journal", &j);
    assert_eq!(j["outcome"], "rolled-back");
    assert_eq!(
        ssh(st, "cat /proc/sys/kernel/random/boot_id"),
        boot_before,
        "the data disk was swapped back while the box ran, without a restart: {err}"
    );
    let said = start_said(st);
    assert!(said.contains("sourcegraph.service is inactive: starting it"), "the swap stopped the stack's unit; the rollback started it: {said}");
    put_override(st, &checks_override_with(SINCE_MID, ""));
    clock.lap("failed migrator: automatic rollback (data disk swapped back)");

    // 5. Standard upgrade 7.4 → 7.5 while clients poll every 100 ms: `/__version`, and a search
    //    page (the frontend asks searcher and zoekt, so a backend's replacement shows there).
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let searched: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let site = Arc::new(Site::new(&url));
    assert_eq!(site.get("/__version").map(|v| v.trim().to_string()).as_deref(), Some(MID), "the pollers' client reads what curl reads");
    // `/__version` on a new connection per request (a listener that stops taking connections
    // for 100 ms shows); the search page as a browser asks, on a kept-alive connection.
    let retries = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let poll = |seen: &Arc<Mutex<Vec<Option<String>>>>, path: &'static str, keep_alive: bool| {
        let (stop, seen, site, retries) = (stop.clone(), seen.clone(), site.clone(), retries.clone());
        std::thread::spawn(move || {
            let (mut kept, mut retried) = (None, 0);
            while !stop.load(Ordering::Relaxed) {
                let v = if keep_alive { site.get_kept(&mut kept, path, &mut retried) } else { site.get(path) };
                seen.lock().unwrap().push(v.map(|s| s.trim().to_string()));
                std::thread::sleep(Duration::from_millis(100));
            }
            retries.fetch_add(retried, Ordering::Relaxed);
        })
    };
    let caddy_image = |st: &Path| ssh(st, "sudo docker inspect -f '{{.Config.Image}}' caddy").trim().to_string();
    let caddy_before = caddy_image(st);
    let pollers = [poll(&seen, "/__version", false), poll(&searched, "/search?q=sgbox", true)];
    // Half-way, while the switch runs on the box, every SSH connection of sgbox's is cut from
    // the box's side: sgbox reconnects and re-attaches to the running step.
    let mut w = Watched::start(st, &["--to", NEW, "--output", "json"]);
    w.until_line("… switch to");
    w.until_unit(st, "sgbox-step-*");
    let _ = ssh_out(st, "sudo pkill -f 'sgbox@notty'");
    let out = w.wait();
    print_phases("standard upgrade", &out);
    stop.store(true, Ordering::Relaxed);
    for p in pollers {
        p.join().unwrap();
    }
    assert!(out.status.success(), "standard upgrade: {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("lost the connection during step"), "the cut was noticed and survived: {}", text(&out.stderr));
    assert_eq!(version(&url).as_deref(), Some(NEW));
    let caddy_after = caddy_image(st);
    assert_ne!(caddy_before, caddy_after, "Caddy's image changed with the release");
    let left = ssh(st, "sudo docker ps -a --format '{{.Names}}' --filter name=sgbox-next");
    assert!(left.trim().is_empty(), "no hand-over copy is left: {left}");
    let seen = seen.lock().unwrap().clone();
    let failed = seen.iter().filter(|v| v.is_none()).count();
    let first_new = seen.iter().position(|v| v.as_deref() == Some(NEW)).expect("the poller saw the new release");
    assert!(seen[..first_new].iter().flatten().all(|v| v == MID), "only the old release before the switch");
    assert!(seen[first_new..].iter().flatten().all(|v| v == NEW), "never back to the old release after the switch");
    let searched = searched.lock().unwrap().clone();
    let search_failed = searched.iter().filter(|v| v.is_none()).count();
    eprintln!(
        "e2e: standard upgrade {MID} -> {NEW}: /__version {} requests every 100 ms (a new connection each), {failed} failed; /search {} requests (kept-alive connections, {} retried on a new one after the server closed an idle one), {search_failed} failed",
        seen.len(),
        searched.len(),
        retries.load(Ordering::Relaxed)
    );
    // Zero, through a Caddy change (every release pair of the catalog has one): the frontend and
    // Caddy are each handed over while they serve.
    assert_eq!(failed, 0, "no request failed during the standard upgrade: {failed} of {} failed", seen.len());
    // Searches pass through the backends being replaced (searcher, zoekt): zero too.
    assert_eq!(search_failed, 0, "no search failed during the standard upgrade: {search_failed} of {} failed", searched.len());
    assert!(searched.iter().flatten().any(|s| s.contains(&format!("frontend {MID} via"))), "searches went through the backends before: {searched:?}");
    assert!(searched.iter().flatten().any(|s| s.contains(&format!("frontend {NEW} via"))), "searches went through the backends after: {searched:?}");
    let first_new_search = searched.iter().position(|v| v.as_deref().is_some_and(|s| s.contains(&format!("frontend {NEW} via")))).unwrap();
    assert!(
        searched[first_new_search..].iter().flatten().all(|s| s.contains(&format!("frontend {NEW} via"))),
        "searches never back on the old frontend after the switch"
    );
    let (sum3, info3) = db_state(st);
    assert_eq!(sum3, sum0);
    assert!(info3.contains(&format!("schema={NEW}")), "{info3}");
    print_steps("standard upgrade's journal", &journal(st));
    clock.lap("standard upgrade 7.4 -> 7.5 under a 100 ms poller");

    // 6. `sgbox rollback` of a box whose data disk went from under it: back to 7.4 and the data
    //    of before the upgrade. The disk is unmounted and its fstab line gone (what a first boot
    //    whose disk came late leaves): Docker refuses to start on the root disk and `status` says
    //    why. Another laptop's sgbox holds the box's lease (fresh heartbeat): refused, naming it,
    //    nothing changed; --break-lock takes over. A disk that is not mounted cannot be swapped
    //    while the box runs (scenario 4 swapped one), so sgbox restores it with a restart: the
    //    boot script mounts it again and writes its fstab line back, and the boot's
    //    sourcegraph.service brings the stack back, which the rollback waits for rather than
    //    racing it. (One boot and one stack start for the rollback and the reboot: under
    //    emulation each costs minutes. `up`'s own repair of the disk, which runs the same boot
    //    script over SSH, is not booted here.)
    ssh(
        st,
        "sudo systemctl stop sourcegraph.service docker.service docker.socket && sudo umount /mnt/sgbox-data && sudo sed -i '/^LABEL=sgbox-data /d' /etc/fstab && sudo systemctl daemon-reload",
    );
    let o = ssh(st, "sudo systemctl start docker.service >/dev/null 2>&1; systemctl is-active docker.service; sudo ls -A /mnt/sgbox-data | wc -l");
    assert!(!o.starts_with("active") && o.trim_end().ends_with('0'), "Docker did not start on the root disk: {o}");
    let out = run(sgbox(st).args(["status", "--name", NAME]));
    assert!(text(&out.stderr).contains("the data disk is not mounted"), "status says why: {}{}", text(&out.stdout), text(&out.stderr));
    let v = json_of(&run(sgbox(st).args(["status", "--name", NAME, "--output", "json"])));
    assert!(v["data_disk_mounted"] == false && v["healthy"] == false, "{v:#}");
    let boot_id = ssh(st, "cat /proc/sys/kernel/random/boot_id").trim().to_string();
    assert_eq!(boot_id.len(), 36, "{boot_id}");
    ssh(st, "printf 'id=99-other\\nowner=bob@desk\\nhost=desk\\npid=99\\ncommand=upgrade\\nstarted=2026-12-01T10:00:00Z\\nheartbeat=%s\\n' $(date +%s) | sudo tee /var/lib/sgbox/upgrade.lease >/dev/null");
    let out = run(sgbox(st).args(["rollback", "--name", NAME, "--yes", "--timeout", "20m"]));
    assert_eq!(out.status.code(), Some(2), "a held lease refuses: {}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("bob@desk") && err.contains("--break-lock"), "{err}");
    assert_eq!(journal(st)["outcome"], "done", "nothing changed");
    let out = run(sgbox(st).args(["rollback", "--name", NAME, "--yes", "--output", "json", "--timeout", "20m", "--break-lock"]));
    print_phases("rollback", &out);
    assert!(out.status.success(), "rollback: {}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("--break-lock"), "said loudly: {err}");
    assert!(err.contains("restoring it with a restart instead"), "the swap could not unmount the disk; said so: {err}");
    assert!(ssh_out(st, "test -e /var/lib/sgbox/upgrade.lease").status.code() == Some(1), "the lease is given back");
    assert_eq!(json_of(&out)["release"], MID);
    assert_eq!(version(&url).as_deref(), Some(MID));
    let (sum4, info4) = db_state(st);
    assert_eq!(sum4, sum0, "the data is the snapshot's");
    assert!(info4.contains(&format!("schema={MID}")), "{info4}");
    let o = ssh(
        st,
        "cat /proc/sys/kernel/random/boot_id; findmnt -n -o TARGET /mnt/sgbox-data; grep -c '^LABEL=sgbox-data ' /etc/fstab; systemctl is-enabled sourcegraph.service; systemctl is-active sourcegraph.service",
    );
    let mut lines = o.lines();
    let boot_id2 = lines.next().unwrap_or_default();
    assert!(boot_id2.len() == 36 && boot_id2 != boot_id, "the box restarted: {o}");
    assert_eq!(lines.next(), Some("/mnt/sgbox-data"), "the boot script mounted the disk: {o}");
    assert_eq!(lines.next(), Some("1"), "and wrote its fstab line back: {o}");
    assert_eq!((lines.next(), lines.next()), (Some("enabled"), Some("active")), "the stack is the unit's, started at every boot: {o}");
    // Started by the boot, not by sgbox: the rollback found the unit active or being started.
    let said = start_said(st);
    assert!(
        (said.contains("is being started (by the boot)") || said.contains("is active: up brings")) && !said.contains(": starting it"),
        "the rollback waited for the boot's start of the stack: {said}"
    );
    let after = wait_healthy(st, Duration::from_secs(300));
    assert_eq!(after["release"], MID);
    assert_eq!(after["data_disk_mounted"], true, "{after:#}");

    let out = run(sgbox(st).args(["history", "--name", NAME, "--output", "json"]));
    let h = json_of(&out);
    assert_eq!(h["release"], MID);
    let actions: Vec<String> =
        h["history"].as_array().unwrap().iter().map(|e| format!("{} {}", e["action"].as_str().unwrap(), e["release"].as_str().unwrap())).collect();
    assert_eq!(
        actions,
        [format!("up {OLD}"), format!("upgrade {MID}"), format!("rollback {MID}"), format!("upgrade {NEW}"), format!("rollback {MID}")],
        "{h:#}"
    );
    let on_box = ssh(st, "cat /etc/sgbox/history.jsonl");
    assert_eq!(on_box.lines().count(), 4, "the box keeps its own history: {on_box}");
    // The data disk's release, on it (a new machine on the disk checks it at boot) and beside it
    // (`up` after `down` checks it before it creates anything).
    let rec = ssh(st, "sudo cat /mnt/sgbox-data/sgbox/data-release && cat /etc/machine-id");
    let rec: Vec<&str> = rec.lines().collect();
    assert!(rec.len() == 3 && rec[0] == format!("release={MID}") && rec[1] == format!("machine={}", rec[2]), "{rec:?}");
    assert_eq!(std::fs::read_to_string(st.join(NAME).join("local/data-release")).unwrap_or_default(), format!("{MID}\n"));
    clock.lap("data disk lost, then sgbox rollback to 7.4: restored with a restart, disk mounted by the boot, history");

    // The fingerprints survive a console that scrolls: the first complete block read is kept in
    // the state folder, and the box printed its fingerprints again after its stack started.
    let kept: Vec<_> = std::fs::read_dir(st.join(NAME))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("console-hostkeys-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(kept.len() == 1 && kept[0].contains("-----END SSH HOST KEY FINGERPRINTS-----"), "{kept:?}");
    let console = std::fs::read_to_string(st.join(NAME).join("local/console.log")).unwrap_or_default();
    assert!(console.lines().any(|l| l == "-----BEGIN SSH HOST KEY FINGERPRINTS-----"), "the box's own reprint (sgbox-hostkeys.timer)");

    // 9. A changed host key is refused (the pinned one no longer matches).
    let out = ssh_out(st, "sudo sh -c 'rm -f /etc/ssh/ssh_host_*_key* && ssh-keygen -q -A && systemctl restart ssh'");
    assert!(out.status.success(), "regenerating host keys: {}", text(&out.stderr));
    let out = ssh_out(st, "true");
    assert_eq!(out.status.code(), Some(1), "must refuse: {}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("refusing") && err.contains("pinned"), "{err}");
    // `upgrade` honours --insecure-accept-host-key (loudly), and then pins the key it accepted.
    let out = run(sgbox(st).args(["upgrade", "--name", NAME, "--to", MID, "--dry-run", "--insecure-accept-host-key"]));
    let err = text(&out.stderr);
    assert!(out.status.success(), "the dry run connects: {err}");
    assert!(err.contains("warning: --insecure-accept-host-key"), "{err}");
    assert!(err.contains("host key changed from SHA256:") && err.contains(" to SHA256:"), "a replaced pin is said, both fingerprints named: {err}");
    assert!(ssh_out(st, "true").status.success(), "the accepted key is pinned now");

    // 10. Down: no process, no overlay; the data disk stays unless asked.
    let out = run(sgbox(st).args(["down", "--name", NAME, "--yes", "--output", "json"]));
    assert!(out.status.success(), "down: {}", text(&out.stderr));
    let down = json_of(&out);
    assert_eq!(down["remaining"], Value::Array(vec![]));
    assert!(qemu_pids(&overlay.display().to_string()).is_empty(), "QEMU still running");
    for p in &pids {
        assert!(!Path::new(&format!("/proc/{p}")).exists() || std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default().contains(") Z"));
    }
    assert!(!overlay.exists(), "overlay left behind");
    assert!(data.exists(), "data disk must be kept");
    // The kept disk holds 7.4's databases: `up` of 7.5 is refused before anything is made.
    let args: Vec<String> = up_args().into_iter().map(|a| if a == OLD { NEW.to_string() } else { a }).collect();
    let out = run(sgbox(st).args(args));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains(&format!("holds Sourcegraph {MID}'s databases")) && err.contains(&format!("--to {NEW}`")), "{err}");
    assert!(!overlay.exists() && !st.join(NAME).join("deployment.json").exists(), "nothing made");

    let out = run(sgbox(st).args(["down", "--name", NAME, "--cloud", "local", "--delete-data", "--yes"]));
    assert!(out.status.success(), "down --delete-data: {}", text(&out.stderr));
    assert!(!data.exists(), "data disk deleted on request");
    assert!(!st.join(NAME).exists(), "nothing left in the state folder");
    clock.lap("changed host key refused, down, down --delete-data");

    // 11. A box launched from the same image WITHOUT sgbox, as a cloud console launches an image
    //     (meta-data with the launch's key, no user-data), with no registry reachable: the image's
    //     default configuration made it a working box by itself; it claimed its own site admin
    //     before Caddy started (the site never reachable unclaimed), the password root-only on the
    //     data disk and never on the console. Two boxes from one image: their own host keys and
    //     machine ids.
    registry.pause();
    let console = ConsoleBox::launch(&image);
    console.wait_for(OLD, Duration::from_secs(900));
    let o = console.ssh("sudo cat /mnt/sgbox-data/sgbox/site-admin");
    assert!(o.status.success(), "the launch's key logs in as {CONSOLE_USER}, who may sudo: {}", text(&o.stderr));
    let creds = text(&o.stdout);
    let field = |k: &str| creds.lines().find_map(|l| l.strip_prefix(&format!("{k}="))).unwrap_or_else(|| panic!("no {k} in {creds}")).to_string();
    let (admin_user, admin_password) = (field("username"), field("password"));
    assert!(creds.contains("claimed_at=") && admin_password.len() >= 20, "{creds}");
    assert_eq!(text(&console.ssh("sudo stat -c '%a %U' /mnt/sgbox-data/sgbox/site-admin").stdout).trim(), "600 root");
    assert!(!console.ssh("cat /mnt/sgbox-data/sgbox/site-admin").status.success(), "root-only");
    let sign_in = |pw: &str| post_json(&console.url("/-/sign-in"), &format!("{{\"email\":\"{admin_user}\",\"password\":\"{pw}\"}}"));
    assert_eq!(sign_in(&admin_password), 200, "the admin the box made signs in through Caddy");
    assert_eq!(sign_in("not-the-password-at-all"), 401);
    let page = crate::common::localbox::http_get(&console.url("/sign-in")).unwrap_or_default();
    assert!(page.contains("\"needsSiteInit\":false"), "nobody else can claim the site: {page}");
    let log = console.console();
    assert!(log.contains(&format!("sgbox-site-admin: site admin \"{admin_user}\" created")), "the console says where the password is");
    assert!(!log.contains(&admin_password), "the password never reaches the console");
    let o = console.ssh("sudo grep -c \"seeding Docker's root\" /var/log/cloud-init-output.log; id sgbox 2>&1 || true");
    assert!(
        text(&o.stdout).lines().next().is_some_and(|n| n.trim() != "0") && text(&o.stdout).contains("no such user"),
        "seeded from the image, no sgbox user: {}",
        text(&o.stdout)
    );
    let theirs = text(&console.ssh(identity).stdout);
    assert!(theirs.lines().count() == 2 && ours.lines().count() == 2, "{theirs}{ours}");
    for (a, b) in theirs.lines().zip(ours.lines()) {
        assert_ne!(a, b, "two boxes from one image have their own machine id and host key");
    }
    drop(console);
    clock.lap("a console launch of the image, without sgbox: a working box, its admin claimed by the box");
    clock.table();
    drop(registry);
}

#[test]
fn local_bad_input_leaves_nothing_behind() {
    let state = tempfile::tempdir().unwrap();
    let st = state.path();
    let fake = st.join("fake.qcow2");
    std::fs::write(&fake, b"QFI\xfb\0\0\0\x03").unwrap();
    let check = |args: &[&str], path: Option<&str>, field: &str| {
        let mut c = sgbox(&st.join("state"));
        c.args(["up", "--cloud", "local", "--yes"]).args(args);
        if let Some(p) = path {
            c.env("PATH", p);
        }
        let out = run(&mut c);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(field) && err.contains("fix:"), "{args:?} names {field} and a fix: {err}");
        assert!(!st.join("state").exists(), "{args:?} created state");
    };
    check(&["--base-image", "/nonexistent/debian-13.qcow2"], None, "base-image");
    check(&["--base-image", st.join("fake.qcow2").to_str().unwrap(), "--accel", "warp"], None, "accel");
    check(&["--base-image", fake.to_str().unwrap()], Some(st.to_str().unwrap()), "QEMU is not installed");

    let taken = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    check(&["--base-image", fake.to_str().unwrap(), "--ssh-port", &port], None, "ssh-port");
    let p2 = free_port().to_string();
    check(&["--base-image", fake.to_str().unwrap(), "--http-port", &p2, "--https-port", &p2], None, "port");
    check(&["--base-image", fake.to_str().unwrap(), "--timeout", "soon"], None, "timeout");
}

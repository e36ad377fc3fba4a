//! `standin`: one small program that stands in for every Sourcegraph container image in sgbox's
//! end-to-end tests, where the real images cannot be pulled.
//!
//! Build (fully static, so the image needs no libc):
//!   RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --target x86_64-unknown-linux-gnu --manifest-path tests/standin/Cargo.toml --target-dir target/standin
//! Output: target/standin/x86_64-unknown-linux-gnu/release/standin. `tests/harness/standins.py`
//! wraps it into one image per official image name and release tag and pushes them to a registry.
//!
//! The image bakes in `SGBOX_STANDIN_IMAGE` (short name, e.g. `frontend`) and `SGBOX_STANDIN_VERSION`
//! (release tag); the program picks its role from the name and behaves just enough like the real
//! service for sgbox's deploy/upgrade logic to be exercised for real:
//! * DB images keep a tiny persistent key/value "database" with a schema version and a Postgres
//!   major (12 → 16 is upgraded in place like the 5.10+ images do; 16 data on a 12 image is fatal),
//!   spoken over a line protocol on 5432 (`PING`, `GET_SCHEMA`, `SET_SCHEMA v`, `PUT k v`, `GET k`,
//!   `CHECKSUM`, `INFO`);
//! * `migrator` applies Sourcegraph's upgrade policy (`up`: one minor at a time, `upgrade --from
//!   --to`: multi-version) to the schema versions of the DBs;
//! * `frontend` is healthy only when the schema matches its own major.minor, and keeps
//!   Sourcegraph's site-init contract: `POST /-/site-init` with JSON `{"email","username",
//!   "password"}` creates the first site admin (200; 400 on a body that is not such JSON or a bad
//!   email/username; 409 for a password outside 12–256 characters, checked first; 500 "Signup
//!   failed unexpectedly." once a site admin exists), kept in the frontend database (key
//!   `site-admin`); `POST /-/sign-in` with `{"email" (or username),"password"}` answers 200 or 401;
//!   `GET /sign-in` carries `"needsSiteInit":true|false` in its page context, like Sourcegraph's;
//! * `caddy` reverse-proxies to the `reverse_proxy` upstream of /etc/caddy/Caddyfile;
//! * everything else answers 200 on its usual port(s).
//!
//! It is PID 1 in its container, so it handles SIGTERM/SIGINT itself. Static glibc cannot use NSS,
//! so host names are resolved by hand: /etc/hosts, then a minimal UDP DNS client asking the first
//! `nameserver` of /etc/resolv.conf (Docker's 127.0.0.11). Invoked as `curl` (via a symlink) it is a
//! minimal curl; `standin liveness` is the DB health probe behind /liveness.sh.
//! Env knobs for tests: `SGBOX_STANDIN_PORTS=a,b` (listen ports), `SGBOX_STANDIN_CADDYFILE`,
//! `SGBOX_STANDIN_FAIL` (comma-separated: `migrator` fails before changing anything,
//! `migrator-dirty` fails after moving the first database's schema, as a migration dying half-way
//! leaves it; either may end in `@VERSION` to fail only the migrator of that release),
//! `SGBOX_STANDIN_WAIT_SECS` (migrator's DB wait, default 120).

use std::collections::BTreeMap;
use std::env;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::exit;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Process basics: signals, logging, identity.

extern "C" {
    fn signal(signum: i32, handler: usize) -> usize;
    fn _exit(code: i32) -> !;
    fn write(fd: i32, buf: *const u8, count: usize) -> isize;
    fn shutdown(fd: i32, how: i32) -> i32;
    fn pipe(fds: *mut i32) -> i32;
    fn poll(fds: *mut PollFd, nfds: u64, timeout_ms: i32) -> i32;
}

/// `struct pollfd`.
#[repr(C)]
struct PollFd {
    fd: i32,
    events: i16,
    revents: i16,
}
const POLLIN: i16 = 1;

/// The read end of a pipe the signal handler writes a byte to (and nobody reads): it stays
/// readable from the first SIGTERM on, so any thread can sleep in poll() until then. Sleeping
/// wakes nothing; a loop that looked at TERM every 50 ms woke each of the box's 26 containers 20
/// times a second, and under emulation that kept an idle box's QEMU at about half a host core
/// (about 12 % with the sleep).
static TERM_R: AtomicI32 = AtomicI32::new(-1);
static TERM_W: AtomicI32 = AtomicI32::new(-1);

/// Set for the HTTP roles: SIGTERM starts a graceful stop instead of exiting at once.
static GRACEFUL: AtomicBool = AtomicBool::new(false);
/// SIGTERM/SIGINT arrived (graceful roles).
static TERM: AtomicBool = AtomicBool::new(false);
/// Connections accepted and not yet answered.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
/// The listening sockets, shut down when a graceful stop begins.
static LISTENERS: Mutex<Vec<i32>> = Mutex::new(Vec::new());

extern "C" fn on_signal(_sig: i32) {
    // Only async-signal-safe calls here.
    if GRACEFUL.load(Ordering::SeqCst) {
        TERM.store(true, Ordering::SeqCst);
        unsafe {
            write(TERM_W.load(Ordering::SeqCst), b"t".as_ptr(), 1);
        }
        return;
    }
    let msg = b"standin: received SIGTERM/SIGINT, exiting\n";
    unsafe {
        write(1, msg.as_ptr(), msg.len());
        _exit(0)
    }
}

fn install_signal_handlers() {
    let mut fds = [-1i32; 2];
    if unsafe { pipe(fds.as_mut_ptr()) } != 0 {
        eprintln!("standin: FATAL: pipe: {}", io::Error::last_os_error());
        exit(1);
    }
    TERM_R.store(fds[0], Ordering::SeqCst);
    TERM_W.store(fds[1], Ordering::SeqCst);
    let h = on_signal as extern "C" fn(i32) as usize;
    unsafe {
        signal(15, h); // SIGTERM
        signal(2, h); // SIGINT
    }
}

/// What Sourcegraph's HTTP services do on SIGTERM (Go's `http.Server.Shutdown`, bounded by
/// `SRC_GRACEFUL_SHUTDOWN_TIMEOUT`, 10 s by default): stop accepting (the kernel refuses new
/// connections, so a client tries the next address of the name), finish the requests in flight,
/// then exit. Runs on the main thread once the service is up.
fn serve_until_term(image: &str) -> ! {
    while !TERM.load(Ordering::SeqCst) {
        wait_readable(None, None);
    }
    let limit = env::var("SRC_GRACEFUL_SHUTDOWN_TIMEOUT").ok().and_then(|v| parse_duration(&v)).unwrap_or(Duration::from_secs(10));
    for fd in LISTENERS.lock().map(|l| l.clone()).unwrap_or_default() {
        unsafe {
            shutdown(fd, 0); // SHUT_RD: accept() returns and the port refuses new connections.
        }
    }
    log(image, &format!("SIGTERM: no new connections; finishing {} in flight (at most {limit:?})", IN_FLIGHT.load(Ordering::SeqCst)));
    let end = Instant::now() + limit;
    while IN_FLIGHT.load(Ordering::SeqCst) > 0 && Instant::now() < end {
        thread::sleep(Duration::from_millis(20));
    }
    log(image, &format!("exiting ({} still in flight)", IN_FLIGHT.load(Ordering::SeqCst)));
    exit(0)
}

/// One line to stdout. Never panics (println! would, and panic=abort would kill the service, if
/// stdout went away).
fn say(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|_| out.flush());
}

fn log(image: &str, msg: &str) {
    say(&format!("standin {image}: {msg}"));
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Role {
    Db,
    Migrator,
    Frontend,
    Caddy,
    Generic,
}

fn role_of(image: &str) -> Role {
    if (image.contains("postgres") && !image.contains("exporter")) || image == "codeintel-db" || image == "codeinsights-db" {
        Role::Db
    } else if image == "migrator" {
        Role::Migrator
    } else if image == "frontend" {
        Role::Frontend
    } else if image == "caddy" {
        Role::Caddy
    } else {
        Role::Generic
    }
}

/// Listen ports: `SGBOX_STANDIN_PORTS` wins, then (cadvisor) a `--port=N` argument, then the image's.
fn ports_for(image: &str, role: Role, args: &[String]) -> Vec<u16> {
    if let Ok(p) = env::var("SGBOX_STANDIN_PORTS") {
        let v: Vec<u16> = p.split(',').filter_map(|s| s.trim().parse().ok()).collect();
        if !v.is_empty() {
            return v;
        }
    }
    match role {
        Role::Db => return vec![5432],
        Role::Migrator => return vec![],
        Role::Frontend => return vec![3080, 3090],
        Role::Caddy => return vec![80, 443],
        Role::Generic => {}
    }
    if image == "cadvisor" {
        let flag = args.iter().find_map(|a| a.strip_prefix("--port=").or_else(|| a.strip_prefix("-port=")));
        if let Some(p) = flag.and_then(|p| p.parse().ok()) {
            return vec![p];
        }
    }
    match image {
        "gitserver" => vec![3178],
        "search-indexer" => vec![6072],
        "indexed-searcher" => vec![6070],
        "searcher" => vec![3181],
        "github-proxy" => vec![3180],
        "precise-code-intel-worker" => vec![3188],
        "repo-updater" => vec![3182],
        "worker" => vec![3189],
        "syntactic-code-intel-worker" => vec![3288],
        "syntax-highlighter" => vec![9238],
        "symbols" => vec![3184],
        "prometheus" => vec![9090],
        "grafana" => vec![3370],
        "cadvisor" => vec![48080],
        "node-exporter" => vec![9100],
        "postgres_exporter" => vec![9187],
        "blobstore" => vec![9000],
        "redis-cache" | "redis-store" => vec![6379],
        "opentelemetry-collector" => vec![4317, 13133],
        "jaeger-all-in-one" => vec![16686],
        _ => vec![8080],
    }
}

fn main() {
    let args: Vec<String> = env::args().collect();
    let argv0 = args.first().map(|a| a.rsplit('/').next().unwrap_or(a).to_string()).unwrap_or_default();
    if argv0 == "curl" {
        exit(curl_main(&args[1..]));
    }
    if args.get(1).map(String::as_str) == Some("liveness") {
        exit(liveness());
    }
    install_signal_handlers();
    let image = env::var("SGBOX_STANDIN_IMAGE").unwrap_or_else(|_| "unknown".into());
    let version = env::var("SGBOX_STANDIN_VERSION").unwrap_or_else(|_| "0.0.0".into());
    let role = role_of(&image);
    let ports = ports_for(&image, role, &args[1..]);
    let list = if ports.is_empty() { "none".to_string() } else { ports.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",") };
    say(&format!("standin {image} {version} role={} listening on {list}", format!("{role:?}").to_lowercase()));
    match role {
        Role::Migrator => exit(migrator_main(&image, &version, &args[1..])),
        Role::Db => db_main(&image, &ports),
        Role::Caddy => caddy_main(&image, &ports),
        Role::Frontend => {
            GRACEFUL.store(true, Ordering::SeqCst);
            let v = version.clone();
            http_serve(&image, &ports, Arc::new(move |req: &Request| frontend_handle(req, &v)));
            serve_until_term(&image);
        }
        Role::Generic => {
            GRACEFUL.store(true, Ordering::SeqCst);
            let v = version.clone();
            http_serve(
                &image,
                &ports,
                Arc::new(move |req: &Request| if req.path == "/__version" { (200, v.clone()) } else { (200, "ok".to_string()) }),
            );
            serve_until_term(&image);
        }
    }
    loop {
        thread::park();
    }
}

// ---------------------------------------------------------------------------------------------
// Versions and Sourcegraph's upgrade policy.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Ver {
    major: u32,
    minor: u32,
    patch: u32,
}

fn parse_ver(s: &str) -> Option<Ver> {
    let s = s.trim().trim_start_matches('v');
    let s = s.split(['-', '+']).next()?;
    let mut it = s.split('.').map(|p| p.parse::<u32>());
    let major = it.next()?.ok()?;
    let minor = it.next()?.ok()?;
    let patch = match it.next() {
        None => 0,
        Some(p) => p.ok()?,
    };
    Some(Ver { major, minor, patch })
}

fn mm(v: Ver) -> (u32, u32) {
    (v.major, v.minor)
}

/// Last minor release of a major: the only minor that may upgrade straight to the next X.0.
fn last_minor(major: u32) -> Option<u32> {
    match major {
        3 => Some(43),
        4 => Some(5),
        5 => Some(11),
        6 => Some(12),
        _ => None,
    }
}

/// `migrator up`: the schema version to store, or why not.
fn up_policy(stored: Option<&str>, own: &str) -> Result<String, String> {
    let o = parse_ver(own).ok_or_else(|| format!("migrator up: cannot parse own version {own}"))?;
    let Some(stored) = stored else { return Ok(own.to_string()) };
    if stored.ends_with("-dirty") {
        return Err(format!("migrator up: the database is dirty ({stored}): a migration failed half-way; restore a backup"));
    }
    let s = parse_ver(stored).ok_or_else(|| format!("migrator up: cannot parse stored schema version {stored}"))?;
    if mm(s) == mm(o) {
        return Ok(own.to_string());
    }
    if mm(s) > mm(o) {
        return Err(format!("migrator up: schema {stored} is newer than this migrator {own} (downgrade)"));
    }
    let next_minor = s.major == o.major && o.minor == s.minor + 1;
    let next_major = o.minor == 0 && o.major == s.major + 1 && last_minor(s.major) == Some(s.minor);
    if next_minor || next_major {
        Ok(own.to_string())
    } else {
        Err(format!(
            "migrator up: cannot jump from {}.{} to {}.{}; use a multi-version upgrade (migrator upgrade --from --to)",
            s.major, s.minor, o.major, o.minor
        ))
    }
}

/// `migrator upgrade --from X --to Y`: the intermediate major.minor steps, or why not.
fn upgrade_plan(stored: Option<&str>, from: &str, to: &str, own: &str) -> Result<Vec<String>, String> {
    let bad = |what: &str, v: &str| format!("migrator upgrade: cannot parse {what} version {v}");
    let f = parse_ver(from).ok_or_else(|| bad("--from", from))?;
    let t = parse_ver(to).ok_or_else(|| bad("--to", to))?;
    let o = parse_ver(own).ok_or_else(|| bad("own", own))?;
    let Some(stored) = stored else { return Err("migrator upgrade: database has no schema yet (fresh install: use `up`)".into()) };
    let s = parse_ver(stored).ok_or_else(|| bad("stored schema", stored))?;
    if stored.ends_with("-dirty") {
        return Err(format!("migrator upgrade: the database is dirty ({stored}): a migration failed half-way; restore a backup"));
    }
    // Like the real migrator, migrations already applied are skipped: a re-run of an interrupted
    // upgrade continues from where the schema is.
    if mm(s) < mm(f) || mm(s) > mm(t).max(mm(f)) {
        return Err(format!("migrator upgrade: --from {from} does not match the schema in the database ({stored})"));
    }
    if t > o {
        return Err(format!("migrator upgrade: --to {to} is newer than this migrator ({own})"));
    }
    if mm(t) < mm(f) {
        return Err(format!("migrator upgrade: --to {to} is older than --from {from} (use downgrade)"));
    }
    let mut steps = Vec::new();
    let mut cur = mm(s);
    while cur < mm(t) && steps.len() < 1000 {
        cur = if cur.0 < t.major && last_minor(cur.0).is_none_or(|l| cur.1 >= l) { (cur.0 + 1, 0) } else { (cur.0, cur.1 + 1) };
        steps.push(format!("{}.{}", cur.0, cur.1));
    }
    Ok(steps)
}

// ---------------------------------------------------------------------------------------------
// Name resolution without NSS: IP literals, localhost, /etc/hosts, then DNS over UDP.

fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; QDCOUNT=1
    for label in name.trim_end_matches('.').split('.').filter(|l| !l.is_empty()) {
        let l = &label.as_bytes()[..label.len().min(63)];
        q.push(l.len() as u8);
        q.extend_from_slice(l);
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]); // root, QTYPE=A, QCLASS=IN
    q
}

fn skip_name(b: &[u8], mut p: usize) -> Option<usize> {
    loop {
        let len = *b.get(p)? as usize;
        if len == 0 {
            return Some(p + 1);
        }
        if len & 0xC0 == 0xC0 {
            return Some(p + 2);
        }
        p += 1 + len;
    }
}

/// The A records of a DNS response to query `id`; Err on a malformed/mismatched/failed response.
fn dns_parse_a(b: &[u8], id: u16) -> Result<Vec<Ipv4Addr>, String> {
    if b.len() < 12 || u16::from_be_bytes([b[0], b[1]]) != id {
        return Err("malformed or mismatched DNS response".into());
    }
    let rcode = b[3] & 0x0F;
    if rcode != 0 {
        return Err(format!("DNS rcode {rcode}"));
    }
    let qd = u16::from_be_bytes([b[4], b[5]]);
    let an = u16::from_be_bytes([b[6], b[7]]);
    let mut p = 12;
    for _ in 0..qd {
        p = skip_name(b, p).ok_or("truncated question")? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..an {
        p = skip_name(b, p).ok_or("truncated answer")?;
        let h = b.get(p..p + 10).ok_or("truncated answer")?;
        let (ty, class, rdlen) = (u16::from_be_bytes([h[0], h[1]]), u16::from_be_bytes([h[2], h[3]]), u16::from_be_bytes([h[8], h[9]]) as usize);
        let rd = b.get(p + 10..p + 10 + rdlen).ok_or("truncated rdata")?;
        if ty == 1 && class == 1 && rdlen == 4 {
            out.push(Ipv4Addr::new(rd[0], rd[1], rd[2], rd[3]));
        }
        p += 10 + rdlen;
    }
    Ok(out)
}

fn hosts_lookup(text: &str, host: &str) -> Option<IpAddr> {
    let mut v6 = None;
    for line in text.lines() {
        let mut it = line.split('#').next().unwrap_or("").split_whitespace();
        let Some(ip) = it.next().and_then(|i| i.parse::<IpAddr>().ok()) else { continue };
        if it.any(|n| n.eq_ignore_ascii_case(host)) {
            if ip.is_ipv4() {
                return Some(ip);
            }
            v6.get_or_insert(ip);
        }
    }
    v6
}

fn dns_lookup(server: IpAddr, name: &str) -> Result<Vec<Ipv4Addr>, String> {
    let bind = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let sock = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_millis(1500))).map_err(|e| e.to_string())?;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let id = (nanos ^ std::process::id()) as u16;
    sock.send_to(&dns_query(id, name), SocketAddr::new(server, 53)).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 1500];
    let deadline = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < deadline {
        let (n, from) = sock.recv_from(&mut buf).map_err(|e| format!("no answer from {server}: {e}"))?;
        if from.ip() == server && n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
            return dns_parse_a(&buf[..n], id);
        }
    }
    Err(format!("no answer from {server}"))
}

/// Resolves `host` to its first address (see [`resolve_all`]).
fn resolve(host: &str, port: u16, attempts: u32) -> Result<SocketAddr, String> {
    resolve_all(host, port, attempts).map(|a| a[0])
}

/// Resolves `host` to every address DNS gives (a name two containers hold during a handover has
/// two), trying DNS `attempts` times (half a second apart) for names Docker may not know yet.
fn resolve_all(host: &str, port: u16, attempts: u32) -> Result<Vec<SocketAddr>, String> {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = h.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    if h.eq_ignore_ascii_case("localhost") {
        return Ok(vec![SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)]);
    }
    if let Some(ip) = fs::read_to_string("/etc/hosts").ok().and_then(|t| hosts_lookup(&t, h)) {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let conf = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let word = |key: &'static str| conf.lines().filter_map(move |l| l.trim().strip_prefix(key)).flat_map(|r| r.split_whitespace());
    let Some(server) = word("nameserver").find_map(|s| s.parse::<IpAddr>().ok()) else {
        return Err(format!("cannot resolve {h}: no nameserver in /etc/resolv.conf"));
    };
    let mut names = vec![h.to_string()];
    if !h.contains('.') {
        names.extend(word("search").map(|d| format!("{h}.{d}")));
    }
    let mut last = String::new();
    for attempt in 0..attempts.max(1) {
        if attempt > 0 {
            thread::sleep(Duration::from_millis(500));
        }
        for n in &names {
            match dns_lookup(server, n) {
                Ok(ips) if !ips.is_empty() => return Ok(ips.into_iter().map(|ip| SocketAddr::new(ip.into(), port)).collect()),
                Ok(_) => last = format!("no A record for {n}"),
                Err(e) => last = e,
            }
        }
    }
    Err(format!("cannot resolve {h}: {last}"))
}

/// Connects to the first address of `host` that accepts, in DNS order, as Go's dialer does: an
/// address that refuses (a service stopping) is skipped, and each address gets its share of the
/// time left, at least 2 s (Go's `partialDeadline`, `saneMinimum`), so one that does not answer
/// does not take it all.
fn connect(host: &str, port: u16, attempts: u32, timeout: Duration) -> Result<TcpStream, String> {
    let addrs = resolve_all(host, port, attempts)?;
    let end = Instant::now() + timeout;
    let mut errors = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            errors.push(format!("{addr}: no time left"));
            break;
        }
        let share = (left / (addrs.len() - i) as u32).max(Duration::from_secs(2)).min(left);
        match TcpStream::connect_timeout(addr, share) {
            Ok(s) => {
                let _ = s.set_read_timeout(Some(timeout.max(Duration::from_secs(5))));
                let _ = s.set_write_timeout(Some(timeout.max(Duration::from_secs(5))));
                return Ok(s);
            }
            Err(e) => errors.push(format!("{addr}: {e}")),
        }
    }
    Err(format!("cannot connect to {host}:{port} ({})", errors.join("; ")))
}

// ---------------------------------------------------------------------------------------------
// Minimal HTTP/1.1.

struct Request {
    method: String,
    path: String,
    /// The client keeps the connection for another request (HTTP/1.1 without `Connection: close`).
    keep_alive: bool,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// Reads up to the blank line ending an HTTP head; returns the head and any bytes read past it.
fn read_head(s: &mut impl Read) -> io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(i + 4);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        if buf.len() > 64 * 1024 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "HTTP head too large"));
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before end of HTTP head"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn parse_headers<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<(String, String)> {
    lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect()
}

fn read_request(s: &mut TcpStream) -> io::Result<Request> {
    let (head, mut body) = read_head(s)?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let method = first.next().unwrap_or("").to_string();
    let path = first.next().unwrap_or("/").to_string();
    let http11 = first.next() == Some("HTTP/1.1");
    let headers = parse_headers(lines);
    let keep_alive = http11 && !header(&headers, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
    if header(&headers, "transfer-encoding").is_some() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "chunked request bodies are not supported"));
    }
    let len: usize = header(&headers, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    if len > 64 * 1024 * 1024 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "request body too large"));
    }
    while body.len() < len {
        let mut chunk = vec![0u8; (len - body.len()).min(65536)];
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short request body"));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(len);
    Ok(Request { method, path, keep_alive, headers, body })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        409 => "Conflict",
        500 => "Internal Server Error",
        404 => "Not Found",
        411 => "Length Required",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn respond(s: &mut TcpStream, status: u16, ctype: &str, body: &[u8], head_only: bool) -> io::Result<()> {
    respond_on(s, status, ctype, body, head_only, false)
}

/// An answer; `keep` leaves the connection open for the client's next request.
fn respond_on(s: &mut TcpStream, status: u16, ctype: &str, body: &[u8], head_only: bool, keep: bool) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
        reason(status),
        body.len(),
        if keep { "keep-alive" } else { "close" }
    );
    s.write_all(head.as_bytes())?;
    if !head_only {
        s.write_all(body)?;
    }
    s.flush()
}

type Handler = Arc<dyn Fn(&Request) -> (u16, String) + Send + Sync>;
type ConnHandler = Arc<dyn Fn(TcpStream) + Send + Sync>;

/// Accepts on every port, one thread per connection. Exits the process if a port cannot be bound.
fn listen(image: &str, ports: &[u16], on_conn: ConnHandler) {
    for &port in ports {
        let l = match TcpListener::bind(("0.0.0.0", port)) {
            Ok(l) => l,
            Err(e) => {
                log(image, &format!("FATAL: cannot listen on port {port}: {e}"));
                exit(1);
            }
        };
        if let Ok(mut fds) = LISTENERS.lock() {
            fds.push(l.as_raw_fd());
        }
        let (on_conn, image) = (on_conn.clone(), image.to_string());
        thread::spawn(move || loop {
            match l.accept() {
                Ok((s, _)) => {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                    let _ = s.set_write_timeout(Some(Duration::from_secs(30)));
                    let h = on_conn.clone();
                    // Counted before the thread starts, so a graceful stop never misses it.
                    IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
                    let spawned = thread::Builder::new().spawn(move || {
                        h(s);
                        IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
                    });
                    if let Err(e) = spawned {
                        IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
                        log(&image, &format!("cannot spawn connection thread: {e}"));
                    }
                }
                Err(_) if TERM.load(Ordering::SeqCst) => return,
                Err(e) => {
                    log(&image, &format!("accept on {port}: {e}"));
                    thread::sleep(Duration::from_millis(50));
                }
            }
        });
    }
}

/// Sleep until SIGTERM came, `fd` is readable (or closed), or `limit` passed; true when `fd` is.
fn wait_readable(fd: Option<i32>, limit: Option<Duration>) -> bool {
    let mut fds = vec![PollFd { fd: TERM_R.load(Ordering::SeqCst), events: POLLIN, revents: 0 }];
    if let Some(fd) = fd {
        fds.push(PollFd { fd, events: POLLIN, revents: 0 });
    }
    let ms = limit.map_or(-1, |d| d.as_millis().clamp(1, i32::MAX as u128) as i32);
    let n = unsafe { poll(fds.as_mut_ptr(), fds.len() as u64, ms) };
    n > 0 && fds.len() > 1 && fds[1].revents != 0
}

/// How long an idle kept-alive connection stays open (a Go `http.Server`'s `IdleTimeout`; Caddy's
/// upstream pool keeps its idle connections for 2 minutes, so the server's side closes first).
const IDLE_KEEP: Duration = Duration::from_secs(60);

/// Until the client's next request starts (true), or the connection is closed, idle for
/// IDLE_KEEP, or a graceful stop began (false). An idle connection is not in flight: a graceful
/// stop closes it, as Go's `http.Server.Shutdown` does (a client retries an idempotent request
/// that meets a closed idle connection on a new one, as Go's and Caddy's transports do).
fn next_request(s: &TcpStream) -> bool {
    let end = Instant::now() + IDLE_KEEP;
    loop {
        let now = Instant::now();
        if TERM.load(Ordering::SeqCst) || now >= end {
            return false;
        }
        if wait_readable(Some(s.as_raw_fd()), Some(end - now)) && !TERM.load(Ordering::SeqCst) {
            // Readable: a request's first byte, or the client closed (0) or reset (an error).
            return matches!(s.peek(&mut [0u8; 1]), Ok(n) if n > 0);
        }
    }
}

/// HTTP/1.1 with keep-alive, as Sourcegraph's Go services serve it: a proxy in front (Caddy)
/// reuses its connections instead of opening one per request.
fn http_serve(image: &str, ports: &[u16], handler: Handler) {
    listen(
        image,
        ports,
        Arc::new(move |mut s: TcpStream| loop {
            let (status, ctype, body, head_only, keep) = match read_request(&mut s) {
                Ok(req) => {
                    let (status, body) = handler(&req);
                    let ctype = if body.starts_with("<!doctype html>") { "text/html; charset=utf-8" } else { "text/plain; charset=utf-8" };
                    // A graceful stop answers what is in flight and closes.
                    let keep = req.keep_alive && !TERM.load(Ordering::SeqCst);
                    (status, ctype, body, req.method == "HEAD", keep)
                }
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return,
                Err(e) => (400, "text/plain; charset=utf-8", format!("bad request: {e}"), false, false),
            };
            if respond_on(&mut s, status, ctype, body.as_bytes(), head_only, keep).is_err() || !keep {
                let _ = s.shutdown(Shutdown::Write);
                return;
            }
            // Idle between requests: not in flight (listen() counted the connection when it came).
            IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
            let more = next_request(&s);
            IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
            if !more {
                let _ = s.shutdown(Shutdown::Both);
                return;
            }
        }),
    );
}

// ---------------------------------------------------------------------------------------------
// The DB stand-in: state, JSON, checksum, line protocol.

const STATE_FILE: &str = "standin-db.json";

#[derive(Debug, PartialEq)]
struct DbState {
    pg_major: u32,
    schema: Option<String>,
    data: BTreeMap<String, String>,
}

fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

#[derive(Debug, PartialEq)]
enum Json {
    Null,
    Num(f64),
    Str(String),
    Other,
    Obj(Vec<(String, Json)>),
}

struct JsonParser<'a> {
    b: &'a [u8],
    p: usize,
}

impl JsonParser<'_> {
    fn ws(&mut self) {
        while self.p < self.b.len() && self.b[self.p].is_ascii_whitespace() {
            self.p += 1;
        }
    }
    fn eat(&mut self, c: u8) -> Result<(), String> {
        self.ws();
        if self.b.get(self.p) == Some(&c) {
            self.p += 1;
            Ok(())
        } else {
            Err(format!("expected '{}' at byte {}", c as char, self.p))
        }
    }
    fn string(&mut self) -> Result<String, String> {
        self.eat(b'"')?;
        let mut out = Vec::new();
        loop {
            let c = *self.b.get(self.p).ok_or("unterminated string")?;
            self.p += 1;
            match c {
                b'"' => return String::from_utf8(out).map_err(|e| e.to_string()),
                b'\\' => {
                    let e = *self.b.get(self.p).ok_or("bad escape")?;
                    self.p += 1;
                    let ch = match e {
                        b'n' => '\n',
                        b't' => '\t',
                        b'r' => '\r',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'u' => {
                            let hex = std::str::from_utf8(self.b.get(self.p..self.p + 4).ok_or("bad \\u")?).map_err(|e| e.to_string())?;
                            self.p += 4;
                            char::from_u32(u32::from_str_radix(hex, 16).map_err(|e| e.to_string())?).unwrap_or('\u{fffd}')
                        }
                        other => other as char,
                    };
                    out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes());
                }
                c => out.push(c),
            }
        }
    }
    fn value(&mut self) -> Result<Json, String> {
        self.ws();
        match self.b.get(self.p) {
            Some(b'"') => Ok(Json::Str(self.string()?)),
            Some(b'{') => {
                self.p += 1;
                let mut fields = Vec::new();
                self.ws();
                if self.b.get(self.p) == Some(&b'}') {
                    self.p += 1;
                    return Ok(Json::Obj(fields));
                }
                loop {
                    let k = self.string()?;
                    self.eat(b':')?;
                    fields.push((k, self.value()?));
                    self.ws();
                    match self.b.get(self.p) {
                        Some(b',') => self.p += 1,
                        Some(b'}') => {
                            self.p += 1;
                            return Ok(Json::Obj(fields));
                        }
                        _ => return Err(format!("expected ',' or '}}' at byte {}", self.p)),
                    }
                }
            }
            Some(_) => {
                let start = self.p;
                while self.p < self.b.len() && !b",}] \t\r\n".contains(&self.b[self.p]) {
                    self.p += 1;
                }
                let tok = std::str::from_utf8(&self.b[start..self.p]).unwrap_or("");
                match tok {
                    "null" => Ok(Json::Null),
                    "true" | "false" => Ok(Json::Other),
                    t => t.parse().map(Json::Num).map_err(|_| format!("bad token {t:?} at byte {start}")),
                }
            }
            None => Err("unexpected end of JSON".into()),
        }
    }
}

impl DbState {
    fn to_json(&self) -> String {
        let schema = self.schema.as_deref().map_or("null".to_string(), json_str);
        let data: Vec<String> = self.data.iter().map(|(k, v)| format!("{}:{}", json_str(k), json_str(v))).collect();
        format!("{{\"pg_major\":{},\"schema_version\":{},\"data\":{{{}}}}}\n", self.pg_major, schema, data.join(","))
    }

    fn from_json(text: &str) -> Result<DbState, String> {
        let Json::Obj(fields) = (JsonParser { b: text.as_bytes(), p: 0 }).value()? else { return Err("state is not a JSON object".into()) };
        let mut st = DbState { pg_major: 0, schema: None, data: BTreeMap::new() };
        for (k, v) in fields {
            match (k.as_str(), v) {
                ("pg_major", Json::Num(n)) => st.pg_major = n as u32,
                ("schema_version", Json::Str(s)) => st.schema = Some(s),
                ("schema_version", Json::Null) => st.schema = None,
                ("data", Json::Obj(kv)) => {
                    for (k, v) in kv {
                        let Json::Str(v) = v else { return Err(format!("data.{k} is not a string")) };
                        st.data.insert(k, v);
                    }
                }
                (k, v) => return Err(format!("unexpected field {k}: {v:?}")),
            }
        }
        if st.pg_major == 0 {
            return Err("state has no pg_major".into());
        }
        Ok(st)
    }

    /// FNV-1a 64 over the sorted data entries (`key NUL value NUL`...). Deliberately excludes the
    /// schema version and Postgres major, so it proves user data survived upgrades.
    fn checksum(&self) -> String {
        let mut h: u64 = 0xcbf29ce484222325;
        for (k, v) in &self.data {
            for b in k.bytes().chain([0]).chain(v.bytes()).chain([0]) {
                h ^= b as u64;
                h = h.wrapping_mul(0x100000001b3);
            }
        }
        format!("{h:016x}")
    }
}

fn persist(dir: &Path, st: &DbState) -> io::Result<()> {
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(st.to_json().as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join(STATE_FILE))?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// One reply line per command line. Mutating commands persist before replying.
fn db_command(line: &str, st: &mut DbState, dir: &Path, image: &str) -> String {
    let line = line.trim_end_matches(['\r', '\n']);
    let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
    let save = |st: &DbState, what: String| match persist(dir, st) {
        Ok(()) => {
            log(image, &what);
            "OK".to_string()
        }
        Err(e) => format!("ERR cannot persist state: {e}"),
    };
    match cmd.to_ascii_uppercase().as_str() {
        "PING" => "PONG".into(),
        "GET_SCHEMA" => format!("SCHEMA {}", st.schema.as_deref().unwrap_or("NONE")),
        "SET_SCHEMA" if !rest.trim().is_empty() => {
            let v = rest.trim().to_string();
            let what = format!("schema version {} -> {v}", st.schema.as_deref().unwrap_or("NONE"));
            st.schema = Some(v);
            save(st, what)
        }
        "PUT" if !rest.is_empty() => {
            let (k, v) = rest.split_once(' ').unwrap_or((rest, ""));
            st.data.insert(k.to_string(), v.to_string());
            save(st, format!("put {k}"))
        }
        "GET" if !rest.is_empty() => st.data.get(rest.trim()).map_or("NONE".into(), |v| format!("VALUE {v}")),
        "CHECKSUM" => format!("CHECKSUM {}", st.checksum()),
        "INFO" => format!("INFO pg_major={} schema={} keys={}", st.pg_major, st.schema.as_deref().unwrap_or("NONE"), st.data.len()),
        _ => format!("ERR unknown or incomplete command: {cmd}"),
    }
}

fn db_main(image: &str, ports: &[u16]) {
    let dir = PathBuf::from(env::var("PGDATA").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "/data".into()));
    let major = if image.contains("16") { 16 } else { 12 };
    let fatal = |msg: String| -> ! {
        log(image, &msg);
        exit(1)
    };
    if let Err(e) = fs::create_dir_all(&dir) {
        fatal(format!("FATAL: cannot create data directory {}: {e}", dir.display()));
    }
    let path = dir.join(STATE_FILE);
    let st = match fs::read_to_string(&path) {
        Ok(text) => {
            let mut st = DbState::from_json(&text).unwrap_or_else(|e| fatal(format!("FATAL: corrupt state file {}: {e}", path.display())));
            if st.pg_major == 12 && major == 16 {
                log(image, "upgrading database from Postgres 12 to 16");
                st.pg_major = 16;
                persist(&dir, &st).unwrap_or_else(|e| fatal(format!("FATAL: cannot persist state: {e}")));
                log(image, "upgrade to Postgres 16 complete");
            } else if st.pg_major != major {
                fatal(format!(
                    "FATAL: database files are incompatible with server (initialized by PostgreSQL {}, this server is {major})",
                    st.pg_major
                ));
            }
            log(image, &format!("opened database in {} (pg_major={} schema={})", dir.display(), st.pg_major, st.schema.as_deref().unwrap_or("NONE")));
            st
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let st = DbState { pg_major: major, schema: None, data: BTreeMap::new() };
            persist(&dir, &st).unwrap_or_else(|e| fatal(format!("FATAL: cannot initialize {}: {e}", dir.display())));
            log(image, &format!("initialized new database in {} (pg_major={major})", dir.display()));
            st
        }
        Err(e) => fatal(format!("FATAL: cannot read {}: {e}", path.display())),
    };
    let shared = Arc::new(Mutex::new(st));
    let (image_s, dir) = (image.to_string(), Arc::new(dir));
    listen(
        image,
        ports,
        Arc::new(move |s: TcpStream| {
            let _ = s.set_read_timeout(Some(Duration::from_secs(300)));
            let Ok(mut w) = s.try_clone() else { return };
            for line in BufReader::new(s).lines() {
                let Ok(line) = line else { return };
                if line.trim().is_empty() {
                    continue;
                }
                let reply = {
                    let mut st = shared.lock().unwrap_or_else(|p| p.into_inner());
                    db_command(&line, &mut st, &dir, &image_s)
                };
                if w.write_all(format!("{reply}\n").as_bytes()).is_err() {
                    return;
                }
            }
        }),
    );
}

/// Line-protocol client for the DB stand-in.
struct DbClient {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl DbClient {
    fn open(host: &str, port: u16, attempts: u32, timeout: Duration) -> Result<DbClient, String> {
        let s = connect(host, port, attempts, timeout)?;
        let w = s.try_clone().map_err(|e| e.to_string())?;
        Ok(DbClient { r: BufReader::new(s), w })
    }
    fn cmd(&mut self, line: &str) -> Result<String, String> {
        self.w.write_all(format!("{line}\n").as_bytes()).map_err(|e| format!("send {line}: {e}"))?;
        let mut reply = String::new();
        match self.r.read_line(&mut reply) {
            Ok(0) => Err("database closed the connection".into()),
            Ok(_) => Ok(reply.trim_end().to_string()),
            Err(e) => Err(format!("reply to {line}: {e}")),
        }
    }
    fn schema(&mut self) -> Result<Option<String>, String> {
        let r = self.cmd("GET_SCHEMA")?;
        match r.strip_prefix("SCHEMA ") {
            Some("NONE") => Ok(None),
            Some(v) => Ok(Some(v.to_string())),
            None => Err(format!("unexpected reply to GET_SCHEMA: {r}")),
        }
    }
}

fn liveness() -> i32 {
    let port = env::var("SGBOX_STANDIN_PORTS").ok().and_then(|p| p.split(',').next()?.trim().parse().ok()).unwrap_or(5432);
    match DbClient::open("127.0.0.1", port, 1, Duration::from_secs(1)).and_then(|mut c| c.cmd("PING")) {
        Ok(r) if r == "PONG" => 0,
        Ok(r) => {
            eprintln!("liveness: unexpected reply {r:?}");
            1
        }
        Err(e) => {
            eprintln!("liveness: {e}");
            1
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fail {
    Clean,
    Dirty,
}

/// Which failure `SGBOX_STANDIN_FAIL` asks of the migrator of release `own`, if any.
fn failure_mode(spec: &str, own: &str) -> Option<Fail> {
    let mut found = None;
    for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (what, only) = item.split_once('@').map_or((item, None), |(w, v)| (w, Some(v)));
        if only.is_some_and(|v| v.trim_start_matches('v') != own.trim_start_matches('v')) {
            continue;
        }
        match what {
            "migrator" => found = found.or(Some(Fail::Clean)),
            "migrator-dirty" => found = Some(Fail::Dirty),
            _ => {}
        }
    }
    found
}

fn pg_port(var: &str) -> u16 {
    env::var(var).ok().and_then(|p| p.trim().parse().ok()).unwrap_or(5432)
}

// ---------------------------------------------------------------------------------------------
// migrator

fn migrator_main(image: &str, own: &str, args: &[String]) -> i32 {
    let (mut cmd, mut from, mut to) = (None::<String>, None::<String>, None::<String>);
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let flag = a.trim_start_matches('-');
        let mut take = |name: &str| -> Option<Option<String>> {
            if let Some(v) = flag.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
                return Some(Some(v.to_string()));
            }
            if flag == name && a.starts_with('-') {
                i += 1;
                return Some(args.get(i).cloned());
            }
            None
        };
        if let Some(v) = take("from") {
            from = v;
        } else if let Some(v) = take("to") {
            to = v;
        } else if !a.starts_with('-') && cmd.is_none() {
            cmd = Some(a.to_string());
        }
        i += 1;
    }
    let cmd = cmd.unwrap_or_else(|| "up".into());
    if cmd != "up" && cmd != "upgrade" {
        log(image, &format!("ERROR: command {cmd:?} is not simulated (supported: up, upgrade --from X --to Y)"));
        return 2;
    }
    let (from, to) = match (&*cmd, from, to) {
        ("upgrade", Some(f), Some(t)) => (f, t),
        ("upgrade", _, _) => {
            log(image, "ERROR: migrator upgrade needs --from and --to");
            return 1;
        }
        _ => (String::new(), String::new()),
    };
    let wait = env::var("SGBOX_STANDIN_WAIT_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(120u64);
    let mut dbs = Vec::new();
    for (label, hv, pv) in [
        ("frontend", "PGHOST", "PGPORT"),
        ("codeintel", "CODEINTEL_PGHOST", "CODEINTEL_PGPORT"),
        ("codeinsights", "CODEINSIGHTS_PGHOST", "CODEINSIGHTS_PGPORT"),
    ] {
        let Some(host) = env::var(hv).ok().filter(|h| !h.is_empty()) else { continue };
        let port = pg_port(pv);
        let deadline = Instant::now() + Duration::from_secs(wait);
        let client = loop {
            match DbClient::open(&host, port, 1, Duration::from_secs(3)).and_then(|mut c| c.cmd("PING").map(|_| c)) {
                Ok(c) => break c,
                Err(e) if Instant::now() >= deadline => {
                    log(image, &format!("ERROR: {label} database {host}:{port} not reachable after {wait}s: {e}"));
                    return 1;
                }
                Err(_) => thread::sleep(Duration::from_secs(1)),
            }
        };
        log(image, &format!("connected to {label} database at {host}:{port}"));
        dbs.push((label, client));
    }
    if dbs.is_empty() {
        log(image, "ERROR: no database configured (set PGHOST, CODEINTEL_PGHOST and/or CODEINSIGHTS_PGHOST)");
        return 1;
    }
    let fail = failure_mode(&env::var("SGBOX_STANDIN_FAIL").unwrap_or_default(), own);
    if fail == Some(Fail::Clean) {
        log(image, "ERROR: failing on purpose (SGBOX_STANDIN_FAIL); nothing was changed");
        return 1;
    }
    // Decide for every DB first, so a refusal leaves all of them untouched.
    let mut plans = Vec::new();
    for (label, c) in dbs.iter_mut() {
        let stored = match c.schema() {
            Ok(s) => s,
            Err(e) => {
                log(image, &format!("ERROR: {label}: {e}"));
                return 1;
            }
        };
        let plan = if cmd == "up" {
            up_policy(stored.as_deref(), own).map(|v| (v, Vec::new()))
        } else {
            upgrade_plan(stored.as_deref(), &from, &to, own).map(|steps| (to.trim_start_matches('v').to_string(), steps))
        };
        match plan {
            Ok((target, steps)) => plans.push((stored, target, steps)),
            Err(e) => {
                log(image, &format!("ERROR: {label}: {e}"));
                return 1;
            }
        }
    }
    for ((label, c), (stored, target, steps)) in dbs.iter_mut().zip(plans) {
        if fail == Some(Fail::Dirty) && stored.as_deref() != Some(target.as_str()) {
            let _ = c.cmd(&format!("SET_SCHEMA {target}-dirty"));
            log(image, &format!("ERROR: {label}: failing on purpose half-way (SGBOX_STANDIN_FAIL); schema left dirty at {target}-dirty"));
            return 1;
        }
        for s in &steps {
            log(image, &format!("{label}: migrating schema to {s}"));
        }
        let what = match &stored {
            None => format!("{label}: fresh install, schema set to {target}"),
            Some(s) if parse_ver(s).map(mm) == parse_ver(&target).map(mm) => {
                format!("{label}: schema already at {s}, nothing to migrate (now {target})")
            }
            Some(s) => format!("{label}: schema upgraded from {s} to {target}"),
        };
        match c.cmd(&format!("SET_SCHEMA {target}")) {
            Ok(r) if r == "OK" => log(image, &what),
            Ok(r) => {
                log(image, &format!("ERROR: {label}: SET_SCHEMA answered {r}"));
                return 1;
            }
            Err(e) => {
                log(image, &format!("ERROR: {label}: {e}"));
                return 1;
            }
        }
    }
    log(image, &format!("migrator {cmd} done"));
    0
}

// ---------------------------------------------------------------------------------------------
// frontend

/// FNV-1a 64 of a salted password: enough for a stand-in that never leaves a test.
fn pw_hash(pw: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in "sgbox-standin:".bytes().chain(pw.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

fn frontend_db() -> Result<DbClient, String> {
    let host = env::var("PGHOST").unwrap_or_else(|_| "127.0.0.1".into());
    DbClient::open(&host, pg_port("PGPORT"), 2, Duration::from_secs(2))
}

/// The stored site admin: (username, email, password hash).
fn site_admin(db: &mut DbClient) -> Result<Option<(String, String, String)>, String> {
    let r = db.cmd("GET site-admin")?;
    Ok(r.strip_prefix("VALUE ").and_then(|v| {
        let mut it = v.split(' ');
        Some((it.next()?.to_string(), it.next()?.to_string(), it.next()?.to_string()))
    }))
}

fn json_fields(body: &[u8]) -> Option<Vec<(String, String)>> {
    let text = std::str::from_utf8(body).ok()?;
    let Ok(Json::Obj(fields)) = (JsonParser { b: text.as_bytes(), p: 0 }).value() else { return None };
    Some(fields.into_iter().filter_map(|(k, v)| if let Json::Str(s) = v { Some((k, s)) } else { None }).collect())
}

fn site_init(req: &Request) -> (u16, String) {
    let Some(f) = json_fields(&req.body) else { return (400, "could not decode request body".into()) };
    let get = |k: &str| f.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap_or_default();
    let (email, username, password) = (get("email"), get("username"), get("password"));
    let n = password.chars().count();
    if !(12..=256).contains(&n) {
        return (409, "Your password may not be less than 12 or be more than 256 characters.".into());
    }
    if !email.contains('@') || email.contains(' ') {
        return (400, "invalid email address".into());
    }
    if username.is_empty() || !username.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) {
        return (400, "invalid username".into());
    }
    let mut db = match frontend_db() {
        Ok(d) => d,
        Err(e) => return (500, format!("database unavailable: {e}")),
    };
    match site_admin(&mut db) {
        Ok(Some(_)) => (500, "Signup failed unexpectedly.".into()),
        Ok(None) => match db.cmd(&format!("PUT site-admin {username} {email} {}", pw_hash(&password))) {
            Ok(r) if r == "OK" => (200, String::new()),
            Ok(r) | Err(r) => (500, format!("storing the user: {r}")),
        },
        Err(e) => (500, format!("database unavailable: {e}")),
    }
}

fn sign_in(req: &Request) -> (u16, String) {
    let Some(f) = json_fields(&req.body) else { return (400, "could not decode request body".into()) };
    let get = |k: &str| f.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap_or_default();
    let (who, password) = (get("email"), get("password"));
    match frontend_db().and_then(|mut db| site_admin(&mut db)) {
        Ok(Some((u, e, h))) if (who == u || who == e) && h == pw_hash(&password) => (200, String::new()),
        Ok(_) => (401, "Authentication failed".into()),
        Err(e) => (500, format!("database unavailable: {e}")),
    }
}

/// `GET http://{authority}{path}` once (Connection: close): the status and body.
fn http_get(authority: &str, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().map_err(|_| format!("bad port in {authority}"))?),
        None => (authority, 80),
    };
    let mut s = connect(host, port, 1, timeout)?;
    let _ = s.set_read_timeout(Some(timeout));
    let req = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    let mut resp = Vec::new();
    s.write_all(req.as_bytes()).and_then(|_| s.read_to_end(&mut resp)).map_err(|e| format!("{authority}: {e}"))?;
    let text = String::from_utf8_lossy(&resp);
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| format!("{authority}: no HTTP answer"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// A search as the real frontend does one: it asks the backends (searcher for unindexed
/// search, zoekt for indexed search) and fails the page when one of them does not answer. So a
/// client polling `/search` sees what a backend's replacement costs users.
fn search_page(own: &str, searcher: &str, zoekt: &str) -> (u16, String) {
    let backends =
        [searcher.trim_start_matches("http://").trim_end_matches('/').to_string(), zoekt.split([' ', ',']).next().unwrap_or_default().to_string()];
    let mut answered = Vec::new();
    for b in &backends {
        match http_get(b, "/__version", Duration::from_secs(5)) {
            Ok((200, v)) => answered.push(format!("{b}={}", v.trim())),
            Ok((code, body)) => return (502, format!("search failed: {b} answered {code}: {}", body.trim())),
            Err(e) => return (502, format!("search failed: {e}")),
        }
    }
    (200, format!("search by frontend {own} via {}\n", answered.join(" ")))
}

fn frontend_handle(req: &Request, own: &str) -> (u16, String) {
    match (req.method.as_str(), req.path.split('?').next().unwrap_or("")) {
        ("POST", "/-/site-init") => return site_init(req),
        ("POST", "/-/sign-in") => return sign_in(req),
        (_, "/sign-in") => {
            let needs = frontend_db().and_then(|mut db| site_admin(&mut db)).map(|a| a.is_none()).unwrap_or(false);
            return (200, format!("<!doctype html><html><head><title>Sourcegraph (stand-in)</title><script>window.context = {{\"needsSiteInit\":{needs}}}</script></head><body></body></html>\n"));
        }
        _ => {}
    }
    match req.path.split('?').next().unwrap_or("") {
        "/__version" => (200, own.to_string()),
        "/search" => search_page(
            own,
            &env::var("SEARCHER_URL").unwrap_or_else(|_| "http://searcher-0:3181".into()),
            &env::var("INDEXED_SEARCH_SERVERS").unwrap_or_else(|_| "zoekt-webserver-0:6070".into()),
        ),
        "/healthz" => {
            let host = env::var("PGHOST").unwrap_or_else(|_| "127.0.0.1".into());
            let port = pg_port("PGPORT");
            let schema = DbClient::open(&host, port, 2, Duration::from_secs(2)).and_then(|mut c| c.schema());
            match (schema, parse_ver(own)) {
                (Ok(Some(s)), Some(o)) if parse_ver(&s).map(mm) == Some(mm(o)) => (200, "ok".into()),
                // Sourcegraph keeps migrations backward compatible for one standard step, so the
                // old frontend keeps serving while the new release's migrator has run.
                (Ok(Some(s)), Some(_)) if !s.ends_with("-dirty") && up_policy(Some(own), &s).is_ok() => (200, "ok (schema one step ahead)".into()),
                (Ok(Some(s)), _) => (503, format!("schema version {s} does not match frontend {own} (run the migrator)")),
                (Ok(None), _) => (503, "database has no schema yet (run the migrator)".into()),
                (Err(e), _) => (503, format!("database {host}:{port} unavailable: {e}")),
            }
        }
        _ => (
            200,
            format!(
                "<!doctype html><html><head><title>Sourcegraph (stand-in)</title></head><body><h1>Sourcegraph stand-in {own}</h1></body></html>\n"
            ),
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// caddy

fn expand_env(s: &str, get: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("{$") {
        out.push_str(&rest[..i]);
        let Some(j) = rest[i..].find('}') else { break };
        let inner = &rest[i + 2..i + j];
        let (name, default) = inner.split_once(':').unwrap_or((inner, ""));
        out.push_str(&get(name).unwrap_or_else(|| default.to_string()));
        rest = &rest[i + j + 1..];
    }
    out.push_str(rest);
    out
}

/// The first upstream of the first `reverse_proxy` directive, as (host, port).
fn caddy_upstream(caddyfile: &str, get: &dyn Fn(&str) -> Option<String>) -> Option<(String, u16)> {
    for line in caddyfile.lines() {
        let line = expand_env(line.trim(), get);
        let mut words = line.split(|c: char| c.is_whitespace() || c == ',').filter(|w| !w.is_empty());
        if words.next() != Some("reverse_proxy") {
            continue;
        }
        let addr = words.find(|w| !(w.starts_with('/') || w.starts_with('@') || w.starts_with('*') || *w == "{" || w.starts_with('#')))?;
        let addr = addr.strip_prefix("http://").unwrap_or(addr).trim_end_matches('/');
        let (host, port) = match addr.rsplit_once(':') {
            Some((h, p)) if !p.contains(']') => (h, p.parse().ok()?),
            _ => (addr, 80),
        };
        let host = if host.is_empty() { "127.0.0.1" } else { host };
        return Some((host.to_string(), port));
    }
    None
}

const HOP_BY_HOP: [&str; 6] = ["connection", "keep-alive", "proxy-connection", "te", "upgrade", "transfer-encoding"];

/// `lb_try_duration` and `lb_try_interval` of the Caddyfile: how long to keep retrying an
/// upstream that does not answer (Caddy holds the request meanwhile), and how often.
fn caddy_retry(caddyfile: &str) -> (Duration, Duration) {
    let dur = |key: &str| {
        caddyfile.lines().find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(key)).then(|| w.next()).flatten().and_then(parse_duration)
        })
    };
    (dur("lb_try_duration").unwrap_or(Duration::ZERO), dur("lb_try_interval").unwrap_or(Duration::from_millis(250)))
}

fn parse_duration(s: &str) -> Option<Duration> {
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.parse().ok().map(Duration::from_millis);
    }
    if let Some(m) = s.strip_suffix('m') {
        return m.parse::<u64>().ok().map(|m| Duration::from_secs(m * 60));
    }
    s.strip_suffix('s').and_then(|x| x.parse::<f64>().ok()).map(Duration::from_secs_f64)
}

fn proxy(client: &mut TcpStream, upstream: &(String, u16), retry: (Duration, Duration)) -> Result<(), (u16, String)> {
    let req = read_request(client).map_err(|e| if e.kind() == io::ErrorKind::InvalidData { (400, e.to_string()) } else { (0, e.to_string()) })?;
    let until = Instant::now() + retry.0;
    let mut up = loop {
        match connect(&upstream.0, upstream.1, 1, Duration::from_secs(5)) {
            Ok(s) => break s,
            Err(_) if Instant::now() + retry.1 < until => thread::sleep(retry.1),
            Err(e) => return Err((502, e)),
        }
    };
    let mut head = format!("{} {} HTTP/1.1\r\n", req.method, req.path);
    for (k, v) in req.headers.iter().filter(|(k, _)| !HOP_BY_HOP.contains(&k.to_ascii_lowercase().as_str())) {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Ok(peer) = client.peer_addr() {
        head.push_str(&format!("X-Forwarded-For: {}\r\n", peer.ip()));
    }
    head.push_str("Connection: close\r\n\r\n");
    up.write_all(head.as_bytes()).and_then(|_| up.write_all(&req.body)).map_err(|e| (502, format!("upstream write: {e}")))?;
    let (rhead, first) = read_head(&mut up).map_err(|e| (502, format!("upstream response: {e}")))?;
    let mut lines = rhead.trim_end().split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(502);
    let headers = parse_headers(lines);
    let mut out = format!("{status_line}\r\n");
    for (k, v) in headers.iter().filter(|(k, _)| !k.eq_ignore_ascii_case("connection") && !k.eq_ignore_ascii_case("keep-alive")) {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("Connection: close\r\n\r\n");
    // From here on the client has (part of) a response: errors just end the connection.
    if client.write_all(out.as_bytes()).is_err() {
        return Ok(());
    }
    let no_body = req.method == "HEAD" || status == 204 || status == 304 || (100..200).contains(&status);
    if no_body {
        return Ok(());
    }
    match header(&headers, "content-length").and_then(|v| v.parse::<u64>().ok()) {
        Some(n) => {
            let first_n = first.len().min(n as usize);
            let _ = client.write_all(&first[..first_n]);
            let _ = io::copy(&mut (&mut up).take(n - first_n as u64), client);
        }
        None => {
            let _ = client.write_all(&first);
            let _ = io::copy(&mut up, client);
        }
    }
    Ok(())
}

fn caddy_main(image: &str, ports: &[u16]) {
    let path = env::var("SGBOX_STANDIN_CADDYFILE").unwrap_or_else(|_| "/etc/caddy/Caddyfile".into());
    let text = fs::read_to_string(&path).unwrap_or_else(|e| {
        log(image, &format!("FATAL: cannot read {path}: {e}"));
        exit(1)
    });
    let Some(upstream) = caddy_upstream(&text, &|k| env::var(k).ok()) else {
        log(image, &format!("FATAL: no reverse_proxy upstream in {path}"));
        exit(1)
    };
    log(image, &format!("reverse-proxying to {}:{} (from {path})", upstream.0, upstream.1));
    let retry = caddy_retry(&text);
    let upstream = Arc::new(upstream);
    listen(
        image,
        ports,
        Arc::new(move |mut s: TcpStream| {
            if let Err((status, msg)) = proxy(&mut s, &upstream, retry) {
                if status != 0 {
                    let _ = respond(&mut s, status, "text/plain; charset=utf-8", format!("{msg}\n").as_bytes(), false);
                }
            }
            let _ = s.shutdown(Shutdown::Write);
        }),
    );
}

// ---------------------------------------------------------------------------------------------
// curl (argv[0] == "curl")

fn curl_main(args: &[String]) -> i32 {
    let (mut fail, mut show_err, mut out, mut url, mut timeout) = (false, true, None::<String>, None::<String>, 30u64);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-o" | "--output" => out = it.next().cloned(),
            "-m" | "--max-time" => timeout = it.next().and_then(|v| v.parse::<f64>().ok()).map_or(timeout, |v| v.ceil().max(1.0) as u64),
            "-H" | "--header" | "-A" | "--user-agent" | "-X" | "--request" => {
                it.next();
            }
            "--fail" => fail = true,
            "--silent" => show_err = false,
            "--show-error" => show_err = true,
            a if a.starts_with("--") => {}
            a if a.starts_with('-') && a.len() > 1 => {
                for c in a[1..].chars() {
                    match c {
                        'f' => fail = true,
                        's' => show_err = false,
                        'S' => show_err = true,
                        _ => {}
                    }
                }
            }
            a => url = url.or(Some(a.to_string())),
        }
    }
    let err = |code: i32, msg: String| {
        if show_err {
            eprintln!("curl: ({code}) {msg}");
        }
        code
    };
    let Some(url) = url else { return err(2, "no URL specified".into()) };
    let Some(rest) = url.strip_prefix("http://") else { return err(1, format!("protocol not supported in {url}")) };
    let (authority, path) = rest.find('/').map_or((rest, "/"), |i| (&rest[..i], &rest[i..]));
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => match p.parse() {
            Ok(p) => (h, p),
            Err(_) => return err(3, format!("bad port in {url}")),
        },
        _ => (authority, 80),
    };
    let addr = match resolve(host, port, 2) {
        Ok(a) => a,
        Err(e) => return err(6, e),
    };
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(timeout)) {
        Ok(s) => s,
        Err(e) => return err(7, format!("Failed to connect to {host} port {port}: {e}")),
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(timeout)));
    let req = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: curl/standin\r\nAccept: */*\r\nConnection: close\r\n\r\n");
    let mut resp = Vec::new();
    if let Err(e) = s.write_all(req.as_bytes()).and_then(|_| s.read_to_end(&mut resp)) {
        if resp.is_empty() {
            return err(if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut { 28 } else { 56 }, e.to_string());
        }
    }
    let Some(i) = resp.windows(4).position(|w| w == b"\r\n\r\n") else { return err(52, "Empty reply from server".into()) };
    let head = String::from_utf8_lossy(&resp[..i]).into_owned();
    let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let headers = parse_headers(head.split("\r\n").skip(1));
    let mut body = &resp[i + 4..];
    if let Some(n) = header(&headers, "content-length").and_then(|v| v.parse::<usize>().ok()) {
        body = &body[..n.min(body.len())];
    }
    if fail && status >= 400 {
        return err(22, format!("The requested URL returned error: {status}"));
    }
    let written = match out.as_deref() {
        Some("-") | None => io::stdout().write_all(body).and_then(|_| io::stdout().flush()),
        Some(f) => fs::write(f, body),
    };
    match written {
        Ok(()) => 0,
        Err(e) => err(23, format!("write error: {e}")),
    }
}

// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_policy_follows_sourcegraph_rules() {
        assert_eq!(up_policy(None, "7.5.4453"), Ok("7.5.4453".into()));
        assert_eq!(up_policy(Some("7.5.0"), "7.5.4453"), Ok("7.5.4453".into()));
        assert_eq!(up_policy(Some("7.4.0"), "7.5.4453"), Ok("7.5.4453".into()));
        assert_eq!(up_policy(Some("5.11.6271"), "6.0.0"), Ok("6.0.0".into()));
        assert_eq!(up_policy(Some("6.12.0"), "7.0.1"), Ok("7.0.1".into()));
        let e = up_policy(Some("5.9.17785"), "6.1.0").unwrap_err();
        assert!(e.contains("cannot jump from 5.9 to 6.1; use a multi-version upgrade"), "{e}");
        assert!(up_policy(Some("5.9.17785"), "7.5.4453").is_err());
        assert!(up_policy(Some("5.10.0"), "6.0.0").is_err());
        assert!(up_policy(Some("7.5.4453"), "7.4.0").unwrap_err().contains("downgrade"));
    }

    #[test]
    fn upgrade_plan_checks_from_and_to() {
        let steps = upgrade_plan(Some("5.9.17785"), "5.9.17785", "7.5.4453", "7.5.4453").unwrap();
        assert_eq!(steps.first().map(String::as_str), Some("5.10"));
        assert!(steps.contains(&"5.11".to_string()) && steps.contains(&"6.0".to_string()) && steps.contains(&"6.12".to_string()));
        assert_eq!(steps.last().map(String::as_str), Some("7.5"));
        assert!(upgrade_plan(Some("5.8.0"), "v5.9.0", "7.5.0", "7.5.4453").is_err());
        assert!(upgrade_plan(Some("5.9.0"), "5.9.0", "7.6.0", "7.5.4453").is_err());
        assert!(upgrade_plan(None, "5.9.0", "7.5.0", "7.5.4453").is_err());
        assert_eq!(upgrade_plan(Some("7.5.1"), "7.5.0", "7.5.4453", "7.5.4453"), Ok(vec![]));
        // A re-run after an interruption continues from the schema the database has.
        assert_eq!(upgrade_plan(Some("5.11.6271"), "5.9.17785", "6.1.0", "7.5.4453"), Ok(vec!["6.0".to_string(), "6.1".to_string()]));
        assert!(upgrade_plan(Some("7.4.0-dirty"), "7.4.0", "7.5.0", "7.5.4453").is_err(), "a dirty database is refused");
        assert!(up_policy(Some("7.5.4453-dirty"), "7.5.4453").is_err());
    }

    #[test]
    fn failure_knob_can_target_one_release() {
        assert_eq!(failure_mode("migrator", "7.5.4453"), Some(Fail::Clean));
        assert_eq!(failure_mode("migrator-dirty@7.5.4453", "7.5.4453"), Some(Fail::Dirty));
        assert_eq!(failure_mode("migrator-dirty@7.5.4453", "7.4.0"), None);
        assert_eq!(failure_mode("frontend, migrator@v7.4.0", "7.4.0"), Some(Fail::Clean));
        assert_eq!(failure_mode("", "7.4.0"), None);
        let cf = "reverse_proxy {$X} {\n\tlb_try_duration 60s\n\tlb_try_interval 250ms\n}\n";
        assert_eq!(caddy_retry(cf), (Duration::from_secs(60), Duration::from_millis(250)));
        assert_eq!(caddy_retry("reverse_proxy a:1"), (Duration::ZERO, Duration::from_millis(250)));
        assert_eq!(parse_ver("v5.9.17785"), Some(Ver { major: 5, minor: 9, patch: 17785 }));
        assert_eq!(parse_ver("6.0"), Some(Ver { major: 6, minor: 0, patch: 0 }));
        assert_eq!(parse_ver("insiders"), None);
    }

    #[test]
    fn site_init_checks_the_body_before_the_database() {
        let req =
            |b: &str| Request { method: "POST".into(), path: "/-/site-init".into(), keep_alive: false, headers: vec![], body: b.as_bytes().to_vec() };
        assert_eq!(site_init(&req("email=a@b.c&username=admin")).0, 400, "form bodies are not JSON");
        assert_eq!(site_init(&req(r#"{"email":"a@b.c","username":"admin","password":"short"}"#)).0, 409);
        assert_eq!(site_init(&req(r#"{"email":"nope","username":"admin","password":"long enough pw"}"#)).0, 400);
    }

    #[test]
    fn caddyfile_upstream() {
        let env = |k: &str| (k == "SRC_FRONTEND_ADDRESSES").then(|| "sourcegraph-frontend-0:3080 other:3080".to_string());
        let cf = "{\n\tauto_https off\n}\n:80 {\n\treverse_proxy {$SRC_FRONTEND_ADDRESSES}\n}\n";
        assert_eq!(caddy_upstream(cf, &env), Some(("sourcegraph-frontend-0".into(), 3080)));
        let cf2 = "# comment reverse_proxy x\nexample.com {\n  reverse_proxy /api/* http://a:1,b:2\n}\n";
        assert_eq!(caddy_upstream(cf2, &env), Some(("a".into(), 1)));
        assert_eq!(caddy_upstream("reverse_proxy {$NOPE:fallback}", &env), Some(("fallback".into(), 80)));
        assert_eq!(caddy_upstream(":80 {\n}\n", &env), None);
    }

    #[test]
    fn dns_encode_decode() {
        let q = dns_query(0x1234, "pgsql.");
        assert_eq!(&q[..4], &[0x12, 0x34, 0x01, 0x00]);
        assert_eq!(&q[12..], &[5, b'p', b'g', b's', b'q', b'l', 0, 0, 1, 0, 1]);
        // Response: header (1 answer), the question, then a CNAME and an A record using name pointers.
        let mut r = q.clone();
        r[2] = 0x81;
        r[3] = 0x80;
        r[7] = 2;
        r.extend_from_slice(&[0xC0, 12, 0, 5, 0, 1, 0, 0, 0, 60, 0, 2, 0xC0, 12]);
        r.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 172, 18, 0, 5]);
        assert_eq!(dns_parse_a(&r, 0x1234), Ok(vec![Ipv4Addr::new(172, 18, 0, 5)]));
        assert!(dns_parse_a(&r, 0x9999).is_err());
        r[3] = 0x83; // NXDOMAIN
        assert!(dns_parse_a(&r, 0x1234).unwrap_err().contains("rcode 3"));
        let hosts = "127.0.0.1\tlocalhost\n::1 ip6-localhost\n172.18.0.9\tabc123 pgsql # me\n";
        assert_eq!(hosts_lookup(hosts, "PGSQL"), Some("172.18.0.9".parse().unwrap()));
        assert_eq!(hosts_lookup(hosts, "ip6-localhost"), Some("::1".parse().unwrap()));
        assert_eq!(hosts_lookup(hosts, "me"), None);
    }

    #[test]
    fn http_keeps_a_connection_alive_unless_asked_to_close() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        http_serve("test", &[port], Arc::new(|req: &Request| (200, format!("seen {}", req.path))));
        let mut c = (0..50)
            .find_map(|_| {
                TcpStream::connect(("127.0.0.1", port)).ok().or_else(|| {
                    thread::sleep(Duration::from_millis(20));
                    None
                })
            })
            .unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut answer = |c: &mut TcpStream, req: &str| {
            c.write_all(req.as_bytes()).unwrap();
            let (head, mut body) = read_head(c).unwrap();
            let len: usize = head.lines().find_map(|l| l.strip_prefix("Content-Length: ")).unwrap().parse().unwrap();
            while body.len() < len {
                let mut b = [0u8; 256];
                let n = c.read(&mut b).unwrap();
                body.extend_from_slice(&b[..n]);
            }
            (head, String::from_utf8(body).unwrap())
        };
        let (h1, b1) = answer(&mut c, "GET /one HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(h1.contains("Connection: keep-alive"), "{h1}");
        assert_eq!(b1, "seen /one");
        let (h2, b2) = answer(&mut c, "GET /two HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        assert!(h2.contains("Connection: close"), "{h2}");
        assert_eq!(b2, "seen /two", "the second request on the same connection");
        assert_eq!(c.read(&mut [0u8; 16]).unwrap(), 0, "closed after an answer asked to close");
        // HTTP/1.0: one request per connection.
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let (h3, _) = answer(&mut c, "GET /three HTTP/1.0\r\n\r\n");
        assert!(h3.contains("Connection: close"), "{h3}");
        assert_eq!(c.read(&mut [0u8; 16]).unwrap(), 0);
    }

    #[test]
    fn an_idle_connection_sleeps_until_its_client_writes_or_the_time_is_up() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let start = Instant::now();
        assert!(!wait_readable(Some(s.as_raw_fd()), Some(Duration::from_millis(300))), "nothing came");
        assert!(start.elapsed() >= Duration::from_millis(250), "slept the time given: {:?}", start.elapsed());
        let writer = thread::spawn(move || {
            thread::sleep(Duration::from_millis(100));
            c.write_all(b"G").unwrap();
            c
        });
        let start = Instant::now();
        assert!(wait_readable(Some(s.as_raw_fd()), Some(Duration::from_secs(10))), "the client's byte");
        assert!(start.elapsed() < Duration::from_secs(5), "woken by it, not by the limit");
        drop(writer.join().unwrap());
        assert!(wait_readable(Some(s.as_raw_fd()), Some(Duration::from_secs(10))), "a closed connection is readable too");
    }

    #[test]
    fn state_json_round_trip() {
        let mut st = DbState { pg_major: 12, schema: None, data: BTreeMap::new() };
        assert_eq!(DbState::from_json(&st.to_json()), Ok(DbState { pg_major: 12, schema: None, data: BTreeMap::new() }));
        let empty = st.checksum();
        st.schema = Some("5.9.17785".into());
        assert_eq!(st.checksum(), empty, "checksum covers data only");
        st.data.insert("k\"1".into(), "va\\lue with spaces\t\u{1}é".into());
        st.data.insert("a".into(), String::new());
        let back = DbState::from_json(&st.to_json()).unwrap();
        assert_eq!(back, st);
        assert_ne!(back.checksum(), empty);
        assert!(DbState::from_json("{\"schema_version\":null}").is_err());
        assert!(DbState::from_json("{\"pg_major\":16,").is_err());
    }

    #[test]
    fn the_search_page_asks_both_backends_and_fails_when_one_is_gone() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let up = format!("127.0.0.1:{}", l.local_addr().unwrap().port());
        thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let _ = read_request(&mut c);
                let _ = respond(&mut c, 200, "text/plain", b"7.5.4453", false);
            }
        });
        let gone = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            format!("127.0.0.1:{}", l.local_addr().unwrap().port())
        };
        let (code, body) = search_page("7.5.4453", &format!("http://{up}"), &up);
        assert_eq!(code, 200, "{body}");
        assert!(body.contains(&format!("{up}=7.5.4453")), "{body}");
        let (code, body) = search_page("7.5.4453", &format!("http://{up}"), &gone);
        assert_eq!(code, 502, "{body}");
        assert!(body.contains("search failed"), "{body}");
    }

    #[test]
    fn roles_and_ports() {
        for db in ["postgresql-16", "postgresql-16-codeinsights", "postgres-12-alpine", "codeintel-db", "codeinsights-db"] {
            assert_eq!(role_of(db), Role::Db, "{db}");
        }
        assert_eq!(role_of("postgres_exporter"), Role::Generic);
        assert_eq!(ports_for("cadvisor", Role::Generic, &["--port=8080".into()]), vec![8080]);
        assert_eq!(ports_for("opentelemetry-collector", Role::Generic, &[]), vec![4317, 13133]);
        assert_eq!(ports_for("something-new", Role::Generic, &[]), vec![8080]);
    }
}

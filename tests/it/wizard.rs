//! The interactive provisioner through a real pseudo-terminal (rexpect): `sgbox init` and
//! `sgbox up` with nothing given are walked through with arrow keys, typed answers, Enter and
//! Ctrl-C, as a person would; the written sgbox.toml must equal what `plan --print-config` gives
//! for the same flags. The AWS walk runs against moto and stops at the confirmation with "no":
//! nothing may exist in the account afterwards. The screens are rendered by a terminal emulator
//! (vt100) and snapshotted for review.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

use rexpect::process::wait::WaitStatus;
use rexpect::session::{spawn_command, PtySession};

use crate::common::moto::Moto;
use crate::common::{run, sgbox, text};

const DOWN: &str = "\x1b[B";
const ENTER: &str = "\r";
const BACKSPACE: &str = "\x7f";
const CTRL_C: &str = "\x03";

/// sgbox on a pseudo-terminal of 100×40, everything it drew kept for the screen snapshot.
struct Tty {
    s: PtySession,
    seen: String,
}

impl Tty {
    /// With `moto`, the standard AWS variables that reach it (`Moto::env`); `env` comes last.
    fn start(state: &Path, args: &[&str], moto: Option<&Moto>, env: &[(&str, &str)]) -> Tty {
        // A pty starts at 0×0; the shell sets a real size before sgbox draws anything.
        let mut c = Command::new("sh");
        c.arg("-c").arg("stty cols 100 rows 40 && exec \"$@\"").arg("sh").arg(env!("CARGO_BIN_EXE_sgbox")).args(args);
        for (k, _) in std::env::vars() {
            if k.starts_with("SGBOX_") || k.starts_with("AWS_") {
                c.env_remove(k);
            }
        }
        c.env("SGBOX_STATE_DIR", state).env("NO_COLOR", "1").env("TERM", "xterm").env("SGBOX_CHECKIP_URL", "");
        if let Some(m) = moto {
            m.env(&mut c, &m.url());
        }
        for (k, v) in env {
            c.env(k, v);
        }
        Tty { s: spawn_command(c, Some(60_000)).expect("spawn sgbox on a pty"), seen: String::new() }
    }

    /// Wait until `needle` is drawn.
    fn expect(&mut self, needle: &str) {
        match self.s.exp_string(needle) {
            Ok(before) => {
                self.seen.push_str(&before);
                self.seen.push_str(needle);
            }
            Err(e) => panic!("{needle:?} never appeared ({e}); the screen:\n{}", self.screen()),
        }
    }

    fn send(&mut self, keys: &str) {
        self.s.send(keys).unwrap();
        self.s.flush().unwrap();
    }

    /// At question `q`, press `keys`.
    fn answer(&mut self, q: &str, keys: &str) {
        self.expect(q);
        self.send(keys);
    }

    /// The process's exit code once it ends.
    fn finish(&mut self) -> i32 {
        let rest = self.s.exp_eof().unwrap_or_default();
        self.seen.push_str(&rest);
        match self.s.process().wait().unwrap() {
            WaitStatus::Exited(_, code) => code,
            other => panic!("sgbox did not exit normally: {other:?}\n{}", self.screen()),
        }
    }

    /// The terminal as a person would see it now.
    fn screen(&self) -> String {
        // rexpect hands over each byte as a char; the terminal wants the bytes (UTF-8) back.
        let bytes: Vec<u8> = self.seen.replace('\n', "\r\n").chars().map(|c| u8::try_from(u32::from(c)).unwrap_or(b'?')).collect();
        let mut p = vt100::Parser::new(40, 100, 0);
        p.process(&bytes);
        p.screen().contents().lines().map(str::trim_end).collect::<Vec<_>>().join("\n").trim().to_string()
    }
}

fn plan_config(state: &Path, moto: Option<&Moto>, flags: &[&str]) -> String {
    let mut c = sgbox(state);
    if let Some(m) = moto {
        m.env(&mut c, &m.url());
    }
    c.arg("plan").arg("--print-config").args(flags);
    let out = run(&mut c);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

#[test]
fn init_on_a_terminal_walks_through_the_local_box_and_writes_what_plan_prints() {
    let state = tempfile::tempdir().unwrap();
    let mut t = Tty::start(state.path(), &["init"], None, &[]);
    t.answer("Deployment name?", &format!("demo{ENTER}"));
    t.answer("Where should the box run?", &format!("{DOWN}{ENTER}"));
    t.expect("local-2x4");
    t.answer("Sourcegraph version?", &format!("{DOWN}{ENTER}"));
    // A bad answer is told why, with the flag's message, and asked again.
    t.answer("Data disk size in GB?", &format!("lots{ENTER}"));
    t.expect("'lots' is not a whole number of GB");
    t.send(&format!("{}30{ENTER}", BACKSPACE.repeat(4)));
    t.answer("TLS?", ENTER);
    t.answer("Host name?", ENTER);
    t.answer("Registry mirror?", ENTER);
    t.expect("sgbox -f ");
    assert_eq!(t.finish(), 0, "{}", t.screen());

    let written = std::fs::read_to_string(state.path().join("demo/sgbox.toml")).unwrap();
    assert_eq!(written, plan_config(state.path(), None, &["--cloud", "local", "--name", "demo", "--version", "7.4", "--data-disk-gb", "30"]));
    // The file is all a later run needs: it makes the same settings without a question.
    assert_eq!(plan_config(state.path(), None, &["-f", state.path().join("demo/sgbox.toml").to_str().unwrap()]), written);
    let screen = t.screen().replace(&state.path().display().to_string(), "[STATE]");
    insta::assert_snapshot!("init_local_screen", screen);
}

/// A one-shot "what is my address" service on 127.0.0.1 answering `ip`.
fn checkip(ip: &'static str) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}/", l.local_addr().unwrap().port());
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let mut conn = conn;
            let mut buf = [0u8; 2048];
            let _ = conn.read(&mut buf);
            let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{ip}\n", ip.len() + 1);
        }
    });
    url
}

#[test]
fn up_on_a_terminal_walks_through_aws_shows_the_plan_and_creates_nothing_on_no() {
    let moto = Moto::start();
    let state = tempfile::tempdir().unwrap();
    let ip = checkip("198.51.100.23");
    let env = [("AWS_REGION", "eu-west-1"), ("SGBOX_CHECKIP_URL", ip.as_str())];
    let mut t = Tty::start(state.path(), &["up"], Some(&moto), &env);
    t.answer("Deployment name?", ENTER);
    t.answer("Where should the box run?", ENTER);
    // The configured region is the default, and said where it came from.
    t.expect("Region?");
    t.answer("eu-west-1 is from AWS_REGION", ENTER);
    t.answer("Zone?", &format!("{DOWN}{ENTER}"));
    t.expect("Size?");
    t.answer("~$", &format!("{DOWN}{ENTER}"));
    t.answer("Sourcegraph version?", ENTER);
    t.answer("Data disk size in GB?", &format!("{}300{ENTER}", BACKSPACE.repeat(3)));
    t.expect("Who may reach SSH and the site?");
    t.answer("as http://127.0.0.1", ENTER);
    t.answer("TLS?", ENTER);
    t.answer("Host name?", &format!("sg.example.com{ENTER}"));
    t.answer("Registry mirror?", ENTER);
    t.expect("Cost         ~$");
    t.expect("Account      AWS account 123456789012");
    t.expect("security-group");
    t.answer("Create it?", &format!("n{ENTER}"));
    t.expect("Nothing was created.");
    assert_eq!(t.finish(), 0, "{}", t.screen());

    // Nothing in the account, and no deployment in the state folder: only the answers.
    let made = moto.py(r#"
e = boto3.client('ec2', endpoint_url=ec2.meta.endpoint_url, region_name='eu-west-1', aws_access_key_id='testing', aws_secret_access_key='testing')
print(json.dumps({
  'instances': [i for r in e.describe_instances()['Reservations'] for i in r['Instances']],
  'volumes': e.describe_volumes()['Volumes'],
  'keys': e.describe_key_pairs()['KeyPairs'],
  'sgs': [g['GroupName'] for g in e.describe_security_groups()['SecurityGroups'] if g['GroupName'] != 'default'],
  'eips': e.describe_addresses()['Addresses'],
}, default=str))
"#);
    for k in ["instances", "volumes", "keys", "sgs", "eips"] {
        assert_eq!(made[k].as_array().map(Vec::len), Some(0), "{k} was created: {made}");
    }
    let files: Vec<String> =
        std::fs::read_dir(state.path().join("sourcegraph")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(files, vec!["sgbox.toml".to_string()]);

    let written = std::fs::read_to_string(state.path().join("sourcegraph/sgbox.toml")).unwrap();
    let zone = written.lines().find_map(|l| l.strip_prefix("zone = \"")).map(|z| z.trim_end_matches('"').to_string()).expect("a zone was picked");
    assert!(zone.starts_with("eu-west-1"), "{written}");
    let flags = [
        "--cloud",
        "aws",
        "--region",
        "eu-west-1",
        "--zone",
        &zone,
        "--size",
        "S",
        "--data-disk-gb",
        "300",
        "--ssh-cidr",
        "198.51.100.23/32",
        "--hostname",
        "sg.example.com",
    ];
    assert_eq!(written, plan_config(state.path(), Some(&moto), &flags));
    let screen = t.screen().replace(&state.path().display().to_string(), "[STATE]").replace(&ip, "http://127.0.0.1:[PORT]/");
    insta::assert_snapshot!("up_aws_screen", screen);

    // The one-line command it printed makes that box without a question.
    let line = t.screen().lines().find_map(|l| l.trim().strip_prefix("sgbox ").map(str::to_string)).expect("the command was printed");
    let mut c = sgbox(state.path());
    moto.env(&mut c, &moto.url());
    c.env("AWS_REGION", "eu-west-1").args(shlex::split(&line).unwrap()).args(["--no-wait", "--output", "json"]);
    let out = run(&mut c);
    assert!(out.status.success(), "{line}: {}", text(&out.stderr));
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(made["instance_id"].as_str().is_some_and(|i| i.starts_with("i-")), "{made}");

    // On a terminal, yes creates it: the rest given as flags, the zone and names asked.
    let mut t = Tty::start(
        state.path(),
        &["up", "--no-wait", "--name", "yes-box", "--cloud", "aws", "--size", "XS", "--ssh-cidr", "198.51.100.23/32", "--version", "7.5"],
        Some(&moto),
        &env,
    );
    t.answer("Region?", ENTER);
    t.answer("Zone?", ENTER);
    t.answer("Data disk size in GB?", ENTER);
    t.answer("TLS?", ENTER);
    t.answer("Host name?", ENTER);
    t.answer("Registry mirror?", ENTER);
    t.answer("Create it?", ENTER);
    assert_eq!(t.finish(), 0, "{}", t.screen());
    let rec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(state.path().join("yes-box/deployment.json")).unwrap()).unwrap();
    let id = rec["instance_id"].as_str().expect("an instance was recorded").to_string();
    let found = moto.py(&format!(
        "e = boto3.client('ec2', endpoint_url=ec2.meta.endpoint_url, region_name='eu-west-1', aws_access_key_id='testing', aws_secret_access_key='testing')\nprint(json.dumps([i['InstanceId'] for r in e.describe_instances(InstanceIds=['{id}'])['Reservations'] for i in r['Instances']]))"
    ));
    assert_eq!(found, serde_json::json!([id]));
}

#[test]
fn ctrl_c_leaves_nothing_and_given_values_are_not_asked() {
    let state = tempfile::tempdir().unwrap();
    let mut t = Tty::start(state.path(), &["up"], None, &[]);
    t.answer("Deployment name?", &format!("half{ENTER}"));
    t.answer("Where should the box run?", CTRL_C);
    t.expect("cancelled: nothing was created or written");
    assert_eq!(t.finish(), 130);
    assert_eq!(std::fs::read_dir(state.path()).unwrap().count(), 0, "the state folder was written to");

    // Given as flags, SGBOX_* or in the file: shown as given, never asked.
    let file = state.path().join("given.toml");
    std::fs::write(&file, "version = \"7.4\"\n").unwrap();
    let mut t = Tty::start(
        state.path(),
        &["-f", file.to_str().unwrap(), "init", "--cloud", "local", "--name", "flagged", "--out", state.path().join("out.toml").to_str().unwrap()],
        None,
        &[("SGBOX_DATA_DISK_GB", "25")],
    );
    t.expect("Deployment name: flagged (from --name)");
    t.expect("Where should the box run: local (from --cloud)");
    t.expect(&format!("Sourcegraph version: 7.4 (from {}:1)", file.display()));
    t.expect("Data disk size in GB: 25 (from SGBOX_DATA_DISK_GB)");
    t.answer("TLS?", ENTER);
    t.answer("Host name?", ENTER);
    t.answer("Registry mirror?", ENTER);
    assert_eq!(t.finish(), 0, "{}", t.screen());
    let screen = t.screen();
    for q in ["Deployment name?", "Where should the box run?", "Sourcegraph version?", "Data disk size in GB?"] {
        assert!(!screen.contains(q), "{q} was asked:\n{screen}");
    }
    let written = std::fs::read_to_string(state.path().join("out.toml")).unwrap();
    assert!(written.contains("version = \"7.4.") && written.contains("data-disk-gb = 25"), "{written}");
}

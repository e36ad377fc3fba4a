//! A real moto server (PyPI `moto[server]`, installed into .venv by .ci/setup) on 127.0.0.1, with
//! AMI, key-pair and instance-type validation on and Debian's AMIs seeded (moto ships none), and
//! boto3 (which comes with moto) as an independent reader of what sgbox created.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use super::{spawn_on_own_port, text};

pub const DEBIAN_AMI: &str = "ami-0d3b1e5a9c13debe1";
pub const OLD_DEBIAN_AMI: &str = "ami-0aa0d3b1e5a9c1312";

pub fn venv_bin(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin").join(name);
    assert!(p.exists(), "{} not found: run `bash .ci/setup` (pip installs moto[server,ec2,ssm] into .venv)", p.display());
    p
}

pub struct Moto {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
    /// The keys of a user allowed everything: the harness's own (boto3 readers, players).
    pub admin: (String, String),
}

impl Moto {
    pub fn start() -> Moto {
        Moto::start_with(None)
    }

    /// moto enforcing IAM (`INITIAL_NO_AUTH_ACTION_COUNT`): its free requests make the harness's
    /// admin user; every later request needs a user's keys and a policy allowing the action.
    pub fn start_enforcing_iam() -> Moto {
        let mut m = Moto::start_with(Some(3));
        m.admin = m.user_with(
            "harness-admin",
            &serde_json::json!({
                "Version": "2012-10-17",
                "Statement": [{ "Effect": "Allow", "Action": "*", "Resource": "*" }]
            }),
        );
        m
    }

    /// A user holding exactly `doc`: its keys (made with the admin's, or with free requests).
    pub fn user_with(&self, name: &str, doc: &serde_json::Value) -> (String, String) {
        let v = self.py(&format!(
            "iam = boto3.client('iam', endpoint_url=ec2.meta.endpoint_url, region_name='us-east-1', aws_access_key_id=KEYS[0], aws_secret_access_key=KEYS[1])\n\
             iam.create_user(UserName='{name}')\n\
             iam.put_user_policy(UserName='{name}', PolicyName='sgbox', PolicyDocument={})\n\
             k = iam.create_access_key(UserName='{name}')['AccessKey']\n\
             print(json.dumps([k['AccessKeyId'], k['SecretAccessKey']]))",
            serde_json::to_string(&doc.to_string()).unwrap()
        ));
        (v[0].as_str().unwrap().to_string(), v[1].as_str().unwrap().to_string())
    }

    fn start_with(free_requests: Option<u32>) -> Moto {
        let dir = tempfile::tempdir().unwrap();
        let amis = dir.path().join("amis.json");
        let ami = |id: &str, name: &str, date: &str| {
            serde_json::json!({
                "ami_id": id, "state": "available", "public": true, "owner_id": "136693071363",
                "image_location": format!("136693071363/{name}"), "sriov": "simple", "root_device_type": "ebs",
                "root_device_name": "/dev/xvda", "description": "Debian 13 (trixie)", "image_type": "machine",
                "platform": null, "architecture": "x86_64", "name": name, "virtualization_type": "hvm",
                "hypervisor": "xen", "creation_date": date
            })
        };
        let list = serde_json::json!([
            ami(OLD_DEBIAN_AMI, "debian-13-amd64-20260901-2200", "2026-09-01T10:00:00.000Z"),
            ami(DEBIAN_AMI, "debian-13-amd64-20261110-2289", "2026-11-10T10:00:00.000Z"),
            ami("ami-0b0bdeb12000000a1", "debian-12-amd64-20261110-2289", "2026-11-10T11:00:00.000Z"),
        ]);
        std::fs::write(&amis, list.to_string()).unwrap();
        let log = std::fs::File::create(dir.path().join("moto.log")).unwrap();
        // tests/harness/moto_server.py: moto_server checking signatures on the bytes signed.
        let mut cmd = Command::new(venv_bin("python"));
        cmd.arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/harness/moto_server.py"));
        if let Some(n) = free_requests {
            cmd.env("INITIAL_NO_AUTH_ACTION_COUNT", n.to_string());
        }
        cmd.args(["-H", "127.0.0.1", "-p", "0"])
            .env("MOTO_AMIS_PATH", &amis)
            .env("MOTO_ENABLE_AMI_VALIDATION", "true")
            .env("MOTO_ENABLE_KEYPAIR_VALIDATION", "true")
            .env("MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION", "true")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let (child, port) = spawn_on_own_port(&mut cmd, &dir.path().join("port"), "moto (tests/harness/moto_server.py)");
        Moto { child, port, dir, admin: ("testing".into(), "testing".into()) }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Environment for sgbox: the standard AWS variables, nothing test-specific.
    pub fn env(&self, cmd: &mut Command, endpoint: &str) {
        cmd.env("AWS_ENDPOINT_URL", endpoint)
            .env("AWS_ACCESS_KEY_ID", &self.admin.0)
            .env("AWS_SECRET_ACCESS_KEY", &self.admin.1)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE");
    }

    /// Run boto3 (from moto's venv) against moto: an independent reader of what sgbox made.
    pub fn py(&self, code: &str) -> serde_json::Value {
        let script = format!(
            "import boto3, json, base64\nKEYS = ({:?}, {:?})\nec2 = boto3.client('ec2', endpoint_url='{}', region_name='us-east-1', aws_access_key_id=KEYS[0], aws_secret_access_key=KEYS[1])\n{code}\n",
            self.admin.0,
            self.admin.1,
            self.url()
        );
        let out = Command::new(venv_bin("python")).arg("-c").arg(&script).output().unwrap();
        assert!(out.status.success(), "boto3 script failed: {}\n{script}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("boto3 printed no JSON ({e}): {}", text(&out.stdout)))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("moto.log")).unwrap_or_default()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// tests/harness/fault_proxy.py in front of moto: throttles a share of calls, or forwards one
/// action and then never answers it.
pub struct Proxy {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Proxy {
    pub fn start(moto: &Moto, throttle: f64, hang_after: Option<&str>) -> Proxy {
        Proxy::with_args(moto, throttle, hang_after, &[])
    }

    /// With more of fault_proxy.py's options, e.g. `--lag` or `--stale address`.
    pub fn with_args(moto: &Moto, throttle: f64, hang_after: Option<&str>, extra: &[&str]) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("calls.jsonl");
        let mut cmd = Command::new("python3");
        cmd.arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/harness/fault_proxy.py"))
            .args(["--port", "0", "--upstream", &moto.url(), "--throttle", &throttle.to_string()])
            .arg("--log")
            .arg(&log);
        if let Some(a) = hang_after {
            cmd.args(["--hang-after", a]);
        }
        cmd.args(extra).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let (child, port) = spawn_on_own_port(&mut cmd, &dir.path().join("port"), "the fault proxy (tests/harness/fault_proxy.py)");
        Proxy { child, port, log, _dir: dir }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The form parameters of every forwarded call of `action`, in order.
    pub fn params(&self, action: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["action"] == action && v["forwarded"] == true)
            .map(|v| v["params"].clone())
            .collect()
    }

    /// (action, forwarded, status) of every call so far.
    pub fn calls(&self) -> Vec<(String, bool, u16)> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| {
                (v["action"].as_str().unwrap_or("").to_string(), v["forwarded"].as_bool().unwrap_or(false), v["status"].as_u64().unwrap_or(0) as u16)
            })
            .collect()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! The AWS machine against a real moto server (`tests/harness/moto_server.py`, as in `tests/it`), one
//! level below the CLI, for what the CLI reaches only through SSH to a real box: the data
//! snapshot and restore path (also interrupted half-way and re-run), and the IAM policy sgbox
//! ships. moto enforces IAM actions once its free requests are spent
//! (`INITIAL_NO_AUTH_ACTION_COUNT`): a user holding exactly the policy runs the whole life of a
//! deployment, and for every action in the policy, a user holding all but that one fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use aws_sdk_ec2::config::Credentials;
use serde_json::Value;

use super::{policy, Aws};
use crate::cloud::{InstanceSpec, Machine, Spec};
use crate::settings::{Layer, Settings};

const DEBIAN_AMI: &str = "ami-0d3b1e5a9c13debe1";

/// A real ed25519 public key (EC2 checks the format), made the way a deployment's is.
fn public_key() -> String {
    let tmp = tempfile::tempdir().unwrap();
    crate::state::DeploymentDir::new(tmp.path(), "key").ssh_public_key().unwrap()
}

fn venv_bin(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin").join(name);
    assert!(p.exists(), "{} not found: run `bash .ci/setup` (pip installs moto[server] into .venv)", p.display());
    p
}

#[path = "../../../tests/it/common/own_port.rs"]
mod own_port;
use own_port::spawn_on_own_port;

struct Moto {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Moto {
    /// moto with Debian's AMI seeded; with `auth`, IAM is enforced after that many free requests.
    fn start(auth: Option<u32>) -> Moto {
        let dir = tempfile::tempdir().unwrap();
        let amis = dir.path().join("amis.json");
        let ami = serde_json::json!([{
            "ami_id": DEBIAN_AMI, "state": "available", "public": true, "owner_id": "136693071363",
            "image_location": "136693071363/debian-13-amd64-20261110-2289", "sriov": "simple", "root_device_type": "ebs",
            "root_device_name": "/dev/xvda", "description": "Debian 13 (trixie)", "image_type": "machine", "platform": null,
            "architecture": "x86_64", "name": "debian-13-amd64-20261110-2289", "virtualization_type": "hvm", "hypervisor": "xen",
            "creation_date": "2026-11-10T10:00:00.000Z"
        }]);
        std::fs::write(&amis, ami.to_string()).unwrap();
        let log = std::fs::File::create(dir.path().join("moto.log")).unwrap();
        let mut cmd = Command::new(venv_bin("python"));
        cmd.arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/harness/moto_server.py"))
            .args(["-H", "127.0.0.1", "-p", "0"])
            .env("MOTO_AMIS_PATH", &amis)
            .env("MOTO_ENABLE_AMI_VALIDATION", "true")
            .env("MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION", "true");
        if let Some(n) = auth {
            cmd.env("INITIAL_NO_AUTH_ACTION_COUNT", n.to_string());
        }
        cmd.stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        let (child, port) = spawn_on_own_port(&mut cmd, &dir.path().join("port"), "moto (tests/harness/moto_server.py)");
        Moto { child, port, _dir: dir }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// boto3 against moto (with the given keys), printing one JSON value.
    fn py(&self, keys: (&str, &str), code: &str) -> Value {
        let script = format!(
            "import boto3, json\nkw = dict(endpoint_url='{}', region_name='us-east-1', aws_access_key_id='{}', aws_secret_access_key='{}')\nec2 = boto3.client('ec2', **kw)\niam = boto3.client('iam', **kw)\n{code}\n",
            self.url(),
            keys.0,
            keys.1
        );
        let out = Command::new(venv_bin("python")).arg("-c").arg(&script).output().unwrap();
        assert!(out.status.success(), "boto3: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Spend the free requests on a user holding `doc`; its keys.
    fn user_with(&self, name: &str, doc: &Value) -> (String, String) {
        // Reset the free-request counter to exactly the three IAM calls below.
        let reset = Command::new("curl")
            .args(["-sSf", "-X", "POST", "-H", "Content-Type: text/plain", "--data-binary", "3"])
            .arg(format!("{}/moto-api/reset-auth", self.url()))
            .output()
            .unwrap();
        assert!(reset.status.success(), "{}", String::from_utf8_lossy(&reset.stderr));
        let v = self.py(
            ("testing", "testing"),
            &format!(
                "iam.create_user(UserName='{name}')\niam.put_user_policy(UserName='{name}', PolicyName='sgbox', PolicyDocument={})\nk = iam.create_access_key(UserName='{name}')['AccessKey']\nprint(json.dumps([k['AccessKeyId'], k['SecretAccessKey']]))",
                serde_json::to_string(&doc.to_string()).unwrap()
            ),
        );
        (v[0].as_str().unwrap().to_string(), v[1].as_str().unwrap().to_string())
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spec(pairs: &[(&'static str, &str)]) -> Spec {
    let mut all = vec![("cloud", "aws"), ("region", "us-east-1"), ("ssh-cidr", "203.0.113.7/32")];
    all.extend_from_slice(pairs);
    let layer = Layer::from_flags(all.iter().map(|(k, v)| (*k, Some(v.to_string()))));
    Spec::of(&Settings::resolve(&layer).unwrap())
}

async fn aws(endpoint: &str, keys: (&str, &str), spec: Spec, dir: &Path) -> Aws {
    let conf = Aws::loader()
        .endpoint_url(endpoint)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(Credentials::new(keys.0, keys.1, None, None, "moto-test"))
        .load()
        .await;
    Aws::with_config(spec, dir.to_path_buf(), &conf)
}

/// A deployment's whole life on AWS, as `up`, `status`, `upgrade` (snapshot) and its rollback
/// (restore), an `up` with a new SSH CIDR, and `down --delete-data` drive it; and the subnet
/// check of a deployment in a chosen subnet.
async fn lifecycle(endpoint: &str, keys: (&str, &str), name: &'static str, subnet: &str, dir: &Path) -> anyhow::Result<()> {
    let a = aws(endpoint, keys, spec(&[("name", name), ("zone", "us-east-1b")]), dir).await;
    a.preflight().await?;
    a.ensure_network().await?;
    a.ensure_key(&public_key()).await?;
    let image = a.find_base_image().await?;
    a.create_instance(&image, &InstanceSpec { user_data: "#cloud-config\n" }).await?;
    a.wait_running(Duration::from_secs(60)).await?;
    a.state().await?;
    a.endpoint().await?;
    a.console_output().await?;
    a.resources().await?;
    let snap = a.snapshot_data_disk("sgbox-pre-test").await?;
    a.wait_snapshot(&snap, Duration::from_secs(60), &|_| {}).await?;
    a.restore_data_disk(&snap, Duration::from_secs(120)).await?;
    let b = aws(endpoint, keys, spec(&[("name", name), ("zone", "us-east-1b"), ("ssh-cidr", "198.51.100.0/24")]), dir).await;
    b.ensure_network().await?;
    let other = tempfile::tempdir()?;
    let c = aws(endpoint, keys, spec(&[("name", "in-subnet"), ("subnet-id", subnet)]), other.path()).await;
    c.preflight().await?;
    let left = b.destroy(true, Duration::from_secs(120)).await?;
    anyhow::ensure!(left.is_empty(), "left behind: {:?}", left.iter().map(|r| &r.id).collect::<Vec<_>>());
    Ok(())
}

/// What the deployment's volumes are now: (id, role, restored-from, attached instance).
fn volumes(moto: &Moto, keys: (&str, &str), name: &str) -> Vec<(String, String, String, String)> {
    let v = moto.py(
        keys,
        &format!(
            "vs = ec2.describe_volumes(Filters=[{{'Name': 'tag:sgbox:deployment', 'Values': ['{name}']}}])['Volumes']\nt = lambda v, k: next((x['Value'] for x in v.get('Tags', []) if x['Key'] == k), '')\nprint(json.dumps([[v['VolumeId'], t(v, 'sgbox:role'), t(v, 'sgbox:restored-from'), (v['Attachments'] or [{{}}])[0].get('InstanceId', '')] for v in vs]))"
        ),
    );
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| (0..4).map(|i| x[i].as_str().unwrap().to_string()).collect::<Vec<_>>())
        .map(|x| (x[0].clone(), x[1].clone(), x[2].clone(), x[3].clone()))
        .collect()
}

/// tests/harness/fault_proxy.py in front of moto: (process, port, its call log).
fn fault_proxy(moto: &Moto, args: &[&str]) -> (Child, u16, PathBuf) {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = moto._dir.path().join(format!("proxy-{n}.jsonl"));
    let mut cmd = Command::new("python3");
    cmd.arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/harness/fault_proxy.py"))
        .args(["--port", "0", "--upstream", &moto.url(), "--log"])
        .arg(&log)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let (child, port) =
        spawn_on_own_port(&mut cmd, &moto._dir.path().join(format!("proxy-{n}.port")), "the fault proxy (tests/harness/fault_proxy.py)");
    (child, port, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_interrupted_half_way_converges_when_run_again() {
    let moto = Moto::start(None);
    let keys = ("testing", "testing");
    let dir = tempfile::tempdir().unwrap();
    let a = aws(&moto.url(), keys, spec(&[("name", "restore")]), dir.path()).await;
    a.ensure_network().await.unwrap();
    a.ensure_key(&public_key()).await.unwrap();
    let image = a.find_base_image().await.unwrap();
    let iid = a.create_instance(&image, &InstanceSpec { user_data: "#cloud-config\n" }).await.unwrap();
    let before = volumes(&moto, keys, "restore");
    let (old_data, ..) = before.iter().find(|v| v.1 == "data").cloned().unwrap();
    let snap = a.snapshot_data_disk("sgbox-pre-7.5").await.unwrap();

    // EBS still copies the snapshot (pending, three reads): nothing is created or stopped before
    // it completes, and the wait says how far it is.
    let (mut proxy, proxy_port, log) = fault_proxy(&moto, &["--pending-snapshots", "3"]);
    let slow = aws(&format!("http://127.0.0.1:{proxy_port}"), keys, spec(&[("name", "restore")]), dir.path()).await;
    let notes = std::sync::Mutex::new(Vec::new());
    slow.wait_snapshot(&snap, Duration::from_secs(120), &|l: &str| notes.lock().unwrap().push(l.to_string())).await.unwrap();
    let notes = notes.into_inner().unwrap();
    assert!(notes.len() >= 2 && notes.iter().all(|n| n.contains(&snap) && n.contains('%')), "progress was told: {notes:?}");
    let reads = std::fs::read_to_string(&log).unwrap().lines().filter(|l| l.contains("\"DescribeSnapshots\"")).count();
    assert!(reads >= 4, "polled until completed: {reads} reads");
    let _ = proxy.kill();
    let _ = proxy.wait();

    // The restore stops after StopInstances reached EC2 and never heard back.
    let (mut proxy, proxy_port, _log) = fault_proxy(&moto, &["--hang-after", "StopInstances"]);
    let through = aws(&format!("http://127.0.0.1:{proxy_port}"), keys, spec(&[("name", "restore")]), dir.path()).await;
    let cut = tokio::time::timeout(Duration::from_secs(15), through.restore_data_disk(&snap, Duration::from_secs(60))).await;
    assert!(cut.is_err(), "the restore was cut off: {cut:?}");
    let _ = proxy.kill();
    let _ = proxy.wait();
    let mid = volumes(&moto, keys, "restore");
    assert!(mid.iter().any(|v| v.1 == "data-restoring" && v.2 == snap), "the new volume was made before the box stopped: {mid:?}");

    // Run again: one restored volume, attached as the data disk; the old one kept aside.
    a.restore_data_disk(&snap, Duration::from_secs(60)).await.unwrap();
    let after = volumes(&moto, keys, "restore");
    let restored: Vec<_> = after.iter().filter(|v| v.2 == snap).collect();
    assert_eq!(restored.len(), 1, "no second volume from the snapshot: {after:?}");
    assert_eq!((restored[0].1.as_str(), restored[0].3.as_str()), ("data", iid.as_str()), "{after:?}");
    assert!(after.iter().any(|v| v.0 == old_data && v.1 == "data-before-restore" && v.3.is_empty()), "{after:?}");
    assert_eq!(a.state().await.unwrap(), crate::cloud::InstanceState::Running);
    let kinds: Vec<String> = a.resources().await.unwrap().into_iter().map(|r| r.kind).collect();
    assert!(kinds.contains(&"replaced data volume".to_string()) && kinds.contains(&"data snapshot".to_string()), "{kinds:?}");

    // down --delete-data takes the snapshot and both volumes.
    let left = a.destroy(true, Duration::from_secs(60)).await.unwrap();
    assert!(left.is_empty(), "{left:?}");
    assert!(volumes(&moto, keys, "restore").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_iam_policy_is_enough_and_every_action_in_it_is_needed() {
    let moto = Moto::start(Some(1));
    // The one free request: a subnet for the subnet check.
    let subnet = moto.py(("testing", "testing"), "print(json.dumps(ec2.describe_subnets()['Subnets'][0]['SubnetId']))");
    let subnet = subnet.as_str().unwrap().to_string();
    let url = moto.url();

    let keys = moto.user_with("sgbox", &policy::document(policy::For::Box));
    let dir = tempfile::tempdir().unwrap();
    lifecycle(&url, (&keys.0, &keys.1), "full", &subnet, dir.path()).await.expect("the whole life runs with exactly sgbox's policy");

    // Without any one action, the same life fails, refused by IAM.
    let mut not_needed = Vec::new();
    for (i, action) in policy::actions(policy::For::Box).into_iter().enumerate() {
        let keys = moto.user_with(&format!("without{i}"), &policy::document_without(policy::For::Box, Some(action)));
        let dir = tempfile::tempdir().unwrap();
        let name: &'static str = Box::leak(format!("v{i}").into_boxed_str());
        match lifecycle(&url, (&keys.0, &keys.1), name, &subnet, dir.path()).await {
            Err(e) if format!("{e:#}").contains("AccessDenied") || format!("{e:#}").contains("not authorized") => {}
            Err(e) => panic!("without {action}: failed, but not for IAM: {e:#}"),
            Ok(()) => not_needed.push(action),
        }
    }
    assert!(not_needed.is_empty(), "the policy allows actions sgbox's life never needs: {not_needed:?}");
}

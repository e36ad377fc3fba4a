//! `sgbox image build --cloud aws` against moto, through the fault proxy: the whole build (the
//! builder, the image, copies to two regions, IMDSv2, tags and deprecation on each, public only
//! with the flag) with nothing temporary left, also after a run killed at each step, a failed
//! bake, and Ctrl-C. moto never boots the builder, so tests/harness/play_builder.py plays its
//! part where a real one finishes its bake (its console line, then power-off); what moto does not
//! implement (GetImageBlockPublicAccessState, EnableImageDeprecation, a console that a bake
//! writes to) the proxy answers from a --play file. sgbox has no test-only code path.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::moto::{venv_bin, Moto, Proxy};
use crate::common::{run, sgbox, text};
use serde_json::Value;

const REGIONS: [&str; 3] = ["us-east-1", "us-west-2", "eu-west-1"];

fn venv_python() -> PathBuf {
    venv_bin("python")
}

struct Build {
    moto: Moto,
    state: tempfile::TempDir,
    play: PathBuf,
}

impl Build {
    fn new() -> Build {
        Build::on(Moto::start())
    }

    fn on(moto: Moto) -> Build {
        let state = tempfile::tempdir().unwrap();
        let play = state.path().join("play.json");
        let b = Build { moto, state, play };
        b.set_play(serde_json::json!({ "image_deprecation": true, "image_block_public_access": "unblocked" }));
        b
    }

    fn set_play(&self, mut v: Value) {
        // Keep the consoles already played.
        if let Ok(old) = std::fs::read_to_string(&self.play) {
            if let (Ok(old), Some(m)) = (serde_json::from_str::<Value>(&old), v.as_object_mut()) {
                if let Some(c) = old.get("console") {
                    m.entry("console").or_insert(c.clone());
                }
            }
        }
        std::fs::write(&self.play, v.to_string()).unwrap();
    }

    fn proxy(&self, hang_after: Option<&str>) -> Proxy {
        let play = self.play.display().to_string();
        Proxy::with_args(&self.moto, 0.0, hang_after, &["--play", &play])
    }

    fn cmd(&self, proxy: &Proxy, args: &[&str]) -> Command {
        let mut c = sgbox(self.state.path());
        self.moto.env(&mut c, &proxy.url());
        c.env("SGBOX_CACHE_DIR", self.state.path().join("cache"));
        c.args(["image", "build", "--cloud", "aws"]).args(args);
        c
    }

    /// The builder's part, once: in the background until a builder runs.
    fn play_builder(&self, outcome: &str) -> std::process::Child {
        self.play_builder_in(outcome, "us-east-1")
    }

    fn play_builder_in(&self, outcome: &str, region: &str) -> std::process::Child {
        Command::new(venv_python())
            .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/harness/play_builder.py"))
            .args(["--endpoint", &self.moto.url(), "--play", &self.play.display().to_string(), "--outcome", outcome, "--region", region])
            .env("AWS_ACCESS_KEY_ID", &self.moto.admin.0)
            .env("AWS_SECRET_ACCESS_KEY", &self.moto.admin.1)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the venv's python runs play_builder.py")
    }

    /// boto3's view of one region: sgbox's images, and anything temporary of a build left.
    fn region(&self, region: &str) -> Value {
        let script = format!(
            r#"
import boto3, json
ec2 = boto3.client('ec2', endpoint_url='{}', region_name='{region}', aws_access_key_id='{}', aws_secret_access_key='{}')
imgs = ec2.describe_images(Owners=['self'])['Images']
for i in imgs:
    i['LaunchPermissions'] = ec2.describe_image_attribute(ImageId=i['ImageId'], Attribute='launchPermission')['LaunchPermissions']
    snaps = [m['Ebs']['SnapshotId'] for m in i.get('BlockDeviceMappings', []) if 'Ebs' in m and 'SnapshotId' in m['Ebs']]
    i['Snapshots'] = ec2.describe_snapshots(SnapshotIds=snaps)['Snapshots'] if snaps else []
b = [{{'Name': 'tag-key', 'Values': ['sgbox:image-build']}}]
inst = [i for r in ec2.describe_instances(Filters=b)['Reservations'] for i in r['Instances'] if i['State']['Name'] != 'terminated']
sgs = ec2.describe_security_groups(Filters=b)['SecurityGroups']
# The builds' snapshots: tagged by sgbox, or made by CreateImage/CopyImage (moto's seeded AMIs
# have snapshots of their own).
snaps = [s for s in ec2.describe_snapshots(OwnerIds=['self'])['Snapshots']
         if any(t['Key'] == 'sgbox:managed' for t in s.get('Tags', [])) or 'Auto-created' not in s.get('Description', '')]
vols = ec2.describe_volumes(Filters=b)['Volumes']
keys = ec2.describe_key_pairs()['KeyPairs']
print(json.dumps({{'images': imgs, 'instances': inst, 'sgs': sgs, 'volumes': vols, 'keys': keys, 'snapshots': snaps}}, default=str))
"#,
            self.moto.url(),
            self.moto.admin.0,
            self.moto.admin.1
        );
        let out = Command::new(venv_python()).arg("-c").arg(&script).output().unwrap();
        assert!(out.status.success(), "boto3: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Nothing temporary anywhere; the images of each region.
    fn nothing_temporary(&self) -> Vec<Value> {
        let mut images = Vec::new();
        for r in REGIONS {
            let v = self.region(r);
            for k in ["instances", "sgs", "volumes", "keys"] {
                assert_eq!(v[k].as_array().map(Vec::len), Some(0), "{k} left in {r}: {:#}", v[k]);
            }
            images.extend(v["images"].as_array().unwrap().iter().map(|i| {
                let mut i = i.clone();
                i["Region"] = r.into();
                i
            }));
        }
        images
    }
}

fn tag(v: &Value, key: &str) -> Option<String> {
    v["Tags"].as_array()?.iter().find(|t| t["Key"] == key).and_then(|t| t["Value"].as_str()).map(str::to_string)
}

/// Every call of `action` the proxy saw (forwarded to moto or answered by it), with parameters.
fn calls(proxy: &Proxy, action: &str) -> Vec<Value> {
    std::fs::read_to_string(&proxy.log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["action"] == action && v["status"] == 200)
        .map(|v| v["params"].clone())
        .collect()
}

const MUTATING: [&str; 12] = [
    "CreateSecurityGroup",
    "RunInstances",
    "CreateImage",
    "CopyImage",
    "CreateTags",
    "ModifyImageAttribute",
    "EnableImageDeprecation",
    "TerminateInstances",
    "DeleteSecurityGroup",
    "DeregisterImage",
    "DeleteSnapshot",
    "StopInstances",
];

fn mutations(proxy: &Proxy) -> Vec<String> {
    proxy.calls().into_iter().filter(|(a, _, _)| MUTATING.contains(&a.as_str())).map(|(a, _, _)| a).collect()
}

fn wait_player(p: std::process::Child) -> Value {
    let out = p.wait_with_output().unwrap();
    assert!(out.status.success(), "play_builder: {}{}", text(&out.stdout), text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

const ARGS: [&str; 10] = ["--version", "7.5", "--region", "us-east-1", "--copy-to", "us-west-2,eu-west-1", "--output", "json", "--timeout", "3m"];

#[test]
fn image_build_bakes_copies_finishes_each_image_and_leaves_nothing_temporary() {
    let b = Build::new();
    let proxy = b.proxy(None);
    let player = b.play_builder("ok");
    let out = run(&mut b.cmd(&proxy, &ARGS));
    let played = wait_player(player);
    assert!(out.status.success(), "image build: {}", text(&out.stderr));
    let m: Value = serde_json::from_slice(&out.stdout).expect("one JSON manifest on stdout");
    assert_eq!(m["release"], "7.5.4453");
    assert_eq!(m["recipe"], played["recipe"], "the builder got the recipe it was built for");
    let ids: Vec<(String, String)> = m["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["region"].as_str().unwrap().to_string(), i["image_id"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(ids.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>(), REGIONS, "{m:#}");
    assert!(m["digests"]["sourcegraph-frontend-0"].as_str().unwrap().contains("@sha256:"), "{m:#}");

    // The bake's user-data: no key; every image of the release by digest; gzipped within EC2's
    // 16 KiB.
    assert!(played["user_data_gzip"] == true && played["user_data_bytes"].as_u64().is_some_and(|n| n < 16 * 1024), "{played:#}");
    let ud = played["user_data"].as_str().unwrap();
    assert!(ud.starts_with("#cloud-config") && !ud.contains("users:") && !ud.contains("ssh_authorized_keys"), "{ud}");
    assert_eq!(ud.matches("@sha256:").count(), m["digests"].as_object().unwrap().len(), "{ud}");

    // The builder: no key pair, no inbound rule, IMDSv2, an encrypted root; it stops itself.
    let run_instances = calls(&proxy, "RunInstances");
    assert_eq!(run_instances.len(), 1);
    let ri = &run_instances[0];
    assert!(ri.get("KeyName").is_none(), "no key pair: {ri:#}");
    assert_eq!(ri["MetadataOptions.HttpTokens"], "required", "{ri:#}");
    assert_eq!(ri["BlockDeviceMapping.1.Ebs.Encrypted"], "true", "{ri:#}");
    assert_eq!(ri["InstanceInitiatedShutdownBehavior"], "stop", "{ri:#}");
    assert!(calls(&proxy, "AuthorizeSecurityGroupIngress").is_empty(), "nothing inbound");
    // Besides its root, a blank data volume (made empty, no snapshot; deleted with the builder),
    // so that the image maps one for a launch without sgbox.
    assert_eq!(ri["BlockDeviceMapping.2.DeviceName"], "/dev/sdf", "{ri:#}");
    assert_eq!(ri["BlockDeviceMapping.2.Ebs.VolumeSize"], "250", "{ri:#}");
    assert_eq!(ri["BlockDeviceMapping.2.Ebs.DeleteOnTermination"], "true", "{ri:#}");
    assert_eq!(ri["BlockDeviceMapping.2.Ebs.Encrypted"], "true", "{ri:#}");
    assert!(ri.get("BlockDeviceMapping.2.Ebs.SnapshotId").is_none(), "{ri:#}");
    // The image's default configuration (a launch without user-data) travels with the bake.
    assert!(ud.contains("path: /etc/sgbox/image-default.cfg"), "{ud}");

    // Each image: finished in its region (tags on it and its snapshots, IMDSv2, deprecation),
    // private, its snapshots encrypted where EBS copies them so.
    let images = b.nothing_temporary();
    assert_eq!(images.len(), 3, "one image per region: {images:#?}");
    let imds = calls(&proxy, "ModifyImageAttribute");
    let deprecations = calls(&proxy, "EnableImageDeprecation");
    for (region, id) in &ids {
        let img = images.iter().find(|i| i["ImageId"] == id.as_str() && i["Region"] == region.as_str()).unwrap_or_else(|| panic!("{id} in {region}"));
        assert_eq!(tag(img, "sgbox:recipe").as_deref(), m["recipe"].as_str());
        assert_eq!(tag(img, "sgbox:release").as_deref(), Some("7.5.4453"));
        assert_eq!(tag(img, "sgbox:complete").as_deref(), Some("true"));
        assert_eq!(img["LaunchPermissions"], Value::Array(vec![]), "private: {img:#}");
        let devices: Vec<&str> = img["BlockDeviceMappings"].as_array().unwrap().iter().filter_map(|b| b["DeviceName"].as_str()).collect();
        assert!(devices.len() == 2 && devices.contains(&"/dev/sdf"), "the root and the blank data volume: {img:#}");
        assert_eq!(img["Snapshots"].as_array().map(Vec::len), Some(2), "{img:#}");
        for s in img["Snapshots"].as_array().unwrap() {
            assert_eq!(tag(s, "sgbox:recipe").as_deref(), m["recipe"].as_str(), "snapshot tagged: {s:#}");
        }
        assert!(imds.iter().any(|p| p["ImageId"] == id.as_str() && p["ImdsSupport.Value"] == "v2.0"), "IMDSv2 on {id}: {imds:#?}");
        assert!(deprecations.iter().any(|p| p["ImageId"] == id.as_str() && p["DeprecateAt"].as_str().is_some_and(|d| d.starts_with("20"))), "{id}");
    }
    let copies = calls(&proxy, "CopyImage");
    assert_eq!(copies.len(), 2);
    assert!(
        copies.iter().all(|c| c["SourceRegion"] == "us-east-1" && c["Encrypted"] == "true" && c["ClientToken"].as_str().is_some()),
        "{copies:#?}"
    );

    // A re-run for the same release and recipe finds every image and changes nothing.
    let proxy2 = b.proxy(None);
    let out = run(&mut b.cmd(&proxy2, &ARGS));
    assert!(out.status.success(), "re-run: {}", text(&out.stderr));
    let again: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(again["images"].as_array().unwrap().iter().all(|i| i["reused"] == true), "{again:#}");
    assert_eq!(mutations(&proxy2), Vec::<String>::new(), "a re-run mutates nothing");

    // --public where the account blocks public AMI sharing: refused before anything is made.
    b.set_play(serde_json::json!({ "image_deprecation": true, "image_block_public_access": "block-new-sharing" }));
    let proxy3 = b.proxy(None);
    let mut args = ARGS.to_vec();
    args.push("--public");
    let out = run(&mut b.cmd(&proxy3, &args));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--public") && err.contains("block") && err.contains("fix:"), "{err}");
    assert_eq!(mutations(&proxy3), Vec::<String>::new(), "nothing was made");

    // The pipeline's way: an --unencrypted (public-safe, still private) image is built and tested,
    // then --public finds that very image and only shares it, in every region.
    b.set_play(serde_json::json!({ "image_deprecation": true, "image_block_public_access": "unblocked" }));
    let proxy4 = b.proxy(None);
    let player = b.play_builder("ok");
    let mut unenc = ARGS.to_vec();
    unenc.push("--unencrypted");
    let out = run(&mut b.cmd(&proxy4, &unenc));
    wait_player(player);
    assert!(out.status.success(), "unencrypted build: {}", text(&out.stderr));
    let u: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_ne!(u["recipe"], m["recipe"], "an unencrypted image is another image");
    assert!(u["images"].as_array().unwrap().iter().all(|i| i["public"] == false), "{u:#}");
    assert_eq!(calls(&proxy4, "RunInstances")[0]["BlockDeviceMapping.1.Ebs.Encrypted"], "false");
    assert!(calls(&proxy4, "CopyImage").iter().all(|c| c["Encrypted"] == "false"));
    let proxy5 = b.proxy(None);
    let out = run(&mut b.cmd(&proxy5, &args));
    assert!(out.status.success(), "public: {}", text(&out.stderr));
    let p: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(p["recipe"], u["recipe"], "--public finds the image --unencrypted built");
    assert!(p["images"].as_array().unwrap().iter().all(|i| i["public"] == true && i["reused"] == true), "{p:#}");
    assert!(calls(&proxy5, "RunInstances").is_empty() && calls(&proxy5, "CopyImage").is_empty(), "nothing built twice");
    let images = b.nothing_temporary();
    let public: Vec<&Value> = images.iter().filter(|i| i["LaunchPermissions"].to_string().contains("\"all\"")).collect();
    assert_eq!(public.len(), 3, "the public image in each region, the private ones still private: {images:#?}");
    assert!(public.iter().all(|i| tag(i, "sgbox:recipe").as_deref() == p["recipe"].as_str()));
    for i in &public {
        assert!(i["Snapshots"].as_array().unwrap().iter().all(|s| s["Encrypted"] == false), "public-safe snapshots: {i:#}");
    }

    // `up` boots the newest baked image of its release and leaves the image's data volume out
    // (NoDevice): the box has its root and the data volume sgbox made and attached, nothing else.
    let ours: Vec<Value> = images.iter().filter(|i| i["Region"] == "us-east-1").map(|i| i["ImageId"].clone()).collect();
    let proxy6 = b.proxy(None);
    let mut c = sgbox(b.state.path());
    b.moto.env(&mut c, &proxy6.url());
    c.args(["up", "--cloud", "aws", "--region", "us-east-1", "--name", "baked", "--ssh-cidr", "203.0.113.7/32", "--version", "7.5"]).args([
        "--no-wait",
        "--yes",
        "--output",
        "json",
    ]);
    let out = run(&mut c);
    assert!(out.status.success(), "up from the baked image: {}", text(&out.stderr));
    let ri = calls(&proxy6, "RunInstances").pop().expect("up ran an instance");
    assert!(ours.contains(&ri["ImageId"]), "a baked image of 7.5: {ri:#}");
    let left_out =
        (1..=4).any(|n| ri[format!("BlockDeviceMapping.{n}.DeviceName")] == "/dev/sdf" && ri[format!("BlockDeviceMapping.{n}.NoDevice")] == "");
    assert!(left_out, "the image's data volume is left out: {ri:#}");
    let attached = b.moto.py(
        "f = [{'Name': 'tag:sgbox:deployment', 'Values': ['baked']}]\ninst = [i for r in ec2.describe_instances(Filters=f)['Reservations'] for i in r['Instances'] if i['State']['Name'] != 'terminated']\nvols = ec2.describe_volumes(Filters=[{'Name': 'attachment.instance-id', 'Values': [inst[0]['InstanceId']]}])['Volumes']\nprint(json.dumps(vols, default=str))",
    );
    let roles: Vec<String> = attached.as_array().unwrap().iter().map(|v| tag(v, "sgbox:role").unwrap_or_else(|| "untagged".into())).collect();
    assert_eq!(roles.len(), 2, "root and data only: {attached:#}");
    assert!(roles.contains(&"root".to_string()) && roles.contains(&"data".to_string()), "{attached:#}");
}

#[test]
fn image_build_killed_at_each_step_or_failed_or_interrupted_leaves_nothing_temporary() {
    let b = Build::new();
    // Killed (-9) right after each step reached the cloud; a re-run finishes the same image.
    for action in ["CreateSecurityGroup", "RunInstances", "CreateImage", "CopyImage"] {
        let proxy = b.proxy(Some(action));
        let player = b.play_builder("ok");
        let mut child = b.cmd(&proxy, &ARGS).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let until = Instant::now() + Duration::from_secs(120);
        while !proxy.calls().iter().any(|(a, fwd, _)| a == action && *fwd) {
            assert!(child.try_wait().unwrap().is_none(), "{action}: the build ended before reaching it");
            assert!(Instant::now() < until, "{action} never called: {:?}", proxy.calls());
            std::thread::sleep(Duration::from_millis(50));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        drop(proxy);
        let _ = wait_player_or_kill(player);
        let proxy = b.proxy(None);
        let player = b.play_builder("ok");
        let out = run(&mut b.cmd(&proxy, &ARGS));
        let _ = wait_player_or_kill(player);
        assert!(out.status.success(), "re-run after a kill at {action}: {}", text(&out.stderr));
        let images = b.nothing_temporary();
        assert_eq!(images.len(), 3, "after a kill at {action}: one image per region: {images:#?}");
        assert!(images.iter().all(|i| tag(i, "sgbox:complete").as_deref() == Some("true")), "{images:#?}");
        // The next action starts from nothing: the images of this round are deregistered.
        for i in &images {
            let (r, id) = (i["Region"].as_str().unwrap(), i["ImageId"].as_str().unwrap());
            let script = format!(
                "import boto3\nec2 = boto3.client('ec2', endpoint_url='{}', region_name='{r}', aws_access_key_id='t', aws_secret_access_key='t')\nec2.deregister_image(ImageId='{id}')\n",
                b.moto.url()
            );
            assert!(Command::new(venv_python()).arg("-c").arg(script).status().unwrap().success());
        }
    }

    // A bake that fails: exit 1 naming the step, the builder gone, no image.
    let proxy = b.proxy(None);
    let player = b.play_builder("failed:pull:sourcegraph-frontend-0");
    let out = run(&mut b.cmd(&proxy, &ARGS));
    wait_player(player);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("pull:sourcegraph-frontend-0") && err.contains("sgbox-bake: failed"), "the step and the console: {err}");
    assert!(b.nothing_temporary().is_empty(), "no image from a failed bake");
    assert!(calls(&proxy, "CreateImage").is_empty());

    // Ctrl-C while the builder bakes: the builder and its group are removed before sgbox exits.
    let proxy = b.proxy(None);
    let mut child = b.cmd(&proxy, &ARGS).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let until = Instant::now() + Duration::from_secs(120);
    while !proxy.calls().iter().any(|(a, _, _)| a == "RunInstances") {
        assert!(Instant::now() < until && child.try_wait().unwrap().is_none(), "the builder never launched");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert!(b.nothing_temporary().is_empty(), "nothing left after Ctrl-C: {err}");
    assert_eq!(calls(&proxy, "TerminateInstances").len(), 1, "{err}");
}

/// The player's result if it played; else (no builder ran for it: the build had one already, or
/// was killed before launching one) it is stopped. It finds a running builder within a poll.
fn wait_player_or_kill(mut p: std::process::Child) -> Option<Value> {
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        if p.try_wait().unwrap().is_some() {
            let out = p.wait_with_output().unwrap();
            return serde_json::from_slice(&out.stdout).ok();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = p.kill();
    let _ = p.wait();
    None
}

#[test]
fn image_build_bad_input_exits_2_and_creates_nothing() {
    let b = Build::new();
    let proxy = b.proxy(None);
    let cases: [(&[&str], &str); 4] = [
        (&["--version", "9.9.9", "--region", "us-east-1"], "--version"),
        (&["--version", "7.5", "--region", "mars-east-1"], "--region"),
        (&["--version", "7.5", "--region", "us-east-1", "--copy-to", "eu-nowhere-9"], "--copy-to"),
        (&["--version", "7.5", "--region", "us-east-1", "--out", "/tmp/x"], "--out"),
    ];
    for (args, field) in cases {
        let out = run(&mut b.cmd(&proxy, args));
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(field) && err.contains("fix:"), "{args:?} names {field}: {err}");
    }
    assert_eq!(mutations(&proxy), Vec::<String>::new());
    assert!(b.nothing_temporary().is_empty());
    assert!(
        !Path::new(&b.state.path().join("cache/image-builds")).exists()
            || std::fs::read_dir(b.state.path().join("cache/image-builds")).unwrap().next().is_none()
    );

    // The dry run: the plan and the bake user-data, nothing made.
    let out = run(&mut b.cmd(&proxy, &["--version", "7.5", "--region", "us-east-1", "--copy-to", "eu-west-1", "--dry-run", "--output", "json"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["spec"]["copy_to"], serde_json::json!(["eu-west-1"]));
    assert!(v["spec"]["bake_user_data"].as_str().unwrap().starts_with("#cloud-config"));
    assert_eq!(mutations(&proxy), Vec::<String>::new());
}

/// The IAM policy sgbox ships for image builds (`sgbox iam-policy --for image-build`), proven
/// against moto enforcing it: a user holding exactly it builds, copies and publishes an image, and
/// a failed build's cleanup (the unfinished image deregistered, its snapshots deleted) runs too;
/// between them every action of the policy is used, and none is refused. (The calls the fault
/// proxy plays are authorized by moto first.) A user without CreateImage fails and leaves nothing.
#[test]
fn image_build_runs_with_exactly_its_iam_policy_and_uses_all_of_it() {
    let b = Build::on(Moto::start_enforcing_iam());
    let out = run(sgbox(b.state.path()).args(["iam-policy", "--cloud", "aws", "--for", "image-build"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let policy: Vec<String> = doc["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["Action"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().split(':').nth(1).unwrap().to_string()))
        .collect();
    let user = b.moto.user_with("image-pipeline", &doc);
    let as_user = |c: &mut Command| {
        c.env("AWS_ACCESS_KEY_ID", &user.0).env("AWS_SECRET_ACCESS_KEY", &user.1);
    };
    let refused = |proxy: &Proxy| -> Vec<String> {
        proxy.calls().into_iter().filter(|(_, _, st)| *st == 401 || *st == 403).map(|(a, _, st)| format!("{a} ({st})")).collect()
    };
    let mut used = std::collections::BTreeSet::new();

    // The pipeline's build: an image, a copy, both published.
    let proxy = b.proxy(None);
    let player = b.play_builder("ok");
    let mut cmd = b.cmd(
        &proxy,
        &["--version", "7.5", "--region", "us-east-1", "--copy-to", "us-west-2", "--unencrypted", "--public", "--output", "json", "--timeout", "3m"],
    );
    as_user(&mut cmd);
    let out = run(&mut cmd);
    let _ = wait_player_or_kill(player);
    assert!(out.status.success(), "image build with exactly the policy: {}", text(&out.stderr));
    assert_eq!(refused(&proxy), Vec::<String>::new());
    let m: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(m["images"].as_array().unwrap().iter().all(|i| i["public"] == true), "{m:#}");
    used.extend(proxy.calls().into_iter().map(|(a, _, _)| a));

    // A build that fails after its image exists (the deprecation refused): the builder goes, the
    // unfinished image is deregistered and its snapshots deleted, with the same user.
    b.set_play(serde_json::json!({ "image_deprecation": true, "image_block_public_access": "unblocked", "errors": { "EnableImageDeprecation": "InvalidParameterValue" } }));
    let proxy = b.proxy(None);
    let player = b.play_builder_in("ok", "eu-west-1");
    let mut cmd = b.cmd(&proxy, &["--version", "7.5", "--region", "eu-west-1", "--output", "json", "--timeout", "3m"]);
    as_user(&mut cmd);
    let out = run(&mut cmd);
    let _ = wait_player_or_kill(player);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("EnableImageDeprecation"), "{err}");
    assert_eq!(refused(&proxy), Vec::<String>::new());
    let eu = b.region("eu-west-1");
    for k in ["images", "instances", "sgs", "snapshots"] {
        assert_eq!(eu[k].as_array().map(Vec::len), Some(0), "{k} left after the failed build: {:#}", eu[k]);
    }
    assert!(proxy.calls().iter().any(|(a, _, st)| a == "DeleteSnapshot" && *st == 200), "the image had snapshots to delete");
    used.extend(proxy.calls().into_iter().map(|(a, _, _)| a));
    let unused: Vec<&String> = policy.iter().filter(|a| !used.contains(*a)).collect();
    assert!(unused.is_empty(), "the image-build policy allows actions no build used: {unused:?}");

    // One action short (CreateImage): refused by IAM, exit 1, and the builder still removed.
    b.set_play(serde_json::json!({ "image_deprecation": true, "image_block_public_access": "unblocked" }));
    let mut short = doc.clone();
    for st in short["Statement"].as_array_mut().unwrap() {
        st["Action"].as_array_mut().unwrap().retain(|a| a != "ec2:CreateImage");
    }
    let weak = b.moto.user_with("no-create-image", &short);
    let proxy = b.proxy(None);
    let player = b.play_builder_in("ok", "us-west-2");
    let mut cmd = b.cmd(&proxy, &["--version", "7.5", "--region", "us-west-2", "--timeout", "3m"]);
    cmd.env("AWS_ACCESS_KEY_ID", &weak.0).env("AWS_SECRET_ACCESS_KEY", &weak.1);
    let out = run(&mut cmd);
    let _ = wait_player_or_kill(player);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("CreateImage"), "{err}");
    assert_eq!(refused(&proxy), vec!["CreateImage (403)".to_string()], "{err}");
    let west = b.region("us-west-2");
    for k in ["instances", "sgs"] {
        assert_eq!(west[k].as_array().map(Vec::len), Some(0), "{k} left after the refused build: {:#}", west[k]);
    }
}

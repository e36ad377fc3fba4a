//! `sgbox up | status | down --cloud aws` against a real moto server (EC2 + SSM API), reached
//! through the standard AWS_ENDPOINT_URL: no test-only code path in sgbox. Every claim is checked
//! with independent reads (boto3), not with sgbox's own output.

mod image;

use crate::common::moto::{Moto, Proxy, DEBIAN_AMI, OLD_DEBIAN_AMI};
use crate::common::{run, sgbox, text};
use serde_json::Value;

const CIDR: &str = "203.0.113.7/32";

fn aws(moto: &Moto, state: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut c = sgbox(state);
    moto.env(&mut c, &moto.url());
    c.args(args);
    run(&mut c)
}

fn up_args<'a>(name: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    with(name, "us-east-1", CIDR, extra)
}

fn with<'a>(name: &'a str, region: &'a str, cidr: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "up",
        "--cloud",
        "aws",
        "--region",
        region,
        "--name",
        name,
        "--ssh-cidr",
        cidr,
        "--version",
        "7.5",
        "--no-wait",
        "--yes",
        "--output",
        "json",
    ];
    a.extend_from_slice(extra);
    a
}

/// Everything tagged as deployment `name`, read with boto3.
fn inventory(moto: &Moto, name: &str) -> Value {
    moto.py(&format!(
        r#"
f = [{{'Name': 'tag:sgbox:deployment', 'Values': ['{name}']}}]
inst = [i for r in ec2.describe_instances(Filters=f)['Reservations'] for i in r['Instances'] if i['State']['Name'] != 'terminated']
vols = ec2.describe_volumes(Filters=f)['Volumes']
sgs = ec2.describe_security_groups(Filters=f)['SecurityGroups']
keys = ec2.describe_key_pairs(Filters=f)['KeyPairs']
eips = ec2.describe_addresses(Filters=f)['Addresses']
ud = {{}}
for i in inst:
    a = ec2.describe_instance_attribute(InstanceId=i['InstanceId'], Attribute='userData')
    ud[i['InstanceId']] = base64.b64decode(a['UserData']['Value']).decode()
print(json.dumps({{'instances': inst, 'volumes': vols, 'sgs': sgs, 'keys': keys, 'eips': eips, 'user_data': ud}}, default=str))
"#
    ))
}

fn tag(v: &Value, key: &str) -> Option<String> {
    v["Tags"].as_array()?.iter().find(|t| t["Key"] == key).and_then(|t| t["Value"].as_str()).map(str::to_string)
}

#[test]
fn up_creates_a_secure_box_once_and_down_keeps_the_data_volume() {
    let moto = Moto::start();
    let state = tempfile::tempdir().unwrap();
    let st = state.path();

    let out = aws(&moto, st, &up_args("box1", &[]));
    assert!(out.status.success(), "up: {}\n{}", text(&out.stderr), moto.log().lines().rev().take(20).collect::<Vec<_>>().join("\n"));
    let up: Value = serde_json::from_slice(&out.stdout).unwrap();
    let inv = inventory(&moto, "box1");

    // One of each, all tagged.
    let insts = inv["instances"].as_array().unwrap();
    assert_eq!(insts.len(), 1, "{inv:#}");
    let i = &insts[0];
    assert_eq!(up["instance_id"], i["InstanceId"]);
    assert_eq!(i["ImageId"], DEBIAN_AMI, "newest Debian 13 AMI by Debian's owner id");
    assert_eq!(i["InstanceType"], "m6a.2xlarge");
    assert_eq!(i["MetadataOptions"]["HttpTokens"], "required", "IMDSv2 required");
    for list in ["sgs", "keys", "eips"] {
        assert_eq!(inv[list].as_array().unwrap().len(), 1, "{list}: {inv:#}");
    }
    for r in [i, &inv["sgs"][0], &inv["keys"][0], &inv["eips"][0]] {
        assert_eq!(tag(r, "sgbox:managed").as_deref(), Some("true"), "{r}");
    }

    // Volumes: encrypted gp3; the data volume survives termination and is attached here.
    let vols = inv["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 2, "root + data: {inv:#}");
    for v in vols {
        assert_eq!(v["Encrypted"], true, "{v}");
        assert_eq!(v["VolumeType"], "gp3", "{v}");
    }
    let data = vols.iter().find(|v| tag(v, "sgbox:role").as_deref() == Some("data")).expect("data volume");
    assert_eq!(data["Size"], 250);
    assert_eq!(data["Attachments"][0]["InstanceId"], i["InstanceId"]);
    // Kept on termination: the instance's mapping for it says so (and `down` below proves it).
    let mapping =
        i["BlockDeviceMappings"].as_array().unwrap().iter().find(|m| m["Ebs"]["VolumeId"] == data["VolumeId"]).cloned().expect("data volume mapped");
    assert_eq!(mapping["Ebs"]["DeleteOnTermination"], false, "{mapping}");
    assert_eq!(mapping["DeviceName"], "/dev/sdf");

    // Firewall: 22 only from the configured CIDR, and 80/443 from it too (a site nobody has
    // claimed is never open to the world), nothing else.
    let perms = inv["sgs"][0]["IpPermissions"].as_array().unwrap();
    let mut rules: Vec<(i64, Vec<String>)> = perms
        .iter()
        .map(|p| {
            (p["FromPort"].as_i64().unwrap(), p["IpRanges"].as_array().unwrap().iter().map(|r| r["CidrIp"].as_str().unwrap().to_string()).collect())
        })
        .collect();
    rules.sort();
    assert_eq!(rules, vec![(22, vec![CIDR.to_string()]), (80, vec![CIDR.to_string()]), (443, vec![CIDR.to_string()])]);

    // The Elastic IP is the box's address.
    assert_eq!(inv["eips"][0]["InstanceId"], i["InstanceId"]);
    assert_eq!(up["url"], format!("http://{}", inv["eips"][0]["PublicIp"].as_str().unwrap()));

    // The user-data is exactly what `render` writes for the same settings.
    let out_dir = st.join("render");
    let r = run(sgbox(st).args([
        "render",
        "--cloud",
        "aws",
        "--region",
        "us-east-1",
        "--name",
        "box1",
        "--ssh-cidr",
        CIDR,
        "--version",
        "7.5",
        "--out",
        out_dir.to_str().unwrap(),
    ]));
    assert!(r.status.success(), "{}", text(&r.stderr));
    let rendered = std::fs::read_to_string(out_dir.join("user-data")).unwrap();
    assert_eq!(inv["user_data"][i["InstanceId"].as_str().unwrap()].as_str().unwrap(), rendered);

    // Re-running converges: still one of each, the same ids.
    let out = aws(&moto, st, &up_args("box1", &[]));
    assert!(out.status.success(), "re-run: {}", text(&out.stderr));
    let again = inventory(&moto, "box1");
    for list in ["instances", "volumes", "sgs", "keys", "eips"] {
        assert_eq!(again[list].as_array().unwrap().len(), inv[list].as_array().unwrap().len(), "{list} after re-run");
    }
    assert_eq!(again["instances"][0]["InstanceId"], i["InstanceId"]);

    // status reads the cloud.
    let s = aws(&moto, st, &["status", "--name", "box1", "--output", "json"]);
    assert!(s.status.success(), "{}", text(&s.stderr));
    let sv: Value = serde_json::from_slice(&s.stdout).unwrap();
    assert_eq!(sv["state"], "running");
    assert_eq!(sv["url"], up["url"]);

    // plan --live sees what exists, through read-only calls only.
    let proxy = Proxy::start(&moto, 0.0, None);
    let mut c = sgbox(st);
    moto.env(&mut c, &proxy.url());
    let p = run(c.args(["plan", "--cloud", "aws", "--region", "us-east-1", "--name", "box1", "--ssh-cidr", CIDR, "--live", "--output", "json"]));
    assert!(p.status.success(), "plan --live: {}", text(&p.stderr));
    let pv: Value = serde_json::from_slice(&p.stdout).unwrap();
    let existing: Vec<&str> = pv["existing"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert!(existing.contains(&i["InstanceId"].as_str().unwrap()), "{pv:#}");
    assert!(pv["monthly_cost_usd"]["total"].as_f64().unwrap() > 200.0, "{pv:#}");
    let calls = proxy.calls();
    assert!(
        !calls.is_empty() && calls.iter().all(|(a, _, _)| a.starts_with("Describe") || a.starts_with("Get")),
        "plan made a non-read call: {calls:?}"
    );
    drop(proxy);

    // Down keeps the data volume (available, still tagged) and deletes the rest.
    let out = aws(&moto, st, &["down", "--name", "box1", "--yes", "--output", "json"]);
    assert!(out.status.success(), "down: {}", text(&out.stderr));
    let after = inventory(&moto, "box1");
    assert!(after["instances"].as_array().unwrap().is_empty(), "{after:#}");
    for list in ["sgs", "keys", "eips"] {
        assert!(after[list].as_array().unwrap().is_empty(), "{list} left: {after:#}");
    }
    let left: Vec<&Value> = after["volumes"].as_array().unwrap().iter().collect();
    assert_eq!(left.len(), 1, "only the data volume stays: {after:#}");
    assert_eq!(left[0]["VolumeId"], data["VolumeId"]);
    assert_eq!(left[0]["State"], "available");
}

#[test]
fn down_without_local_state_deletes_only_what_is_tagged() {
    let moto = Moto::start();
    let state = tempfile::tempdir().unwrap();
    let st = state.path();
    let out = aws(&moto, st, &up_args("lost", &[]));
    assert!(out.status.success(), "up: {}", text(&out.stderr));
    let out = aws(&moto, st, &up_args("other", &[]));
    assert!(out.status.success(), "up other: {}", text(&out.stderr));
    // Untagged decoys that look alike.
    let decoys = moto.py(&format!(
        r#"
vpc = ec2.describe_vpcs(Filters=[{{'Name': 'is-default', 'Values': ['true']}}])['Vpcs'][0]['VpcId']
sg = ec2.create_security_group(GroupName='lost-decoy', Description='not sgbox', VpcId=vpc)['GroupId']
vol = ec2.create_volume(AvailabilityZone='us-east-1a', Size=250, VolumeType='gp3')['VolumeId']
ec2.create_key_pair(KeyName='lost-sgbox-decoy')
inst = ec2.run_instances(ImageId='{DEBIAN_AMI}', InstanceType='m6a.2xlarge', MinCount=1, MaxCount=1)['Instances'][0]['InstanceId']
print(json.dumps({{'sg': sg, 'vol': vol, 'inst': inst}}))
"#
    ));
    std::fs::remove_dir_all(st.join("lost")).unwrap();

    let out = aws(&moto, st, &["down", "--name", "lost", "--yes", "--output", "json"]);
    assert_eq!(out.status.code(), Some(2), "without a record, down asks for the cloud: {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--cloud"), "{}", text(&out.stderr));

    let out = aws(&moto, st, &["down", "--name", "lost", "--cloud", "aws", "--region", "us-east-1", "--delete-data", "--yes", "--output", "json"]);
    assert!(out.status.success(), "down: {}", text(&out.stderr));
    let gone = inventory(&moto, "lost");
    for list in ["instances", "volumes", "sgs", "keys", "eips"] {
        assert!(gone[list].as_array().unwrap().is_empty(), "{list} left: {gone:#}");
    }
    // Decoys and the other deployment are untouched.
    let still = moto.py(&format!(
        r#"
sg = ec2.describe_security_groups(GroupIds=['{sg}'])['SecurityGroups']
vol = ec2.describe_volumes(VolumeIds=['{vol}'])['Volumes']
key = ec2.describe_key_pairs(KeyNames=['lost-sgbox-decoy'])['KeyPairs']
inst = [i['State']['Name'] for r in ec2.describe_instances(InstanceIds=['{inst}'])['Reservations'] for i in r['Instances']]
print(json.dumps({{'sg': len(sg), 'vol': len(vol), 'key': len(key), 'inst': inst}}))
"#,
        sg = decoys["sg"].as_str().unwrap(),
        vol = decoys["vol"].as_str().unwrap(),
        inst = decoys["inst"].as_str().unwrap()
    ));
    assert_eq!(still, serde_json::json!({"sg": 1, "vol": 1, "key": 1, "inst": ["running"]}));
    let other = inventory(&moto, "other");
    assert_eq!(other["instances"].as_array().unwrap().len(), 1, "the other deployment is untouched");
}

#[test]
fn bad_input_exits_2_and_creates_nothing() {
    let moto = Moto::start();
    let state = tempfile::tempdir().unwrap();
    let st = state.path();
    for (args, field) in [
        (with("bad", "mars-north-1", CIDR, &[]), "region"),
        (with("bad", "us-east-1", "10.0.0.300/8", &[]), "ssh-cidr"),
        (with("bad", "us-east-1", "0.0.0.0/0", &[]), "ssh-cidr"),
        (up_args("bad", &["--instance-type", "m6a.hyperlarge"]), "instance-type"),
        (up_args("bad", &["--image-id", "ami-0123456789abcdef0"]), "image-id"),
        (up_args("bad", &["--image-id", "debian13"]), "image-id"),
        (up_args("bad", &["--subnet-id", "subnet-0123456789abcdef0"]), "subnet-id"),
    ] {
        let out = aws(&moto, st, &args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(field) && err.contains("fix:"), "{args:?}: {err}");
    }
    let inv = inventory(&moto, "bad");
    for list in ["instances", "volumes", "sgs", "keys", "eips"] {
        assert!(inv[list].as_array().unwrap().is_empty(), "{list} created: {inv:#}");
    }
    assert!(!st.join("bad").exists(), "no state written");

    // An override that would take the user-data past EC2's 16 KiB: refused before anything is
    // made (random text, which gzip cannot shrink much; 7,800 bytes is under the file's own limit).
    let big = st.join("big-override.yaml");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noise: String = (0..7800)
        .map(|_| {
            // xorshift64: noise gzip cannot shrink below 6 bits a character.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[(x >> 58) as usize])
        })
        .collect();
    std::fs::write(&big, format!("services: {{}}\n# {noise}\n")).unwrap();
    let out = aws(&moto, st, &up_args("big", &["--compose-override", big.to_str().unwrap()]));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("compose-override") && err.contains("EC2 accepts 16384") && err.contains("fix:"), "{err}");
    let inv = inventory(&moto, "big");
    for list in ["instances", "volumes", "sgs", "keys", "eips"] {
        assert!(inv[list].as_array().unwrap().is_empty(), "{list} created: {inv:#}");
    }
    assert!(!st.join("big").join("deployment.json").exists(), "no record written");
}

fn one_of_each(moto: &Moto, name: &str) {
    let inv = inventory(moto, name);
    let n = |k: &str| inv[k].as_array().unwrap().len();
    assert_eq!((n("instances"), n("volumes"), n("sgs"), n("keys"), n("eips")), (1, 2, 1, 1, 1), "{name}: {inv:#}");
    assert_eq!(inv["eips"][0]["InstanceId"], inv["instances"][0]["InstanceId"], "{name}: address associated");
    let data = inv["volumes"].as_array().unwrap().iter().find(|v| tag(v, "sgbox:role").as_deref() == Some("data")).cloned().unwrap();
    assert_eq!(data["Attachments"][0]["InstanceId"], inv["instances"][0]["InstanceId"], "{name}: data attached");
}

const MUTATING_PREFIXES: [&str; 12] =
    ["Create", "Run", "Import", "Allocate", "Associate", "Attach", "Authorize", "Terminate", "Delete", "Release", "Disassociate", "Modify"];

#[test]
fn up_killed_after_each_create_converges_on_rerun() {
    let moto = Moto::start();
    let state = tempfile::tempdir().unwrap();
    let st = state.path();
    let steps = [
        "CreateSecurityGroup",
        "AuthorizeSecurityGroupIngress",
        "ImportKeyPair",
        "RunInstances",
        "CreateVolume",
        "AttachVolume",
        "AllocateAddress",
        "AssociateAddress",
    ];
    for (i, action) in steps.iter().enumerate() {
        let name = format!("kill{i}");
        let proxy = Proxy::start(&moto, 0.0, Some(action));
        let mut c = sgbox(st);
        moto.env(&mut c, &proxy.url());
        c.args(up_args(&name, &[])).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        let mut child = c.spawn().unwrap();
        let until = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while !proxy.calls().iter().any(|(a, fwd, _)| a == action && *fwd) {
            assert!(child.try_wait().unwrap().is_none(), "{action}: up ended before reaching it");
            assert!(std::time::Instant::now() < until, "{action} never called: {:?}", proxy.calls());
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        // The cloud changed; sgbox never heard back. kill -9.
        child.kill().unwrap();
        child.wait().unwrap();
        drop(proxy);
        let out = aws(&moto, st, &up_args(&name, &[]));
        assert!(out.status.success(), "re-run after kill at {action}: {}", text(&out.stderr));
        one_of_each(&moto, &name);
    }
}

#[test]
fn up_succeeds_through_throttling_and_a_rerun_mutates_nothing() {
    let moto = Moto::start();
    let state = tempfile::tempdir().unwrap();
    let st = state.path();
    let proxy = Proxy::start(&moto, 0.3, None);
    let mut c = sgbox(st);
    moto.env(&mut c, &proxy.url());
    let out = run(c.args(up_args("throttled", &[])));
    let calls = proxy.calls();
    let throttled = calls.iter().filter(|c| !c.1).count();
    assert!(out.status.success(), "up through 30% throttling ({throttled} of {} calls throttled): {}", calls.len(), text(&out.stderr));
    assert!(throttled >= 3, "the proxy really throttled: {calls:?}");
    one_of_each(&moto, "throttled");
    drop(proxy);

    let proxy = Proxy::start(&moto, 0.0, None);
    let mut c = sgbox(st);
    moto.env(&mut c, &proxy.url());
    let out = run(c.args(up_args("throttled", &[])));
    assert!(out.status.success(), "re-run: {}", text(&out.stderr));
    let mutating: Vec<String> = proxy.calls().into_iter().map(|c| c.0).filter(|a| MUTATING_PREFIXES.iter().any(|p| a.starts_with(p))).collect();
    assert!(mutating.is_empty(), "a converged re-run made mutating calls: {mutating:?}");
    one_of_each(&moto, "throttled");
}

#[test]
fn image_and_subnet_can_be_chosen() {
    let moto = Moto::start();
    let state = tempfile::tempdir().unwrap();
    let subnet = moto.py("print(json.dumps(ec2.describe_subnets()['Subnets'][-1]['SubnetId']))");
    let subnet = subnet.as_str().unwrap();
    let out = aws(&moto, state.path(), &up_args("pick", &["--image-id", OLD_DEBIAN_AMI, "--subnet-id", subnet]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let inv = inventory(&moto, "pick");
    assert_eq!(inv["instances"][0]["ImageId"], OLD_DEBIAN_AMI);
    assert_eq!(inv["instances"][0]["SubnetId"], subnet);
    // The choices are part of the deployment's settings, so `plan --print-config` round-trips them.
    let cfg = run(sgbox(state.path()).args(["plan", "--cloud", "aws", "--image-id", OLD_DEBIAN_AMI, "--subnet-id", subnet, "--print-config"]));
    let t = text(&cfg.stdout);
    assert!(t.contains(&format!("image-id = \"{OLD_DEBIAN_AMI}\"")) && t.contains(&format!("subnet-id = \"{subnet}\"")), "{t}");
}

#[test]
fn the_zone_places_the_box_and_status_shows_its_own_address() {
    let moto = Moto::start();
    let state = tempfile::tempdir().unwrap();
    let st = state.path();
    let out = aws(&moto, st, &up_args("zoned", &["--zone", "us-east-1c"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let inv = inventory(&moto, "zoned");
    assert_eq!(inv["instances"][0]["Placement"]["AvailabilityZone"], "us-east-1c", "{inv:#}");
    let data = inv["volumes"].as_array().unwrap().iter().find(|v| tag(v, "sgbox:role").as_deref() == Some("data")).unwrap();
    assert_eq!(data["AvailabilityZone"], "us-east-1c", "the data volume is in the instance's zone");
    // `status` prints the box's address (its Elastic IP), not the local box's 127.0.0.1.
    let ip = inv["eips"][0]["PublicIp"].as_str().unwrap().to_string();
    let out = aws(&moto, st, &["status", "--name", "zoned"]);
    let o = text(&out.stdout);
    assert!(o.contains(&format!("({ip}:22)")), "{o}\n{}", text(&out.stderr));
}

#[test]
fn a_half_done_restore_volume_is_listed_and_deleted_with_the_data() {
    let moto = Moto::start();
    let state = tempfile::tempdir().unwrap();
    let st = state.path();
    let out = aws(&moto, st, &up_args("half", &[]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    // What a restore interrupted between its CreateVolume and the swap leaves behind.
    let vol = moto.py(r#"
t = [{'Key': 'sgbox:deployment', 'Value': 'half'}, {'Key': 'sgbox:managed', 'Value': 'true'}, {'Key': 'sgbox:role', 'Value': 'data-restoring'}]
v = ec2.create_volume(AvailabilityZone='us-east-1a', Size=250, VolumeType='gp3', TagSpecifications=[{'ResourceType': 'volume', 'Tags': t}])
print(json.dumps(v['VolumeId']))
"#);
    let vol = vol.as_str().unwrap();
    let out = aws(&moto, st, &["status", "--name", "half", "--output", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let listed = v["resources"].as_array().into_iter().flatten().any(|r| r["id"] == vol && r["kept_by_default"] == true);
    assert!(listed, "status lists what down --delete-data deletes: {v:#}");
    let out = aws(&moto, st, &["down", "--name", "half", "--delete-data", "--yes", "--output", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let d: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(d["deleted"].as_array().unwrap().iter().any(|r| r["id"] == vol), "{d:#}");
    assert!(inventory(&moto, "half")["volumes"].as_array().unwrap().is_empty());
}

fn security_rules(moto: &Moto, name: &str) -> Vec<(i64, String)> {
    let inv = inventory(moto, name);
    let mut rules: Vec<(i64, String)> = inv["sgs"][0]["IpPermissions"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            let port = p["FromPort"].as_i64().unwrap();
            let v4 =
                p["IpRanges"].as_array().cloned().unwrap_or_default().into_iter().map(move |r| (port, r["CidrIp"].as_str().unwrap().to_string()));
            let v6 =
                p["Ipv6Ranges"].as_array().cloned().unwrap_or_default().into_iter().map(move |r| (port, r["CidrIpv6"].as_str().unwrap().to_string()));
            v4.chain(v6)
        })
        .collect();
    rules.sort();
    rules
}

#[test]
fn up_after_down_makes_a_new_instance_in_the_kept_volumes_zone() {
    let moto = Moto::start();
    let state = tempfile::tempdir().unwrap();
    let st = state.path();
    let proxy = Proxy::start(&moto, 0.0, None);
    let mut c = sgbox(st);
    moto.env(&mut c, &proxy.url());
    let out = run(c.args(up_args("again", &["--zone", "us-east-1c"])));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let first = proxy.params("RunInstances");
    assert_eq!(first.len(), 1);
    let token1 = first[0]["ClientToken"].as_str().expect("RunInstances sends a ClientToken").to_string();
    let data =
        inventory(&moto, "again")["volumes"].as_array().unwrap().iter().find(|v| tag(v, "sgbox:role").as_deref() == Some("data")).cloned().unwrap();
    assert_eq!(data["AvailabilityZone"], "us-east-1c");

    let out = aws(&moto, st, &["down", "--name", "again", "--yes", "--output", "json"]);
    assert!(out.status.success(), "down: {}", text(&out.stderr));

    // Another zone than the kept volume's: refused before anything is created (EC2 would refuse
    // the attach on every re-run; moto allows it, so the rule is asserted here).
    let out = aws(&moto, st, &up_args("again", &["--zone", "us-east-1a"]));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("zone") && err.contains("us-east-1c") && err.contains(data["VolumeId"].as_str().unwrap()), "{err}");
    assert!(inventory(&moto, "again")["instances"].as_array().unwrap().is_empty(), "nothing created");
    assert!(inventory(&moto, "again")["sgs"].as_array().unwrap().is_empty(), "nothing created");

    // The kept volume holds 7.5's databases (its tag says so): `up` of another release is
    // refused before anything is created, with the way there (`up` of its release, `upgrade`).
    assert_eq!(tag(&data, "sgbox:release").as_deref(), Some("7.5.4453"), "{data:#}");
    let mut older = up_args("again", &[]);
    *older.iter_mut().find(|a| **a == "7.5").unwrap() = "7.4";
    let out = aws(&moto, st, &older);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains(data["VolumeId"].as_str().unwrap())
            && err.contains("holds Sourcegraph 7.5.4453's databases")
            && err.contains("sgbox up --name again --version 7.5.4453`, then `sgbox upgrade --name again --to 7.4.0 --allow-downgrade`"),
        "{err}"
    );
    let inv = inventory(&moto, "again");
    assert!(inv["instances"].as_array().unwrap().is_empty() && inv["sgs"].as_array().unwrap().is_empty(), "nothing created: {inv:#}");
    assert!(!st.join("again").join("deployment.json").exists(), "no deployment recorded");

    // Without a zone, the kept volume decides it; the creation has a token of its own (real EC2
    // would hand back the terminated instance, or refuse, for the old one).
    let mut c = sgbox(st);
    moto.env(&mut c, &proxy.url());
    let out = run(c.args(up_args("again", &[])));
    assert!(out.status.success(), "up after down: {}", text(&out.stderr));
    let calls = proxy.params("RunInstances");
    assert_eq!(calls.len(), 2);
    let token2 = calls[1]["ClientToken"].as_str().unwrap();
    assert_ne!(token1, token2, "each creation gets its own ClientToken");
    let inv = inventory(&moto, "again");
    assert_eq!(inv["instances"][0]["Placement"]["AvailabilityZone"], "us-east-1c", "{inv:#}");
    one_of_each(&moto, "again");
    let now = inv["volumes"].as_array().unwrap().iter().find(|v| tag(v, "sgbox:role").as_deref() == Some("data")).cloned().unwrap();
    assert_eq!(now["VolumeId"], data["VolumeId"], "the kept data volume is the box's again");

    // An undersized type is refused with exit 2 before anything is created, unless asked for.
    let out = aws(&moto, st, &up_args("tiny", &["--instance-type", "t3.micro"]));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("instance-type") && err.contains("vCPU") && err.contains("--allow-undersized"), "{err}");
    assert!(inventory(&moto, "tiny")["sgs"].as_array().unwrap().is_empty());
    let out = aws(&moto, st, &up_args("tiny", &["--instance-type", "t3.micro", "--allow-undersized"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(inventory(&moto, "tiny")["instances"][0]["InstanceType"], "t3.micro");
}

#[test]
fn the_firewall_follows_the_settings_and_ipv6_goes_to_ipv6_ranges() {
    let moto = Moto::start();
    let state = tempfile::tempdir().unwrap();
    let st = state.path();
    let out = aws(&moto, st, &up_args("fw", &[]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(security_rules(&moto, "fw"), vec![(22, CIDR.into()), (80, CIDR.into()), (443, CIDR.into())]);

    // A new SSH CIDR (IPv6) replaces the old rules instead of adding to them.
    let v6 = "2001:db8:1234::/48";
    let out = aws(&moto, st, &with("fw", "us-east-1", v6, &[]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(security_rules(&moto, "fw"), vec![(22, v6.into()), (80, v6.into()), (443, v6.into())]);
    let inv = inventory(&moto, "fw");
    for p in inv["sgs"][0]["IpPermissions"].as_array().unwrap() {
        assert!(p["IpRanges"].as_array().is_none_or(|r| r.is_empty()), "IPv6 is not in IpRanges: {p}");
    }

    // Plain HTTP to the world needs its own loud flag; refused, nothing changes.
    let out = aws(&moto, st, &up_args("fw", &["--web-cidr", "0.0.0.0/0"]));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("web-cidr") && err.contains("--allow-plain-http-from-anywhere"), "{err}");
    assert_eq!(security_rules(&moto, "fw"), vec![(22, v6.into()), (80, v6.into()), (443, v6.into())]);
    let out = aws(&moto, st, &up_args("fw", &["--web-cidr", "0.0.0.0/0", "--allow-plain-http-from-anywhere"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("plain HTTP to the whole internet"), "said loudly: {}", text(&out.stderr));
    assert_eq!(security_rules(&moto, "fw"), vec![(22, CIDR.into()), (80, "0.0.0.0/0".into()), (443, "0.0.0.0/0".into())]);
}

#[test]
fn what_ec2_does_not_show_yet_is_waited_for_not_made_twice() {
    let moto = Moto::start();
    let state = tempfile::tempdir().unwrap();
    let st = state.path();
    // Every create's next two reads miss it (NotFound by id, empty by filter).
    let proxy = Proxy::with_args(&moto, 0.0, None, &["--lag"]);
    let mut c = sgbox(st);
    moto.env(&mut c, &proxy.url());
    let out = run(c.args(up_args("lag", &[])));
    assert!(out.status.success(), "up through eventual consistency: {}", text(&out.stderr));
    assert!(proxy.calls().iter().any(|(_, fwd, status)| !fwd && *status == 400), "the proxy really hid a new resource: {:?}", proxy.calls());
    one_of_each(&moto, "lag");
    drop(proxy);

    // Killed after its address was allocated and recorded; a quick re-run does not see the
    // address's tag yet. The recorded id is read instead of allocating a second one.
    let proxy = Proxy::start(&moto, 0.0, Some("AssociateAddress"));
    let mut c = sgbox(st);
    moto.env(&mut c, &proxy.url());
    c.args(up_args("eip", &[])).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    let mut child = c.spawn().unwrap();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !proxy.calls().iter().any(|(a, fwd, _)| a == "AssociateAddress" && *fwd) {
        assert!(child.try_wait().unwrap().is_none() && std::time::Instant::now() < until, "{:?}", proxy.calls());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    drop(proxy);
    let proxy = Proxy::with_args(&moto, 0.0, None, &["--stale", "address"]);
    let mut c = sgbox(st);
    moto.env(&mut c, &proxy.url());
    let out = run(c.args(up_args("eip", &[])));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let allocs = proxy.calls().iter().filter(|(a, _, _)| a == "AllocateAddress").count();
    assert_eq!(allocs, 0, "no second Elastic IP: {:?}", proxy.calls());
    one_of_each(&moto, "eip");

    // `down` releases every address of the deployment, not only the first it finds.
    moto.py(r#"
t = [{'Key': 'sgbox:deployment', 'Value': 'eip'}, {'Key': 'sgbox:managed', 'Value': 'true'}, {'Key': 'sgbox:role', 'Value': 'address'}]
ec2.allocate_address(Domain='vpc', TagSpecifications=[{'ResourceType': 'elastic-ip', 'Tags': t}])
print(json.dumps(1))
"#);
    assert_eq!(inventory(&moto, "eip")["eips"].as_array().unwrap().len(), 2);
    let out = aws(&moto, st, &["down", "--name", "eip", "--yes", "--output", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(inventory(&moto, "eip")["eips"].as_array().unwrap().is_empty(), "both released");
}

#[test]
fn another_account_is_refused_before_anything_is_deleted() {
    let moto = Moto::start();
    let state = tempfile::tempdir().unwrap();
    let st = state.path();
    let out = aws(&moto, st, &up_args("home", &[]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let aws_json: Value = serde_json::from_str(&std::fs::read_to_string(st.join("home/aws.json")).unwrap()).unwrap();
    assert_eq!(aws_json["account"], "123456789012", "{aws_json}");
    assert_eq!(aws_json["region"], "us-east-1");

    // Credentials of another account (moto answers for the account a role is assumed into).
    let creds = moto.py(r#"
sts = boto3.client('sts', endpoint_url=ec2.meta.endpoint_url, region_name='us-east-1', aws_access_key_id='testing', aws_secret_access_key='testing')
c = sts.assume_role(RoleArn='arn:aws:iam::111111111111:role/other', RoleSessionName='sgbox-test')['Credentials']
print(json.dumps([c['AccessKeyId'], c['SecretAccessKey'], c['SessionToken']]))
"#);
    for cmd in [&["down", "--name", "home", "--yes", "--delete-data"][..], &["status", "--name", "home"][..]] {
        let mut c = sgbox(st);
        moto.env(&mut c, &moto.url());
        c.env("AWS_ACCESS_KEY_ID", creds[0].as_str().unwrap())
            .env("AWS_SECRET_ACCESS_KEY", creds[1].as_str().unwrap())
            .env("AWS_SESSION_TOKEN", creds[2].as_str().unwrap());
        let out = run(c.args(cmd));
        assert_eq!(out.status.code(), Some(2), "{cmd:?}: {}", text(&out.stderr));
        let err = text(&out.stderr);
        assert!(err.contains("123456789012") && err.contains("111111111111"), "{err}");
    }
    assert!(st.join("home/deployment.json").exists(), "the local state is kept");
    one_of_each(&moto, "home");
}

#[test]
fn snapshots_are_listed_and_pruned_to_the_newest_and_no_tagged_volume_is_hidden() {
    let moto = Moto::start();
    let state = tempfile::tempdir().unwrap();
    let st = state.path();
    let out = aws(&moto, st, &up_args("keep", &[]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Three upgrades' snapshots, a disk a restore set aside, and a tagged volume of no known role.
    let made = moto.py(
        r#"
import time
f = [{'Name': 'tag:sgbox:deployment', 'Values': ['keep']}, {'Name': 'tag:sgbox:role', 'Values': ['data']}]
vol = ec2.describe_volumes(Filters=f)['Volumes'][0]
tags = lambda role: [{'Key': 'sgbox:deployment', 'Value': 'keep'}, {'Key': 'sgbox:managed', 'Value': 'true'}, {'Key': 'sgbox:role', 'Value': role}]
snaps = []
for v in ['7.3.0', '7.4.0', '7.5.4453']:
    s = ec2.create_snapshot(VolumeId=vol['VolumeId'], Description='sgbox:keep:sgbox-pre-' + v, TagSpecifications=[{'ResourceType': 'snapshot', 'Tags': tags('snapshot')}])
    snaps.append(s['SnapshotId'])
    time.sleep(1.1)
aside = ec2.create_volume(AvailabilityZone=vol['AvailabilityZone'], Size=250, TagSpecifications=[{'ResourceType': 'volume', 'Tags': tags('data-before-restore')}])['VolumeId']
odd = ec2.create_volume(AvailabilityZone=vol['AvailabilityZone'], Size=8, TagSpecifications=[{'ResourceType': 'volume', 'Tags': tags('scratch')}])['VolumeId']
print(json.dumps({'snaps': snaps, 'aside': aside, 'odd': odd}))
"#,
    );
    let snaps: Vec<&str> = made["snaps"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    let out = aws(&moto, st, &["snapshots", "--name", "keep", "--output", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed: Vec<&str> = v["snapshots"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(listed, snaps, "oldest first: {v:#}");
    assert_eq!(v["snapshots"][2]["label"], "sgbox-pre-7.5.4453");
    assert_eq!(v["replaced_disks"][0]["id"], made["aside"]);

    // Nothing tagged is hidden from status (and down deletes it with the data).
    let out = aws(&moto, st, &["status", "--name", "keep", "--output", "json"]);
    let s: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(s["resources"].as_array().into_iter().flatten().any(|r| r["id"] == made["odd"]), "{s:#}");

    // Prune: the newest two snapshots stay; the set-aside disk goes. Refused without --yes.
    let out = aws(&moto, st, &["snapshots", "--name", "keep", "--prune"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = aws(&moto, st, &["snapshots", "--name", "keep", "--prune", "--keep", "2", "--yes", "--output", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let p: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(p["deleted"], serde_json::json!([snaps[0], made["aside"]]), "{p:#}");
    let left = moto.py(
        "print(json.dumps(sorted(s['SnapshotId'] for s in ec2.describe_snapshots(OwnerIds=['self'], Filters=[{'Name': 'tag:sgbox:deployment', 'Values': ['keep']}])['Snapshots'])))",
    );
    let mut want = vec![snaps[1], snaps[2]];
    want.sort();
    assert_eq!(left, serde_json::json!(want));

    let out = aws(&moto, st, &["down", "--name", "keep", "--delete-data", "--yes", "--output", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(inventory(&moto, "keep")["volumes"].as_array().unwrap().is_empty(), "the odd volume went with the data");
}

#[test]
fn a_box_left_stopped_is_started_again_by_up() {
    let moto = Moto::start();
    let state = tempfile::tempdir().unwrap();
    let st = state.path();
    let out = aws(&moto, st, &up_args("stopped", &[]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    // What a restore that failed after stopping the instance leaves behind.
    moto.py(
        "i = [i for r in ec2.describe_instances(Filters=[{'Name': 'tag:sgbox:deployment', 'Values': ['stopped']}])['Reservations'] for i in r['Instances']][0]\nec2.stop_instances(InstanceIds=[i['InstanceId']])\nprint(json.dumps(1))",
    );
    assert_eq!(inventory(&moto, "stopped")["instances"][0]["State"]["Name"], "stopped");
    let out = aws(&moto, st, &up_args("stopped", &[]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("is stopped; starting it"), "{}", text(&out.stderr));
    assert_eq!(inventory(&moto, "stopped")["instances"][0]["State"]["Name"], "running");
    one_of_each(&moto, "stopped");
}

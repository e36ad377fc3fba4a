//! The command line as a user meets it: exit codes, messages, files written (or not), precedence
//! and the config round trip.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::common::*;

fn render_args<'a>(out: &'a Path, extra: &[&'a str]) -> Vec<std::ffi::OsString> {
    let mut v: Vec<std::ffi::OsString> = vec!["render".into(), "--out".into(), out.into()];
    v.extend(extra.iter().map(|s| s.into()));
    v
}

#[test]
fn render_writes_the_box_files_and_no_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let out = tmp.path().join("out");
    let o = run(sgbox(&state).args(render_args(&out, &["--cloud", "aws", "--size", "S", "--version", "7.5"])));
    assert!(o.status.success(), "{}", text(&o.stderr));
    for f in [
        "user-data",
        "sgbox.toml",
        "box/opt/sgbox/docker-compose.yaml",
        "box/etc/sgbox/deployment.json",
        "box/etc/systemd/system/sourcegraph.service",
        "box/usr/local/sbin/sgbox-data-disk",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    // The box makes its own database passwords: none is rendered, none kept here.
    assert!(!out.join("box/opt/sgbox/.env").exists());
    assert!(!state.join("sourcegraph/secrets.json").exists());
    for (f, mode) in [("user-data", 0o644), ("box/usr/local/sbin/sgbox-data-disk", 0o755), ("box/opt/sgbox/docker-compose.yaml", 0o644)] {
        assert_eq!(std::fs::metadata(out.join(f)).unwrap().permissions().mode() & 0o777, mode, "{f}");
    }
    let ud = std::fs::read_to_string(out.join("user-data")).unwrap();
    assert!(!ud.contains("PASSWORD=") || ud.contains("PASSWORD=%s"), "no password in the user-data");
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("box/etc/sgbox/deployment.json")).unwrap()).unwrap();
    assert_eq!(meta["release"], "7.5.4453");
    // JSON output also keeps secrets out.
    let o = run(sgbox(&state).args(render_args(&tmp.path().join("out2"), &["--cloud", "aws", "--output", "json"])));
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["release"], "7.5.4453");
}

#[test]
fn render_is_byte_identical_and_keeps_the_users_override() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let args = ["--cloud", "local", "--registry-mirror", "http://10.0.2.2:5000", "--mirror-mode", "tags-only", "--version", "6.1"];
    assert!(run(sgbox(&state).args(render_args(&a, &args))).status.success());
    assert!(run(sgbox(&state).args(render_args(&b, &args))).status.success());
    for f in ["user-data", "sgbox.toml", "box/opt/sgbox/docker-compose.yaml", "box/usr/local/sbin/sgbox-data-disk", "box/etc/sgbox/deployment.json"] {
        assert_eq!(std::fs::read(a.join(f)).unwrap(), std::fs::read(b.join(f)).unwrap(), "{f}");
    }
    let over = a.join("box/opt/sgbox/docker-compose.override.yaml");
    std::fs::write(&over, "services:\n  gitserver-0:\n    mem_limit: '16g'\n").unwrap();
    let o = run(sgbox(&state).args(render_args(&a, &args)));
    assert!(o.status.success());
    assert!(text(&o.stdout).contains("kept"));
    assert_eq!(std::fs::read_to_string(&over).unwrap(), "services:\n  gitserver-0:\n    mem_limit: '16g'\n");
}

#[test]
fn printed_config_round_trips_through_dash_f() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let o = run(sgbox(&state).args([
        "plan",
        "--print-config",
        "--cloud",
        "aws",
        "--region",
        "eu-west-1",
        "--size",
        "M",
        "--version",
        "7.4",
        "--hostname",
        "sg.example.com",
        "--tls",
        "letsencrypt",
        "--tls-email",
        "ops@example.com",
        "--ssh-cidr",
        "198.51.100.0/24",
        "--registry-mirror",
        "mirror.example.com/sg",
        "--data-disk-gb",
        "600",
        "--name",
        "eval",
    ]));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let first = text(&o.stdout);
    let file = tmp.path().join("sgbox.toml");
    std::fs::write(&file, &first).unwrap();
    let o = run(sgbox(&state).arg("-f").arg(&file).args(["plan", "--print-config"]));
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), first);
    assert!(first.contains("version = \"7.4.0\"") && first.contains("size = \"M\""), "{first}");
    assert!(!state.exists(), "plan must not create state");
    // The rendered sgbox.toml is the same document.
    let out = tmp.path().join("out");
    assert!(run(sgbox(&state).arg("-f").arg(&file).args(render_args(&out, &[]))).status.success());
    assert_eq!(std::fs::read_to_string(out.join("sgbox.toml")).unwrap(), first);
    assert!(state.join("eval").join("id_ed25519").exists(), "the deployment's SSH key is made on first render");
}

#[test]
fn precedence_is_flags_then_env_then_file() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let file = tmp.path().join("sgbox.toml");
    std::fs::write(&file, "cloud = \"aws\"\nsize = \"XL\"\nname = \"fromfile\"\n").unwrap();
    let get = |extra: &[&str], env: &[(&str, &str)]| {
        let mut c = sgbox(&state);
        c.arg("-f").arg(&file).args(["plan", "--print-config"]).args(extra);
        for (k, v) in env {
            c.env(k, v);
        }
        let o = run(&mut c);
        assert!(o.status.success(), "{}", text(&o.stderr));
        text(&o.stdout)
    };
    assert!(get(&[], &[]).contains("size = \"XL\""));
    assert!(get(&[], &[("SGBOX_SIZE", "S")]).contains("size = \"S\""));
    assert!(get(&["--size", "M"], &[("SGBOX_SIZE", "S")]).contains("size = \"M\""));
    assert!(get(&[], &[]).contains("name = \"fromfile\""));
}

#[test]
fn plan_reads_nothing_from_clouds_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let o = run(sgbox(&state).args(["plan", "--cloud", "aws", "--size", "L", "--ssh-cidr", "203.0.113.7/32"]));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(out.contains("m6a.12xlarge (48 vCPU, 192 GiB)"), "{out}");
    assert!(out.contains("22 from 203.0.113.7/32"), "{out}");
    assert!(!state.exists(), "plan must not create state");
    let o = run(sgbox(&state).args(["plan", "--cloud", "local", "--output", "json"]));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["machine"]["instance_type"], "local-2x4");
    assert_eq!(v["format_version"], 1);
    assert!(text(&o.stderr).contains("evaluation"));
}

/// Each bad input: exit 2, one message naming the field with a fix, and nothing written.
#[test]
fn bad_input_exits_2_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let cert = tmp.path().join("notpem.txt");
    std::fs::write(&cert, "hello").unwrap();
    let cert = cert.to_str().unwrap().to_string();
    let cases: Vec<(Vec<&str>, Option<&str>, &[&str])> = vec![
        (vec!["--cloud", "azure"], None, &["invalid --cloud", "aws, gcp or local"]),
        (vec!["--cloud", "aws", "--size", "XXL"], None, &["invalid --size", "XS, S, M, L, XL"]),
        (vec!["--cloud", "aws", "--version", "7.5.1"], None, &["invalid --version", "7.5.4453"]),
        (vec!["--cloud", "aws", "--version", "4.2"], None, &["invalid --version", "5.0"]),
        (vec!["--cloud", "aws", "--ssh-cidr", "10.0.0.300/24"], None, &["invalid --ssh-cidr", "203.0.113.7/32"]),
        (vec!["--cloud", "aws", "--ssh-cidr", "0.0.0.0/0"], None, &["invalid --ssh-cidr", "--allow-ssh-from-anywhere"]),
        (vec!["--cloud", "aws", "--hostname", "bad_host.example"], None, &["invalid --hostname"]),
        (vec!["--cloud", "aws", "--region", "us-east-9"], None, &["invalid --region"]),
        (vec!["--cloud", "aws", "--instance-type", "t3.large"], None, &["invalid --instance-type", "at least 8 vCPU"]),
        (
            vec!["--cloud", "aws", "--tls", "custom", "--hostname", "a.example.com", "--tls-cert", &cert, "--tls-key", &cert],
            None,
            &["invalid --tls-cert", "PEM"],
        ),
        (vec![], None, &["invalid cloud", "--cloud aws|gcp|local"]),
        (vec![], Some("cloud = \"aws\"\nsise = \"S\"\n"), &["unknown key `sise`", ":2", "did you mean `size`?"]),
        (vec![], Some("cloud = \"aws\"\nsize = S\n"), &["sgbox.toml:2:8"]),
        (vec![], Some("cloud = \"aws\"\ndata-disk-gb = \"lots\"\n"), &["invalid data-disk-gb", "whole number"]),
        (vec![], Some("cloud = \"gcp\"\nsize = \"XXS\"\n"), &["invalid size", "sgbox.toml:2"]),
    ];
    for (i, (args, file, needles)) in cases.iter().enumerate() {
        let state = tmp.path().join(format!("state{i}"));
        let out = tmp.path().join(format!("out{i}"));
        let mut c = sgbox(&state);
        if let Some(content) = file {
            let f = tmp.path().join(format!("case{i}")).join("sgbox.toml");
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(&f, content).unwrap();
            c.arg("-f").arg(f);
        }
        c.args(render_args(&out, args));
        let o = run(&mut c);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "case {i} {args:?}: {err}");
        for n in *needles {
            assert!(err.contains(n), "case {i} {args:?}: missing {n:?} in {err}");
        }
        assert!(err.contains("fix:"), "case {i}: no fix in {err}");
        assert!(!out.exists(), "case {i}: output written");
        assert!(!state.exists(), "case {i}: state written");
    }
    // clap's own usage errors are exit 2 as well.
    let o = run(sgbox(&tmp.path().join("s")).args(["render", "--bogus"]));
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn versions_lists_the_catalog_and_plans_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let o = run(sgbox(&state).arg("versions"));
    assert!(o.status.success());
    let out = text(&o.stdout);
    assert!(out.contains("7.5.4453") && out.contains("5.0.0") && out.contains("latest"));
    let o = run(sgbox(&state).args(["versions", "path", "--from", "5.9.17785", "--to", "7.5", "--output", "json"]));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["kind"], "multi-version");
    assert_eq!(v["hops"][0]["to"], "5.11.6271");
    assert_eq!(v["hops"][0]["migrator_args"], serde_json::json!(["upgrade", "--from=v5.9.17785", "--to=v5.11.6271"]));
    assert_eq!(v["hops"][1]["to"], "7.5.4453");
    assert_eq!(v["postgres_upgrade"], true);
    let o = run(sgbox(&state).args(["versions", "path", "--from", "7.4.0", "--to", "7.5"]));
    assert!(text(&o.stdout).contains("standard upgrade"));
    let o = run(sgbox(&state).args(["versions", "path", "--from", "7.5.4453", "--to", "7.4"]));
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("--allow-downgrade"));
    let o = run(sgbox(&state).args(["versions", "path", "--from", "7.5", "--to", "7.5"]));
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("--from"));
}

#[test]
fn completions_and_help() {
    let tmp = tempfile::tempdir().unwrap();
    let o = run(sgbox(tmp.path()).args(["completions", "bash"]));
    assert!(o.status.success());
    assert!(text(&o.stdout).contains("sgbox"));
    let o = run(sgbox(tmp.path()).args(["render", "--help"]));
    assert!(text(&o.stdout).contains("--registry-mirror"));
}

#[test]
fn history_reads_the_record_and_names_a_missing_deployment() {
    let state = tempfile::tempdir().unwrap();
    let out = run(sgbox(state.path()).args(["history", "--name", "ghost"]));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("ghost"));
    let dir = state.path().join("box1");
    std::fs::create_dir_all(&dir).unwrap();
    let rec = serde_json::json!({
        "format": 1, "name": "box1", "cloud": "local", "release": "7.5.4453", "settings": "cloud = \"local\"\n",
        "created_at": "2026-11-21T01:00:00Z", "instance_id": null, "host_key": null, "url": null,
        "history": [
            {"at": "2026-11-21T01:05:00Z", "action": "up", "release": "7.4.0", "by": "root@ci"},
            {"at": "2026-11-22T09:00:00Z", "action": "upgrade", "release": "7.5.4453", "from": "7.4.0", "by": "root@ci"}
        ]
    });
    std::fs::write(dir.join("deployment.json"), rec.to_string()).unwrap();
    let out = run(sgbox(state.path()).args(["history", "--name", "box1", "--output", "json"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["history"].as_array().unwrap().len(), 2);
    let out = run(sgbox(state.path()).args(["history", "--name", "box1"]));
    assert!(text(&out.stdout).contains("upgrade  7.4.0 -> 7.5.4453  by root@ci"), "{}", text(&out.stdout));
}

#[test]
fn upgrade_and_rollback_refuse_bad_input_before_reaching_any_box() {
    let state = tempfile::tempdir().unwrap();
    let st = state.path();
    let check = |args: &[&str], field: &str| {
        let out = run(sgbox(st).args(args));
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(field) && err.contains("fix:"), "{args:?} names {field} and a fix: {err}");
        assert!(std::fs::read_dir(st).unwrap().next().is_none(), "{args:?} wrote state");
    };
    check(&["upgrade", "--name", "nobox", "--to", "banana", "--yes"], "to");
    check(&["upgrade", "--name", "nobox", "--to", "7.5", "--timeout", "soon", "--yes"], "timeout");
    check(&["upgrade", "--name", "nobox", "--to", "7.5", "--output", "json"], "--yes");
    check(&["upgrade", "--name", "nobox", "--to", "7.5", "--yes"], "nobox");
    check(&["rollback", "--name", "nobox", "--yes"], "nobox");
}

/// A deployment's record as `up` writes it, for a local box that is not running.
fn recorded_local_box(st: &Path, name: &str) {
    let o = run(sgbox(st).args(["plan", "--print-config", "--cloud", "local", "--name", name, "--version", "7.4", "--size", "S"]));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let rec = serde_json::json!({
        "format": 1, "name": name, "cloud": "local", "release": "7.4.0", "settings": text(&o.stdout),
        "created_at": "2026-11-21T01:00:00Z", "instance_id": null, "host_key": null, "url": null, "history": []
    });
    std::fs::create_dir_all(st.join(name)).unwrap();
    std::fs::write(st.join(name).join("deployment.json"), rec.to_string()).unwrap();
}

#[test]
fn a_deployments_record_beats_the_environment_and_the_config_file() {
    let tmp = tempfile::tempdir().unwrap();
    let st = tmp.path();
    recorded_local_box(st, "demo");
    let file = st.join("sgbox.toml");
    std::fs::write(&file, "name = \"demo\"\ncloud = \"aws\"\nregion = \"eu-west-1\"\nsize = \"XL\"\n").unwrap();
    // The file and SGBOX_* pick the deployment (name) but change nothing of it.
    let o = run(sgbox(st).arg("-f").arg(&file).args(["status", "--output", "json"]).env("SGBOX_VERSION", "7.5").env("SGBOX_ACCEL", "kvm"));
    let err = text(&o.stderr);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v["cloud"].as_str(), v["state"].as_str(), v["release"].as_str()), (Some("local"), Some("absent"), Some("7.4.0")), "{v:#}");
    for ignored in ["cloud is ignored", "region is ignored", "size is ignored", "SGBOX_VERSION is ignored", "SGBOX_ACCEL is ignored"] {
        assert!(err.contains(ignored), "{ignored}: {err}");
    }
    // A flag that contradicts the record is refused, naming the recorded value; nothing changes.
    let before = std::fs::read(st.join("demo/deployment.json")).unwrap();
    for args in [
        &["status", "--name", "demo", "--cloud", "aws"][..],
        &["down", "--name", "demo", "--cloud", "aws", "--yes"],
        &["upgrade", "--name", "demo", "--cloud", "aws", "--yes"],
    ] {
        let o = run(sgbox(st).args(args));
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("--cloud") && err.contains("cloud = \"local\"") && err.contains("fix:"), "{args:?}: {err}");
    }
    assert_eq!(std::fs::read(st.join("demo/deployment.json")).unwrap(), before);
}

#[test]
fn every_commands_help_reads_as_reviewed() {
    let tmp = tempfile::tempdir().unwrap();
    let mut all = String::new();
    for cmd in [
        &[][..],
        &["render"],
        &["init"],
        &["plan"],
        &["versions"],
        &["versions", "path"],
        &["up"],
        &["status"],
        &["down"],
        &["ssh"],
        &["logs"],
        &["image", "build"],
        &["upgrade"],
        &["rollback"],
        &["history"],
        &["admin"],
        &["snapshots"],
        &["iam-policy"],
        &["completions"],
    ] {
        let o = run(sgbox(tmp.path()).args(cmd).arg("--help").env("COLUMNS", "100"));
        assert!(o.status.success(), "{cmd:?}");
        all.push_str(&format!("===== sgbox {} --help\n{}\n", cmd.join(" "), text(&o.stdout)));
    }
    insta::assert_snapshot!(all);
}

#[test]
fn plan_reads_as_reviewed_for_each_cloud() {
    let tmp = tempfile::tempdir().unwrap();
    let mut all = String::new();
    for args in [
        &[
            "plan",
            "--cloud",
            "aws",
            "--region",
            "eu-west-1",
            "--zone",
            "eu-west-1b",
            "--size",
            "S",
            "--version",
            "7.5",
            "--ssh-cidr",
            "198.51.100.0/24",
        ][..],
        &["plan", "--cloud", "gcp", "--region", "us-central1", "--size", "M", "--version", "7.5", "--hostname", "sg.example.com"],
        &["plan", "--cloud", "local", "--version", "7.4", "--accel", "tcg"],
    ] {
        let o = run(sgbox(tmp.path()).args(args));
        assert!(o.status.success(), "{args:?}: {}", text(&o.stderr));
        all.push_str(&format!("===== sgbox {}\n{}\n", args.join(" "), text(&o.stdout)));
    }
    insta::assert_snapshot!(all);
}

#[test]
fn iam_policy_prints_the_documented_policy_and_admin_names_a_missing_deployment() {
    let tmp = tempfile::tempdir().unwrap();
    let o = run(sgbox(tmp.path()).args(["iam-policy", "--cloud", "aws"]));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let docs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/aws-iam-policy.json")).unwrap())
            .unwrap();
    assert_eq!(printed, docs, "docs/aws-iam-policy.json is what `sgbox iam-policy` prints");
    let o = run(sgbox(tmp.path()).args(["iam-policy", "--cloud", "gcp"]));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    let o = run(sgbox(tmp.path()).args(["admin", "--name", "nobox"]));
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("nobox"), "{}", text(&o.stderr));
}

#[test]
fn an_instance_type_outside_the_table_is_not_passed_over_in_silence() {
    let tmp = tempfile::tempdir().unwrap();
    let o = run(sgbox(tmp.path()).args(["plan", "--cloud", "aws", "--instance-type", "t3.micro", "--ssh-cidr", "203.0.113.7/32"]));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(err.contains("t3.micro is not in sgbox's size table") && err.contains("8 vCPU / 32 GiB"), "{err}");
}

#[test]
fn without_a_terminal_init_and_up_ask_nothing_and_name_the_missing_flag() {
    let st = tempfile::tempdir().unwrap();
    for cmd in [&["init"][..], &["up"], &["init", "--yes"], &["init", "--output", "json"]] {
        let out = run(sgbox(st.path()).args(cmd));
        assert_eq!(out.status.code(), Some(2), "{cmd:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains("--cloud"), "{cmd:?}: {}", text(&out.stderr));
    }
    assert_eq!(std::fs::read_dir(st.path()).map(|d| d.count()).unwrap_or(0), 0, "something was written");

    // Given everything, init writes what plan prints, and says (or prints as JSON) where.
    let flags = ["--cloud", "local", "--name", "quiet", "--version", "7.4"];
    let out = run(sgbox(st.path()).arg("init").args(flags).args(["--output", "json"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let path = st.path().join("quiet/sgbox.toml");
    assert_eq!(doc["path"].as_str(), Some(path.to_str().unwrap()));
    assert!(doc["command"].as_str().unwrap().contains("up --yes"), "{doc}");
    let planned = run(sgbox(st.path()).args(["plan", "--print-config"]).args(flags));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text(&planned.stdout));
}

use super::*;
use crate::release::catalog::catalog;
use crate::release::sizing::ALL_SIZES;
use crate::settings::Layer;

fn settings(pairs: &[(&'static str, &str)]) -> Settings {
    Settings::resolve(&Layer::from_flags(pairs.iter().map(|(k, v)| (*k, Some(v.to_string()))))).unwrap()
}

fn bundle(s: &Settings, r: &Release) -> Bundle {
    render(&Inputs { settings: s, release: r, login: Login::Sgbox("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK0 test") }).unwrap()
}

/// Service names in file order and their `image:` values, read back from the rendered text.
fn services_and_images(compose: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = None;
    for line in compose.lines() {
        if let Some(name) = line.strip_prefix("  ").and_then(|l| l.strip_suffix(':')) {
            if !name.starts_with(' ') {
                current = Some(name.to_string());
            }
        }
        if let Some(img) = line.strip_prefix("    image: ") {
            out.push((current.clone().unwrap(), serde_json::from_str::<String>(img).unwrap()));
        }
    }
    out
}

#[test]
fn every_catalog_service_is_described() {
    let known = compose::known_services();
    for r in catalog().all() {
        for name in r.services.keys() {
            assert!(known.contains(name), "{} has {name}", r.version);
        }
    }
}

#[test]
fn every_release_and_size_renders_with_official_services_and_images() {
    for r in catalog().all() {
        for size in ALL_SIZES {
            let s = settings(&[("cloud", "aws"), ("size", &size.to_string()), ("version", &r.version.to_string())]);
            let b = bundle(&s, r);
            let got = services_and_images(b.compose());
            let want: Vec<(String, String)> = r.services.iter().map(|(n, i)| (n.clone(), i.official())).collect();
            assert_eq!(got, want, "{}", r.version);
            assert!(b.user_data.len() < AWS_USER_DATA_LIMIT, "{} user-data is {} bytes", r.version, b.user_data.len());
            assert!(b.user_data.starts_with("#cloud-config\n"));
        }
    }
}

#[test]
fn no_default_passwords_and_private_ports() {
    for r in catalog().all() {
        let s = settings(&[("cloud", "gcp"), ("version", &r.version.to_string())]);
        let b = bundle(&s, r);
        let c = b.compose();
        for bad in ["PGPASSWORD=sg\"", "PGPASSWORD=sg'", "sg:sg@", "postgres:password@", "POSTGRES_PASSWORD=password", "sg:@"] {
            assert!(!c.contains(bad), "{}: {bad}", r.version);
        }
        assert!(c.contains("PGPASSWORD=${PGSQL_PASSWORD:?"));
        // Nothing is published beyond the box: Caddy binds 80/443 itself, in the box's network
        // namespace (the only service there), and reaches the frontend on the box's loopback.
        for line in c.lines().filter(|l| l.trim_start().starts_with("- \"") && l.contains(":")) {
            let v: String = serde_json::from_str(line.trim_start().trim_start_matches("- ")).unwrap();
            assert!(!v.starts_with("0.0.0.0:"), "{}: {v}", r.version);
        }
        assert_eq!(c.matches("network_mode: \"host\"").count(), 1, "{}", r.version);
        let caddy: String = c.lines().skip_while(|l| *l != "  caddy:").skip(1).take_while(|l| l.starts_with("    ")).collect::<Vec<_>>().join("\n");
        assert!(caddy.contains("network_mode: \"host\"") && !caddy.contains("networks:") && !caddy.contains("ports:"), "{}: {caddy}", r.version);
        assert!(c.contains("\"127.0.0.1:3080:3080\""), "{}", r.version);
        assert!(c.contains("\"127.0.0.1:9090:9090\""), "{}", r.version);
        assert!(b.file("/opt/sgbox/.env").is_none(), "the box makes its own passwords");
    }
}

/// Every file the user-data writes, decoded.
fn user_data_files(ud: &str) -> String {
    let mut all = String::new();
    let mut lines = ud.lines().peekable();
    while let Some(line) = lines.next() {
        if line == "    content: |" {
            // A literal block (an image's default configuration): its lines, unindented.
            let mut block = Vec::new();
            while let Some(l) = lines.next_if(|l| l.is_empty() || l.starts_with("      ")) {
                block.push(l.strip_prefix("      ").unwrap_or(""));
            }
            all.push_str(&(block.join("\n") + "\n"));
        } else if let Some(b64) = line.trim().strip_prefix("content: ") {
            let gz = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
            let mut text = String::new();
            std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gz[..]), &mut text).unwrap();
            all.push_str(&text);
        }
    }
    all
}

#[test]
fn user_data_carries_no_secret_and_the_box_makes_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let (cert, key) = (tmp.path().join("c.pem"), tmp.path().join("k.pem"));
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").unwrap();
    std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nSECRETKEYMATERIAL\n-----END PRIVATE KEY-----\n").unwrap();
    let s = settings(&[
        ("cloud", "aws"),
        ("hostname", "sg.example.com"),
        ("tls", "custom"),
        ("tls-cert", cert.to_str().unwrap()),
        ("tls-key", key.to_str().unwrap()),
    ]);
    let b = bundle(&s, catalog().latest());
    let files = user_data_files(&b.user_data);
    for text in [&b.user_data, &files] {
        assert!(!text.contains("PRIVATE KEY") && !text.contains("SECRETKEYMATERIAL"), "no TLS key in user-data");
        assert!(!text.contains("BEGIN CERTIFICATE"), "the certificate goes by SSH with its key");
        assert!(!text.contains("PGSQL_PASSWORD=") || text.contains("PGSQL_PASSWORD=%s"), "no password, only the generator");
    }
    // The boot script makes the passwords on the data disk and links the project's .env there.
    let boot = b.file(BOOT_SCRIPT).unwrap();
    assert!(boot.content.contains("/dev/urandom") && boot.content.contains("ln -sfn \"$S\" /opt/sgbox/.env"), "{}", boot.content);
    assert!(b.user_data.contains(&gz_b64(&boot.content)), "bootcmd installs and runs the boot script");
    let unit = b.file("/etc/systemd/system/sourcegraph.service").unwrap();
    assert!(unit.content.contains(&format!("while [ ! -s {TLS_KEY} ]")), "the stack waits for the key: {}", unit.content);
    let docker = b.file("/etc/systemd/system/docker.service.d/60-sgbox.conf").unwrap();
    assert!(docker.content.contains("ExecStartPre=/bin/sh -c 'mountpoint -q /mnt/sgbox-data ||"), "{}", docker.content);
    assert!(b.file(BOOT_SCRIPT).is_some_and(|f| f.mode == 0o755 && f.content.contains("secrets.env")));
    // Without custom TLS the unit does not wait for a key.
    let plain = bundle(&settings(&[("cloud", "aws")]), catalog().latest());
    assert!(!plain.file("/etc/systemd/system/sourcegraph.service").unwrap().content.contains("TLS key"));
}

#[test]
fn output_is_deterministic() {
    let r = catalog().latest();
    let s = settings(&[("cloud", "aws"), ("size", "S")]);
    let a = bundle(&s, r);
    let b = bundle(&s, r);
    assert_eq!(a.user_data, b.user_data);
    assert_eq!(a.rendered_sha256, b.rendered_sha256);
    for (x, y) in a.files.iter().zip(&b.files) {
        assert_eq!(x.content, y.content, "{}", x.path);
    }
}

#[test]
fn mirror_rewrites_images() {
    let r = catalog().get("5.0.0".parse().unwrap()).unwrap();
    let s = settings(&[("cloud", "local"), ("version", "5.0.0"), ("registry-mirror", "http://10.0.2.2:5000/sg")]);
    let imgs = services_and_images(bundle(&s, r).compose());
    let caddy = &imgs.iter().find(|(n, _)| n == "caddy").unwrap().1;
    assert!(caddy.starts_with("10.0.2.2:5000/sg/caddy:2.5.2-alpine@sha256:"), "{caddy}");
    let fe = &imgs.iter().find(|(n, _)| n == "sourcegraph-frontend-0").unwrap().1;
    assert_eq!(fe, &format!("10.0.2.2:5000/sg/frontend:5.0.0@{}", r.services["sourcegraph-frontend-0"].digest));
    let s = settings(&[("cloud", "local"), ("version", "5.0.0"), ("registry-mirror", "http://10.0.2.2:5000/sg"), ("mirror-mode", "tags-only")]);
    let b = bundle(&s, r);
    let imgs = services_and_images(b.compose());
    assert!(imgs.iter().all(|(_, i)| i.starts_with("10.0.2.2:5000/sg/") && !i.contains('@')), "{imgs:?}");
    let daemon = b.file("/etc/docker/daemon.json").unwrap();
    assert!(daemon.content.contains("\"insecure-registries\": [\n    \"10.0.2.2:5000\"\n  ]"), "{}", daemon.content);
    assert!(daemon.content.contains("\"default-runtime\": \"crun\""), "the local box runs crun: {}", daemon.content);
    assert!(b.user_data.contains("docker-compose crun curl"), "a box without crun installs it");
    let aws = bundle(&settings(&[("cloud", "aws"), ("ssh-cidr", "203.0.113.7/32")]), r);
    let daemon = aws.file("/etc/docker/daemon.json").unwrap();
    assert!(!daemon.content.contains("crun") && !aws.user_data.contains("crun"), "cloud VMs keep runc: {}", daemon.content);
}

#[test]
fn cpu_limits_fit_the_machine() {
    let r = catalog().latest();
    let s = settings(&[("cloud", "local")]);
    let c = bundle(&s, r).compose().to_string();
    let max = c.lines().filter_map(|l| l.strip_prefix("    cpus: ")).map(|v| v.parse::<f64>().unwrap()).fold(0.0, f64::max);
    assert_eq!(max, 2.0);
    let s = settings(&[("cloud", "aws"), ("size", "XL")]);
    let c = bundle(&s, r).compose().to_string();
    assert!(c.contains("    cpus: 8\n"));
}

#[test]
fn version_scoped_settings_follow_the_release() {
    let old = catalog().get("5.2.7".parse().unwrap()).unwrap();
    let new = catalog().latest();
    let s_old = settings(&[("cloud", "aws"), ("version", "5.2.7")]);
    let s_new = settings(&[("cloud", "aws")]);
    let c_old = bundle(&s_old, old).compose().to_string();
    let c_new = bundle(&s_new, new).compose().to_string();
    assert!(c_old.contains("\"--port=8080\"") && !c_new.contains("--port=8080"));
    assert!(c_new.contains("\"48080\""));
    assert!(c_old.contains("SYMBOLS_URL") && !c_new.contains("SYMBOLS_URL"));
    assert!(c_new.contains("INDEXED_SEARCH_INDEXER") && !c_old.contains("INDEXED_SEARCH_INDEXER"));
}

#[test]
fn caddy_follows_tls_mode() {
    let r = catalog().latest();
    let s = settings(&[("cloud", "aws"), ("hostname", "sg.example.com"), ("tls", "letsencrypt"), ("tls-email", "ops@example.com")]);
    let b = bundle(&s, r);
    let caddy = &b.file("/opt/sgbox/Caddyfile").unwrap().content;
    assert!(caddy.contains("email ops@example.com") && caddy.contains("sg.example.com {"), "{caddy}");
    let s = settings(&[("cloud", "aws")]);
    let caddy = bundle(&s, r).file("/opt/sgbox/Caddyfile").unwrap().content.clone();
    assert!(caddy.contains("auto_https off") && caddy.contains(":80 {"), "{caddy}");
}

#[test]
fn metadata_records_release_and_hash() {
    let r = catalog().latest();
    let s = settings(&[("cloud", "aws")]);
    let b = bundle(&s, r);
    let meta: serde_json::Value = serde_json::from_str(&b.file("/etc/sgbox/deployment.json").unwrap().content).unwrap();
    assert_eq!(meta["release"], "7.5.4453");
    assert_eq!(meta["rendered_sha256"], b.rendered_sha256.as_str());
    assert_eq!(meta["compose_project"], "sourcegraph");
}

#[test]
fn starting_services_are_probed_every_two_seconds() {
    let r = catalog().latest();
    let c = bundle(&settings(&[("cloud", "local")]), r).compose().to_string();
    let periods = c.matches("start_period:").count();
    assert!(periods >= 5, "{c}");
    assert_eq!(c.matches("      start_interval: 2s\n").count(), periods, "every start period has a start interval");
}

#[test]
fn one_render_per_cloud_reads_as_reviewed() {
    // What lands on the box, as a reviewed diff: the user-data of each cloud (the compose project
    // and every file inside it), with fixed secrets and key.
    for (cloud, extra) in [
        ("aws", &[("region", "us-east-1"), ("ssh-cidr", "198.51.100.0/24")][..]),
        ("local", &[("registry-mirror", "http://10.0.2.2:5000"), ("mirror-mode", "tags-only")][..]),
    ] {
        let mut pairs = vec![("cloud", cloud), ("name", "snap"), ("version", "7.5")];
        pairs.extend_from_slice(extra);
        let s = settings(&pairs);
        let b = bundle(&s, s.release());
        insta::assert_snapshot!(format!("user_data_{cloud}"), b.user_data);
    }
}

#[test]
fn a_literal_block_is_used_only_where_it_reads_back_the_same() {
    assert_eq!(literal_block("a: 1\n\n  b: 2\n", 4).as_deref(), Some("    a: 1\n\n      b: 2"));
    assert_eq!(literal_block("{\n\tadmin\n}\n", 2).as_deref(), Some("  {\n  \tadmin\n  }"), "tabs after the indentation are content");
    for bad in ["no newline", "two\n\n", " leading space\n", "\tleading tab\n", "cr\r\n", "blank\n \t \nline\n", "\n", ""] {
        assert_eq!(literal_block(bad, 4), None, "{bad:?}");
    }
}

/// The top-level keys of a cloud-config, in order.
fn top_keys(yaml: &str) -> Vec<String> {
    yaml.lines().filter(|l| !l.starts_with([' ', '#', '-']) && l.contains(':')).map(|l| l.split(':').next().unwrap_or_default().to_string()).collect()
}

#[test]
fn an_images_default_configuration_is_a_whole_box_that_sgbox_up_replaces_key_by_key() {
    for cloud in ["aws", "local"] {
        let s = settings(&[
            ("cloud", cloud),
            ("version", "7.5"),
            ("hostname", "sg.example.com"),
            ("tls", "letsencrypt"),
            ("tls-email", "ops@example.com"),
        ]);
        let console = console_config(&s).unwrap();
        let up = bundle(&s, s.release()).user_data;
        // cloud-init merges user-data over its system configuration key by key: `up`'s user-data
        // must set every key the image's default sets, so that nothing of it reaches an sgbox box.
        let (ck, uk) = (top_keys(&console), top_keys(&up));
        assert!(!ck.is_empty() && ck.iter().all(|k| uk.contains(k)), "{ck:?} not all in {uk:?}");
        assert!(uk.contains(&"users".to_string()) && !ck.contains(&"users".to_string()), "the launch's key pair goes to the image's default user");
        assert!(!console.contains("ssh_authorized_keys") && !console.contains("ssh-ed25519"), "no key of sgbox's in the image");
        let files = user_data_files(&console);
        let c = Settings { tls: Tls::None, hostname: None, ..s.clone() };
        let rendered = render(&Inputs { settings: &c, release: s.release(), login: Login::Console }).unwrap();
        let expected: String = rendered.files.iter().filter(|f| f.path != BOOT_SCRIPT).map(|f| f.content.as_str()).collect();
        assert!(files == expected, "every file, written as text, reads back byte for byte: {cloud}");
        assert!(!console.contains("encoding: gz+b64"), "text compresses in the bake's gzipped user-data: {cloud}");
        let boot = rendered.file(BOOT_SCRIPT).unwrap().content.clone();
        assert!(boot.contains("\nWANT_GIB=0\n"), "any one data volume (a launch may size it): {cloud}");
        assert!(!files.contains("AllowUsers"), "sshd lets the image's default user in");
        assert!(files.contains(":80 {") && !files.contains("sg.example.com"), "HTTP on port 80: no hostname is known");
        assert!(!files.contains("PGSQL_PASSWORD=") || files.contains("PGSQL_PASSWORD=%s"), "passwords are made on the box");
        assert!(console.starts_with("#cloud-config\n") && console.contains("sudo cat /mnt/sgbox-data/sgbox/site-admin"), "{console}");
    }
    let s = settings(&[("cloud", "aws"), ("version", "7.5")]);
    let b = render(&Inputs { settings: &s, release: s.release(), login: Login::Console }).unwrap();
    let unit = &b.file("/etc/systemd/system/sourcegraph.service").unwrap().content;
    let starts: Vec<&str> = unit.lines().filter(|l| l.starts_with("ExecStart=")).collect();
    assert_eq!(starts.len(), 3, "{unit}");
    // Everything but Caddy, then the site admin, then Caddy: the site is never reachable unclaimed.
    let words: Vec<&str> = starts[0].trim_end_matches('\'').split_whitespace().collect();
    assert!(words.contains(&"sourcegraph-frontend-0") && !words.contains(&"caddy"), "{}", starts[0]);
    assert_eq!(starts[1], format!("ExecStart={SITE_ADMIN_SCRIPT}"));
    assert!(starts[2].ends_with("up -d --remove-orphans"), "{}", starts[2]);
    let script = b.file(SITE_ADMIN_SCRIPT).unwrap();
    assert_eq!(script.mode, 0o755);
    assert!(script.content.contains(SITE_ADMIN_FILE) && script.content.contains("umask 077"), "{}", script.content);
    // An sgbox box: none of it (sgbox claims the admin over SSH; only its user gets in).
    let up = bundle(&s, s.release());
    assert!(up.file(SITE_ADMIN_SCRIPT).is_none());
    assert!(!up.file("/etc/systemd/system/sourcegraph.service").unwrap().content.contains(SITE_ADMIN_SCRIPT));
    assert!(up.file("/etc/ssh/sshd_config.d/00-sgbox.conf").unwrap().content.contains("AllowUsers sgbox"));
    assert!(up.file(BOOT_SCRIPT).unwrap().content.contains(&format!("WANT_GIB={}", s.data_disk_gb)));
}

/// The data disk's release check (`cloud-init/data-release.sh`), run by `sh` as the boot script
/// runs it, for a 7.5.4453 box: its own record, a kept disk of each kind, another machine's.
#[test]
fn a_new_machine_on_a_kept_data_disk_starts_only_its_release_or_a_standard_upgrade_from_it() {
    let to: crate::release::version::Version = "7.5.4453".parse().unwrap();
    let from = standard_from(to);
    assert_eq!(from, ["7.4.0", "7.5.0", "7.5.4453"], "one minor up, a patch within the minor, itself");
    assert_eq!(standard_from("7.0.0".parse().unwrap()).first().map(String::as_str), Some("6.12.0"), "the next major from the last minor");

    struct Run {
        ok: bool,
        log: String,
        record: String,
        refused: Option<String>,
        umounted: bool,
    }
    let run = |me: &str, record: Option<&str>| -> Run {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("mnt/sgbox")).unwrap();
        std::fs::write(d.join("machine-id"), format!("{me}\n")).unwrap();
        if let Some(r) = record {
            std::fs::write(d.join("mnt/sgbox/data-release"), r).unwrap();
        }
        let script = format!(
            "set -eu\nMNT=\"$1/mnt\"\nRELEASE={to}\nSTANDARD_FROM='{}'\nMACHINE_ID_FILE=\"$1/machine-id\"\nREFUSED=\"$1/run/refused\"\nCONSOLE=/dev/null\nlog() {{ echo \"log: $*\" >&2; }}\numount() {{ : >\"$1.umounted\"; }}\n{DATA_RELEASE_SH}\necho passed >&2\n",
            from.join(" ")
        );
        let out = std::process::Command::new("sh").arg("-c").arg(&script).arg("sh").arg(d).output().unwrap();
        let log = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.success(), log.contains("passed"), "{log}");
        Run {
            ok: out.status.success(),
            log,
            record: std::fs::read_to_string(d.join("mnt/sgbox/data-release")).unwrap_or_default(),
            refused: std::fs::read_to_string(d.join("run/refused")).ok(),
            umounted: d.join("mnt.umounted").exists(),
        }
    };

    // A new disk: this machine and its release.
    let r = run("aaa", None);
    assert!(r.ok && r.record == "release=7.5.4453\nmachine=aaa\n" && r.refused.is_none(), "{}", r.log);
    // This machine's own disk, whatever it says: an upgrade in flight is `sgbox upgrade`'s.
    let r = run("aaa", Some("release=5.9.0\nmachine=aaa\n"));
    assert!(r.ok && r.record == "release=5.9.0\nmachine=aaa\n", "{}", r.log);
    // Another machine's disk of the same release, or of one a standard upgrade away: taken over.
    let r = run("bbb", Some("release=7.5.4453\nmachine=aaa\n"));
    assert!(r.ok && r.record == "release=7.5.4453\nmachine=bbb\n" && !r.log.contains("migrator"), "{}", r.log);
    let r = run("bbb", Some("release=7.4.0\nmachine=aaa\n"));
    assert!(r.ok && r.record == "release=7.5.4453\nmachine=bbb\n" && r.log.contains("7.4.0's databases") && r.log.contains("migrator"), "{}", r.log);
    // Anything else is refused, the disk unmounted and its record untouched: a multi-version
    // jump, a downgrade, a release this box does not know, a record without a release.
    for was in ["5.9.0", "7.3.2527", "7.6.0", "8.0.0", ""] {
        let rec = format!("release={was}\nmachine=aaa\n");
        let r = run("bbb", Some(&rec));
        assert!(!r.ok, "{was}: {}", r.log);
        assert_eq!(r.record, rec, "{was}");
        assert!(r.umounted, "the disk is unmounted: {}", r.log);
        let msg = r.refused.unwrap_or_else(|| panic!("{was}: no refusal written: {}", r.log));
        assert!(msg.contains("refusing to start Sourcegraph 7.5.4453") && msg.contains("sgbox upgrade --to 7.5.4453"), "{msg}");
        if !was.is_empty() {
            assert!(msg.contains(&format!("Sourcegraph {was}'s")) && msg.contains(&format!("sgbox up --version {was}")), "{msg}");
        }
    }
}

#[test]
fn the_boot_script_checks_the_disks_release_before_it_is_mounted_for_good() {
    let s = settings(&[("cloud", "aws"), ("version", "7.5.4453")]);
    let b = bundle(&s, s.release());
    let boot = &b.file(BOOT_SCRIPT).unwrap().content;
    assert!(boot.contains("RELEASE=7.5.4453\nSTANDARD_FROM='7.4.0 7.5.0 7.5.4453'\n"), "{boot}");
    let check = boot.find("DR=\"$MNT/sgbox/data-release\"").expect("the check is in the boot script");
    let fstab = boot.find(">> /etc/fstab").expect("the fstab line");
    let mount = boot.find("mount -t ext4 \"$dev\" \"$MNT\"").expect("the mount");
    let secrets = boot.find("secrets.env").unwrap();
    assert!(mount < check && check < fstab && fstab < secrets, "mounted, checked, then in fstab; secrets after");
    assert_eq!(DATA_RELEASE_FILE, format!("{DATA_MOUNT}/sgbox/data-release"), "the file the check reads is the one upgrades write");
}

#[test]
fn the_users_compose_override_is_the_new_boxs_and_leaves_sgboxs_files_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("override.yaml");
    // About the size of a real one: resource limits and health-check intervals for ten services.
    let mut text = String::from("services:\n");
    for s in [
        "gitserver-0",
        "pgsql",
        "codeintel-db",
        "codeinsights-db",
        "searcher-0",
        "zoekt-webserver-0",
        "sourcegraph-frontend-0",
        "blobstore",
        "syntect-server",
        "precise-code-intel-worker",
    ] {
        text.push_str(&format!("  {s}:\n    mem_limit: '8g'\n    healthcheck:\n      interval: 60s\n      start_interval: 2s\n"));
    }
    std::fs::write(&p, &text).unwrap();
    let plain = settings(&[("cloud", "aws"), ("version", "7.5")]);
    let with = settings(&[("cloud", "aws"), ("version", "7.5"), ("compose-override", &p.display().to_string())]);
    let (a, b) = (bundle(&plain, plain.release()), bundle(&with, with.release()));
    let path = format!("{BOX_DIR}/docker-compose.override.yaml");
    assert_eq!(a.file(&path).unwrap().content, T_OVERRIDE);
    let f = b.file(&path).unwrap();
    assert!(f.create_only && f.content == text, "the user's file, created once");
    assert!(user_data_files(&b.user_data).contains(&text), "in the user-data, byte for byte");
    // sgbox's own files are the same: the override is the user's, outside the rendered hash.
    assert_eq!(a.rendered_sha256, b.rendered_sha256);
    assert!(b.user_data.len() < AWS_USER_DATA_LIMIT, "a real-sized override fits EC2's 16 KiB: {} bytes", b.user_data.len());
}

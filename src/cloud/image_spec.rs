//! What `sgbox image build` makes, computed from its inputs alone (no I/O): the image references
//! of the release (exactly those the box's compose file names, so a box from the image finds them
//! all locally), the recipe (what makes two builds the same image), the image's name, tags and
//! deprecation time, and the builder's bake user-data. `--dry-run` prints it, the cloud builders
//! act on it, and the manifest reports it.
//!
//! The bake (`cloud-init/bake.sh`) runs on a temporary builder: it installs what the box needs,
//! pulls every image of the release, records `/etc/sgbox/image.json`, scrubs the machine for
//! publication and powers it off. Its only signal is one console line, `sgbox-bake: ok
//! recipe=<recipe>` or `sgbox-bake: failed step=<step>`: no SSH, so the builder takes nothing
//! inbound.

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::hex;
use crate::render::image_ref;
use crate::settings::{Cloud, Settings};

const BAKE_SH: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/cloud-init/bake.sh"));
/// Where the builder's user-data puts the image's default configuration; the bake moves it to
/// `render::CONSOLE_CONFIG` once the builder's own cloud-init is done (cloud-init would read it
/// as the builder's configuration before that).
const BAKE_CONSOLE_CONFIG: &str = "/etc/sgbox/image-default.cfg";
/// Bumped when what a bake does changes in a way the script's text does not show.
const RECIPE_FORMAT: &str = "sgbox-image-recipe/1";
/// Root disk of a box made from the image (and of the builder): the OS, the baked release's images,
/// and room for a second release's during an in-place upgrade (`upgrade`'s preflight checks it).
pub const ROOT_GB: i32 = 40;
/// The builder's machine: the bake pulls and unpacks, it serves nothing.
pub const BUILDER_TYPE: &str = "m6a.large";
/// An image is marked deprecated (hidden from new launches' default lists, still launchable) a
/// year after it is built: Sourcegraph supports a release for about that long.
pub const DEPRECATE_AFTER_DAYS: u64 = 365;

pub const TAG_RECIPE: &str = "sgbox:recipe";
pub const TAG_RELEASE: &str = "sgbox:release";
pub const TAG_SGBOX_VERSION: &str = "sgbox:version";
/// `official` when the image holds the official references (a box without a registry mirror
/// uses them), else the mirror's.
pub const TAG_REFS: &str = "sgbox:refs";
/// Set once an image is finished in its region (snapshots tagged, IMDSv2, deprecation): an image
/// without it is a killed build's, finished or removed by the next run.
pub const TAG_COMPLETE: &str = "sgbox:complete";
/// On every temporary resource of a build (builder instance, its security group): the janitor's key.
pub const TAG_BUILD: &str = "sgbox:image-build";

/// The image a build makes, and how.
#[derive(Clone, Debug, Serialize)]
pub struct ImageSpec {
    pub cloud: Cloud,
    pub release: String,
    /// (service, reference) in the order of the release's compose file.
    pub images: Vec<(String, String)>,
    pub official_refs: bool,
    pub recipe: String,
    pub name: String,
    pub description: String,
    pub sgbox_version: String,
    pub region: String,
    pub copy_to: Vec<String>,
    pub public: bool,
    /// Encrypted snapshots, unless the image is to be public (AWS cannot share those publicly).
    pub encrypted: bool,
    pub root_gb: i32,
    pub builder_type: String,
    pub deprecate_at: String,
    /// The image's data volume (GiB): a launch from the image gets one, blank (its `sgbox up`
    /// replaces it by its own).
    pub data_gb: i32,
    /// The box a launch without sgbox gets (`render::console_config`), written by the bake to
    /// `render::CONSOLE_CONFIG`.
    pub console_config: String,
    /// Not secret: it names images, never a key or a password.
    pub bake_user_data: String,
}

/// What the user asked for.
pub struct ImageRequest<'a> {
    pub settings: &'a Settings,
    pub region: String,
    pub copy_to: Vec<String>,
    pub public: bool,
    /// Encrypted snapshots (AWS shares no public AMI with encrypted ones): false with `--public`
    /// or `--unencrypted`.
    pub encrypted: bool,
    pub now: std::time::SystemTime,
}

impl ImageSpec {
    pub fn of(r: &ImageRequest) -> anyhow::Result<ImageSpec> {
        let s = r.settings;
        let console_config = crate::render::console_config(s)?;
        let data_gb = i32::try_from(s.data_disk_gb).unwrap_or(i32::MAX);
        let release = s.release();
        let images: Vec<(String, String)> = release.services.iter().map(|(name, img)| (name.clone(), image_ref(img, s))).collect();
        let encrypted = r.encrypted && !r.public;
        let packages = packages(s.cloud);
        let insecure = s.registry_mirror.as_ref().filter(|m| m.insecure).map(|m| m.base.split('/').next().unwrap_or("").to_string());
        let mut h = Sha256::new();
        for part in [RECIPE_FORMAT, &s.version.to_string(), env!("CARGO_PKG_VERSION"), BAKE_SH, &packages.join(" "), &console_config] {
            h.update(part.as_bytes());
            h.update(b"\n");
        }
        for (name, reference) in &images {
            h.update(format!("{name} {reference}\n").as_bytes());
        }
        h.update(format!("encrypted={encrypted} root_gb={ROOT_GB} data_gb={data_gb} insecure={}\n", insecure.as_deref().unwrap_or("")).as_bytes());
        let recipe = hex(&h.finalize());
        let deprecate_at = humantime::format_rfc3339_seconds(r.now + std::time::Duration::from_secs(DEPRECATE_AFTER_DAYS * 86_400)).to_string();
        let mut spec = ImageSpec {
            cloud: s.cloud,
            release: s.version.to_string(),
            official_refs: s.registry_mirror.is_none(),
            name: format!("sgbox-sourcegraph-{}-{}", s.version, &recipe[..12]),
            description: format!("Sourcegraph {} (docker-compose) on Debian 13, baked by sgbox {}", s.version, env!("CARGO_PKG_VERSION")),
            sgbox_version: env!("CARGO_PKG_VERSION").to_string(),
            region: r.region.clone(),
            copy_to: r.copy_to.clone(),
            public: r.public,
            encrypted,
            root_gb: ROOT_GB,
            builder_type: BUILDER_TYPE.to_string(),
            deprecate_at,
            data_gb,
            console_config,
            bake_user_data: String::new(),
            images,
            recipe,
        };
        spec.bake_user_data = bake_user_data(&spec, &packages, insecure.as_deref());
        Ok(spec)
    }

    /// The bake user-data as the builder gets it: gzip (cloud-init unpacks it), since EC2 takes at
    /// most 16 KiB and the image's default configuration alone is most of that as text.
    pub fn bake_user_data_gzip(&self) -> Vec<u8> {
        crate::render::gzip(&self.bake_user_data)
    }

    /// Service → reference, as the manifests print them.
    pub fn references(&self) -> serde_json::Map<String, serde_json::Value> {
        self.images.iter().map(|(s, r)| (s.clone(), serde_json::Value::String(r.clone()))).collect()
    }

    /// The short form of the recipe, in names.
    pub fn short(&self) -> &str {
        &self.recipe[..12]
    }

    /// Tags of the image (and its snapshots) in every region.
    pub fn image_tags(&self) -> Vec<(String, String)> {
        vec![
            ("Name".into(), self.name.clone()),
            (super::aws::TAG_MANAGED.into(), "true".into()),
            (TAG_RECIPE.into(), self.recipe.clone()),
            (TAG_RELEASE.into(), self.release.clone()),
            (TAG_SGBOX_VERSION.into(), self.sgbox_version.clone()),
            (TAG_REFS.into(), if self.official_refs { "official".into() } else { "mirror".into() }),
        ]
    }

    /// Tags of the build's temporary resources: found and removed by tag after a killed run.
    pub fn builder_tags(&self, role: &str) -> Vec<(String, String)> {
        vec![
            ("Name".into(), format!("sgbox-image-{}-{role}", self.short())),
            (super::aws::TAG_MANAGED.into(), "true".into()),
            (TAG_BUILD.into(), self.recipe.clone()),
            (super::aws::TAG_ROLE.into(), role.into()),
        ]
    }

    /// Every region the image ends up in, the build's own first.
    pub fn regions(&self) -> Vec<String> {
        let mut all = vec![self.region.clone()];
        for r in &self.copy_to {
            if !all.contains(r) {
                all.push(r.clone());
            }
        }
        all
    }

    /// The plan `--dry-run` prints: what would be created, and removed again.
    pub fn plan_lines(&self) -> Vec<String> {
        let mut l = vec![
            format!("Image        {} (recipe {})", self.name, self.short()),
            format!(
                "Sourcegraph  {} ({} images, {} references)",
                self.release,
                self.images.len(),
                if self.official_refs { "official" } else { "the mirror's" }
            ),
            format!(
                "Region       {}{}",
                self.region,
                if self.copy_to.is_empty() { String::new() } else { format!(", copied to {}", self.copy_to.join(", ")) }
            ),
            "Would create (temporary, removed on success and on failure):".into(),
            "  + security-group  no inbound rule (the builder is never connected to)".into(),
            format!(
                "  + instance        {} from Debian 13, IMDSv2 required, {} GiB gp3 root and a blank {} GiB gp3 data volume{}, the bake user-data; powers itself off",
                self.builder_type,
                self.root_gb,
                self.data_gb,
                if self.encrypted { " (encrypted)" } else { " (unencrypted: public-safe)" }
            ),
            "Would create (kept):".into(),
        ];
        for r in self.regions() {
            l.push(format!(
                "  + image           {} in {r}: IMDSv2 required, ENA, {} snapshots (root, blank data volume), deprecated after {}{}",
                self.name,
                if self.encrypted { "encrypted" } else { "unencrypted" },
                self.deprecate_at,
                if self.public { ", public" } else { ", private" }
            ));
        }
        l.push(format!(
            "A launch without sgbox (a console) gets the box of {} from {}: HTTP on port 80, the site admin made by the box (sudo cat {})",
            self.release,
            crate::render::CONSOLE_CONFIG,
            crate::render::SITE_ADMIN_FILE
        ));
        l
    }
}

/// The bake's verdict from its console (the last `sgbox-bake:` line that is one): None while it
/// has said nothing yet.
pub fn bake_outcome(console: &str, recipe: &str) -> Option<std::result::Result<(), String>> {
    let mut outcome = None;
    for l in console.lines() {
        let Some(rest) = l.split("sgbox-bake: ").nth(1) else { continue };
        let rest = rest.trim_end_matches('\r').trim();
        if let Some(r) = rest.strip_prefix("ok recipe=") {
            outcome = Some(if r == recipe { Ok(()) } else { Err(format!("the builder baked recipe {r}, not {recipe}")) });
        } else if let Some(step) = rest.strip_prefix("failed step=") {
            outcome = Some(Err(format!("the bake failed at step {step}")));
        }
    }
    outcome
}

/// What the box installs at first boot (the same list as the box's user-data), baked in.
fn packages(cloud: Cloud) -> Vec<&'static str> {
    let mut p = vec!["docker.io", "docker-cli", "docker-compose"];
    if crate::render::uses_crun(cloud) {
        p.push("crun");
    }
    p.push("curl");
    p
}

/// The builder's cloud-config: no key, nothing inbound (the image's default user, which cloud-init
/// makes anyway, is deleted by the scrub); the bake script and its inputs,
/// started outside cloud-init (it waits for cloud-init to finish, then cleans cloud-init's state).
fn bake_user_data(spec: &ImageSpec, packages: &[&str], insecure: Option<&str>) -> String {
    let q = |s: &str| serde_json::to_string(s).expect("a string");
    let refs: String = spec.images.iter().map(|(n, r)| format!("      {n} {r}\n")).collect();
    let env = format!(
        "      RECIPE={}\n      RELEASE={}\n      SGBOX_VERSION={}\n      PACKAGES={}\n      INSECURE_REGISTRY={}\n",
        spec.recipe,
        spec.release,
        spec.sgbox_version,
        shlex::try_quote(&packages.join(" ")).expect("no NUL"),
        insecure.unwrap_or("")
    );
    let script: String = BAKE_SH.lines().map(|l| if l.is_empty() { "\n".to_string() } else { format!("      {l}\n") }).collect();
    format!(
        "#cloud-config\n# sgbox image bake: Sourcegraph {release} (recipe {short}). No key is given: nothing logs in.\nssh_pwauth: false\nwrite_files:\n  - path: /etc/sgbox/bake.env\n    permissions: {p644}\n    content: |\n{env}  - path: /etc/sgbox/bake-images\n    permissions: {p644}\n    content: |\n{refs}  - path: {console}\n    permissions: {p644}\n    encoding: gz+b64\n    content: {console_b64}\n  - path: /usr/local/sbin/sgbox-bake\n    permissions: {p755}\n    content: |\n{script}runcmd:\n  - [systemd-run, --unit=sgbox-bake, --no-block, /usr/local/sbin/sgbox-bake]\n",
        release = spec.release,
        short = spec.short(),
        p644 = q("0644"),
        p755 = q("0755"),
        console = BAKE_CONSOLE_CONFIG,
        console_b64 = crate::render::gz_b64(&spec.console_config),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Layer;

    fn spec(pairs: &[(&'static str, &str)], public: bool) -> ImageSpec {
        let layer = Layer::from_flags(pairs.iter().map(|(k, v)| (*k, Some(v.to_string()))));
        let s = Settings::resolve(&layer).unwrap();
        let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_000_000);
        ImageSpec::of(&ImageRequest { settings: &s, region: "us-east-1".into(), copy_to: vec!["eu-west-1".into()], public, encrypted: !public, now })
            .unwrap()
    }

    #[test]
    fn the_recipe_names_the_release_its_images_and_how_they_are_stored() {
        let a = spec(&[("cloud", "aws"), ("version", "7.5.4453")], false);
        assert_eq!(a.recipe, spec(&[("cloud", "aws"), ("version", "7.5.4453")], false).recipe, "the same inputs, the same recipe");
        assert_ne!(a.recipe, spec(&[("cloud", "aws"), ("version", "7.4.0")], false).recipe, "another release");
        let public = spec(&[("cloud", "aws"), ("version", "7.5.4453")], true);
        assert_ne!(a.recipe, public.recipe, "public images are unencrypted: another image");
        assert!(!public.encrypted && public.public);
        assert!(a.name.starts_with("sgbox-sourcegraph-7.5.4453-") && a.name.ends_with(a.short()), "{}", a.name);
        assert!(a.encrypted && a.official_refs);
        assert!(a.images.iter().all(|(_, r)| r.starts_with("index.docker.io/") && r.contains("@sha256:")), "pulled by digest: {:?}", a.images);
        assert_eq!(a.deprecate_at, "2027-11-30T00:53:20Z", "a year after the build");
        assert_eq!(a.regions(), ["us-east-1", "eu-west-1"]);
    }

    #[test]
    fn the_bake_user_data_carries_no_key_and_lists_every_image() {
        let a = spec(&[("cloud", "aws"), ("version", "7.5.4453")], false);
        let ud = &a.bake_user_data;
        assert!(ud.starts_with("#cloud-config\n"));
        assert!(!ud.contains("ssh_authorized_keys") && !ud.contains("users:"), "nobody logs in to the builder");
        for (n, r) in &a.images {
            assert!(ud.contains(&format!("      {n} {r}\n")), "{n}");
        }
        assert!(ud.contains(&format!("RECIPE={}", a.recipe)));
        assert!(ud.contains("sgbox-bake: ok recipe="), "the script prints its signal");
        assert!(ud.contains(&format!("  - path: {BAKE_CONSOLE_CONFIG}\n")), "the image's default configuration travels with the bake");
        assert!(
            BAKE_SH.contains(BAKE_CONSOLE_CONFIG) && BAKE_SH.contains(crate::render::CONSOLE_CONFIG),
            "and the bake puts it where cloud-init reads it"
        );
        let gz = a.bake_user_data_gzip();
        assert!(gz.len() < crate::render::AWS_USER_DATA_LIMIT, "EC2 takes at most 16 KiB of user-data: {} bytes gzipped", gz.len());
        let mut back = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gz[..]), &mut back).unwrap();
        assert_eq!(&back, ud, "cloud-init unpacks what the builder gets");
        let plan = a.plan_lines().join("\n");
        assert!(plan.contains("no inbound rule") && plan.contains("IMDSv2") && plan.contains("eu-west-1"), "{plan}");
    }

    #[test]
    fn only_the_bakes_own_last_word_counts() {
        let r = "abc123";
        assert_eq!(bake_outcome("boot\nsgbox-bake: started release=7.5 recipe=abc123\n", r), None, "still baking");
        assert_eq!(bake_outcome("[  80.1] sgbox-bake: ok recipe=abc123\r\n", r), Some(Ok(())));
        assert!(bake_outcome("sgbox-bake: failed step=pull:frontend\n", r).unwrap().unwrap_err().contains("pull:frontend"));
        assert!(bake_outcome("sgbox-bake: ok recipe=other\n", r).unwrap().is_err(), "another recipe's bake is not this one");
        assert_eq!(bake_outcome("sgbox-bake: failed step=x\nsgbox-bake: ok recipe=abc123\n", r), Some(Ok(())), "the last line wins");
    }
}

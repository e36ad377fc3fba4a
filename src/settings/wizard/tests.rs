use std::collections::VecDeque;
use std::net::IpAddr;
use std::path::PathBuf;

use super::*;
use crate::error::Interrupted;

/// What the scripted user does at the next question.
#[derive(Clone, Debug)]
enum Reply {
    /// Pick the choice with this value ("" is a choice that sets nothing, e.g. any zone).
    Pick(&'static str),
    /// Type this (an empty string takes the default).
    Type(&'static str),
    Yes,
    No,
    CtrlC,
}
use Reply::*;

#[derive(Default)]
struct Script {
    replies: VecDeque<Reply>,
    /// Everything shown: questions, their choices' values, notes, rejections.
    seen: Vec<String>,
}

impl Script {
    fn new(replies: &[Reply]) -> Script {
        Script { replies: replies.iter().cloned().collect(), seen: vec![] }
    }
    fn next(&mut self, q: &str) -> Reply {
        self.replies.pop_front().unwrap_or_else(|| panic!("no reply scripted for {q:?}; seen: {:#?}", self.seen))
    }
    fn asked(&self, q: &str) -> bool {
        self.seen.iter().any(|s| s.starts_with("? ") && s.contains(q))
    }
}

impl Ask for Script {
    fn select(&mut self, message: &str, help: &str, choices: &[Choice], default: usize) -> anyhow::Result<usize> {
        self.seen.push(format!(
            "? {message} [{}] default={} help={help}",
            choices.iter().map(|c| c.value.as_str()).collect::<Vec<_>>().join(","),
            choices[default].value
        ));
        match self.next(message) {
            Pick(v) => Ok(choices.iter().position(|c| c.value == v).unwrap_or_else(|| panic!("{v} is not a choice of {message}: {choices:?}"))),
            CtrlC => Err(Interrupted.into()),
            other => panic!("{message}: a list question got {other:?}"),
        }
    }
    fn text(&mut self, message: &str, help: &str, default: Option<&str>, check: Check) -> anyhow::Result<String> {
        self.seen.push(format!("? {message} default={default:?} help={help}"));
        loop {
            let typed = match self.next(message) {
                Type(t) => t.to_string(),
                CtrlC => return Err(Interrupted.into()),
                other => panic!("{message}: a text question got {other:?}"),
            };
            let answer = if typed.is_empty() { default.unwrap_or("").to_string() } else { typed };
            match check(&answer) {
                Ok(()) => return Ok(answer),
                Err(m) => self.seen.push(format!("! {m}")),
            }
        }
    }
    fn confirm(&mut self, message: &str, _help: &str, _default: bool) -> anyhow::Result<bool> {
        self.seen.push(format!("? {message}"));
        match self.next(message) {
            Yes => Ok(true),
            No => Ok(false),
            CtrlC => Err(Interrupted.into()),
            other => panic!("{message}: a yes/no question got {other:?}"),
        }
    }
    fn say(&mut self, line: &str) {
        self.seen.push(line.to_string());
    }
}

struct World {
    region: Option<&'static str>,
    address: Option<&'static str>,
    existing: Option<&'static str>,
}

impl Lookups for World {
    fn default_region(&self, _cloud: Cloud) -> Option<(String, String)> {
        self.region.map(|r| (r.to_string(), "from AWS_REGION".to_string()))
    }
    fn zones(&self, _cloud: Cloud, region: &str, _machine: &str) -> Result<Vec<String>, String> {
        Ok(vec![format!("{region}a"), format!("{region}b")])
    }
    fn public_address(&self) -> Result<(IpAddr, String), String> {
        self.address.map(|a| (a.parse().unwrap(), "as a test sees it".to_string())).ok_or_else(|| "no network".to_string())
    }
    fn existing(&self, name: &str) -> Option<(PathBuf, String)> {
        (self.existing == Some(name)).then(|| (PathBuf::from(format!("/state/{name}/deployment.json")), String::new()))
    }
}

const NOWHERE: World = World { region: None, address: None, existing: None };

fn flags(pairs: &[(&'static str, &str)]) -> Layer {
    Layer::from_flags(pairs.iter().map(|(k, v)| (*k, Some(v.to_string()))))
}

fn run(given: &Layer, world: &World, replies: &[Reply]) -> (anyhow::Result<Outcome>, Script) {
    let mut s = Script::new(replies);
    let r = walk(given, &[Cloud::Aws, Cloud::Local], &mut s, world);
    assert!(s.replies.is_empty() || r.is_err(), "replies left over: {:?}\nseen: {:#?}", s.replies, s.seen);
    (r, s)
}

fn toml_of(o: Outcome) -> String {
    match o {
        Outcome::New(l) => Settings::resolve(&l).unwrap().to_toml(),
        other => panic!("expected new settings, got {other:?}"),
    }
}

#[test]
fn a_local_walk_through_gives_what_the_same_flags_give() {
    let (r, s) = run(&Layer::default(), &NOWHERE, &[Type("demo"), Pick("local"), Pick("7.4.0"), Type("30"), Pick("none"), Type(""), Type("")]);
    let written = toml_of(r.unwrap());
    let same = Settings::resolve(&flags(&[("name", "demo"), ("cloud", "local"), ("version", "7.4"), ("data-disk-gb", "30")])).unwrap().to_toml();
    assert_eq!(written, same);
    // The local machine's limits are said; clouds-only questions are not asked.
    assert!(s.seen.iter().any(|l| l.contains("local-2x4") && l.contains("not for a team")), "{:#?}", s.seen);
    assert!(!s.asked("Region") && !s.asked("Who may reach") && !s.asked("Size"), "{:#?}", s.seen);
    // Let's Encrypt cannot reach a box on this machine: not offered.
    assert!(s.seen.iter().any(|l| l.starts_with("? TLS?") && !l.contains("letsencrypt")), "{:#?}", s.seen);
}

#[test]
fn an_aws_walk_through_offers_the_configured_region_its_zones_prices_and_the_callers_address() {
    let world = World { region: Some("eu-west-1"), address: Some("198.51.100.23"), existing: None };
    let (r, s) = run(
        &Layer::default(),
        &world,
        &[
            Type(""),
            Pick("aws"),
            Pick("eu-west-1"),
            Pick("eu-west-1b"),
            Pick("S"),
            Pick("7.5.4453"),
            Type(""),
            Type(""),
            Pick("letsencrypt"),
            Type("sg.example.com"),
            Type("ops@example.com"),
            Type(""),
        ],
    );
    let written = toml_of(r.unwrap());
    let same = Settings::resolve(&flags(&[
        ("cloud", "aws"),
        ("region", "eu-west-1"),
        ("zone", "eu-west-1b"),
        ("size", "S"),
        ("ssh-cidr", "198.51.100.23/32"),
        ("tls", "letsencrypt"),
        ("hostname", "sg.example.com"),
        ("tls-email", "ops@example.com"),
    ]))
    .unwrap()
    .to_toml();
    assert_eq!(written, same);
    let region_q = s.seen.iter().find(|l| l.starts_with("? Region?")).unwrap();
    assert!(region_q.contains("default=eu-west-1") && region_q.contains("from AWS_REGION"), "{region_q}");
    let size_q = s.seen.iter().find(|l| l.starts_with("? Size?")).unwrap();
    assert!(size_q.contains("eu-west-1") && size_q.contains(crate::release::pricing::AS_OF), "{size_q}");
    let cidr_q = s.seen.iter().find(|l| l.starts_with("? Who may reach")).unwrap();
    assert!(cidr_q.contains("198.51.100.23/32") && cidr_q.contains("as a test sees it"), "{cidr_q}");
}

#[test]
fn the_size_list_shows_each_tiers_monthly_cost_in_the_region() {
    struct Labels(Vec<String>);
    impl Ask for Labels {
        fn select(&mut self, message: &str, _h: &str, choices: &[Choice], default: usize) -> anyhow::Result<usize> {
            if message.starts_with("Size") {
                self.0 = choices.iter().map(|c| c.label.clone()).collect();
                return Err(Interrupted.into());
            }
            Ok(choices.iter().position(|c| c.value == "aws").unwrap_or(default))
        }
        fn text(&mut self, _m: &str, _h: &str, d: Option<&str>, _c: Check) -> anyhow::Result<String> {
            Ok(d.unwrap_or("").to_string())
        }
        fn confirm(&mut self, _m: &str, _h: &str, d: bool) -> anyhow::Result<bool> {
            Ok(d)
        }
        fn say(&mut self, _l: &str) {}
    }
    let mut labels = Labels(vec![]);
    let world = World { region: Some("us-east-1"), ..NOWHERE };
    let e = walk(&Layer::default(), &[Cloud::Aws], &mut labels, &world).unwrap_err();
    assert!(e.downcast_ref::<Interrupted>().is_some());
    let xs = crate::release::pricing::aws_monthly("m6a.2xlarge", "us-east-1", 250).unwrap().total;
    assert_eq!(labels.0.len(), 5);
    assert!(labels.0[0].contains("500 users") && labels.0[0].contains(&format!("~${xs:.0}/month")), "{:?}", labels.0);
    assert!(labels.0[4].contains("m6a.24xlarge"), "{:?}", labels.0);
}

#[test]
fn a_bad_answer_is_asked_again_with_the_flags_message() {
    let (r, s) = run(
        &flags(&[("cloud", "local")]),
        &NOWHERE,
        &[
            Type("Bad Name"),
            Type("demo"),
            Pick("7.5.4453"),
            Type("lots"),
            Type("5"),
            Type("40"),
            Pick("custom"),
            Type("bad_host!"),
            Type("sg.example.com"),
            Type("/nonexistent.pem"),
            CtrlC,
        ],
    );
    assert!(r.unwrap_err().downcast_ref::<Interrupted>().is_some());
    let rejected: Vec<&String> = s.seen.iter().filter(|l| l.starts_with("! ")).collect();
    let flag_msg = |k: &'static str, v: &str| Settings::resolve(&flags(&[("cloud", "local"), (k, v)])).unwrap_err().message;
    assert_eq!(rejected.len(), 5, "{:#?}", s.seen);
    assert!(rejected[0].contains(&flag_msg("name", "Bad Name")), "{rejected:?}");
    assert!(rejected[1].contains(&flag_msg("data-disk-gb", "lots")), "{rejected:?}");
    assert!(rejected[2].contains("5 GB is out of range") && rejected[2].contains("fix:"), "{rejected:?}");
    assert!(rejected[3].contains("'bad_host!' is not a valid host name"), "{rejected:?}");
    assert!(rejected[4].contains("cannot read /nonexistent.pem"), "{rejected:?}");
    assert!(!rejected.iter().any(|l| l.contains("answered at the prompt")), "{rejected:?}");
}

#[test]
fn given_values_are_shown_not_asked_and_a_bad_one_ends_the_walk_like_the_flag() {
    let given = flags(&[("cloud", "aws"), ("region", "us-east-2"), ("ssh-cidr", "203.0.113.7"), ("size", "M")]);
    let world = World { region: Some("eu-west-1"), address: Some("198.51.100.23"), existing: None };
    let (r, s) = run(&given, &world, &[Type("box"), Pick(""), Pick("7.5.4453"), Type(""), Pick("none"), Type(""), Type("")]);
    let written = toml_of(r.unwrap());
    assert!(written.contains("region = \"us-east-2\"") && written.contains("ssh-cidr = \"203.0.113.7/32\""), "{written}");
    assert!(!s.asked("Where should") && !s.asked("Region?") && !s.asked("Size?") && !s.asked("Who may reach"), "{:#?}", s.seen);
    assert!(s.seen.iter().any(|l| l == "Where should the box run: aws (from --cloud)"), "{:#?}", s.seen);
    assert!(s.seen.iter().any(|l| l.starts_with("Region: us-east-2 (from --region)")), "{:#?}", s.seen);

    // A bad flag is exit 2 at its turn, with the message the flag gets without questions.
    let given = flags(&[("cloud", "aws"), ("size", "XXL")]);
    let (r, _) = run(&given, &world, &[Type("box"), Pick("us-east-1"), Pick("")]);
    let e = r.unwrap_err();
    let u = e.downcast_ref::<UserError>().expect("a user error");
    assert_eq!(u.field.as_deref(), Some("--size"));
}

#[test]
fn an_existing_deployment_is_resumed_not_asked_about() {
    let world = World { existing: Some("sourcegraph"), ..NOWHERE };
    let (r, _) = run(&Layer::default(), &world, &[Type(""), Yes]);
    assert!(matches!(r.unwrap(), Outcome::Resume { ref name, .. } if name == "sourcegraph"));
    let (r, s) =
        run(&Layer::default(), &world, &[Type(""), No, Type("other"), Pick("local"), Pick("7.5.4453"), Type(""), Pick("none"), Type(""), Type("")]);
    assert!(toml_of(r.unwrap()).contains("name = \"other\""), "{:#?}", s.seen);
    let (r, _) = run(&flags(&[("name", "sourcegraph")]), &world, &[]);
    assert!(matches!(r.unwrap(), Outcome::Resume { .. }));
}

#[test]
fn without_an_address_the_cidr_has_no_default_and_says_why() {
    let (r, s) = run(
        &flags(&[("cloud", "aws"), ("region", "us-east-1"), ("name", "x1")]),
        &NOWHERE,
        &[Pick(""), Pick("XS"), Pick("7.5.4453"), Type(""), Type(""), Type("0.0.0.0/0"), Type("192.0.2.0/24"), Pick("none"), Type(""), Type("")],
    );
    assert!(toml_of(r.unwrap()).contains("ssh-cidr = \"192.0.2.0/24\""));
    let q = s.seen.iter().find(|l| l.starts_with("? Who may reach")).unwrap();
    assert!(q.contains("default=None") && q.contains("could not be found (no network)"), "{q}");
    assert!(s.seen.iter().any(|l| l.starts_with("! ") && l.contains("allow-ssh-from-anywhere")), "{:#?}", s.seen);
    assert!(s.seen.iter().any(|l| l == "! an answer is needed here"), "{:#?}", s.seen);
}

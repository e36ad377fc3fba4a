//! The least-privilege IAM policy sgbox needs on AWS (`sgbox iam-policy --cloud aws`, and
//! `docs/aws-iam-policy.json`, which a test keeps equal to it).
//!
//! Every action is named (no wildcards), so that removing any one of them breaks a test that runs
//! `up`, `status`, the snapshot/restore path and `down` with a user holding exactly this policy
//! (moto enforces the actions). What changes or deletes an existing resource is allowed only on
//! resources tagged `sgbox:managed=true`, which only sgbox's creations carry (real AWS evaluates
//! these conditions; moto does not, so they are checked here, by a unit test, not there).
//! Creations themselves are not conditioned: RunInstances touches images, subnets and groups that
//! are not sgbox's, and a creation destroys nothing.

use serde_json::{json, Value};

/// Reads: EC2 has no resource-level permissions for Describe*; STS GetCallerIdentity needs none.
pub const READ: &[&str] = &[
    "ec2:DescribeAddresses",
    "ec2:DescribeImages",
    "ec2:DescribeInstanceTypeOfferings",
    "ec2:DescribeInstanceTypes",
    "ec2:DescribeInstances",
    "ec2:DescribeKeyPairs",
    "ec2:DescribeSecurityGroups",
    "ec2:DescribeSnapshots",
    "ec2:DescribeSubnets",
    "ec2:DescribeVolumes",
    "ec2:DescribeVpcs",
    "ec2:GetConsoleOutput",
    "ssm:GetParameter",
];

/// Creations, each tagged at creation (TagSpecifications), which also needs CreateTags below.
pub const CREATE: &[&str] =
    &["ec2:AllocateAddress", "ec2:CreateSecurityGroup", "ec2:CreateSnapshot", "ec2:CreateVolume", "ec2:ImportKeyPair", "ec2:RunInstances"];

/// Changes and deletions: only of what carries `sgbox:managed=true`.
pub const CHANGE_OWN: &[&str] = &[
    "ec2:AssociateAddress",
    "ec2:AttachVolume",
    "ec2:AuthorizeSecurityGroupIngress",
    "ec2:CreateTags",
    "ec2:DeleteKeyPair",
    "ec2:DeleteSecurityGroup",
    "ec2:DeleteSnapshot",
    "ec2:DeleteVolume",
    "ec2:DetachVolume",
    "ec2:DisassociateAddress",
    "ec2:ReleaseAddress",
    "ec2:RevokeSecurityGroupIngress",
    "ec2:StartInstances",
    "ec2:StopInstances",
    "ec2:TerminateInstances",
];

/// The policy document, with `without` left out (for the test that removes each action).
pub fn document_without(without: Option<&str>) -> Value {
    let keep = |list: &[&str]| list.iter().filter(|a| Some(**a) != without).map(|a| a.to_string()).collect::<Vec<_>>();
    let mut doc = json!({
        "Version": "2012-10-17",
        "Statement": [
            { "Sid": "SgboxRead", "Effect": "Allow", "Action": keep(READ), "Resource": "*" },
            { "Sid": "SgboxCreate", "Effect": "Allow", "Action": keep(CREATE), "Resource": "*" },
            {
                "Sid": "SgboxTagOnCreate",
                "Effect": "Allow",
                "Action": keep(&["ec2:CreateTags"]),
                "Resource": "*",
                "Condition": { "StringEquals": { "ec2:CreateAction": ["AllocateAddress", "CreateSecurityGroup", "CreateSnapshot", "CreateVolume", "ImportKeyPair", "RunInstances"] } }
            },
            {
                "Sid": "SgboxChangeOwn",
                "Effect": "Allow",
                "Action": keep(CHANGE_OWN),
                "Resource": "*",
                "Condition": { "StringEquals": { "aws:ResourceTag/sgbox:managed": "true" } }
            }
        ]
    });
    // A statement left with no action is not a statement.
    doc["Statement"].as_array_mut().expect("statements").retain(|st| st["Action"].as_array().is_some_and(|a| !a.is_empty()));
    doc
}

/// The policy sgbox ships.
pub fn document() -> Value {
    document_without(None)
}

/// Every action the policy allows.
#[cfg(test)]
pub fn actions() -> Vec<&'static str> {
    READ.iter().chain(CREATE).chain(CHANGE_OWN).copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destructive_actions_are_conditioned_on_sgbox_tags_and_nothing_is_a_wildcard() {
        let d = document();
        let st = d["Statement"].as_array().unwrap();
        for s in st {
            for a in s["Action"].as_array().unwrap() {
                assert!(!a.as_str().unwrap().contains('*'), "{a}");
            }
        }
        let own = st.iter().find(|s| s["Sid"] == "SgboxChangeOwn").unwrap();
        assert_eq!(own["Condition"]["StringEquals"]["aws:ResourceTag/sgbox:managed"], "true");
        for a in own["Action"].as_array().unwrap() {
            let a = a.as_str().unwrap();
            assert!(!READ.contains(&a) && !CREATE.contains(&a), "{a} is allowed without its condition elsewhere");
        }
        for destructive in ["ec2:TerminateInstances", "ec2:DeleteVolume", "ec2:DeleteSnapshot", "ec2:ReleaseAddress", "ec2:StopInstances"] {
            assert!(CHANGE_OWN.contains(&destructive), "{destructive}");
        }
        let docs = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/aws-iam-policy.json"));
        assert_eq!(serde_json::from_str::<Value>(docs).unwrap(), d, "docs/aws-iam-policy.json is `sgbox iam-policy --cloud aws`");
    }
}

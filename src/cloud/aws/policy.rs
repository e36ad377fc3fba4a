//! The least-privilege IAM policies sgbox needs on AWS (`sgbox iam-policy --cloud aws [--for
//! image-build]`, and `docs/aws-iam-policy.json` / `docs/aws-iam-policy-image-build.json`, which a
//! test keeps equal to them): one for the user or role that runs boxes, one for the pipeline that
//! builds machine images (it needs neither volumes nor addresses; the box needs no image rights).
//!
//! Every action is named (no wildcards). What changes or deletes an existing resource is allowed
//! only on resources tagged `sgbox:managed=true`, which only sgbox's creations carry, each tagged
//! at creation (real AWS evaluates these conditions; moto does not, so they are checked here, by
//! a unit test, not there). Creations themselves are not conditioned: RunInstances touches images,
//! subnets and groups that are not sgbox's, CreateImage reads an instance, and a creation destroys
//! nothing. The moto tests run each life with a user holding exactly its policy (moto enforces the
//! actions): the box's life fails without any one action; the image build uses every one.

use serde_json::{json, Value};

/// Who the policy is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum For {
    /// `up`, `status`, `upgrade`, `rollback`, `down`: the box's life.
    Box,
    /// `image build`: the builder, the image, its copies, publishing.
    ImageBuild,
}

struct Lists {
    /// Reads: EC2 has no resource-level permissions for Describe*; STS GetCallerIdentity needs none.
    read: &'static [&'static str],
    /// Creations, each tagged at creation (TagSpecifications), which also needs CreateTags for
    /// exactly these creations.
    create: &'static [&'static str],
    /// Changes and deletions: only of what carries `sgbox:managed=true`.
    change_own: &'static [&'static str],
}

const BOX: Lists = Lists {
    read: &[
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
    ],
    create: &["ec2:AllocateAddress", "ec2:CreateSecurityGroup", "ec2:CreateSnapshot", "ec2:CreateVolume", "ec2:ImportKeyPair", "ec2:RunInstances"],
    change_own: &[
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
    ],
};

/// The image build: a builder with no key and no inbound rule, its console (the bake's outcome),
/// the image and its copies (tagged, IMDSv2, deprecation), publishing after the snapshot check;
/// what a failed run made is deregistered and its snapshots deleted.
const IMAGE_BUILD: Lists = Lists {
    read: &[
        "ec2:DescribeImages",
        "ec2:DescribeInstances",
        "ec2:DescribeRegions",
        "ec2:DescribeSecurityGroups",
        "ec2:DescribeSnapshots",
        "ec2:DescribeVpcs",
        "ec2:GetConsoleOutput",
        "ec2:GetImageBlockPublicAccessState",
        "ssm:GetParameter",
    ],
    create: &["ec2:CopyImage", "ec2:CreateImage", "ec2:CreateSecurityGroup", "ec2:RunInstances"],
    change_own: &[
        "ec2:CreateTags",
        "ec2:DeleteSecurityGroup",
        "ec2:DeleteSnapshot",
        "ec2:DeregisterImage",
        "ec2:EnableImageDeprecation",
        "ec2:ModifyImageAttribute",
        "ec2:TerminateInstances",
    ],
};

fn lists(of: For) -> &'static Lists {
    match of {
        For::Box => &BOX,
        For::ImageBuild => &IMAGE_BUILD,
    }
}

/// The policy document, with `without` left out (for the test that removes each action).
pub fn document_without(of: For, without: Option<&str>) -> Value {
    let l = lists(of);
    let keep = |list: &[&str]| list.iter().filter(|a| Some(**a) != without).map(|a| a.to_string()).collect::<Vec<_>>();
    let sid = match of {
        For::Box => "Sgbox",
        For::ImageBuild => "SgboxImageBuild",
    };
    // CreateTags during a creation is authorized with the creation's name as ec2:CreateAction.
    let create_actions: Vec<String> = l.create.iter().filter(|a| a.starts_with("ec2:")).map(|a| a.trim_start_matches("ec2:").to_string()).collect();
    let mut doc = json!({
        "Version": "2012-10-17",
        "Statement": [
            { "Sid": format!("{sid}Read"), "Effect": "Allow", "Action": keep(l.read), "Resource": "*" },
            { "Sid": format!("{sid}Create"), "Effect": "Allow", "Action": keep(l.create), "Resource": "*" },
            {
                "Sid": format!("{sid}TagOnCreate"),
                "Effect": "Allow",
                "Action": keep(&["ec2:CreateTags"]),
                "Resource": "*",
                "Condition": { "StringEquals": { "ec2:CreateAction": create_actions } }
            },
            {
                "Sid": format!("{sid}ChangeOwn"),
                "Effect": "Allow",
                "Action": keep(l.change_own),
                "Resource": "*",
                "Condition": { "StringEquals": { "aws:ResourceTag/sgbox:managed": "true" } }
            }
        ]
    });
    // A statement left with no action is not a statement.
    doc["Statement"].as_array_mut().expect("statements").retain(|st| st["Action"].as_array().is_some_and(|a| !a.is_empty()));
    doc
}

/// The policy sgbox ships for `of`.
pub fn document(of: For) -> Value {
    document_without(of, None)
}

/// Every action the policy allows.
#[cfg(test)]
pub fn actions(of: For) -> Vec<&'static str> {
    let l = lists(of);
    l.read.iter().chain(l.create).chain(l.change_own).copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destructive_actions_are_conditioned_on_sgbox_tags_and_nothing_is_a_wildcard() {
        for (of, sid, file, destructive) in [
            (
                For::Box,
                "SgboxChangeOwn",
                include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/aws-iam-policy.json")),
                &["ec2:TerminateInstances", "ec2:DeleteVolume", "ec2:DeleteSnapshot", "ec2:ReleaseAddress", "ec2:StopInstances"][..],
            ),
            (
                For::ImageBuild,
                "SgboxImageBuildChangeOwn",
                include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/aws-iam-policy-image-build.json")),
                &["ec2:TerminateInstances", "ec2:DeregisterImage", "ec2:DeleteSnapshot", "ec2:ModifyImageAttribute", "ec2:DeleteSecurityGroup"][..],
            ),
        ] {
            let d = document(of);
            let st = d["Statement"].as_array().unwrap();
            for s in st {
                for a in s["Action"].as_array().unwrap() {
                    assert!(!a.as_str().unwrap().contains('*'), "{a}");
                }
            }
            let own = st.iter().find(|s| s["Sid"] == sid).unwrap();
            assert_eq!(own["Condition"]["StringEquals"]["aws:ResourceTag/sgbox:managed"], "true");
            let l = lists(of);
            for a in own["Action"].as_array().unwrap() {
                let a = a.as_str().unwrap();
                assert!(!l.read.contains(&a) && !l.create.contains(&a), "{a} is allowed without its condition elsewhere");
            }
            for x in destructive {
                assert!(l.change_own.contains(x), "{of:?}: {x}");
            }
            assert_eq!(serde_json::from_str::<Value>(file).unwrap(), d, "the docs/ file is `sgbox iam-policy` for {of:?}");
        }
        // Neither policy grants what only the other needs.
        let image = actions(For::ImageBuild);
        for a in ["ec2:CreateVolume", "ec2:AttachVolume", "ec2:AllocateAddress", "ec2:ImportKeyPair", "ec2:AuthorizeSecurityGroupIngress"] {
            assert!(!image.contains(&a), "the image build never needs {a}");
        }
        let boxes = actions(For::Box);
        for a in ["ec2:CreateImage", "ec2:CopyImage", "ec2:ModifyImageAttribute", "ec2:DeregisterImage"] {
            assert!(!boxes.contains(&a), "a box never needs {a}");
        }
    }
}

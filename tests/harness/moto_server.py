#!/usr/bin/env python3
"""moto_server (same arguments), with two of real EC2's behaviours moto 5.2 lacks.

1. Each form-encoded request's body is kept as its client sent it.

moto verifies SigV4 signatures when it enforces IAM (INITIAL_NO_AUTH_ACTION_COUNT), but in server
mode it signs again from the *parsed* form, re-encoded the way botocore encodes (a space as `+`).
AWS checks the bytes it received: a client that encodes a space as `%20` — the Rust SDK — is
refused by moto (AuthFailure) for any parameter with a space (an image's description), and by
nobody else. Here the body is read (and cached) before the form is parsed, so moto's check sees
the bytes that were signed.

2. CreateImage and CopyImage tag the image's snapshots at creation (TagSpecifications with
ResourceType `snapshot`): moto raises NotImplementedError for the first and ignores
TagSpecifications on the second. sgbox tags at creation because its IAM policy lets it change only
what carries sgbox:managed.
"""
import sys

from moto.core import request as moto_request

_init = moto_request.Request.__init__


def _init_keeping_body(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.mimetype == "application/x-www-form-urlencoded":
        self.get_data(cache=True, parse_form_data=False)


moto_request.Request.__init__ = _init_keeping_body


def _split(specs):
    """(tags for the image, tags for its snapshots) from TagSpecifications."""
    from moto.ec2.exceptions import InvalidTaggableResourceType

    image, snaps = [], []
    for spec in specs or []:
        kind = spec.get("ResourceType")
        if kind == "image":
            image += spec.get("Tags", [])
        elif kind == "snapshot":
            snaps += spec.get("Tags", [])
        else:
            raise InvalidTaggableResourceType(kind)
    return image, snaps


def _tag_snapshots(ami, tags):
    snap = getattr(ami, "ebs_snapshot", None)
    if snap is not None:
        for t in tags:
            snap.add_tag(t["Key"], t["Value"])


from moto.ec2.models.amis import AmiBackend  # noqa: E402
from moto.ec2.responses.amis import AmisResponse  # noqa: E402

_create_image = AmiBackend.create_image


def _create_image_tagging_snapshots(self, instance_id, name, description, tag_specifications):
    image_tags, snap_tags = _split(tag_specifications)
    specs = [{"ResourceType": "image", "Tags": image_tags}] if image_tags else []
    ami = _create_image(self, instance_id, name, description, tag_specifications=specs)
    _tag_snapshots(ami, snap_tags)
    return ami


AmiBackend.create_image = _create_image_tagging_snapshots

_copy_image = AmisResponse.copy_image


def _copy_image_tagging(self):
    result = _copy_image(self)
    image_tags, snap_tags = _split(self._get_param("TagSpecifications", []))
    ami = self.ec2_backend.amis[result.result["ImageId"]]
    for t in image_tags:
        ami.add_tag(t["Key"], t["Value"])
    _tag_snapshots(ami, snap_tags)
    return result


AmisResponse.copy_image = _copy_image_tagging

from moto.server import main  # noqa: E402  (after the patch: the server's request class)

if __name__ == "__main__":
    sys.exit(main())

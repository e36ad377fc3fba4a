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

3. An image maps every EBS volume of the instance it was made from, each with a snapshot of its
own; a copy carries them all; and a launch creates every volume its image maps, except a device
the request maps itself (`NoDevice` leaves it out). moto's images map only a root of their own,
and moto launches only what the request maps: an image's extra volume (a baked image's blank data
volume) would be invisible, and so would a launch that forgot to leave it out.

4. `--port-file FILE` (with `-p 0`): listen on a port the kernel picks and write it to FILE once
listening. A port the caller picks and moto binds a second later can be taken in between by another
test's server, and the caller would talk to that one (seen in CI: one test's key pair in another's
moto).
"""
import os
import signal
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
    instance = self.get_instance(instance_id)
    ami.extra_volumes = []
    for device, block in instance.get_block_device_mapping:
        if device == instance.root_device_name:
            continue
        volume = self.get_volume(block.volume_id)
        snap = self.create_snapshot(volume.id, f"Created by CreateImage({instance_id}) for {ami.id}", self.account_id, from_ami=ami.id)
        for t in snap_tags:
            snap.add_tag(t["Key"], t["Value"])
        ami.extra_volumes.append((device, snap, volume.size, bool(block.delete_on_termination), volume.volume_type))
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
    from moto.ec2.models import ec2_backends

    region = self._get_param("SourceRegion")
    source = ec2_backends[self.ec2_backend.account_id][region].amis[self._get_param("SourceImageId")]
    ami.extra_volumes = []
    for device, snap, size, delete, kind in getattr(source, "extra_volumes", []):
        copy = self.ec2_backend.copy_snapshot(snap.id, region, f"Copied for {ami.id} from {snap.id}", None)
        for t in snap_tags:
            copy.add_tag(t["Key"], t["Value"])
        ami.extra_volumes.append((device, copy, size, delete, kind))
    return result


AmisResponse.copy_image = _copy_image_tagging

from moto.ec2.models.amis import Ami  # noqa: E402
from moto.ec2.models.instances import InstanceBackend  # noqa: E402

_root_mapping = Ami.block_device_mappings


def _every_mapping(self):
    maps = _root_mapping.fget(self)
    for device, snap, size, delete, kind in getattr(self, "extra_volumes", []):
        maps.append({"DeviceName": device, "Ebs": {"SnapshotId": snap.id, "VolumeSize": size, "DeleteOnTermination": delete, "VolumeType": kind}})
    return maps


Ami.block_device_mappings = property(_every_mapping)

_run_instances = InstanceBackend.run_instances


def _run_instances_with_the_images_volumes(self, image_id, count, user_data, security_group_names, **kwargs):
    reservation = _run_instances(self, image_id, count, user_data, security_group_names, **kwargs)
    ami = self.amis.get(image_id)
    asked = {m.get("DeviceName") for m in kwargs.get("block_device_mappings") or []}
    for instance in reservation.instances:
        for device, snap, size, delete, kind in getattr(ami, "extra_volumes", []):
            if device not in asked:
                instance.add_block_device(size, device, snap.id, bool(snap.encrypted), delete, None, volume_type=kind)
    return reservation


InstanceBackend.run_instances = _run_instances_with_the_images_volumes

from moto.server import main  # noqa: E402  (after the patch: the server's request class)


def serve_reporting_port(argv):
    """moto.server.main's server (threaded, moto's request handler) on the port the kernel picks."""
    from werkzeug.serving import make_server

    from fault_proxy import write_port  # beside this file: the port file written the same way
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app

    port_file = argv[argv.index("--port-file") + 1]
    host = argv[argv.index("-H") + 1] if "-H" in argv else "127.0.0.1"
    app = DomainDispatcherApplication(create_backend_app)
    srv = make_server(host, 0, app, threaded=True, request_handler=MotoRequestHandler)
    port = srv.server_address[1]
    # As moto.server.main sets it: the port moto puts in URLs it returns.
    os.environ["MOTO_PORT"] = str(port)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    write_port(port_file, port)
    srv.serve_forever()


if __name__ == "__main__":
    if "--port-file" in sys.argv:
        sys.exit(serve_reporting_port(sys.argv[1:]))
    sys.exit(main())

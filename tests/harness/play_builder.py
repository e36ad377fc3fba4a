#!/usr/bin/env python3
"""Plays the part of `sgbox image build`'s builder where a real EC2 instance would bake: moto never
boots it. Waits for a running instance tagged sgbox:role=builder, reads the bake user-data sgbox
gave it (the recipe is in it), then does what a finished bake does: its console says so (through
the fault proxy's --play file, since moto's console is a fixed text) and it powers off
(StopInstances). Prints one JSON line: the instance, the recipe, the user-data.

  play_builder.py --endpoint URL --play FILE [--region R] [--outcome ok|failed:STEP] [--timeout S]
"""
import argparse
import base64
import gzip
import json
import os
import sys
import time

import boto3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--play", required=True)
    ap.add_argument("--region", default="us-east-1")
    ap.add_argument("--outcome", default="ok")
    ap.add_argument("--timeout", type=float, default=120)
    a = ap.parse_args()
    # The harness's keys (its admin, where moto enforces IAM), never sgbox's.
    ec2 = boto3.client(
        "ec2",
        endpoint_url=a.endpoint,
        region_name=a.region,
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
    )
    until = time.time() + a.timeout
    while True:
        r = ec2.describe_instances(
            Filters=[
                {"Name": "tag:sgbox:role", "Values": ["builder"]},
                {"Name": "instance-state-name", "Values": ["running"]},
            ]
        )
        found = [i for res in r["Reservations"] for i in res["Instances"]]
        if found:
            break
        if time.time() > until:
            print(json.dumps({"error": "no builder appeared"}))
            sys.exit(1)
        time.sleep(0.2)
    inst = found[0]["InstanceId"]
    ud = ec2.describe_instance_attribute(InstanceId=inst, Attribute="userData")["UserData"]["Value"]
    raw = base64.b64decode(ud)
    gzipped = raw[:2] == b"\x1f\x8b"
    user_data = (gzip.decompress(raw) if gzipped else raw).decode()
    recipe = next(l.split("=", 1)[1] for l in user_data.splitlines() if l.strip().startswith("RECIPE="))
    if a.outcome == "ok":
        said = f"sgbox-bake: started recipe={recipe}\nsgbox-bake: ok recipe={recipe}\n"
    else:
        said = f"sgbox-bake: started recipe={recipe}\nsgbox-bake: failed step={a.outcome.split(':', 1)[1]}\n"
    play = {}
    if os.path.exists(a.play):
        with open(a.play) as f:
            play = json.load(f)
    play.setdefault("console", {})[inst] = "[    1.0] Linux version 6.12\n" + said + "reboot: Power down\n"
    tmp = a.play + ".tmp"
    with open(tmp, "w") as f:
        json.dump(play, f)
    os.replace(tmp, a.play)
    ec2.stop_instances(InstanceIds=[inst])
    print(json.dumps({"instance": inst, "recipe": recipe, "user_data": user_data, "user_data_bytes": len(raw), "user_data_gzip": gzipped}))


if __name__ == "__main__":
    main()

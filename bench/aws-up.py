#!/usr/bin/env python3
"""Benchmark (not a test): API calls and wall time of `sgbox up --cloud aws --no-wait` against moto,
and of an idempotent re-run, counted by the fault proxy (with no faults) between them. The re-run is
printed as a ratio against the first run; it must make zero mutating calls.

  .venv/bin/python bench/aws-up.py [--binary target/debug/sgbox] [--runs 3]
Needs `bash .ci/setup` (moto in .venv). Everything started is stopped by PID.
"""
import argparse, collections, json, os, socket, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTATING = ("Create", "Run", "Import", "Allocate", "Associate", "Attach", "Authorize", "Terminate", "Delete", "Release", "Disassociate", "Modify")


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def wait_port(p):
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", p), 0.2).close(); return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"port {p} never opened")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=str(ROOT / "target/debug/sgbox"))
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sgbox-aws-bench."))
    amis = work / "amis.json"
    amis.write_text(json.dumps([{
        "ami_id": "ami-0d3b1e5a9c13debe1", "state": "available", "public": True, "owner_id": "136693071363",
        "image_location": "136693071363/debian-13-amd64-20261110-2289", "sriov": "simple", "root_device_type": "ebs",
        "root_device_name": "/dev/xvda", "description": "Debian 13", "image_type": "machine", "platform": None,
        "architecture": "x86_64", "name": "debian-13-amd64-20261110-2289", "virtualization_type": "hvm",
        "hypervisor": "xen", "creation_date": "2026-11-10T10:00:00.000Z"}]))
    procs = []
    try:
        mp, pp = free_port(), free_port()
        env = dict(os.environ, MOTO_AMIS_PATH=str(amis), MOTO_ENABLE_AMI_VALIDATION="true", MOTO_ENABLE_KEYPAIR_VALIDATION="true",
                   MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION="true")
        procs.append(subprocess.Popen([str(ROOT / ".venv/bin/moto_server"), "-H", "127.0.0.1", "-p", str(mp)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        log = work / "calls.jsonl"
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests/harness/fault_proxy.py"), "--port", str(pp), "--upstream",
                                       f"http://127.0.0.1:{mp}", "--log", str(log)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(mp); wait_port(pp)
        senv = {k: v for k, v in os.environ.items() if not k.startswith("SGBOX_") and k != "AWS_PROFILE"}
        senv.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{pp}", AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                    AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true", SGBOX_STATE_DIR=str(work / "state"))
        print(f"{'run':<14}{'wall_s':>8}{'calls':>7}{'mutating':>10}{'ratio_wall':>12}  calls by action")
        first = None
        for i in range(a.runs):
            before = len(log.read_text().splitlines()) if log.exists() else 0
            t = time.monotonic()
            r = subprocess.run([a.binary, "up", "--cloud", "aws", "--region", "us-east-1", "--ssh-cidr", "203.0.113.7/32", "--no-wait",
                                "--yes", "-q", "--output", "json"], env=senv, capture_output=True, text=True)
            wall = time.monotonic() - t
            if r.returncode != 0:
                sys.exit(f"up failed: {r.stderr}")
            calls = [json.loads(l)["action"] for l in log.read_text().splitlines()[before:]]
            mutating = [c for c in calls if c.startswith(MUTATING)]
            first = first or wall
            label = "up" if i == 0 else f"re-run {i}"
            by = ", ".join(f"{k} {v}" for k, v in sorted(collections.Counter(calls).items()))
            print(f"{label:<14}{wall:>8.2f}{len(calls):>7}{len(mutating):>10}{wall / first:>12.2f}  {by}")
            if i > 0 and mutating:
                sys.exit(f"re-run {i} made mutating calls: {mutating}")
    finally:
        for p in procs:
            p.kill(); p.wait()
        subprocess.run(["rm", "-rf", str(work)])


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Fault-injecting HTTP proxy in front of moto, for sgbox's AWS tests (Python stdlib only).

  python3 tests/harness/fault_proxy.py --port PORT --upstream http://127.0.0.1:MOTO [--throttle 0.3] [--seed 1]
                                       [--hang-after ACTION] [--log FILE] [--port-file FILE]

- --port 0 --port-file FILE: listen on a port the kernel picks and write it to FILE once listening.
  A port picked by the caller and bound later can be taken in between by another test's server,
  and the caller would then talk to that one.

- --throttle P: answer a fraction P of calls with EC2's throttling error (HTTP 503,
  RequestLimitExceeded; SSM: ThrottlingException) without forwarding them.
- --hang-after ACTION: forward the first call of ACTION to moto (so it takes effect), then never
  answer it: the caller is stuck exactly after the cloud changed and before it heard back — where
  an interrupted `sgbox up` must still converge on re-run.
- --lag: EC2's eventual consistency. After a create is forwarded, the next two reads of its kind
  do not see it yet: a read by id answers `*.NotFound`, a read by filter an empty list.
- --stale KIND: as --lag, starting as if a KIND had just been created.
- --pending-snapshots N: the first N answers of DescribeSnapshots show each snapshot `pending`, at a
  progress growing to 90%: EBS copies a snapshot in the background, for up to an hour.
- --log FILE: one JSON line per call: action, forwarded, status, and the call's form parameters.
- --play FILE: AWS's part where moto has none, read from FILE (JSON) at every call, so a test can
  change it while sgbox runs: "console" {instance id: text} answers GetConsoleOutput for those
  instances (a test plays an image builder whose bake prints to its console; moto's console is a
  fixed text); "image_block_public_access" (e.g. "unblocked", "block-new-sharing") answers
  GetImageBlockPublicAccessState; "image_deprecation": true answers EnableImageDeprecation
  (moto 5.2.5 implements neither) for an image moto has; "errors" {action: code} answers that
  action with that EC2 error (HTTP 400). A played call is still sent to moto first, and moto's
  refusal by IAM (401/403, when it enforces policies) is the answer: what the proxy plays is
  authorized like everything else.
The action is the EC2 Query API's `Action=` form field, or the X-Amz-Target header (SSM).
"""
import argparse
import base64
import json
import os
import random
import re
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

EC2_THROTTLE = (
    '<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>RequestLimitExceeded</Code>'
    "<Message>Request limit exceeded.</Message></Error></Errors><RequestID>fault-proxy</RequestID></Response>"
)

EC2_ERROR = (
    '<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>{code}</Code>'
    "<Message>{message}</Message></Error></Errors><RequestID>fault-proxy</RequestID></Response>"
)
EMPTY = '<?xml version="1.0" encoding="UTF-8"?><{root} xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>fault-proxy</requestId><{set}/></{root}>'
# create action -> kind; read action -> (kind, id parameter prefix, NotFound code, response root, list element)
LAGGED_CREATES = {"RunInstances": "instance", "CreateVolume": "volume", "AllocateAddress": "address", "CreateSnapshot": "snapshot"}
LAGGED_READS = {
    "DescribeInstances": ("instance", "InstanceId.", "InvalidInstanceID.NotFound", "DescribeInstancesResponse", "reservationSet"),
    "DescribeVolumes": ("volume", "VolumeId.", "InvalidVolume.NotFound", "DescribeVolumesResponse", "volumeSet"),
    "DescribeAddresses": ("address", "AllocationId.", "InvalidAllocationID.NotFound", "DescribeAddressesResponse", "addressesSet"),
    "DescribeSnapshots": ("snapshot", "SnapshotId.", "InvalidSnapshot.NotFound", "DescribeSnapshotsResponse", "snapshotSet"),
}


def write_port(path, port):
    """The port, all at once: a reader never sees half a number."""
    with open(path + ".tmp", "w") as f:
        f.write(str(port))
    os.replace(path + ".tmp", path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--port-file", default="")
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--throttle", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--hang-after", default="")
    ap.add_argument("--log", default="")
    ap.add_argument("--lag", action="store_true")
    ap.add_argument("--pending-snapshots", type=int, default=0)
    ap.add_argument("--play", default="")
    ap.add_argument("--stale", action="append", default=[], help="KIND: start as if KIND (instance, volume, address, snapshot) was just created")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    lock = threading.Lock()
    state = {"pending": 0, "hung": False, "lag": {k: 2 for k in a.stale}}
    a.lag = a.lag or bool(a.stale)
    log = open(a.log, "a", buffering=1) if a.log else None

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _handle(self):
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            target = self.headers.get("X-Amz-Target", "")
            action = target.split(".")[-1] if target else ""
            q = {}
            if not target:
                q = urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
                q.update(urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query, keep_blank_values=True))
                action = (q.get("Action") or [""])[0]
            params = {k: v[0] for k, v in q.items() if k != "Action"}
            self.params = params
            played = self._play(action, params)
            if played is not None:
                verdict, vheaders, vpayload = self._forward(body)
                if verdict in (401, 403):
                    self._log(action, True, verdict)
                    self._reply(verdict, vheaders.get("Content-Type", "text/xml"), vpayload, vheaders)
                    return
                status, payload = played
                self._reply(status, "text/xml", payload.encode(), {})
                self._log(action, False, status)
                return
            if a.lag and action in LAGGED_READS:
                kind, id_param, code, root, set_name = LAGGED_READS[action]
                with lock:
                    pending = state["lag"].get(kind, 0)
                    if pending:
                        state["lag"][kind] = pending - 1
                if pending:
                    if any(k.startswith(id_param) for k in params):
                        payload = EC2_ERROR.format(code=code, message="not visible yet (fault proxy: eventual consistency)").encode()
                        self._reply(400, "text/xml", payload, {})
                        self._log(action, False, 400)
                    else:
                        payload = EMPTY.format(root=root, set=set_name).encode()
                        self._reply(200, "text/xml", payload, {})
                        self._log(action, False, 200)
                    return
            with lock:
                throttle = rng.random() < a.throttle
                hang = a.hang_after and action == a.hang_after and not state["hung"]
                if hang:
                    state["hung"] = True
            if throttle:
                if target:
                    payload = json.dumps({"__type": "ThrottlingException", "message": "Rate exceeded"}).encode()
                    ctype = "application/x-amz-json-1.1"
                else:
                    payload = EC2_THROTTLE.encode()
                    ctype = "text/xml"
                self._reply(503 if not target else 400, ctype, payload, {})
                self._log(action, False, 503)
                return
            status, headers, payload = self._forward(body)
            self._log(action, True, status)
            if action == "DescribeSnapshots" and status == 200:
                with lock:
                    n = state["pending"]
                    state["pending"] += 1
                if n < a.pending_snapshots:
                    pct = 10 + 80 * n // max(a.pending_snapshots, 1)
                    text = payload.decode("utf-8", "replace")
                    text = re.sub(r"<status>completed</status>", "<status>pending</status>", text)
                    text = re.sub(r"<progress>[^<]*</progress>", f"<progress>{pct}%</progress>", text)
                    payload = text.encode()
                    headers.pop("Content-Length", None)
            if a.lag and action in LAGGED_CREATES and status == 200:
                with lock:
                    state["lag"][LAGGED_CREATES[action]] = 2
            if hang:
                while True:
                    time.sleep(3600)
            self._reply(status, headers.get("Content-Type", "text/xml"), payload, headers)

        def _forward(self, body):
            req = urllib.request.Request(a.upstream + self.path, data=body if self.command != "GET" else None, method=self.command)
            # The Host header too: it is signed (SigV4), and moto checks signatures when it
            # enforces IAM.
            for k, v in self.headers.items():
                if k.lower() not in ("content-length", "connection", "accept-encoding"):
                    req.add_header(k, v)
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.status, dict(r.headers), r.read()
            except urllib.error.HTTPError as e:
                return e.code, dict(e.headers), e.read()

        def _play(self, action, params):
            if not a.play:
                return None
            try:
                with open(a.play) as f:
                    play = json.load(f)
            except (OSError, ValueError):
                return None
            ns = 'xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"'
            if action in play.get("errors", {}):
                code = play["errors"][action]
                return 400, EC2_ERROR.format(code=code, message=f"{action} refused (fault proxy, played)")
            if action == "GetConsoleOutput" and params.get("InstanceId") in play.get("console", {}):
                text = play["console"][params["InstanceId"]]
                out = base64.b64encode(text.encode()).decode()
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
                return 200, (
                    f'<?xml version="1.0" encoding="UTF-8"?><GetConsoleOutputResponse {ns}><requestId>fault-proxy</requestId>'
                    f'<instanceId>{params["InstanceId"]}</instanceId><timestamp>{stamp}</timestamp><output>{out}</output></GetConsoleOutputResponse>'
                )
            if action == "GetImageBlockPublicAccessState" and "image_block_public_access" in play:
                return 200, (
                    f'<?xml version="1.0" encoding="UTF-8"?><GetImageBlockPublicAccessStateResponse {ns}><requestId>fault-proxy</requestId>'
                    f'<imageBlockPublicAccessState>{play["image_block_public_access"]}</imageBlockPublicAccessState><managedBy>account</managedBy>'
                    f"</GetImageBlockPublicAccessStateResponse>"
                )
            if action == "EnableImageDeprecation" and play.get("image_deprecation"):
                return 200, (
                    f'<?xml version="1.0" encoding="UTF-8"?><EnableImageDeprecationResponse {ns}><requestId>fault-proxy</requestId>'
                    f"<return>true</return></EnableImageDeprecationResponse>"
                )
            return None

        def _reply(self, status, ctype, payload, headers):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(payload)))
            for k in ("x-amzn-RequestId", "x-amz-request-id"):
                if k in headers:
                    self.send_header(k, headers[k])
            self.end_headers()
            self.wfile.write(payload)

        def _log(self, action, forwarded, status):
            if log:
                line = {"action": action, "forwarded": forwarded, "status": status, "params": getattr(self, "params", {})}
                log.write(json.dumps(line) + "\n")

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle

    srv = ThreadingHTTPServer(("127.0.0.1", a.port), H)
    srv.daemon_threads = True
    port = srv.server_address[1]
    if a.port_file:
        write_port(a.port_file, port)
    print(f"fault_proxy: 127.0.0.1:{port} -> {a.upstream}", file=sys.stderr, flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""sgbox upgrade preflight, run on the box: free space on the data disk, the size of the built-in
databases, and the download size of every image the upgrade path needs that the box does not have
yet, asked of the registries themselves (which also proves they answer). Reads a JSON request on
stdin, writes a JSON answer on stdout. Standard library only: the box has Python for cloud-init."""
import json, os, subprocess, sys, urllib.request, urllib.error, urllib.parse

ACCEPT = ", ".join([
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
])

def split_ref(ref):
    name, digest = (ref.split("@", 1) + [None])[:2]
    host, _, rest = name.partition("/")
    if "." not in host and ":" not in host and host != "localhost":
        host, rest = "index.docker.io", name
    repo, tag = rest, "latest"
    if ":" in rest.rsplit("/", 1)[-1]:
        repo, tag = rest.rsplit(":", 1)
    if host in ("index.docker.io", "docker.io"):
        host = "registry-1.docker.io"
        if "/" not in repo:
            repo = "library/" + repo
    return host, repo, digest or tag

def get(url, token=None, accept=ACCEPT):
    req = urllib.request.Request(url, headers={"Accept": accept})
    if token:
        req.add_header("Authorization", "Bearer " + token)
    return urllib.request.urlopen(req, timeout=20)

def fetch(scheme, host, repo, ref, tokens):
    url = f"{scheme}://{host}/v2/{repo}/manifests/{ref}"
    try:
        return json.load(get(url, tokens.get(repo)))
    except urllib.error.HTTPError as e:
        auth = e.headers.get("WWW-Authenticate", "")
        if e.code != 401 or not auth.lower().startswith("bearer "):
            raise
        params = dict(p.split("=", 1) for p in auth[7:].split(","))
        params = {k.strip(): v.strip().strip('"') for k, v in params.items()}
        q = urllib.parse.urlencode({"service": params.get("service", ""), "scope": params.get("scope", f"repository:{repo}:pull")})
        tok = json.load(urllib.request.urlopen(params["realm"] + "?" + q, timeout=20))
        tokens[repo] = tok.get("token") or tok.get("access_token")
        return json.load(get(url, tokens[repo]))

def local_images():
    p = subprocess.run(["docker", "image", "ls", "--digests", "--format", "{{.Repository}}:{{.Tag}} {{.Repository}}@{{.Digest}}"], capture_output=True, text=True)
    return set(p.stdout.split())

def present(ref, have):
    for hub in ("index.docker.io/", "docker.io/"):
        if ref.startswith(hub):
            ref = ref[len(hub):]
    name, _, digest = ref.partition("@")
    if digest:
        return f"{name.rsplit(':', 1)[0]}@{digest}" in have
    return ref in have

def main():
    req = json.load(sys.stdin)
    out = {"avail_bytes": 0, "image_bytes": 0, "images_missing": 0, "db_bytes": 0, "errors": []}
    st = os.statvfs(req["mount"])
    out["avail_bytes"] = st.f_bavail * st.f_frsize
    layers, tokens, have = {}, {}, local_images()
    for img in req["images"]:
        ref = img["ref"]
        if present(ref, have):
            continue
        out["images_missing"] += 1
        host, repo, r = split_ref(ref)
        scheme = "http" if img.get("insecure") else "https"
        try:
            m = fetch(scheme, host, repo, r, tokens)
            if "manifests" in m:
                pick = [x for x in m["manifests"] if x.get("platform", {}).get("architecture") == "amd64" and x.get("platform", {}).get("os") == "linux"]
                if not pick:
                    raise ValueError("no linux/amd64 image in the index")
                m = fetch(scheme, host, repo, pick[0]["digest"], tokens)
            for l in m.get("layers", []) + [m.get("config", {})]:
                if l.get("digest"):
                    layers[l["digest"]] = int(l.get("size", 0))
        except Exception as e:  # noqa: BLE001 - every failure is reported, none is fatal here
            out["errors"].append(f"{ref}: {e}")
    out["image_bytes"] = sum(layers.values())
    for v in req.get("volumes", []):
        p = subprocess.run(["docker", "volume", "inspect", "-f", "{{.Mountpoint}}", v], capture_output=True, text=True)
        if p.returncode == 0:
            du = subprocess.run(["du", "-sb", p.stdout.strip()], capture_output=True, text=True)
            if du.returncode == 0 and du.stdout.split():
                out["db_bytes"] += int(du.stdout.split()[0])
    json.dump(out, sys.stdout)

main()

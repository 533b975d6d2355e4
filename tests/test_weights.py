"""The weights downloader (nfnets_jax/weights/download.py) against a real HTTP server on
127.0.0.1 that serves files of the test's own table: the real urllib client, real
sockets, real files; no other network."""

import collections
import hashlib
import http.server
import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

import pytest

from nfnets_jax.weights import download

REPO = pathlib.Path(__file__).parents[1]


class Server:
  """Serves `files[url_path] -> bytes` and counts GETs per path. `cut_short` paths
  send half their body (with the full Content-Length) and close; `wrong` paths
  send other bytes of the same length; while `gate` is set, bodies wait for it."""

  def __init__(self):
    self.files = {}
    self.requests = collections.Counter()
    self.cut_short = set()
    self.wrong = set()
    self.gate = None
    self._lock = threading.Lock()
    self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
    self._httpd.daemon_threads = True
    self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
    self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

  def _handler(self):
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def do_GET(self):  # pylint: disable=invalid-name
        with server._lock:
          server.requests[self.path] += 1
        body = server.files.get(self.path)
        if body is None:
          self.send_error(404)
          return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.gate is not None:
          server.gate.wait(timeout=60)
        if self.path in server.wrong:
          body = bytes(b ^ 0xFF for b in body)
        if self.path in server.cut_short:
          body = body[:len(body) // 2]
        self.wfile.write(body)

      def log_message(self, *args):
        pass

    return Handler

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc_info):
    if self.gate is not None:
      self.gate.set()
    self._httpd.shutdown()
    self._httpd.server_close()


def _entry(variant, body):
  return download.PublishedFile(variant, f"{variant}_test.npz", hashlib.md5(body).hexdigest(), 50.0)


BODIES = {"A": os.urandom(3 * 2**20 + 17), "B": b"small file"}
TABLE = {name: _entry(name, body) for name, body in BODIES.items()}


@pytest.fixture
def server():
  with Server() as s:
    for name, body in BODIES.items():
      s.files[f"/{TABLE[name].filename}"] = body
    yield s


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
  for name in (download.HOME_ENV, download.URL_ENV, download.OFFLINE_ENV):
    monkeypatch.delenv(name, raising=False)


def _fetch(variant, cache, url, **kwargs):
  return download.fetch(variant, table=TABLE, cache_dir=cache, base_url=url, progress=False,
                       **kwargs)


def _leftovers(cache):
  """Files in the cache other than finished downloads and lock files."""
  return sorted(p.name for p in cache.iterdir()
                if not p.name.endswith(".lock") and not p.name.endswith("_test.npz"))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_download_writes_the_exact_file_and_no_temporary(server, tmp_path):
  cache = tmp_path / "cache"
  path = download.fetch("A", table=TABLE, cache_dir=cache, base_url=server.url)  # progress on
  assert path == cache / "A_test.npz"
  assert path.read_bytes() == BODIES["A"]
  assert hashlib.md5(path.read_bytes()).hexdigest() == TABLE["A"].md5
  assert server.requests == {"/A_test.npz": 1}
  assert _leftovers(cache) == []


def test_cache_hit_makes_no_request(server, tmp_path):
  first = _fetch("B", tmp_path, server.url)
  second = _fetch("B", tmp_path, server.url)
  assert first == second
  assert server.requests["/B_test.npz"] == 1


def test_interrupted_download_leaves_nothing(server, tmp_path):
  server.cut_short.add("/A_test.npz")
  with pytest.raises(download.IncompleteDownloadError) as err:
    _fetch("A", tmp_path, server.url)
  message = str(err.value)
  assert f"{server.url}/A_test.npz" in message and "interrupted" in message
  assert f"of {len(BODIES['A'])} bytes" in message and "deleted" in message
  assert not (tmp_path / "A_test.npz").exists()
  assert _leftovers(tmp_path) == []
  server.cut_short.clear()  # A retry then succeeds.
  assert _fetch("A", tmp_path, server.url).read_bytes() == BODIES["A"]


def test_checksum_mismatch_names_both_sums_and_deletes_the_temporary(server, tmp_path):
  server.wrong.add("/B_test.npz")
  with pytest.raises(download.ChecksumError) as err:
    _fetch("B", tmp_path, server.url)
  actual = hashlib.md5(bytes(b ^ 0xFF for b in BODIES["B"])).hexdigest()
  message = str(err.value)
  assert TABLE["B"].md5 in message and actual in message
  assert f"{server.url}/B_test.npz" in message
  assert not (tmp_path / "B_test.npz").exists()
  assert _leftovers(tmp_path) == []


def test_a_wrong_file_in_the_cache_is_caught(server, tmp_path):
  path = _fetch("B", tmp_path, server.url)
  path.write_bytes(b"hand-placed, wrong")  # A new size: this process hashes it again.
  with pytest.raises(download.ChecksumError) as err:
    _fetch("B", tmp_path, server.url)
  assert str(path) in str(err.value) and TABLE["B"].md5 in str(err.value)


def test_offline_env_names_the_url_and_the_path(server, tmp_path, monkeypatch):
  monkeypatch.setenv(download.OFFLINE_ENV, "1")
  with pytest.raises(download.OfflineError) as err:
    _fetch("B", tmp_path / "cache", server.url)
  message = str(err.value)
  assert f"{server.url}/B_test.npz" in message
  assert f"put it at {tmp_path / 'cache' / 'B_test.npz'}" in message
  assert "\n" not in message
  assert sum(server.requests.values()) == 0
  # A file put at that path by hand is then used, still offline.
  (tmp_path / "cache").mkdir()
  (tmp_path / "cache" / "B_test.npz").write_bytes(BODIES["B"])
  assert _fetch("B", tmp_path / "cache", server.url).read_bytes() == BODIES["B"]
  assert sum(server.requests.values()) == 0


def test_unreachable_server_is_an_offline_error(tmp_path):
  url = f"http://127.0.0.1:{_free_port()}"
  with pytest.raises(download.OfflineError) as err:
    _fetch("B", tmp_path, url)
  message = str(err.value)
  assert f"{url}/B_test.npz" in message and str(tmp_path / "B_test.npz") in message
  assert _leftovers(tmp_path) == []


def test_missing_file_on_the_server_names_the_status(server, tmp_path):
  table = {"C": download.PublishedFile("C", "C_test.npz", "0" * 32, 0.0)}
  with pytest.raises(download.DownloadError) as err:
    download.fetch("C", table=table, cache_dir=tmp_path, base_url=server.url, progress=False)
  assert "404" in str(err.value) and f"{server.url}/C_test.npz" in str(err.value)


def test_environment_selects_mirror_and_cache(server, tmp_path, monkeypatch):
  server.files["/mirror/B_test.npz"] = BODIES["B"]
  monkeypatch.setenv(download.URL_ENV, server.url + "/mirror/")
  monkeypatch.setenv(download.HOME_ENV, str(tmp_path / "home"))
  path = download.fetch("B", table=TABLE, progress=False)
  assert path == tmp_path / "home" / "B_test.npz"
  assert path.read_bytes() == BODIES["B"]
  assert server.requests == {"/mirror/B_test.npz": 1}


def test_unknown_variant_lists_the_valid_ones(tmp_path):
  with pytest.raises(download.UnknownVariantError, match=r"'F9'.*F0, F1, F2, F3, F4, F5, F6"):
    download.fetch("F9", cache_dir=tmp_path, offline=True)


def test_unwritable_cache_names_the_directory(server, tmp_path):
  (tmp_path / "a_file").write_text("not a directory")
  cache = tmp_path / "a_file" / "cache"
  with pytest.raises(download.CacheDirError) as err:
    _fetch("B", cache, server.url)
  assert str(cache) in str(err.value) and download.HOME_ENV in str(err.value)


def test_bad_offline_value_is_named(monkeypatch, tmp_path):
  monkeypatch.setenv(download.OFFLINE_ENV, "sometimes")
  with pytest.raises(download.WeightsError, match="'sometimes'"):
    _fetch("B", tmp_path, "http://127.0.0.1:9")


def test_published_table():
  assert list(download.PUBLISHED) == [f"F{i}" for i in range(7)]
  for name, entry in download.PUBLISHED.items():
    assert entry.variant == name and entry.filename == f"{name}_haiku.npz"
    assert len(entry.md5) == 32 and int(entry.md5, 16) >= 0
  assert download.PUBLISHED["F0"].md5 == "0a41039da1cb43adf47f1b7d86ddfe0f"
  assert download.PUBLISHED["F6"].imagenet_top1 == 86.5
  assert download.url_for("F3") == "https://storage.googleapis.com/dm-nfnets/F3_haiku.npz"


CHILD = """
import json, pathlib, sys
from nfnets_jax.weights import download
cache, url, marker, table = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
table = {k: download.PublishedFile(**v) for k, v in table.items()}
pathlib.Path(marker).touch()
print(download.fetch("A", table=table, cache_dir=cache, base_url=url, progress=False))
"""


def _wait_for(condition, what, timeout=60.0):
  deadline = time.monotonic() + timeout
  while not condition():
    if time.monotonic() > deadline:
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.05)


@pytest.mark.slow
def test_two_processes_download_once(server, tmp_path):
  """The body is held back until both processes have called fetch, so without the
  lock both would find no file and download it."""
  server.gate = threading.Event()
  cache = tmp_path / "cache"
  table = json.dumps({"A": vars(TABLE["A"])})
  markers = [tmp_path / f"started{i}" for i in range(2)]
  procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(cache), server.url, str(m), table],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for m in markers]
  try:
    _wait_for(lambda: all(m.exists() for m in markers), "both processes to start")
    _wait_for(lambda: server.requests["/A_test.npz"] >= 1, "the first request")
    time.sleep(1.0)  # Let the second process reach the lock.
    server.gate.set()
    outputs = [p.communicate(timeout=120) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-2000:]
  paths = {out.strip().splitlines()[-1] for out, _ in outputs}
  assert paths == {str(cache / "A_test.npz")}
  assert server.requests["/A_test.npz"] == 1
  assert (cache / "A_test.npz").read_bytes() == BODIES["A"]
  assert any("Waiting for another process" in err for _, err in outputs)
  assert _leftovers(cache) == []

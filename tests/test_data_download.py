"""Downloads against a real HTTP server on 127.0.0.1 serving the data root: verification, Git-LFS
pointers, wrong files, dropped connections and resuming with Range requests."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crystalign.cli import app
from crystalign.data import DataError, load_dataset
from crystalign.data.download import download, sha256_file
from crystalign.data.registry import get_info

pytestmark = [pytest.mark.data, pytest.mark.timeout(120)]

LFS_POINTER = (
    b"version https://git-lfs.github.com/spec/v1\n"
    b"oid sha256:326f401219901270374b71e2faff63df3a29a99fd26f469993b9f476b693daf2\nsize 3673814\n"
)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.mode = "ok"  # ok | wrong | lfs | busy (HTTP 503)
        self.honour_range = True
        self.drops = 0  # the next `drops` responses stop half-way
        self.requests: list[dict] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # a stuck client cannot hold a server thread

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        srv: _Server = self.server  # type: ignore[assignment]
        srv.requests.append({"path": self.path, "range": self.headers.get("Range")})
        if srv.mode == "busy":
            self.send_error(503)
            return
        if srv.mode == "lfs":
            data = LFS_POINTER
        else:
            rel = self.path.lstrip("/")
            if srv.mode == "wrong":
                rel = "carbon_24/val.csv"  # a real file, but not the one asked for
            path = (srv.root / rel).resolve()
            if not path.is_file() or srv.root.resolve() not in path.parents:
                self.send_error(404)
                return
            data = path.read_bytes()
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and srv.honour_range and rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[6:-1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Type", "text/csv")
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if srv.drops > 0:
            srv.drops -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server(data_root):
    srv = _Server(data_root)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def _get(server, cache, name="perov_5", split="val", **kw):
    kw.setdefault("retries", 0)
    kw.setdefault("retry_wait", 0.0)
    kw.setdefault("timeout", 10.0)
    return download(name, split, cache=cache, base_url=server.url, progress=False, **kw)


def test_download_verifies_and_is_found_by_load_dataset(server, tmp_path, monkeypatch):
    monkeypatch.delenv("CRYSTALIGN_DATA_ROOT", raising=False)
    paths = _get(server, tmp_path)
    dest = tmp_path / "perov_5" / "val.csv"
    assert paths == {"val": dest}
    assert sha256_file(dest) == get_info("perov_5").splits["val"].sha256
    assert not list(tmp_path.rglob("*.part"))
    assert server.requests[-1] == {"path": "/perov_5/val.csv", "range": None}
    # a verified copy is not fetched again
    n = len(server.requests)
    _get(server, tmp_path)
    assert len(server.requests) == n
    assert len(load_dataset("perov_5", "val", cache=tmp_path)) == 3787


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    server.mode = "wrong"
    with pytest.raises(DataError, match="checksum mismatch") as err:
        _get(server, tmp_path)
    assert "/perov_5/val.csv" in str(err.value)
    assert not (tmp_path / "perov_5" / "val.csv").exists()
    assert not list(tmp_path.rglob("*.part"))


def test_git_lfs_pointer_is_a_clear_error(server, tmp_path):
    server.mode = "lfs"
    with pytest.raises(DataError, match="Git-LFS pointer"):
        _get(server, tmp_path)
    assert not (tmp_path / "perov_5").exists()  # nothing kept, not even the folder the call created


def test_interrupted_download_resumes_with_range(server, tmp_path):
    server.drops = 1
    dest = tmp_path / "perov_5" / "val.csv"
    part = dest.with_name("val.csv.part")
    with pytest.raises(DataError, match="interrupted .* run the same command again to resume"):
        _get(server, tmp_path)
    assert not dest.exists()
    have = part.stat().st_size
    assert 0 < have < get_info("perov_5").splits["val"].bytes
    _get(server, tmp_path)
    assert server.requests[-1]["range"] == f"bytes={have}-"
    assert sha256_file(dest) == get_info("perov_5").splits["val"].sha256
    assert not part.exists()


def test_retry_resumes_within_one_call(server, tmp_path):
    server.drops = 1
    _get(server, tmp_path, name="perov_5_train_subset", split="train", retries=2)
    assert [r["range"] is not None for r in server.requests] == [False, True]
    assert sha256_file(tmp_path / "perov_5_train_subset" / "train.csv") == get_info("perov_5_train_subset").splits["train"].sha256


def test_server_ignoring_range_restarts_cleanly(server, tmp_path, data_root):
    src = (data_root / "perov_5_train_subset" / "train.csv").read_bytes()
    part = tmp_path / "perov_5_train_subset" / "train.csv.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(src[:1000])
    server.honour_range = False
    _get(server, tmp_path, name="perov_5_train_subset", split="train")
    assert server.requests[-1]["range"] == "bytes=1000-"
    assert (tmp_path / "perov_5_train_subset" / "train.csv").read_bytes() == src


def test_corrupt_part_is_removed(server, tmp_path):
    part = tmp_path / "perov_5_train_subset" / "train.csv.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 5000)  # not a prefix of the real file
    with pytest.raises(DataError, match="checksum mismatch"):
        _get(server, tmp_path, name="perov_5_train_subset", split="train")
    assert not part.exists() and not part.with_name("train.csv").exists()
    _get(server, tmp_path, name="perov_5_train_subset", split="train")  # a clean retry works


def test_http_error_and_local_only_dataset(server, tmp_path):
    with pytest.raises(DataError, match="HTTP 404"):
        download("perov_5", "val", cache=tmp_path, url_override=f"{server.url}/nothing/here.csv", progress=False, retries=0)
    with pytest.raises(DataError, match="no public download"):
        download("mp_20_sample", cache=tmp_path, progress=False)


@pytest.mark.parametrize("base_url,message", [("http://127.0.0.1:1/with space", "cannot download"), ("127.0.0.1:8767", "unknown url type")])
def test_malformed_mirror_address_is_a_clear_error_not_a_retry(tmp_path, base_url, message):
    result = CliRunner().invoke(
        app, ["data", "download", "perov_5", "--split", "val", "--cache", str(tmp_path), "--base-url", base_url, "--no-progress"]
    )
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output, result.output
    assert "resume" not in result.output  # nothing to resume: the address is wrong


def test_cli_download(server, tmp_path):
    result = CliRunner().invoke(
        app,
        ["data", "download", "perov_5_train_subset", "--cache", str(tmp_path), "--base-url", server.url, "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    assert "perov_5_train_subset/train" in result.output
    assert (tmp_path / "perov_5_train_subset" / "train.csv").exists()
    server.mode = "lfs"
    bad = CliRunner().invoke(
        app, ["data", "download", "perov_5", "--split", "val", "--cache", str(tmp_path), "--base-url", server.url, "--no-progress"]
    )
    assert bad.exit_code == 1 and "Git-LFS pointer" in bad.output


# ---------------------------------------------------------------------- no network
def _closed_port() -> int:
    """A loopback port where nothing listens: every connection is refused, as without a network."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_no_network_is_said_plainly_and_leaves_no_folder(tmp_path):
    port = _closed_port()
    cache = tmp_path / "cache"  # does not exist yet: the call would create cache/perov_5
    result = CliRunner().invoke(
        app,
        ["data", "download", "perov_5", "--split", "val", "--cache", str(cache), "--base-url", f"http://127.0.0.1:{port}", "--no-progress"],
    )
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    text = " ".join(result.output.split())
    assert f"no network connection to 127.0.0.1:{port}" in text
    assert "ROOT/perov_5/val.csv" in text and "--data-root" in text and "README" in text
    assert "resume" not in text and "interrupted" not in text  # nothing was received
    assert not cache.exists()


def test_no_network_is_not_retried(tmp_path, monkeypatch):
    import importlib

    dl = importlib.import_module("crystalign.data.download")  # the package exports a function of the same name
    calls = []
    real = dl._transfer
    monkeypatch.setattr(dl, "_transfer", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.raises(DataError, match="no network connection"):
        download("perov_5", "val", cache=tmp_path / "c", base_url=f"http://127.0.0.1:{_closed_port()}", progress=False, retries=3, retry_wait=5.0)
    assert len(calls) == 1
    assert not (tmp_path / "c").exists()


def test_no_network_keeps_received_bytes_and_says_how_to_resume(tmp_path):
    part = tmp_path / "perov_5" / "val.csv.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"material_id,cif\n")  # an earlier call's partial download
    with pytest.raises(DataError) as err:
        download("perov_5", "val", cache=tmp_path, base_url=f"http://127.0.0.1:{_closed_port()}", progress=False, retries=0)
    message = str(err.value)
    assert "no network connection" in message and "16 bytes received so far are kept" in message and "resume" in message
    assert part.read_bytes() == b"material_id,cif\n"


def test_a_failed_download_keeps_folders_that_hold_something(tmp_path):
    (tmp_path / "perov_5").mkdir()
    (tmp_path / "perov_5" / "train.csv").write_text("mine")
    with pytest.raises(DataError, match="no network connection"):
        download("perov_5", "val", cache=tmp_path, base_url=f"http://127.0.0.1:{_closed_port()}", progress=False)
    assert (tmp_path / "perov_5" / "train.csv").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "perov_5").iterdir()) == ["train.csv"]


def test_a_server_error_with_nothing_received_does_not_promise_a_resume(server, tmp_path):
    server.mode = "busy"
    with pytest.raises(DataError, match="HTTP 503") as err:
        _get(server, tmp_path, retries=1)
    assert "nothing was received" in str(err.value) and "resume" not in str(err.value)
    assert len(server.requests) == 2  # a server error is retried
    assert not (tmp_path / "perov_5").exists()

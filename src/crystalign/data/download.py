"""Download named dataset splits into the cache, resumable and checksum-verified.

Each file streams into ``<file>.part`` next to its final path; an interrupted transfer is resumed
with an HTTP Range request (a server that ignores Range sends the whole file again, which is
handled). The file reaches its final path only after its sha256 matched the registry, so the final
path never holds partial or wrong data; a ``.part`` with the wrong checksum is deleted.

A host that cannot be reached at all (no network, DNS failure, connection refused or timed out) is reported at
once, with the other way to get the file (the data root), instead of retried; only bytes actually received
are kept for resuming, and a failed call leaves no empty folder behind.

Example::

    paths = download("perov_5", split="val")            # {'val': ~/.cache/crystalign/perov_5/val.csv}
    download("mp_20", base_url="http://mirror.local/csp")  # <base>/<name>/<file> instead of the public URLs
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from crystalign.data.errors import DataError
from crystalign.data.registry import SplitInfo, get_info
from crystalign.settings import cache_dir

log = logging.getLogger("crystalign.data")

LFS_POINTER_PREFIX = b"version https://git-lfs"
_CHUNK = 1 << 20


class _Interrupted(Exception):
    """The transfer stopped early; the ``.part`` file is kept for resuming."""


class _NoConnection(Exception):
    """No connection to the host at all (DNS failure, refused, unreachable, timed out): retrying at once cannot help."""


def sha256_file(path: str | os.PathLike, chunk: int = _CHUNK) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(
    name: str,
    split: str | None = None,
    cache: str | os.PathLike | None = None,
    *,
    base_url: str | None = None,
    url_override: str | None = None,
    force: bool = False,
    progress: bool = True,
    retries: int = 3,
    retry_wait: float = 2.0,
    timeout: float = 60.0,
) -> dict[str, Path]:
    """Download ``split`` (default: every split) of a named dataset; returns {split: path}.

    ``base_url`` (or $CRYSTALIGN_DATA_URL) replaces the public URLs by ``<base_url>/<name>/<file>``;
    ``url_override`` gives the exact URL of a single ``split``. A file already in the cache with the
    right checksum is not fetched again unless ``force``.
    """
    info = get_info(name)
    if url_override is not None and split is None:
        raise DataError("url_override needs an explicit split")
    splits = [info.split_info(split)] if split is not None else list(info.splits.values())
    root = cache_dir(cache)
    out: dict[str, Path] = {}
    for s in splits:
        url = url_override or s.url_for(base_url)
        if not url:
            raise DataError(
                f"dataset {name} split {s.split} has no public download; place {name}/{s.file} under the data root"
                " (--data-root / $CRYSTALIGN_DATA_ROOT) or give a mirror with --base-url"
            )
        out[s.split] = fetch(
            url,
            root / name / s.file,
            s,
            force=force,
            progress=progress,
            retries=retries,
            retry_wait=retry_wait,
            timeout=timeout,
        )
    return out


def fetch(
    url: str,
    dest: str | os.PathLike,
    info: SplitInfo,
    *,
    force: bool = False,
    progress: bool = True,
    retries: int = 3,
    retry_wait: float = 2.0,
    timeout: float = 60.0,
) -> Path:
    """Fetch ``url`` into ``dest`` via ``dest.part``, resuming and verifying against ``info``.

    An interrupted transfer is retried up to ``retries`` times; a host that cannot be reached is retried only
    when this call has received data from it (the network was up a moment ago). A failure keeps the ``.part``
    only when it holds bytes, and removes the folders this call created while they are empty.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    created = _missing_folders(dest.parent)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _fetch(url, dest, part, info, force=force, progress=progress, retries=retries, retry_wait=retry_wait, timeout=timeout)
    except BaseException:
        if part.exists() and part.stat().st_size == 0:
            part.unlink()
        for folder in reversed(created):  # innermost first; a folder holding anything stays
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _fetch(
    url: str, dest: Path, part: Path, info: SplitInfo, *, force: bool, progress: bool, retries: int, retry_wait: float,
    timeout: float,
) -> Path:
    if dest.exists() and not force:
        if sha256_file(dest) == info.sha256:
            log.info("%s already downloaded and verified", dest)
            return dest
        log.warning("%s has the wrong checksum; downloading it again", dest)
    if force and part.exists():
        part.unlink()

    label = f"{info.dataset}/{info.file}"
    at_start = _size_of(part)
    attempt = 0
    while True:
        try:
            _transfer(url, part, info, label, progress, timeout)
            break
        except _NoConnection as err:
            have = _size_of(part)
            if have <= at_start or attempt >= retries:
                raise DataError(_no_connection_message(url, info, str(err), have)) from None
            attempt += 1
            log.warning("download of %s: %s; retrying (attempt %d/%d)", url, err, attempt, retries)
            time.sleep(retry_wait * attempt)
        except _Interrupted as err:
            have = _size_of(part)
            if attempt >= retries:
                if not have:  # nothing to resume from
                    raise DataError(f"download of {url} failed ({err}); nothing was received", dest) from None
                raise DataError(
                    f"download of {url} interrupted after {have} bytes ({err}); run the same command again to resume",
                    dest,
                ) from None
            attempt += 1
            log.warning("download of %s interrupted at %d bytes (%s); resuming (attempt %d/%d)", url, have, err, attempt, retries)
            time.sleep(retry_wait * attempt)

    _verify(part, dest, url, info)
    os.replace(part, dest)
    return dest


def _size_of(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _missing_folders(folder: Path) -> list[Path]:
    """The folders ``mkdir(parents=True)`` would create for ``folder``, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


def _no_connection_message(url: str, info: SplitInfo, reason: str, have: int) -> str:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or parts.netloc or url
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    kept = f"; the {have} bytes received so far are kept: run the same command again to resume once connected" if have else ""
    return (
        f"no network connection to {host} ({reason}), so {url} cannot be downloaded{kept}. To use the data without "
        f"a network, fetch that file elsewhere and place it under the data root as ROOT/{info.dataset}/{info.file} "
        "(ROOT: --data-root or $CRYSTALIGN_DATA_ROOT; see Data in the README), or give a reachable mirror with --base-url"
    )


def _transfer(url: str, part: Path, info: SplitInfo, label: str, progress: bool, timeout: float) -> None:
    from tqdm.auto import tqdm

    from crystalign import __version__

    offset = part.stat().st_size if part.exists() else 0
    if info.bytes is not None and offset > info.bytes:
        part.unlink()  # longer than the real file: cannot be a prefix of it
        offset = 0
    if info.bytes is not None and offset == info.bytes:
        return  # complete already; the checksum decides
    headers = {"User-Agent": f"crystalign/{__version__}", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        request = urllib.request.Request(url, headers=headers)
        response = urllib.request.urlopen(request, timeout=timeout)
    except (ValueError, http.client.InvalidURL) as err:  # a malformed address: retrying cannot help
        raise DataError(f"cannot download {url!r}: {err}") from None
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            # the server has nothing past our offset: the .part is either complete or unusable
            part.unlink()
            raise _Interrupted("range not satisfiable; restarting from the beginning") from None
        if 500 <= err.code < 600:
            raise _Interrupted(f"HTTP {err.code} {err.reason}") from None
        raise DataError(f"download of {url} failed: HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:  # raised while connecting and sending: the host was never reached
        reason = err.reason
        if isinstance(reason, str) and reason.startswith("unknown url type"):
            raise DataError(f"cannot download {url!r}: {reason} (give an http://, https:// or file:// address)") from None
        if urllib.parse.urlsplit(url).scheme == "file":
            raise DataError(f"cannot read {url}: {reason}") from None
        raise _NoConnection(_reason_text(reason)) from None
    except (socket.timeout, ConnectionError) as err:  # connected, but the server sent no answer
        raise _Interrupted(f"no response: {_reason_text(err)}") from None

    with response:
        mode = "ab"
        if offset and response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {offset}-"):
                part.unlink()
                raise _Interrupted(f"server resumed at the wrong offset ({content_range!r})")
        elif offset:
            # the server ignored the Range header and sends the whole file
            log.info("server ignored the resume request for %s; downloading from the start", url)
            offset, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        expected_total = offset + int(length) if length is not None else info.bytes
        received = offset
        with open(part, mode) as fh, tqdm(
            total=expected_total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=label,
            disable=None if progress else True,  # None: only on a terminal
            leave=False,
        ) as bar:
            try:
                while chunk := response.read(_CHUNK):
                    fh.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (http.client.IncompleteRead, ConnectionError, socket.timeout, OSError) as err:
                raise _Interrupted(f"{type(err).__name__}: {err}") from None
        # http.client returns a short body silently when the peer closes early
        if expected_total is not None and received < expected_total:
            raise _Interrupted(f"connection closed after {received} of {expected_total} bytes")


def _reason_text(reason: object) -> str:
    """``[Errno -2] Name or service not known`` as "Name or service not known"; a bare timeout as "timed out"."""
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def _verify(part: Path, dest: Path, url: str, info: SplitInfo) -> None:
    size = part.stat().st_size
    digest = sha256_file(part)
    if digest == info.sha256:
        return
    with open(part, "rb") as fh:
        head = fh.read(len(LFS_POINTER_PREFIX))
    part.unlink()
    if head.startswith(LFS_POINTER_PREFIX):
        raise DataError(
            f"{url} returned a Git-LFS pointer ({size} bytes), not the data: the file is stored with Git LFS and "
            "must be fetched from its media URL (media.githubusercontent.com) or a mirror; nothing was saved",
            dest,
        )
    expected_size = f"{info.bytes} bytes" if info.bytes is not None else "unknown size"
    raise DataError(
        f"checksum mismatch for {url}: expected sha256 {info.sha256} ({expected_size}), got {digest} ({size} bytes); "
        "the download was deleted",
        dest,
    )

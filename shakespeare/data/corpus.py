"""Where texts come from: a corpus downloaded once into the cache and verified (a zip unpacked), or the user's
own file, folder or glob of files."""

from __future__ import annotations

import glob
import hashlib
import http.client
import logging
import os
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path

from filelock import FileLock
from tqdm import tqdm

from shakespeare.errors import UsageError

log = logging.getLogger("shakespeare")

CORPUS_ENV = "SHAKESPEARE_CORPUS"  # a local copy of tinyshakespeare (conf/data/shakespeare.yaml reads it)
CHUNK = 1 << 20
GLOB_CHARACTERS = "*?["


def sha256_of(path: Path) -> str:
    """The file's SHA-256, read in chunks: hashing a 100 MB text adds 1 MB of memory, not 100."""
    digest, buffer = hashlib.sha256(), bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as file:
        while n := file.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def cache_lock(path: Path) -> FileLock:
    """An inter-process lock beside `path`: concurrent runs and DDP ranks fetch or encode it once."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(
            f"The cache folder {str(path.parent)!r} cannot be created ({err.strerror}). Point SHAKESPEARE_CACHE "
            "(or paths.cache_dir) at a writable folder."
        ) from None
    return FileLock(str(path.with_name(path.name + ".lock")))


def fetch_corpus(
    url: str, sha256: str, cache_dir: str | Path, file: str | None = None, archive_sha256: str | None = None
) -> Path:
    """A verified copy of the corpus in `cache_dir/file`: the cached one, or a fresh download of `url`.

    With `archive_sha256`, `url` is a zip archive holding `file`: the archive is verified, then `file` is
    unpacked from it and verified against `sha256`. A cached file with another SHA-256 is fetched again.
    """
    name = urllib.parse.urlparse(url).path.rsplit("/", 1)[-1]
    cache = Path(cache_dir).expanduser()
    text = cache / (file or name)
    lock = cache_lock(text)
    try:
        with lock:
            found = sha256_of(text) if text.is_file() else None
            if found == sha256:
                return text
            if archive_sha256:
                archive = cache / name
                found_archive = sha256_of(archive) if archive.is_file() else None
                if found_archive != archive_sha256:
                    try:
                        download(url, archive, archive_sha256, "data.archive_sha256", found_archive)
                    except UsageError as err:
                        stale = f" The copy of {text.name} there has SHA-256 {found}, not {sha256}." if found else ""
                        raise UsageError(f"{err}{stale}") from None
                unpack(archive, text.name, text, sha256)
            else:
                download(url, text, sha256, "data.sha256", found)
    except UsageError:
        Path(lock.lock_file).unlink(missing_ok=True)  # a failed fetch leaves nothing behind, its lock neither
        raise
    return text


def download(url: str, dest: Path, sha256: str, key: str = "data.sha256", found: str | None = None) -> None:
    """Fetch `url` into `dest` if its SHA-256 is `sha256`, with a progress bar on a terminal; nothing is
    kept otherwise. Written as `dest.part` and renamed: the cache never holds a half-written file. `found`:
    the SHA-256 of a file already at `dest` that does not match (it is replaced only by a verified download)."""
    partial = dest.with_name(dest.name + ".part")
    offline = (
        f"If you are offline, put a verified copy at {dest} (the folder is $SHAKESPEARE_CACHE, by default "
        f"~/.cache/shakespeare), or train on a local copy with data.path=/path/to/{dest.name}."
    )
    if found:
        offline = (
            f"The file already at {dest} does not match: its SHA-256 is {found}, the published one {sha256} ({key}), "
            "so it is another version or a damaged copy and was not used. If you are offline, replace it with a "
            f"verified copy, or train on a local copy with data.path=/path/to/{dest.name}."
        )
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            size = int(response.headers.get("Content-Length") or 0) or None
            log.info("Downloading %s%s to %s", url, f" ({size / 1e6:.1f} MB)" if size else "", dest)
            with tqdm(total=size, unit="B", unit_scale=True, desc=dest.name, disable=None, leave=False) as bar:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as err:
        partial.unlink(missing_ok=True)
        raise UsageError(f"Could not download {url} ({err}). {offline}") from None
    if size is not None and received < size:
        partial.unlink()
        raise UsageError(
            f"The download of {url} was cut short: {received:,} of {size:,} bytes arrived, and nothing was kept. "
            f"Run the command again to retry. {offline}"
        )
    if (got := sha256_of(partial)) != sha256:
        partial.unlink()
        raise UsageError(
            f"The file downloaded from {url} has SHA-256 {got}, not the expected {sha256}: it was not "
            f"kept. Check data.url and {key}, or put a verified copy at {dest}."
        )
    partial.replace(dest)


def unpack(archive: Path, member: str, dest: Path, sha256: str) -> None:
    """Extract `member` of the zip `archive` to `dest` if its SHA-256 is `sha256` (zip's CRC checked too)."""
    partial = dest.with_name(dest.name + ".part")
    try:
        with zipfile.ZipFile(archive) as zipped:
            if member not in zipped.namelist():
                listing = ", ".join(zipped.namelist()[:5]) or "nothing"
                raise UsageError(
                    f"The archive {archive} holds no {member!r} (it holds {listing}). data.file names the text "
                    "inside data.url's zip: fix one of them, or train on a local copy with data.path."
                )
            with zipped.open(member) as source, open(partial, "wb") as out:
                while chunk := source.read(CHUNK):
                    out.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        partial.unlink(missing_ok=True)
        archive.unlink(missing_ok=True)
        raise UsageError(
            f"The archive {archive} is damaged ({err}), so it was deleted; run the command again to download it."
        ) from None
    if (got := sha256_of(partial)) != sha256:
        partial.unlink()
        raise UsageError(
            f"{member!r} unpacked from {archive} has SHA-256 {got}, not the expected {sha256}: it was not kept. "
            "Check data.sha256 (the text's hash; data.archive_sha256 is the zip's)."
        )
    partial.replace(dest)


def text_files(path: str | Path) -> list[Path]:
    """The files `data.path` names: a file; a folder's `*.txt` files (subfolders too, hidden ones skipped);
    or a glob's matches (`books/*.md`, `corpus/**/*.txt`). In sorted order; at least one."""
    pattern = os.path.expanduser(str(path))
    if any(c in pattern for c in GLOB_CHARACTERS):
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not files:
            raise UsageError(
                f"data.path={str(path)!r} matches no files. Check the pattern, e.g. data.path='books/*.txt'."
            )
        return files
    path = Path(pattern)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            f
            for f in path.rglob("*.txt")
            if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts)
        )
        if not files:
            raise UsageError(
                f"data.path={str(path)!r} is a folder without text files: a folder's *.txt files (in subfolders too) "
                f"are its texts. Put .txt files in it, or pass a glob for other names, e.g. data.path='{path}/*.md'."
            )
        return files
    raise UsageError(
        f"data.path={str(path)!r} does not exist. Pass an existing UTF-8 text file, a folder of .txt files or a glob."
    )

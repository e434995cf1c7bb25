"""Stage ``download``: fetch ``cifar-10-python.tar.gz`` and verify it.

Source and checksum come from ``params.yaml`` (``data.url``, ``data.md5``).
For offline use set, in the environment (params.yaml keeps the official values,
so DVC does not see a change)::

    CIFAR10_SOURCE=/path/to/cifar-10-python.tar.gz   # or file:///..., or another URL
    CIFAR10_MD5=<md5 of that file>                   # if it differs from data.md5

The archive is written to a temporary file next to the destination and renamed
only after its md5 and contents check out, so an interrupted or failed download
never leaves a file that a later stage (or DVC) would trust. Network errors are
retried ``data.retries`` times with exponential backoff; an interrupted HTTP
transfer resumes where it stopped when the server supports ranges.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import http.client
import os
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

from cnn import data
from pipeline import paths
from pipeline._util import PipelineError, atomic_path, summary
from pipeline.params import MD5_RE, load

CHUNK = 1 << 20
MEMBERS = tuple(f"{data.BATCH_DIR}/{m}" for m in data.MEMBERS)  # what cnn.data reads
USER_AGENT = "cnn-from-scratch-pipeline/0.1 (+python urllib)"
#: Base of the exponential backoff between attempts (seconds): 1, 2, 4, ... capped at 60.
BACKOFF_BASE = float(os.environ.get("CIFAR10_BACKOFF", "1"))


class _Retryable(Exception):
    """A transient network failure worth another attempt."""


def _progress(total: int | None, desc: str, initial: int = 0):
    from tqdm import tqdm

    # disable=None: bars on a terminal, silent when output is piped (CI, logs).
    return tqdm(
        total=total, initial=initial, desc=desc, unit="B", unit_scale=True,
        unit_divisor=1024, disable=None, file=sys.stderr, mininterval=0.5,
    )


def md5sum(path: str | os.PathLike) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------ sources
def local_path(source: str) -> Path | None:
    """The local path a source names (plain path or file:// URL), else None."""
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(source).expanduser()
    return None


def copy_local(src: Path, dest: Path) -> None:
    if not src.is_file():
        raise PipelineError(
            f"CIFAR-10 source {src} does not exist or is not a file. "
            "Point CIFAR10_SOURCE at a copy of cifar-10-python.tar.gz (path or file:// URL)."
        )
    total = src.stat().st_size
    with open(src, "rb") as fi, open(dest, "wb") as fo, _progress(total, f"copy {src.name}") as bar:
        while chunk := fi.read(CHUNK):
            fo.write(chunk)
            bar.update(len(chunk))


def _attempt(url: str, dest: Path, timeout: float) -> None:
    """One HTTP(S) attempt, resuming from ``dest``'s current size if possible."""
    have = dest.stat().st_size if dest.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # range not satisfiable: start over
            dest.unlink()
            raise _Retryable(f"HTTP 416 when resuming at byte {have}") from None
        if e.code in (408, 429) or e.code >= 500:
            raise _Retryable(f"HTTP {e.code} {e.reason}") from None
        raise PipelineError(
            f"download of {url} failed: HTTP {e.code} {e.reason}. "
            "Check data.url in params.yaml, or download the archive yourself and set "
            "CIFAR10_SOURCE=/path/to/cifar-10-python.tar.gz"
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # DNS, refused, reset, timeout
        reason = getattr(e, "reason", e)
        raise _Retryable(f"{type(reason).__name__}: {reason}") from None
    except ValueError as e:  # e.g. "unknown url type"
        raise PipelineError(f"cannot download from '{url}': {e}. Check data.url / CIFAR10_SOURCE.") from None

    with resp:
        status = getattr(resp, "status", 200)
        if have and status != 206:  # server ignored the range: restart from zero
            have = 0
        mode = "ab" if have else "wb"
        length = resp.headers.get("Content-Length")
        expected = int(length) + have if length and length.isdigit() else None
        got = have
        with open(dest, mode) as f, _progress(expected, "download", initial=have) as bar:
            while True:
                try:
                    chunk = resp.read(CHUNK)
                except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
                    raise _Retryable(
                        f"connection lost after {got} bytes ({type(e).__name__}: {e})"
                    ) from None
                if not chunk:
                    break
                try:
                    f.write(chunk)
                except OSError as e:
                    raise PipelineError(f"cannot write {dest}: {e}") from None
                got += len(chunk)
                bar.update(len(chunk))
        if expected is not None and got < expected:
            raise _Retryable(f"connection closed after {got} of {expected} bytes")


def fetch_url(url: str, dest: Path, retries: int, timeout: float) -> None:
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in ("http", "https"):  # no retry can fix that
        raise PipelineError(f"cannot download from '{url}': {scheme or 'no'} URL scheme. Use an "
                            "http(s) URL, a local path or a file:// URL (data.url / CIFAR10_SOURCE)")
    attempts = retries + 1
    for attempt in range(1, attempts + 1):
        try:
            _attempt(url, dest, timeout)
            return
        except _Retryable as e:
            if attempt == attempts:
                raise PipelineError(
                    f"could not download {url} after {attempts} attempt(s): {e}. "
                    "Check your network or proxy and run again (partial downloads are not kept), "
                    "or fetch the archive another way and set CIFAR10_SOURCE=/path/to/cifar-10-python.tar.gz"
                ) from None
            delay = min(60.0, BACKOFF_BASE * 2 ** (attempt - 1))
            print(
                f"download attempt {attempt}/{attempts} failed ({e}); retrying in {delay:g}s",
                file=sys.stderr,
            )
            time.sleep(delay)


# ------------------------------------------------------------------ checks
def check_archive(path: Path, source: str, local: bool = False) -> None:
    """Read the whole gzip stream and check every CIFAR-10 member is there. ``local``: the
    source is a file of the user's (CIFAR10_SOURCE), which the advice must not say to delete."""
    official = "the official archive is https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    hint = (f"Point CIFAR10_SOURCE (or data.url) at cifar-10-python.tar.gz or a copy of it ({official})."
            if local else "Run the stage again to download it anew, or fetch it another way and set "
            f"CIFAR10_SOURCE=/path/to/cifar-10-python.tar.gz ({official}).")
    found: set[str] = set()
    try:
        with gzip.open(path, "rb") as gz:
            with tarfile.open(fileobj=gz, mode="r|") as tf:
                for member in tf:
                    if member.isfile():
                        found.add(member.name)
            while gz.read(CHUNK):  # reach the gzip trailer: verifies CRC and length
                pass
    except (EOFError, gzip.BadGzipFile, zlib.error, tarfile.TarError, OSError) as e:
        raise PipelineError(
            f"{source} is truncated or corrupt ({type(e).__name__}: {e}); "
            f"it is not a readable .tar.gz. {hint}"
        ) from None
    missing = [m for m in MEMBERS if m not in found]
    if missing:
        raise PipelineError(
            f"{source} is not a complete CIFAR-10 python archive: missing {', '.join(missing)}. {hint}"
        )


def resolve_source(params) -> tuple[str, str, str]:
    """(source, md5, where the md5 came from) after applying the env overrides."""
    source = os.environ.get("CIFAR10_SOURCE", "").strip() or params.data.url
    env_md5 = os.environ.get("CIFAR10_MD5", "").strip().lower()
    if env_md5:
        if not MD5_RE.match(env_md5):
            raise PipelineError(f"CIFAR10_MD5 must be 32 hex digits; got '{env_md5}'")
        return source, env_md5, "CIFAR10_MD5"
    return source, params.data.md5, "params.yaml data.md5"


def download(params, dest: Path = paths.RAW_ARCHIVE) -> Path:
    source, md5, md5_from = resolve_source(params)
    dest = Path(dest)
    for stale in dest.parent.glob(f".{dest.name}.*.tmp") if dest.parent.exists() else []:
        stale.unlink(missing_ok=True)  # left by a killed earlier attempt
    if dest.is_file() and md5sum(dest) == md5:
        print(f"{dest} already present (md5 {md5})", file=sys.stderr)
        return dest
    # A file already there with another md5 stays until a verified one is renamed over it:
    # a failed download must not cost the user the copy they had.

    with atomic_path(dest) as tmp:  # a failure leaves no temporary file, nor folders made for it
        src_path = local_path(source)
        if src_path is not None:
            print(f"copying CIFAR-10 from {src_path}", file=sys.stderr)
            copy_local(src_path, tmp)
        else:
            print(f"downloading CIFAR-10 from {source}", file=sys.stderr)
            tmp.unlink()  # _attempt resumes from an existing file
            fetch_url(source, tmp, params.data.retries, params.data.timeout)
        got = md5sum(tmp)
        if got != md5:
            cause = ("Check the file; if it is a copy you made (an offline mirror), set CIFAR10_MD5 to its md5"
                     if src_path is not None else
                     "The download is truncated or corrupt, or not the CIFAR-10 python archive: "
                     "run the stage again. If the source is a trusted mirror of a repackaged "
                     "archive, set CIFAR10_MD5 to its md5")
            raise PipelineError(f"md5 mismatch for {source}: expected {md5} ({md5_from}), got {got}. "
                                f"{cause}: CIFAR10_MD5={got}.")
        check_archive(tmp, source, local=src_path is not None)
    print(f"wrote {dest} (md5 {md5})", file=sys.stderr)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.download", description=summary(__doc__),
        epilog="Offline: set CIFAR10_SOURCE (a path, file:// or another URL) and CIFAR10_MD5 (its "
               "md5, if it differs from data.md5) in the environment; params.yaml keeps the official values.")
    ap.add_argument("--params", default=str(paths.PARAMS), help="the pipeline's params file (data.url, data.md5)")
    ap.add_argument("--out", default=str(paths.RAW_ARCHIVE), help="where the verified archive goes")
    args = ap.parse_args(argv)
    params = load(args.params)
    download(params, Path(args.out))
    return 0


if __name__ == "__main__":
    from pipeline._util import run_main

    run_main(main)

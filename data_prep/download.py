"""The one download helper: a registry of archives (name -> URL + checksum) and a resumable, verified download.

In the style of d2l's ``DATA_HUB``: each archive is registered once with the
checksum that its publisher (or torchvision, which lists them) gives, and
:func:`download` fetches it into a cache directory, resuming a partial
download (``<file>.part``) with an HTTP ``Range`` request, showing a tqdm
progress bar, and moving it to its final name only once the checksum matches.
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from data_prep.common import file_hash
from derprop.data.datasets import DatasetError


@dataclass(frozen=True)
class Resource:
    """One downloadable file. ``checksum`` is ``"<algorithm>:<hex digest>"``."""

    name: str
    urls: tuple[str, ...]
    filename: str
    checksum: str
    size: int | None = None  # bytes, when known (for the progress bar and a free-space hint)


# Checksums as torchvision.datasets.VOCSegmentation and SBDataset list them.
REGISTRY: dict[str, Resource] = {
    r.name: r
    for r in (
        Resource(
            "voc2012_trainval",
            (
                "https://thor.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
                "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
            ),
            "VOCtrainval_11-May-2012.tar",
            "md5:6cd6e144f989b92b3379bac3b3de84fd",
            1_999_639_040,
        ),
        Resource(
            "sbd",
            ("https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz",),
            "benchmark.tgz",
            "md5:82b4d87ceb2ed10f6038a1cba92111cb",
        ),
    )
}


def verify(path: str | Path, checksum: str) -> str | None:
    """``None`` if the file's digest matches ``"<algorithm>:<hex>"``, else the actual digest."""
    algorithm, expected = checksum.split(":", 1)
    actual = file_hash(path, algorithm)
    return None if actual == expected.lower() else f"{algorithm}:{actual}"


def _open(url: str, offset: int, timeout: float):
    """Open ``url`` from byte ``offset``; returns (stream, total size or None, whether the offset was honoured)."""
    if url.startswith("file://"):
        path = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
        f = open(path, "rb")
        f.seek(offset)
        return f, path.stat().st_size, True
    request = urllib.request.Request(url, headers={"User-Agent": "derprop-data-prep"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    response = urllib.request.urlopen(request, timeout=timeout)
    resumed = response.status == 206
    length = response.headers.get("Content-Length")
    total = int(length) + (offset if resumed else 0) if length else None
    return response, total, resumed


def _fetch(url: str, part: Path, size: int | None, timeout: float, progress: bool) -> None:
    """Append the rest of ``url`` to ``part`` (starting over if the server ignores ``Range``)."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        stream, total, resumed = _open(url, offset, timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # range not satisfiable: the partial file is already complete
            return
        raise
    with stream:
        if not resumed:
            offset = 0
        with open(part, "ab" if offset else "wb") as f, tqdm(
            total=total or size, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=part.name.removesuffix(".part"), disable=not progress,
        ) as bar:  # fmt: skip
            while block := stream.read(1 << 20):
                f.write(block)
                bar.update(len(block))


def download(
    resource: str | Resource, cache_dir: str | Path, *, progress: bool = True, timeout: float = 60.0
) -> Path:
    """Download a registered file into ``cache_dir`` (once) and return its verified path.

    - A complete file already in the cache is verified, not downloaded again;
      if it fails verification, :class:`DatasetError` says so (it is never
      silently deleted).
    - An interrupted download resumes from ``<file>.part``.
    - A finished download whose checksum does not match is deleted and raises
      :class:`DatasetError`; nothing is left under the final name.
    - The URLs are tried in order; network errors name every URL tried.
    """
    if isinstance(resource, str):
        if resource not in REGISTRY:
            raise DatasetError(f"unknown resource {resource!r}; registered: {sorted(REGISTRY)}")
        resource = REGISTRY[resource]
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / resource.filename
    if final.exists():
        actual = verify(final, resource.checksum)
        if actual:
            raise DatasetError(
                f"{final} has checksum {actual}, expected {resource.checksum}: it is damaged or a different "
                f"file. Delete it and run again to download it afresh."
            )
        return final
    part = cache_dir / (resource.filename + ".part")
    if resource.size and not part.exists():
        free = shutil.disk_usage(cache_dir).free
        if free < resource.size:
            raise DatasetError(
                f"{resource.filename} needs {resource.size / 2**30:.1f} GiB but {cache_dir} has "
                f"{free / 2**30:.1f} GiB free; free some space or choose another --root."
            )
    errors = []
    for url in resource.urls:
        try:
            _fetch(url, part, resource.size, timeout, progress)
            break
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            errors.append(f"{url}: {e}")
    else:
        raise DatasetError(
            f"could not download {resource.filename}:\n  " + "\n  ".join(errors) + f"\nThe partial file {part} "
            "is kept; run again to resume, or download the file yourself and pass its folder with --from-archives."
        )
    actual = verify(part, resource.checksum)
    if actual:
        part.unlink()
        raise DatasetError(
            f"downloaded {resource.filename} from {url} has checksum {actual}, expected {resource.checksum}; "
            "the download was corrupt or the server sent another file. It was deleted; run again to retry, "
            "or fetch the file another way and pass its folder with --from-archives."
        )
    os.replace(part, final)
    return final

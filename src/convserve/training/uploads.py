"""The user's own labelled images as tracked, versioned data sets.

An archive (zip or tar, optionally gzip/bzip2/xz compressed) of class folders in
torchvision's ImageFolder layout is unpacked safely (absolute paths and ``..`` refused,
links skipped, decompressed bytes and files counted against limits), checked image by image,
and repacked as a deterministic tar of the images kept: its SHA-256 is the data set's id, so
the same images give the same id whoever uploads them. The tar and a report are stored as
the artifacts of one MLflow run (experiment ``convserve-datasets``) with the data set
registered as the run's input (``mlflow.data``); training runs that use it log it as their
input too, with the same digest. Workers download it once and keep it by id.

Torch-free, like ``config.py``: the service imports it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import tempfile
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import IO, Any

from PIL import Image, UnidentifiedImageError

from convserve.redact import redact

EXPERIMENT = "convserve-datasets"
ARTIFACT_DIR = "dataset"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MIN_PER_CLASS = 3  # one image each for training, validation and test
CHUNK = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What one upload may hold; an upload past one is refused at the first entry that
    crosses it, while the archive is read. The defaults suit a small machine (2 cores, 4 GB):
    the service's settings (``CONVSERVE_MAX_DATASET_*``, ``CONVSERVE_MAX_PIXELS``) are the
    same."""

    archive_bytes: int = 1 << 30  # the upload itself
    expanded_bytes: int = 2 << 30  # everything it unpacks to (stops zip bombs)
    files: int = 100_000  # entries: files and folders
    classes: int = 1_000
    pixels: int = 40_000_000  # width * height of one image


MAX_NAME_BYTES = 255  # one component of a path in the archive (most file systems' limit)
MAX_DEPTH = 32  # folders in a path


class DatasetError(ValueError):
    """A refused archive: ``status`` 413 (too large) or 422 (not usable), with why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Report:
    id: str  # SHA-256 of the repacked images (first 16 hex digits)
    name: str
    classes: dict[str, int]  # images kept per class, in label order
    images: int
    sizes: dict[str, int]  # "WxH" -> images, the most common first (at most 10)
    modes: dict[str, int]  # PIL mode -> images
    duplicates: list[list[str]] = field(default_factory=list)  # same bytes: first kept
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}
    too_small: list[str] = field(default_factory=list)  # classes under MIN_PER_CLASS images
    bytes: int = 0  # of the repacked tar

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- unpacking -----------------------------------------------------------------------------
def _safe_name(name: str) -> PurePosixPath | None:
    """The member's relative path; None for what is skipped (folders of macOS metadata,
    hidden files); ``DatasetError`` for a path that would land outside the archive."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or (path.parts and ":" in path.parts[0]) or ".." in path.parts:
        raise DatasetError(
            422, f"{name}: a path outside the archive (absolute or with ..) is refused"
        )
    if not path.parts or any(p.startswith(".") or p == "__MACOSX" for p in path.parts):
        return None
    return path


def _copy(source: IO[bytes], target: Path, budget: list[int], limits: Limits) -> None:
    with open(target, "wb") as out:
        while chunk := source.read(CHUNK):
            budget[0] += len(chunk)
            if budget[0] > limits.expanded_bytes:
                raise DatasetError(
                    413,
                    f"{target.name}: the archive expands beyond {limits.expanded_bytes:,} "
                    "bytes (CONVSERVE_MAX_DATASET_EXPANDED_BYTES)",
                )
            out.write(chunk)


class _Unpacker:
    """One archive's members written under ``into`` as they are read, each counted and
    checked first: entries, expanded bytes, names, and each image's pixels (read from its
    header). A member that is not an image is skipped without being written."""

    def __init__(self, into: Path, limits: Limits) -> None:
        self.into, self.limits = into, limits
        self.entries, self.budget = 0, [0]
        self.skipped: list[dict[str, str]] = []

    def entry(self, name: str) -> PurePosixPath | None:
        """Count the member; its path, or None when it is skipped without a word."""
        self.entries += 1
        if self.entries > self.limits.files:
            raise DatasetError(
                413,
                f"{name[:200]}: the archive holds over {self.limits.files:,} entries, files "
                "and folders (CONVSERVE_MAX_DATASET_FILES)",
            )
        path = _safe_name(name)
        if path is not None:
            if len(path.parts) > MAX_DEPTH:
                raise DatasetError(422, f"{name[:200]}...: deeper than {MAX_DEPTH} folders")
            if any(len(p.encode()) > MAX_NAME_BYTES for p in path.parts):
                raise DatasetError(
                    422, f"{name[:200]}...: a name longer than {MAX_NAME_BYTES} bytes"
                )
        return path

    def folder(self, path: PurePosixPath) -> None:
        self._on_disk(path, lambda: (self.into / path).mkdir(parents=True, exist_ok=True))

    def file(self, path: PurePosixPath, open_member: Callable[[], IO[bytes]]) -> None:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            reason = f"not an image ({path.suffix or 'no suffix'})"
            self.skipped.append({"path": path.as_posix(), "reason": reason})
            return
        target = self.into / path

        def write() -> None:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open_member() as source:
                _copy(source, target, self.budget, self.limits)

        self._on_disk(path, write)
        _check_pixels(target, path.as_posix(), self.limits.pixels)

    def _on_disk(self, path: PurePosixPath, write: Callable[[], None]) -> None:
        """``write()``; a member the file system refuses (a file and a folder of one name)
        is a 422 that names it, never the server's path."""
        try:
            write()
        except OSError as err:
            raise DatasetError(
                422, f"{path.as_posix()[:200]}: cannot be unpacked ({err.strerror or err})"
            ) from None


def _check_pixels(path: Path, name: str, limit: int) -> None:
    """From the image's header: over ``limit`` pixels is a 413."""
    try:
        with warnings.catch_warnings():  # PIL warns from 89 M pixels: the limit here decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
    except Image.DecompressionBombError:  # over 179 M pixels: PIL will not even open it
        width = height = limit + 1
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return  # not decodable: checked and reported by ``build``
    if width * height > limit:
        raise DatasetError(
            413,
            f"{name[:200]}: {width}x{height} is {width * height:,} pixels; the limit is "
            f"{limit:,} (CONVSERVE_MAX_PIXELS)",
        )


def _member_file(tar: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    source = tar.extractfile(member)
    assert source is not None  # a regular file's
    return source


def unpack(archive: Path, into: Path, limits: Limits = Limits()) -> list[dict[str, str]]:
    """Extract ``archive`` under ``into``, refusing what could escape it or exhaust the disk
    or the memory, at the first member that would; links, devices and hidden files are
    skipped, and so are files that are not images (not written): those are returned as
    ``{"path", "reason"}``."""
    u = _Unpacker(into, limits)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                path = u.entry(info.filename)
                is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
                if path is None:
                    continue
                if info.is_dir():
                    u.folder(path)  # an empty class counts
                elif is_link:
                    u.skipped.append({"path": path.as_posix(), "reason": "a link"})
                else:
                    u.file(path, partial(z.open, info))
        return u.skipped
    if not tarfile.is_tarfile(archive):
        raise DatasetError(
            422, "not a zip or tar archive (tar may be gzip, bzip2 or xz compressed)"
        )
    with tarfile.open(archive, mode="r:*") as tar:
        for member in tar:
            path = u.entry(member.name)
            if path is None:
                continue
            if member.isdir():
                u.folder(path)
            elif not member.isfile():  # links, devices
                u.skipped.append({"path": path.as_posix(), "reason": "not a regular file"})
            else:
                u.file(path, partial(_member_file, tar, member))
    return u.skipped


# ---- checking and repacking ----------------------------------------------------------------
def _class_root(folder: Path) -> Path:
    """The folder holding the class folders: the top, or the one folder an archive of a
    folder puts everything in."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    while len(entries) == 1 and entries[0].is_dir():
        inner = [p for p in entries[0].iterdir() if not p.name.startswith(".")]
        if not any(p.is_dir() for p in inner):
            break  # a single class: keep it, the report will say so
        folder, entries = entries[0], inner
    return folder


def _check(path: Path, rel: str, pixels: int) -> tuple[str, str] | str:
    """(size, mode) of a decodable image, or why it is skipped; over ``pixels`` is a 413."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an image ({path.suffix or 'no suffix'})"
    _check_pixels(path, rel, pixels)  # before any pixel is decoded
    try:
        with Image.open(path) as image:
            image.load()  # decodes every pixel: a truncated file fails here
            return f"{image.width}x{image.height}", image.mode
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        detail = str(err).replace(f"'{path}'", "").replace(str(path), "").strip(" :")
        return f"cannot be decoded ({type(err).__name__}{': ' + detail if detail else ''})"[:200]


def _walk(root: Path) -> Iterator[tuple[str, Path]]:
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(class_dir.rglob("*")):
            if path.is_file():
                yield class_dir.name, path


def build(
    folder: Path,
    name: str,
    tar_path: Path,
    limits: Limits = Limits(),
    skipped: list[dict[str, str]] | None = None,
) -> Report:
    """Check the images under ``folder`` and write the ones kept to ``tar_path`` as a
    deterministic tar (sorted names, no times or owners): its hash is the id. ``skipped``:
    what unpacking left out already, reported with the rest."""
    root = _class_root(folder)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) > limits.classes:
        raise DatasetError(
            413,
            f"{len(classes)} classes; the limit is {limits.classes} "
            "(CONVSERVE_MAX_DATASET_CLASSES)",
        )
    if len(classes) < 2:
        raise DatasetError(
            422,
            "an image folder needs at least two class folders (class_a/img.png, "
            f"class_b/img.png, ...); found {len(classes)}",
        )
    kept: dict[str, int] = dict.fromkeys(classes, 0)
    sizes: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    seen: dict[str, str] = {}
    duplicates: dict[str, list[str]] = {}
    # what unpacking skipped, named as the rest: relative to the class folders' parent
    top = root.relative_to(folder).as_posix()
    skipped = [
        {**s, "path": s["path"].removeprefix(f"{top}/") if top != "." else s["path"]}
        for s in skipped or []
    ]
    members: list[tuple[str, Path]] = []
    for label, path in _walk(root):
        rel = path.relative_to(root).as_posix()
        checked = _check(path, rel, limits.pixels)
        if isinstance(checked, str):
            skipped.append({"path": rel, "reason": checked})
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in seen:
            duplicates.setdefault(digest, [seen[digest]]).append(rel)
            continue
        seen[digest] = rel
        kept[label] += 1
        sizes[checked[0]] += 1
        modes[checked[1]] += 1
        members.append((rel, path))
    if not members:
        raise DatasetError(422, "no decodable image in the archive")
    return Report(
        id=_write_tar(members, tar_path),
        name=name,
        classes=kept,
        images=len(members),
        sizes=dict(sizes.most_common(10)),
        modes=dict(modes.most_common()),
        duplicates=list(duplicates.values()),
        skipped=skipped,
        too_small=[c for c, n in kept.items() if n < MIN_PER_CLASS],
        bytes=tar_path.stat().st_size,
    )


def _write_tar(members: list[tuple[str, Path]], tar_path: Path) -> str:
    """The images as a deterministic tar (sorted names, no times or owners); its id."""
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel, path in members:
            info = tarfile.TarInfo(rel)
            info.size, info.mtime, info.mode = path.stat().st_size, 0, 0o644
            with open(path, "rb") as f:
                tar.addfile(info, f)
    sha = hashlib.sha256()
    with open(tar_path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
    return sha.hexdigest()[:16]


# ---- MLflow --------------------------------------------------------------------------------
def _experiment(client: Any) -> str:
    from convserve.training.tracking import get_or_create_experiment

    return get_or_create_experiment(client, EXPERIMENT)


def find(client: Any, dataset: str) -> Any | None:
    """The run holding data set ``dataset``: its id, or its name (the newest version)."""
    experiment = _experiment(client)
    for tag in ("convserve.dataset_id", "convserve.dataset_name"):
        runs = client.search_runs(
            [experiment],
            f"tags.`{tag}` = '{_quote(dataset)}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if runs:
            return runs[0]
    return None


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def report_of(run: Any) -> dict[str, Any]:
    return dict(json.loads(run.data.tags["convserve.dataset_report"]))


def listing(client: Any) -> list[Any]:
    return list(
        client.search_runs(
            [_experiment(client)],
            "tags.`convserve.kind` = 'dataset'",
            order_by=["attributes.start_time DESC"],
            max_results=1000,
        )
    )


def mlflow_dataset(report: Report | dict[str, Any], artifact_uri: str) -> Any:
    """The data set as ``mlflow.data`` sees it: a name, a digest, and where it is."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    data = report.to_dict() if isinstance(report, Report) else report
    return MetaDataset(  # type: ignore[abstract]
        HTTPDatasetSource(artifact_uri), name=data["name"], digest=data["id"]
    )


def log_input(
    client: Any, run_id: str, report: Report | dict[str, Any], uri: str, context: str
) -> None:
    from mlflow.entities import DatasetInput, InputTag

    entity = mlflow_dataset(report, uri)._to_mlflow_entity()
    client.log_inputs(
        run_id, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])]
    )


def _stored(client: Any, dataset_id: str, name: str) -> Any | None:
    """The run that holds these images under this name, if one does."""
    runs = client.search_runs(
        [_experiment(client)],
        f"tags.`convserve.dataset_id` = '{_quote(dataset_id)}' and "
        f"tags.`convserve.dataset_name` = '{_quote(name)}'",
        max_results=1,
    )
    return runs[0] if runs else None


def store(client: Any, report: Report, tar_path: Path) -> tuple[Any, bool]:
    """Keep the repacked images and the report in MLflow; (run, created). Images already
    stored under this name answer with the stored version; under another name, they are
    stored again under this one (each name its own version, the id the same)."""
    existing = _stored(client, report.id, report.name)
    if existing is not None:
        return existing, False
    # The report as a tag (what GET /datasets answers without a download), its long lists cut
    # to fit MLflow's tag size; report.json holds all of it.
    short = {
        **report.to_dict(),
        "skipped": report.skipped[:20],
        "duplicates": report.duplicates[:20],
    }
    run = client.create_run(
        _experiment(client),
        run_name=f"{report.name}-{report.id[:8]}",
        tags={
            "convserve.kind": "dataset",
            "convserve.dataset_id": report.id,
            "convserve.dataset_name": report.name,
            "convserve.dataset_report": json.dumps(short, separators=(",", ":"))[:8000],
        },
    )
    run_id = run.info.run_id
    try:
        client.log_artifact(run_id, str(tar_path), ARTIFACT_DIR)  # named <id>.tar
        client.log_dict(run_id, report.to_dict(), "report.json")
        log_input(
            client,
            run_id,
            report,
            f"{run.info.artifact_uri}/{ARTIFACT_DIR}/{report.id}.tar",
            "upload",
        )
        client.set_terminated(run_id, "FINISHED")
    except Exception:
        client.delete_run(run_id)  # nothing half-written stays listed
        raise
    return client.get_run(run_id), True


def add(
    source: Path | IO[bytes], name: str, client: Any, limits: Limits = Limits()
) -> tuple[Any, Report, bool]:
    """An archive (a path or an open file) or a folder, checked, repacked and stored:
    (run, report, created). The report is this upload's (what it skipped and duplicated),
    also when the images were stored already."""
    with tempfile.TemporaryDirectory(prefix="convserve-dataset-") as tmp:
        work = Path(tmp)
        skipped: list[dict[str, str]] = []
        if isinstance(source, Path) and source.is_dir():
            folder = source
        else:
            archive = source if isinstance(source, Path) else _spill(source, work / "upload")
            folder = work / "files"
            folder.mkdir()
            skipped = unpack(archive, folder, limits)
        report = build(folder, name, work / "images.tar", limits, skipped)
        tar_path = (work / "images.tar").rename(work / f"{report.id}.tar")
        run, created = store(client, report, tar_path)
    return run, report, created


def _spill(stream: IO[bytes], path: Path) -> Path:
    with open(path, "wb") as out:
        shutil.copyfileobj(stream, out, CHUNK)
    return path


def fetch(client: Any, dataset: str, cache_dir: Path) -> tuple[Path, dict[str, Any], str]:
    """The data set's class folders on this machine (downloaded and unpacked once, kept by
    id under ``cache_dir``), its report and its artifact URI."""
    run = find(client, dataset)
    if run is None:
        raise ValueError(
            f"no data set {dataset!r} in MLflow ({redact(client.tracking_uri)}); add one with "
            "`convserve data add FOLDER_OR_ARCHIVE --name NAME` or POST /datasets"
        )
    report = report_of(run)
    uri = f"{run.info.artifact_uri}/{ARTIFACT_DIR}/{report['id']}.tar"
    target = cache_dir / report["id"]
    if (target / ".complete").exists():
        return target, report, uri
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{report['id']}-", dir=cache_dir) as tmp:
        local = client.download_artifacts(
            run.info.run_id, f"{ARTIFACT_DIR}/{report['id']}.tar", tmp
        )
        files = Path(tmp) / "files"
        unpack(Path(local), files)
        (files / ".complete").touch()
        try:
            files.rename(target)  # atomic: another worker may have won the race
        except OSError:
            if not (target / ".complete").exists():
                raise
    return target, report, uri


def delete(client: Any, dataset: str) -> Any | None:
    """Delete the data set's run (MLflow's garbage collection removes its files); the run,
    or None when there is no such data set."""
    run = find(client, dataset)
    if run is not None:
        client.delete_run(run.info.run_id)
    return run


def report_table(report: dict[str, Any]) -> str:
    """The report in words, for the CLI."""
    lines = [
        f"data set {report['name']}: id {report['id']}, {report['images']} images, "
        f"{len(report['classes'])} classes"
    ]
    lines += [f"  {c}: {n}" for c, n in report["classes"].items()]
    if report["too_small"]:
        lines.append(
            f"  too small to split (under {MIN_PER_CLASS}): {', '.join(report['too_small'])}"
        )
    if report["duplicates"]:
        lines.append(
            f"  duplicates (kept once): {len(report['duplicates'])} groups, e.g. "
            + " = ".join(report["duplicates"][0])
        )
    for s in report["skipped"][:20]:
        lines.append(f"  skipped {s['path']}: {s['reason']}")
    if len(report["skipped"]) > 20:
        lines.append(f"  ... and {len(report['skipped']) - 20} more skipped")
    return "\n".join(lines)

"""Data set ingest bounded while it streams: every limit is met at the first entry past it,
a malformed archive is a 422 that names its entry (never a server path), and ``POST
/datasets`` (a real process, a real MLflow) reports each upload as it was, bounds how many
run at once and cleans up after a client that leaves."""

import io
import re
import socket
import struct
import zipfile
import zlib
from pathlib import Path

import httpx
import pytest
from PIL import Image

from convserve.jobs import JobSettings
from convserve.service.settings import Settings
from convserve.training import uploads
from tests.servers import uvicorn_server
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
AUTH = {"Authorization": "Bearer tok"}
ZIP = {"Content-Type": "application/zip"}


def _png(colour: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (colour, 255 - colour, 7)).save(buf, "PNG")
    return buf.getvalue()


def _huge_png(width: int, height: int) -> bytes:
    """A PNG whose header says ``width`` x ``height`` (RGBA); its pixels are never there."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def _zip(entries: dict[str, bytes], folders: list[str] = ()) -> bytes:  # type: ignore[assignment]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for folder in folders:
            z.writestr(zipfile.ZipInfo(folder.rstrip("/") + "/"), b"")
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def _two_classes(n: int = 4, start: int = 0) -> dict[str, bytes]:
    return {f"{c}/{i}.png": _png(start + 40 * k + i) for k, c in enumerate("ab") for i in range(n)}


def _unpack(tmp_path: Path, data: bytes, limits: uploads.Limits = uploads.Limits()) -> list:
    tmp_path.mkdir(parents=True, exist_ok=True)
    archive = tmp_path / "upload.zip"
    archive.write_bytes(data)
    return uploads.unpack(archive, tmp_path / "files", limits)


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path):
    """13000 x 13000 RGBA (676 MB decoded) in a few hundred bytes: refused before a pixel is
    decoded, naming the entry and the setting."""
    data = _zip({**_two_classes(), "a/huge.png": _huge_png(13000, 13000)})
    with pytest.raises(uploads.DatasetError, match="CONVSERVE_MAX_PIXELS") as err:
        _unpack(tmp_path, data)
    assert err.value.status == 413 and str(err.value).startswith("a/huge.png: 13000x13000")


def test_folders_and_other_files_count_as_entries_and_stop_the_archive_there(tmp_path):
    folders = [f"a/{i}" for i in range(2000)]
    with pytest.raises(uploads.DatasetError, match="over 1,000 entries") as err:
        _unpack(tmp_path, _zip(_two_classes(), folders), uploads.Limits(files=1000))
    assert err.value.status == 413 and "CONVSERVE_MAX_DATASET_FILES" in str(err.value)
    texts = {f"a/{i}.txt": b"words" for i in range(2000)}
    with pytest.raises(uploads.DatasetError, match="over 1,000 entries"):
        _unpack(tmp_path / "t", _zip(texts), uploads.Limits(files=1000))
    # under the limit, files that are not images are reported, and never written
    skipped = _unpack(tmp_path / "u", _zip({**_two_classes(), "a/notes.txt": b"x"}))
    assert skipped == [{"path": "a/notes.txt", "reason": "not an image (.txt)"}]
    assert not (tmp_path / "u" / "files" / "a" / "notes.txt").exists()


@pytest.mark.parametrize(
    ("entries", "named"),
    [
        ({"a/x.png": _png(2), "a/x.png/1.png": _png(1)}, "a/x.png/1.png: cannot be unpacked"),
        ({"a/" + "n" * 300 + ".png": _png(1)}, "a name longer than 255 bytes"),
        ({"a/" + "d/" * 2100 + "1.png": _png(1)}, "deeper than 32 folders"),
    ],
    ids=["a file and a folder of one name", "a 300-character name", "2,100 levels"],
)
def test_a_malformed_archive_is_a_422_naming_the_entry_not_a_server_path(tmp_path, entries, named):
    with pytest.raises(uploads.DatasetError) as err:
        _unpack(tmp_path, _zip({**_two_classes(), **entries}))
    assert err.value.status == 422 and named in str(err.value), str(err.value)
    assert str(tmp_path) not in str(err.value) and "/tmp" not in str(err.value)


def test_every_setting_named_in_a_message_exists():
    """A CONVSERVE_ name in the source is a field of the settings classes, or a variable the
    source reads itself."""
    fields = {
        f"CONVSERVE_{name.upper()}" for cls in (Settings, JobSettings) for name in cls.model_fields
    }
    source = "\n".join(p.read_text() for p in (ROOT / "src" / "convserve").rglob("*.py"))
    named = set(re.findall(r"CONVSERVE_[A-Z0-9_]*[A-Z0-9](?![A-Z0-9_*])", source))
    assert "CONVSERVE_MAX_DATASET_EXPANDED_BYTES" in fields
    # the variables read directly: assigned to a constant or passed to os.environ
    direct = set(
        re.findall(r"(?:environ(?:\.get)?\(|environ\[|= )\"(CONVSERVE_[A-Z0-9_]+)\"", source)
    )
    unknown = sorted(named - fields - direct)
    assert unknown == [], f"named but neither a setting nor read: {unknown}"


@pytest.fixture(scope="module")
def api(mlflow_url, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ingest")
    (folder / "tmp").mkdir()
    env = {
        "MLFLOW_TRACKING_URI": mlflow_url,
        "CONVSERVE_MODEL_URI": "models:/nothing-here@champion",
        "CONVSERVE_API_TOKEN": "tok",
        "CONVSERVE_MAX_DATASET_INGESTS": "1",
        "CONVSERVE_BODY_READ_TIMEOUT": "20",
        "TMPDIR": str(folder / "tmp"),
    }
    with uvicorn_server(env, folder) as url:
        yield url, folder


def test_a_re_upload_under_another_name_is_that_names_version(api):
    url, _ = api
    body = _zip(_two_classes(start=100))
    with httpx.Client(base_url=url, timeout=60, headers=AUTH) as http:
        first = http.post("/datasets?name=shapes-one", content=body, headers=ZIP)
        assert first.status_code == 201, first.text
        again = http.post(
            "/datasets?name=shapes-two",
            content=_zip({**_two_classes(start=100), "b/broken.png": b"\x89PNG\r\n\x1a\nx"}),
            headers=ZIP,
        )
        assert again.status_code == 201, again.text
        report = again.json()
        assert report["name"] == "shapes-two" and report["id"] == first.json()["id"]
        assert [s["path"] for s in report["skipped"]] == ["b/broken.png"]  # this upload's
        assert http.get("/datasets/shapes-two").json()["name"] == "shapes-two"
        assert http.get("/datasets/shapes-one").json()["name"] == "shapes-one"
        same = http.post("/datasets?name=shapes-two", content=body, headers=ZIP)
        assert same.status_code == 200 and same.json()["skipped"] == []


def test_the_api_refuses_a_malformed_archive_with_its_entry(api):
    url, _ = api
    body = _zip({**_two_classes(), "a/" + "n" * 300 + ".png": _png(3)})
    answer = httpx.post(f"{url}/datasets?name=bad", content=body, headers={**AUTH, **ZIP})
    assert answer.status_code == 422 and "longer than 255 bytes" in answer.json()["detail"]
    huge = _zip({**_two_classes(), "b/huge.png": _huge_png(13000, 13000)})
    answer = httpx.post(f"{url}/datasets?name=huge", content=huge, headers={**AUTH, **ZIP})
    assert answer.status_code == 413 and "b/huge.png" in answer.json()["detail"]


def _start_upload(url: str, size: int, sent: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(
        b"POST /datasets?name=slow HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer tok\r\n"
        b"Content-Type: application/zip\r\nContent-Length: %d\r\n\r\n%s" % (size, sent)
    )
    return sock


def test_ingests_are_bounded_and_a_client_that_leaves_leaves_nothing(api):
    url, folder = api
    body = _zip(_two_classes(start=200))
    sock = _start_upload(url, len(body), body[: len(body) // 2])  # it stalls half-way
    wait_until(lambda: list((folder / "tmp").glob("convserve-upload-*")), 30, "the upload started")
    second = httpx.post(f"{url}/datasets?name=other", content=body, headers={**AUTH, **ZIP})
    assert second.status_code == 429, second.text
    assert "CONVSERVE_MAX_DATASET_INGESTS" in second.json()["detail"]
    assert int(second.headers["retry-after"]) > 0
    sock.close()  # the client leaves
    wait_until(
        lambda: not list((folder / "tmp").glob("convserve-upload-*")), 30, "its files removed"
    )
    done = httpx.post(f"{url}/datasets?name=after", content=body, headers={**AUTH, **ZIP})
    assert done.status_code == 201, done.text
    log = "\n".join(p.read_text() for p in folder.glob("serve-*.log"))
    assert "Traceback" not in log and "Exception in ASGI application" not in log

"""Runs the installed, unmodified huggingface_hub (0.23 .. 2.x) against the fake Hub in fakehub.py.

conftest.py exports HF_ENDPOINT (and HF_HOME, telemetry off, short timeouts) before huggingface_hub
is imported. No torch; safetensors is only used, if installed, to check the file written by hand.
"""
import hashlib
import inspect
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import HfApi, constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.utils import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    http_backoff,
)

HERE = Path(__file__).resolve().parent
TOKEN = "fake"  # any token: the fake only checks that writes carry an Authorization header
FILES = {"config.json": b'{"architecture": "resnet18", "num_classes": 10}',
         "README.md": b"---\nlibrary_name: timm\n---\n# seeded\n",
         "sub/dir/notes.txt": b"nested file"}


def safetensors_bytes() -> bytes:
    """A real safetensors file (one F32 tensor "weight" [2, 2]) written by hand: no torch/numpy needed."""
    header = json.dumps({"__metadata__": {"format": "pt"},
                         "weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)


def make_folder(tmp_path: Path) -> dict:
    files = {"config.json": b'{"architecture": "resnet18", "num_classes": 3}',
             "model.safetensors": safetensors_bytes(),
             "README.md": b"---\nlibrary_name: timm\nlicense: apache-2.0\n---\n# uploaded\n"}
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def xet_upload_in_use() -> bool:
    """2.x + hf_xet installed: upload_folder runs the Xet pipeline (commits retried, "lfs" files to Xet)."""
    try:
        from huggingface_hub.utils._runtime import is_xet_available
    except ImportError:
        return False
    return is_xet_available()


def lfs_files_go_to_xet() -> bool:
    """2.x + hf_xet: "lfs" files go straight to Xet storage. 0.3x / 1.x + hf_xet ask the LFS batch API
    with transfers [basic, multipart, xet] and take the "basic" that fakehub answers."""
    from huggingface_hub import _commit_api
    upload = getattr(_commit_api, "_upload_files", None)
    return (upload is not None and xet_upload_in_use()
            and 'transfers.append("xet")' not in inspect.getsource(upload))


def commit_attempts_on_5xx() -> int:
    """How many times upload_folder POSTs /commit when it keeps answering 500 (observed per version):
    2.x pipeline (hf_xet installed) retries 5 times; create_commit (0.23 .. 1.x, 2.x without hf_xet) never."""
    pipelined = "pipelined_upload" in inspect.getsource(HfApi.upload_folder) and xet_upload_in_use()
    return 6 if pipelined else 1


def head_attempts_on_5xx(cached: bool) -> int:
    """HEAD /resolve requests hf_hub_download makes while the Hub answers 500 (observed per version)."""
    from huggingface_hub import file_download
    if "retry_on_errors" in inspect.signature(file_download._get_metadata_or_catch_error).parameters:
        return 1 if cached else 7  # 2.x: no retry while a cached copy exists, else 1 + (1 + 5 retries)
    wrapper = getattr(file_download, "_request_wrapper", None)
    if wrapper is not None and "http_backoff" in inspect.getsource(wrapper):
        return 6  # late 0.3x (0.36): every HEAD through http_backoff, 5 retries, cached or not
    return 1  # 0.23 .. 0.30, 1.x: no retry


def client_is_requests_based() -> bool:
    from huggingface_hub.utils import get_session
    return type(get_session()).__module__.startswith("requests")


def preupload_retried() -> bool:
    from huggingface_hub import _commit_api
    return "http_backoff" in inspect.getsource(_commit_api._fetch_upload_modes)


@pytest.fixture
def no_backoff_sleep(monkeypatch):
    """huggingface_hub has no env var for its retry backoff (1, 2, 4, 8, 8 s): zero it in-process."""
    monkeypatch.setitem(http_backoff.__kwdefaults__, "base_wait_time", 0)
    monkeypatch.setitem(http_backoff.__kwdefaults__, "max_wait_time", 0)


@pytest.fixture
def api():
    return HfApi(token=TOKEN)


def assert_all_routed(hub):
    assert [(c.method, c.path) for c in hub.calls if not c.routed] == []


def run_client(code: str, **env) -> str:
    """Run `code` in a fresh interpreter: HF_* variables are then read at its first import."""
    full_env = {**os.environ, "PYTHONPATH": str(HERE), **env}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


# ---------------------------------------------------------------------------------------------- download
def test_endpoint_wiring(hub):
    assert constants.ENDPOINT == hub.endpoint == os.environ["HF_ENDPOINT"]
    assert huggingface_hub.hf_api.api.endpoint == hub.endpoint  # module-level HfApi behind model_info() etc.


def test_hf_hub_download_then_offline_from_cache(hub, tmp_path):
    sha = hub.add_repo("fake-org/seeded", FILES)
    cache = tmp_path / "cache"
    for name, data in FILES.items():
        path = hf_hub_download("fake-org/seeded", name, cache_dir=cache)
        assert Path(path).read_bytes() == data
        assert f"/snapshots/{sha}/" in Path(path).as_posix()
    assert hub.requests(path="/resolve/") == [(m, f"/fake-org/seeded/resolve/main/{n}")
                                              for n in FILES for m in ("HEAD", "GET")]
    assert not any("authorization" in c.headers for c in hub.calls)  # no HF_TOKEN: anonymous downloads
    # Second call: HEAD only (etag matches the cached blob), no GET.
    hub.calls.clear()
    hf_hub_download("fake-org/seeded", "config.json", cache_dir=cache)
    assert hub.requests() == [("HEAD", "/fake-org/seeded/resolve/main/config.json")]

    # Offline: HF_HUB_OFFLINE is read at import => a fresh interpreter. No request may reach the server.
    hub.calls.clear()
    out = run_client(f"""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import LocalEntryNotFoundError
        path = hf_hub_download("fake-org/seeded", "config.json", cache_dir={str(cache)!r})
        print(open(path, "rb").read().decode())
        try:
            hf_hub_download("fake-org/seeded", "never-downloaded.txt", cache_dir={str(cache)!r})
        except LocalEntryNotFoundError:
            print("LocalEntryNotFoundError")
        """, HF_HUB_OFFLINE="1")
    assert out.splitlines() == [FILES["config.json"].decode(), "LocalEntryNotFoundError"]
    assert hub.calls == []
    # In-process equivalent that works with every version: local_files_only=True.
    assert Path(hf_hub_download("fake-org/seeded", "README.md", cache_dir=cache,
                                local_files_only=True)).read_bytes() == FILES["README.md"]
    assert hub.calls == []


def test_hub_hangs_falls_back_to_cache_on_timeout(hub, tmp_path, no_backoff_sleep):
    hub.add_repo("fake-org/slow", FILES)
    cache = tmp_path / "cache"
    hf_hub_download("fake-org/slow", "config.json", cache_dir=cache)
    hub.fail(0, method="HEAD", delay=5, times=None)  # the server hangs longer than etag_timeout
    t0 = time.monotonic()
    path = hf_hub_download("fake-org/slow", "config.json", cache_dir=cache, etag_timeout=0.5)
    assert Path(path).read_bytes() == FILES["config.json"]
    # 0.36 retries the timed-out HEAD 5 times (6 x 0.5 s); the others give up after one
    assert time.monotonic() - t0 < 0.5 * head_attempts_on_5xx(cached=True) + 1.5


def test_try_to_load_from_cache(hub, tmp_path):
    sha = hub.add_repo("fake-org/cached", FILES)
    cache = tmp_path / "cache"
    assert try_to_load_from_cache("fake-org/cached", "config.json", cache_dir=cache) is None
    path = hf_hub_download("fake-org/cached", "config.json", cache_dir=cache)
    assert try_to_load_from_cache("fake-org/cached", "config.json", cache_dir=cache) == path
    assert try_to_load_from_cache("fake-org/cached", "config.json", cache_dir=cache, revision=sha) == path
    assert try_to_load_from_cache("fake-org/cached", "README.md", cache_dir=cache) is None
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("fake-org/cached", "missing.bin", cache_dir=cache)
    # the 404 (with X-Repo-Commit) is cached as "known not to exist": a sentinel, not a path, not None
    no_exist = try_to_load_from_cache("fake-org/cached", "missing.bin", cache_dir=cache)
    assert no_exist is not None and not isinstance(no_exist, str)


def test_file_exists_model_info_list_files(hub, api):
    sha = hub.add_repo("fake-org/info", FILES)
    assert api.file_exists("fake-org/info", "config.json")
    assert api.file_exists("fake-org/info", "sub/dir/notes.txt")
    assert not api.file_exists("fake-org/info", "nope.bin")
    assert not api.file_exists("fake-org/nope", "config.json")
    assert not api.file_exists("fake-org/info", "config.json", revision="no-such-branch")
    info = api.model_info("fake-org/info")
    assert (info.id, info.sha) == ("fake-org/info", sha)
    assert sorted(s.rfilename for s in info.siblings) == sorted(FILES)
    assert huggingface_hub.model_info("fake-org/info", revision=sha).sha == sha  # module-level HfApi instance
    assert sorted(api.list_repo_files("fake-org/info")) == sorted(FILES)
    assert api.repo_exists("fake-org/info") and not api.repo_exists("fake-org/nope")
    assert ("GET", "/api/models/fake-org/info") in hub.requests()
    assert_all_routed(hub)


def test_snapshot_download(hub, tmp_path):
    sha = hub.add_repo("fake-org/snap", FILES)
    path = Path(huggingface_hub.snapshot_download("fake-org/snap", cache_dir=tmp_path / "cache"))
    assert {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()} == FILES
    assert ("GET", "/api/models/fake-org/snap/revision/main") in hub.requests()  # 2.x also lists /tree/{sha}
    local = tmp_path / "local"
    huggingface_hub.snapshot_download("fake-org/snap", revision=sha, local_dir=local, allow_patterns="*.json")
    assert (local / "config.json").read_bytes() == FILES["config.json"]
    assert not (local / "README.md").exists()
    assert_all_routed(hub)


# ---------------------------------------------------------------------------------------------- 404 / 401
def test_404_exceptions(hub, api, tmp_path):
    hub.add_repo("fake-org/present", FILES)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("fake-org/absent", "config.json", cache_dir=tmp_path)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("fake-org/present", "absent.json", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("fake-org/present", "config.json", revision="absent", cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("fake-org/absent")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("fake-org/present", revision="absent")
    assert_all_routed(hub)


def test_401_for_unknown_repo(hub, api, tmp_path):
    """The real Hub answers 401 (+ X-Error-Code: RepoNotFound) for a missing repo when not logged in."""
    hub.missing_repo_status = 401
    with pytest.raises(RepositoryNotFoundError) as e:
        hf_hub_download("fake-org/absent", "config.json", cache_dir=tmp_path)
    assert e.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("fake-org/absent")
    # Without X-Error-Code the clients only map a bare 401 to RepositoryNotFoundError for https:// URLs
    # (REPO_API_REGEX); over http://127.0.0.1 it stays a plain HfHubHTTPError.
    hub.missing_repo_error_code = False
    with pytest.raises(HfHubHTTPError) as e:
        api.model_info("fake-org/absent")
    assert e.value.response.status_code == 401 and not isinstance(e.value, RepositoryNotFoundError)


# ---------------------------------------------------------------------------------------------- upload
def test_create_repo_and_branch(hub, api):
    url = api.create_repo("fake-org/created")
    assert url.repo_id == "fake-org/created" and str(url).startswith(hub.endpoint)
    assert api.create_repo("fake-org/created", exist_ok=True).repo_id == "fake-org/created"  # 409 + url
    with pytest.raises(HfHubHTTPError) as e:
        api.create_repo("fake-org/created")
    assert e.value.response.status_code == 409
    assert api.create_repo("no-namespace").repo_id == f"{hub.username}/no-namespace"

    api.create_branch("fake-org/created", branch="dev")
    api.create_branch("fake-org/created", branch="dev", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as e:
        api.create_branch("fake-org/created", branch="dev")
    assert e.value.response.status_code == 409
    with pytest.raises(RepositoryNotFoundError):
        api.create_branch("fake-org/absent", branch="dev")
    assert {b.name for b in api.list_repo_refs("fake-org/created").branches} == {"main", "dev"}
    assert hub.repos["fake-org/created"].branches["dev"] == hub.repos["fake-org/created"].branches["main"]
    assert hub.requests("POST") == [("POST", "/api/repos/create")] * 4 + \
        [("POST", "/api/models/fake-org/created/branch/dev")] * 3 + \
        [("POST", "/api/models/fake-org/absent/branch/dev")]


@pytest.mark.parametrize("revision", [None, "dev"])
def test_upload_folder_then_download_byte_for_byte(hub, api, tmp_path, revision):
    repo = f"fake-org/uploaded-{revision or 'main'}"
    files = make_folder(tmp_path)
    api.create_repo(repo, exist_ok=True)
    if revision:
        api.create_branch(repo, branch=revision, exist_ok=True)
    info = api.upload_folder(repo_id=repo, folder_path=tmp_path / "folder", revision=revision,
                             commit_message="Add model")
    assert info.oid == hub.repos[repo].branches[revision or "main"]
    gitattributes = hub.files(repo)[".gitattributes"]  # what create_repo commits, as on the real Hub
    assert hub.files(repo, revision or "main") == {".gitattributes": gitattributes, **files}
    assert hub.requests(path=r"/(preupload|commit)/") == [
        ("POST", f"/api/models/{repo}/preupload/{revision or 'main'}"),
        ("POST", f"/api/models/{repo}/commit/{revision or 'main'}")]
    assert hub.requests(path=r"lfs") == []  # every file answered "regular": no LFS / Xet transfer

    cache = tmp_path / "cache"
    for name, data in files.items():
        assert Path(hf_hub_download(repo, name, revision=revision, cache_dir=cache)).read_bytes() == data
    assert sorted(api.list_repo_files(repo, revision=revision)) == sorted([".gitattributes", *files])
    try:
        from safetensors.numpy import load_file
    except ImportError:
        return
    path = hf_hub_download(repo, "model.safetensors", revision=revision, cache_dir=cache)
    weight = load_file(path)["weight"]
    assert weight.tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_upload_to_pull_request(hub, api, tmp_path):
    api.create_repo("fake-org/pr")
    info = api.upload_file(path_or_fileobj=b"hello", path_in_repo="hello.txt", repo_id="fake-org/pr",
                           create_pr=True)
    assert info.pr_url == f"{hub.endpoint}/fake-org/pr/discussions/1"
    assert hub.files("fake-org/pr", "refs/pr/1")["hello.txt"] == b"hello"
    assert "hello.txt" not in hub.files("fake-org/pr")
    path = hf_hub_download("fake-org/pr", "hello.txt", revision="refs/pr/1", cache_dir=tmp_path)
    assert Path(path).read_bytes() == b"hello"


def test_lfs_upload_through_batch_api(hub, api, tmp_path, monkeypatch):
    """preupload answers "lfs" for *.safetensors: the client must use the git-LFS batch API."""
    if lfs_files_go_to_xet():  # fakehub has no Xet storage: make 2.x use the LFS batch API instead
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # read at call time by 2.x
    hub.lfs_patterns = ["*.safetensors"]
    files = make_folder(tmp_path)
    api.create_repo("fake-org/lfs")
    api.upload_folder(repo_id="fake-org/lfs", folder_path=tmp_path / "folder")
    oid = hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert ("POST", "/fake-org/lfs.git/info/lfs/objects/batch") in hub.requests()
    assert ("PUT", f"/_fake_lfs/fake-org/lfs/{oid}") in hub.requests()
    assert hub.files("fake-org/lfs")["model.safetensors"] == files["model.safetensors"]
    path = hf_hub_download("fake-org/lfs", "model.safetensors", cache_dir=tmp_path / "cache")
    assert Path(path).read_bytes() == files["model.safetensors"]
    assert Path(path).resolve().name == oid  # blob named after X-Linked-Etag (sha256), as for real LFS files


# ---------------------------------------------------------------------------------------------- failures
def test_failed_upload_raises_quickly(hub, api, tmp_path, no_backoff_sleep):
    make_folder(tmp_path)
    api.create_repo("fake-org/fails")
    before = hub.files("fake-org/fails")
    hub.fail(500, method="POST", path="/commit/", times=None)
    t0 = time.monotonic()
    with pytest.raises(HfHubHTTPError) as e:
        api.upload_folder(repo_id="fake-org/fails", folder_path=tmp_path / "folder")
    assert time.monotonic() - t0 < 10
    assert e.value.response.status_code == 500
    assert len(hub.requests("POST", "/commit/")) == commit_attempts_on_5xx()
    assert hub.files("fake-org/fails") == before  # nothing committed


def test_failed_preupload_single_503(hub, api, tmp_path, no_backoff_sleep):
    make_folder(tmp_path)
    api.create_repo("fake-org/flaky")
    hub.fail(503, method="POST", path="/preupload/", times=1)
    if preupload_retried():  # 2.x: http_backoff on /preupload
        api.upload_folder(repo_id="fake-org/flaky", folder_path=tmp_path / "folder")
        assert "model.safetensors" in hub.files("fake-org/flaky")
        assert len(hub.requests("POST", "/preupload/")) == 2
    else:  # 0.23 .. 1.x: a single POST, the first 503 is fatal
        with pytest.raises(HfHubHTTPError) as e:
            api.upload_folder(repo_id="fake-org/flaky", folder_path=tmp_path / "folder")
        assert e.value.response.status_code == 503
        assert len(hub.requests("POST", "/preupload/")) == 1


def test_dropped_connection_on_commit(hub, api, tmp_path, no_backoff_sleep):
    make_folder(tmp_path)
    api.create_repo("fake-org/dropped")
    hub.fail(method="POST", path="/commit/", drop=True, times=None)
    t0 = time.monotonic()
    with pytest.raises(Exception) as e:  # requests ConnectionError (0.2x), httpx RemoteProtocolError (1.x+)
        api.upload_folder(repo_id="fake-org/dropped", folder_path=tmp_path / "folder")
    assert time.monotonic() - t0 < 10
    assert type(e.value).__name__ in ("ConnectionError", "RemoteProtocolError"), repr(e.value)
    assert hub.calls[-1].status is None and "model.safetensors" not in hub.files("fake-org/dropped")


def test_download_when_the_hub_fails(hub, tmp_path, no_backoff_sleep):
    hub.add_repo("fake-org/broken", FILES)
    cache = tmp_path / "cache"
    hub.fail(500, path="/resolve/", times=None)
    with pytest.raises(LocalEntryNotFoundError) as e:  # not cached: "check your connection", from the 500
        hf_hub_download("fake-org/broken", "config.json", cache_dir=cache)
    # the cause is HfHubHTTPError, except in 0.36 (a bare requests.HTTPError once retries are exhausted)
    assert e.value.__cause__.response.status_code == 500
    assert len(hub.requests("HEAD")) == head_attempts_on_5xx(cached=False)

    hub.clear_faults()
    path = hf_hub_download("fake-org/broken", "config.json", cache_dir=cache)
    hub.calls.clear()
    hub.fail(500, path="/resolve/", times=None)  # cached: a 5xx on HEAD falls back to the cache (all)
    assert hf_hub_download("fake-org/broken", "config.json", cache_dir=cache) == path
    head = ("HEAD", "/fake-org/broken/resolve/main/config.json")
    assert hub.requests() == [head] * head_attempts_on_5xx(cached=True)
    hub.clear_faults()
    hub.fail(path="/resolve/", drop=True, times=None)  # cached, connection dropped without an answer:
    if client_is_requests_based():  # 0.2x: requests.ConnectionError -> falls back to the cache
        assert hf_hub_download("fake-org/broken", "config.json", cache_dir=cache) == path
    else:  # 1.x / 2.x: httpx RemoteProtocolError is not treated as "offline" and propagates
        with pytest.raises(Exception) as e:
            hf_hub_download("fake-org/broken", "config.json", cache_dir=cache)
        assert type(e.value).__name__ == "RemoteProtocolError"


# ---------------------------------------------------------------------------------------------- wiring
def test_subprocess_client_uses_hf_endpoint(hub, tmp_path):
    hub.add_repo("fake-org/sub", FILES)
    out = run_client(f"""
        from huggingface_hub import HfApi, hf_hub_download
        path = hf_hub_download("fake-org/sub", "config.json", cache_dir={str(tmp_path)!r})
        print(open(path, "rb").read().decode())
        HfApi().upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="fake-org/sub")
        """, HF_TOKEN=TOKEN)  # token only where needed: uploads
    assert out == FILES["config.json"].decode()
    assert hub.files("fake-org/sub")["x.txt"] == b"x"
    [head] = [c for c in hub.calls if c.method == "HEAD"]
    [commit] = [c for c in hub.calls if c.path.endswith("/commit/main")]
    assert head.path == "/fake-org/sub/resolve/main/config.json"
    # HF_TOKEN in the environment goes on every request, downloads included
    assert head.headers["authorization"] == commit.headers["authorization"] == f"Bearer {TOKEN}"


def test_point_loaded_client_at_repoints_an_imported_client(hub, tmp_path):
    hub.add_repo("fake-org/late", FILES)
    out = run_client(f"""
        import huggingface_hub
        from huggingface_hub import HfApi, hf_hub_download
        import hubclient
        hubclient.point_loaded_client_at({hub.endpoint!r})
        path = hf_hub_download("fake-org/late", "config.json", cache_dir={str(tmp_path)!r})
        print(open(path, "rb").read().decode())
        print(huggingface_hub.model_info("fake-org/late").id)
        HfApi(token="fake").upload_file(path_or_fileobj=b"y", path_in_repo="y.txt", repo_id="fake-org/late")
        """, HF_ENDPOINT="http://127.0.0.1:9")  # imported with a dead endpoint (never the real Hub)
    assert out.splitlines() == [FILES["config.json"].decode(), "fake-org/late"]
    assert hub.files("fake-org/late")["y.txt"] == b"y"

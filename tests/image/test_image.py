"""The image `make image` builds, run with podman as a cluster would run it.

As the chart and the operator's Jobs run it: uid 65532, a read-only root filesystem with only
/tmp writable, the entrypoint ``embedshift``. The service and the Jobs' commands run in it
against the tests' real PostgreSQL (over the host network).

The image is not built here: ``make image-test`` builds it first (cached layers: seconds when
nothing changed), then runs this module. A missing image fails, never skips.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from rag_service.testing.corpus import create_corpus
from rag_service.testing.service_process import free_port, wait_healthy
from tests.image.unix_forward import tcp_database_url

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("EMBEDSHIFT_IMAGE_UNDER_TEST", "localhost/embedshift:latest")
UID = 65532  # RUN_AS_USER of the operator's Jobs; the Dockerfile's USER

# vfs: no overlay module needed. runc: crun refuses hosts with hybrid cgroups (this one).
PODMAN = ["podman", "--storage-driver", "vfs", "--runtime", "runc"]
_NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
# How the chart runs the image: read-only root, an emptyDir on /tmp. The ulimits: podman's
# defaults for root lie above this machine's hard limits, which runc may not raise.
RUN_FLAGS = [
    "--rm",
    "--read-only",
    "--tmpfs", "/tmp:rw,mode=1777",
    "--network", "host",
    "--ulimit", f"nofile={_NOFILE}:{_NOFILE}",
    "--ulimit", "nproc=4096:4096",
]  # fmt: skip
# A 50-document corpus with a v1 column, migrated to a local model: no API key needed.
CORPUS = "documents"
MODEL = "local:hash@768"


def podman(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PODMAN, *argv], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def image() -> str:
    found = podman("image", "exists", IMAGE)
    if found.returncode != 0:
        pytest.fail(f"no image {IMAGE}: run `make image` (or `make image-test`) first")
    return IMAGE


@dataclass(frozen=True)
class Served:
    container: str
    base: str  # the service's URL, on the host network
    flags: list[str]  # what to migrate, as the operator's Jobs pass it


@pytest.fixture(scope="module")
def served(
    image: str, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """``embedshift serve`` in the image, healthy on v1, against a fresh corpus."""
    create_corpus(database_url, table=CORPUS, count=50, source_dimensions=768)
    log = tmp_path_factory.mktemp("image") / "serve.log"
    container = f"embedshift-image-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    with tcp_database_url(database_url) as url:
        flags = [
            "--database-url", url,
            "--table", CORPUS,
            "--category-column", "category",
            "--source-column", "embedding",
            "--source", MODEL,
            "--target", MODEL,
        ]  # fmt: skip
        with log.open("wb") as out:
            process = subprocess.Popen(
                [*PODMAN, "run", "--name", container, *RUN_FLAGS, image,
                 "serve", *flags, "--port", str(port)],
                stdout=out,
                stderr=out,
            )  # fmt: skip
        try:
            base = f"http://127.0.0.1:{port}"
            # Generous: vfs copies the image's layers for each new container.
            wait_healthy(process, base, log, version="v1", timeout=180)
            yield Served(container=container, base=base, flags=flags)
        finally:
            podman("rm", "--force", "--time", "5", container)
            process.wait(timeout=60)


def test_without_arguments_the_image_prints_the_commands(image: str) -> None:
    """ENTRYPOINT embedshift, CMD --help: `docker run IMAGE` shows what it can do."""
    done = podman("run", *RUN_FLAGS, image)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: embedshift")
    for command in ("migrate", "serve", "operator", "rollout"):
        assert f"\n    {command} " in done.stdout, command


def test_the_jobs_commands_run_in_the_image_and_serve_turns_healthy_on_v2(
    served: Served,
) -> None:
    """What the operator's Jobs run (setup, backfill, index) works on a read-only root, and the
    service in the image then reports v2 healthy: the same image serves every role."""
    before = httpx.get(f"{served.base}/api/rag/v2/health", timeout=10)
    assert before.status_code == 503  # no side table yet: the check is real

    for step in ("setup", "run", "index"):
        done = podman("exec", served.container, "embedshift", "migrate", step, *served.flags)
        assert done.returncode == 0, f"migrate {step}: {done.stderr}"

    after = httpx.get(f"{served.base}/api/rag/v2/health", timeout=10)
    assert after.status_code == 200, after.text
    body = after.json()
    assert body["healthy"] is True
    assert body["checks"]["index"]["exists"] is True
    assert body["checks"]["pending"]["queued"] == 0


def test_the_service_runs_as_uid_65532_not_root(served: Served) -> None:
    """Seen from the host, not from inside: the kernel's view of the process's ids."""
    pid = podman("inspect", "--format", "{{.State.Pid}}", served.container).stdout.strip()
    status = Path(f"/proc/{pid}/status").read_text()
    ids = {
        line.split(":")[0]: line.split()[1:]
        for line in status.splitlines()
        if line.startswith(("Uid:", "Gid:"))
    }
    assert ids == {"Uid": [str(UID)] * 4, "Gid": [str(UID)] * 4}


def test_the_root_filesystem_is_read_only_for_the_service(served: Served) -> None:
    """The run above really had no writable root: a write outside /tmp fails, /tmp works."""
    outside = podman("exec", served.container, "python3", "-c", "open('/opt/x', 'w')")
    assert outside.returncode != 0
    assert "Read-only file system" in outside.stderr
    home = podman(
        "exec", served.container, "python3", "-c", "import os; print(os.path.expanduser('~'))"
    )
    assert home.stdout.strip() == "/tmp"


def test_the_image_config_user_entrypoint_and_labels(image: str) -> None:
    config = json.loads(podman("image", "inspect", "--format", "{{json .Config}}", image).stdout)
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["embedshift"]
    labels = config["Labels"]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert labels["org.opencontainers.image.title"] == "embedshift"
    assert labels["org.opencontainers.image.version"] == version
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    for key in ("revision", "created", "base.name"):
        assert labels.get(f"org.opencontainers.image.{key}"), key


def test_no_sources_wheels_pip_or_caches_in_the_image(image: str) -> None:
    """Only the venv reaches the runtime stage: no build context, wheel, pip or its caches."""
    mounted = podman("image", "mount", image)
    assert mounted.returncode == 0, mounted.stderr
    root = Path(mounted.stdout.strip())
    try:
        for absent in ("src", "wheels", "root/.cache", "tmp/.cache", "opt/embedshift/bin/pip"):
            assert not (root / absent).exists(), absent
        # Debian's own venv seeds (usr/share/python-wheels) belong to the base, not to us.
        wheels = [
            p.relative_to(root)
            for p in root.rglob("*.whl")
            if not p.is_relative_to(root / "usr/share/python-wheels")
        ]
        assert wheels == []
        assert list((root / "opt/embedshift").rglob("pip-*.dist-info")) == []
        assert (root / "opt/embedshift/bin/embedshift").exists()
    finally:
        podman("image", "unmount", image)

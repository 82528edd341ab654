"""The operator's allowlists (:mod:`embedshift_operator.core.allowlist`): which images a
migration's Jobs may run, which hosts its URLs may name, and what :func:`decide` does with a
spec outside them. Pure: tables, no fakes."""

from __future__ import annotations

import pytest

from embedshift_operator.core import Observations, RunJob, SetPercentage
from embedshift_operator.core.allowlist import (
    ENDPOINT_NOT_ALLOWED,
    IMAGE_NOT_ALLOWED,
    Allowlist,
    Endpoint,
    endpoint_pattern_problem,
    image_pattern_problem,
    parse_endpoint,
    refusals,
)
from embedshift_operator.resource import ConditionType, EmbeddingMigrationStatus, Phase, spec_hash
from tests.operator.core.builders import (
    at,
    changed,
    check,
    condition,
    events,
    make_spec,
    percentages,
    run_jobs,
    status_at,
    threshold,
    tick,
)

OWN = "ghcr.io/embedshift/embedshift:0.1.0"
DIGEST = "sha256:" + "a" * 64
OTHER_DIGEST = "sha256:" + "b" * 64

# ---- images -------------------------------------------------------------------------------------

IMAGES = [
    # (pattern, image, allowed)
    ("ghcr.io/embedshift/embedshift", "ghcr.io/embedshift/embedshift", True),
    ("ghcr.io/embedshift/embedshift", "ghcr.io/embedshift/embedshift:0.2.0", True),
    ("ghcr.io/embedshift/embedshift", f"ghcr.io/embedshift/embedshift@{DIGEST}", True),
    ("ghcr.io/embedshift/embedshift", f"ghcr.io/embedshift/embedshift:1@{DIGEST}", True),
    ("ghcr.io/embedshift/embedshift", "GHCR.IO/embedshift/embedshift:1", True),  # host: any case
    # The tricky neighbours of a repository: a longer name, a host-looking path, a sub-path.
    ("ghcr.io/embedshift/embedshift", "ghcr.io/embedshift/embedshift-evil", False),
    ("ghcr.io/embedshift/embedshift", "ghcr.io/embedshift/embedshift-evil:1", False),
    ("ghcr.io/embedshift/embedshift", "ghcr.io/embedshift/embedshift.evil.com/x", False),
    ("ghcr.io/embedshift/embedshift", "ghcr.io/embedshift/embedshift/sub:1", False),
    ("ghcr.io/embedshift/embedshift", "ghcr.io/embedshift/embedshiftx:1", False),
    ("ghcr.io/embedshift/embedshift", "ghcr.io.evil.com/embedshift/embedshift:1", False),
    ("ghcr.io/embedshift/embedshift", "evil.com/ghcr.io/embedshift/embedshift:1", False),
    ("ghcr.io/embedshift/embedshift", "ghcr.io:443/embedshift/embedshift:1", False),  # another host
    ("ghcr.io/embedshift/embedshift", "embedshift/embedshift:1", False),  # Docker Hub
    ("ghcr.io/embedshift/embedshift", "ghcr.io/embedshift/Embedshift:1", False),  # not a reference
    # A prefix ending in /: every repository under it, and nothing beside it.
    ("ghcr.io/embedshift/", "ghcr.io/embedshift/embedshift:1", True),
    ("ghcr.io/embedshift/", "ghcr.io/embedshift/tools/migrate:1", True),
    ("ghcr.io/embedshift/", "ghcr.io/embedshift-evil/x:1", False),
    ("ghcr.io/embedshift/", "ghcr.io/embedshift:1", False),
    ("registry.example.com/", "registry.example.com/team/app:1", True),
    ("registry.example.com/", "registry.example.com.evil.io/team/app:1", False),
    ("registry.example.com:5000/", "registry.example.com:5000/app:1", True),
    ("registry.example.com:5000/", "registry.example.com/app:1", False),
    ("acme/", "docker.io/acme/app:1", True),  # a Docker Hub organisation
    ("acme/", "acme-evil/app:1", False),
    # Exactly one image: a tag, a digest.
    ("ghcr.io/embedshift/embedshift:0.1.0", "ghcr.io/embedshift/embedshift:0.1.0", True),
    ("ghcr.io/embedshift/embedshift:0.1.0", "ghcr.io/embedshift/embedshift:0.1.1", False),
    ("ghcr.io/embedshift/embedshift:0.1.0", "ghcr.io/embedshift/embedshift", False),  # :latest
    ("ghcr.io/embedshift/embedshift:latest", "ghcr.io/embedshift/embedshift", True),
    # A tag says nothing about the digest a runtime pulls when both are given.
    ("ghcr.io/embedshift/embedshift:0.1.0", f"ghcr.io/embedshift/embedshift:0.1.0@{DIGEST}", False),
    (f"ghcr.io/embedshift/embedshift@{DIGEST}", f"ghcr.io/embedshift/embedshift@{DIGEST}", True),
    (f"ghcr.io/embedshift/embedshift@{DIGEST}", f"ghcr.io/embedshift/embedshift:x@{DIGEST}", True),
    (
        f"ghcr.io/embedshift/embedshift@{DIGEST}",
        f"ghcr.io/embedshift/embedshift@{OTHER_DIGEST}",
        False,
    ),
    (f"ghcr.io/embedshift/embedshift@{DIGEST}", "ghcr.io/embedshift/embedshift:0.1.0", False),
    # Docker Hub's implicit names, as the runtime reads them.
    ("nginx", "docker.io/library/nginx:1.27", True),
    ("docker.io/library/nginx", "nginx:1.27", True),
    ("index.docker.io/library/nginx", "nginx", True),
    ("nginx", "nginx-evil", False),
    ("localhost:5000/app", "localhost:5000/app:dev", True),
    ("*", "anything.example/at/all:1", True),
]


@pytest.mark.parametrize(("pattern", "image", "allowed"), IMAGES)
def test_an_image_pattern(pattern: str, image: str, allowed: bool) -> None:
    allowlist = Allowlist(images=(pattern,))
    assert allowlist.image_allowed(image, operator_image=None) is allowed


@pytest.mark.parametrize(
    ("images", "image", "allowed"),
    [
        pytest.param((), OWN, True, id="none: the operator's own"),
        pytest.param((), "docker.io/embedshift/embedshift:0.1.0", False, id="none: not another"),
        pytest.param((), "ghcr.io/embedshift/embedshift:0.2.0", False, id="none: not another tag"),
        pytest.param(("example.com/x",), OWN, True, id="its own is always allowed"),
        pytest.param(("*",), "not a reference at all!", True, id="* allows anything"),
        pytest.param(("ghcr.io/",), "ghcr.io/a/../b:1", False, id="not a reference"),
        pytest.param(("ghcr.io/",), " ghcr.io/a:1", False, id="spaces"),
    ],
)
def test_the_operators_own_image_and_the_empty_list(
    images: tuple[str, ...], image: str, allowed: bool
) -> None:
    assert Allowlist(images=images).image_allowed(image, operator_image=OWN) is allowed


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("*", None),
        ("ghcr.io/", None),
        ("ghcr.io/embedshift/", None),
        ("ghcr.io/embedshift/embedshift", None),
        (f"ghcr.io/embedshift/embedshift@{DIGEST}", None),
        ("ghcr.io/*", "the only wildcard is a lone *"),
        ("ghcr.io/embedshift/embedshift:*", "the only wildcard is a lone *"),
        ("ghcr.io/embedshift/embedshift-?", "the only wildcard is a lone *"),
        ("ghcr.io/x:1/", "a prefix ending in / names no tag or digest"),
        ("ghcr.io/Embedshift", "is not a repository path component"),
        ("ghcr.io/a b", "one word without spaces"),
        ("ghcr.io/x@sha256:12", "is not a digest"),
        ("", "one word without spaces"),
    ],
)
def test_an_image_pattern_is_checked(pattern: str, problem: str | None) -> None:
    found = image_pattern_problem(pattern)
    assert (found is None) if problem is None else (found is not None and problem in found)
    if problem is not None:
        with pytest.raises(ValueError, match="allowed image"):
            Allowlist(images=(pattern,))


# ---- endpoints ----------------------------------------------------------------------------------

ENDPOINTS = [
    # (url, host, port) or (url, None, the problem)
    ("http://prometheus.monitoring.svc:9090/prefix", "prometheus.monitoring.svc", 9090),
    ("https://prometheus.monitoring.svc", "prometheus.monitoring.svc", 443),
    ("http://prometheus.monitoring.svc", "prometheus.monitoring.svc", 80),
    ("HTTP://PROMETHEUS.Monitoring.SVC:9090", "prometheus.monitoring.svc", 9090),
    ("http://prometheus.monitoring.svc.:9090", "prometheus.monitoring.svc", 9090),
    # Userinfo is never the host: the client connects to what follows the last @.
    ("http://user:pass@prometheus.monitoring.svc:9090", "prometheus.monitoring.svc", 9090),
    ("http://prometheus.monitoring.svc@evil.example/", "evil.example", 80),
    ("http://prometheus.monitoring.svc:9090@evil.example:8080/", "evil.example", 8080),
    ("http://a@b@evil.example/", "evil.example", 80),
    ("http://evil.example#@prometheus.monitoring.svc/", "evil.example", 80),
    ("http://evil.example?@prometheus.monitoring.svc/", "evil.example", 80),
    # IP addresses by value.
    ("http://10.0.0.1:9090", "10.0.0.1", 9090),
    ("http://[fd00::1]:9090/", "fd00::1", 9090),
    ("http://[FD00:0:0::1]/", "fd00::1", 80),
    ("http://user:p%40ss@[::1]:1/", "::1", 1),
    ("http://2130706433/", "127.0.0.1", 80),
    ("http://127.1/", "127.0.0.1", 80),
    ("http://0x7f.1/", "127.0.0.1", 80),
    # What is refused rather than guessed at.
    ("http://evil.example\\@prometheus.monitoring.svc/", None, "characters a URL's authority"),
    ("http://prometheus monitoring/", None, "characters a URL's authority"),
    ("http://prométheus.example/", None, "characters a URL's authority"),
    ("http://evil%2Eexample/", None, "percent-encoded"),
    ("http://[fd00::1%25eth0]/", None, "percent-encoded"),
    ("http://prometheus:99999/", None, "port"),
    ("http://prometheus:x/", None, "port"),
    ("ftp://prometheus.monitoring.svc/", None, "not an http"),
    ("prometheus.monitoring.svc:9090", None, "not an http"),
    ("http:///path", None, "characters a URL's authority"),
    ("http://user@/", None, "host is missing"),
    ("http://[::1/", None, "not a URL"),
    ("http://-bad-.example/", None, "not a host name"),
]


@pytest.mark.parametrize(("url", "host", "port"), ENDPOINTS)
def test_the_host_a_url_connects_to(url: str, host: str | None, port: int | str) -> None:
    if host is None:
        with pytest.raises(ValueError) as refused:
            parse_endpoint(url)
        assert str(port) in str(refused.value)
        assert url not in str(refused.value)  # never quoted: it may hold a password
    else:
        assert parse_endpoint(url) == Endpoint(host, int(port))


MATCHES = [
    # (pattern, url, allowed)
    ("prometheus.monitoring.svc", "http://prometheus.monitoring.svc:9090", True),
    ("prometheus.monitoring.svc", "https://PROMETHEUS.monitoring.svc./api", True),
    ("Prometheus.Monitoring.Svc.", "http://prometheus.monitoring.svc", True),
    ("prometheus.monitoring.svc", "http://prometheus.monitoring.svc.evil.example", False),
    ("prometheus.monitoring.svc", "http://evilprometheus.monitoring.svc", False),
    ("prometheus.monitoring.svc", "http://x.prometheus.monitoring.svc", False),
    ("prometheus.monitoring.svc", "http://prometheus.monitoring.svc@evil.example/", False),
    ("prometheus.monitoring.svc", "http://u:p@prometheus.monitoring.svc/", True),
    ("prometheus.monitoring.svc", "http://evil.example\\@prometheus.monitoring.svc/", False),
    # Ports: a pattern with one allows only it; a URL without one has its scheme's.
    ("prometheus.monitoring.svc:9090", "http://prometheus.monitoring.svc:9090", True),
    ("prometheus.monitoring.svc:9090", "http://prometheus.monitoring.svc:9091", False),
    ("prometheus.monitoring.svc:9090", "http://prometheus.monitoring.svc", False),
    ("prometheus.monitoring.svc:443", "https://prometheus.monitoring.svc/", True),
    ("prometheus.monitoring.svc:80", "https://prometheus.monitoring.svc/", False),
    # *.domain: names under it, not the domain, never an IP.
    ("*.openai.azure.com", "https://acme.openai.azure.com/openai", True),
    ("*.openai.azure.com", "https://a.b.openai.azure.com", True),
    ("*.openai.azure.com", "https://openai.azure.com", False),
    ("*.openai.azure.com", "https://evilopenai.azure.com", False),
    ("*.openai.azure.com", "https://acme.openai.azure.com.evil.example", False),
    ("*.openai.azure.com:443", "https://acme.openai.azure.com", True),
    ("*.openai.azure.com:443", "http://acme.openai.azure.com", False),
    ("*.example", "http://[::1]/", False),
    # IP addresses by value, IPv6 in brackets.
    ("10.0.0.1", "http://10.0.0.1:9090", True),
    ("10.0.0.1", "http://10.0.0.10:9090", False),
    ("127.0.0.1", "http://2130706433/", True),
    ("[fd00::1]", "http://[fd00:0::1]:9090", True),
    ("[fd00::1]:9090", "http://[fd00::1]:9091", False),
    ("[::1]", "http://[::2]/", False),
    ("*", "http://anything.example:1/", True),
]


@pytest.mark.parametrize(("pattern", "url", "allowed"), MATCHES)
def test_an_endpoint_pattern(pattern: str, url: str, allowed: bool) -> None:
    assert Allowlist(images=(), endpoints=(pattern,)).url_allowed(url) is allowed


def test_no_endpoint_pattern_restricts_nothing() -> None:
    allowlist = Allowlist(images=())
    assert allowlist.url_allowed("http://anything.example:1/")
    assert allowlist.url_allowed("not even a URL")  # nothing to check it against


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("prometheus.monitoring.svc", None),
        ("prometheus.monitoring.svc:9090", None),
        ("*.openai.azure.com", None),
        ("[fd00::1]:9090", None),
        ("10.0.0.1", None),
        ("*", None),
        ("http://prometheus:9090", "not a URL"),
        ("user@prometheus", "not a URL"),
        ("prom*.example", "the only wildcards"),
        ("*.*.example", "the only wildcards"),
        ("fd00::1", "in brackets"),
        ("[not-an-ip]", "in brackets"),
        ("[fd00::1]9090", "in brackets"),
        ("*.10.0.0.1", "not IP addresses"),
        ("*.0.1", "not IP addresses"),  # 127.0.0.1 ends in .0.1: an IP, whatever its spelling
        ("*.1", "not IP addresses"),
        ("prometheus:0", "a port is a number"),
        ("prometheus:65536", "a port is a number"),
        ("prometheus:", "a port is a number"),
        ("bad_host!", "not a host name"),
        ("", "not a host name"),
    ],
)
def test_an_endpoint_pattern_is_checked(pattern: str, problem: str | None) -> None:
    found = endpoint_pattern_problem(pattern)
    assert (found is None) if problem is None else (found is not None and problem in found)


# ---- refusals: which field, which host, never the URL -------------------------------------------

ALLOWLIST = Allowlist(
    images=("ghcr.io/embedshift/embedshift",),
    endpoints=("prometheus.monitoring.svc", "*.openai.azure.com"),
)
PASSWORD = "hunter2-s3cr3t"


@pytest.mark.parametrize(
    ("parts", "reasons", "fields", "shown"),
    [
        pytest.param({}, [], [], "", id="allowed"),
        pytest.param(
            {"migration": {"image": "ghcr.io/embedshift/embedshift-evil:1"}},
            [IMAGE_NOT_ALLOWED],
            ["spec.migration.image"],
            "ghcr.io/embedshift/embedshift-evil:1",
            id="image",
        ),
        pytest.param(
            {"analysis": {"prometheus": {"url": f"http://admin:{PASSWORD}@evil.example:9090/p"}}},
            [ENDPOINT_NOT_ALLOWED],
            ["spec.analysis.prometheus.url"],
            "host evil.example:9090",
            id="prometheus",
        ),
        pytest.param(
            {"target": {"baseURL": f"https://key:{PASSWORD}@api.evil.example/v1"}},
            [ENDPOINT_NOT_ALLOWED],
            ["spec.target.baseURL"],
            "host api.evil.example:443",
            id="target baseURL",
        ),
        pytest.param(
            {"source": {"baseURL": f"http://{PASSWORD}\\@acme.openai.azure.com/"}},
            [ENDPOINT_NOT_ALLOWED],
            ["spec.source.baseURL"],
            "its host cannot be checked",
            id="unreadable baseURL",
        ),
        pytest.param(
            {
                "migration": {"image": "docker.io/evil/x"},
                "analysis": {"prometheus": {"url": "http://evil.example"}},
            },
            [IMAGE_NOT_ALLOWED, ENDPOINT_NOT_ALLOWED],
            ["spec.migration.image", "spec.analysis.prometheus.url"],
            "docker.io/evil/x",
            id="both, image first",
        ),
    ],
)
def test_refusals_name_the_field_and_the_host_never_the_url(
    parts: dict[str, object], reasons: list[str], fields: list[str], shown: str
) -> None:
    spec = make_spec(
        target={"baseURL": "https://acme.openai.azure.com/openai"},
        analysis={"prometheus": {"url": "http://prometheus.monitoring.svc:9090"}},
    )
    spec = changed(spec, **parts)  # type: ignore[arg-type]
    found = refusals(spec, ALLOWLIST, operator_image=OWN)
    assert [r.reason for r in found] == reasons
    assert [r.field for r in found] == fields
    for refusal in found:
        assert refusal.message.startswith(f"{refusal.field}: ")
        assert PASSWORD not in refusal.message
    if found:
        assert shown in found[0].message
        fix = "operator.allowedImages" if reasons[0] == IMAGE_NOT_ALLOWED else "allowedEndpoints"
        assert fix in found[0].message


def test_the_image_refusal_says_what_is_allowed_and_the_fix() -> None:
    spec = make_spec(migration={"image": "ghcr.io/embedshift/embedshift.evil.com/x:1"})
    (refusal,) = refusals(spec, Allowlist(images=ALLOWLIST.images), operator_image=OWN)
    assert refusal.message == (
        "spec.migration.image: 'ghcr.io/embedshift/embedshift.evil.com/x:1' is not an image "
        "this operator may run (allowed: ghcr.io/embedshift/embedshift, "
        "ghcr.io/embedshift/embedshift:0.1.0 (the operator's own)); nothing was run. Use an "
        "allowed image, or leave the field out for the operator's own, or ask the operator's "
        "admin to add it to operator.allowedImages (--allowed-image)"
    )


# ---- decide(): a refused spec is held, safety still acts -----------------------------------------

REFUSED = Observations(refusals=refusals(
    make_spec(migration={"image": "evil.example/x:1"}), ALLOWLIST, operator_image=OWN
))  # fmt: skip


def test_a_new_refused_migration_runs_nothing_and_says_why_once() -> None:
    spec = make_spec(migration={"image": "evil.example/x:1"})
    first = tick(spec, EmbeddingMigrationStatus(), REFUSED)
    assert first.status.phase is Phase.PENDING and first.status.spec_hash is None
    assert not run_jobs(first) and not percentages(first)
    ready = condition(first.status, ConditionType.READY)
    assert (ready.status, ready.reason) == ("False", IMAGE_NOT_ALLOWED)
    assert ready.message.startswith("spec.migration.image: 'evil.example/x:1'")
    stalled = condition(first.status, ConditionType.STALLED)
    assert (stalled.status, stalled.reason) == ("True", IMAGE_NOT_ALLOWED)
    assert [(e.type, e.reason) for e in events(first)] == [("Warning", IMAGE_NOT_ALLOWED)]
    assert first.status.message == ready.message
    # The next tick says nothing new: the condition keeps saying it.
    second = tick(spec, first.status, REFUSED, at(seconds=30))
    assert not events(second) and not run_jobs(second)
    # Allowed (the image fixed, or the allowlist widened): it starts at once.
    started = tick(spec, second.status, Observations(), at(seconds=60))
    assert started.status.phase is Phase.PREPARING
    assert condition(started.status, ConditionType.READY).reason == Phase.PREPARING.value


@pytest.mark.parametrize(
    "phase", [Phase.PREPARING, Phase.MIGRATING, Phase.INDEXING, Phase.VERIFYING, Phase.SUCCEEDED]
)
def test_a_refused_spec_starts_no_job_and_no_follower(phase: Phase) -> None:
    spec = make_spec(cleanup={"dropSource": True, "retainSourceFor": "1h"})
    decision = tick(spec, status_at(spec, phase), REFUSED, at(hours=200))
    assert decision.actions == tuple(a for a in decision.actions if not isinstance(a, RunJob))
    assert not [a for a in decision.actions if type(a).__name__ in ("EnsureFollower", "DropSource")]
    assert decision.status.phase is phase


def test_a_refused_spec_change_waits_and_a_retry_does_not_start() -> None:
    spec = make_spec()
    failed = status_at(spec, Phase.FAILED)
    edited = changed(spec, target={"model": "text-embedding-3-large"})
    held = tick(edited, failed, REFUSED)
    assert held.status.phase is Phase.FAILED
    assert held.status.spec_hash == spec_hash(spec)  # taken in once allowed
    assert condition(held.status, ConditionType.STALLED).reason == IMAGE_NOT_ALLOWED
    retried = tick(edited, held.status, Observations(), at(minutes=1))
    assert retried.status.phase is Phase.PREPARING


def test_a_refused_step_neither_promotes_nor_raises_but_still_rolls_back() -> None:
    spec = make_spec(analysis={"rollbackThresholds": [threshold()]})
    progressing = status_at(spec, Phase.PROGRESSING, step=1, passes=5)
    # Every check passes and the step's time is up: held, not promoted.
    passing = Observations(analysis=check(spec), refusals=REFUSED.refusals)
    held = tick(spec, progressing, passing, at(hours=5))
    assert held.status.phase is Phase.PROGRESSING and held.status.step_index == 1
    assert not percentages(held)
    # maxPercentage raised above a capped step: not raised while refused; lowered: at once.
    capped = status_at(spec, Phase.PROGRESSING, step=1, percentage=10)
    assert not percentages(tick(spec, capped, REFUSED, at(hours=5)))
    lowered = changed(spec, rollout={"maxPercentage": 5})
    assert percentages(tick(lowered, progressing, REFUSED)) == [5]
    # A breached rollback threshold, and maxPercentage 0, still roll back.
    breached = Observations(analysis=check(spec, fail=["errors"]), refusals=REFUSED.refusals)
    rolled = tick(spec, progressing, breached, at(hours=5))
    assert rolled.status.phase is Phase.ROLLED_BACK and percentages(rolled) == [0]
    # The rollback's own message stays status.message; Ready says why the spec is held.
    assert rolled.status.message.startswith("rollback threshold breached")
    assert condition(rolled.status, ConditionType.READY).reason == IMAGE_NOT_ALLOWED
    manual = tick(changed(spec, rollout={"maxPercentage": 0}), progressing, REFUSED)
    assert manual.status.phase is Phase.ROLLED_BACK
    assert [a.percentage for a in manual.of_type(SetPercentage)] == [0]
    # ... and a manual rollback is not retried while refused.
    raised = changed(spec, rollout={"maxPercentage": 100})
    assert tick(raised, manual.status, REFUSED, at(minutes=1)).status.phase is Phase.ROLLED_BACK

"""The allowlists where something would leave the operator: the Prometheus bearer token (the
analysis checker over :class:`PrometheusSource`, against a recording HTTP server on loopback)
and a Job or follower (:class:`KubeJobs`, refusing before it asks the API server)."""

from __future__ import annotations

import secrets

import pytest
from kubernetes import client

from embedshift_operator.adapters.kube import ClusterError, KubeJobs
from embedshift_operator.core.allowlist import Allowlist
from embedshift_operator.ticking import AnalysisChecker
from rag_service.errors import ConfigError
from tests.operator.adapters.http_stub import StubPrometheus
from tests.operator.core.builders import MIGRATION, make_spec
from tests.operator.kube.test_kube import (
    OPERATOR_IMAGE,
    follow_action,
    migrate_action,
    migration,
)


@pytest.mark.parametrize(
    ("endpoints", "sent"),
    [
        pytest.param(("prometheus.monitoring.svc",), False, id="outside"),
        pytest.param(("127.0.0.1",), True, id="inside"),
        pytest.param((), True, id="no list"),
    ],
)
async def test_the_token_is_sent_only_to_an_allowed_host(
    endpoints: tuple[str, ...], sent: bool
) -> None:
    token = secrets.token_hex(12)
    async with StubPrometheus() as stub:
        spec = make_spec(analysis={"prometheus": {"url": stub.url}})
        checker = AnalysisChecker(
            migration=MIGRATION, allowlist=Allowlist(images=(), endpoints=endpoints)
        )
        try:
            observation = await checker.check(spec, token=token, progress=None)
        finally:
            await checker.aclose()
    if sent:
        assert stub.requests
        assert {r.headers["authorization"] for r in stub.requests} == {f"Bearer {token}"}
        return
    assert stub.requests == []  # not one request: no token, no query
    errors = [observation.requests.error, *(m.error for m in observation.measurements.values())]
    host = stub.url.removeprefix("http://")
    for error in errors:
        assert error is not None
        assert f"spec.analysis.prometheus.url: host {host} is not in" in error
        assert token not in error


async def test_no_job_or_follower_is_asked_for_with_a_refused_image() -> None:
    # An API server nobody listens on: a request would end in a ClusterError.
    configuration = client.Configuration(host="http://127.0.0.1:9")
    allowlist = Allowlist(images=("ghcr.io/embedshift/embedshift",))
    with client.ApiClient(configuration) as api:
        jobs = KubeJobs(api, operator_image=OPERATOR_IMAGE, allowlist=allowlist)
        refused = migration(image="ghcr.io/embedshift/embedshift-evil:1")
        for call in (
            jobs.run_job(refused, migrate_action(refused)),
            jobs.ensure_follower(refused, follow_action(refused)),
        ):
            with pytest.raises(ConfigError, match=r"^spec\.migration\.image: 'ghcr\.io/"):
                await call
        # An allowed image is asked for (and the absent API server answers nothing).
        allowed = migration(image="ghcr.io/embedshift/embedshift:0.2.0")
        with pytest.raises(ClusterError, match="cannot reach the API server"):
            await jobs.run_job(allowed, migrate_action(allowed))

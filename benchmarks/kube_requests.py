"""What a client asks of a real kube-apiserver, counted on the server's side.

The API server's own ``/metrics`` (read with the kubeconfig's credentials) count every request
it served in ``apiserver_request_total`` by verb, group, resource, subresource and scope; there
is no user-agent label, only ``system_client``, set for the control plane's own components
(kube-controller-manager, kube-apiserver, kubelet, ...) and empty for everyone else. Two
readings around a window give what was asked in it; a second window without the client of
interest gives the rest (a test kubelet, ...), to subtract.

Lists served from the watch cache are also counted by the objects they looked at and returned
(``apiserver_cache_list_fetched_objects_total`` / ``..._returned_objects_total``): a list whose
fetched count grows with the namespace while its returned count does not is a label-selected
list the server filters by walking the namespace.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from tests.kubelet import Api

__all__ = ["ApiServerMetrics", "Reading", "Window"]

# (verb, "resource[/subresource].group", scope)
RequestKey = tuple[str, str, str]


@dataclass
class Reading:
    """One reading of the counters of interest."""

    requests: dict[RequestKey, float] = field(default_factory=dict)
    cache_lists: dict[str, float] = field(default_factory=dict)  # by "resource.group"
    cache_fetched: dict[str, float] = field(default_factory=dict)
    cache_returned: dict[str, float] = field(default_factory=dict)


def _resource(labels: Mapping[str, str]) -> str:
    name = labels.get("resource", "")
    if labels.get("subresource"):
        name += f"/{labels['subresource']}"
    if labels.get("group"):
        name += f".{labels['group']}"
    return name


def _diff(after: Mapping[str, float], before: Mapping[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


@dataclass
class Window:
    """The difference of two readings over ``seconds``."""

    seconds: float
    requests: dict[RequestKey, float]
    cache_lists: dict[str, float]
    cache_fetched: dict[str, float]
    cache_returned: dict[str, float]

    @classmethod
    def between(cls, before: Reading, after: Reading, seconds: float) -> Window:
        requests = {
            k: v - before.requests.get(k, 0.0)
            for k, v in after.requests.items()
            if v - before.requests.get(k, 0.0)
        }
        return cls(
            seconds=seconds,
            requests=requests,
            cache_lists=_diff(after.cache_lists, before.cache_lists),
            cache_fetched=_diff(after.cache_fetched, before.cache_fetched),
            cache_returned=_diff(after.cache_returned, before.cache_returned),
        )

    def per_minute(self) -> dict[RequestKey, float]:
        return {k: v * 60.0 / self.seconds for k, v in self.requests.items()}

    def minus(self, baseline: Window, *, slack: float = 1.5) -> dict[RequestKey, float]:
        """Requests per minute in this window beyond the baseline's (rates, so windows of
        different lengths compare); what is left is the client's that the baseline lacked.

        A difference within ``slack`` requests of this window is taken as none: a heartbeat
        every 5 s falls 2 or 3 times in a 12 s window, whoever else is there.
        """
        keys = set(self.requests) | set(baseline.requests)
        left = {}
        for k in keys:
            expected = baseline.requests.get(k, 0.0) * self.seconds / baseline.seconds
            extra = self.requests.get(k, 0.0) - expected
            left[k] = 0.0 if abs(extra) <= slack else extra * 60.0 / self.seconds
        return left


class ApiServerMetrics:
    """The API server's ``/metrics``, read as the kubeconfig's user (it needs the
    ``get`` verb on the non-resource URL ``/metrics``: system:masters has it)."""

    def __init__(self, kubeconfig_path: str) -> None:
        self._api = Api(kubeconfig_path)  # the kubeconfig's credentials, as the runner uses them

    def close(self) -> None:
        self._api.close()

    def read(self) -> Reading:
        answer = self._api.http.get("/metrics")
        answer.raise_for_status()
        reading = Reading()
        for family in text_string_to_metric_families(answer.text):
            for sample in family.samples:
                labels = sample.labels
                if sample.name == "apiserver_request_total":
                    # The control plane's own components (the controller manager's informers
                    # and controllers, the API server's loopback client) are not the subject.
                    if labels.get("system_client") or not labels.get("resource"):
                        continue
                    key = (labels["verb"], _resource(labels), labels.get("scope", ""))
                    reading.requests[key] = reading.requests.get(key, 0.0) + sample.value
                elif sample.name in (
                    "apiserver_cache_list_total",
                    "apiserver_cache_list_fetched_objects_total",
                    "apiserver_cache_list_returned_objects_total",
                ):
                    into = {
                        "apiserver_cache_list_total": reading.cache_lists,
                        "apiserver_cache_list_fetched_objects_total": reading.cache_fetched,
                        "apiserver_cache_list_returned_objects_total": reading.cache_returned,
                    }[sample.name]
                    resource = _resource(labels)
                    into[resource] = into.get(resource, 0.0) + sample.value
        return reading

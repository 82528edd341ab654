"""The control plane's adapters: Jobs (kube, subprocess), Prometheus, Postgres, alerts."""

"""embedshift's data plane: embedding providers, all SQL, the migration worker and search.

This package stands alone: it never imports the operator, kopf or the Kubernetes client.
"""

__version__ = "0.1.0"

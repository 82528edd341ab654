"""embedshift's control plane: the kopf operator that drives an EmbeddingMigration.

Empty until the operator issue lands; importable so the layout and the import contract hold.
"""

"""The EmbeddingMigration resource (spec and status) as typed models; pure. A placeholder."""

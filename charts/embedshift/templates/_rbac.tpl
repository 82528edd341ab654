{{/* The operator's RBAC rules, shared by rbac.yaml's namespaced and cluster-wide modes. */}}
{{- define "embedshift.rules.cluster" -}}
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- end -}}
{{- define "embedshift.rules.namespaced" -}}
# The EmbeddingMigrations: kopf watches and annotates them; the operator writes status.
- apiGroups: [embedshift.io]
  resources: [embeddingmigrations]
  verbs: [get, list, watch, patch]
- apiGroups: [embedshift.io]
  resources: [embeddingmigrations/status]
  verbs: [patch]
# The migrate Jobs (the operator waits for them through a watch).
- apiGroups: [batch]
  resources: [jobs]
  verbs: [create, list, watch]
# The Pod a Job's podFailurePolicy failed: its termination message (the CLI's error line)
# becomes the resource's status message.
- apiGroups: [""]
  resources: [pods]
  verbs: [get]
# The follower Deployment (created during a migration, deleted after it).
- apiGroups: [apps]
  resources: [deployments]
  verbs: [create, list, delete]
# The database URL and API keys the resource's secretRefs name.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
# The Jobs' spec snapshot.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [create]
# kopf's and the operator's Events on the resource.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end -}}

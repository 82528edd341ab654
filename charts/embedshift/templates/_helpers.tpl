{{/* Names, labels and the pieces both Deployments share. */}}

{{- define "embedshift.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "embedshift.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "embedshift.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "embedshift.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component (operator, search). Call with (dict "root" $ "component" "x"). */}}
{{- define "embedshift.selectorLabels" -}}
app.kubernetes.io/name: {{ include "embedshift.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "embedshift.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "embedshift.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-operator" (include "embedshift.fullname" .)) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The namespaces the operator serves when not cluster-wide (default: the release's). */}}
{{- define "embedshift.watchNamespaces" -}}
{{- if .Values.operator.watchNamespaces -}}
{{- toJson (uniq .Values.operator.watchNamespaces) -}}
{{- else -}}
{{- toJson (list .Release.Namespace) -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding Alertmanager's bearer token, or "" when there is none. */}}
{{- define "embedshift.alertSecretName" -}}
{{- if .Values.alertWebhook.create -}}
{{- printf "%s-alert-webhook" (include "embedshift.fullname" .) -}}
{{- else -}}
{{- .Values.alertWebhook.existingSecret -}}
{{- end -}}
{{- end -}}

{{/* The environment variable with that token, when there is a Secret. */}}
{{- define "embedshift.alertSecretEnv" -}}
{{- $secret := include "embedshift.alertSecretName" . -}}
{{- if $secret -}}
- name: ALERT_WEBHOOK_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ .Values.alertWebhook.key }}
{{- end }}
{{- end -}}

{{/* Pod- and container-level hardening both Deployments share (restricted Pod Security). */}}
{{- define "embedshift.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "embedshift.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/*
  The operator's replicas as a JSON list of {suffix, priority}. Two replicas of one Deployment
  would share one --priority, and kopf pauses every peer of equal priority; so each replica is a
  Deployment of its own with its own priority: "operator" works, "operator-standby" (lower)
  waits and takes over when the first one's peering record goes stale.
*/}}
{{- define "embedshift.operatorReplicas" -}}
{{- $op := .Values.operator -}}
{{- $replicas := list (dict "suffix" "operator" "priority" $op.priority) -}}
{{- if $op.standby.enabled -}}
{{- $replicas = append $replicas (dict "suffix" "operator-standby" "priority" $op.standby.priority) -}}
{{- end -}}
{{- toJson $replicas -}}
{{- end -}}

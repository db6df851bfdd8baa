{{/* Chart name, truncated to 63 characters (a DNS label). */}}
{{- define "kubeml-platform.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, or the release name when it already contains the chart name. */}}
{{- define "kubeml-platform.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kubeml-platform.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "kubeml-platform.labels" -}}
helm.sh/chart: {{ include "kubeml-platform.chart" . }}
{{ include "kubeml-platform.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubeml
{{- end }}

{{/* Labels the operator Deployment selects its pods by (immutable once installed). */}}
{{- define "kubeml-platform.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubeml-platform.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kubeml-platform.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubeml-platform.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kubeml-platform.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The binding that puts a ValidatingAdmissionPolicy in force: deny, nothing narrower. */}}
{{- define "kubeml-platform.policyBinding" }}
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata:
  name: {{ .name }}
  labels:
    {{- .labels | nindent 4 }}
spec:
  policyName: {{ .name }}
  validationActions: [Deny]
{{- end }}

{{- define "kubeml-platform.mlflowServiceAccountName" -}}
{{- if .Values.mlflow.serviceAccount.create }}
{{- default (printf "%s-mlflow" (include "kubeml-platform.fullname" .)) .Values.mlflow.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.mlflow.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Host headers the tracking server answers: its Service's names (bare and with any
port) and mlflow.allowedHosts (an Ingress host, say). MLflow refuses every other Host. */}}
{{- define "kubeml-platform.mlflowAllowedHosts" -}}
{{- $svc := printf "%s-mlflow" (include "kubeml-platform.fullname" .) }}
{{- $hosts := list }}
{{- range $suffix := list "" (printf ".%s" $.Release.Namespace) (printf ".%s.svc" $.Release.Namespace) (printf ".%s.svc.%s" $.Release.Namespace $.Values.mlflow.clusterDomain) }}
{{- $hosts = append $hosts (printf "%s%s" $svc $suffix) }}
{{- $hosts = append $hosts (printf "%s%s:*" $svc $suffix) }}
{{- end }}
{{- join "," (concat $hosts .Values.mlflow.allowedHosts) }}
{{- end }}

{{/* The MLflow flow tenant NetworkPolicies open: the chart's own server when it runs one,
else operator.peers.mlflow (a server run elsewhere). */}}
{{- define "kubeml-platform.mlflowPeer" -}}
{{- if .Values.mlflow.enabled }}
{{- printf "%s:%v" .Release.Namespace .Values.mlflow.port }}
{{- else if .Values.operator.peers.mlflow.namespace }}
{{- printf "%s:%s" .Values.operator.peers.mlflow.namespace (join "," .Values.operator.peers.mlflow.ports) }}
{{- else }}
{{- print "none" }}
{{- end }}
{{- end }}

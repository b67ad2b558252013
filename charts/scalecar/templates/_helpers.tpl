{{/* Object names: the release's, or fullnameOverride. */}}
{{- define "scalecar.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- end }}

{{/* Cluster-scoped names carry the namespace: two releases of one name in
two namespaces never share a ClusterRole. */}}
{{- define "scalecar.clusterName" -}}
{{- printf "%s-%s" (include "scalecar.fullname" .) .Release.Namespace | trunc 63 | trimSuffix "-" -}}
{{- end }}

{{- define "scalecar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "scalecar.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end }}

{{/* A digest pins the image and wins over the tag. */}}
{{- define "scalecar.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end }}

{{- define "scalecar.labels" -}}
app.kubernetes.io/name: scalecar
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "scalecar.selector" -}}
app.kubernetes.io/name: scalecar
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The rules scalecar needs on the model servers' side. */}}
{{- define "scalecar.workloadRules" -}}
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["apps"]
  resources: ["deployments/scale", "statefulsets/scale"]
  verbs: ["get", "patch"]
{{- range .Values.kubernetes.kinds }}
- apiGroups: [{{ .group | default "" | quote }}]
  resources: [{{ .plural | quote }}]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: [{{ .group | default "" | quote }}]
  resources: [{{ printf "%s/scale" .plural | quote }}]
  verbs: ["get", "patch"]
{{- end }}
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# Other autoscalers on the same workloads (scalecar stands aside).
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["list", "watch"]
- apiGroups: ["keda.sh"]
  resources: ["scaledobjects"]
  verbs: ["list", "watch"]
{{- if .Values.endpointPicker.enabled }}
# The InferencePools that name this picker.
- apiGroups: ["inference.networking.k8s.io"]
  resources: ["inferencepools"]
  verbs: ["list", "watch"]
{{- end }}
{{- end }}

{{/* The pod's grace: the gateway's own shutdown (delay, then drain) plus
10 s for the process to exit, unless set. */}}
{{- define "scalecar.terminationGrace" -}}
{{- $own := add .Values.limits.shutdownDelaySeconds .Values.limits.shutdownGraceSeconds -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds -}}
{{ add $own 10 }}
{{- else -}}
{{ .Values.terminationGracePeriodSeconds | int64 }}
{{- end -}}
{{- end }}

{{/* A duration the schema admits (one unit: 500ms, 30s, 2m, 1h) in
milliseconds. */}}
{{- define "scalecar.ms" -}}
{{- $d := toString . -}}
{{- if hasSuffix "ms" $d -}}
{{ trimSuffix "ms" $d | int64 }}
{{- else if hasSuffix "s" $d -}}
{{ mul (trimSuffix "s" $d | int64) 1000 }}
{{- else if hasSuffix "m" $d -}}
{{ mul (trimSuffix "m" $d | int64) 60000 }}
{{- else if hasSuffix "h" $d -}}
{{ mul (trimSuffix "h" $d | int64) 3600000 }}
{{- else -}}
{{ fail (printf "%q is not a duration (like 500ms, 30s, 2m)" $d) }}
{{- end -}}
{{- end }}

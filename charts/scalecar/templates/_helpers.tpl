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
  verbs: ["get", "update", "patch"]
{{- range .Values.kubernetes.kinds }}
- apiGroups: [{{ .group | default "" | quote }}]
  resources: [{{ .plural | quote }}]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: [{{ .group | default "" | quote }}]
  resources: [{{ printf "%s/scale" .plural | quote }}]
  verbs: ["get", "update", "patch"]
{{- end }}
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# Other autoscalers on the same workloads (scalecar stands aside).
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["keda.sh"]
  resources: ["scaledobjects"]
  verbs: ["get", "list", "watch"]
{{- end }}

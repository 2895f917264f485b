{{- define "lightspan.labels" -}}
app.kubernetes.io/name: lightspan
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "lightspan.clickhouseEnv" -}}
- name: LIGHTSPAN_STORE
{{- if .Values.clickhouse.urlSecret }}
  valueFrom: {secretKeyRef: {name: {{ .Values.clickhouse.urlSecret }}, key: url}}
{{- else }}
  value: {{ .Values.clickhouse.url | quote }}
{{- end }}
{{- end -}}

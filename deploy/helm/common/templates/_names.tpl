{{/*
Names and labels. A chart's component is its own name (an alias in the umbrella: `prefill`,
`decode`), so two aliases of one chart never collide.
*/}}
{{- define "im.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "im.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "im.labels" -}}
{{ include "im.selectorLabels" . }}
app.kubernetes.io/part-of: infermesh
app.kubernetes.io/component: {{ .Chart.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The control-plane image: the chart's own `image`, else `global.image`. */}}
{{- define "im.image" -}}
{{- $g := (.Values.global).image | default dict -}}
{{- $l := .Values.image | default dict -}}
{{- $repo := $l.repository | default $g.repository | default "ghcr.io/infermesh/infermesh" -}}
{{- $tag := $l.tag | default $g.tag | default .Chart.AppVersion -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}

{{- define "im.pullPolicy" -}}
{{- $g := (.Values.global).image | default dict -}}
{{- $l := .Values.image | default dict -}}
{{- $l.pullPolicy | default $g.pullPolicy | default "IfNotPresent" -}}
{{- end -}}

{{/* Where the Service of another chart of this release lives (the umbrella's naming). */}}
{{- define "im.peer" -}}
{{- printf "%s-%s" .ctx.Release.Name .name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

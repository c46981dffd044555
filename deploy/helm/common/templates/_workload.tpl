{{/*
One control-plane service: its config (values.config plus what the chart owns, rendered into
the service's own YAML config file), a Deployment running `infermesh <service> --config ...`,
a Service, a PodDisruptionBudget and a ServiceMonitor. Call with
  (dict "ctx" . "service" "scheduler" "identity" "scheduler" "port" 9100
        "fixed" (dict ...) "files" (dict ...) "ports" (list (dict "name" "grpc" "port" 9090)))
*/}}
{{- define "im.config" -}}
{{- $cfg := merge (deepCopy (.fixed | default dict)) (deepCopy (.ctx.Values.config | default dict)) -}}
{{ toYaml $cfg }}
{{- end -}}

{{- define "im.configMap" -}}
{{- $ctx := .ctx }}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "im.fullname" $ctx }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "im.labels" $ctx | nindent 4 }}
    infermesh.io/service: {{ .service }}
data:
  {{ .service }}.yaml: |
    {{- include "im.config" . | nindent 4 }}
{{- range $name, $text := .files }}
  {{ $name }}: |
    {{- $text | nindent 4 }}
{{- end }}
{{- end -}}

{{- define "im.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "im.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* Spread replicas over nodes: antiAffinity soft (preferred), hard (required) or none. */}}
{{- define "im.affinity" -}}
{{- $v := .Values -}}
{{- if $v.affinity }}
affinity:
  {{- toYaml $v.affinity | nindent 2 }}
{{- else if eq ($v.antiAffinity | default "soft") "hard" }}
affinity:
  podAntiAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      - topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "im.selectorLabels" . | nindent 12 }}
{{- else if eq ($v.antiAffinity | default "soft") "soft" }}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "im.selectorLabels" . | nindent 14 }}
{{- end }}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (($v.global).imagePullSecrets) }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Probes on the service's own HTTP server: ready = /health (200 once it can serve: bus
connected, warmed up); alive = /metrics, which answers while the event loop runs, so a bus outage
(the service reconnects by itself) takes the pod out of its Service but never restarts it. */}}
{{- define "im.probes" -}}
readinessProbe:
  httpGet:
    path: /health
    port: {{ .port }}
    {{- if .https }}
    scheme: HTTPS
    {{- end }}
  periodSeconds: 5
  failureThreshold: 2
livenessProbe:
  httpGet:
    path: /metrics
    port: {{ .port }}
    {{- if .https }}
    scheme: HTTPS
    {{- end }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 6
{{- end -}}

{{- define "im.deployment" -}}
{{- $ctx := .ctx -}}
{{- $v := $ctx.Values }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "im.fullname" $ctx }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "im.labels" $ctx | nindent 4 }}
spec:
  replicas: {{ $v.replicaCount }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "im.selectorLabels" $ctx | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "im.labels" $ctx | nindent 8 }}
      annotations:
        checksum/config: {{ include "im.configMap" . | sha256sum }}
        {{- with $v.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      securityContext:
        {{- include "im.podSecurityContext" $ctx | nindent 8 }}
      terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds | default 30 }}
      {{- include "im.affinity" $ctx | nindent 6 }}
      containers:
        - name: {{ .service }}
          image: {{ include "im.image" $ctx | quote }}
          imagePullPolicy: {{ include "im.pullPolicy" $ctx }}
          args: [{{ .service | quote }}, "--config", {{ printf "/etc/infermesh/%s.yaml" .service | quote }}]
          ports:
            - name: http
              containerPort: {{ .port }}
            {{- range .ports }}
            - name: {{ .name }}
              containerPort: {{ .port }}
            {{- end }}
          env:
            - name: HOME
              value: /tmp
            {{- include "im.busEnv" . | nindent 12 }}
            {{- with .env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
            {{- with $v.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- include "im.probes" . | nindent 10 }}
          resources:
            {{- toYaml $v.resources | nindent 12 }}
          securityContext:
            {{- include "im.containerSecurityContext" $ctx | nindent 12 }}
          volumeMounts:
            - name: config
              mountPath: /etc/infermesh
              readOnly: true
            - name: tmp
              mountPath: /tmp
            {{- include "im.busVolumeMounts" $ctx | nindent 12 }}
            {{- with .mounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
            {{- with $v.extraVolumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        - name: config
          configMap:
            name: {{ include "im.fullname" $ctx }}
        - name: tmp
          emptyDir: {}
        {{- include "im.busVolumes" $ctx | nindent 8 }}
        {{- with .volumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- with $v.extraVolumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
{{- end -}}

{{- define "im.service" -}}
{{- $ctx := .ctx -}}
{{- $svc := $ctx.Values.service | default dict }}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "im.fullname" $ctx }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "im.labels" $ctx | nindent 4 }}
  {{- with $svc.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ $svc.type | default "ClusterIP" }}
  {{- if .headless }}
  clusterIP: None
  {{- end }}
  selector:
    {{- include "im.selectorLabels" $ctx | nindent 4 }}
  ports:
    - name: http
      port: {{ $svc.port | default .port }}
      targetPort: http
    {{- range .ports }}
    - name: {{ .name }}
      port: {{ .port }}
      targetPort: {{ .name }}
    {{- end }}
{{- end -}}

{{/* Only for more than one replica: one pod may go at a time (values podDisruptionBudget). */}}
{{- define "im.pdb" -}}
{{- $v := .Values -}}
{{- $pdb := $v.podDisruptionBudget | default dict -}}
{{- if and (gt (int $v.replicaCount) 1) (ne $pdb.enabled false) }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "im.fullname" . }}
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "im.labels" . | nindent 4 }}
spec:
  {{- if $pdb.minAvailable }}
  minAvailable: {{ $pdb.minAvailable }}
  {{- else }}
  maxUnavailable: {{ $pdb.maxUnavailable | default 1 }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "im.selectorLabels" . | nindent 6 }}
{{- end }}
{{- end -}}

{{/* A Prometheus Operator ServiceMonitor on the Service's metrics ports, when asked for. */}}
{{- define "im.serviceMonitor" -}}
{{- $ctx := .ctx -}}
{{- $sm := $ctx.Values.serviceMonitor | default dict -}}
{{- $g := (($ctx.Values.global).serviceMonitor) | default dict -}}
{{- if or $sm.enabled $g.enabled }}
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ include "im.fullname" $ctx }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "im.labels" $ctx | nindent 4 }}
    {{- with ($sm.labels | default $g.labels) }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  selector:
    matchLabels:
      {{- include "im.selectorLabels" $ctx | nindent 6 }}
  endpoints:
    {{- range (.endpoints | default (list "http")) }}
    - port: {{ . }}
      path: /metrics
      interval: {{ $sm.interval | default $g.interval | default "15s" }}
      {{- if and (eq . "http") $.https }}
      scheme: https
      tlsConfig:
        insecureSkipVerify: true
      {{- end }}
    {{- end }}
{{- end }}
{{- end -}}

{{/* Everything of one control-plane service, separated as one YAML stream. */}}
{{- define "im.controlPlane" -}}
{{ include "im.configMap" . }}
---
{{ include "im.deployment" . }}
---
{{ include "im.service" . }}
{{- with (include "im.pdb" .ctx) }}
---
{{ . }}
{{- end }}
{{- with (include "im.serviceMonitor" .) }}
---
{{ . }}
{{- end }}
{{- end -}}

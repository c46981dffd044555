{{/*
An engine pod: the engine container (vLLM, or `infermesh sim`) and the infermesh agent beside it
in the same pod. The engine publishes its KV events on localhost ZMQ (5557, replay 5558); the
agent reads them and the engine's /metrics over localhost, and advertises the pod's IP to the
bus. Call with (dict "ctx" . "engine" <container map> "files" <extra ConfigMap entries>), and
optionally "agentConfig" (fields the engine chart sets in the agent's config; values still win)
and "agentVolumeMounts" (the engine's volumes the agent reads too).
*/}}
{{- define "im.agentConfig" -}}
{{- $v := .Values -}}
{{- dict "pool" $v.pool "role" $v.role "kv_endpoint" "tcp://127.0.0.1:5557"
      "replay_endpoint" "tcp://127.0.0.1:5558" "http_host" "0.0.0.0" "http_port" 9100
      | toYaml -}}
{{- end -}}

{{/* preStop of both containers: ask the agent to drain (heartbeats say not ready, so nothing new
is routed here) and wait until the engine runs nothing, at most the grace period less 10 s. */}}
{{- define "im.drainHook" -}}
{{- $wait := sub (int (.Values.terminationGracePeriodSeconds | default 120)) 10 -}}
lifecycle:
  preStop:
    exec:
      command:
        - python3
        - -c
        - |
          import json, time, urllib.request as u
          end = time.time() + {{ $wait }}
          while time.time() < end:
              try:
                  req = u.Request("http://127.0.0.1:9100/drain", method="POST")
                  if json.load(u.urlopen(req, timeout=2)).get("running", 0) == 0:
                      break
              except Exception:
                  break
              time.sleep(1)
{{- end -}}

{{- define "im.engineWorkload" -}}
{{- $ctx := .ctx -}}
{{- $v := $ctx.Values -}}
{{- $agent := $v.agent | default dict -}}
{{- $agentCfg := merge (include "im.agentConfig" $ctx | fromYaml) (deepCopy ($agent.config | default dict)) (deepCopy (.agentConfig | default dict)) -}}
{{- $files := merge (dict "agent.yaml" (toYaml $agentCfg)) (.files | default dict) }}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "im.fullname" $ctx }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "im.labels" $ctx | nindent 4 }}
data:
  {{- range $name, $text := $files }}
  {{ $name }}: |
    {{- $text | nindent 4 }}
  {{- end }}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "im.fullname" $ctx }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "im.labels" $ctx | nindent 4 }}
    infermesh.io/pool: {{ $v.pool }}
    infermesh.io/role: {{ $v.role }}
spec:
  {{- if not ($v.keda).enabled }}
  replicas: {{ $v.replicaCount }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "im.selectorLabels" $ctx | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "im.labels" $ctx | nindent 8 }}
        infermesh.io/pool: {{ $v.pool }}
        infermesh.io/role: {{ $v.role }}
      annotations:
        checksum/config: {{ toYaml $files | sha256sum }}
        {{- with $v.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds | default 120 }}
      {{- include "im.affinity" $ctx | nindent 6 }}
      {{- with .initContainers }}
      initContainers:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - {{- toYaml .engine | nindent 10 }}
          {{- if ($v.drain).enabled }}
          {{- include "im.drainHook" $ctx | nindent 10 }}
          {{- end }}
        - name: agent
          image: {{ include "im.image" $ctx | quote }}
          imagePullPolicy: {{ include "im.pullPolicy" $ctx }}
          args: ["agent", "--config", "/etc/infermesh/agent.yaml"]
          ports:
            - name: agent
              containerPort: 9100
          env:
            - name: HOME
              value: /tmp
            - name: POD_IP
              valueFrom:
                fieldRef:
                  fieldPath: status.podIP
            - name: INFERMESH_AGENT_POD
              valueFrom:
                fieldRef:
                  fieldPath: metadata.name
            - name: INFERMESH_AGENT_ENGINE_URL
              value: "http://$(POD_IP):8000"
            {{- include "im.busEnv" (dict "ctx" $ctx "service" "agent" "identity" (printf "agent-%s" $v.pool)) | nindent 12 }}
            {{- with $agent.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- include "im.probes" (dict "port" 9100) | nindent 10 }}
          {{- if ($v.drain).enabled }}
          {{- include "im.drainHook" $ctx | nindent 10 }}
          {{- end }}
          resources:
            {{- toYaml ($agent.resources | default dict) | nindent 12 }}
          securityContext:
            runAsNonRoot: true
            runAsUser: 10001
            {{- include "im.containerSecurityContext" $ctx | nindent 12 }}
          volumeMounts:
            - name: config
              mountPath: /etc/infermesh
              readOnly: true
            - name: tmp
              mountPath: /tmp
            {{- include "im.busVolumeMounts" $ctx | nindent 12 }}
            {{- with .agentVolumeMounts }}
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
---
{{/* Headless: the pods' own addresses (Prometheus scrapes each engine and agent). */}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "im.fullname" $ctx }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "im.labels" $ctx | nindent 4 }}
spec:
  clusterIP: None
  selector:
    {{- include "im.selectorLabels" $ctx | nindent 4 }}
  ports:
    - name: http
      port: 8000
      targetPort: http
    - name: agent
      port: 9100
      targetPort: agent
{{- with (include "im.pdb" $ctx) }}
---
{{ . }}
{{- end }}
{{- with (include "im.serviceMonitor" (dict "ctx" $ctx "endpoints" (list "http" "agent"))) }}
---
{{ . }}
{{- end }}
{{- with ($v.keda) }}
{{- if .enabled }}
---
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: {{ include "im.fullname" $ctx }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "im.labels" $ctx | nindent 4 }}
spec:
  scaleTargetRef:
    name: {{ include "im.fullname" $ctx }}
  minReplicaCount: {{ .minReplicas }}
  maxReplicaCount: {{ .maxReplicas }}
  pollingInterval: {{ .pollingInterval }}
  cooldownPeriod: {{ .cooldownPeriod }}
  triggers:
    - type: {{ if .push }}external-push{{ else }}external{{ end }}
      metadata:
        scalerAddress: {{ .scalerAddress | default (printf "%s:9090" (include "im.peer" (dict "ctx" $ctx "name" "autoscaler"))) | quote }}
        pool: {{ $v.pool | quote }}
{{- end }}
{{- end }}
{{- end -}}

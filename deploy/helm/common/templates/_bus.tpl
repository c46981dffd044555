{{/*
What every process on the bus gets: where NATS is, the subject prefix, its NATS user with the
password from a Secret, the NATS CA (and client certificate) from a Secret, and the OTEL_*
variables of the trace exporter. Call with (dict "ctx" . "service" "ingress" "identity" "ingress").
The variables are the services' own (INFERMESH_<SERVICE>_<FIELD>), so they win over the config
file; nothing secret is ever in a ConfigMap.
*/}}
{{- define "im.busEnv" -}}
{{- $ctx := .ctx -}}
{{- $p := printf "INFERMESH_%s_" (upper .service) -}}
{{- $nats := ($ctx.Values.global).nats | default dict -}}
- name: {{ $p }}NATS_URL
  value: {{ $nats.url | default "nats://nats:4222" | quote }}
- name: {{ $p }}SUBJECT_PREFIX
  value: {{ $nats.subjectPrefix | default "im" | quote }}
{{- $auth := $nats.auth | default dict }}
{{- if $auth.enabled }}
- name: {{ $p }}NATS_USER
  value: {{ .identity | quote }}
- name: {{ $p }}NATS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ required "global.nats.auth.secretName: the Secret with one password per NATS user" $auth.secretName }}
      key: {{ .identity }}
{{- end }}
{{- $tls := $nats.tls | default dict }}
{{- if $tls.enabled }}
- name: {{ $p }}NATS_TLS_CA
  value: /etc/infermesh/nats-tls/ca.crt
{{- if $tls.clientCertificates }}
- name: {{ $p }}NATS_TLS_CERT
  value: /etc/infermesh/nats-tls/tls.crt
- name: {{ $p }}NATS_TLS_KEY
  value: /etc/infermesh/nats-tls/tls.key
{{- end }}
{{- end }}
{{- $otel := ($ctx.Values.global).otel | default dict }}
{{- if $otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $otel.endpoint | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $otel.sampler | default "parentbased_traceidratio" | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $otel.samplerArg | default "1.0" | quote }}
{{- end }}
{{- end -}}

{{- define "im.busVolumeMounts" -}}
{{- $tls := ((.Values.global).nats).tls | default dict -}}
{{- if $tls.enabled }}
- name: nats-tls
  mountPath: /etc/infermesh/nats-tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "im.busVolumes" -}}
{{- $tls := ((.Values.global).nats).tls | default dict -}}
{{- if $tls.enabled }}
- name: nats-tls
  secret:
    secretName: {{ required "global.nats.tls.secretName: the Secret with ca.crt (and tls.crt, tls.key)" $tls.secretName }}
{{- end }}
{{- end -}}

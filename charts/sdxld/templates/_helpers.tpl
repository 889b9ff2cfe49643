{{/* The chart's name. */}}
{{- define "sdxld.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name. */}}
{{- define "sdxld.fullname" -}}
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

{{/* Labels every object carries. */}}
{{- define "sdxld.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "sdxld.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that select the pods. */}}
{{- define "sdxld.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sdxld.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The image, by digest when one is given. */}}
{{- define "sdxld.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "sdxld.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sdxld.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "sdxld.tlsSecret" -}}
{{- default (printf "%s-tls" (include "sdxld.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{- define "sdxld.clientCASecret" -}}
{{- default (printf "%s-client-ca" (include "sdxld.fullname" .)) .Values.tls.clientCA.existingSecret }}
{{- end }}

{{- define "sdxld.tokensSecret" -}}
{{- default (printf "%s-tokens" (include "sdxld.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{/* Whether tokens are configured. */}}
{{- define "sdxld.hasTokens" -}}
{{- if or .Values.auth.existingSecret .Values.auth.tokens }}true{{ end }}
{{- end }}

{{/* sdxld's config.toml: the values' `config` under the keys the chart sets. */}}
{{- define "sdxld.config" -}}
{{- $roots := dict -}}
{{- range $kind := list "base" "refiner" "vae" "lora" "controlnet" "upscaler" "preprocessor" }}
{{- $_ := set $roots (printf "%s_roots" $kind) (list (printf "/models/%s" $kind)) }}
{{- end }}
{{- $server := dict
  "listen" (printf "0.0.0.0:%d" (int .Values.service.grpcPort))
  "health_listen" (printf "0.0.0.0:%d" (int .Values.service.healthPort))
  "metrics_listen" (printf "0.0.0.0:%d" (int .Values.service.metricsPort))
  "shutdown_grace_seconds" (int .Values.drainGraceSeconds)
  "allow_unauthenticated_admin" .Values.auth.allowUnauthenticatedAdmin
  "tokens_file" (ternary "/etc/sdxld/tokens/tokens" "" (eq (include "sdxld.hasTokens" .) "true"))
-}}
{{- if .Values.tls.enabled }}
{{- $tls := dict "cert" "/etc/sdxld/tls/tls.crt" "key" "/etc/sdxld/tls/tls.key" "client_auth" .Values.tls.clientAuth "client_ca" "" }}
{{- if ne .Values.tls.clientAuth "none" }}
{{- $_ := set $tls "client_ca" "/etc/sdxld/client-ca/ca.crt" }}
{{- end }}
{{- $_ := set $server "tls" $tls }}
{{- end }}
{{- $managed := dict "server" $server "models" $roots }}
{{- toToml (mustMergeOverwrite (deepCopy .Values.config) $managed) }}
{{- end }}

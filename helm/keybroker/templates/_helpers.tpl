{{/* Names and labels. */}}
{{- define "keybroker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "keybroker.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "keybroker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "keybroker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "keybroker.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "keybroker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "keybroker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "keybroker.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "keybroker.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Paths inside the container: the Dockerfile and the tests agree on them. */}}
{{- define "keybroker.configPath" -}}/etc/keybroker/config/keybroker.toml{{- end -}}
{{- define "keybroker.dataDir" -}}/var/lib/keybroker{{- end -}}

{{/* A TOML string (Go's %q quoting is valid TOML for these values). */}}
{{- define "keybroker.toml.list" -}}
[{{- range $i, $v := . }}{{ if $i }}, {{ end }}{{ $v | toString | quote }}{{ end -}}]
{{- end -}}

{{/* The keybroker configuration file. */}}
{{- define "keybroker.config" -}}
{{- $sidecar := eq .Values.mode "sidecar" -}}
# Rendered by the keybroker Helm chart; every setting: docs/CONFIGURATION.md.
listen = {{ printf "%s:%d" (ternary "127.0.0.1" "0.0.0.0" $sidecar) (int .Values.grpc.port) | quote }}
health_listen = {{ printf "0.0.0.0:%d" (int .Values.health.port) | quote }}
log = {{ .Values.log.level | quote }}
log_format = {{ .Values.log.format | quote }}
default_backend = {{ .Values.defaultBackend | quote }}
rotation_check_interval_ms = {{ int .Values.rotationCheckIntervalMs }}
propagation_interval_ms = {{ int .Values.propagationIntervalMs }}

[tls]
cert = "/etc/keybroker/tls/tls.crt"
key = "/etc/keybroker/tls/tls.key"
client_ca = {{ ternary "/etc/keybroker/client-ca/ca.crt" "/etc/keybroker/tls/ca.crt" (ne .Values.tls.clientCaSecretName "") | quote }}
{{- if .Values.tls.crlSecretName }}
crl = "/etc/keybroker/crl/crl.pem"
{{- end }}

[store]
{{- if eq .Values.store.type "postgres" }}
type = "postgres"
# url: from KEYBROKER_STORE_URL (Secret {{ .Values.store.postgres.urlSecret.name }})
pool_size = {{ int .Values.store.postgres.poolSize }}
{{- else }}
type = "sqlite"
path = "{{ include "keybroker.dataDir" . }}/keybroker.sqlite"
{{- end }}
{{- if .Values.rootKey.sealed.enabled }}

[root_key]
sealed_file = "/etc/keybroker/root-key/{{ .Values.rootKey.sealed.key }}"
sealed_by = {{ .Values.rootKey.sealed.by | quote }}
sealed_by_key = {{ .Values.rootKey.sealed.byKey | quote }}
{{- end }}
{{- range $name, $b := .Values.backends }}

[backends.{{ $name }}]
type = {{ $b.type | quote }}
{{- if eq $b.type "aws-kms" }}
region = {{ $b.region | quote }}
{{- if $b.endpoint }}
endpoint = {{ $b.endpoint | quote }}
{{- end }}
{{- if $b.timeoutMs }}
timeout_ms = {{ int $b.timeoutMs }}
{{- end }}
{{- end }}
{{- if eq $b.type "pkcs11" }}
module = {{ $b.module | quote }}
{{- if $b.tokenLabel }}
token_label = {{ $b.tokenLabel | quote }}
{{- end }}
pin_env = {{ printf "HSM_PIN_%s" ($name | upper | replace "-" "_" | replace "." "_") | quote }}
{{- if $b.sessions }}
sessions = {{ int $b.sessions }}
{{- end }}
{{- if $b.timeoutMs }}
timeout_ms = {{ int $b.timeoutMs }}
{{- end }}
{{- end }}
{{- end }}

[auth]
certificate_identities = {{ include "keybroker.toml.list" .Values.auth.certificateIdentities }}
{{- $admins := .Values.auth.adminIdentities }}
{{- if and (not $admins) (not .Values.auth.appIdentities) (not .Values.policy.identities) (not $sidecar) }}
{{- /* Nobody named: the SPIFFE ID of this release's admin service account. */}}
{{- $admins = list (printf "spiffe://cluster.local/ns/%s/sa/%s-admin" .Release.Namespace (include "keybroker.fullname" .)) }}
{{- end }}
admin_identities = {{ include "keybroker.toml.list" $admins }}
{{- $apps := .Values.auth.appIdentities }}
{{- if $sidecar }}
{{- $apps = append $apps (printf "uid:%d" (int .Values.sidecar.appUid)) }}
{{- end }}
app_identities = {{ include "keybroker.toml.list" $apps }}
{{- $roles := deepCopy .Values.policy.roles }}
{{- $identities := deepCopy .Values.policy.identities }}
{{- if .Values.kmsV2.enabled }}
{{- /* The API server may Wrap and Unwrap under the plugin's key. */}}
{{- $_ := set $roles "keybroker-kms-v2" (dict .Values.kmsV2.key (list "Wrap" "Unwrap")) }}
{{- $uid := printf "uid:%d" (int .Values.kmsV2.apiServerUid) }}
{{- $_ := set $identities $uid (append (get $identities $uid | default list) "keybroker-kms-v2") }}
{{- end }}
{{- range $role, $rules := $roles }}

[policy.roles.{{ $role | quote }}]
{{- range $glob, $rpcs := $rules }}
{{ $glob | quote }} = {{ include "keybroker.toml.list" $rpcs }}
{{- end }}
{{- end }}
{{- if $identities }}

[policy.identities]
{{- range $identity, $held := $identities }}
{{ $identity | quote }} = {{ include "keybroker.toml.list" $held }}
{{- end }}
{{- end }}

[audit]
stdout = {{ .Values.audit.stdout }}
fail_closed = {{ .Values.audit.failClosed }}
{{- if .Values.audit.toFile }}
file = "{{ include "keybroker.dataDir" . }}/audit.log"
max_file_bytes = {{ int64 .Values.audit.maxFileBytes }}
{{- end }}
{{- if .Values.metrics.enabled }}

[metrics]
listen = {{ printf "0.0.0.0:%d" (int .Values.metrics.port) | quote }}
{{- end }}
{{- if .Values.telemetry.otlpEndpoint }}

[telemetry]
otlp_endpoint = {{ .Values.telemetry.otlpEndpoint | quote }}
{{- end }}

{{- if .Values.kmsV2.enabled }}

[kms_v2]
socket = "/var/run/kmsplugin/keybroker.sock"
key = {{ .Values.kmsV2.key | quote }}
{{- end }}
{{- if .Values.xks.enabled }}

[xks]
listen = {{ printf "0.0.0.0:%d" (int .Values.xks.port) | quote }}
cert = "/etc/keybroker/xks/tls.crt"
key = "/etc/keybroker/xks/tls.key"
authorize_principals = {{ .Values.xks.authorizePrincipals }}
{{- range $i, $p := .Values.xks.prefixes }}

[[xks.prefixes]]
path = {{ $p.path | default "" | quote }}
requests_per_second = {{ int ($p.requestsPerSecond | default 0) }}
credentials = [
{{- range $j, $c := $p.credentials }}
  { access_key_id = {{ $c.accessKeyId | quote }}, secret_access_key_env = {{ printf "XKS_SECRET_%d_%d" $i $j | quote }} },
{{- end }}
]
{{- end }}
{{- end }}

[limits]
max_plaintext_bytes = {{ int .Values.limits.maxPlaintextBytes }}
max_batch_items = {{ int .Values.limits.maxBatchItems }}
max_in_flight = {{ int .Values.limits.maxInFlight }}
per_identity_rate = {{ int .Values.limits.perIdentityRate }}
per_identity_burst = {{ int .Values.limits.perIdentityBurst }}
call_deadline_ms = {{ int .Values.limits.callDeadlineMs }}
{{- if $sidecar }}

[unix_socket]
path = "{{ .Values.sidecar.socketDir }}/keybroker.sock"
mode = "0660"
{{- end }}
{{- end -}}

{{/* Environment: secrets the configuration names. */}}
{{- define "keybroker.env" -}}
- name: KEYBROKER_CONFIG
  value: {{ include "keybroker.configPath" . | quote }}
{{- if and (not .Values.rootKey.sealed.enabled) (has "local" (include "keybroker.backendTypes" . | fromJsonArray)) }}
- name: KEYBROKER_ROOT_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.rootKey.secret.name }}
      key: {{ .Values.rootKey.secret.key }}
{{- end }}
{{- if eq .Values.store.type "postgres" }}
- name: KEYBROKER_STORE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.store.postgres.urlSecret.name }}
      key: {{ .Values.store.postgres.urlSecret.key }}
{{- end }}
{{- range $name, $b := .Values.backends }}
{{- if eq $b.type "pkcs11" }}
- name: {{ printf "HSM_PIN_%s" ($name | upper | replace "-" "_" | replace "." "_") }}
  valueFrom:
    secretKeyRef:
      name: {{ $b.pinSecret.name }}
      key: {{ $b.pinSecret.key }}
{{- end }}
{{- end }}
{{- if .Values.aws.credentialsSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .Values.aws.credentialsSecret }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.aws.credentialsSecret }}
      key: AWS_SECRET_ACCESS_KEY
{{- end }}
{{- range $i, $p := .Values.xks.prefixes }}
{{- range $j, $c := $p.credentials }}
- name: {{ printf "XKS_SECRET_%d_%d" $i $j }}
  valueFrom:
    secretKeyRef:
      name: {{ $c.secretName }}
      key: {{ $c.secretKey | default "secret" }}
{{- end }}
{{- end }}
{{- if .Values.telemetry.otlpEndpoint }}
- name: OTEL_SERVICE_NAME
  value: {{ include "keybroker.fullname" . | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ .Values.telemetry.sampler | quote }}
{{- if .Values.telemetry.samplerArg }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ .Values.telemetry.samplerArg | quote }}
{{- end }}
{{- if .Values.telemetry.resourceAttributes }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ .Values.telemetry.resourceAttributes | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "keybroker.backendTypes" -}}
{{- $types := list -}}
{{- range $name, $b := .Values.backends -}}{{- $types = append $types $b.type -}}{{- end -}}
{{- $types | toJson -}}
{{- end -}}

{{/* The keybroker container, for both modes. */}}
{{- define "keybroker.container" -}}
- name: keybroker
  image: {{ include "keybroker.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: ["serve", "--config", {{ include "keybroker.configPath" . | quote }}]
  env:
    {{- include "keybroker.env" . | nindent 4 }}
  ports:
    - name: grpc
      containerPort: {{ int .Values.grpc.port }}
      protocol: TCP
    - name: health
      containerPort: {{ int .Values.health.port }}
      protocol: TCP
    {{- if .Values.metrics.enabled }}
    - name: metrics
      containerPort: {{ int .Values.metrics.port }}
      protocol: TCP
    {{- end }}
    {{- if .Values.xks.enabled }}
    - name: xks
      containerPort: {{ int .Values.xks.port }}
      protocol: TCP
    {{- end }}
  # Native gRPC probes on the plain-text health port (the gRPC port is mTLS).
  livenessProbe:
    grpc:
      port: {{ int .Values.health.port }}
      service: keybroker.liveness
    periodSeconds: 10
    failureThreshold: 3
  readinessProbe:
    grpc:
      port: {{ int .Values.health.port }}
      service: ""
    periodSeconds: 5
    failureThreshold: 2
  startupProbe:
    grpc:
      port: {{ int .Values.health.port }}
      service: keybroker.liveness
    periodSeconds: 2
    failureThreshold: 30
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: keybroker-config
      mountPath: /etc/keybroker/config
      readOnly: true
    - name: keybroker-tls
      mountPath: /etc/keybroker/tls
      readOnly: true
    {{- if .Values.tls.clientCaSecretName }}
    - name: keybroker-client-ca
      mountPath: /etc/keybroker/client-ca
      readOnly: true
    {{- end }}
    {{- if .Values.tls.crlSecretName }}
    - name: keybroker-crl
      mountPath: /etc/keybroker/crl
      readOnly: true
    {{- end }}
    {{- if .Values.rootKey.sealed.enabled }}
    - name: keybroker-root-key
      mountPath: /etc/keybroker/root-key
      readOnly: true
    {{- end }}
    - name: keybroker-data
      mountPath: {{ include "keybroker.dataDir" . }}
    {{- if eq .Values.mode "sidecar" }}
    - name: keybroker-socket
      mountPath: {{ .Values.sidecar.socketDir }}
    {{- end }}
    {{- if .Values.xks.enabled }}
    - name: keybroker-xks-tls
      mountPath: /etc/keybroker/xks
      readOnly: true
    {{- end }}
    {{- if .Values.kmsV2.enabled }}
    - name: keybroker-kms-v2
      mountPath: /var/run/kmsplugin
    {{- end }}
{{- end -}}

{{/* The keybroker volumes, for both modes. */}}
{{- define "keybroker.volumes" -}}
- name: keybroker-config
  configMap:
    name: {{ include "keybroker.fullname" . }}
- name: keybroker-tls
  secret:
    secretName: {{ .Values.tls.secretName }}
    defaultMode: 0440
{{- if .Values.tls.clientCaSecretName }}
- name: keybroker-client-ca
  secret:
    secretName: {{ .Values.tls.clientCaSecretName }}
    defaultMode: 0440
{{- end }}
{{- if .Values.tls.crlSecretName }}
- name: keybroker-crl
  secret:
    secretName: {{ .Values.tls.crlSecretName }}
    defaultMode: 0440
{{- end }}
{{- if .Values.rootKey.sealed.enabled }}
- name: keybroker-root-key
  secret:
    secretName: {{ .Values.rootKey.sealed.secretName }}
    defaultMode: 0400
{{- end }}
{{- if and (eq .Values.mode "standalone") (eq .Values.store.type "sqlite") .Values.store.sqlite.persistence.enabled }}
- name: keybroker-data
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-data" (include "keybroker.fullname" .)) .Values.store.sqlite.persistence.existingClaim }}
{{- else }}
- name: keybroker-data
  emptyDir: {}
{{- end }}
{{- if eq .Values.mode "sidecar" }}
- name: keybroker-socket
  emptyDir:
    medium: Memory
{{- end }}
{{- if .Values.xks.enabled }}
- name: keybroker-xks-tls
  secret:
    secretName: {{ required "xks.tlsSecretName is required with xks.enabled" .Values.xks.tlsSecretName }}
    defaultMode: 0440
{{- end }}
{{- if .Values.kmsV2.enabled }}
- name: keybroker-kms-v2
  hostPath:
    path: {{ .Values.kmsV2.hostPath }}
    type: DirectoryOrCreate
{{- end }}
{{- end -}}

{{/*
Sidecar mode, for an application chart that depends on this one:
  containers:
    - name: app
      volumeMounts:
        {{- include "keybroker.sidecar.socketMount" (dict "Values" .Values.keybroker) | nindent 8 }}
    {{- include "keybroker.sidecar.container" (dict "Values" .Values.keybroker "Chart" .Subcharts.keybroker.Chart "Release" .Release) | nindent 4 }}
  volumes:
    {{- include "keybroker.sidecar.volumes" (dict "Values" .Values.keybroker "Chart" .Subcharts.keybroker.Chart "Release" .Release) | nindent 4 }}
*/}}
{{- define "keybroker.sidecar.container" -}}
{{ include "keybroker.container" . }}
{{- end -}}

{{- define "keybroker.sidecar.volumes" -}}
{{ include "keybroker.volumes" . }}
{{- end -}}

{{/* The application container's mount of the socket directory. */}}
{{- define "keybroker.sidecar.socketMount" -}}
- name: keybroker-socket
  mountPath: {{ .Values.sidecar.socketDir }}
{{- end -}}

{{/* The socket path the application dials (unix://...). */}}
{{- define "keybroker.sidecar.socketPath" -}}
{{ .Values.sidecar.socketDir }}/keybroker.sock
{{- end -}}

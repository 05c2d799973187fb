{{/* Names and labels. */}}

{{- define "voucher-bridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "voucher-bridge.fullname" -}}
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

{{- define "voucher-bridge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "voucher-bridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "voucher-bridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "voucher-bridge.labels" -}}
helm.sh/chart: {{ include "voucher-bridge.chart" . }}
{{ include "voucher-bridge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: consumer
{{- end }}

{{- define "voucher-bridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "voucher-bridge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "voucher-bridge.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion }}
{{- if .Values.image.digest }}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* The state directory: the image's, where the SQLite store lives. */}}
{{- define "voucher-bridge.stateDir" -}}
/var/lib/voucher-bridge
{{- end }}

{{- define "voucher-bridge.pvcName" -}}
{{- .Values.persistence.existingClaim | default (printf "%s-state" (include "voucher-bridge.fullname" .)) }}
{{- end }}

{{/*
A value as the string an env variable holds. Numbers from a values file arrive as float64,
which print as 1.048576e+06: whole ones are printed as integers.
*/}}
{{- define "voucher-bridge.envString" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) }}
{{- int64 . }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/*
Settings that are secrets: never in the ConfigMap, never a plain env value. The known ones
plus every entry of .Values.secrets. A JSON list of env names.
*/}}
{{- define "voucher-bridge.secretSettingNames" -}}
{{- $names := list "EVOUCHER_TERMINALS" "EPIN_API_KEY" "EPIN_ACCOUNTS" "KAFKA_SASL_PASSWORD" "KAFKA_SSL_KEY_PASSWORD" "IDEMPOTENCY_STORE_URL" "CONSOLE_USERS" }}
{{- range $name, $_ := .Values.secrets }}
{{- $names = append $names ($name | snakecase | upper) }}
{{- end }}
{{- $names | uniq | toJson }}
{{- end }}

{{/*
Env variables from Secret keys: way (a)'s entries that are given, sorted by entry name, and
the PostgreSQL store URL when it comes from the secrets directory. A JSON list of
{env, secret, key}.
*/}}
{{- define "voucher-bridge.secretRefs" -}}
{{- $refs := list }}
{{- range $name, $ref := .Values.secrets }}
{{- if and $ref $ref.existingSecret }}
{{- $refs = append $refs (dict "env" ($name | snakecase | upper) "secret" $ref.existingSecret "key" ($ref.key | default ($name | snakecase))) }}
{{- end }}
{{- end }}
{{- $storeUrl := .Values.secrets.idempotencyStoreUrl | default dict }}
{{- if and (eq .Values.store.kind "postgres") (not $storeUrl.existingSecret) .Values.secretsDir.existingSecret }}
{{- /* Without its file the service would quietly fall back to a SQLite file of each pod's
  own: a key reference to the same Secret stops the pod instead, naming the missing key. */}}
{{- $refs = append $refs (dict "env" "IDEMPOTENCY_STORE_URL" "secret" .Values.secretsDir.existingSecret "key" "idempotency_store_url") }}
{{- end }}
{{- $refs | toJson }}
{{- end }}

{{/*
Settings the chart sets from its own values, and which value sets each: refused in `config`
and `extraEnv`, where they would be shadowed or would shadow silently.
*/}}
{{- define "voucher-bridge.ownedSettings" -}}
{{- $owned := dict
  "KAFKA_BOOTSTRAP_SERVERS" "kafka.bootstrapServers"
  "KAFKA_GROUP_ID" "kafka.groupId"
  "KAFKA_SECURITY_PROTOCOL" "kafka.securityProtocol"
  "KAFKA_SASL_MECHANISM" "kafka.saslMechanism"
  "KAFKA_SASL_USERNAME" "kafka.saslUsername"
  "POS_COMMANDS_TOPIC" "kafka.topics.posCommands"
  "POS_RESULTS_TOPIC" "kafka.topics.posResults"
  "COUPON_COMMANDS_TOPIC" "kafka.topics.couponCommands"
  "COUPON_RESULTS_TOPIC" "kafka.topics.couponResults"
  "EVOUCHER_BASE_URL" "evoucher.baseUrl"
  "EPIN_BASE_URL" "epin.baseUrl"
  "MAX_IN_FLIGHT" "processing.maxInFlight"
  "WORKERS" "processing.workers"
  "COMMAND_TIMEOUT_S" "processing.commandTimeoutSeconds"
  "LOG_LEVEL" "logLevel"
  "OTEL_SERVICE_NAME" "otel.serviceName"
  "OTEL_EXPORTER_OTLP_ENDPOINT" "otel.exporterOtlpEndpoint"
  "DRAIN_TIMEOUT_S" "drainTimeoutSeconds"
  "HTTP_HOST" "the chart itself (0.0.0.0, so that the probes and the Service reach it)"
  "HTTP_PORT" "the chart itself (8080, the container port http)"
  "VOUCHER_BRIDGE_SECRETS_DIR" "secretsDir"
}}
{{- if .Values.kafkaTls.existingSecret }}
{{- $_ := set $owned "KAFKA_SSL_CAFILE" "kafkaTls" }}
{{- $_ := set $owned "KAFKA_SSL_CERTFILE" "kafkaTls" }}
{{- $_ := set $owned "KAFKA_SSL_KEYFILE" "kafkaTls" }}
{{- end }}
{{- $owned | toJson }}
{{- end }}

{{/* The ConfigMap's data: the typed values that are set, the store, then `config`. */}}
{{- define "voucher-bridge.configData" -}}
{{- $v := .Values }}
{{- $data := dict }}
{{- $typed := dict
  "KAFKA_BOOTSTRAP_SERVERS" $v.kafka.bootstrapServers
  "KAFKA_GROUP_ID" $v.kafka.groupId
  "KAFKA_SECURITY_PROTOCOL" $v.kafka.securityProtocol
  "KAFKA_SASL_MECHANISM" $v.kafka.saslMechanism
  "KAFKA_SASL_USERNAME" $v.kafka.saslUsername
  "POS_COMMANDS_TOPIC" $v.kafka.topics.posCommands
  "POS_RESULTS_TOPIC" $v.kafka.topics.posResults
  "COUPON_COMMANDS_TOPIC" $v.kafka.topics.couponCommands
  "COUPON_RESULTS_TOPIC" $v.kafka.topics.couponResults
  "EVOUCHER_BASE_URL" $v.evoucher.baseUrl
  "EPIN_BASE_URL" $v.epin.baseUrl
  "MAX_IN_FLIGHT" $v.processing.maxInFlight
  "WORKERS" $v.processing.workers
  "COMMAND_TIMEOUT_S" $v.processing.commandTimeoutSeconds
  "LOG_LEVEL" $v.logLevel
  "OTEL_SERVICE_NAME" $v.otel.serviceName
  "OTEL_EXPORTER_OTLP_ENDPOINT" $v.otel.exporterOtlpEndpoint
}}
{{- range $name, $value := $typed }}
{{- if not (or (kindIs "invalid" $value) (eq (toString $value) "")) }}
{{- $_ := set $data $name (include "voucher-bridge.envString" $value) }}
{{- end }}
{{- end }}
{{- if eq $v.store.kind "sqlite" }}
{{- /* A SQLite URL holds no password; a PostgreSQL one comes from a Secret. */}}
{{- $_ := set $data "IDEMPOTENCY_STORE_URL" (printf "sqlite:///%s/%s" (include "voucher-bridge.stateDir" .) $v.store.sqlite.file) }}
{{- end }}
{{- range $name, $value := $v.config }}
{{- $_ := set $data $name (include "voucher-bridge.envString" $value) }}
{{- end }}
{{- $data | toJson }}
{{- end }}

{{/*
Checks the schema cannot make: each ends rendering with a message saying what to change.
*/}}
{{- define "voucher-bridge.validate" -}}
{{- $v := .Values }}
{{- $secretNames := include "voucher-bridge.secretSettingNames" . | fromJsonArray }}
{{- $owned := include "voucher-bridge.ownedSettings" . | fromJson }}
{{- $storeUrl := $v.secrets.idempotencyStoreUrl | default dict }}

{{- if and (eq $v.store.kind "sqlite") (gt (int $v.replicaCount) 1) }}
{{- fail (printf "replicaCount is %d but store.kind is sqlite: each pod would keep its own SQLite file, so after a rebalance a command could be applied twice. Run one replica, or set store.kind=postgres with the store URL in secrets.idempotencyStoreUrl (or the secrets directory)." (int $v.replicaCount)) }}
{{- end }}

{{- if and (eq $v.store.kind "postgres") (not $storeUrl.existingSecret) (not $v.secretsDir.existingSecret) }}
{{- fail "store.kind is postgres but no store URL is given: set secrets.idempotencyStoreUrl.existingSecret (and .key) to a Secret holding postgresql://user:pass@host/db, or secretsDir.existingSecret to a Secret with a file idempotency_store_url." }}
{{- end }}

{{- if and (eq $v.store.kind "sqlite") $storeUrl.existingSecret }}
{{- fail "secrets.idempotencyStoreUrl is set but store.kind is sqlite: set store.kind=postgres to use that store, or remove secrets.idempotencyStoreUrl." }}
{{- end }}

{{- if and $v.persistence.enabled (ne $v.store.kind "sqlite") }}
{{- fail "persistence.enabled is for the sqlite store (its file in the state directory); with store.kind=postgres the pods keep nothing on disk: disable it." }}
{{- end }}

{{- if and (hasPrefix "SASL_" $v.kafka.securityProtocol) (not (($v.secrets.kafkaSaslPassword | default dict).existingSecret)) (not $v.secretsDir.existingSecret) }}
{{- fail (printf "kafka.securityProtocol is %s but no SASL password is given: set secrets.kafkaSaslPassword.existingSecret (and .key), or secretsDir.existingSecret to a Secret with a file kafka_sasl_password." $v.kafka.securityProtocol) }}
{{- end }}

{{- if and $v.kafkaTls.existingSecret (ne (empty $v.kafkaTls.certKey) (empty $v.kafkaTls.keyKey)) }}
{{- fail "kafkaTls: certKey and keyKey go together (a client certificate needs its key): set both or neither." }}
{{- end }}

{{- if and $v.secretsDir.existingSecret $v.kafkaTls.existingSecret (eq (clean $v.secretsDir.mountPath) (clean $v.kafkaTls.mountPath)) }}
{{- fail "secretsDir.mountPath and kafkaTls.mountPath are the same directory: give each its own." }}
{{- end }}

{{- range $name, $_ := $v.config }}
{{- if has $name $secretNames }}
{{- fail (printf "config.%s is a secret setting and must not be in the ConfigMap: set secrets.%s.existingSecret (and .key), or put a file %s in the secrets directory (secretsDir)." $name ($name | lower | camelcase | untitle) ($name | lower)) }}
{{- end }}
{{- if hasKey $owned $name }}
{{- fail (printf "config.%s is set by %s: not in config." $name (get $owned $name)) }}
{{- end }}
{{- end }}

{{- /* A setting from a Secret key must not also be set by the chart: one would shadow the
  other (env over envFrom) without a word. */}}
{{- $configData := include "voucher-bridge.configData" . | fromJson }}
{{- $refs := include "voucher-bridge.secretRefs" . | fromJsonArray }}
{{- $chartEnv := list "HTTP_HOST" "HTTP_PORT" "DRAIN_TIMEOUT_S" }}
{{- if $v.secretsDir.existingSecret }}{{ $chartEnv = append $chartEnv "VOUCHER_BRIDGE_SECRETS_DIR" }}{{ end }}
{{- if $v.kafkaTls.existingSecret }}{{ $chartEnv = concat $chartEnv (list "KAFKA_SSL_CAFILE" "KAFKA_SSL_CERTFILE" "KAFKA_SSL_KEYFILE") }}{{ end }}
{{- $envSet := list }}
{{- range $refs }}
{{- $envSet = append $envSet .env }}
{{- if or (hasKey $configData .env) (has .env $chartEnv) }}
{{- fail (printf "secrets.%s names %s, which is set by %s: set it in one place only." (.env | lower | camelcase | untitle) .env (get $owned .env | default "the ConfigMap")) }}
{{- end }}
{{- end }}

{{- range $v.extraEnv }}
{{- if and (has .name $secretNames) (hasKey . "value") }}
{{- fail (printf "extraEnv %s is a secret setting with a plain value: take it from a Secret (secrets.%s.existingSecret, or valueFrom.secretKeyRef)." .name (.name | lower | camelcase | untitle)) }}
{{- end }}
{{- if hasKey $owned .name }}
{{- fail (printf "extraEnv %s is set by %s: not in extraEnv." .name (get $owned .name)) }}
{{- end }}
{{- if has .name $envSet }}
{{- fail (printf "extraEnv %s is already taken from a Secret (secrets.%s): not in extraEnv." .name (.name | lower | camelcase | untitle)) }}
{{- end }}
{{- end }}
{{- end }}

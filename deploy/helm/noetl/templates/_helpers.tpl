{{/*
Names. The fullname is cut to 35 characters so that "<fullname>-worker-<pool>" (pool names: at most 20,
see values.schema.json) stays a valid 63-character DNS label.
*/}}
{{- define "noetl.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 35 | trimSuffix "-" -}}
{{- end -}}

{{- define "noetl.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 35 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 35 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 35 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "noetl.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The name of one role's objects (Deployment, Service, HPA, PDB): ctx = dict root role pool */}}
{{- define "noetl.componentName" -}}
{{- if eq .role "worker" -}}
{{- printf "%s-worker-%s" (include "noetl.fullname" .root) .pool -}}
{{- else -}}
{{- printf "%s-%s" (include "noetl.fullname" .root) .role -}}
{{- end -}}
{{- end -}}

{{- define "noetl.commonLabels" -}}
helm.sh/chart: {{ include "noetl.chart" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: noetl
{{- end -}}

{{- define "noetl.labels" -}}
{{ include "noetl.commonLabels" . }}
app.kubernetes.io/name: {{ include "noetl.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Selector labels of one role: ctx = dict root role pool */}}
{{- define "noetl.selectorLabels" -}}
app.kubernetes.io/name: {{ include "noetl.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .role }}
{{- if eq .role "worker" }}
noetl.io/pool: {{ .pool }}
{{- end }}
{{- end -}}

{{- define "noetl.componentLabels" -}}
{{ include "noetl.commonLabels" .root }}
{{ include "noetl.selectorLabels" . }}
{{- end -}}

{{- define "noetl.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "noetl.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "noetl.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* The Python module each role runs: python -m <module>. The ingest role (the API's entry point: every
write, and the reads for one-URL clients) runs the HTTP frontend, which composes every service's routes. */}}
{{- define "noetl.module" -}}
{{- get (dict "ingest" "noetl_frontend" "query" "noetl_query" "render" "noetl_render" "broker" "noetl_broker" "worker" "noetl_worker") . -}}
{{- end -}}

{{/* Which roles get which secrets (least privilege: the broker never sees the database or the key). */}}
{{/* The broker token: secrets.brokerToken, else the one already in the release's Secret, else a new one. */}}
{{- define "noetl.brokerToken" -}}
{{- if .Values.secrets.brokerToken -}}
{{- .Values.secrets.brokerToken -}}
{{- else -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "noetl.secretName" .) -}}
{{- $data := dig "data" (dict) ($existing | default (dict)) -}}
{{- $token := get $data .Values.secrets.keys.brokerToken -}}
{{- if $token -}}
{{- $token | b64dec -}}
{{- else -}}
{{- randAlphaNum 43 -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- /* the broker serves /explain and /metrics with the broker token; ingest and query ask it (explain) */ -}}
{{- define "noetl.needsBrokerToken" -}}
{{- if has . (list "ingest" "query" "broker") -}}true{{- end -}}
{{- end -}}
{{- define "noetl.needsDatabase" -}}
{{- if has . (list "ingest" "query" "render" "worker") -}}true{{- end -}}
{{- end -}}
{{- define "noetl.needsSecretKey" -}}
{{- if has . (list "ingest" "worker") -}}true{{- end -}}
{{- end -}}

{{- /* "true" when the services authenticate to Kafka with SASL (they then get the credentials) */ -}}
{{- define "noetl.kafkaSasl" -}}
{{- if hasPrefix "SASL_" .Values.externalKafka.securityProtocol -}}true{{- end -}}
{{- end -}}

{{- /* Where externalKafka.tls.caSecret is mounted, and the CA file in it (NOETL_KAFKA_SSL_CAFILE) */ -}}
{{- define "noetl.kafkaCaDir" -}}/etc/noetl/kafka-ca{{- end -}}
{{- define "noetl.kafkaCaFile" -}}
{{- printf "%s/%s" (include "noetl.kafkaCaDir" .) .Values.externalKafka.tls.caKey -}}
{{- end -}}

{{- define "noetl.kafkaBootstrap" -}}
{{- if .Values.kafka.enabled -}}
{{- printf "%s-kafka:9092" .Release.Name -}}
{{- else -}}
{{- required "externalKafka.bootstrap is required (host:port[,host:port]) unless kafka.enabled=true" .Values.externalKafka.bootstrap -}}
{{- end -}}
{{- end -}}

{{/* The asyncpg DSN: externalDatabase.url, else built from its parts (or from the postgresql subchart). */}}
{{- define "noetl.databaseUrl" -}}
{{- if .Values.postgresql.enabled -}}
{{- $auth := .Values.postgresql.auth -}}
{{- $password := required "postgresql.auth.password is required when postgresql.enabled=true (the DSN is built from it)" $auth.password -}}
{{- printf "postgresql://%s:%s@%s-postgresql:5432/%s" (urlquery $auth.username) (urlquery $password) .Release.Name $auth.database -}}
{{- else if .Values.externalDatabase.url -}}
{{- .Values.externalDatabase.url -}}
{{- else -}}
{{- $db := .Values.externalDatabase -}}
{{- $cred := urlquery $db.user -}}
{{- if $db.password -}}{{- $cred = printf "%s:%s" $cred (urlquery $db.password) -}}{{- end -}}
{{- $url := printf "postgresql://%s@%s:%d/%s" $cred $db.host (int $db.port) $db.database -}}
{{- if $db.sslmode -}}{{- $url = printf "%s?sslmode=%s" $url $db.sslmode -}}{{- end -}}
{{- $url -}}
{{- end -}}
{{- end -}}

{{- define "noetl.secretName" -}}
{{- default (printf "%s-secrets" (include "noetl.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "noetl.configMapName" -}}
{{- printf "%s-config" (include "noetl.fullname" .) -}}
{{- end -}}

{{/* The Fernet key: secrets.secretKey, else the one already in the release's Secret, else a new one. */}}
{{- define "noetl.secretKey" -}}
{{- if .Values.secrets.secretKey -}}
{{- .Values.secrets.secretKey -}}
{{- else -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "noetl.secretName" .) -}}
{{- $data := dig "data" (dict) ($existing | default (dict)) -}}
{{- $key := get $data .Values.secrets.keys.secretKey -}}
{{- if $key -}}
{{- $key | b64dec -}}
{{- else -}}
{{- randAlphaNum 32 | b64enc -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Pod-level settings every pod shares: ctx = root */}}
{{- define "noetl.podCommon" -}}
serviceAccountName: {{ include "noetl.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountToken }}
enableServiceLinks: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end -}}

{{/*
A worker pool with workerDefaults filled in: ctx = dict "out" <an empty dict, filled here> "p" <the pool>
"d" <workerDefaults>. (Sprig's merge would turn a pool's `enabled: false` or `replicas: 0` into the
default, since it treats false and 0 as unset.) autoscaling and pdb merge key by key.
*/}}
{{- define "noetl.mergePool" -}}
{{- $p := .p -}}
{{- $out := .out -}}
{{- range $k, $dv := .d -}}
{{- if not (hasKey $p $k) -}}
{{- $_ := set $out $k $dv -}}
{{- else if and (has $k (list "autoscaling" "pdb")) (kindIs "map" $dv) (kindIs "map" (index $p $k)) -}}
{{- $m := deepCopy $dv -}}
{{- range $k2, $v2 := index $p $k -}}{{- $_ := set $m $k2 $v2 -}}{{- end -}}
{{- $_ := set $out $k $m -}}
{{- else -}}
{{- $_ := set $out $k (index $p $k) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $out "name" $p.name -}}
{{- end -}}

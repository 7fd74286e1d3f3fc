{{/*
Checks that values.schema.json cannot express (they compare two values). Each fails the install with a
message naming the values to change. Included once, from deployments.yaml.
*/}}
{{- define "noetl.validate" -}}
{{- $partitions := int .Values.topics.partitions -}}
{{- if gt (int .Values.broker.replicas) $partitions -}}
{{- fail (printf "broker.replicas (%d) must be <= topics.partitions (%d): each broker replica owns whole partitions of noetl.requests/noetl.results, so extra replicas would get none. Lower broker.replicas or raise topics.partitions (and repartition the topics)." (int .Values.broker.replicas) $partitions) -}}
{{- end -}}
{{- $seen := dict -}}
{{- range $i, $p := .Values.workers -}}
{{- $pool := dict -}}{{- include "noetl.mergePool" (dict "out" $pool "p" $p "d" $.Values.workerDefaults) -}}
{{- if hasKey $seen $pool.name -}}
{{- fail (printf "workers[%d].name %q is used twice: every pool needs its own name (its topic is noetl.commands.<name>)" $i $pool.name) -}}
{{- end -}}
{{- $_ := set $seen $pool.name true -}}
{{- $most := int $pool.replicas -}}
{{- if $pool.autoscaling.enabled -}}
{{- $most = int $pool.autoscaling.maxReplicas -}}
{{- if gt (int $pool.autoscaling.minReplicas) $most -}}
{{- fail (printf "workers[%d] (%s): autoscaling.minReplicas (%d) must be <= autoscaling.maxReplicas (%d)" $i $pool.name (int $pool.autoscaling.minReplicas) $most) -}}
{{- end -}}
{{- end -}}
{{- if gt $most $partitions -}}
{{- fail (printf "workers[%d] (%s): %d replicas (replicas, or autoscaling.maxReplicas) but noetl.commands.%s has topics.partitions (%d) partitions: a pod beyond that gets no partition and stays idle. Lower it or raise topics.partitions." $i $pool.name $most $pool.name $partitions) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.ingest.autoscaling.enabled (gt (int .Values.ingest.autoscaling.minReplicas) (int .Values.ingest.autoscaling.maxReplicas)) -}}
{{- fail (printf "ingest.autoscaling.minReplicas (%d) must be <= ingest.autoscaling.maxReplicas (%d)" (int .Values.ingest.autoscaling.minReplicas) (int .Values.ingest.autoscaling.maxReplicas)) -}}
{{- end -}}
{{- if and .Values.httpRoute.enabled (not .Values.httpRoute.parentRefs) -}}
{{- fail "httpRoute.enabled needs httpRoute.parentRefs (the Gateway to attach to)" -}}
{{- end -}}
{{- if and .Values.externalKafka.tls.caSecret (not (hasSuffix "SSL" .Values.externalKafka.securityProtocol)) -}}
{{- fail (printf "externalKafka.tls.caSecret is set but externalKafka.securityProtocol is %s: the CA is only used with SSL or SASL_SSL" .Values.externalKafka.securityProtocol) -}}
{{- end -}}
{{- if and .Values.secrets.existingSecret (or .Values.secrets.secretKey .Values.externalDatabase.password .Values.externalDatabase.url) -}}
{{- fail "secrets.existingSecret is set: put NOETL_SECRET_KEY and NOETL_DATABASE_URL in that Secret and leave secrets.secretKey, externalDatabase.url and externalDatabase.password empty" -}}
{{- end -}}
{{- end -}}

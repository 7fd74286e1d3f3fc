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
{{- if .Values.ingress.enabled -}}
{{- $covered := false -}}
{{- range .Values.ingress.tls -}}{{- if has $.Values.ingress.host .hosts -}}{{- $covered = true -}}{{- end -}}{{- end -}}
{{- if not $covered -}}
{{- fail (printf "ingress.enabled needs TLS for ingress.host (%q): add it to the hosts of an ingress.tls entry. The chart ships no Ingress in clear text (docs/kubernetes.md, \"Exposure\")" .Values.ingress.host) -}}
{{- end -}}
{{- end -}}
{{- $envs := list (dict "n" "ingest" "e" .Values.ingest.extraEnv) (dict "n" "query" "e" .Values.query.extraEnv) (dict "n" "render" "e" .Values.render.extraEnv) (dict "n" "broker" "e" .Values.broker.extraEnv) (dict "n" "workerDefaults" "e" .Values.workerDefaults.extraEnv) -}}
{{- range $i, $p := .Values.workers -}}{{- $envs = append $envs (dict "n" (printf "workers[%d]" $i) "e" ($p.extraEnv | default list)) -}}{{- end -}}
{{- range $envs -}}
{{- $where := .n -}}
{{- range .e -}}
{{- if and (eq .name "NOETL_AUTH") (eq (lower (toString (.value | default ""))) "off" "false" "0" "no") -}}
{{- fail (printf "%s.extraEnv sets NOETL_AUTH=off: the chart's services listen on the pod network, where authentication stays on (docs/security.md)" $where) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and .Values.httpRoute.enabled (not .Values.httpRoute.parentRefs) -}}
{{- fail "httpRoute.enabled needs httpRoute.parentRefs (the Gateway to attach to)" -}}
{{- end -}}
{{- if and .Values.externalKafka.tls.caSecret (not (hasSuffix "SSL" .Values.externalKafka.securityProtocol)) -}}
{{- fail (printf "externalKafka.tls.caSecret is set but externalKafka.securityProtocol is %s: the CA is only used with SSL or SASL_SSL" .Values.externalKafka.securityProtocol) -}}
{{- end -}}
{{- if and .Values.secrets.existingSecret (or .Values.secrets.secretKey .Values.secrets.brokerToken .Values.externalDatabase.password .Values.externalDatabase.url) -}}
{{- fail "secrets.existingSecret is set: put NOETL_SECRET_KEY, NOETL_DATABASE_URL and NOETL_BROKER_TOKEN in that Secret and leave secrets.secretKey, secrets.brokerToken, externalDatabase.url and externalDatabase.password empty" -}}
{{- end -}}
{{- end -}}

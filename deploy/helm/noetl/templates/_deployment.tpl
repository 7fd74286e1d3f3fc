{{/*
One role's Deployment. ctx = dict "root" $ "role" ingest|query|render|broker|worker "v" <the role's values>
"pool" <pool name, workers only>.

Environment = the shared ConfigMap (envFrom) + the role's own variables below. Every name is a field of
noetl_runtime.settings.Settings (or of noetl_broker.settings.BrokerSettings for the broker) or a variable
the role's own code reads; tests/contract/test_helm_chart.py holds the chart to that.
*/}}
{{- define "noetl.deployment" -}}
{{- $root := .root -}}
{{- $role := .role -}}
{{- $v := .v -}}
{{- $name := include "noetl.componentName" . -}}
{{- $secret := include "noetl.secretName" $root -}}
{{- $keys := $root.Values.secrets.keys -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $name }}
  labels:
    {{- include "noetl.componentLabels" . | nindent 4 }}
spec:
  {{- if not (and $v.autoscaling $v.autoscaling.enabled) }}
  replicas: {{ $v.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "noetl.selectorLabels" . | nindent 6 }}
  {{- if eq $role "broker" }}
  strategy:
    # A broker replica owns partitions; surging adds a rebalance per new pod for nothing.
    type: RollingUpdate
    rollingUpdate: {maxSurge: 0, maxUnavailable: 1}
  {{- end }}
  template:
    metadata:
      labels:
        {{- include "noetl.componentLabels" . | nindent 8 }}
        {{- with $root.Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
        {{- if not $root.Values.secrets.existingSecret }}
        {{- /* the whole Secret, generated key included: a hash of the DSN alone would let anyone who reads
               pod specs test password guesses against it */}}
        checksum/secret: {{ include (print $root.Template.BasePath "/secret.yaml") $root | sha256sum }}
        {{- end }}
        {{- with $root.Values.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      {{- include "noetl.podCommon" $root | nindent 6 }}
      terminationGracePeriodSeconds: {{ if eq $role "worker" }}{{ add (int $v.shutdownGraceSeconds) 15 }}{{ else if eq $role "broker" }}{{ $v.terminationGracePeriodSeconds }}{{ else }}30{{ end }}
      containers:
        - name: {{ $role }}
          image: {{ include "noetl.image" $root | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["python", "-m", {{ include "noetl.module" $role | quote }}]
          workingDir: /var/lib/noetl
          ports:
            - name: http
              containerPort: {{ $root.Values.httpPort }}
              protocol: TCP
          envFrom:
            - configMapRef:
                name: {{ include "noetl.configMapName" $root }}
            {{- with $v.extraEnvFrom }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          env:
            - name: NOETL_KAFKA_CLIENT_ID
              value: {{ printf "%s-%s" $root.Values.config.kafkaClientId (ternary (printf "worker-%s" (toString .pool)) $role (eq $role "worker")) | quote }}
            {{- if include "noetl.needsDatabase" $role }}
            - name: NOETL_DATABASE_URL
              valueFrom:
                secretKeyRef: {name: {{ $secret }}, key: {{ $keys.databaseUrl }}}
            {{- end }}
            {{- if include "noetl.needsSecretKey" $role }}
            - name: NOETL_SECRET_KEY
              valueFrom:
                secretKeyRef: {name: {{ $secret }}, key: {{ $keys.secretKey }}}
            {{- end }}
            {{- if include "noetl.needsBrokerToken" $role }}
            - name: NOETL_BROKER_TOKEN
              valueFrom:
                secretKeyRef: {name: {{ $secret }}, key: {{ $keys.brokerToken }}}
            {{- end }}
            {{- if include "noetl.kafkaSasl" $root }}
            - name: NOETL_KAFKA_SASL_USERNAME
              valueFrom:
                secretKeyRef: {name: {{ $secret }}, key: {{ $keys.kafkaUsername }}}
            - name: NOETL_KAFKA_SASL_PASSWORD
              valueFrom:
                secretKeyRef: {name: {{ $secret }}, key: {{ $keys.kafkaPassword }}}
            {{- end }}
            {{- if eq $role "broker" }}
            - name: NOETL_BROKER_POOLS
              value: {{ include "noetl.poolNames" $root | quote }}
            - name: NOETL_BROKER_BATCH_SIZE
              value: {{ $v.batchSize | int | quote }}
            - name: NOETL_BROKER_COMMIT_INTERVAL
              value: {{ $v.commitInterval | quote }}
            {{- end }}
            {{- if has $role (list "ingest" "query") }}
            # GET /api/executions/{id}/explain asks the brokers (any pod: it forwards to the owner)
            - name: NOETL_BROKER_URL
              value: {{ printf "http://%s:%v" (include "noetl.componentName" (dict "root" $root "role" "broker")) $root.Values.broker.service.port | quote }}
            {{- end }}
            {{- if eq $role "worker" }}
            - name: NOETL_WORKER_POOL
              value: {{ .pool | quote }}
            - name: NOETL_WORKER_CONCURRENCY
              value: {{ $v.concurrency | int | quote }}
            - name: NOETL_WORKER_PYTHON_PROCESSES
              value: {{ $v.pythonProcesses | int | quote }}
            - name: NOETL_WORKER_SHUTDOWN_GRACE
              value: {{ $v.shutdownGraceSeconds | quote }}
            {{- end }}
            {{- with $v.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          startupProbe:
            httpGet: {path: /health, port: http}
            {{- toYaml $root.Values.probes.startup | nindent 12 }}
          livenessProbe:
            httpGet: {path: /health, port: http}
            {{- toYaml $root.Values.probes.liveness | nindent 12 }}
          readinessProbe:
            httpGet: {path: /ready, port: http}
            {{- toYaml $root.Values.probes.readiness | nindent 12 }}
          {{- with $v.resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            - {name: tmp, mountPath: /tmp}
            - {name: work, mountPath: /var/lib/noetl}
            {{- with $root.Values.externalKafka.tls.caSecret }}
            - {name: kafka-ca, mountPath: {{ include "noetl.kafkaCaDir" $root }}, readOnly: true}
            {{- end }}
      volumes:
        - name: tmp
          emptyDir: {sizeLimit: {{ $root.Values.tmpSizeLimit }}}
        - name: work
          emptyDir: {sizeLimit: {{ $root.Values.tmpSizeLimit }}}
        {{- with $root.Values.externalKafka.tls.caSecret }}
        - name: kafka-ca
          secret:
            secretName: {{ . }}
            items: [{key: {{ $root.Values.externalKafka.tls.caKey }}, path: {{ $root.Values.externalKafka.tls.caKey }}}]
        {{- end }}
{{- end -}}

{{- define "noetl.poolNames" -}}
{{- $names := list -}}
{{- range .Values.workers -}}{{- $names = append $names .name -}}{{- end -}}
{{- join "," $names -}}
{{- end -}}

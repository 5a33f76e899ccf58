{{- define "grokserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 40 | trimSuffix "-" }}{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "grokserve.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "grokserve.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "grokserve.checkpointPath" -}}
{{ .Values.model.storage.mountPath }}/{{ .Values.model.storage.subPath }}
{{- end -}}

{{/* The cluster spec (grokserve.cluster.spec.ClusterSpec), the same document `grokserve up` reads. */}}
{{- define "grokserve.clusterSpec" -}}
name: {{ include "grokserve.fullname" . }}
model:
  checkpoint: {{ include "grokserve.checkpointPath" . }}
  dtype: {{ .Values.model.dtype }}
  weights: {{ .Values.model.weights | default "dense" }}
  device: {{ .Values.model.device }}
router:
  replicas: {{ .Values.router.replicas }}
  host: 0.0.0.0
  grpc_port: {{ .Values.router.grpcPort }}
  http_port: {{ .Values.router.httpPort }}
  metrics_port: {{ .Values.router.metricsPort }}
  dispatch:
    transport: {{ .Values.router.dispatchTransport }}
    grpc_call: {{ .Values.router.transport }}
    deadline_s: {{ .Values.router.dispatchDeadlineSeconds }}
  ray_actor_options:
    num_cpus: {{ .Values.router.rayActorOptions.num_cpus }}
    num_gpus: {{ .Values.router.rayActorOptions.num_gpus }}
    resources: {grokserve_router: 1}
  limits:
    {{- toYaml .Values.router.limits | nindent 4 }}
experts:
  {{- if .Values.experts.shards }}
  shards:
    {{- range .Values.experts.shards }}
    - name: {{ .name }}
      layers: {{ .layers | default "all" | quote }}
      experts: {{ .experts | quote }}
      replicas: {{ .replicas | default 1 }}
    {{- end }}
  {{- else }}
  workers: {{ .Values.experts.workers }}
  layer_groups: {{ .Values.experts.layerGroups }}
  replicas: {{ .Values.experts.replicas }}
  {{- end }}
  threads: {{ .Values.experts.threads }}
  metrics_port: {{ .Values.experts.metricsPort }}
  ray_actor_options:
    num_cpus: {{ .Values.experts.rayActorOptions.num_cpus }}
    num_gpus: {{ .Values.experts.rayActorOptions.num_gpus }}
    resources: {grokserve_expert: 1}
{{- $security := include "grokserve.securitySpec" . | trim }}
security: {{ if $security }}{{ $security | nindent 2 }}{{ else }}{}{{ end }}
{{- end -}}

{{- define "grokserve.volumes" -}}
- name: models
  {{- if eq .Values.model.storage.type "hostPath" }}
  hostPath:
    path: {{ .Values.model.storage.hostPath.path }}
    type: Directory
  {{- else }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.storage.pvc.claimName }}
  {{- end }}
- name: tmp
  emptyDir: {}
- name: dshm
  emptyDir: {medium: Memory}
{{- include "grokserve.secretVolumes" . }}
{{- end -}}

{{- define "grokserve.secretVolumes" -}}
{{- with .Values.security }}
{{- if .clientTls.enabled }}
- name: client-tls
  secret: {secretName: {{ .clientTls.secretName }}, defaultMode: 0400}
{{- end }}
{{- if .tokens.enabled }}
- name: tokens
  secret: {secretName: {{ .tokens.secretName }}, defaultMode: 0400}
{{- end }}
{{- if .dispatchMtls.enabled }}
- name: dispatch-mtls
  secret: {secretName: {{ .dispatchMtls.secretName }}, defaultMode: 0400}
{{- end }}
{{- end }}
{{- end -}}

{{- define "grokserve.secretMounts" -}}
{{- with .Values.security }}
{{- if .clientTls.enabled }}
- {name: client-tls, mountPath: /etc/grokserve/client-tls, readOnly: true}
{{- end }}
{{- if .tokens.enabled }}
- {name: tokens, mountPath: /etc/grokserve/tokens, readOnly: true}
{{- end }}
{{- if .dispatchMtls.enabled }}
- {name: dispatch-mtls, mountPath: /etc/grokserve/dispatch-mtls, readOnly: true}
{{- end }}
{{- end }}
{{- end -}}

{{- define "grokserve.volumeMounts" -}}
- name: models
  mountPath: {{ .Values.model.storage.mountPath }}
  readOnly: {{ ne .Values.model.storage.type "convert" }}
- name: tmp
  mountPath: /tmp
- name: dshm
  mountPath: /dev/shm
{{- include "grokserve.secretMounts" . }}
{{- end -}}

{{/* A Ray pod template; args: dict root, role, resources, gpus, nodeSelector, tolerations, ports */}}
{{- define "grokserve.rayPod" -}}
{{- $root := .root -}}
metadata:
  labels:
    {{- include "grokserve.labels" $root | nindent 4 }}
    grokserve.io/role: {{ .role }}
spec:
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- with .initContainers }}
  initContainers:
    {{- . | nindent 4 }}
  {{- end }}
  containers:
    - name: ray-{{ .role }}
      image: "{{ $root.Values.image.repository }}:{{ $root.Values.image.tag }}"
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      securityContext:
        {{- toYaml $root.Values.containerSecurityContext | nindent 8 }}
      env:
        - name: RAY_USAGE_STATS_ENABLED
          value: "0"
        - name: HOME
          value: /tmp
      ports:
        {{- toYaml .ports | nindent 8 }}
      resources:
        requests:
          {{- toYaml .resources.requests | nindent 10 }}
        limits:
          {{- toYaml .resources.limits | nindent 10 }}
          {{- if gt (int .gpus) 0 }}
          nvidia.com/gpu: {{ .gpus }}
          {{- end }}
      volumeMounts:
        {{- include "grokserve.volumeMounts" $root | nindent 8 }}
  volumes:
    {{- include "grokserve.volumes" $root | nindent 4 }}
  {{- with .nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{- define "grokserve.metricsPorts" -}}
{{- $base := int .base -}}
{{- range $i := until 6 }}
- name: {{ printf "%s-m%d" $.prefix $i }}
  containerPort: {{ add $base $i }}
  protocol: TCP
{{- end }}
{{- end -}}


{{- define "grokserve.securitySpec" -}}
{{- with .Values.security }}
{{- if .clientTls.enabled }}
client_tls: {cert_file: /etc/grokserve/client-tls/tls.crt, key_file: /etc/grokserve/client-tls/tls.key}
{{- end }}
{{- if .tokens.enabled }}
tokens_file: /etc/grokserve/tokens/{{ .tokens.key }}
{{- end }}
{{- if .dispatchMtls.enabled }}
dispatch_mtls:
  ca_file: /etc/grokserve/dispatch-mtls/ca.crt
  cert_file: /etc/grokserve/dispatch-mtls/tls.crt
  key_file: /etc/grokserve/dispatch-mtls/tls.key
  server_name: {{ .dispatchMtls.serverName }}
{{- end }}
{{- end }}
{{- end -}}
